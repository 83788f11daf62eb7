//! Leader election through a `coordination.k8s.io/v1` Lease, so two or more operator replicas
//! are safe: only the holder reconciles, and two holders never act at the same time.
//!
//! Written here rather than taken from a crate because none of the maintained ones targets
//! kube 5 yet, and the protocol is small. It follows client-go's leaderelection package:
//!
//! * every write is a compare-and-swap (create, or replace at the read `resourceVersion`), so
//!   two candidates can never both win;
//! * a candidate judges expiry by its *own* clock — the holder's record must stay unchanged
//!   for a full `leaseDurationSeconds` as observed locally — so clock skew between machines
//!   cannot make it take over a live leader;
//! * the holder renews every `retry_period`; each attempt may take only the time left before
//!   the renew deadline (counted from the *start* of the last successful renewal), so a slow
//!   API server cannot keep it acting past the deadline; when the deadline passes it stops
//!   acting, taking at most the graceful stop time. [`LeaseSettings::check`] requires
//!   `renew_deadline + graceful_stop < lease_duration`: the record a candidate last saw was
//!   written no earlier than that renewal started, so the leader has stopped before any
//!   candidate's clock can call the Lease expired;
//! * a 409 Conflict on a write re-reads the Lease and decides again from what it holds (still
//!   ours: retry at the new `resourceVersion`; someone else's: follow) rather than giving up
//!   at once;
//! * on a clean shutdown the holder releases the Lease (empty holder), so a standby takes over
//!   at once instead of waiting for expiry.
//!
//! The Lease should be read and written through its own [`Client`] (its own connection pool),
//! so a busy controller cannot starve the renewals.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Writes of one attempt that may end in a 409 Conflict before the attempt gives up (each
/// conflict re-reads the Lease first). Bounded so two writers fighting over the object
/// cannot spin; the renew deadline bounds the attempt's time anyway.
pub const MAX_CONFLICTS: u32 = 3;

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
    /// The longest a stepping-down leader takes to stop acting (running reconciles finish,
    /// then whatever is left is dropped).
    pub graceful_stop: Duration,
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
        if self.lease_duration.is_zero()
            || self.lease_duration.as_secs() > i32::MAX as u64
            || self.lease_duration.subsec_nanos() != 0
        {
            return Err(format!(
                "--lease-duration-seconds ({:?}) must be a whole number of seconds, at least 1",
                self.lease_duration
            ));
        }
        if self.retry_period.is_zero() {
            return Err("--retry-period-seconds must be at least 1".into());
        }
        if self.retry_period >= self.renew_deadline {
            return Err(format!(
                "--retry-period-seconds ({:?}) must be shorter than --renew-deadline-seconds ({:?}), so the leader can retry a failed renewal",
                self.retry_period, self.renew_deadline
            ));
        }
        let stopped_by = self.renew_deadline + self.graceful_stop;
        if stopped_by >= self.lease_duration {
            return Err(format!(
                "--renew-deadline-seconds ({:?}) plus --graceful-stop-seconds ({:?}) is {:?}, which must be shorter than --lease-duration-seconds ({:?}): a leader that cannot renew must have stopped before another replica may take the Lease; lengthen the lease duration or shorten the other two",
                self.renew_deadline, self.graceful_stop, stopped_by, self.lease_duration
            ));
        }
        Ok(())
    }
}

/// The time a renew attempt may take: what is left of the renew deadline since the start of
/// the last successful renewal, or `None` when the deadline has passed (stop acting).
pub fn renew_budget(since_last_renew: Duration, renew_deadline: Duration) -> Option<Duration> {
    renew_deadline
        .checked_sub(since_last_renew)
        .filter(|left| !left.is_zero())
}

/// What the holder record, as read, means for this replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Ours: renew it.
    Renew,
    /// Free (no holder) or expired by our clock: take it.
    Take,
    /// Someone else's live Lease: follow; it expires (by our clock) in this long unless renewed.
    Follow { expires_in: Duration },
}

/// Decides from the holder (`None`: released or never held) and how long the record has been
/// seen unchanged by this replica's clock.
pub fn decide(
    holder: Option<&str>,
    me: &str,
    unchanged_for: Duration,
    lease_duration: Duration,
) -> Decision {
    match holder {
        Some(h) if h == me => Decision::Renew,
        None => Decision::Take,
        Some(_) => match lease_duration.checked_sub(unchanged_for) {
            Some(left) if !left.is_zero() => Decision::Follow { expires_in: left },
            _ => Decision::Take,
        },
    }
}

/// Whether an attempt whose writes met `conflicts_so_far` 409 Conflicts re-reads the Lease and
/// decides again (`true`), or ends as a failed attempt (not as a lost Lease: the leader keeps
/// renewing until its deadline).
pub fn after_conflict(conflicts_so_far: u32) -> bool {
    conflicts_so_far < MAX_CONFLICTS
}

/// A follower's pause before its next attempt: the retry period, or just past the moment the
/// holder's Lease expires by our clock if that is sooner (so a dead leader is replaced as
/// soon as its Lease runs out, not up to a retry period later).
pub fn follower_pause(retry_period: Duration, expires_in: Duration) -> Duration {
    retry_period.min(expires_in + EXPIRY_SLACK)
}

/// How far past a Lease's expiry a follower reads it again.
const EXPIRY_SLACK: Duration = Duration::from_millis(20);

/// The holder record as last observed, and when (by the local clock) it was first seen.
#[derive(Clone, Debug, PartialEq)]
struct Observation {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    duration: Duration,
    since: Instant,
}

/// A hook run between reading the Lease and writing it (tests make concurrent writes there).
pub type BeforeWrite =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync + 'static>;

/// A candidate for the Lease.
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    observed: Mutex<Option<Observation>>,
    before_write: Option<BeforeWrite>,
}

/// What an attempt found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// This replica holds the Lease (acquired or renewed).
    Leader,
    /// Someone else holds a live Lease (or won the race); it expires in this long by our
    /// clock unless renewed.
    Follower { expires_in: Duration },
}

/// Why the leader stopped holding the Lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lost {
    /// Another replica holds the Lease.
    Taken,
    /// No successful renewal within the renew deadline.
    Deadline,
}

impl Elector {
    /// An elector reading and writing the Lease through `client` (give it a client of its
    /// own: see the module docs).
    pub fn new(client: Client, settings: LeaseSettings) -> Elector {
        Elector {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: Mutex::new(None),
            before_write: None,
        }
    }

    /// Runs `hook` after every read of the Lease and before the write that follows it, so a
    /// test can race a write of its own against the elector's deterministically.
    #[doc(hidden)]
    pub fn with_before_write(mut self, hook: BeforeWrite) -> Elector {
        self.before_write = Some(hook);
        self
    }

    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    /// One attempt to acquire or renew the Lease. A 409 Conflict re-reads the Lease and
    /// decides again (at most [`MAX_CONFLICTS`] times).
    pub async fn try_acquire_or_renew(&self) -> Result<Attempt, kube::Error> {
        let mut conflicts = 0;
        loop {
            match self.attempt_once().await {
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    conflicts += 1;
                    if !after_conflict(conflicts) {
                        return Err(kube::Error::Api(e));
                    }
                    info!(lease = %self.settings.name, "the leader Lease changed under a write (409); reading it again");
                }
                other => return other,
            }
        }
    }

    async fn attempt_once(&self) -> Result<Attempt, kube::Error> {
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
            // A 409 here (someone created it first) re-reads it.
            self.api.create(&PostParams::default(), &lease).await?;
            return Ok(Attempt::Leader);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let unchanged_for = {
            let duration = Duration::from_secs(
                spec.lease_duration_seconds.unwrap_or(duration_secs).max(1) as u64,
            );
            let mut observed = self.observed.lock().await;
            let changed = match observed.as_ref() {
                Some(o) => {
                    o.holder != holder || o.renew_time != spec.renew_time || o.duration != duration
                }
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
            (o.since.elapsed(), o.duration)
        };
        let held_by_me = match decide(
            holder.as_deref(),
            &s.identity,
            unchanged_for.0,
            unchanged_for.1,
        ) {
            Decision::Follow { expires_in } => return Ok(Attempt::Follower { expires_in }),
            Decision::Renew => true,
            Decision::Take => {
                if let Some(h) = holder.as_deref() {
                    info!(holder = h, lease = %s.name, "the leader's Lease expired; taking over");
                }
                false
            }
        };
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
        if let Some(hook) = &self.before_write {
            hook().await;
        }
        // A 409 (the Lease changed since it was read) re-reads it and decides again.
        self.api
            .replace(&s.name, &PostParams::default(), &lease)
            .await?;
        Ok(Attempt::Leader)
    }

    /// Waits until this replica holds the Lease and returns when the winning attempt started
    /// (the renew deadline counts from there); `None` if `shutdown` came first. `on_contact`
    /// runs after every attempt that reached the API server. While another replica holds the
    /// Lease, the next attempt comes after the retry period or just after that Lease would
    /// expire, whichever is sooner. Each attempt may take at most the renew deadline.
    pub async fn acquire(
        &self,
        shutdown: &CancellationToken,
        on_contact: impl Fn(),
    ) -> Option<Instant> {
        loop {
            let mut pause = self.settings.retry_period;
            let started = Instant::now();
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return None,
                a = tokio::time::timeout(self.settings.renew_deadline, self.try_acquire_or_renew()) => a,
            };
            match attempt {
                Ok(Ok(Attempt::Leader)) => {
                    on_contact();
                    info!(identity = %self.settings.identity, lease = %self.settings.name, "acquired the leader Lease");
                    return Some(started);
                }
                Ok(Ok(Attempt::Follower { expires_in })) => {
                    on_contact();
                    pause = follower_pause(self.settings.retry_period, expires_in);
                }
                Ok(Err(error)) => {
                    warn!(%error, lease = %self.settings.name, "cannot read or write the leader Lease; retrying")
                }
                Err(_) => {
                    warn!(lease = %self.settings.name, "reading or writing the leader Lease timed out; retrying")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Renews the Lease until it is lost or `stop` is cancelled (then `None`). `acquired` is
    /// when the attempt that acquired the Lease started. Each renewal may take only the time
    /// left before the renew deadline; the moment the deadline passes without a successful
    /// renewal this returns [`Lost::Deadline`], so the caller must stop acting at once.
    pub async fn hold(&self, acquired: Instant, stop: &CancellationToken) -> Option<Lost> {
        let deadline = self.settings.renew_deadline;
        let mut last_renew = acquired;
        loop {
            let Some(left) = renew_budget(last_renew.elapsed(), deadline) else {
                warn!(lease = %self.settings.name, "could not renew the leader Lease within the renew deadline; stopping");
                return Some(Lost::Deadline);
            };
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(self.settings.retry_period.min(left)) => {}
            }
            let Some(left) = renew_budget(last_renew.elapsed(), deadline) else {
                continue;
            };
            let started = Instant::now();
            let attempt = tokio::select! {
                _ = stop.cancelled() => return None,
                a = tokio::time::timeout(left, self.try_acquire_or_renew()) => a,
            };
            match attempt {
                Ok(Ok(Attempt::Leader)) => last_renew = started,
                Ok(Ok(Attempt::Follower { .. })) => {
                    warn!(lease = %self.settings.name, "another replica holds the leader Lease; stopping");
                    return Some(Lost::Taken);
                }
                Ok(Err(error)) => warn!(%error, "renewing the leader Lease failed"),
                Err(_) => warn!(
                    timeout = ?left,
                    "renewing the leader Lease took longer than the time left before the renew deadline"
                ),
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

    fn settings(d: u64, r: u64, p: u64, g: u64) -> LeaseSettings {
        LeaseSettings {
            name: "l".into(),
            namespace: "n".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(d),
            renew_deadline: Duration::from_secs(r),
            retry_period: Duration::from_secs(p),
            graceful_stop: Duration::from_secs(g),
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }

    #[test]
    fn the_defaults_and_the_test_timings_are_valid() {
        assert_eq!(settings(15, 10, 2, 4).check(), Ok(()));
        assert_eq!(settings(6, 3, 1, 2).check(), Ok(()));
    }

    #[test]
    fn the_renew_deadline_plus_the_graceful_stop_must_be_shorter_than_the_lease() {
        // 10 + 4 = 14 < 15 passes; 10 + 5 = 15 and beyond do not.
        for (d, r, g) in [
            (15, 10, 5),
            (15, 10, 6),
            (15, 11, 4),
            (10, 10, 0),
            (10, 11, 0),
        ] {
            let e = settings(d, r, 2, g).check().unwrap_err();
            assert!(e.contains("--renew-deadline-seconds"), "{e}");
            assert!(e.contains("--graceful-stop-seconds"), "{e}");
            assert!(e.contains("--lease-duration-seconds"), "{e}");
            assert!(e.contains(&format!("is {:?}", secs(r + g))), "{e}");
        }
        assert_eq!(settings(15, 10, 2, 4).check(), Ok(()));
        assert_eq!(settings(15, 14, 2, 0).check(), Ok(()));
    }

    #[test]
    fn the_retry_period_must_be_positive_and_shorter_than_the_renew_deadline() {
        let e = settings(15, 10, 10, 4).check().unwrap_err();
        assert!(e.contains("--retry-period-seconds"), "{e}");
        assert!(e.contains("--renew-deadline-seconds"), "{e}");
        let e = settings(15, 10, 11, 4).check().unwrap_err();
        assert!(e.contains("--retry-period-seconds"), "{e}");
        let e = settings(15, 10, 0, 4).check().unwrap_err();
        assert!(
            e.contains("--retry-period-seconds must be at least 1"),
            "{e}"
        );
        assert_eq!(settings(15, 10, 9, 4).check(), Ok(()));
    }

    #[test]
    fn the_lease_duration_must_be_whole_positive_seconds_and_the_identity_set() {
        let e = settings(0, 0, 0, 0).check().unwrap_err();
        assert!(e.contains("--lease-duration-seconds"), "{e}");
        let mut s = settings(15, 10, 2, 4);
        s.lease_duration = ms(15_500);
        assert!(s.check().unwrap_err().contains("whole number of seconds"));
        let mut s = settings(15, 10, 2, 4);
        s.lease_duration = secs(i32::MAX as u64 + 1);
        assert!(s.check().unwrap_err().contains("--lease-duration-seconds"));
        let mut s = settings(15, 10, 2, 4);
        s.identity.clear();
        assert!(s.check().unwrap_err().contains("--identity"));
    }

    #[test]
    fn a_renewal_may_take_only_what_is_left_of_the_renew_deadline() {
        assert_eq!(renew_budget(Duration::ZERO, secs(10)), Some(secs(10)));
        assert_eq!(renew_budget(secs(2), secs(10)), Some(secs(8)));
        assert_eq!(renew_budget(ms(9_999), secs(10)), Some(ms(1)));
        assert_eq!(
            renew_budget(secs(10), secs(10)),
            None,
            "deadline reached: stop"
        );
        assert_eq!(renew_budget(secs(11), secs(10)), None);
        assert_eq!(renew_budget(secs(1000), secs(10)), None);
        // Whatever the elapsed time, the renewal ends by the deadline.
        for elapsed in (0..12_000).step_by(250).map(ms) {
            if let Some(left) = renew_budget(elapsed, secs(10)) {
                assert_eq!(elapsed + left, secs(10));
            } else {
                assert!(elapsed >= secs(10));
            }
        }
    }

    #[test]
    fn decisions_from_the_holder_record() {
        let d = secs(15);
        assert_eq!(decide(Some("me"), "me", Duration::ZERO, d), Decision::Renew);
        // Ours, however long unchanged (e.g. a renewal whose answer was lost): renew.
        assert_eq!(decide(Some("me"), "me", secs(100), d), Decision::Renew);
        assert_eq!(decide(None, "me", Duration::ZERO, d), Decision::Take);
        assert_eq!(
            decide(Some("other"), "me", Duration::ZERO, d),
            Decision::Follow { expires_in: d }
        );
        assert_eq!(
            decide(Some("other"), "me", secs(14), d),
            Decision::Follow {
                expires_in: secs(1)
            }
        );
        assert_eq!(decide(Some("other"), "me", secs(15), d), Decision::Take);
        assert_eq!(decide(Some("other"), "me", secs(16), d), Decision::Take);
        // Identity comparison is exact.
        assert_eq!(
            decide(Some("me-2"), "me", Duration::ZERO, d),
            Decision::Follow { expires_in: d }
        );
    }

    #[test]
    fn a_conflict_re_reads_a_bounded_number_of_times() {
        assert!(after_conflict(0));
        assert!(after_conflict(MAX_CONFLICTS - 1));
        assert!(!after_conflict(MAX_CONFLICTS));
        assert!(!after_conflict(MAX_CONFLICTS + 1));
    }

    #[test]
    fn after_a_conflict_the_re_read_record_decides() {
        // What the conflicting write left decides, exactly as a fresh read would: still ours
        // (someone else touched the object, or our own timed-out renewal landed) renews at the
        // new resourceVersion; a live Lease of someone else makes us follow (a leader steps
        // down); a released one is taken.
        let d = secs(15);
        assert_eq!(decide(Some("me"), "me", Duration::ZERO, d), Decision::Renew);
        assert!(matches!(
            decide(Some("b"), "me", Duration::ZERO, d),
            Decision::Follow { .. }
        ));
        assert_eq!(decide(None, "me", Duration::ZERO, d), Decision::Take);
    }

    #[test]
    fn a_follower_tries_again_just_after_the_lease_expires() {
        assert_eq!(follower_pause(secs(2), secs(15)), secs(2));
        assert_eq!(follower_pause(secs(2), secs(2)), secs(2));
        assert_eq!(follower_pause(secs(2), ms(500)), ms(520));
        assert_eq!(follower_pause(secs(2), Duration::ZERO), ms(20));
    }

    /// The safety argument of the module docs, checked over a grid: a leader whose last
    /// successful renewal started at 0 stops acting by `renew_deadline + graceful_stop`; a
    /// candidate that first saw that record at `seen >= 0` takes over at
    /// `seen + lease_duration` at the earliest. Valid settings never overlap.
    #[test]
    fn valid_settings_never_let_two_leaders_act_at_once() {
        for d in 1..=30 {
            for r in 0..=30 {
                for p in 0..=30 {
                    for g in 0..=10 {
                        let s = settings(d, r, p, g);
                        if s.check().is_err() {
                            continue;
                        }
                        let leader_stopped_by = s.renew_deadline + s.graceful_stop;
                        let earliest_takeover = s.lease_duration; // seen at 0 at the earliest
                        assert!(leader_stopped_by < earliest_takeover, "{s:?}");
                    }
                }
            }
        }
    }
}
