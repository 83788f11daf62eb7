//! Leader election through a `coordination.k8s.io/v1` Lease, so two or more operator replicas
//! are safe: only the holder reconciles.
//!
//! Written here rather than taken from a crate because none of the maintained ones targets
//! kube 5 yet, and the protocol is small. It follows client-go's leaderelection package:
//!
//! * every write is a compare-and-swap (create, or replace at the read `resourceVersion`), so
//!   two candidates can never both win;
//! * a candidate judges expiry by its *own* clock — the holder's record must stay unchanged
//!   for a full `leaseDurationSeconds` as observed locally — so clock skew between machines
//!   cannot make it take over a live leader;
//! * the holder renews every `retry_period` and gives up leadership (stops reconciling) when
//!   it has not renewed for `renew_deadline`, which is shorter than the lease duration, so it
//!   stops before anyone else may start;
//! * on a clean shutdown the holder releases the Lease (empty holder), so a standby takes over
//!   at once instead of waiting for expiry.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Lease settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How long a Lease is valid without renewal.
    pub lease_duration: Duration,
    /// The holder gives up if it could not renew for this long (< lease_duration).
    pub renew_deadline: Duration,
    /// Pause between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// Problems with the settings, each saying what is allowed.
    pub fn check(&self) -> Result<(), String> {
        if self.identity.is_empty() {
            return Err(
                "the leader-election identity is empty; set --identity (default: the pod name)"
                    .into(),
            );
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "--renew-deadline ({:?}) must be shorter than --lease-duration ({:?}), so the leader stops before another replica may start",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.retry_period >= self.renew_deadline {
            return Err(format!(
                "--retry-period ({:?}) must be shorter than --renew-deadline ({:?}), so the leader can retry a failed renewal",
                self.retry_period, self.renew_deadline
            ));
        }
        Ok(())
    }
}

/// The holder record as last observed, and when (by the local clock) it was first seen.
#[derive(Clone, Debug, PartialEq)]
struct Observation {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    duration: Duration,
    since: Instant,
}

/// A candidate for the Lease.
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    observed: Mutex<Option<Observation>>,
}

/// What an attempt found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// This replica holds the Lease (acquired or renewed).
    Leader,
    /// Someone else holds a live Lease (or won the race).
    Follower,
}

impl Elector {
    pub fn new(client: Client, settings: LeaseSettings) -> Elector {
        Elector {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: Mutex::new(None),
        }
    }

    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    /// One attempt to acquire or renew the Lease.
    pub async fn try_acquire_or_renew(&self) -> Result<Attempt, kube::Error> {
        let s = &self.settings;
        let now = MicroTime(Timestamp::now());
        let duration_secs = i32::try_from(s.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&s.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(s.name.clone()),
                    namespace: Some(s.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(s.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leader),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Follower),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let held_by_me = holder.as_deref() == Some(s.identity.as_str());
        if !held_by_me && holder.is_some() {
            let duration = Duration::from_secs(
                spec.lease_duration_seconds.unwrap_or(duration_secs).max(1) as u64,
            );
            let mut observed = self.observed.lock().await;
            let changed = match observed.as_ref() {
                Some(o) => o.holder != holder || o.renew_time != spec.renew_time,
                None => true,
            };
            if changed {
                *observed = Some(Observation {
                    holder: holder.clone(),
                    renew_time: spec.renew_time.clone(),
                    duration,
                    since: Instant::now(),
                });
            }
            let o = observed.as_ref().expect("set above");
            if o.since.elapsed() < o.duration {
                return Ok(Attempt::Follower);
            }
            info!(holder = holder.as_deref().unwrap_or(""), lease = %s.name, "the leader's Lease expired; taking over");
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + if held_by_me { 0 } else { 1 };
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(s.identity.clone()),
            lease_duration_seconds: Some(duration_secs),
            acquire_time: if held_by_me {
                spec.acquire_time.clone()
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..spec
        });
        match self
            .api
            .replace(&s.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Leader),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Follower),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the Lease; `false` if `shutdown` came first.
    /// `on_contact` runs after every attempt that reached the API server.
    pub async fn acquire(&self, shutdown: &CancellationToken, on_contact: impl Fn()) -> bool {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Leader) => {
                    on_contact();
                    info!(identity = %self.settings.identity, lease = %self.settings.name, "acquired the leader Lease");
                    return true;
                }
                Ok(Attempt::Follower) => on_contact(),
                Err(error) => {
                    warn!(%error, lease = %self.settings.name, "cannot read or write the leader Lease; retrying")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(self.settings.retry_period) => {}
            }
        }
    }

    /// Renews the Lease until it is lost (another holder, or no renewal within the renew
    /// deadline) or `stop` is cancelled. Returns `true` when leadership was lost.
    pub async fn hold(&self, stop: &CancellationToken) -> bool {
        let mut last_renew = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(self.settings.retry_period) => {}
            }
            let attempt =
                tokio::time::timeout(self.settings.renew_deadline, self.try_acquire_or_renew())
                    .await;
            match attempt {
                Ok(Ok(Attempt::Leader)) => last_renew = Instant::now(),
                Ok(Ok(Attempt::Follower)) => {
                    warn!(lease = %self.settings.name, "another replica holds the leader Lease; stopping");
                    return true;
                }
                Ok(Err(error)) => warn!(%error, "renewing the leader Lease failed"),
                Err(_) => warn!("renewing the leader Lease timed out"),
            }
            if last_renew.elapsed() >= self.settings.renew_deadline {
                warn!(lease = %self.settings.name, "could not renew the leader Lease within the renew deadline; stopping");
                return true;
            }
        }
    }

    /// Gives the Lease up (if held) so a standby takes over at once.
    pub async fn release(&self) {
        let s = &self.settings;
        let Ok(Some(mut lease)) = self.api.get_opt(&s.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(s.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&s.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(lease = %s.name, "released the leader Lease"),
            Err(error) => {
                warn!(%error, lease = %s.name, "releasing the leader Lease failed; a standby takes over when it expires")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(d: u64, r: u64, p: u64) -> LeaseSettings {
        LeaseSettings {
            name: "l".into(),
            namespace: "n".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(d),
            renew_deadline: Duration::from_secs(r),
            retry_period: Duration::from_secs(p),
        }
    }

    #[test]
    fn timing_settings_are_checked() {
        assert_eq!(settings(15, 10, 2).check(), Ok(()));
        assert!(
            settings(10, 10, 2)
                .check()
                .unwrap_err()
                .contains("--renew-deadline")
        );
        assert!(
            settings(15, 10, 10)
                .check()
                .unwrap_err()
                .contains("--retry-period")
        );
        let mut s = settings(15, 10, 2);
        s.identity.clear();
        assert!(s.check().unwrap_err().contains("--identity"));
    }
}
