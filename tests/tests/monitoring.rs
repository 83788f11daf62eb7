//! The chart's monitoring pieces, checked with the real promtool (built from Prometheus' Go
//! module by tests/env/build-promtool.sh):
//!
//! * the alert rules pass `promtool check rules`, and `promtool test rules` proves each alert
//!   fires in its situation and stays silent nearby (tests/fixtures/prometheus/);
//! * the PrometheusRule the chart renders carries exactly those rules;
//! * every alert has a runbook section in docs/alerts.md and a unit test;
//! * the Grafana dashboard is well-formed (variables, panels, grid, targets) and every query
//!   in it parses as PromQL (promtool checks each as a recording rule);
//! * every metric the sidecar and the operator register is documented in docs/metrics.md, and
//!   the alerts and the dashboard use documented metrics only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

fn repo() -> PathBuf {
    sluice_tests::repo_root()
}

fn rules_file() -> PathBuf {
    repo().join("charts/sluice/files/prometheus/sluice-rules.yaml")
}

fn dashboard_file() -> PathBuf {
    repo().join("charts/sluice/files/grafana/sluice.json")
}

fn read(path: &PathBuf) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

use sluice_tests::output_text as text;

/// The test bed's promtool (`SLUICE_PROMTOOL`), else built (once; cached under
/// ~/.cache/sluice) by tests/env/build-promtool.sh.
fn promtool() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(path) = sluice_tests::env_value("SLUICE_PROMTOOL")
            && std::path::Path::new(&path).is_file()
        {
            return PathBuf::from(path);
        }
        let out = Command::new("bash")
            .arg(sluice_tests::env_scripts().join("build-promtool.sh"))
            .output()
            .expect("running tests/env/build-promtool.sh");
        assert!(
            out.status.success(),
            "building promtool failed:\n{}",
            text(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(stdout.lines().last().expect("the promtool path").trim())
    })
    .clone()
}

fn promtool_run(args: &[&str]) -> Output {
    Command::new(promtool())
        .args(args)
        .output()
        .expect("running promtool")
}

/// A temporary file, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("{}-{name}", std::process::id()));
        std::fs::write(&path, contents).expect("writing a temporary file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn alerts() -> Vec<Value> {
    let rules: Value = serde_norway::from_str(&read(&rules_file())).expect("rules YAML");
    rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").clone())
        .collect()
}

#[test]
fn the_alert_rules_pass_promtool_check_rules() {
    let rules = rules_file();
    let out = promtool_run(&["check", "rules", rules.to_str().expect("utf-8 path")]);
    let all = text(&out);
    assert!(out.status.success(), "promtool check rules:\n{all}");
    let expected = alerts().len();
    assert!(
        all.contains(&format!("SUCCESS: {expected} rules found")),
        "promtool found another number of rules than the file's {expected}:\n{all}"
    );
}

#[test]
fn every_alert_fires_in_its_promtool_unit_test() {
    let tests = repo().join("tests/fixtures/prometheus/sluice-rules.test.yaml");
    let out = promtool_run(&["test", "rules", tests.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "promtool test rules:\n{}", text(&out));
    // Each alert is expected to fire at least once in the tests (an alert only ever
    // expected silent would pass whatever its expression).
    let suite: Value = serde_norway::from_str(&read(&tests)).expect("test YAML");
    let mut fired = BTreeSet::new();
    for case in suite["tests"].as_array().expect("tests") {
        for check in case["alert_rule_test"].as_array().expect("alert_rule_test") {
            if check["exp_alerts"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
            {
                fired.insert(check["alertname"].as_str().expect("alertname").to_owned());
            }
        }
    }
    for alert in alerts() {
        let name = alert["alert"].as_str().expect("an alert name");
        assert!(
            fired.contains(name),
            "{name} has no promtool unit test in which it fires"
        );
    }
}

#[test]
fn every_alert_has_a_runbook_section() {
    let runbooks = read(&repo().join("docs/alerts.md"));
    let headings: BTreeSet<String> = runbooks
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| h.trim().to_lowercase())
        .collect();
    for alert in alerts() {
        let name = alert["alert"].as_str().expect("an alert name");
        let url = alert["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has no runbook_url"));
        let anchor = url
            .strip_prefix("https://github.com/sluice-dev/sluice/blob/main/docs/alerts.md#")
            .unwrap_or_else(|| panic!("{name}: runbook_url {url} is not in docs/alerts.md"));
        assert_eq!(anchor, name.to_lowercase(), "{name}: runbook anchor");
        assert!(
            headings.contains(anchor),
            "docs/alerts.md has no section ## {name}"
        );
        for key in ["summary", "description"] {
            assert!(
                alert["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name} has no {key}"
            );
        }
        assert!(
            alert["labels"]["severity"].as_str().is_some(),
            "{name} has no severity"
        );
    }
}

fn helm_template(args: &[&str]) -> String {
    let chart = repo().join("charts/sluice");
    let mut all = vec![
        "template",
        "sluice",
        chart.to_str().expect("utf-8 path"),
        "--kube-version",
        "1.34.0",
    ];
    all.extend_from_slice(args);
    let out = Command::new(sluice_tests::tool("SLUICE_HELM"))
        .args(&all)
        .output()
        .expect("running helm");
    assert!(out.status.success(), "helm {all:?}:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_chart_renders_the_rules_the_pod_monitor_and_the_dashboard() {
    let rendered = helm_template(&[
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "metrics.prometheusRule.labels.release=kube-prometheus-stack",
        "--show-only",
        "templates/prometheusrule.yaml",
    ]);
    let rule: Value = serde_norway::from_str(&rendered).expect("PrometheusRule YAML");
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(
        rule["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    let file: Value = serde_norway::from_str(&read(&rules_file())).expect("rules YAML");
    assert_eq!(
        rule["spec"], file,
        "the PrometheusRule differs from files/prometheus/sluice-rules.yaml"
    );
    // The rendered spec is itself a rule file promtool accepts.
    let spec = TempFile::new(
        "rendered-rules.yaml",
        &serde_norway::to_string(&rule["spec"]).expect("YAML"),
    );
    let out = promtool_run(&["check", "rules", spec.0.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "rendered rules:\n{}", text(&out));

    for (watch, expect) in [("", "any: true"), ("shop", "matchNames: [\"shop\"]")] {
        let rendered = helm_template(&[
            "--set",
            "metrics.podMonitor.enabled=true",
            "--set",
            &format!("operator.watchNamespace={watch}"),
            "--show-only",
            "templates/podmonitor.yaml",
        ]);
        assert!(rendered.contains(expect), "{watch:?}: {rendered}");
        let monitor: Value = serde_norway::from_str(&rendered).expect("PodMonitor YAML");
        let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
        // The sidecar's admin port as the operator names it (operator/src/build/deployment.rs).
        assert_eq!(endpoint["port"], "sluice-admin");
        assert_eq!(endpoint["path"], "/metrics");
        assert_eq!(endpoint["relabelings"][0]["targetLabel"], "eventconsumer");
    }

    let rendered = helm_template(&[
        "--set",
        "metrics.dashboard.enabled=true",
        "--show-only",
        "templates/dashboard.yaml",
    ]);
    let config_map: Value = serde_norway::from_str(&rendered).expect("ConfigMap YAML");
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value = serde_json::from_str(
        config_map["data"]["sluice.json"]
            .as_str()
            .expect("sluice.json"),
    )
    .expect("the ConfigMap's dashboard is JSON");
    let file: Value = serde_json::from_str(&read(&dashboard_file())).expect("dashboard JSON");
    assert_eq!(
        shipped, file,
        "the ConfigMap's dashboard differs from the file"
    );

    // All off by default.
    let defaults = helm_template(&[]);
    for kind in ["PodMonitor", "PrometheusRule", "ServiceMonitor"] {
        assert!(
            !defaults.contains(&format!("kind: {kind}\n")),
            "{kind} rendered by default"
        );
    }
    assert!(!defaults.contains("grafana_dashboard"));
}

fn dashboard() -> Value {
    serde_json::from_str(&read(&dashboard_file())).expect("the dashboard is JSON")
}

/// Every PromQL query of the dashboard: panel targets and the variables' `label_values`
/// selectors, with Grafana's variables replaced by values a query would get.
fn dashboard_queries(d: &Value) -> Vec<(String, String)> {
    let substitute = |q: &str| {
        q.replace("$__rate_interval", "2m")
            .replace("$namespace", ".*")
            .replace("$eventconsumer", ".*")
    };
    let mut queries = Vec::new();
    for panel in d["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("a target's expr");
            queries.push((
                format!("{} / {}", panel["title"], target["refId"]),
                substitute(expr),
            ));
        }
    }
    for var in d["templating"]["list"].as_array().expect("templating") {
        if var["type"] == "query" {
            let q = var["query"]["query"].as_str().expect("a variable's query");
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(selector, _)| selector)
                .unwrap_or_else(|| {
                    panic!("variable query {q} is not label_values(selector, label)")
                });
            queries.push((format!("variable {}", var["name"]), substitute(inner)));
        }
    }
    queries
}

#[test]
fn every_dashboard_query_parses_as_promql() {
    let d = dashboard();
    let queries = dashboard_queries(&d);
    assert!(queries.len() >= 12, "only {} queries", queries.len());
    // Each query as a recording rule: `promtool check rules` parses every expression with
    // Prometheus' own PromQL parser and names the one that fails.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, q)) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(q).expect("a JSON string is a YAML string")
        ));
    }
    let file = TempFile::new("dashboard-queries.yaml", &rules);
    let out = promtool_run(&["check", "rules", file.0.to_str().expect("utf-8 path")]);
    let all = text(&out);
    assert!(
        out.status.success(),
        "a dashboard query does not parse:\n{all}\nqueries:\n{queries:#?}"
    );
    assert!(
        all.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{all}"
    );
    // The check can fail: a broken query is refused.
    let broken = TempFile::new(
        "dashboard-broken.yaml",
        "groups:\n  - name: x\n    rules:\n      - record: x:y\n        expr: 'sum by (a) (rate(sluice_in_flight[2m])'\n",
    );
    let out = promtool_run(&["check", "rules", broken.0.to_str().expect("utf-8 path")]);
    assert!(!out.status.success(), "promtool accepted a broken query");
}

#[test]
fn the_dashboard_is_well_formed_and_covers_what_an_operator_watches() {
    let d = dashboard();
    for key in [
        "title",
        "uid",
        "schemaVersion",
        "panels",
        "templating",
        "time",
    ] {
        assert!(d.get(key).is_some(), "the dashboard has no {key}");
    }
    let vars: BTreeMap<&str, &Value> = d["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| (v["name"].as_str().expect("variable name"), v))
        .collect();
    assert_eq!(vars["datasource"]["type"], "datasource");
    assert_eq!(vars["datasource"]["query"], "prometheus");
    for name in ["namespace", "eventconsumer"] {
        assert_eq!(vars[name]["type"], "query", "variable {name}");
        assert_eq!(vars[name]["datasource"]["uid"], "${datasource}");
    }
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    let mut all_exprs = String::new();
    for panel in d["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("panel title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate id: {title}"
        );
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let g = &panel["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().expect("x"),
            g["y"].as_u64().expect("y"),
            g["w"].as_u64().expect("w"),
            g["h"].as_u64().expect("h"),
        );
        assert!(w > 0 && h > 0 && x + w <= 24, "{title}: gridPos {g}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "{title} overlaps another panel");
            }
        }
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(
                refs.insert(t["refId"].as_str().expect("refId")),
                "{title}: refId"
            );
            let expr = t["expr"].as_str().expect("expr");
            assert!(
                expr.contains("namespace=~\"$namespace\"")
                    && expr.contains("eventconsumer=~\"$eventconsumer\""),
                "{title}: {expr} ignores the dashboard's variables"
            );
            all_exprs.push_str(expr);
            all_exprs.push('\n');
        }
    }
    // What issue 11 asks the dashboard to show.
    for (what, needle) in [
        (
            "lag per EventConsumer",
            "sum by (namespace, eventconsumer) (sluice_partition_lag",
        ),
        (
            "lag per partition",
            "sum by (eventconsumer, topic, partition) (sluice_partition_lag",
        ),
        ("throughput", "rate(sluice_records_finished_total"),
        (
            "delivery latency",
            "sluice_delivery_duration_seconds_bucket",
        ),
        ("in flight", "sluice_in_flight"),
        (
            "oldest in-flight age",
            "sluice_oldest_in_flight_age_seconds",
        ),
        ("dead letters", "sluice_records_dead_lettered_total"),
        ("rebalances", "sluice_rebalances_total"),
    ] {
        assert!(
            all_exprs.contains(needle),
            "the dashboard does not show {what}"
        );
    }
}

/// `name -> type` of every metric registered in a metrics source file
/// (`registry.register("name", "help", field.clone())` under `Registry::with_prefix`).
fn registered(path: &str) -> BTreeMap<String, String> {
    let src = read(&repo().join(path));
    let prefix = src
        .split("Registry::with_prefix(\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("{path}: no Registry::with_prefix"));
    let mut out = BTreeMap::new();
    for chunk in src.split("registry.register(").skip(1) {
        let name = chunk
            .split('"')
            .nth(1)
            .unwrap_or_else(|| panic!("{path}: a register call without a name"));
        // The registered value: `m.field.clone()` or `field.clone()`; its type is the field's.
        let call = &chunk[..chunk.find(");").expect("end of register call")];
        let value = call
            .trim_end()
            .trim_end_matches(',')
            .rsplit(',')
            .next()
            .expect("the value")
            .trim();
        let field = value
            .trim_end_matches(".clone()")
            .trim_start_matches("m.")
            .trim();
        let decl = src
            .split(&format!("pub {field}: "))
            .nth(1)
            .or_else(|| src.split(&format!("let {field} = ")).nth(1))
            .unwrap_or_else(|| panic!("{path}: cannot find the type of {field}"));
        let kind = if decl.starts_with("Histogram") {
            "histogram"
        } else if decl.contains("Counter") && decl.find("Counter") < decl.find('\n') {
            "counter"
        } else if decl.contains("Gauge") && decl.find("Gauge") < decl.find('\n') {
            "gauge"
        } else {
            panic!(
                "{path}: unknown metric type of {field}: {}",
                &decl[..decl.find('\n').unwrap_or(decl.len())]
            );
        };
        out.insert(format!("{prefix}_{name}"), kind.to_owned());
    }
    assert!(out.len() >= 5, "{path}: only {} metrics found", out.len());
    out
}

/// `exposed name -> type` of the metrics documented in docs/metrics.md.
fn documented() -> BTreeMap<String, String> {
    read(&repo().join("docs/metrics.md"))
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            name.starts_with("sluice_").then(|| {
                (
                    name.to_owned(),
                    cells.get(2).copied().unwrap_or("").to_owned(),
                )
            })
        })
        .collect()
}

#[test]
fn every_metric_is_documented_and_alerts_and_dashboard_use_real_metrics() {
    let docs = documented();
    let mut code = registered("consumer/src/metrics.rs");
    code.extend(registered("operator/src/metrics.rs"));
    let mut exposed = BTreeSet::new();
    for (name, kind) in &code {
        let shown = if kind == "counter" {
            format!("{name}_total")
        } else {
            name.clone()
        };
        assert_eq!(
            docs.get(&shown).map(String::as_str),
            Some(kind.as_str()),
            "docs/metrics.md does not document {shown} as a {kind}"
        );
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                exposed.insert(format!("{name}{suffix}"));
            }
        }
        exposed.insert(shown);
    }
    for name in docs.keys() {
        assert!(
            exposed.contains(name),
            "docs/metrics.md documents {name}, which no code registers"
        );
    }
    let mut used = read(&rules_file());
    for (_, q) in dashboard_queries(&dashboard()) {
        used.push_str(&q);
        used.push('\n');
    }
    let mut seen = 0;
    for word in used.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("sluice_") {
            seen += 1;
            assert!(
                exposed.contains(word),
                "the alerts or the dashboard use {word}, which Sluice does not export"
            );
        }
    }
    assert!(seen >= 15, "only {seen} metric references found");
}
