//! `sluice-operator run`: flags, logging, the HTTP endpoint, leader election and the
//! controller, wired together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use kube::Client;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

use crate::build::{DEFAULT_SIDECAR_IMAGE, SidecarDefaults, SidecarMode};
use crate::lag::LagSettings;
use crate::leader::{Elector, LeaseSettings, Lost};
use crate::metrics::{self, Metrics};
use crate::reconcile::{Context, WatchScope, Watches, run_controller};

/// Flags of `sluice-operator run`; every one can also be set through its environment variable.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct RunArgs {
    /// Address of the HTTP endpoint: /metrics, /healthz, /readyz.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Sidecar image for EventConsumers that do not set spec.sidecar.image.
    #[arg(long, env = "SLUICE_SIDECAR_IMAGE", default_value = DEFAULT_SIDECAR_IMAGE)]
    pub sidecar_image: String,

    /// How the sidecar is injected: `native` (an init container with restartPolicy Always;
    /// Kubernetes 1.29+) or `container` (a plain container, for older clusters).
    #[arg(long, env = "SLUICE_SIDECAR_MODE", value_enum, default_value_t = SidecarMode::Native)]
    pub sidecar_mode: SidecarMode,

    /// EventConsumers whose pods roll at the same time for a change the operator makes on its
    /// own (a new sidecar image or sidecar mode after an operator upgrade); the others wait
    /// for a turn, which ends when a rollout completes. A change of an EventConsumer's spec
    /// or Secrets is not paced.
    #[arg(long, env = "SLUICE_MAX_SIDECAR_ROLLOUTS", default_value_t = crate::pacing::DEFAULT_MAX_SIDECAR_ROLLOUTS, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_sidecar_rollouts: u32,

    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "SLUICE_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// EventConsumers reconciled at the same time.
    #[arg(long, env = "SLUICE_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub concurrency: u16,

    /// Name of the leader-election Lease.
    #[arg(long, env = "SLUICE_LEASE_NAME", default_value = "sluice-operator")]
    pub lease_name: String,

    /// Namespace of the Lease (default: the namespace the operator runs in, else `default`).
    #[arg(long, env = "SLUICE_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// This replica's identity in the Lease (default: the pod name from POD_NAME, else the
    /// host name plus a random suffix).
    #[arg(long, env = "SLUICE_IDENTITY")]
    pub identity: Option<String>,

    /// Seconds a Lease stays valid without renewal.
    #[arg(long, env = "SLUICE_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,

    /// Seconds the leader keeps trying to renew before it stops reconciling.
    #[arg(long, env = "SLUICE_RENEW_DEADLINE_SECONDS", default_value_t = 10)]
    pub renew_deadline_seconds: u64,

    /// Seconds between attempts to acquire or renew the Lease.
    #[arg(long, env = "SLUICE_RETRY_PERIOD_SECONDS", default_value_t = 2)]
    pub retry_period_seconds: u64,

    /// Seconds a leader that lost the Lease gives running reconciles to finish before it
    /// drops them. The renew deadline plus this must be shorter than the lease duration.
    #[arg(long, env = "SLUICE_GRACEFUL_STOP_SECONDS", default_value_t = 4)]
    pub graceful_stop_seconds: u64,

    /// How often the lag collector reads every EventConsumer's consumer-group lag from Kafka
    /// (one long-lived client per Kafka connection identity) into the
    /// sluice_operator_consumer_lag metric, e.g. `30s` or `2m`; `0s` turns lag off
    /// (status.lag stays unset, no Kafka client is created).
    #[arg(long, env = "SLUICE_LAG_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub lag_interval: Duration,

    /// Minimum time between two status.lag writes of one EventConsumer; status.lag is also
    /// written only when the lag changed noticeably (to or from zero, or by 10%) or became
    /// stale. At least the lag interval.
    #[arg(long, env = "SLUICE_LAG_STATUS_INTERVAL", default_value = "3m", value_parser = humantime::parse_duration)]
    pub lag_status_interval: Duration,

    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `sluice_operator=debug`.
    #[arg(long, env = "SLUICE_LOG", default_value = "info")]
    pub log: String,

    /// Log format.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// Everything [`run`] needs, resolved from the flags (tests build it directly).
#[derive(Clone, Debug)]
pub struct Settings {
    pub defaults: SidecarDefaults,
    pub scope: WatchScope,
    pub concurrency: u16,
    pub lease: LeaseSettings,
    /// `--max-sidecar-rollouts`.
    pub max_sidecar_rollouts: u32,
}

impl RunArgs {
    /// Resolves defaults that depend on the environment and checks the settings.
    pub fn settings(&self, default_namespace: &str) -> anyhow::Result<Settings> {
        let identity = match &self.identity {
            Some(id) => id.clone(),
            None => std::env::var("POD_NAME").unwrap_or_else(|_| {
                let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "sluice-operator".into());
                format!("{host}-{:08x}", rand::random::<u32>())
            }),
        };
        let lease = LeaseSettings {
            name: self.lease_name.clone(),
            namespace: self
                .lease_namespace
                .clone()
                .unwrap_or_else(|| default_namespace.to_owned()),
            identity,
            lease_duration: Duration::from_secs(self.lease_duration_seconds),
            renew_deadline: Duration::from_secs(self.renew_deadline_seconds),
            retry_period: Duration::from_secs(self.retry_period_seconds),
            graceful_stop: Duration::from_secs(self.graceful_stop_seconds),
        };
        lease.check().map_err(anyhow::Error::msg)?;
        if self.sidecar_image.trim().is_empty() || self.sidecar_image.contains(char::is_whitespace)
        {
            anyhow::bail!(
                "--sidecar-image {:?} is not an image reference; give one such as sluice.dev/consumer:1.0",
                self.sidecar_image
            );
        }
        Ok(Settings {
            defaults: SidecarDefaults {
                image: self.sidecar_image.clone(),
                mode: self.sidecar_mode,
            },
            scope: WatchScope {
                namespace: self.watch_namespace.clone(),
            },
            concurrency: self.concurrency,
            lease,
            max_sidecar_rollouts: self.max_sidecar_rollouts,
        })
    }
}

impl RunArgs {
    /// The lag settings from `--lag-interval`: zero (off) or at least one second.
    pub fn lag_settings(&self) -> anyhow::Result<LagSettings> {
        if !self.lag_interval.is_zero() && self.lag_interval < Duration::from_secs(1) {
            anyhow::bail!(
                "--lag-interval {:?} is too short; give at least 1s, or 0s to turn lag off",
                self.lag_interval
            );
        }
        if !self.lag_interval.is_zero() && self.lag_status_interval < self.lag_interval {
            anyhow::bail!(
                "--lag-status-interval {:?} is shorter than --lag-interval {:?}; give at least the lag interval",
                self.lag_status_interval,
                self.lag_interval
            );
        }
        Ok(LagSettings {
            interval: self.lag_interval,
            status_interval: self.lag_status_interval,
            ..LagSettings::default()
        })
    }
}

fn init_logging(args: &RunArgs) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_new(&args.log).with_context(|| format!("invalid --log {:?}", args.log))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    }
    .map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

/// The binary's `run`: logging, client, HTTP endpoint, then [`run`] until SIGTERM or Ctrl-C.
pub async fn main(args: RunArgs) -> anyhow::Result<()> {
    init_logging(&args)?;
    let config = kube::Config::infer().await.context(
        "cannot configure the Kubernetes client (in-cluster service account or KUBECONFIG)",
    )?;
    let client = Client::try_from(config.clone())
        .context("cannot build the Kubernetes client from its configuration")?;
    crate::crd_check::ensure_current(&client).await?;
    let default_ns =
        std::env::var("POD_NAMESPACE").unwrap_or_else(|_| client.default_namespace().to_owned());
    let settings = args.settings(&default_ns)?;
    let lag = args.lag_settings()?;
    let lease_client = Client::try_from(lease_config(config, &settings.lease))
        .context("cannot build the Kubernetes client for the leader Lease")?;
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();

    let signal_token = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutdown signal received");
        signal_token.cancel();
    });
    let server_token = shutdown.clone();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    let server_metrics = metrics.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, metrics::router(server_metrics))
            .with_graceful_shutdown(async move { server_token.cancelled().await })
            .await
    });
    info!(listen = %args.listen, identity = %settings.lease.identity, lease = %settings.lease.name,
        lease_namespace = %settings.lease.namespace, "sluice-operator starting");
    let clients = Clients {
        controller: client,
        lease: lease_client,
    };
    run_operator(clients, settings, lag, metrics, shutdown).await;
    if let Ok(Err(e)) = server.await {
        error!(error = %e, "the HTTP endpoint failed");
    }
    info!("sluice-operator stopped");
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The client configuration for Lease traffic: its own connection pool (a separate
/// [`Client`]), with every connection and read bounded by the renew deadline.
pub fn lease_config(mut config: kube::Config, lease: &LeaseSettings) -> kube::Config {
    config.connect_timeout = Some(lease.renew_deadline);
    config.read_timeout = Some(lease.renew_deadline);
    config.write_timeout = Some(lease.renew_deadline);
    config
}

/// The API clients: one for the controller, the watches and the lag collector, and one of its
/// own for the leader Lease, so a busy controller cannot delay renewals.
#[derive(Clone)]
pub struct Clients {
    pub controller: Client,
    pub lease: Client,
}

/// Campaigns for the Lease; while leader, runs the controller and renews the Lease. On losing
/// it, stops reconciling and campaigns again. Returns after `shutdown`, having released the
/// Lease if it held it. One client for everything (tests; the binary uses [`run_operator`]
/// with a client of its own for the Lease).
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    run_with_lag(client, settings, LagSettings::default(), metrics, shutdown).await
}

/// [`run`] with explicit lag settings (`--lag-interval`).
pub async fn run_with_lag(
    client: Client,
    settings: Settings,
    lag: LagSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let clients = Clients {
        controller: client.clone(),
        lease: client,
    };
    run_operator(clients, settings, lag, metrics, shutdown).await
}

/// The operator: the watches (their caches stay warm on every replica, so a new leader
/// starts from them), the campaign for the Lease, and while leader the controller and the lag
/// collector. A leader that cannot renew within the renew deadline stops them at once,
/// within the graceful stop time, then campaigns again.
pub async fn run_operator(
    clients: Clients,
    settings: Settings,
    lag: LagSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let elector = Elector::new(clients.lease.clone(), settings.lease.clone());
    let ctx = Arc::new(
        Context::new(
            clients.controller.clone(),
            settings.defaults.clone(),
            metrics.clone(),
            &settings.lease.identity,
        )
        .with_lag(lag)
        .with_max_sidecar_rollouts(settings.max_sidecar_rollouts),
    );
    let watches = Watches::start(
        &clients.controller,
        &settings.scope,
        ctx.secret_index.clone(),
    );
    loop {
        let contact = || metrics.set_ready();
        let Some(acquired) = elector.acquire(&shutdown, contact).await else {
            return;
        };
        metrics.leader.set(1);
        let stop = shutdown.child_token();
        let controller_stop = stop.clone();
        let controller = run_controller(ctx.clone(), &watches, settings.concurrency, async move {
            controller_stop.cancelled().await
        });
        tokio::pin!(controller);
        let lost = tokio::select! {
            lost = elector.hold(acquired, &stop) => {
                // Lost (or shutting down): stop the controller and the collector, letting
                // running reconciles finish within the graceful stop time; whatever is left
                // is dropped with the future. The settings check keeps this inside the margin
                // between the renew deadline and the lease duration.
                stop.cancel();
                let _ = tokio::time::timeout(settings.lease.graceful_stop, &mut controller).await;
                lost
            }
            () = &mut controller => None,
        };
        metrics.leader.set(0);
        if shutdown.is_cancelled() || lost.is_none() {
            elector.release().await;
            return;
        }
        match lost {
            Some(Lost::Taken) => info!("another replica took the Lease; campaigning again"),
            _ => info!("leadership lost; campaigning again"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> RunArgs {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            run: RunArgs,
        }
        let mut argv = vec!["t"];
        argv.extend_from_slice(extra);
        <T as clap::Parser>::try_parse_from(argv)
            .map(|t| t.run)
            .unwrap()
    }

    #[test]
    fn defaults_resolve_to_valid_settings() {
        let s = args(&["--identity", "pod-1"]).settings("ops").unwrap();
        assert_eq!(s.lease.namespace, "ops");
        assert_eq!(s.lease.identity, "pod-1");
        assert_eq!(s.lease.lease_duration, Duration::from_secs(15));
        assert_eq!(s.defaults, SidecarDefaults::default());
        assert_eq!(s.scope.namespace, None);
        assert_eq!(s.concurrency, 16);
        assert_eq!(s.lease.renew_deadline, Duration::from_secs(10));
        assert_eq!(s.lease.retry_period, Duration::from_secs(2));
        assert_eq!(s.lease.graceful_stop, Duration::from_secs(4));
        assert_eq!(s.max_sidecar_rollouts, 10);
        let a = args(&["--identity", "pod-1"]);
        assert_eq!(a.lag_settings().unwrap(), LagSettings::default());
    }

    #[test]
    fn lag_interval_parses_durations_and_zero_turns_it_off() {
        let l = args(&["--lag-interval", "2m"]).lag_settings().unwrap();
        assert_eq!(l.interval, Duration::from_secs(120));
        assert!(l.enabled());
        let l = args(&["--lag-interval", "0s"]).lag_settings().unwrap();
        assert!(!l.enabled());
        let e = args(&["--lag-interval", "100ms"])
            .lag_settings()
            .unwrap_err();
        assert!(e.to_string().contains("--lag-interval"), "{e}");
        let l = args(&["--lag-status-interval", "10m"])
            .lag_settings()
            .unwrap();
        assert_eq!(l.status_interval, Duration::from_secs(600));
        let e = args(&["--lag-interval", "2m", "--lag-status-interval", "1m"])
            .lag_settings()
            .unwrap_err();
        assert!(e.to_string().contains("--lag-status-interval"), "{e}");
    }

    #[test]
    fn flags_override_and_bad_timings_are_refused() {
        let s = args(&[
            "--sidecar-mode",
            "container",
            "--sidecar-image",
            "x/y:1",
            "--watch-namespace",
            "shop",
            "--identity",
            "a",
        ])
        .settings("d")
        .unwrap();
        assert_eq!(s.defaults.mode, SidecarMode::Container);
        assert_eq!(s.defaults.image, "x/y:1");
        assert_eq!(s.scope.namespace.as_deref(), Some("shop"));
        let e = args(&["--lease-duration-seconds", "5", "--identity", "a"])
            .settings("d")
            .unwrap_err();
        assert!(e.to_string().contains("--renew-deadline"), "{e}");
        // The graceful stop counts: 10 + 5 is not shorter than 15.
        let e = args(&["--graceful-stop-seconds", "5", "--identity", "a"])
            .settings("d")
            .unwrap_err();
        assert!(e.to_string().contains("--graceful-stop-seconds"), "{e}");
        let s = args(&[
            "--graceful-stop-seconds",
            "2",
            "--renew-deadline-seconds",
            "12",
            "--identity",
            "a",
        ])
        .settings("d")
        .unwrap();
        assert_eq!(s.lease.graceful_stop, Duration::from_secs(2));
        let e = args(&["--sidecar-image", "has space", "--identity", "a"])
            .settings("d")
            .unwrap_err();
        assert!(e.to_string().contains("--sidecar-image"), "{e}");
        let s = args(&["--max-sidecar-rollouts", "3", "--identity", "a"])
            .settings("d")
            .unwrap();
        assert_eq!(s.max_sidecar_rollouts, 3);
    }

    #[test]
    fn zero_sidecar_rollouts_is_refused() {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            run: RunArgs,
        }
        let e = <T as clap::Parser>::try_parse_from(["t", "--max-sidecar-rollouts", "0"])
            .err()
            .expect("0 is refused");
        assert!(e.to_string().contains("--max-sidecar-rollouts"), "{e}");
    }
}

#[cfg(test)]
mod lease_client_tests {
    use super::*;

    #[test]
    fn the_lease_client_is_bounded_by_the_renew_deadline() {
        let config = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
        let lease = args_lease();
        let c = lease_config(config, &lease);
        assert_eq!(c.connect_timeout, Some(lease.renew_deadline));
        assert_eq!(c.read_timeout, Some(lease.renew_deadline));
        assert_eq!(c.write_timeout, Some(lease.renew_deadline));
    }

    fn args_lease() -> LeaseSettings {
        LeaseSettings {
            name: "l".into(),
            namespace: "n".into(),
            identity: "i".into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            graceful_stop: Duration::from_secs(4),
        }
    }
}
