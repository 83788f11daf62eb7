//! `helm upgrade` carries the EventConsumer CRD (charts/sluice/templates/crd.yaml), on the
//! test bed's real API server:
//!
//! * from the previous chart (tests/fixtures/chart-previous: chart 0.1.0 as of commit
//!   a6ee126, whose CRD sat in crds/ and lacks `status.effective.maxBufferedBytes`): the
//!   field is pruned under the old CRD; a plain upgrade stops with Helm's ownership error
//!   (the README's upgrade note says so); `--take-ownership` upgrades the CRD, the field is
//!   accepted and kept, the EventConsumer made before the upgrade is still there; later
//!   upgrades need no flag; `helm uninstall` keeps the CRD and the EventConsumers; the wide
//!   Topics column prints JSON under the old CRD and `orders,payments` under the new one;
//! * a fresh install creates the CRD with the keep policy; `crds.install=false` renders none.
//!
//! The CRD is cluster-wide and other tests use `eventconsumers.sluice.dev` at the same
//! time, so these tests rename the API group in their copies of the two charts to one of
//! their own (`<namespace>.sluice.test`); everything else is the charts as shipped. The
//! operator pods the charts create use the chart's default image tag, which the node does
//! not have: they never start, and the tests do not wait for them.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::{Value, json};
use sluice_tests::kube_env::{self, Namespace};
use sluice_tests::{kubectl, ok, run_tool};

const CRD_FILE: &str = "eventconsumers.sluice.dev.yaml";

fn repo() -> PathBuf {
    sluice_tests::repo_root()
}

use sluice_tests::output_text as text;

fn helm(args: &[&str]) -> Output {
    run_tool("SLUICE_HELM", args, None)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("creating the chart copy");
    for entry in std::fs::read_dir(from).expect("reading the chart") {
        let entry = entry.expect("chart entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copying a chart file");
        }
    }
}

/// A copy of `chart` under `dir` whose CRD (at `crd_path` inside the chart) is in `group`.
fn chart_copy(chart: &Path, crd_path: &str, dir: &Path, group: &str) -> PathBuf {
    copy_dir(chart, dir);
    let crd = dir.join(crd_path);
    let yaml = std::fs::read_to_string(&crd).expect("the chart's CRD");
    let renamed = yaml
        .replace(
            "name: eventconsumers.sluice.dev\n",
            &format!("name: eventconsumers.{group}\n"),
        )
        .replace("\n  group: sluice.dev\n", &format!("\n  group: {group}\n"))
        // Its own short name: `kubectl get ec` elsewhere on the shared API server must keep
        // resolving to the real CRD while this copy exists.
        .replace(
            "    shortNames:\n    - ec\n",
            "    shortNames:\n    - ectest\n",
        );
    assert!(
        renamed.contains("- ectest\n"),
        "the CRD's short name was not found"
    );
    assert_ne!(yaml, renamed, "the CRD's name and group were not found");
    std::fs::write(&crd, renamed).expect("writing the renamed CRD");
    dir.to_path_buf()
}

/// A temporary folder, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a temporary folder");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deletes the test's own CRD (kept by the chart's policy, so nothing else would).
struct CrdCleanup(String);

impl Drop for CrdCleanup {
    fn drop(&mut self) {
        let _ = kubectl(
            &[
                "delete",
                "crd",
                &self.0,
                "--ignore-not-found",
                "--wait=false",
            ],
            None,
        );
    }
}

/// Uninstalls a release when dropped (its ClusterRole and ClusterRoleBinding are
/// cluster-wide and would outlive the namespace).
struct Release {
    name: String,
    ns: String,
}

impl Release {
    /// A release name unique to this test run (`<prefix>-<namespace>`, at most 53 characters).
    fn new(prefix: &str, ns: &str) -> Release {
        let name: String = format!("{prefix}-{ns}").chars().take(53).collect();
        Release {
            name: name.trim_end_matches('-').to_owned(),
            ns: ns.to_owned(),
        }
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = helm(&[
            "uninstall",
            &self.name,
            "--namespace",
            &self.ns,
            "--ignore-not-found",
        ]);
    }
}

/// `status.effective` with every field the current CRD requires (a valid value of each
/// field's type), `maxBufferedBytes` set to `budget`.
fn effective_status(budget: u64) -> Value {
    let path = repo().join("charts/sluice/files").join(CRD_FILE);
    let crd: Value =
        serde_norway::from_str(&std::fs::read_to_string(&path).expect("the chart's CRD"))
            .expect("the chart's CRD is YAML");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        ["effective"];
    let mut effective = serde_json::Map::new();
    for field in schema["required"].as_array().expect("effective.required") {
        let field = field.as_str().expect("a field name");
        let value = match schema["properties"][field]["type"].as_str() {
            Some("integer") => json!(1),
            Some("string") => json!("cooperative"),
            other => panic!("status.effective.{field}: unexpected type {other:?}"),
        };
        effective.insert(field.to_owned(), value);
    }
    assert!(
        effective.contains_key("maxBufferedBytes"),
        "the current CRD no longer requires status.effective.maxBufferedBytes; this test needs a field the previous chart's CRD lacks"
    );
    effective.insert("maxBufferedBytes".to_owned(), json!(budget));
    Value::Object(effective)
}

/// Writes `status.effective` through the status subresource and returns
/// `Ok(maxBufferedBytes as read back)` or `Err(the API server's refusal)`.
fn write_and_read_budget(
    resource: &str,
    ns: &str,
    name: &str,
    budget: u64,
) -> Result<Option<u64>, String> {
    let patch = json!({"status": {"effective": effective_status(budget)}}).to_string();
    let out = kubectl(
        &[
            "patch",
            resource,
            name,
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ],
        None,
    );
    if !out.status.success() {
        return Err(text(&out));
    }
    let got = ok(
        kubectl(&["get", resource, name, "-n", ns, "-o", "json"], None),
        "kubectl get the EventConsumer",
    );
    let got: Value = serde_json::from_str(&got).expect("EventConsumer JSON");
    Ok(got["status"]["effective"]["maxBufferedBytes"].as_u64())
}

fn crd_json(name: &str) -> Value {
    let out = ok(
        kubectl(&["get", "crd", name, "-o", "json"], None),
        "kubectl get crd",
    );
    serde_json::from_str(&out).expect("CRD JSON")
}

fn crd_has_budget_field(crd: &Value) -> bool {
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        ["effective"]["properties"]
        .get("maxBufferedBytes")
        .is_some()
}

/// `kubectl get RESOURCE NAME -o wide` (header and row).
fn topics_column(resource: &str, ns: &str, name: &str) -> String {
    ok(
        kubectl(&["get", resource, name, "-n", ns, "-o", "wide"], None),
        "kubectl get -o wide",
    ) + " "
}

#[tokio::test]
async fn helm_upgrade_from_the_previous_chart_carries_the_new_crd_field() {
    let client = kube_env::client().await;
    let ns = Namespace::create(&client, "chart-upgrade").await;
    let group = format!("{}.sluice.test", ns.name);
    let crd_name = format!("eventconsumers.{group}");
    let resource = crd_name.clone();
    let _cleanup = CrdCleanup(crd_name.clone());
    let tmp = TempDir::new(&ns.name);
    let previous = chart_copy(
        &repo().join("tests/fixtures/chart-previous"),
        &format!("crds/{CRD_FILE}"),
        &tmp.0.join("previous"),
        &group,
    );
    let current = chart_copy(
        &repo().join("charts/sluice"),
        &format!("files/{CRD_FILE}"),
        &tmp.0.join("current"),
        &group,
    );
    let release_guard = Release::new("up", &ns.name);
    let release = release_guard.name.as_str();
    let previous = previous.to_str().expect("utf-8 path");
    let current = current.to_str().expect("utf-8 path");

    // The previous chart: Helm creates the CRD from crds/, outside the release.
    ok(
        helm(&["install", release, previous, "--namespace", &ns.name]),
        "helm install (previous chart)",
    );
    let crd = crd_json(&crd_name);
    assert!(
        !crd_has_budget_field(&crd),
        "the previous chart's CRD already has maxBufferedBytes: the fixture is not the previous chart"
    );
    let ec = json!({
        "apiVersion": format!("{group}/v1alpha1"),
        "kind": "EventConsumer",
        "metadata": {"name": "audit-log"},
        "spec": {
            "kafka": {"bootstrapServers": "kafka.kafka.svc:9092", "topics": ["orders", "payments"]},
            "delivery": {"url": "http://127.0.0.1:8080/events"},
            "template": {"spec": {"containers": [
                {"name": "app", "image": "shop/audit-log:1.0", "ports": [{"containerPort": 8080}]}
            ]}}
        }
    });
    ok(
        kubectl(
            &["create", "-n", &ns.name, "-f", "-"],
            Some(&ec.to_string()),
        ),
        "creating an EventConsumer under the previous CRD",
    );
    let uid_before = {
        let out = ok(
            kubectl(
                &[
                    "get",
                    &resource,
                    "audit-log",
                    "-n",
                    &ns.name,
                    "-o",
                    "jsonpath={.metadata.uid}",
                ],
                None,
            ),
            "kubectl get uid",
        );
        out.trim().to_owned()
    };
    // Under the previous CRD the new field is refused (kubectl's strict field validation)
    // or silently pruned (what the operator's own writes get): either way not stored.
    match write_and_read_budget(&resource, &ns.name, "audit-log", 4_194_304) {
        Ok(None) => println!("previous CRD: status.effective.maxBufferedBytes pruned"),
        Err(refusal) => {
            assert!(
                refusal.contains("maxBufferedBytes"),
                "the status write was refused for another reason:\n{refusal}"
            );
            println!("previous CRD: status.effective.maxBufferedBytes refused");
        }
        Ok(Some(v)) => panic!("the previous CRD stored maxBufferedBytes={v}"),
    }

    // The previous CRD's wide Topics column prints the spec's array as JSON.
    let wide = topics_column(&resource, &ns.name, "audit-log");
    assert!(
        wide.contains(r#"["orders","payments"]"#),
        "previous CRD, kubectl get -o wide:\n{wide}"
    );

    // A plain upgrade stops: the CRD exists outside the release. Nothing changes.
    let plain = helm(&["upgrade", release, current, "--namespace", &ns.name]);
    let plain_text = text(&plain);
    assert!(
        !plain.status.success(),
        "helm upgrade adopted a CRD it does not own without --take-ownership:\n{plain_text}"
    );
    assert!(
        plain_text.contains("invalid ownership metadata") && plain_text.contains(&crd_name),
        "helm upgrade failed for another reason than the README's upgrade note says:\n{plain_text}"
    );
    assert!(!crd_has_budget_field(&crd_json(&crd_name)));

    // The upgrade the README prescribes once, from chart 0.1.0.
    ok(
        helm(&[
            "upgrade",
            release,
            current,
            "--namespace",
            &ns.name,
            "--take-ownership",
        ]),
        "helm upgrade --take-ownership (current chart)",
    );
    let crd = crd_json(&crd_name);
    assert!(
        crd_has_budget_field(&crd),
        "helm upgrade did not update the CRD"
    );
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
        "the upgraded CRD has no keep policy"
    );
    assert_eq!(
        crd["metadata"]["annotations"]["meta.helm.sh/release-name"], release,
        "the release does not own the CRD"
    );
    assert_eq!(
        write_and_read_budget(&resource, &ns.name, "audit-log", 4_194_304),
        Ok(Some(4_194_304)),
        "the upgraded CRD does not keep status.effective.maxBufferedBytes"
    );
    let uid_after = ok(
        kubectl(
            &[
                "get",
                &resource,
                "audit-log",
                "-n",
                &ns.name,
                "-o",
                "jsonpath={.metadata.uid}",
            ],
            None,
        ),
        "kubectl get uid",
    );
    assert_eq!(
        uid_after.trim(),
        uid_before,
        "the EventConsumer was recreated"
    );

    // The current CRD's Topics column shows status.topics, which the operator sets to the
    // comma-separated list (operator/src/status.rs, topics_column).
    ok(
        kubectl(
            &[
                "patch",
                &resource,
                "audit-log",
                "-n",
                &ns.name,
                "--subresource=status",
                "--type=merge",
                "-p",
                r#"{"status":{"topics":"orders,payments"}}"#,
            ],
            None,
        ),
        "setting status.topics",
    );
    let wide = topics_column(&resource, &ns.name, "audit-log");
    assert!(
        wide.contains(" orders,payments ") && !wide.contains('['),
        "current CRD, kubectl get -o wide:\n{wide}"
    );
    println!("kubectl get ec -o wide after the upgrade:\n{wide}");

    // Later upgrades are plain ones.
    ok(
        helm(&[
            "upgrade",
            release,
            current,
            "--namespace",
            &ns.name,
            "--set",
            "operator.logLevel=debug",
        ]),
        "a second, plain helm upgrade",
    );

    // Uninstalling keeps the CRD and every EventConsumer.
    let uninstall = ok(
        helm(&["uninstall", release, "--namespace", &ns.name]),
        "helm uninstall",
    );
    println!("{uninstall}");
    assert!(
        crd_has_budget_field(&crd_json(&crd_name)),
        "helm uninstall removed or changed the CRD"
    );
    let kept = ok(
        kubectl(
            &["get", &resource, "audit-log", "-n", &ns.name, "-o", "json"],
            None,
        ),
        "the EventConsumer after helm uninstall",
    );
    let kept: Value = serde_json::from_str(&kept).expect("EventConsumer JSON");
    assert_eq!(kept["status"]["effective"]["maxBufferedBytes"], 4_194_304);
}

#[tokio::test]
async fn a_fresh_install_owns_and_keeps_the_crd_and_crds_install_false_renders_none() {
    let client = kube_env::client().await;
    let ns = Namespace::create(&client, "chart-crd").await;
    let group = format!("{}.sluice.test", ns.name);
    let crd_name = format!("eventconsumers.{group}");
    let _cleanup = CrdCleanup(crd_name.clone());
    let tmp = TempDir::new(&ns.name);
    let current = chart_copy(
        &repo().join("charts/sluice"),
        &format!("files/{CRD_FILE}"),
        &tmp.0.join("current"),
        &group,
    );
    let current = current.to_str().expect("utf-8 path");

    let rendered = ok(
        helm(&[
            "template",
            "x",
            current,
            "--kube-version",
            "1.34.0",
            "--set",
            "crds.install=false",
        ]),
        "helm template crds.install=false",
    );
    assert!(
        !rendered.contains("kind: CustomResourceDefinition"),
        "crds.install=false still renders the CRD"
    );
    let rendered = ok(
        helm(&[
            "template",
            "x",
            current,
            "--kube-version",
            "1.34.0",
            "--set",
            "crds.keep=false",
            "--show-only",
            "templates/crd.yaml",
        ]),
        "helm template crds.keep=false",
    );
    assert!(
        rendered.contains("kind: CustomResourceDefinition")
            && !rendered.contains("helm.sh/resource-policy"),
        "crds.keep=false:\n{rendered}"
    );

    let fresh = Release::new("fresh", &ns.name);
    let second_release = Release::new("second", &ns.name);
    ok(
        helm(&["install", &fresh.name, current, "--namespace", &ns.name]),
        "helm install (current chart)",
    );
    let crd = crd_json(&crd_name);
    assert!(crd_has_budget_field(&crd));
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    assert_eq!(
        crd["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "Helm"
    );
    // The operator may read the EventConsumer CRD (its start-up version check) and no other.
    let sa = ok(
        kubectl(
            &[
                "get",
                "serviceaccounts",
                "-n",
                &ns.name,
                "-l",
                "app.kubernetes.io/name=sluice",
                "-o",
                "jsonpath={.items[0].metadata.name}",
            ],
            None,
        ),
        "the operator's service account",
    );
    let who = format!("--as=system:serviceaccount:{}:{}", ns.name, sa.trim());
    for (crd, allowed) in [
        ("eventconsumers.sluice.dev", "yes"),
        ("kafkas.kafka.strimzi.io", "no"),
    ] {
        let out = kubectl(
            &[
                "auth",
                "can-i",
                "get",
                &format!("customresourcedefinitions.apiextensions.k8s.io/{crd}"),
                &who,
            ],
            None,
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            allowed,
            "can the operator get the CRD {crd}? {}",
            text(&out)
        );
    }
    // A second release in the same cluster cannot own the CRD too; with crds.install=false
    // it installs beside the first (the README's "several releases" note).
    let second = helm(&[
        "install",
        &second_release.name,
        current,
        "--namespace",
        &ns.name,
    ]);
    assert!(
        !second.status.success() && text(&second).contains("invalid ownership metadata"),
        "a second release took the CRD:\n{}",
        text(&second)
    );
    ok(
        helm(&[
            "install",
            &second_release.name,
            current,
            "--namespace",
            &ns.name,
            "--set",
            "crds.install=false",
        ]),
        "a second release with crds.install=false",
    );
    ok(
        helm(&["uninstall", &fresh.name, "--namespace", &ns.name]),
        "helm uninstall",
    );
    let kept = crd_json(&crd_name);
    assert!(
        crd_has_budget_field(&kept),
        "helm uninstall deleted the CRD despite its keep policy"
    );
}

/// The templated CRD is the generated file, unchanged apart from the chart's labels and
/// the keep annotation (Helm's fromYaml/toYaml round trip re-orders keys and writes 0.0 as
/// 0; neither changes what the API server stores).
#[test]
fn the_templated_crd_is_the_generated_crd() {
    fn numbers_as_f64(v: &mut Value) {
        match v {
            Value::Number(n) => *v = json!(n.as_f64().expect("a number")),
            Value::Array(items) => items.iter_mut().for_each(numbers_as_f64),
            Value::Object(map) => map.values_mut().for_each(numbers_as_f64),
            _ => {}
        }
    }
    let chart = repo().join("charts/sluice");
    let rendered = ok(
        helm(&[
            "template",
            "x",
            chart.to_str().expect("utf-8 path"),
            "--kube-version",
            "1.34.0",
            "--show-only",
            "templates/crd.yaml",
        ]),
        "helm template --show-only templates/crd.yaml",
    );
    let mut rendered: Value = serde_norway::from_str(&rendered).expect("rendered CRD YAML");
    let mut generated: Value = serde_norway::from_str(
        &std::fs::read_to_string(chart.join("files").join(CRD_FILE)).expect("generated CRD"),
    )
    .expect("generated CRD YAML");
    let meta = rendered["metadata"].as_object_mut().expect("metadata");
    let labels = meta.remove("labels").expect("the chart's labels");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm");
    let annotations = meta.remove("annotations").expect("the keep annotation");
    assert_eq!(annotations, json!({"helm.sh/resource-policy": "keep"}));
    numbers_as_f64(&mut rendered);
    numbers_as_f64(&mut generated);
    assert!(
        rendered == generated,
        "the templated CRD differs from charts/sluice/files/{CRD_FILE}"
    );
}
