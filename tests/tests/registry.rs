//! The registry path a user takes: the images `make images` wrote as OCI archives are pushed
//! with crane (`tests/env/push.sh`, what `make push` runs) to the test bed's OCI registry
//! (`tests/env/registry.sh`, `crane registry serve` on 127.0.0.1:5005), and the chart is
//! installed from that registry with `imagePullPolicy: Always`: the node's containerd pulls
//! the operator image over the registry API, and the running containers' image IDs are the
//! digests the registry holds.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Instant;

use serde_json::{Value, json};
use sluice_tests::kafka::{self, Topic};
use sluice_tests::kube_env::{self, Namespace};

fn repo() -> PathBuf {
    sluice_tests::repo_root()
}

use sluice_tests::output_text as text;

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tool(key: &str, args: &[&str]) -> Output {
    Command::new(sluice_tests::tool(key))
        .args(args)
        .env("KUBECONFIG", kube_env::kubeconfig_path())
        .output()
        .unwrap_or_else(|e| panic!("running {key}: {e}"))
}

fn script(name: &str, args: &[&str]) -> Output {
    Command::new("bash")
        .arg(sluice_tests::env_scripts().join(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running tests/env/{name}: {e}"))
}

/// Uninstalls the release when dropped (its ClusterRole outlives the namespace).
struct Release<'a>(&'a str, &'a str);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        let _ = tool(
            "SLUICE_HELM",
            &[
                "uninstall",
                self.0,
                "--namespace",
                self.1,
                "--ignore-not-found",
            ],
        );
    }
}

#[tokio::test]
async fn the_chart_installs_from_the_registry_with_pull_policy_always() {
    let client = kube_env::client().await;
    // The registry: the test bed's (make env-up starts it); started here if it is not.
    ok(script("registry.sh", &["up"]), "tests/env/registry.sh up");
    let registry = ok(script("registry.sh", &["info"]), "registry.sh info")
        .trim()
        .to_owned();
    let labels = [
        ("pod-security.kubernetes.io/enforce", "restricted"),
        ("pod-security.kubernetes.io/enforce-version", "latest"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let ns = Namespace::create_with_labels(&client, "registry", labels).await;
    let path = format!("{registry}/{}", ns.name);

    // Push what `make images` built (as `make push REGISTRY=...` does).
    let pushed = ok(
        script(
            "push.sh",
            &[&path, "dev", "operator", "consumer", "testapp"],
        ),
        "tests/env/push.sh (run `make images` first)",
    );
    assert!(
        pushed.contains(&format!("{path}/operator:dev@sha256:")),
        "push.sh printed no operator digest:\n{pushed}"
    );
    // The node already holds the operator's layers (`make images` imports them), so a
    // layer of this test's own is appended: the node must fetch its blob from the
    // registry, as a node that never saw Sluice fetches all of them.
    let crane = ok(script("build-crane.sh", &[]), "build-crane.sh")
        .trim()
        .to_owned();
    let marker_dir = std::env::temp_dir().join(format!("{}-marker", ns.name));
    std::fs::create_dir_all(marker_dir.join("etc")).expect("marker folder");
    std::fs::write(marker_dir.join("etc/sluice-registry-test"), &ns.name).expect("marker");
    let layer = marker_dir.with_extension("tar");
    ok(
        Command::new("tar")
            .args(["-cf", layer.to_str().expect("utf-8"), "-C"])
            .arg(&marker_dir)
            .arg("etc")
            .output()
            .expect("tar"),
        "packing the marker layer",
    );
    let tag = "registry-test";
    let out = Command::new(&crane)
        .args([
            "append",
            "--base",
            &format!("{path}/operator:dev"),
            "--new_layer",
            layer.to_str().expect("utf-8"),
            "--new_tag",
            &format!("{path}/operator:{tag}"),
        ])
        .output()
        .expect("crane append");
    let _ = std::fs::remove_dir_all(&marker_dir);
    let _ = std::fs::remove_file(&layer);
    let digest = ok(out, "crane append").trim().to_owned();
    let digest = digest
        .rsplit('@')
        .next()
        .expect("crane append prints the new image's reference")
        .to_owned();
    assert!(
        digest.starts_with("sha256:"),
        "crane append printed {digest}"
    );

    // The EventConsumer CRD is shared with the other tests: applied, not owned.
    let crd = repo().join("charts/sluice/files/eventconsumers.sluice.dev.yaml");
    ok(
        tool(
            "SLUICE_KUBECTL",
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=sluice-tests",
                "-f",
                crd.to_str().expect("utf-8 path"),
            ],
        ),
        "applying the CRD",
    );
    let release: String = format!("reg-{}", ns.name).chars().take(53).collect();
    let release = release.trim_end_matches('-').to_owned();
    let _guard = Release(&release, &ns.name);
    let chart = repo().join("charts/sluice");
    let started = Instant::now();
    let install = tool(
        "SLUICE_HELM",
        &[
            "install",
            &release,
            chart.to_str().expect("utf-8 path"),
            "--namespace",
            &ns.name,
            "--set",
            "crds.install=false",
            "--set",
            &format!("operator.image.repository={path}/operator"),
            "--set",
            &format!("operator.image.tag={tag}"),
            "--set",
            "operator.image.pullPolicy=Always",
            "--set",
            &format!("sidecar.image.repository={path}/consumer"),
            "--set",
            "sidecar.image.tag=dev",
            "--set",
            &format!("operator.watchNamespace={}", ns.name),
            "--wait",
            "--timeout",
            "180s",
        ],
    );
    if !install.status.success() {
        let events = tool("SLUICE_KUBECTL", &["get", "events", "-n", &ns.name]);
        panic!(
            "helm install from the registry failed:\n{}\nevents:\n{}",
            text(&install),
            text(&events)
        );
    }
    println!(
        "chart installed from {path} (pullPolicy Always) in {:.1?}",
        started.elapsed()
    );

    let pods = ok(
        tool(
            "SLUICE_KUBECTL",
            &[
                "get",
                "pods",
                "-n",
                &ns.name,
                "-l",
                "app.kubernetes.io/component=operator",
                "-o",
                "json",
            ],
        ),
        "kubectl get pods",
    );
    let pods: Value = serde_json::from_str(&pods).expect("pods JSON");
    let items = pods["items"].as_array().expect("items");
    assert_eq!(items.len(), 2, "operator pods: {pods}");
    for pod in items {
        let container = &pod["spec"]["containers"][0];
        assert_eq!(container["image"], format!("{path}/operator:{tag}"));
        assert_eq!(container["imagePullPolicy"], "Always");
        let status = &pod["status"]["containerStatuses"][0];
        assert_eq!(status["ready"], true, "{status}");
        let image_id = status["imageID"].as_str().expect("imageID");
        assert_eq!(
            image_id,
            format!("{path}/operator@{digest}"),
            "the running operator image is not the one pushed to the registry"
        );
    }
    // The node fetched the appended layer's blob from the registry.
    let log = std::fs::read_to_string(sluice_tests::state_dir().join("logs/registry.log"))
        .expect("the registry's log");
    let manifest = ok(
        Command::new(&crane)
            .args(["manifest", &format!("{path}/operator:{tag}")])
            .output()
            .expect("crane manifest"),
        "crane manifest",
    );
    let manifest: Value = serde_json::from_str(&manifest).expect("manifest JSON");
    let appended = manifest["layers"]
        .as_array()
        .and_then(|l| l.last())
        .and_then(|l| l["digest"].as_str())
        .expect("the appended layer's digest")
        .to_owned();
    assert!(
        log.contains(&format!("GET /v2/{}/operator/blobs/{appended}", ns.name)),
        "the node did not fetch the appended layer {appended} from the registry"
    );
    // The operator injects the sidecar from the registry too.
    let deployment = ok(
        tool(
            "SLUICE_KUBECTL",
            &["get", "deployment", "-n", &ns.name, "-o", "json"],
        ),
        "kubectl get deployment",
    );
    assert!(
        deployment.contains(&format!("{path}/consumer:dev")),
        "the operator is not configured with the registry's sidecar image"
    );

    // An EventConsumer's pod pulls both of its images from the registry: the application
    // (named in its template) and the sidecar (which the operator injects). The node holds
    // neither under these names, so each is a pull over the registry API.
    let pushed_digest = |name: &str| {
        pushed
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{path}/{name}:dev@")))
            .unwrap_or_else(|| panic!("push.sh printed no {name} digest:\n{pushed}"))
            .to_owned()
    };
    let topic = Topic::create("registry", 1).await;
    let ec = json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "EventConsumer",
        "metadata": {"name": "pulled", "namespace": ns.name},
        "spec": {
            "kafka": {
                "bootstrapServers": kafka::pod_bootstrap(),
                "topics": [topic.name],
                "groupId": kafka::group("registry"),
            },
            "delivery": {"url": "http://127.0.0.1:8080/events"},
            "template": {"spec": {
                "securityContext": {
                    "runAsNonRoot": true,
                    "runAsUser": 65532,
                    "seccompProfile": {"type": "RuntimeDefault"}
                },
                "containers": [{
                    "name": "app",
                    "image": format!("{path}/testapp:dev"),
                    "env": [{"name": "TESTAPP_COLLECTOR", "value": "127.0.0.1:9"}],
                    "securityContext": {
                        "allowPrivilegeEscalation": false,
                        "readOnlyRootFilesystem": true,
                        "capabilities": {"drop": ["ALL"]}
                    }
                }]
            }}
        }
    });
    ok(
        sluice_tests::kubectl(&["apply", "-f", "-"], Some(&ec.to_string())),
        "kubectl apply the EventConsumer",
    );
    let started = Instant::now();
    let image_ids = loop {
        let pods = ok(
            tool(
                "SLUICE_KUBECTL",
                &[
                    "get",
                    "pods",
                    "-n",
                    &ns.name,
                    "-l",
                    "sluice.dev/consumer=pulled",
                    "-o",
                    "json",
                ],
            ),
            "kubectl get pods",
        );
        let pods: Value = serde_json::from_str(&pods).expect("pods JSON");
        let statuses: Vec<Value> = pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|p| {
                let s = &p["status"];
                let main = s["containerStatuses"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let init = s["initContainerStatuses"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                main.into_iter().chain(init)
            })
            .collect();
        let id = |name: &str| {
            statuses
                .iter()
                .find(|c| c["name"] == name && c["ready"] == true)
                .and_then(|c| c["imageID"].as_str())
                .map(str::to_owned)
        };
        if let (Some(app), Some(sidecar)) = (id("app"), id("sluice")) {
            break (app, sidecar);
        }
        if started.elapsed() > std::time::Duration::from_secs(180) {
            let events = tool("SLUICE_KUBECTL", &["get", "events", "-n", &ns.name]);
            panic!(
                "the EventConsumer's containers were not ready within 180 s: {statuses:?}\nevents:\n{}",
                text(&events)
            );
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    };
    // containerd names an image ID by the first repository it pulled that content from, so
    // after an earlier run pushed the same layers under another path the ID's repository
    // may be that path: the digest and the registry are what identify the pushed image.
    for (what, id, image) in [
        ("application", &image_ids.0, "testapp"),
        ("sidecar", &image_ids.1, "consumer"),
    ] {
        let digest = pushed_digest(image);
        assert!(
            id.starts_with(&format!("{registry}/")) && id.ends_with(&format!("/{image}@{digest}")),
            "the {what} container does not run the image pushed to the registry: \
             its image ID is {id}, pushed was {path}/{image}@{digest}"
        );
    }
    println!(
        "an EventConsumer's application and sidecar pulled from {path} and ready in {:.1?}",
        started.elapsed()
    );
}
