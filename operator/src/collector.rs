//! The lag collector: measures every EventConsumer's consumer-group lag beside the
//! reconciler, at its own pace, and feeds `status.lag` through a narrow channel.
//!
//! * It runs only on the leader (started and stopped with the controller) and is driven by
//!   the controller's EventConsumer cache: what to measure comes from [`Targets`], which the
//!   reconciler fills with each applied EventConsumer's connection properties, group and
//!   topics; entries whose EventConsumer left the cache (deleted, or recreated with another
//!   UID) are pruned every pass, with their metric series.
//! * Every `--lag-interval` it queries each Kafka cluster once per connection identity, with
//!   one long-lived [`LagClient`] per identity (created on first use, dropped when no
//!   EventConsumer uses it any more), at most [`CLUSTERS_IN_FLIGHT`] clusters at a time.
//! * The exact lag goes to the `sluice_operator_consumer_lag{namespace,name}` gauge every
//!   pass. `status.lag` (with `lagObservedTime`) is written only when it changed noticeably
//!   ([`significant`]) and at most every `--lag-status-interval` per EventConsumer
//!   ([`due`]); when Kafka does not answer the last value stays, marked `lagStale`.
//! * It writes `status.lag`, `status.lagObservedTime` and `status.lagStale` by server-side
//!   apply with its own field manager ([`FIELD_MANAGER`]); the reconciler's status apply
//!   leaves these fields out, so neither erases the other's.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::crd::{EventConsumer, StartFrom};
use crate::lag::{
    self, Answer, CLUSTERS_IN_FLIGHT, GROUPS_IN_FLIGHT, LagClient, LagError, LagSettings, Query,
};
use crate::metrics::Metrics;
use crate::reconcile::Guarded;

/// Field manager of the collector's status writes.
pub const FIELD_MANAGER: &str = "sluice-operator-lag";
/// Status writes in flight at once.
const WRITES_IN_FLIGHT: usize = 8;

/// (namespace, name) of an EventConsumer.
pub type Key = (String, String);
/// A connection identity: the digest of its connection properties.
type Identity = [u8; 32];
/// Connection properties (secret values included: never log them).
type Props = Arc<Vec<(String, String)>>;
/// One cluster's answer and the EventConsumers it concerns.
/// A cluster's answer, its EventConsumers, and the client that replaces the cluster's
/// client (it read again the groups whose coordinator moved).
type ClusterAnswer = (
    Identity,
    Result<Answer, LagError>,
    Vec<Key>,
    Option<LagClient>,
);

/// What to measure for one EventConsumer (registered by the reconciler after an apply).
#[derive(Clone, Debug, PartialEq)]
pub struct LagTarget {
    /// The EventConsumer's UID: a recreated EventConsumer is a new target.
    pub uid: String,
    /// Connection properties (secret values included: never log them).
    pub props: Arc<Vec<(String, String)>>,
    pub group: String,
    pub topics: Vec<String>,
    pub start_from: StartFrom,
}

impl LagTarget {
    /// The connection identity: a digest of the connection properties.
    pub fn identity(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for (k, v) in self.props.iter() {
            h.update(k.as_bytes());
            h.update([0]);
            h.update(v.as_bytes());
            h.update([0]);
        }
        h.finalize().into()
    }
}

/// The reconciler → collector channel: the current target of each EventConsumer.
#[derive(Default)]
pub struct Targets(Mutex<HashMap<Key, LagTarget>>);

impl Targets {
    pub fn set(&self, key: Key, target: LagTarget) {
        self.0.lock().expect("not poisoned").insert(key, target);
    }

    pub fn remove(&self, key: &Key) {
        self.0.lock().expect("not poisoned").remove(key);
    }

    pub fn len(&self) -> usize {
        self.0.lock().expect("not poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the targets whose EventConsumer is not in `live` with the same UID; returns
    /// the rest.
    fn prune(&self, live: &HashMap<Key, String>) -> Vec<(Key, LagTarget)> {
        let mut map = self.0.lock().expect("not poisoned");
        map.retain(|k, t| live.get(k) == Some(&t.uid));
        map.iter().map(|(k, t)| (k.clone(), t.clone())).collect()
    }
}

/// What `status.lag` holds, as last written (or read at start).
#[derive(Clone, Debug, PartialEq)]
pub struct Written {
    pub lag: i64,
    pub stale: bool,
    pub at: Instant,
}

/// What the collector knows of one EventConsumer.
#[derive(Clone, Debug, PartialEq)]
pub struct Tracked {
    pub uid: String,
    /// The last successful measurement and when it was made.
    pub last: Option<(i64, Timestamp)>,
    /// The last measurement failed.
    pub stale: bool,
    pub written: Option<Written>,
}

/// A change of lag worth a status write: to or from zero, or by at least 10% (of the
/// smaller of the two values).
pub fn significant(old: i64, new: i64) -> bool {
    if old == new {
        return false;
    }
    if old == 0 || new == 0 {
        return true;
    }
    let (a, b) = (old.unsigned_abs(), new.unsigned_abs());
    a.abs_diff(b).saturating_mul(10) >= a.min(b)
}

/// Whether `status.lag` should be written now: the first measurement at once; afterwards a
/// significant change of the value, or of staleness, once `min_interval` has passed since
/// the last write. Nothing before the first successful measurement. Pure.
pub fn due(t: &Tracked, now: Instant, min_interval: Duration) -> bool {
    let Some((lag, _)) = t.last else {
        return false;
    };
    match &t.written {
        None => true,
        Some(w) => {
            let changed = w.stale != t.stale || significant(w.lag, lag);
            changed && now.saturating_duration_since(w.at) >= min_interval
        }
    }
}

/// The collector task: until `stop`, one pass every lag interval.
pub struct Collector {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub settings: LagSettings,
    pub targets: Arc<Targets>,
    clients: HashMap<[u8; 32], Arc<LagClient>>,
    tracked: HashMap<Key, Tracked>,
    /// Identities whose last query failed as a whole (to warn once per outage).
    failing: HashSet<[u8; 32]>,
    /// Consecutive passes in which an identity's client did not answer in time.
    timeouts: HashMap<[u8; 32], u32>,
}

/// After this many consecutive passes in which a cluster's client let a query time out,
/// the client is replaced by a new one. Seen on the test bed after a rolling restart of a
/// secured three-broker cluster: one long-lived client's committed-offset requests went
/// unanswered for good (every pass for minutes) while new clients were answered at once.
/// Groups left unanswered are now read again through a new client in the same pass
/// ([`lag::query_retrying`]); this covers the rest of a query (metadata, partition offsets).
pub const REPLACE_CLIENT_AFTER: u32 = 2;

/// Whether some group's coordinator moved (a broker restart, a leader change of
/// `__consumer_offsets`) even for the new client that read it again in the same pass
/// ([`lag::query_retrying`]; the coordinator is still moving): librdkafka's client
/// keeps asking the broker it found first for as long as it is used, so the client is
/// replaced at once and the next pass looks the coordinators up afresh. Pure.
pub fn coordinator_moved(answer: &Result<Answer, LagError>) -> bool {
    answer.as_ref().is_ok_and(|a| {
        a.groups
            .values()
            .any(|r| matches!(r, Err(LagError::CoordinatorMoved(_))))
    })
}

/// Whether any part of a cluster's answer is a timeout (the whole query, a topic or a
/// group). Pure.
pub fn timed_out(answer: &Result<Answer, LagError>) -> bool {
    match answer {
        Err(e) => matches!(e, LagError::Timeout(_)),
        Ok(a) => {
            a.topics
                .values()
                .any(|r| matches!(r, Err(LagError::Timeout(_))))
                || a.groups
                    .values()
                    .any(|r| matches!(r, Err(LagError::Timeout(_))))
        }
    }
}

impl Collector {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        settings: LagSettings,
        targets: Arc<Targets>,
    ) -> Collector {
        Collector {
            client,
            metrics,
            settings,
            targets,
            clients: HashMap::new(),
            tracked: HashMap::new(),
            failing: HashSet::new(),
            timeouts: HashMap::new(),
        }
    }

    /// Runs passes until `stop`, then drops the clients (joining their threads).
    pub async fn run(mut self, store: Store<Guarded>, stop: CancellationToken) {
        if !self.settings.enabled() {
            return;
        }
        // No wait for the cache to be complete: the targets come from reconciles, which only
        // run for EventConsumers already in it.
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => break,
            }
            tokio::select! {
                () = self.pass(&store) => {}
                () = stop.cancelled() => break,
            }
        }
        self.close();
    }

    fn close(&mut self) {
        let clients: Vec<_> = self.clients.drain().map(|(_, c)| c).collect();
        self.metrics.lag_clients.set(0);
        // Dropping a client joins its librdkafka threads: off the async workers.
        if !clients.is_empty() {
            tokio::task::spawn_blocking(move || drop(clients));
        }
    }

    /// One pass: prune, query every cluster, update the metrics, write the due statuses.
    pub async fn pass(&mut self, store: &Store<Guarded>) {
        let started = Instant::now();
        let mut live: HashMap<Key, String> = HashMap::new();
        let mut stored_lag: HashMap<Key, (i64, bool)> = HashMap::new();
        for g in store.state() {
            let Ok(ec) = &g.0 else { continue };
            if ec.meta().deletion_timestamp.is_some() {
                continue;
            }
            let key = (ec.namespace().unwrap_or_default(), ec.name_any());
            if let Some(lag) = ec.status.as_ref().and_then(|s| s.lag) {
                let stale = ec.status.as_ref().is_some_and(|s| s.lag_stale);
                stored_lag.insert(key.clone(), (lag, stale));
            }
            live.insert(key, ec.uid().unwrap_or_default());
        }
        let targets = self.targets.prune(&live);
        let wanted: HashSet<&Key> = targets.iter().map(|(k, _)| k).collect();
        let gone: Vec<Key> = self
            .tracked
            .iter()
            .filter(|(k, t)| !wanted.contains(k) || live.get(*k) != Some(&t.uid))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.tracked.remove(&k);
            self.metrics.forget_consumer(&k.0, &k.1);
        }

        // Group by connection identity.
        let mut clusters: BTreeMap<Identity, (Props, Query, Vec<Key>)> = BTreeMap::new();
        let mut by_key: HashMap<Key, LagTarget> = HashMap::new();
        for (key, t) in targets {
            let entry = clusters
                .entry(t.identity())
                .or_insert_with(|| (t.props.clone(), Query::default(), Vec::new()));
            entry.1.topics.extend(t.topics.iter().cloned());
            entry.1.groups.insert(t.group.clone());
            entry.2.push(key.clone());
            let tracked = self.tracked.entry(key.clone()).or_insert_with(|| Tracked {
                uid: t.uid.clone(),
                last: None,
                stale: false,
                // What the status already says (a previous leader wrote it): not rewritten
                // before the minimum interval unless it changes.
                written: stored_lag.get(&key).map(|&(lag, stale)| Written {
                    lag,
                    stale,
                    at: Instant::now(),
                }),
            });
            tracked.uid = t.uid.clone();
            by_key.insert(key, t);
        }
        self.clients.retain(|id, _| clusters.contains_key(id));
        self.timeouts.retain(|id, _| clusters.contains_key(id));
        let mut work = Vec::new();
        for (id, (props, query, members)) in clusters {
            let own_group = query
                .groups
                .first()
                .map_or("sluice-operator-lag", String::as_str)
                .to_owned();
            let client = match self.clients.get(&id) {
                Some(c) => Ok(c.clone()),
                None => match LagClient::new(&props, &own_group) {
                    Ok(c) => {
                        let c = Arc::new(c);
                        self.clients.insert(id, c.clone());
                        Ok(c)
                    }
                    Err(e) => Err(e),
                },
            };
            work.push((id, client, props, own_group, query, members));
        }
        self.metrics.lag_clients.set(self.clients.len() as i64);

        let budget = self.settings.budget;
        let answers: Vec<ClusterAnswer> = stream::iter(work)
            .map(
                |(id, client, props, own_group, query, members)| async move {
                    let (answer, new_client) = match client {
                        Err(e) => (Err(e), None),
                        Ok(client) => {
                            let task = tokio::task::spawn_blocking(move || {
                                lag::query_retrying(
                                    &client,
                                    &props,
                                    &own_group,
                                    &query,
                                    budget,
                                    GROUPS_IN_FLIGHT,
                                )
                            });
                            match tokio::time::timeout(budget + Duration::from_secs(2), task).await
                            {
                                Ok(Ok(r)) => (r.answer, r.new_client),
                                Ok(Err(join)) => (Err(LagError::Task(join.to_string())), None),
                                Err(_) => (Err(LagError::Timeout(budget)), None),
                            }
                        }
                    };
                    (id, answer, members, new_client)
                },
            )
            .buffer_unordered(CLUSTERS_IN_FLIGHT)
            .collect()
            .await;

        let now_ts = Timestamp::now();
        let mut replaced = Vec::new();
        for (id, answer, members, new_client) in answers {
            if coordinator_moved(&answer) {
                warn!(
                    consumers = members.len(),
                    "a consumer group's coordinator moved and a new client could not read it yet: replacing this Kafka cluster's lag client, so that the next pass looks the coordinators up again"
                );
                self.timeouts.remove(&id);
                replaced.extend(self.clients.remove(&id));
                replaced.extend(new_client.map(Arc::new));
            } else if let Some(fresh) = new_client {
                info!(
                    consumers = members.len(),
                    "some consumer groups' committed offsets could not be read (their coordinator moved, or no answer in time): read them again through a new lag client, which replaces this Kafka cluster's client"
                );
                self.timeouts.remove(&id);
                replaced.extend(self.clients.insert(id, Arc::new(fresh)));
            } else if timed_out(&answer) {
                let n = self.timeouts.entry(id).or_default();
                *n += 1;
                if *n >= REPLACE_CLIENT_AFTER {
                    warn!(
                        consumers = members.len(),
                        passes = *n,
                        "the lag client of this Kafka cluster let {REPLACE_CLIENT_AFTER} passes in a row time out: replacing it with a new client"
                    );
                    self.timeouts.remove(&id);
                    replaced.extend(self.clients.remove(&id));
                }
            } else {
                self.timeouts.remove(&id);
            }
            match &answer {
                Ok(_) => {
                    if self.failing.remove(&id) {
                        info!(
                            consumers = members.len(),
                            "Kafka answers the lag queries again"
                        );
                    }
                }
                Err(e) => {
                    if self.failing.insert(id) {
                        warn!(consumers = members.len(), reason = e.reason(), error = %e,
                            "cannot measure the lag of the EventConsumers on this Kafka cluster; their status.lag is kept and marked stale until it answers");
                    }
                }
            }
            for key in members {
                let Some(t) = by_key.get(&key) else { continue };
                let result = answer
                    .as_ref()
                    .map_err(Clone::clone)
                    .and_then(|a| lag::group_lag(a, &t.group, &t.topics, t.start_from));
                let Some(tracked) = self.tracked.get_mut(&key) else {
                    continue;
                };
                match result {
                    Ok(l) => {
                        self.metrics.observe_lag(None);
                        if tracked.stale && answer.is_ok() {
                            debug!(namespace = %key.0, name = %key.1, lag = l, "lag is known again");
                        }
                        tracked.last = Some((l, now_ts));
                        tracked.stale = false;
                        self.metrics
                            .set_consumer_lag(&key.0, &key.1, Some(l), false);
                    }
                    Err(e) => {
                        self.metrics.observe_lag(Some(e.reason()));
                        if !tracked.stale && answer.is_ok() {
                            warn!(namespace = %key.0, name = %key.1, group = %t.group, reason = e.reason(), error = %e,
                                "cannot measure the consumer-group lag; status.lag is kept and marked stale");
                        }
                        tracked.stale = true;
                        self.metrics.set_consumer_lag(
                            &key.0,
                            &key.1,
                            tracked.last.map(|l| l.0),
                            true,
                        );
                    }
                }
            }
        }

        self.metrics.lag_clients.set(self.clients.len() as i64);
        if !replaced.is_empty() {
            // Dropping a client joins its librdkafka threads: off the async workers.
            tokio::task::spawn_blocking(move || drop(replaced));
        }

        // Status writes.
        let now = Instant::now();
        let min = self.settings.status_interval;
        let due_keys: Vec<(Key, i64, Timestamp, bool)> = self
            .tracked
            .iter()
            .filter(|(_, t)| due(t, now, min))
            .filter_map(|(k, t)| t.last.map(|(l, at)| (k.clone(), l, at, t.stale)))
            .collect();
        let client = self.client.clone();
        let due_count = due_keys.len();
        type Outcome = Result<(Key, i64, bool), (Key, kube::Error)>;
        let results: Vec<Outcome> = stream::iter(due_keys)
            .map(|(key, l, at, stale)| {
                let client = client.clone();
                async move {
                    match write_lag(&client, &key, l, at, stale).await {
                        Ok(()) => Ok((key, l, stale)),
                        Err(e) => Err((key, e)),
                    }
                }
            })
            .buffer_unordered(WRITES_IN_FLIGHT)
            .collect()
            .await;
        let (written, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
        let written: Vec<(Key, i64, bool)> = written.into_iter().flatten().collect();
        if let Some(Err((key, e))) = failed.first() {
            // Once per pass, not per EventConsumer: a refused write usually refuses them all.
            warn!(failed = failed.len(), due = due_count, namespace = %key.0, name = %key.1, error = %e,
                "writing status.lag failed; retried next pass");
        }
        self.metrics.lag_status_writes.inc_by(written.len() as u64);
        for (key, l, stale) in written {
            if let Some(t) = self.tracked.get_mut(&key) {
                t.written = Some(Written {
                    lag: l,
                    stale,
                    at: now,
                });
            }
        }
        debug!(elapsed = ?started.elapsed(), consumers = self.tracked.len(), clients = self.clients.len(), "lag pass done");
    }
}

async fn write_lag(
    client: &Client,
    key: &Key,
    lag: i64,
    observed: Timestamp,
    stale: bool,
) -> Result<(), kube::Error> {
    let api: Api<EventConsumer> = Api::namespaced(client.clone(), &key.0);
    let mut status = json!({"lag": lag, "lagObservedTime": Time(observed)});
    if stale {
        status["lagStale"] = json!(true);
    }
    let body = json!({
        "apiVersion": EventConsumer::api_version(&()),
        "kind": EventConsumer::kind(&()),
        "status": status,
    });
    api.patch_status(
        &key.1,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_anywhere_in_an_answer_counts_towards_replacing_the_client() {
        let t = || LagError::Timeout(Duration::from_secs(10));
        let kafka = || LagError::Kafka {
            what: "reading the group's committed offsets",
            error: "coordinator not available".into(),
        };
        assert!(timed_out(&Err(t())));
        assert!(
            !timed_out(&Err(kafka())),
            "an answer with an error is an answer"
        );
        assert!(!timed_out(&Ok(Answer::default())));
        let mut a = Answer::default();
        a.topics.insert("t".into(), Ok(Vec::new()));
        a.groups.insert("g".into(), Ok(Default::default()));
        assert!(!timed_out(&Ok(a.clone())));
        let mut group_timed_out = a.clone();
        group_timed_out.groups.insert("h".into(), Err(t()));
        assert!(timed_out(&Ok(group_timed_out)));
        let mut topic_timed_out = a.clone();
        topic_timed_out.topics.insert("u".into(), Err(t()));
        assert!(timed_out(&Ok(topic_timed_out)));
        let mut group_failed = a;
        group_failed.groups.insert("h".into(), Err(kafka()));
        assert!(!timed_out(&Ok(group_failed)));
    }

    #[test]
    fn a_moved_coordinator_anywhere_in_the_groups_replaces_the_client_at_once() {
        let moved = || LagError::CoordinatorMoved("Broker: Not coordinator".into());
        let mut a = Answer::default();
        a.topics.insert("t".into(), Ok(Vec::new()));
        a.groups.insert("g".into(), Ok(Default::default()));
        assert!(!coordinator_moved(&Ok(a.clone())));
        assert!(!coordinator_moved(&Err(LagError::Timeout(
            Duration::from_secs(10)
        ))));
        let mut other = a.clone();
        other.groups.insert(
            "h".into(),
            Err(LagError::Kafka {
                what: "reading the group's committed offsets",
                error: "Broker: Group authorization failed".into(),
            }),
        );
        assert!(!coordinator_moved(&Ok(other.clone())), "another error");
        other.groups.insert("i".into(), Err(moved()));
        assert!(coordinator_moved(&Ok(other)));
        assert!(!timed_out(&Ok(a.clone())), "{:?}", moved());
    }

    #[test]
    fn significant_changes_are_zero_crossings_and_ten_percent() {
        assert!(!significant(0, 0));
        assert!(!significant(500, 500));
        assert!(significant(0, 1));
        assert!(significant(1, 0));
        assert!(significant(100, 110));
        assert!(significant(110, 100), "10% of the smaller value");
        assert!(!significant(100, 109));
        assert!(!significant(1000, 1050));
        assert!(significant(1000, 2000));
        assert!(significant(i64::MAX, 1));
        assert!(!significant(i64::MAX, i64::MAX - 1));
    }

    fn tracked(last: Option<i64>, stale: bool, written: Option<(i64, bool, u64)>) -> Tracked {
        let base = Instant::now();
        Tracked {
            uid: "u".into(),
            last: last.map(|l| (l, Timestamp::UNIX_EPOCH)),
            stale,
            written: written.map(|(lag, stale, secs_ago)| Written {
                lag,
                stale,
                at: base - Duration::from_secs(secs_ago),
            }),
        }
    }

    #[test]
    fn status_writes_are_due_on_first_value_then_on_change_after_the_interval() {
        let now = Instant::now();
        let min = Duration::from_secs(180);
        // Nothing measured yet: nothing to write.
        assert!(!due(&tracked(None, true, None), now, min));
        // The first value at once.
        assert!(due(&tracked(Some(5), false, None), now, min));
        // Unchanged: never.
        assert!(!due(
            &tracked(Some(5), false, Some((5, false, 3600))),
            now,
            min
        ));
        // Changed, but written recently: later.
        assert!(!due(
            &tracked(Some(500), false, Some((5, false, 10))),
            now,
            min
        ));
        assert!(due(
            &tracked(Some(500), false, Some((5, false, 200))),
            now,
            min
        ));
        // A small change: not worth a write even after the interval.
        assert!(!due(
            &tracked(Some(1040), false, Some((1000, false, 3600))),
            now,
            min
        ));
        // Stale now: marked once the interval passed; and back.
        assert!(!due(
            &tracked(Some(5), true, Some((5, false, 10))),
            now,
            min
        ));
        assert!(due(
            &tracked(Some(5), true, Some((5, false, 200))),
            now,
            min
        ));
        assert!(due(
            &tracked(Some(5), false, Some((5, true, 200))),
            now,
            min
        ));
    }

    #[test]
    fn targets_are_pruned_by_presence_and_uid_and_identities_follow_the_properties() {
        let t = |uid: &str, server: &str| LagTarget {
            uid: uid.into(),
            props: Arc::new(vec![("bootstrap.servers".into(), server.into())]),
            group: "g".into(),
            topics: vec!["a".into()],
            start_from: StartFrom::Earliest,
        };
        let targets = Targets::default();
        let key = |n: &str| ("ns".to_owned(), n.to_owned());
        targets.set(key("a"), t("1", "k:9092"));
        targets.set(key("b"), t("2", "k:9092"));
        targets.set(key("c"), t("3", "other:9092"));
        let live: HashMap<Key, String> = [
            (key("a"), "1".to_owned()),
            // b was deleted and recreated: another UID.
            (key("b"), "2b".to_owned()),
        ]
        .into();
        let left = targets.prune(&live);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].0, key("a"));
        assert_eq!(targets.len(), 1);
        assert_eq!(t("1", "k:9092").identity(), t("9", "k:9092").identity());
        assert_ne!(t("1", "k:9092").identity(), t("1", "k:9093").identity());
    }
}
