//! Fixtures shared by Sluice's integration and end-to-end tests.
//!
//! Every test gets its own Kafka topic, consumer group and Kubernetes namespace, so tests
//! never share state and can run in parallel. The fixtures talk to the real test bed
//! (`make env-up`); when it is not reachable they fail with a message that says how to
//! start it. Nothing is ever skipped silently.

pub mod kafka;
pub mod kube_env;
pub mod registry;
pub mod testapp;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// A name that is unique across tests and test runs: `<prefix>-<pid>-<counter>-<random>`,
/// lower case and at most 63 characters, so it is valid as a Kafka topic, a consumer group
/// and a Kubernetes namespace.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let salt: u32 = rand::random::<u32>() % 0x10000;
    let mut name = format!("{prefix}-{}-{n}-{salt:04x}", std::process::id());
    name.make_ascii_lowercase();
    name.truncate(63);
    name
}

/// Where the running test bed keeps its state (kubeconfig, logs, pids).
pub fn state_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SLUICE_STATE") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var("SLUICE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/sluice")
        });
    cache.join("state")
}

/// A test-bed setting: the process environment first, else the `env` file that
/// `make env-up` writes into the state folder (so plain `cargo test` works too).
pub fn env_value(key: &str) -> Option<String> {
    if let Ok(v) = std::env::var(key) {
        return Some(v);
    }
    let text = std::fs::read_to_string(state_dir().join("env")).ok()?;
    text.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k == key).then(|| v.trim_matches('"').to_string())
    })
}

/// The path of a test-bed tool (`SLUICE_KUBECTL`, `SLUICE_HELM`), or a panic that says
/// how to get it.
pub fn tool(key: &str) -> PathBuf {
    match env_value(key) {
        Some(path) if std::path::Path::new(&path).is_file() => PathBuf::from(path),
        Some(path) => panic!("{key}={path} does not exist; {START_HINT}"),
        None => panic!("{key} is not set and the test bed's env file is missing; {START_HINT}"),
    }
}

/// This package's folder (`tests/`) in the checkout the tests run from.
///
/// Read when the test runs (cargo sets `CARGO_MANIFEST_DIR` for the processes it starts),
/// not when it was compiled: CI reuses test binaries built in an earlier clone whose
/// sources were the same (`.ci/run`), and that clone's folder may be gone.
pub fn package_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The repository's root in the checkout the tests run from.
pub fn repo_root() -> PathBuf {
    package_dir().join("..")
}

/// The repository's `tests/env` folder (the test-bed scripts).
pub fn env_scripts() -> PathBuf {
    package_dir().join("env")
}

/// The hint every fixture failure ends with.
pub const START_HINT: &str =
    "start the test bed with `make env-up` (or run the tests with `make test`, which starts it)";

/// Runs the test-bed tool `tool` (`SLUICE_KUBECTL`, `SLUICE_HELM`) with `args` against the
/// test bed's kubeconfig, writing `stdin` to it when given, and returns what it did.
pub fn run_tool(tool: &str, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new(self::tool(tool))
        .args(args)
        .env("KUBECONFIG", kube_env::kubeconfig_path())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {tool} {args:?}: {e}"));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("writing to the tool's stdin");
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {tool} {args:?}: {e}"))
}

/// `kubectl ARGS` on the test bed.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    run_tool("SLUICE_KUBECTL", args, stdin)
}

/// Everything a tool printed: its standard output, then its standard error.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The tool's standard output, or a panic naming `what` with everything it printed.
pub fn ok(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
