//! The reconciler: fetch → validate → build (pure) → apply (server-side apply) → status.
//!
//! Permanent errors (a spec only the operator can tell is wrong, a missing Secret or key) set
//! `Degraded` with their reason, publish a Warning event and wait for a change of the
//! EventConsumer or of a Secret it references — never a hot loop. Transient errors publish a
//! Warning event and are retried with per-object exponential backoff.
//!
//! The reconcile never talks to Kafka: after a successful apply it hands the EventConsumer's
//! connection properties, group and topics to the lag collector ([`crate::collector`]), which
//! measures lag beside it, at its own pace, and owns the `status.lag*` fields.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Pod, Secret};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, instrument, warn};

use crate::autoscaler;
use crate::build::SecretData;
use crate::build::{
    self, CONFIG_HASH_ANNOTATION, FIELD_MANAGER, Input, MANAGED_BY_LABEL, MANAGED_BY_VALUE,
    SidecarDefaults, config_map_name,
};
use crate::collector::{Collector, LagTarget, Targets};
use crate::crd::{EventConsumer, EventConsumerStatus};
use crate::error::Error;
use crate::lag::{self, LagSettings};
use crate::metrics::Metrics;
use crate::pacing::{
    self, DEFAULT_MAX_SIDECAR_ROLLOUTS, INPUT_HASH_ANNOTATION, Pacer, Pending, Plan,
    ROLLOUT_CAUSE_ANNOTATION, Seen, TEMPLATE_HASH_ANNOTATION, Turn,
};
use crate::secret_index::SecretIndex;
use crate::secrets::{self, SecretCache, SecretReader};
use crate::status::{self, Observed, Outcome};

/// The watched primary object: an EventConsumer, or the error that kept it from parsing.
pub type Guarded = DeserializeGuard<EventConsumer>;

/// Safety-net resync of a healthy EventConsumer (watches deliver every real change).
pub const RESYNC: Duration = Duration::from_secs(30 * 60);
/// Bounds of the per-object retry backoff after transient errors.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Safety-net resync of an EventConsumer waiting for a rollout turn (it is woken when one
/// frees up).
pub const WAITING_RESYNC: Duration = Duration::from_secs(60);

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub defaults: SidecarDefaults,
    pub metrics: Arc<Metrics>,
    recorder: Recorder,
    /// Consecutive transient failures per object, for the backoff.
    failures: Mutex<HashMap<(String, String), u32>>,
    /// How lag is measured and `status.lag` refreshed (by the collector).
    pub lag: LagSettings,
    /// What the lag collector measures, registered here after each apply.
    pub targets: Arc<Targets>,
    /// The controller's caches of owned objects (set while the controller runs).
    caches: Mutex<Option<Caches>>,
    /// What this replica last applied, per owned object: (desired hash, the object's
    /// generation — resourceVersion for a ConfigMap — right after the apply).
    applied: Mutex<HashMap<AppliedKey, (String, Option<String>)>>,
    /// (namespace, Secret) → the EventConsumers referencing it, kept from the watch.
    pub secret_index: Arc<SecretIndex>,
    /// The Secrets read, per resourceVersion (read again only when they change).
    pub secret_cache: SecretCache,
    /// Autoscalers already warned about (aimed at a Deployment instead of its EventConsumer).
    autoscalers_warned: autoscaler::Warned,
    /// Turns of operator-side rollouts (`--max-sidecar-rollouts`).
    pub pacer: Pacer,
    /// Wakes EventConsumers waiting for a turn (set while the controller runs).
    wake: Mutex<Option<Waker>>,
    /// Events to publish beside the reconciles (set while the controller runs), so a
    /// reconcile does not hold its slot for them.
    events: Mutex<Option<UnboundedSender<(Event, ObjectReference)>>>,
    /// Reads the `/readyz` of sidecars that stay not ready, for the status's reason.
    pub readyz: status::pods::readyz::Prober,
    /// This replica's last status write per EventConsumer, until the cache shows it.
    written: status::written::Written,
}

/// Events published at the same time by the controller's publisher.
const EVENTS_IN_FLIGHT: usize = 8;

/// Sends EventConsumers to reconcile (those whose rollout turn has come).
type Waker = futures::channel::mpsc::UnboundedSender<ObjectRef<Guarded>>;

/// (kind, namespace, name) of an owned object.
type AppliedKey = (&'static str, String, String);

/// Watch caches of the owned objects, read instead of GETs.
#[derive(Clone)]
pub struct Caches {
    pub deployments: Store<Deployment>,
    pub config_maps: Store<PartialObjectMeta<ConfigMap>>,
    pub pdbs: Store<PartialObjectMeta<PodDisruptionBudget>>,
    /// The pods of EventConsumers, trimmed to what `status::pods` reads.
    pub pods: Store<Pod>,
    /// Secrets' metadata: says whether a cached Secret read is current.
    pub secrets: Store<PartialObjectMeta<Secret>>,
    /// The drain-token Secrets (managed-by label), trimmed to the token and the metadata the
    /// reconcile reads: a new leader takes the tokens from here instead of a GET each.
    pub drain_tokens: Store<Secret>,
    /// HorizontalPodAutoscalers (to warn about those aimed at an owned Deployment).
    pub autoscalers: Store<HorizontalPodAutoscaler>,
}

/// Annotation on every owned object: the digest of the desired object the operator applied.
pub const DESIRED_HASH_ANNOTATION: &str = "sluice.dev/desired-hash";

/// Sets [`DESIRED_HASH_ANNOTATION`] on a desired object (a digest of the object without
/// it) and returns the digest.
pub fn stamp<K: Resource + serde::Serialize>(obj: &mut K) -> String {
    use sha2::Digest;
    obj.annotations_mut().remove(DESIRED_HASH_ANNOTATION);
    let bytes = serde_json::to_vec(obj).expect("an owned object always serializes");
    let hash: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    obj.annotations_mut()
        .insert(DESIRED_HASH_ANNOTATION.into(), hash.clone());
    hash
}

/// Whether an apply can be skipped: the cached object carries the desired hash and, if this
/// replica applied it, its generation (or resourceVersion) is still the one the apply
/// returned (nobody changed it since). Pure.
pub fn can_skip(
    cached_hash: Option<&str>,
    cached_version: Option<&str>,
    desired_hash: &str,
    recorded: Option<(&str, Option<&str>)>,
) -> bool {
    cached_hash == Some(desired_hash)
        && match recorded {
            None => true,
            Some((hash, version)) => hash == desired_hash && version == cached_version,
        }
}

impl Context {
    pub fn new(
        client: Client,
        defaults: SidecarDefaults,
        metrics: Arc<Metrics>,
        identity: &str,
    ) -> Context {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(identity.to_owned()),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            defaults,
            metrics,
            failures: Mutex::new(HashMap::new()),
            lag: LagSettings::default(),
            targets: Arc::new(Targets::default()),
            caches: Mutex::new(None),
            applied: Mutex::new(HashMap::new()),
            secret_index: Arc::new(SecretIndex::default()),
            secret_cache: SecretCache::default(),
            autoscalers_warned: autoscaler::Warned::default(),
            pacer: Pacer::new(DEFAULT_MAX_SIDECAR_ROLLOUTS),
            wake: Mutex::new(None),
            events: Mutex::new(None),
            readyz: Default::default(),
            written: Default::default(),
        }
    }

    /// Replaces the default `--max-sidecar-rollouts`.
    pub fn with_max_sidecar_rollouts(mut self, max: u32) -> Context {
        self.pacer = Pacer::new(max);
        self
    }

    /// The cached Deployments as the pacer sees them.
    fn seen_deployments(&self) -> Vec<Seen> {
        self.caches()
            .map(|c| c.deployments.state().iter().map(|d| Seen::of(d)).collect())
            .unwrap_or_default()
    }

    /// Reconciles the EventConsumers whose turn has come, and updates the rollout gauges.
    fn wake_waiters(&self) {
        if !self.pacer.has_waiters() && self.metrics.sidecar_rollouts.get() == 0 {
            self.metrics.sidecar_rollouts_waiting.set(0);
            return;
        }
        let (wake, held, waiting) = self.pacer.wake(&self.seen_deployments());
        self.metrics.sidecar_rollouts.set(held as i64);
        self.metrics.sidecar_rollouts_waiting.set(waiting as i64);
        if let Some(tx) = self.wake.lock().expect("not poisoned").as_ref() {
            for (ns, name) in wake {
                let _ = tx.unbounded_send(ObjectRef::new(&name).within(&ns));
            }
        }
    }

    /// Replaces the default lag settings.
    pub fn with_lag(mut self, lag: LagSettings) -> Context {
        self.lag = lag;
        self
    }

    fn caches(&self) -> Option<Caches> {
        self.caches.lock().expect("not poisoned").clone()
    }

    fn unchanged(
        &self,
        key: &AppliedKey,
        desired: &str,
        cached: Option<(&kube::core::ObjectMeta, Option<String>)>,
    ) -> bool {
        let Some((meta, version)) = cached else {
            return false;
        };
        let hash = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(DESIRED_HASH_ANNOTATION));
        let applied = self.applied.lock().expect("not poisoned");
        let recorded = applied.get(key).map(|(h, v)| (h.as_str(), v.as_deref()));
        can_skip(
            hash.map(String::as_str),
            version.as_deref(),
            desired,
            recorded,
        )
    }

    fn record(&self, key: AppliedKey, hash: &str, version: Option<String>) {
        self.applied
            .lock()
            .expect("not poisoned")
            .insert(key, (hash.to_owned(), version));
    }

    /// Forgets an EventConsumer's per-object records (it was deleted).
    fn forget(&self, ns: &str, name: &str) {
        let cm = config_map_name(name);
        self.applied
            .lock()
            .expect("not poisoned")
            .retain(|(_, n, o), _| !(n == ns && (o == name || *o == cm)));
        self.failures
            .lock()
            .expect("not poisoned")
            .remove(&(ns.to_owned(), name.to_owned()));
        self.targets.remove(&(ns.to_owned(), name.to_owned()));
        self.pacer.forget(&(ns.to_owned(), name.to_owned()));
        self.written.forget(ns, name);
        self.secret_cache
            .remove(ns, &crate::build::drain_secret_name(name));
    }

    /// Registers (or, when lag is off or the credentials are unusable, drops) what the lag
    /// collector measures for this EventConsumer.
    fn register_lag(
        &self,
        ec: &EventConsumer,
        secrets: &std::collections::BTreeMap<String, SecretData>,
    ) {
        let key = (ec.namespace().unwrap_or_default(), ec.name_any());
        if !self.lag.enabled() {
            return;
        }
        match lag::connection_properties(&ec.spec.kafka, secrets) {
            Ok(props) => self.targets.set(
                key.clone(),
                LagTarget {
                    uid: ec.uid().unwrap_or_default(),
                    props: Arc::new(props),
                    group: ec.spec.kafka.effective_group_id(&key.0, &key.1),
                    topics: ec.spec.kafka.topics.clone(),
                    start_from: ec.spec.kafka.start_from,
                },
            ),
            Err(e) => {
                warn!(reason = e.reason(), error = %e, "the lag of this EventConsumer cannot be measured");
                self.targets.remove(&key);
            }
        }
    }

    async fn publish(
        &self,
        reference: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let mut note = note;
        if note.len() > 1000 {
            let mut cut = 1000;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        // While the controller runs its publisher sends it; otherwise (or if it stopped) here.
        let event = match self.events.lock().expect("not poisoned").as_ref() {
            Some(tx) => match tx.unbounded_send((event, reference.clone())) {
                Ok(()) => return,
                Err(e) => e.into_inner().0,
            },
            None => event,
        };
        publish_event(&self.recorder, event, reference.clone()).await;
    }

    /// Publishes what [`Context::publish`] queues, up to [`EVENTS_IN_FLIGHT`] at a time, until
    /// the queue is dropped.
    fn event_publisher(&self) -> impl Future<Output = ()> + Send + 'static {
        let (tx, rx) = futures::channel::mpsc::unbounded::<(Event, ObjectReference)>();
        *self.events.lock().expect("not poisoned") = Some(tx);
        let recorder = self.recorder.clone();
        rx.for_each_concurrent(EVENTS_IN_FLIGHT, move |(event, reference)| {
            let recorder = recorder.clone();
            async move { publish_event(&recorder, event, reference).await }
        })
    }

    fn key(obj: &Guarded) -> (String, String) {
        (obj.namespace().unwrap_or_default(), obj.name_any())
    }
}

async fn publish_event(recorder: &Recorder, event: Event, reference: ObjectReference) {
    if let Err(error) = recorder.publish(&event, &reference).await {
        warn!(%error, reason = %event.reason, "publishing an event failed");
    }
}

/// Exponential backoff for the `n`-th consecutive failure (1-based).
pub fn backoff(n: u32) -> Duration {
    let exp = n.saturating_sub(1).min(16);
    BACKOFF_MIN.saturating_mul(1u32 << exp).min(BACKOFF_MAX)
}

/// Reconciles one EventConsumer.
#[instrument(skip_all, fields(namespace = obj.namespace().unwrap_or_default(), name = obj.name_any()))]
pub async fn reconcile(obj: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = match &obj.0 {
        Ok(ec) => reconcile_valid(ec, &ctx).await,
        Err(invalid) => Err(Error::InvalidObject(invalid.error.clone())),
    };
    let result = match result {
        Ok(action) => {
            ctx.failures
                .lock()
                .expect("not poisoned")
                .remove(&Context::key(&obj));
            Ok(action)
        }
        Err(e) if e.is_permanent() => {
            ctx.failures
                .lock()
                .expect("not poisoned")
                .remove(&Context::key(&obj));
            ctx.metrics.observe(started.elapsed(), Some(e.reason()));
            info!(reason = e.reason(), error = %e, "the EventConsumer cannot be realised; waiting for a change");
            if let Err(status_error) = report_blocked(&obj, &e, &ctx).await {
                warn!(error = %status_error, "recording the Degraded status failed; retrying");
                return Err(status_error);
            }
            return Ok(Action::await_change());
        }
        Err(e) => {
            ctx.metrics.observe(started.elapsed(), Some(e.reason()));
            warn!(reason = e.reason(), error = %e, "reconcile failed; retrying with backoff");
            let reference = obj.object_ref(&());
            ctx.publish(
                &reference,
                EventType::Warning,
                e.reason(),
                "Reconcile",
                e.to_string(),
            )
            .await;
            return Err(e);
        }
    };
    ctx.metrics.observe(started.elapsed(), None);
    result
}

/// After a transient error: retry this object with exponential backoff.
pub fn error_policy(obj: Arc<Guarded>, _error: &Error, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures.lock().expect("not poisoned");
    let n = failures.entry(Context::key(&obj)).or_insert(0);
    *n = n.saturating_add(1);
    Action::requeue(backoff(*n))
}

async fn reconcile_valid(ec: &EventConsumer, ctx: &Context) -> Result<Action, Error> {
    let ns = ec.namespace().unwrap_or_default();
    let name = ec.name_any();
    let uid = ec.uid().unwrap_or_default();
    if ec.meta().deletion_timestamp.is_some() {
        // Garbage collection removes the children; nothing to do but forget it.
        ctx.forget(&ns, &name);
        return Ok(Action::await_change());
    }
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let caches = ctx.caches();
    let reader = SecretReader {
        api: &secrets_api,
        namespace: &ns,
        meta: caches.as_ref().map(|c| &c.secrets),
        owned: caches.as_ref().map(|c| &c.drain_tokens),
        cache: &ctx.secret_cache,
    };

    // Fetch the referenced Secrets, then validate (pure; the token plays no part in it)
    // before the drain-token Secret is created, so an invalid spec writes nothing but its
    // status.
    let secret_data = secrets::fetch_referenced(&reader, &ns, &ec.spec).await?;
    let mut input = Input {
        name: &name,
        namespace: &ns,
        uid: &uid,
        spec: &ec.spec,
        drain_token: "",
        secrets: &secret_data,
        defaults: &ctx.defaults,
    };
    build::validate(&input)?;
    let token = secrets::ensure_drain_token(&reader, &ns, &name, &uid).await?;

    // Build (pure).
    input.drain_token = &token;
    let desired = build::build(&input)?;

    // Pacing: a template change the user did not make waits for a turn (see
    // `crate::pacing`); while it waits, neither the ConfigMap nor the Deployment is applied,
    // so the running pods keep the configuration that matches their sidecar.
    let mut desired = desired;
    let cached_deployment = caches
        .as_ref()
        .and_then(|c| c.deployments.get(&ObjectRef::new(&name).within(&ns)));
    let key = (ns.clone(), name.clone());
    let template_hash = pacing::template_hash(
        &desired
            .deployment
            .spec
            .as_ref()
            .expect("a built Deployment has a spec")
            .template,
    );
    let spec_applied =
        ec.status.as_ref().and_then(|s| s.observed_generation) == ec.meta().generation;
    let plan = pacing::plan(
        cached_deployment
            .as_deref()
            .map(pacing::Running::of)
            .as_ref(),
        &template_hash,
        &pacing::input_hash(&ec.spec, &secret_data),
        spec_applied,
    );
    let pending = match plan {
        Plan::Roll {
            needs_turn: true, ..
        } => match ctx
            .pacer
            .acquire(&key, &template_hash, &ctx.seen_deployments())
        {
            Turn::Granted => None,
            Turn::Wait { rolling } => Some(Pending {
                image: desired
                    .deployment
                    .spec
                    .as_ref()
                    .and_then(|s| pacing::sidecar_image(&s.template)),
                rolling,
                max: ctx.pacer.max(),
            }),
        },
        _ => {
            ctx.pacer.not_waiting(&key);
            None
        }
    };
    let annotations = desired.deployment.annotations_mut();
    annotations.insert(TEMPLATE_HASH_ANNOTATION.into(), template_hash);
    annotations.insert(
        INPUT_HASH_ANNOTATION.into(),
        pacing::input_hash(&ec.spec, &secret_data),
    );
    annotations.insert(
        ROLLOUT_CAUSE_ANNOTATION.into(),
        plan.cause().as_str().into(),
    );

    // Apply: the ConfigMap before the Deployment whose pods mount it. Each apply is skipped
    // when the cached object already carries the desired state (same desired-hash
    // annotation, and not changed by anyone since this replica applied it).
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let cm_name = config_map_name(&name);
    let cm_hash = stamp(&mut desired.config_map);
    let dep_hash = stamp(&mut desired.deployment);
    let pdb_hash = stamp(&mut desired.pdb);
    let previous_hash = cached_deployment.as_ref().and_then(|d| {
        d.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(CONFIG_HASH_ANNOTATION).cloned())
    });
    // The ConfigMap before the Deployment whose pods mount it; the PodDisruptionBudget,
    // which neither needs, at the same time (one round trip less per reconcile).
    let config_and_deployment = async {
        let cached_cm = caches
            .as_ref()
            .and_then(|c| c.config_maps.get(&ObjectRef::new(&cm_name).within(&ns)));
        let cm_key = ("ConfigMap", ns.clone(), cm_name.clone());
        if pending.is_some()
            || ctx.unchanged(
                &cm_key,
                &cm_hash,
                cached_cm
                    .as_deref()
                    .map(|m| (&m.metadata, m.metadata.resource_version.clone())),
            )
        {
            ctx.metrics.applies_skipped.inc();
        } else {
            let applied = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
                .patch(&cm_name, &pp, &Patch::Apply(&desired.config_map))
                .await
                .map_err(|source| Error::ApplyConfigMap {
                    namespace: ns.clone(),
                    name: cm_name.clone(),
                    source,
                })?;
            ctx.record(cm_key, &cm_hash, applied.metadata.resource_version.clone());
        }
        let dep_key = ("Deployment", ns.clone(), name.clone());
        let deployment: Deployment = match cached_deployment {
            Some(d) if pending.is_some() => {
                // The template waits; a scale (by hand or by an autoscaler) does not.
                if d.spec.as_ref().and_then(|s| s.replicas) != Some(ec.spec.replicas) {
                    Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
                        .patch(
                            &name,
                            &PatchParams {
                                field_manager: Some(FIELD_MANAGER.into()),
                                ..Default::default()
                            },
                            &Patch::Merge(json!({"spec": {"replicas": ec.spec.replicas}})),
                        )
                        .await
                        .map_err(|source| Error::ApplyDeployment {
                            namespace: ns.clone(),
                            name: name.clone(),
                            source,
                        })?
                } else {
                    ctx.metrics.applies_skipped.inc();
                    (*d).clone()
                }
            }
            Some(d)
                if ctx.unchanged(
                    &dep_key,
                    &dep_hash,
                    Some((&d.metadata, d.metadata.generation.map(|g| g.to_string()))),
                ) =>
            {
                ctx.metrics.applies_skipped.inc();
                (*d).clone()
            }
            _ => {
                let applied = Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
                    .patch(&name, &pp, &Patch::Apply(&desired.deployment))
                    .await
                    .map_err(|source| {
                        ctx.pacer.release(&key);
                        Error::ApplyDeployment {
                            namespace: ns.clone(),
                            name: name.clone(),
                            source,
                        }
                    })?;
                ctx.record(
                    dep_key,
                    &dep_hash,
                    applied.metadata.generation.map(|g| g.to_string()),
                );
                applied
            }
        };
        Ok::<_, Error>(deployment)
    };
    let pdb = async {
        let cached_pdb = caches
            .as_ref()
            .and_then(|c| c.pdbs.get(&ObjectRef::new(&name).within(&ns)));
        let pdb_key = ("PodDisruptionBudget", ns.clone(), name.clone());
        if ctx.unchanged(
            &pdb_key,
            &pdb_hash,
            cached_pdb
                .as_deref()
                .map(|m| (&m.metadata, m.metadata.generation.map(|g| g.to_string()))),
        ) {
            ctx.metrics.applies_skipped.inc();
        } else {
            let applied = Api::<PodDisruptionBudget>::namespaced(ctx.client.clone(), &ns)
                .patch(&name, &pp, &Patch::Apply(&desired.pdb))
                .await
                .map_err(|source| Error::ApplyPodDisruptionBudget {
                    namespace: ns.clone(),
                    name: name.clone(),
                    source,
                })?;
            ctx.record(
                pdb_key,
                &pdb_hash,
                applied.metadata.generation.map(|g| g.to_string()),
            );
        }
        Ok::<_, Error>(())
    };
    let (deployment, ()) = futures::try_join!(config_and_deployment, pdb)?;
    debug!(hash = %desired.config_hash, "applied");
    if let Some(previous) = previous_hash.filter(|p| pending.is_none() && *p != desired.config_hash)
    {
        let note = format!(
            "the sidecar configuration or a referenced Secret changed (config hash {} -> {}); replacing the pods one at a time, each draining first",
            short(&previous),
            short(&desired.config_hash)
        );
        info!(from = %previous, to = %desired.config_hash, "configuration changed; rolling the pods");
        ctx.publish(
            &ec.object_ref(&()),
            EventType::Normal,
            "ConfigChanged",
            "Rollout",
            note,
        )
        .await;
    }

    // Lag: measured by the collector, beside the reconcile.
    ctx.register_lag(ec, &secret_data);

    // Status.
    let seen = Observed {
        name: &name,
        generation: ec.meta().generation,
        desired_replicas: ec.spec.replicas,
        deployment: Some(&deployment),
    };
    let recheck = write_status(
        ec,
        &seen,
        &Outcome::Applied {
            tuning: desired.tuning,
        },
        pending.as_ref(),
        ctx,
    )
    .await?;
    ctx.wake_waiters();
    warn_autoscalers(ec, ctx).await;
    if pending.is_some() {
        // Woken when a turn frees up; this is the safety net.
        return Ok(Action::requeue(WAITING_RESYNC));
    }
    Ok(Action::requeue(
        recheck.map_or_else(resync_after, |r| r.min(RESYNC)),
    ))
}

/// A Warning event on the EventConsumer for each autoscaler aimed at its Deployment (once per
/// autoscaler and generation).
async fn warn_autoscalers(ec: &EventConsumer, ctx: &Context) {
    let Some(caches) = ctx.caches() else {
        return;
    };
    let ns = ec.namespace().unwrap_or_default();
    let name = ec.name_any();
    let aimed: Vec<_> = caches
        .autoscalers
        .state()
        .into_iter()
        .filter(|h| {
            h.namespace().as_deref() == Some(ns.as_str())
                && autoscaler::target_deployment(h) == Some(name.as_str())
        })
        .collect();
    for hpa in aimed {
        if ctx.autoscalers_warned.first(&hpa) {
            warn!(autoscaler = %hpa.name_any(), "a HorizontalPodAutoscaler targets the Deployment instead of the EventConsumer");
            ctx.publish(
                &ec.object_ref(&()),
                EventType::Warning,
                autoscaler::REASON,
                "Reconcile",
                autoscaler::message(&hpa.name_any(), &name),
            )
            .await;
        }
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// The resync period with ±10% jitter, so EventConsumers created together spread out.
fn resync_after() -> Duration {
    RESYNC.mul_f64(rand::random_range(0.9..1.1))
}

/// Computes and (if it changed) applies the status, and publishes events for transitions.
/// The `lag*` fields are carried over for the comparison and left out of the write: the
/// lag collector owns them. Returns when to look at the pods again (one is not ready, but
/// not yet for long enough to count).
async fn write_status(
    ec: &EventConsumer,
    seen: &Observed<'_>,
    outcome: &Outcome,
    pending: Option<&Pending>,
    ctx: &Context,
) -> Result<Option<Duration>, Error> {
    let (ns, name, uid) = (
        ec.namespace().unwrap_or_default(),
        ec.name_any(),
        ec.uid().unwrap_or_default(),
    );
    // The cache's status, or this replica's last write while the cache has not shown it.
    let current = ctx.written.current(&ns, &name, &uid, ec.status.as_ref());
    let old = current.as_ref();
    let now = Time(Timestamp::now());
    let mut new = status::compute(old, seen, outcome, &now);
    pacing::sidecar_status(&mut new, seen.deployment, pending);
    new.topics = Some(status::topics_column(&ec.spec.kafka.topics));
    let pods = pod_summary(ctx, seen, now.0).await;
    if let Some(problem) = &pods.problem {
        status::pods::explain(&mut new, old, problem, seen.desired_replicas, &now);
    }
    if old == Some(&new) {
        return Ok(pods.recheck);
    }
    patch_status(ctx, &ns, &name, &new).await?;
    ctx.written
        .record(&ns, &name, &uid, ec.status.as_ref(), &new);
    let reference = ec.object_ref(&());
    for t in status::transitions(old, &new) {
        let (type_, action) = match (t.type_.as_str(), t.status) {
            (status::DEGRADED, true) => (EventType::Warning, "Reconcile"),
            (status::PROGRESSING, true) => (EventType::Normal, "Rollout"),
            _ => (EventType::Normal, "Reconcile"),
        };
        // The condition's reason, except for the end of a degradation ("AsExpected" says
        // nothing as an event).
        let reason = match (t.type_.as_str(), t.status) {
            (status::DEGRADED, false) => "Recovered",
            _ => t.reason.as_str(),
        };
        ctx.publish(&reference, type_, reason, action, t.message.clone())
            .await;
    }
    Ok(pods.recheck)
}

/// What keeps the EventConsumer's pods from working, from the pod cache. Looked at only while
/// the Deployment has fewer ready pods than wanted or pods of an old template (a healthy
/// EventConsumer costs nothing here). Sidecars not ready for long are asked why on their
/// `/readyz` (pod IP, admin port; answers kept a while): no API request.
async fn pod_summary(ctx: &Context, seen: &Observed<'_>, now: Timestamp) -> status::pods::Summary {
    let Some(status) = seen.deployment.and_then(|d| d.status.as_ref()) else {
        return Default::default();
    };
    let settled = status.ready_replicas.unwrap_or(0) >= seen.desired_replicas
        && status.replicas.unwrap_or(0) == status.ready_replicas.unwrap_or(0)
        && status.updated_replicas.unwrap_or(0) == status.replicas.unwrap_or(0);
    let Some(caches) = ctx.caches().filter(|_| !settled) else {
        return Default::default();
    };
    let ns = seen
        .deployment
        .and_then(|d| d.metadata.namespace.as_deref());
    let pods: Vec<Arc<Pod>> = caches
        .pods
        .state()
        .into_iter()
        .filter(|p| p.metadata.namespace.as_deref() == ns)
        .filter(|p| status::pods::owner(p) == Some(seen.name))
        .collect();
    let summary = status::pods::summarize(pods.iter().map(|p| &**p), now, &Default::default());
    if summary.probe.is_empty() {
        return summary;
    }
    let targets: Vec<status::pods::readyz::Target> = pods
        .iter()
        .filter_map(|p| {
            let name = p.metadata.name.as_ref()?;
            let ip = p.status.as_ref()?.pod_ip.as_ref()?;
            summary
                .probe
                .contains(name)
                .then(|| status::pods::readyz::Target {
                    name: name.clone(),
                    ip: ip.clone(),
                })
        })
        .collect();
    let probes = ctx.readyz.read(ns.unwrap_or_default(), &targets).await;
    let mut summary = status::pods::summarize(pods.iter().map(|p| &**p), now, &probes);
    // Looked at again when the answers expire, so a cause that changes (or a read that
    // failed) shows within a minute; such a reconcile reads caches only, and writes the
    // status only if it changed.
    let again = status::pods::readyz::KEEP_FOR;
    summary.recheck = Some(summary.recheck.map_or(again, |r| r.min(again)));
    summary
}

async fn patch_status(
    ctx: &Context,
    ns: &str,
    name: &str,
    status: &EventConsumerStatus,
) -> Result<(), Error> {
    let api: Api<EventConsumer> = Api::namespaced(ctx.client.clone(), ns);
    let status = EventConsumerStatus {
        lag: None,
        lag_observed_time: None,
        lag_stale: false,
        ..status.clone()
    };
    let body = json!({
        "apiVersion": EventConsumer::api_version(&()),
        "kind": EventConsumer::kind(&()),
        "status": status,
    });
    ctx.metrics.status_writes.inc();
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map(|_| ())
    .map_err(|source| Error::PatchStatus {
        namespace: ns.to_owned(),
        name: name.to_owned(),
        source,
    })
}

/// A permanent error: `Degraded` with its reason (the status still mirrors whatever
/// Deployment runs), and a Warning event when it is new.
async fn report_blocked(obj: &Guarded, error: &Error, ctx: &Context) -> Result<(), Error> {
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let outcome = Outcome::Blocked {
        reason: error.reason(),
        message: error.to_string(),
    };
    match &obj.0 {
        Ok(ec) => {
            let deployment = match ctx.caches() {
                Some(c) => c
                    .deployments
                    .get(&ObjectRef::new(&name).within(&ns))
                    .map(|d| (*d).clone()),
                None => Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
                    .get_opt(&name)
                    .await
                    .map_err(|source| Error::GetDeployment {
                        namespace: ns.clone(),
                        name: name.clone(),
                        source,
                    })?,
            };
            let seen = Observed {
                name: &name,
                generation: ec.meta().generation,
                desired_replicas: ec.spec.replicas,
                deployment: deployment.as_ref(),
            };
            // Not measured while the spec cannot be realised.
            ctx.targets
                .remove(&(ec.namespace().unwrap_or_default(), ec.name_any()));
            write_status(ec, &seen, &outcome, None, ctx)
                .await
                .map(|_| ())
        }
        Err(invalid) => {
            // The object does not parse, so neither does its status: write the Degraded
            // condition alone, through an untyped merge patch, and say so once per generation.
            let generation = invalid.metadata.generation;
            let reference = obj.object_ref(&());
            let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
                ctx.client.clone(),
                &ns,
                &kube::discovery::ApiResource::erase::<EventConsumer>(&()),
            );
            let current = api.get_opt(&name).await.ok().flatten();
            let already = current
                .as_ref()
                .and_then(|o| o.data.pointer("/status/conditions"))
                .and_then(|c| c.as_array())
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c["type"] == status::DEGRADED
                            && c["reason"] == "InvalidObject"
                            && c["observedGeneration"].as_i64() == generation
                    })
                });
            if already {
                return Ok(());
            }
            let condition = json!({
                "type": status::DEGRADED, "status": "True", "reason": "InvalidObject",
                "message": error.to_string(), "observedGeneration": generation,
                "lastTransitionTime": Time(Timestamp::now()),
            });
            let patch =
                json!({"status": {"observedGeneration": generation, "conditions": [condition]}});
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .map_err(|source| Error::PatchStatus {
                    namespace: ns.clone(),
                    name: name.clone(),
                    source,
                })?;
            ctx.publish(
                &reference,
                EventType::Warning,
                "InvalidObject",
                "Reconcile",
                error.to_string(),
            )
            .await;
            Ok(())
        }
    }
}

/// Where the controller looks.
#[derive(Clone, Debug, Default)]
pub struct WatchScope {
    /// One namespace, or all when `None`.
    pub namespace: Option<String>,
}

impl WatchScope {
    fn api<K>(&self, client: &Client) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
}

/// The Secret → EventConsumer mapping: the owner of a drain-token Secret, and every
/// EventConsumer in the Secret's namespace that references it (so a rotation rolls its pods),
/// looked up in the index rather than by scanning every EventConsumer.
pub fn secret_to_consumers(
    index: &SecretIndex,
    namespace: &str,
    name: &str,
    owner: Option<&str>,
) -> Vec<ObjectRef<Guarded>> {
    let mut out: Vec<ObjectRef<Guarded>> = index
        .consumers(namespace, name)
        .iter()
        .map(|n| ObjectRef::new(n).within(namespace))
        .collect();
    if let Some(owner) = owner {
        let r = ObjectRef::new(owner).within(namespace);
        if !out.contains(&r) {
            out.push(r);
        }
    }
    out
}

/// A running task, aborted when this is dropped (so nothing it does outlives its owner).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where a watch task hands the objects it saw to the controller while one runs; a follower
/// has no receiver and the objects only update the caches.
struct Tap<K>(Arc<Mutex<Option<UnboundedSender<Arc<K>>>>>);

impl<K> Clone for Tap<K> {
    fn clone(&self) -> Self {
        Tap(self.0.clone())
    }
}

impl<K> Tap<K> {
    fn new() -> Tap<K> {
        Tap(Arc::new(Mutex::new(None)))
    }

    fn send(&self, obj: K) {
        let mut tx = self.0.lock().expect("not poisoned");
        if let Some(sender) = tx.as_ref()
            && sender.unbounded_send(Arc::new(obj)).is_err()
        {
            // The controller stopped.
            *tx = None;
        }
    }

    /// A fresh receiver of every object seen from now on (replacing any earlier one).
    /// Unbounded: the controller's own queue de-duplicates, and it reads as fast as the
    /// watches deliver.
    fn subscribe(&self) -> UnboundedReceiver<Arc<K>> {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        *self.0.lock().expect("not poisoned") = Some(tx);
        rx
    }
}

/// The annotation in which `kubectl apply` keeps the last applied object.
const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Trims an owned Deployment for the cache to what the operator reads of it: the metadata
/// (without managed fields; generation, labels, annotations for the hashes and the rollout
/// pacing), `spec.replicas`, of the pod template only the sidecar container's name and image
/// (`pacing::sidecar_status`), and the status in full (conditions, replica counts). The pod
/// template — the user's containers, volumes, the preStop hook — is most of a Deployment and
/// is not read from the cache.
pub fn trim_deployment(d: &mut Deployment) {
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
    d.metadata.managed_fields = None;
    if let Some(a) = d.metadata.annotations.as_mut() {
        a.remove(LAST_APPLIED_ANNOTATION);
    }
    let Some(spec) = d.spec.as_mut() else {
        return;
    };
    let sidecar = |containers: &[Container]| -> Vec<Container> {
        containers
            .iter()
            .filter(|c| c.name == crate::crd::SIDECAR_CONTAINER_NAME)
            .map(|c| Container {
                name: c.name.clone(),
                image: c.image.clone(),
                ..Default::default()
            })
            .collect()
    };
    let pod = spec.template.spec.as_ref().map(|p| PodSpec {
        init_containers: p
            .init_containers
            .as_deref()
            .map(sidecar)
            .filter(|c| !c.is_empty()),
        containers: sidecar(&p.containers),
        ..Default::default()
    });
    *spec = k8s_openapi::api::apps::v1::DeploymentSpec {
        replicas: spec.replicas,
        template: PodTemplateSpec {
            metadata: None,
            spec: pod,
        },
        ..Default::default()
    };
}

/// One item of a watch's event stream.
type WatchItem<K> = Result<watcher::Event<K>, watcher::Error>;

/// A `filter_map` step for a watch's event stream: passes on an applied object only when
/// `signature` changed since this object (name and UID) was last seen, and every deleted
/// one (the last state a deletion carries is often the one already seen, and the owner must
/// still recreate it). A re-list forgets objects that disappeared during the watch gap.
fn changed_or_deleted<K: Resource>(
    signature: fn(&K) -> Option<u64>,
) -> impl FnMut(WatchItem<K>) -> futures::future::Ready<Option<Result<K, watcher::Error>>> {
    type Key = (Option<String>, Option<String>, Option<String>);
    let key = |obj: &K| -> Key {
        let m = obj.meta();
        (m.namespace.clone(), m.name.clone(), m.uid.clone())
    };
    let mut seen: HashMap<Key, Option<u64>> = HashMap::new();
    let mut relisted: Option<HashMap<Key, Option<u64>>> = None;
    move |event| {
        let out = match event {
            Err(e) => Some(Err(e)),
            Ok(watcher::Event::Init) => {
                relisted = Some(HashMap::new());
                None
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(fresh) = relisted.take() {
                    seen = fresh;
                }
                None
            }
            Ok(watcher::Event::Delete(obj)) => {
                seen.remove(&key(&obj));
                Some(Ok(obj))
            }
            Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) => {
                let k = key(&obj);
                let sig = signature(&obj);
                if let Some(fresh) = relisted.as_mut() {
                    fresh.insert(k.clone(), sig);
                }
                let changed = sig.is_none() || seen.get(&k) != Some(&sig);
                seen.insert(k, sig);
                changed.then_some(Ok(obj))
            }
        };
        futures::future::ready(out)
    }
}

/// Runs one watch stream for as long as the returned task lives, handing what it yields to
/// `tap`. Watch errors are retried by the stream's backoff.
fn drive<K, S>(kind: &'static str, stream: S, tap: Tap<K>) -> AbortOnDrop
where
    K: Send + Sync + 'static,
    S: futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
{
    AbortOnDrop(tokio::spawn(stream.for_each(move |item| {
        match item {
            Ok(obj) => tap.send(obj),
            Err(error) => debug!(%error, kind, "watch error; retrying"),
        }
        futures::future::ready(())
    })))
}

/// The watches and caches, run on every replica — leader or follower — for as long as this
/// lives, so a replica that becomes leader starts reconciling from warm caches instead of
/// listing everything first.
///
/// Watches: EventConsumers (through `DeserializeGuard`, managed fields dropped, only
/// generation changes — status writes do not retrigger); the Deployments, ConfigMaps and
/// PodDisruptionBudgets it owns (metadata only, selected by the managed-by label: any change,
/// including Deployment status, triggers the owner); its pods (trimmed, passed on only when
/// what the pod-problem summary reads changes); Secrets (metadata only: a changed
/// resourceVersion maps to the EventConsumers that reference it or own it).
pub struct Watches {
    ecs: Store<Guarded>,
    caches: Caches,
    ec_tap: Tap<Guarded>,
    deployment_tap: Tap<Deployment>,
    config_map_tap: Tap<PartialObjectMeta<ConfigMap>>,
    pdb_tap: Tap<PartialObjectMeta<PodDisruptionBudget>>,
    pod_tap: Tap<Pod>,
    secret_tap: Tap<PartialObjectMeta<Secret>>,
    autoscaler_tap: Tap<HorizontalPodAutoscaler>,
    /// (namespace, name) of every EventConsumer the watch saw deleted.
    deleted_tap: Tap<(String, String)>,
    /// (namespace, Secret) → the EventConsumers referencing it, kept from the watch.
    secret_index: Arc<SecretIndex>,
    _tasks: Vec<AbortOnDrop>,
}

impl Watches {
    /// Starts the watches (they list, then watch, in the background).
    pub fn start(client: &Client, scope: &WatchScope, secret_index: Arc<SecretIndex>) -> Watches {
        let ecs: Api<Guarded> = scope.api(client);
        let (reader, writer) = reflector::store();
        let ec_tap = Tap::new();
        let index = secret_index.clone();
        let deleted_tap = Tap::new();
        let deleted = deleted_tap.clone();
        let primary = watcher(ecs, watcher::Config::default().any_semantic())
            .default_backoff()
            .modify(|g| {
                // kubectl apply keeps a copy of the whole object in an annotation; nothing
                // reads it, and with many EventConsumers it is most of the cache.
                g.managed_fields_mut().clear();
                g.annotations_mut().remove(LAST_APPLIED_ANNOTATION);
            })
            .reflect(writer)
            .inspect_ok(move |event| {
                index.apply(event);
                // Without a finalizer a deletion never reaches the reconcile: the leader
                // forgets the object's per-object records from here.
                if let watcher::Event::Delete(g) = event {
                    deleted.send((g.namespace().unwrap_or_default(), g.name_any()));
                }
            })
            .applied_objects()
            .predicate_filter(predicates::generation, Default::default());
        let owned = watcher::Config::default()
            .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"))
            .any_semantic();
        // `Api<PartialObjectMeta<K>>` makes metadata-only list and watch requests.
        // Deployments in full (their status feeds the EventConsumer's); ConfigMaps and PDBs as
        // metadata. All three cached: the reconcile reads them instead of GETting.
        let (dep_reader, dep_writer) = reflector::store();
        let deployment_tap = Tap::new();
        let deployments = watcher(scope.api::<Deployment>(client), owned.clone())
            .default_backoff()
            .modify(trim_deployment)
            .reflect(dep_writer)
            .filter_map(changed_or_deleted(status::deployment_signature));
        let (cm_reader, cm_writer) = reflector::store();
        let config_map_tap = Tap::new();
        let config_maps = watcher(
            scope.api::<PartialObjectMeta<ConfigMap>>(client),
            owned.clone(),
        )
        .default_backoff()
        .modify(|m| m.managed_fields_mut().clear())
        .reflect(cm_writer)
        .touched_objects();
        let (pdb_reader, pdb_writer) = reflector::store();
        let pdb_tap = Tap::new();
        let pdbs = watcher(
            scope.api::<PartialObjectMeta<PodDisruptionBudget>>(client),
            owned,
        )
        .default_backoff()
        .modify(|m| m.managed_fields_mut().clear())
        .reflect(pdb_writer)
        .touched_objects();
        // Pods: only those the operator labels (the pod template's selector label), trimmed
        // to the status fields `status::pods` reads, passed on only when that changes.
        let (pod_reader, pod_writer) = reflector::store();
        let pod_tap = Tap::new();
        let pods = watcher(
            scope.api::<Pod>(client),
            watcher::Config::default()
                .labels(build::SELECTOR_LABEL)
                .any_semantic(),
        )
        .default_backoff()
        .modify(status::pods::trim)
        .reflect(pod_writer)
        .touched_objects()
        .predicate_filter(status::pods::signature, Default::default());
        let secret_tap = Tap::new();
        let (secret_reader, secret_writer) = reflector::store();
        let secrets = watcher(
            scope.api::<PartialObjectMeta<Secret>>(client),
            watcher::Config::default().any_semantic(),
        )
        .default_backoff()
        // Only name, resourceVersion and owners are used: the rest (annotations may hold a
        // kubectl last-applied copy of the data) is not kept.
        .modify(|m| {
            m.managed_fields_mut().clear();
            m.annotations_mut().clear();
            m.labels_mut().clear();
        })
        .reflect(secret_writer)
        .touched_objects();
        // The drain-token Secrets in full, but trimmed to the token key and name, namespace,
        // resourceVersion and owners: every replica keeps them, so a new leader's catch-up
        // pass reads no Secret. Changes reach the owner through the metadata watch above.
        let (drain_reader, drain_writer) = reflector::store();
        let drain_tokens = watcher(
            scope.api::<Secret>(client),
            watcher::Config::default()
                .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"))
                .any_semantic(),
        )
        .default_backoff()
        .modify(secrets::trim_drain_secret)
        .reflect(drain_writer)
        .touched_objects();
        // Autoscalers: only a spec change (generation) maps to the EventConsumer of the same
        // name as the Deployment they target; their status updates do not.
        let autoscaler_tap = Tap::new();
        let (hpa_reader, hpa_writer) = reflector::store();
        let autoscalers = watcher(
            scope.api::<HorizontalPodAutoscaler>(client),
            watcher::Config::default().any_semantic(),
        )
        .default_backoff()
        .modify(|h| h.managed_fields_mut().clear())
        .reflect(hpa_writer)
        .touched_objects()
        .predicate_filter(predicates::generation, Default::default());
        let tasks = vec![
            drive("EventConsumer", primary, ec_tap.clone()),
            drive("Deployment", deployments, deployment_tap.clone()),
            drive("ConfigMap", config_maps, config_map_tap.clone()),
            drive("PodDisruptionBudget", pdbs, pdb_tap.clone()),
            drive("Pod", pods, pod_tap.clone()),
            drive("Secret", secrets, secret_tap.clone()),
            drive("drain-token Secret", drain_tokens, Tap::new()),
            drive(
                "HorizontalPodAutoscaler",
                autoscalers,
                autoscaler_tap.clone(),
            ),
        ];
        Watches {
            ecs: reader,
            caches: Caches {
                deployments: dep_reader,
                config_maps: cm_reader,
                pdbs: pdb_reader,
                pods: pod_reader,
                secrets: secret_reader,
                drain_tokens: drain_reader,
                autoscalers: hpa_reader,
            },
            ec_tap,
            deployment_tap,
            config_map_tap,
            pdb_tap,
            pod_tap,
            secret_tap,
            autoscaler_tap,
            deleted_tap,
            secret_index,
            _tasks: tasks,
        }
    }

    /// The EventConsumer cache.
    pub fn event_consumers(&self) -> &Store<Guarded> {
        &self.ecs
    }
}

/// Runs the controller on `watches` until `shutdown` completes: every EventConsumer in the
/// cache once the caches are filled (cheap after a failover: applies whose desired state is
/// unchanged are skipped), then whatever the watches deliver. The lag collector runs beside
/// it and stops with it (also when this future is dropped).
pub async fn run_controller(
    ctx: Arc<Context>,
    watches: &Watches,
    concurrency: u16,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let reader = watches.ecs.clone();
    *ctx.caches.lock().expect("not poisoned") = Some(watches.caches.clone());
    // Subscribed before the catch-up below, so nothing in between is missed.
    let ec_events = watches.ec_tap.subscribe();
    let deployment_events = watches.deployment_tap.subscribe();
    let config_map_events = watches.config_map_tap.subscribe();
    let pdb_events = watches.pdb_tap.subscribe();
    let pod_events = watches.pod_tap.subscribe();
    let secret_events = watches.secret_tap.subscribe();
    let autoscaler_events = watches.autoscaler_tap.subscribe();
    let (wake_tx, wake_rx) = futures::channel::mpsc::unbounded();
    *ctx.wake.lock().expect("not poisoned") = Some(wake_tx);
    let caches = watches.caches.clone();
    let ready_ecs = reader.clone();
    let catch_up = futures::stream::once(async move {
        let _ = ready_ecs.wait_until_ready().await;
        let _ = caches.deployments.wait_until_ready().await;
        let _ = caches.config_maps.wait_until_ready().await;
        let _ = caches.pdbs.wait_until_ready().await;
        let _ = caches.pods.wait_until_ready().await;
        let _ = caches.secrets.wait_until_ready().await;
        let _ = caches.drain_tokens.wait_until_ready().await;
    });
    let index = watches.secret_index.clone();
    // Deleted EventConsumers: their records (applies, failures, lag target, rollout turn or
    // place in the queue, cached drain token) are dropped.
    let forget_ctx = ctx.clone();
    let _forget = AbortOnDrop(tokio::spawn(watches.deleted_tap.subscribe().for_each(
        move |key| {
            forget_ctx.forget(&key.0, &key.1);
            forget_ctx.wake_waiters();
            futures::future::ready(())
        },
    )));
    // Events: published beside the reconciles; those still queued when the controller
    // stops get a moment, then are dropped with the task.
    let mut events = AbortOnDrop(tokio::spawn(ctx.event_publisher()));
    // The lag collector: beside the controller, on the same cache, stopped with it.
    let collector_stop = tokio_util::sync::CancellationToken::new();
    let mut collector = AbortOnDrop(tokio::spawn(
        Collector::new(
            ctx.client.clone(),
            ctx.metrics.clone(),
            ctx.lag,
            ctx.targets.clone(),
        )
        .run(reader.clone(), collector_stop.clone()),
    ));
    Controller::for_shared_stream(ec_events, reader)
        .with_config(ControllerConfig::default().concurrency(concurrency).debounce(Duration::from_millis(200)))
        .owns_shared_stream(deployment_events)
        .owns_shared_stream(config_map_events)
        .owns_shared_stream(pdb_events)
        .reconcile_on(wake_rx)
        .watches_shared_stream(pod_events, |p| {
            let ns = p.namespace()?;
            status::pods::owner(&p).map(|ec| ObjectRef::new(ec).within(&ns))
        })
        .watches_shared_stream(autoscaler_events, |h| {
            let ns = h.namespace().unwrap_or_default();
            autoscaler::target_deployment(&h).map(|d| ObjectRef::new(d).within(&ns))
        })
        .watches_shared_stream(secret_events, move |s| {
            let ns = s.namespace().unwrap_or_default();
            let owner = s
                .owner_references()
                .iter()
                .find(|o| o.kind == "EventConsumer" && o.controller == Some(true))
                .map(|o| o.name.clone());
            secret_to_consumers(&index, &ns, &s.name_any(), owner.as_deref())
        })
        .reconcile_all_on(catch_up)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(namespace = obj.namespace.as_deref().unwrap_or(""), name = %obj.name, "reconciled"),
                Err(error) => debug!(%error, "reconcile error"),
            }
        })
        .await;
    collector_stop.cancel();
    let _ = (&mut collector.0).await;
    *ctx.wake.lock().expect("not poisoned") = None;
    *ctx.events.lock().expect("not poisoned") = None;
    let _ = tokio::time::timeout(Duration::from_secs(1), &mut events.0).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trimmed_deployment_reads_the_same_to_every_reader_of_the_cache() {
        let mut d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "ec", "namespace": "ns", "generation": 4, "resourceVersion": "77",
                "labels": {"app.kubernetes.io/managed-by": "sluice"},
                "annotations": {"sluice.dev/desired-hash": "h", "sluice.dev/template-hash": "t",
                    "sluice.dev/rollout-cause": "operator",
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"big\": 1}"},
                "managedFields": [{"manager": "x"}]},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"a": "b"}},
                "template": {"metadata": {"labels": {"a": "b"}}, "spec": {
                    "initContainers": [{"name": "sluice", "image": "sidecar:2", "args": ["run"],
                        "env": [{"name": "X", "value": "y"}]}],
                    "containers": [{"name": "app", "image": "app:1", "args": ["serve"]}],
                    "volumes": [{"name": "v", "emptyDir": {}}]}}},
            "status": {"observedGeneration": 4, "replicas": 2, "updatedReplicas": 2,
                "readyReplicas": 2, "availableReplicas": 2,
                "conditions": [{"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
                    {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": "quota"}]}
        }))
        .unwrap();
        let full = d.clone();
        trim_deployment(&mut d);
        // The signature hashes the annotations: the same as the full one's without kubectl's
        // copy (which the cache never keeps, so cached signatures compare like with like).
        let mut without_copy = full.clone();
        without_copy
            .annotations_mut()
            .remove(LAST_APPLIED_ANNOTATION);
        assert_eq!(
            status::deployment_signature(&d),
            status::deployment_signature(&without_copy)
        );
        let image = |d: &Deployment| pacing::sidecar_image(&d.spec.as_ref().unwrap().template);
        assert_eq!(image(&d).as_deref(), Some("sidecar:2"));
        assert_eq!(
            pacing::rollout_complete(&d),
            pacing::rollout_complete(&full)
        );
        assert!(pacing::rollout_complete(&d));
        assert_eq!(pacing::Running::of(&d), pacing::Running::of(&full));
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
        assert_eq!(d.metadata.generation, Some(4));
        assert_eq!(d.status, full.status);
        // What is dropped: the rest of the template, managed fields, kubectl's copy.
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert!(pod.containers.is_empty(), "the application container");
        assert!(pod.volumes.is_none());
        assert!(pod.init_containers.as_ref().unwrap()[0].args.is_none());
        assert!(d.metadata.managed_fields.is_none());
        assert!(!d.annotations().contains_key(LAST_APPLIED_ANNOTATION));
        // A container-mode sidecar is kept where it is.
        let mut c = full.clone();
        let pod = c.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
        let sidecar = pod.init_containers.take().unwrap().remove(0);
        pod.containers.push(sidecar);
        trim_deployment(&mut c);
        assert_eq!(image(&c).as_deref(), Some("sidecar:2"));
    }

    #[test]
    fn applies_are_skipped_only_for_the_same_hash_on_an_untouched_object() {
        // Never applied by this replica (e.g. after a failover): the annotation decides.
        assert!(can_skip(Some("h"), Some("3"), "h", None));
        assert!(!can_skip(Some("old"), Some("3"), "h", None));
        assert!(!can_skip(None, Some("3"), "h", None));
        // Applied here: also untouched since (same generation/resourceVersion).
        assert!(can_skip(Some("h"), Some("3"), "h", Some(("h", Some("3")))));
        assert!(
            !can_skip(Some("h"), Some("4"), "h", Some(("h", Some("3")))),
            "someone changed it since: apply again"
        );
        // The cache still shows an older apply (A -> B -> A): apply.
        assert!(!can_skip(
            Some("h"),
            Some("3"),
            "h",
            Some(("other", Some("5")))
        ));
    }

    #[test]
    fn stamps_are_deterministic_and_ignore_a_previous_stamp() {
        let mut a = ConfigMap::default();
        a.metadata.name = Some("x".into());
        let h1 = stamp(&mut a);
        let h2 = stamp(&mut a);
        assert_eq!(h1, h2, "restamping gives the same digest");
        assert_eq!(a.annotations()[DESIRED_HASH_ANNOTATION], h1);
        let mut b = ConfigMap::default();
        b.metadata.name = Some("y".into());
        assert_ne!(stamp(&mut b), h1);
    }

    #[test]
    fn the_watch_filter_passes_changes_and_every_deletion() {
        use futures::StreamExt;
        let cm = |name: &str, uid: &str, v: &str| {
            let mut c = ConfigMap::default();
            c.metadata.name = Some(name.into());
            c.metadata.uid = Some(uid.into());
            c.data = Some([("v".to_owned(), v.to_owned())].into());
            c
        };
        let sig = |c: &ConfigMap| {
            use std::hash::{DefaultHasher, Hash, Hasher};
            let mut h = DefaultHasher::new();
            c.data.hash(&mut h);
            Some(h.finish())
        };
        let events = vec![
            watcher::Event::Init,
            watcher::Event::InitApply(cm("a", "1", "x")),
            watcher::Event::InitApply(cm("gone", "2", "x")),
            watcher::Event::InitDone,
            watcher::Event::Apply(cm("a", "1", "x")), // unchanged: filtered
            watcher::Event::Apply(cm("a", "1", "y")), // changed
            watcher::Event::Delete(cm("a", "1", "y")), // same state, deleted: passed
            watcher::Event::Apply(cm("a", "3", "y")), // recreated (new UID)
            // A re-list after a gap: "gone" vanished meanwhile, "a" unchanged.
            watcher::Event::Init,
            watcher::Event::InitApply(cm("a", "3", "y")),
            watcher::Event::InitDone,
            watcher::Event::Apply(cm("gone", "2", "x")), // forgotten: seen as new
        ];
        let passed: Vec<String> = futures::executor::block_on(
            futures::stream::iter(events.into_iter().map(Ok))
                .filter_map(changed_or_deleted(sig))
                .map(|r: Result<ConfigMap, _>| {
                    let c = r.unwrap();
                    format!("{}/{}", c.name_any(), c.data.unwrap()["v"])
                })
                .collect(),
        );
        assert_eq!(passed, ["a/x", "gone/x", "a/y", "a/y", "a/y", "gone/x"]);
    }

    #[test]
    fn backoff_doubles_from_one_second_up_to_five_minutes() {
        let got: Vec<u64> = (1..=12).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
        assert_eq!(backoff(0), BACKOFF_MIN);
    }

    fn guard(ns: &str, name: &str, secret: Option<&str>) -> Arc<Guarded> {
        let auth = secret
            .map(|s| format!(", auth: {{sasl: {{mechanism: PLAIN, secretRef: {{name: {s}}}}}}}"))
            .unwrap_or_default();
        let yaml = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: EventConsumer\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  kafka: {{bootstrapServers: 'k:9092', topics: [a]{auth}}}\n  delivery: {{url: 'http://127.0.0.1:8080/'}}\n  template: {{spec: {{containers: [{{name: app}}]}}}}\n"
        );
        Arc::new(serde_norway::from_str(&yaml).unwrap())
    }

    #[test]
    fn secrets_map_to_referencing_consumers_and_their_owner() {
        let reader = SecretIndex::default();
        for g in [
            guard("a", "one", Some("creds")),
            guard("a", "two", None),
            guard("b", "three", Some("creds")),
        ] {
            reader.apply(&watcher::Event::Apply((*g).clone()));
        }
        let bad: Guarded = serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "EventConsumer",
            "metadata": {"name": "broken", "namespace": "a"}, "spec": {"kafka": 5}
        }))
        .unwrap();
        assert!(
            bad.0.is_err(),
            "a malformed object is kept as an error, not a broken watch"
        );
        reader.apply(&watcher::Event::Apply(bad));
        let names = |v: Vec<ObjectRef<Guarded>>| {
            let mut v: Vec<String> = v
                .into_iter()
                .map(|r| format!("{}/{}", r.namespace.unwrap(), r.name))
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            names(secret_to_consumers(&reader, "a", "creds", None)),
            ["a/one"]
        );
        assert_eq!(
            names(secret_to_consumers(&reader, "b", "creds", None)),
            ["b/three"]
        );
        assert_eq!(
            names(secret_to_consumers(&reader, "a", "other", None)),
            Vec::<String>::new()
        );
        assert_eq!(
            names(secret_to_consumers(
                &reader,
                "a",
                "two-sluice-drain",
                Some("two")
            )),
            ["a/two"]
        );
        assert_eq!(
            names(secret_to_consumers(&reader, "a", "creds", Some("one"))),
            ["a/one"]
        );
    }
}
