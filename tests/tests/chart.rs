//! The Helm chart against the test bed's tools and API server: `helm lint`, `helm template`
//! accepted by the real API server (`kubectl apply --dry-run=server`) in a namespace that
//! enforces Pod Security `restricted` without a warning, the values schema refusing bad
//! values, a comment on every RBAC rule, and the plain manifests in `deploy/manifests` up to
//! date with the chart.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use sluice_tests::kube_env::{self, Namespace};

fn repo() -> PathBuf {
    sluice_tests::repo_root()
}

fn chart() -> String {
    repo().join("charts/sluice").to_string_lossy().into_owned()
}

fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Output {
    sluice_tests::run_tool(tool, args, stdin)
}

use sluice_tests::output_text as text;

#[test]
fn helm_lint_passes_strictly() {
    let out = run("SLUICE_HELM", &["lint", "--strict", &chart()], None);
    assert!(out.status.success(), "helm lint failed:\n{}", text(&out));
    let out = run(
        "SLUICE_HELM",
        &[
            "lint",
            "--strict",
            &chart(),
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "operator.watchNamespace=shop",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "helm lint (ServiceMonitor, one namespace) failed:\n{}",
        text(&out)
    );
}

#[tokio::test]
async fn rendered_chart_is_accepted_by_the_api_server_under_restricted_pod_security() {
    let client = kube_env::client().await;
    let labels: BTreeMap<String, String> = [
        ("pod-security.kubernetes.io/enforce", "restricted"),
        ("pod-security.kubernetes.io/warn", "restricted"),
        ("pod-security.kubernetes.io/audit", "restricted"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let ns = Namespace::create_with_labels(&client, "chart", labels).await;
    // Watching one namespace (here the test's own, so the server dry run finds it) turns the
    // operator's ClusterRole into a Role there.
    let watch = format!("operator.watchNamespace={}", ns.name);
    for extra in [
        &[][..],
        &[
            "--set",
            watch.as_str(),
            "--set",
            "networkPolicy.enabled=false",
        ][..],
    ] {
        let one_namespace = !extra.is_empty();
        let chart_path = chart();
        let mut args = vec![
            "template",
            "sluice-chart-test",
            chart_path.as_str(),
            "--namespace",
            ns.name.as_str(),
            "--kube-version",
            "1.34.0",
        ];
        args.extend_from_slice(extra);
        let rendered = run("SLUICE_HELM", &args, None);
        assert!(
            rendered.status.success(),
            "helm template {extra:?} failed:\n{}",
            text(&rendered)
        );
        let manifests = String::from_utf8_lossy(&rendered.stdout).into_owned();
        let count = |kind: &str| manifests.matches(&format!("\nkind: {kind}\n")).count();
        for kind in [
            "ServiceAccount",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
        ] {
            assert_eq!(count(kind), 1, "the chart renders no {kind}");
        }
        // The leader-election Role and the CRD reader are always there; the operator's own
        // rules are a Role (one namespace) or a ClusterRole; the two aggregated
        // ClusterRoles always.
        let (roles, cluster_roles, cluster_bindings) =
            if one_namespace { (2, 3, 1) } else { (1, 4, 2) };
        assert_eq!(count("Role"), roles, "Roles {extra:?}");
        assert_eq!(count("RoleBinding"), roles, "RoleBindings {extra:?}");
        assert_eq!(
            count("ClusterRole"),
            cluster_roles,
            "ClusterRoles {extra:?}"
        );
        assert_eq!(
            count("ClusterRoleBinding"),
            cluster_bindings,
            "ClusterRoleBindings {extra:?}"
        );
        if one_namespace {
            // The only cluster-wide grant left: reading the one CRD.
            let cluster_wide: Vec<&str> = manifests
                .split("\n---")
                .filter(|doc| {
                    doc.contains("\nkind: ClusterRole\n") && !doc.contains("aggregate-to-")
                })
                .collect();
            assert_eq!(cluster_wide.len(), 1, "{cluster_wide:?}");
            assert!(
                cluster_wide[0].contains("resourceNames: [eventconsumers.sluice.dev]")
                    && !cluster_wide[0].contains("secrets"),
                "watching one namespace must grant nothing cluster-wide but reading the CRD:\n{}",
                cluster_wide[0]
            );
        }
        // Server-side apply: create-or-update is one request, so another test creating the
        // shared CRD between a client-side apply's GET and its create cannot fail this one.
        let applied = run(
            "SLUICE_KUBECTL",
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=sluice-chart-test",
                "--dry-run=server",
                "-n",
                &ns.name,
                "-f",
                "-",
            ],
            Some(&manifests),
        );
        let out = text(&applied);
        assert!(
            applied.status.success(),
            "the API server refused the rendered chart {extra:?}:\n{out}"
        );
        assert!(
            !out.contains("would violate PodSecurity"),
            "the operator's pods are not Pod Security restricted:\n{out}"
        );
        assert!(
            out.contains("deployment.apps/sluice-chart-test serverside-applied (server dry run)"),
            "{out}"
        );
    }
}

#[test]
fn values_schema_refuses_bad_values() {
    for (set, why) in [
        ("operator.replicas=0", "replicas"),
        ("operator.image.pullPolicy=Sometimes", "pullPolicy"),
        ("metrics.port=70000", "port"),
        ("operator.watchNamespace=Not_A_Namespace", "watchNamespace"),
        ("unknownKey=1", "unknownKey"),
        ("sidecar.mode=sidecar", "mode"),
    ] {
        let out = run(
            "SLUICE_HELM",
            &["template", "x", &chart(), "--set", set],
            None,
        );
        let all = text(&out);
        assert!(!out.status.success(), "helm template accepted --set {set}");
        assert!(
            all.contains("schema") && all.contains(why),
            "--set {set}: unexpected error:\n{all}"
        );
    }
}

#[test]
fn sidecar_mode_reaches_the_operator() {
    let env_of = |extra: &[&str]| {
        let mut args = vec![
            "template",
            "x",
            "--kube-version",
            "1.34.0",
            "--show-only",
            "templates/deployment.yaml",
        ];
        let chart = chart();
        args.insert(2, &chart);
        args.extend_from_slice(extra);
        let out = run("SLUICE_HELM", &args, None);
        assert!(out.status.success(), "helm template: {}", text(&out));
        let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
        let at = yaml
            .find("- name: SLUICE_SIDECAR_MODE")
            .expect("SLUICE_SIDECAR_MODE in the operator's env");
        yaml[at..]
            .lines()
            .nth(1)
            .expect("its value line")
            .trim()
            .to_owned()
    };
    assert_eq!(env_of(&[]), "value: \"native\"");
    assert_eq!(
        env_of(&["--set", "sidecar.mode=container"]),
        "value: \"container\""
    );
}

#[test]
fn every_rbac_rule_says_why() {
    let rbac = std::fs::read_to_string(repo().join("charts/sluice/templates/rbac.yaml"))
        .expect("rbac.yaml");
    let lines: Vec<&str> = rbac.lines().collect();
    let mut rules = 0;
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("- apiGroups:") {
            rules += 1;
            let previous = lines[..i]
                .iter()
                .rev()
                .find(|l| !l.trim().is_empty())
                .copied()
                .unwrap_or("");
            assert!(
                previous.trim_start().starts_with('#'),
                "RBAC rule at line {} has no comment saying why: {line}",
                i + 1
            );
        }
        if line.contains("verbs:") {
            assert!(
                !line.contains('*'),
                "wildcard verbs at line {}: {line}",
                i + 1
            );
        }
        if line.contains("resources:") || line.contains("apiGroups:") {
            assert!(
                !line.contains("\"*\"") && !line.contains("[*]"),
                "wildcard at line {}: {line}",
                i + 1
            );
        }
    }
    assert!(rules >= 8, "expected the operator's rules, found {rules}");
    // Pods: watched (for status reasons), never read one by one or changed.
    let pods: Vec<&str> = rbac
        .split("- apiGroups:")
        .filter(|rule| rule.contains("resources: [pods]"))
        .collect();
    assert_eq!(pods.len(), 1, "one rule for pods: {pods:?}");
    assert!(
        pods[0].contains("verbs: [list, watch]\n"),
        "pods: list and watch only: {}",
        pods[0]
    );
}

#[test]
fn plain_manifests_are_rendered_from_the_current_chart() {
    let out = Command::new("bash")
        .arg(repo().join("deploy/manifests/render.sh"))
        .env("SLUICE_HELM", sluice_tests::tool("SLUICE_HELM"))
        .output()
        .expect("running deploy/manifests/render.sh");
    assert!(
        out.status.success(),
        "render.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed = std::fs::read_to_string(repo().join("deploy/manifests/sluice.yaml"))
        .expect("deploy/manifests/sluice.yaml (run `make manifests`)");
    assert!(
        committed == String::from_utf8_lossy(&out.stdout),
        "deploy/manifests/sluice.yaml is stale: run `make manifests` and commit it"
    );
    assert!(
        committed.contains("kind: CustomResourceDefinition"),
        "the manifests include the CRD"
    );
}

/// The aggregated ClusterRoles reach users through the built-in roles, as the API server's
/// own authorizer answers (`kubectl auth can-i --as`): a user bound to `view` in a namespace
/// may read EventConsumers there but not change them; one bound to `edit` may create and
/// delete them but not write their status (the operator's).
#[tokio::test]
async fn view_and_edit_users_get_eventconsumers_through_aggregated_roles() {
    let client = kube_env::client().await;
    // `kubectl auth can-i` answers "no" for a resource type the API server does not know:
    // the CRD must exist (as it does wherever Sluice is installed).
    let crd = repo().join("charts/sluice/files/eventconsumers.sluice.dev.yaml");
    let crd = crd.to_string_lossy();
    let applied = run(
        "SLUICE_KUBECTL",
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=sluice-tests",
            "-f",
            &crd,
        ],
        None,
    );
    assert!(applied.status.success(), "{}", text(&applied));
    kube_env::wait_crd_established(&client, "eventconsumers.sluice.dev").await;
    let ns = Namespace::create(&client, "chart-rbac").await;
    let release = format!("agg-{}", &ns.name[ns.name.len().saturating_sub(4)..]);
    let rendered = run(
        "SLUICE_HELM",
        &[
            "template",
            &release,
            &chart(),
            "--kube-version",
            "1.34.0",
            "--show-only",
            "templates/rbac.yaml",
        ],
        None,
    );
    assert!(rendered.status.success(), "{}", text(&rendered));
    let all = String::from_utf8_lossy(&rendered.stdout).into_owned();
    let aggregated: String = all
        .split("\n---")
        .filter(|doc| doc.contains("aggregate-to-"))
        .map(|doc| format!("---{doc}\n"))
        .collect();
    assert_eq!(aggregated.matches("kind: ClusterRole\n").count(), 2);
    let applied = run("SLUICE_KUBECTL", &["apply", "-f", "-"], Some(&aggregated));
    assert!(applied.status.success(), "{}", text(&applied));
    let names = [
        format!("{release}-sluice-eventconsumers-view"),
        format!("{release}-sluice-eventconsumers-edit"),
    ];
    // The ClusterRoles outlive the namespace: removed when the test ends, pass or fail.
    struct Cleanup([String; 2]);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = run(
                "SLUICE_KUBECTL",
                &[
                    "delete",
                    "clusterrole",
                    &self.0[0],
                    &self.0[1],
                    "--ignore-not-found",
                ],
                None,
            );
        }
    }
    let _cleanup = Cleanup(names.clone());
    for (user, role) in [("sluice-viewer", "view"), ("sluice-editor", "edit")] {
        let out = run(
            "SLUICE_KUBECTL",
            &[
                "create",
                "rolebinding",
                user,
                "-n",
                &ns.name,
                &format!("--clusterrole={role}"),
                &format!("--user={user}"),
            ],
            None,
        );
        assert!(out.status.success(), "{}", text(&out));
    }
    let can = |user: &str, verb: &str, resource: &str| -> bool {
        let mut args = vec!["auth", "can-i", verb, "-n", &ns.name, "--as", user];
        match resource.split_once('/') {
            Some((resource, sub)) => args.extend([resource, "--subresource", sub]),
            None => args.push(resource),
        }
        let out = run("SLUICE_KUBECTL", &args, None);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    // The aggregation controller folds the new rules into view/edit asynchronously.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !(can("sluice-viewer", "list", "eventconsumers.sluice.dev")
        && can("sluice-editor", "create", "eventconsumers.sluice.dev"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the aggregated rules never reached view/edit"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let expected = [
        ("sluice-viewer", "get", "eventconsumers.sluice.dev", true),
        ("sluice-viewer", "watch", "eventconsumers.sluice.dev", true),
        (
            "sluice-viewer",
            "create",
            "eventconsumers.sluice.dev",
            false,
        ),
        (
            "sluice-viewer",
            "delete",
            "eventconsumers.sluice.dev",
            false,
        ),
        ("sluice-editor", "patch", "eventconsumers.sluice.dev", true),
        ("sluice-editor", "delete", "eventconsumers.sluice.dev", true),
        (
            "sluice-editor",
            "patch",
            "eventconsumers.sluice.dev/status",
            false,
        ),
    ];
    for (user, verb, resource, allowed) in expected {
        assert_eq!(
            can(user, verb, resource),
            allowed,
            "{user} {verb} {resource}"
        );
    }
}
