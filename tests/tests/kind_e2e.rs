//! `deploy/kind-e2e.sh` as far as it can be exercised without a container engine (these
//! machines have none; see README "The end-to-end tests on kind"): shellcheck passes on it;
//! kind itself (built from its Go module, tests/env/build-kind.sh) loads and validates the
//! script's cluster config `deploy/kind/cluster.yaml` — `kind create cluster` against a stub
//! engine that answers kind's `docker info`/`docker ps` and refuses everything else, so kind
//! decodes the config strictly, defaults and validates it, pulls its node image and gets as
//! far as creating its network, while configs that are wrong stop before; and
//! the script's dry run (`KIND_E2E_DRY_RUN=1`) prints a plan whose registry, cluster,
//! Kafka and test environment agree with each other and with what the e2e tests read.
//! Cheap: no cluster, no Kafka; seconds once kind is built (cached under ~/.cache/sluice).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    sluice_tests::repo_root()
        .canonicalize()
        .expect("the repository")
}

use sluice_tests::output_text as text;

fn kind() -> PathBuf {
    let out = Command::new("bash")
        .arg(sluice_tests::env_scripts().join("build-kind.sh"))
        .output()
        .expect("running tests/env/build-kind.sh");
    assert!(
        out.status.success(),
        "build-kind.sh failed:\n{}",
        text(&out)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A folder with a `docker` that answers what kind asks before it creates anything (`info`
/// as a rootful cgroup-v2 engine, `ps`: no clusters, `pull`: the node image pulled) and
/// refuses every other command.
fn stub_engine(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("stub folder");
    let docker = bin.join("docker");
    std::fs::write(
        &docker,
        r#"#!/bin/sh
case "$1" in
  info) echo '{"CgroupDriver":"systemd","CgroupVersion":"2","MemoryLimit":true,"PidsLimit":true,"CPUShares":true,"SecurityOptions":[]}' ;;
  ps) exit 0 ;;
  pull) exit 0 ;;
  *) echo "stub engine refuses: docker $*" >&2; exit 3 ;;
esac
"#,
    )
    .expect("writing the stub engine");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&docker, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

/// `kind create cluster --config CONFIG` against the stub engine.
fn kind_create(kind: &Path, dir: &Path, config: &Path) -> String {
    let path = format!(
        "{}:{}",
        stub_engine(dir).display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(kind)
        .args([
            "create",
            "cluster",
            "--name",
            "sluice-config-check",
            "--config",
        ])
        .arg(config)
        // Never the user's ~/.kube/config: kind removes its entry after a failed create.
        .arg("--kubeconfig")
        .arg(dir.join("kubeconfig"))
        .env("PATH", path)
        .env("KIND_EXPERIMENTAL_PROVIDER", "docker")
        .output()
        .expect("running kind");
    // The stub refuses to create anything, so the create always fails.
    assert!(
        !out.status.success(),
        "kind create succeeded?\n{}",
        text(&out)
    );
    text(&out)
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(sluice_tests::unique_name(name));
    std::fs::create_dir_all(&dir).expect("temp folder");
    dir
}

#[test]
fn the_script_passes_shellcheck() {
    let out = Command::new("shellcheck")
        .arg("--external-sources")
        .arg(repo().join("deploy/kind-e2e.sh"))
        .output()
        .unwrap_or_else(|e| {
            panic!("running shellcheck: {e} (installed by tests/env/install-deps.sh: `make deps`)")
        });
    assert!(
        out.status.success(),
        "shellcheck deploy/kind-e2e.sh:\n{}",
        text(&out)
    );
}

#[test]
fn kind_loads_and_validates_the_cluster_config() {
    let kind = kind();
    let dir = temp_dir("kind-config");

    let out = kind_create(&kind, &dir, &repo().join("deploy/kind/cluster.yaml"));
    // kind logs "Creating cluster" after the config was decoded and validated, pulls the
    // node image it names, and then looks for its network: the first thing it would create.
    assert!(
        out.contains("Creating cluster \"sluice-config-check\""),
        "kind did not accept deploy/kind/cluster.yaml:\n{out}"
    );
    assert!(
        out.contains("Ensuring node image (kindest/node:v1.34.0)")
            && out.contains("stub engine refuses: docker network ls"),
        "kind did not reach its first engine action:\n{out}"
    );

    // The same check refuses what is wrong: an unknown field (strict decoding) and a
    // cluster without a control-plane node (kind's validation).
    let original = std::fs::read_to_string(repo().join("deploy/kind/cluster.yaml")).unwrap();
    for (broken, expected) in [
        (
            original.replace("containerdConfigPatches:", "containerdConfigPatchez:"),
            "field containerdConfigPatchez not found",
        ),
        (
            original.replace("role: control-plane", "role: worker"),
            "must have at least one control-plane node",
        ),
    ] {
        assert_ne!(
            broken, original,
            "the cluster config changed; update this test"
        );
        let config = dir.join("broken.yaml");
        std::fs::write(&config, broken).unwrap();
        let out = kind_create(&kind, &dir, &config);
        assert!(
            out.contains(expected),
            "expected {expected:?} from kind:\n{out}"
        );
        assert!(
            !out.contains("Creating cluster"),
            "kind went on with a broken config:\n{out}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The dry run's plan with `envs` set: the printed commands (lines starting `+ `).
fn dry_run(state: &Path, envs: &[(&str, &str)]) -> Vec<String> {
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("deploy/kind-e2e.sh"))
        .arg("rolling_update")
        .env("KIND_E2E_DRY_RUN", "1")
        .env("KIND_CLUSTER", "plan-check")
        .env("KIND_REGISTRY_PORT", "5999")
        .env("SLUICE_KIND_STATE", state)
        .env_remove("SLUICE_KAFKA_BOOTSTRAP")
        .env_remove("SLUICE_KAFKA_POD_BOOTSTRAP");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running deploy/kind-e2e.sh");
    assert!(out.status.success(), "the dry run failed:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The index of the first plan line containing every one of `parts`.
fn step(plan: &[String], parts: &[&str]) -> usize {
    plan.iter()
        .position(|l| parts.iter().all(|p| l.contains(p)))
        .unwrap_or_else(|| panic!("no step with {parts:?} in the plan:\n{}", plan.join("\n")))
}

#[test]
fn the_dry_run_plans_registry_cluster_kafka_and_the_e2e_tests_consistently() {
    let state = temp_dir("kind-plan");
    let plan = dry_run(&state, &[]);
    // Nothing was done: the state folder the plan names stays empty.
    assert_eq!(
        std::fs::read_dir(&state).unwrap().count(),
        0,
        "the dry run wrote state"
    );
    let config = repo().join("deploy/kind/cluster.yaml");
    let config = config.to_str().unwrap();

    let images = step(&plan, &["image.sh sluice.dev/testapp:dev"]);
    let registry = step(
        &plan,
        &[
            "+ docker run -d",
            "-p 127.0.0.1:5999:5000",
            "--name kind-registry",
        ],
    );
    let create = step(
        &plan,
        &[
            "create cluster --name plan-check --config",
            config,
            "--kubeconfig",
        ],
    );
    // Each node's containerd maps the name the host pushes to onto the registry container.
    let hosts = step(
        &plan,
        &[
            "exec -i plan-check-control-plane",
            "/etc/containerd/certs.d/localhost:5999/hosts.toml",
        ],
    );
    assert_eq!(plan[hosts + 1], "  < [host.\"http://kind-registry:5000\"]");
    let connect = step(&plan, &["docker network connect kind kind-registry"]);
    let push = step(
        &plan,
        &["push.sh localhost:5999/sluice dev operator consumer testapp"],
    );
    let kafka = step(
        &plan,
        &["BRIDGE_GATEWAY=", "SLUICE_EXTERNAL_BRIDGE=1", "kafka.sh up"],
    );
    let cluster = step(&plan, &["SLUICE_EXTERNAL_BRIDGE=1", "kafka-cluster.sh up"]);
    let tests = step(
        &plan,
        &["cargo test --release --locked -p sluice-tests --test e2e_node"],
    );
    let delete = step(&plan, &["delete cluster --name plan-check"]);
    let order = [
        images, registry, create, hosts, connect, push, kafka, cluster, tests, delete,
    ];
    assert!(
        order.is_sorted(),
        "steps out of order {order:?}:\n{}",
        plan.join("\n")
    );

    // The tests get everything they read from the environment, agreeing with the plan.
    let run = &plan[tests];
    for expected in [
        format!("KUBECONFIG={}/kubeconfig", state.display()),
        "SLUICE_E2E_REGISTRY=localhost:5999/sluice".to_owned(),
        "SLUICE_KAFKA_BOOTSTRAP=127.0.0.1:9092".to_owned(),
        "SLUICE_KAFKA_POD_BOOTSTRAP=".to_owned(),
        "SLUICE_KAFKA_CLUSTER_".to_owned(),
        "SLUICE_HOST_IP=".to_owned(),
        "SLUICE_NODE_CTR=docker\\ exec\\ plan-check-control-plane\\ ctr".to_owned(),
        "SLUICE_KUBECTL=".to_owned(),
        "SLUICE_HELM=".to_owned(),
        "-- --nocapture rolling_update".to_owned(),
    ] {
        assert!(
            run.contains(&expected),
            "the test run lacks {expected:?}:\n{run}"
        );
    }
    // The kubeconfig kind writes is the one the tests use.
    assert!(plan[create].contains(&format!("--kubeconfig {}/kubeconfig", state.display())));

    // With a Kafka given in the environment, the plan starts none and passes it on.
    let plan = dry_run(
        &state,
        &[
            ("SLUICE_KAFKA_BOOTSTRAP", "kafka.example:9092"),
            ("SLUICE_KAFKA_POD_BOOTSTRAP", "kafka.kafka.svc:9092"),
        ],
    );
    assert!(
        !plan
            .iter()
            .any(|l| l.contains("kafka.sh") || l.contains("kafka-cluster.sh")),
        "Kafka started although one was given:\n{}",
        plan.join("\n")
    );
    step(
        &plan,
        &["cargo test --release --locked -p sluice-tests --test e2e_node"],
    );
    let _ = std::fs::remove_dir_all(&state);
}
