//! The `sluice-consumer` command line: configuration file plus flags (each with an env var).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use sluice_config::{DEFAULT_CONFIG_PATH, SidecarConfig, read_secret_file};
use tracing::{debug, error, info};
use tracing_subscriber::EnvFilter;

use crate::admin::{self, AdminState};
use crate::kafka::GroupHealth;
use crate::metrics::Metrics;
use crate::metrics::ReasonLabel;
use crate::sidecar::{self, AppGate, DrainControl, Ended, Readiness};

/// The Sluice consumer sidecar: consumes Kafka records and delivers them to the application
/// over HTTP on localhost.
#[derive(Debug, Parser)]
#[command(name = "sluice-consumer", version)]
pub struct Cli {
    /// The configuration file (JSON; the ConfigMap the operator mounts).
    #[arg(long, env = "SLUICE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Overrides admin.listen.
    #[arg(long, env = "SLUICE_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Overrides kafka.bootstrapServers.
    #[arg(long, env = "SLUICE_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: Option<String>,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `sluice_consumer=debug`.
    #[arg(long, env = "SLUICE_LOG", default_value = "info")]
    pub log: String,
    /// Log format.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    /// Tokio worker threads.
    #[arg(long, env = "SLUICE_WORKER_THREADS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub worker_threads: u16,
    /// Validate the configuration and exit.
    #[arg(long)]
    pub check_config: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

fn init_logging(cli: &Cli) -> Result<(), String> {
    let filter =
        EnvFilter::try_new(&cli.log).map_err(|e| format!("invalid --log {:?}: {e}", cli.log))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

/// Loads the configuration file and applies the flag overrides, then validates.
pub fn load_config(cli: &Cli) -> Result<SidecarConfig, String> {
    let text = std::fs::read_to_string(&cli.config).map_err(|e| {
        format!(
            "cannot read the configuration file {}: {e}",
            cli.config.display()
        )
    })?;
    let mut config = SidecarConfig::from_json(&text).map_err(|e| {
        format!(
            "the configuration file {} is not a valid Sluice sidecar configuration: {e}",
            cli.config.display()
        )
    })?;
    if let Some(listen) = cli.admin_listen {
        config.admin.listen = listen;
    }
    if let Some(servers) = &cli.bootstrap_servers {
        config.kafka.bootstrap_servers = servers.clone();
    }
    config.validate().map_err(|e| {
        format!(
            "the configuration ({} plus flags) is invalid:\n{e}",
            cli.config.display()
        )
    })?;
    Ok(config)
}

/// The binary's entry point.
pub fn main() -> ExitCode {
    // First, while this is the only thread.
    let mmap_threshold = fix_mmap_threshold();
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli) {
        eprintln!("sluice-consumer: {e}");
        return ExitCode::from(2);
    }
    debug!(
        fixed = mmap_threshold,
        bytes = MMAP_THRESHOLD,
        "malloc mmap threshold"
    );
    let config = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            eprintln!("sluice-consumer: {e}");
            terminate_with(&format!("invalid configuration: {e}"));
            return ExitCode::from(2);
        }
    };
    let token = match &config.drain.token_file {
        Some(path) => match read_secret_file("drain.tokenFile", path) {
            Ok(t) => Some(Arc::<str>::from(t)),
            Err(e) => {
                error!("{e}");
                eprintln!("sluice-consumer: {e}");
                terminate_with(&format!("invalid configuration: {e}"));
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    if let Err(e) = config.kafka.client_properties() {
        error!("{e}");
        eprintln!("sluice-consumer: {e}");
        terminate_with(&format!("invalid configuration: {e}"));
        return ExitCode::from(2);
    }
    if cli.check_config {
        println!("configuration {} is valid", cli.config.display());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.worker_threads.into())
        .thread_name("sluice-worker")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(run(config, token));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

async fn run(config: SidecarConfig, drain_token: Option<Arc<str>>) -> ExitCode {
    let metrics = Arc::new(Metrics::new());
    let drain = DrainControl::new();
    let app = AppGate::new(&config);
    let group = Arc::new(GroupHealth::default());
    let readiness = Arc::new(Readiness {
        app: app.clone(),
        group: group.clone(),
        drain: drain.clone(),
    });
    let listener = match tokio::net::TcpListener::bind(config.admin.listen).await {
        Ok(l) => l,
        Err(e) => {
            error!(listen = %config.admin.listen, error = %e, "cannot listen on the admin address");
            return ExitCode::from(1);
        }
    };
    info!(listen = %config.admin.listen, "admin endpoint listening");
    let state = AdminState {
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        drain: drain.clone(),
        drain_token,
    };
    // Stopped gracefully before the process exits, so that answers in flight are written.
    let admin_stop = tokio_util::sync::CancellationToken::new();
    let admin_server = {
        let stop = admin_stop.clone();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, admin::router(state))
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
            {
                error!(error = %e, "the admin endpoint failed");
            }
        })
    };

    let signalled = tokio_util::sync::CancellationToken::new();
    {
        let drain = drain.clone();
        let signalled = signalled.clone();
        let metrics_for_signals = metrics.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                error!("cannot install signal handlers");
                return;
            };
            loop {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                info!(signal = name, "signal received: draining");
                if !drain.is_requested() {
                    metrics_for_signals
                        .drains
                        .get_or_create(&ReasonLabel { reason: "signal" })
                        .inc();
                }
                signalled.cancel();
                drain.request();
            }
        });
    }

    let await_pre_stop = config.drain.await_pre_stop;
    let result = sidecar::run(config, drain.clone(), app, group, metrics).await;
    match result {
        Err(e) => {
            error!(error = format!("{e:#}"), "the sidecar failed");
            drain.finish(format!("failed: {e:#}"));
            terminate_with(&format!("the sidecar failed: {e:#}"));
            return ExitCode::from(1);
        }
        Ok(Ended::Fatal(reason)) => {
            error!(%reason, "the Kafka consumer failed fatally; drained and exiting");
            terminate_with(&format!("the Kafka consumer failed fatally: {reason}"));
            return ExitCode::from(1);
        }
        Ok(Ended::Drained) => {}
    }
    // Drained (by a signal or /drain). After /drain, stay up, serving health and metrics,
    // until the container is told to stop.
    signalled.cancelled().await;
    // As a plain container the sidecar is signalled together with the application, whose
    // preStop hook calls /drain; a short drain can end before that call arrives, and an exit
    // then fails the hook (FailedPreStopHook). Wait for it, bounded.
    if let Some(bound) = await_pre_stop {
        if drain.wait_called(bound).await {
            debug!("the preStop hook's /drain call arrived");
        } else {
            info!(waited = ?bound, "no preStop /drain call arrived; exiting");
        }
    }
    // Answer what the admin listener still has in flight before exiting — above all the
    // preStop `/drain` call waiting for this drain: as a plain container (`--sidecar-mode
    // container`) the sidecar gets SIGTERM while the application's hook still waits, and an
    // exit before its answer is written makes the kubelet report FailedPreStopHook. Bounded,
    // so an idle keep-alive connection cannot hold the exit.
    admin_stop.cancel();
    if tokio::time::timeout(std::time::Duration::from_secs(2), admin_server)
        .await
        .is_err()
    {
        info!("the admin endpoint did not close within 2s; exiting anyway");
    }
    info!("exiting");
    ExitCode::SUCCESS
}

/// The kubelet's termination message file, read into the container's
/// `state.terminated.message` (the operator shows it in the EventConsumer's
/// `SidecarCrashLooping` condition).
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// Longest message written (the kubelet keeps at most 4 KiB per container).
const TERMINATION_MESSAGE_MAX: usize = 1024;

/// One line, at most [`TERMINATION_MESSAGE_MAX`] bytes (cut at a character boundary).
pub fn termination_message(text: &str) -> String {
    let mut line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.len() > TERMINATION_MESSAGE_MAX {
        let mut cut = TERMINATION_MESSAGE_MAX - 3;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str("...");
    }
    line
}

/// Writes why the process exits to `path` when that file exists (Kubernetes creates it in
/// every container; elsewhere nothing is written). Best effort: the exit goes on regardless.
pub fn write_termination_message(path: &std::path::Path, text: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
    {
        let _ = writeln!(f, "{}", termination_message(text));
    }
}

/// Allocations from this size up get their own mapping, returned to the system when freed.
///
/// glibc starts at 128 KiB but raises the threshold to the size of each mapped block freed,
/// so after the first few fetch responses (librdkafka's receive buffers, up to the fetch
/// size, 3–4 MiB) every later one comes from a thread's heap; each heap then keeps its own
/// peak and the resident total is the sum of those peaks. Fixed at 256 KiB, the fetch
/// buffers and other large blocks leave when freed: in 11 alternated rounds the highest RSS
/// of batch runs fell from 40.2–40.7 to 32.3–35.4 MiB, for up to ~10 % more CPU per record
/// (docs/sidecar.md, "A fixed mmap threshold").
const MMAP_THRESHOLD: usize = 256 * 1024;

/// Whether to fix the threshold: not when the user set it through glibc's tunables.
fn wants_fixed_mmap_threshold(tunables: Option<&str>) -> bool {
    !tunables.is_some_and(|t| t.contains("glibc.malloc.mmap_threshold"))
}

/// Fixes malloc's mmap threshold at [`MMAP_THRESHOLD`]; whether it was set.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn fix_mmap_threshold() -> bool {
    let tunables = std::env::var("GLIBC_TUNABLES").ok();
    if !wants_fixed_mmap_threshold(tunables.as_deref()) {
        return false;
    }
    let bytes = libc::c_int::try_from(MMAP_THRESHOLD).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only sets an allocator parameter; it is called once, at the start of
    // `main`, before any other thread exists. It returns 0 if it refused the value.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fix_mmap_threshold() -> bool {
    false
}

fn terminate_with(text: &str) {
    write_termination_message(std::path::Path::new(TERMINATION_LOG), text);
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_mmap_threshold_is_fixed_unless_the_user_tuned_it() {
        assert!(wants_fixed_mmap_threshold(None));
        assert!(wants_fixed_mmap_threshold(Some("glibc.malloc.arena_max=2")));
        assert!(!wants_fixed_mmap_threshold(Some(
            "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=1048576"
        )));
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if std::env::var_os("GLIBC_TUNABLES").is_none() {
            assert!(fix_mmap_threshold(), "glibc accepts 256 KiB");
        }
    }

    #[test]
    fn the_termination_message_is_one_bounded_line_written_only_where_kubernetes_made_the_file() {
        assert_eq!(
            termination_message("Kafka: authentication failed:\n  SASL PLAIN   refused\n"),
            "Kafka: authentication failed: SASL PLAIN refused"
        );
        let long = "é".repeat(2000);
        let m = termination_message(&long);
        assert!(m.len() <= TERMINATION_MESSAGE_MAX, "{}", m.len());
        assert!(m.ends_with("..."));
        let dir = std::env::temp_dir().join(format!("sluice-term-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let absent = dir.join("absent");
        write_termination_message(&absent, "x");
        assert!(!absent.exists(), "no file is created outside Kubernetes");
        let file = dir.join("termination-log");
        std::fs::write(&file, "an older, longer message\n").unwrap();
        write_termination_message(&file, "invalid configuration:\nkafka.topics is empty");
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "invalid configuration: kafka.topics is empty\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_and_overrides() {
        let cli = Cli::try_parse_from(["sluice-consumer"]).unwrap();
        assert_eq!(cli.config, PathBuf::from("/etc/sluice/config.json"));
        assert_eq!(cli.log_format, LogFormat::Json);
        let dir = std::env::temp_dir().join(format!("sluice-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.json");
        std::fs::write(
            &path,
            r#"{"kafka": {"bootstrapServers": "k:9092", "topics": ["t"], "groupId": "g"}, "delivery": {"url": "http://127.0.0.1:8080/"}}"#,
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "sluice-consumer",
            "--config",
            path.to_str().unwrap(),
            "--admin-listen",
            "127.0.0.1:19898",
            "--bootstrap-servers",
            "other:9093",
        ])
        .unwrap();
        let config = load_config(&cli).unwrap();
        assert_eq!(config.admin.listen.to_string(), "127.0.0.1:19898");
        assert_eq!(config.kafka.bootstrap_servers, "other:9093");
        let cli = Cli::try_parse_from([
            "sluice-consumer",
            "--config",
            path.to_str().unwrap(),
            "--bootstrap-servers",
            "nope",
        ])
        .unwrap();
        let err = load_config(&cli).unwrap_err();
        assert!(
            err.contains("kafka.bootstrapServers") && err.contains("has no port"),
            "{err}"
        );
        let cli = Cli::try_parse_from(["sluice-consumer", "--config", "/nonexistent/sluice.json"])
            .unwrap();
        assert!(
            load_config(&cli)
                .unwrap_err()
                .contains("/nonexistent/sluice.json")
        );
        assert!(Cli::try_parse_from(["sluice-consumer", "--worker-threads", "0"]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
