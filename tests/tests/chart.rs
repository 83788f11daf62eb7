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
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> String {
    repo().join("charts/sluice").to_string_lossy().into_owned()
}

fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Output {
    sluice_tests::run_tool(tool, args, stdin)
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

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
    for extra in [
        &[][..],
        &[
            "--set",
            "operator.watchNamespace=shop",
            "--set",
            "networkPolicy.enabled=false",
        ][..],
    ] {
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
        for kind in [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Deployment",
            "Service",
        ] {
            assert!(
                manifests.contains(&format!("kind: {kind}\n")),
                "the chart renders no {kind}"
            );
        }
        let applied = run(
            "SLUICE_KUBECTL",
            &["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"],
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
            out.contains("deployment.apps/sluice-chart-test created (server dry run)"),
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
