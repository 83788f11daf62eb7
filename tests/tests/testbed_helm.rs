//! Smoke tests of the test bed's helm (built from its Go module).

use std::process::Command;

fn helm(args: &[&str]) -> String {
    let out = Command::new(sluice_tests::tool("SLUICE_HELM"))
        .args(args)
        .output()
        .expect("running helm");
    assert!(
        out.status.success(),
        "helm {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn helm_is_version_3() {
    let version = helm(&["version", "--short"]);
    assert!(
        version.starts_with("v3."),
        "unexpected helm version {version:?}"
    );
}

#[test]
fn helm_template_renders_a_chart_with_values() {
    let chart = sluice_tests::package_dir().join("fixtures/tiny-chart");
    let out = helm(&[
        "template",
        "smoke",
        chart.to_str().expect("utf8 path"),
        "--set",
        "greeting=from-the-test",
    ]);
    assert!(
        out.contains("name: smoke-tiny"),
        "release name not rendered:\n{out}"
    );
    assert!(
        out.contains("greeting: \"FROM-THE-TEST\""),
        "value not rendered:\n{out}"
    );
}
