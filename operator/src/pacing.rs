//! Paced rollouts of changes the operator makes to pod templates on its own (an operator
//! upgrade with a new sidecar image, a new `--sidecar-mode`, a newer build of what it injects),
//! so an upgrade does not roll every EventConsumer of the cluster at once.
//!
//! Every Deployment the operator applies carries three annotations (on the Deployment, not
//! its pod template, so they never roll pods themselves):
//!
//! * [`TEMPLATE_HASH_ANNOTATION`]: a digest of the pod template the operator applied;
//! * [`INPUT_HASH_ANNOTATION`]: a digest of what the user controls — the spec (without
//!   `replicas`: scaling rolls nothing) and the data of the Secrets it references;
//! * [`ROLLOUT_CAUSE_ANNOTATION`]: why the template last changed, `spec` or `operator`.
//!
//! A template change whose user input is unchanged is the operator's own: it waits for a
//! turn. At most `--max-sidecar-rollouts` Deployments roll for the operator at a time; a
//! turn ends when that Deployment's rollout is complete (every pod on the new template and
//! available). A stuck rollout (say, a sidecar image that does not pull) keeps its turn, so a
//! bad image stops after that many EventConsumers instead of breaking them all. A user's
//! change (spec or Secret data) rolls at once, and takes any pending operator change with it.
//!
//! Who is rolling is read from the Deployments themselves (the controller's cache), so a new
//! leader — which an operator upgrade always brings — keeps the bound; turns granted but not
//! yet visible in the cache are held in memory ([`Pacer`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use crate::build::SecretData;
use crate::crd::{EventConsumerSpec, EventConsumerStatus, SIDECAR_CONTAINER_NAME};
use crate::status::PROGRESSING;

/// Deployment annotation: digest of the pod template the operator applied.
pub const TEMPLATE_HASH_ANNOTATION: &str = "sluice.dev/template-hash";
/// Deployment annotation: digest of the user's input (spec without replicas, Secret data).
pub const INPUT_HASH_ANNOTATION: &str = "sluice.dev/input-hash";
/// Deployment annotation: why the pod template last changed (`spec` or `operator`).
pub const ROLLOUT_CAUSE_ANNOTATION: &str = "sluice.dev/rollout-cause";

/// Default of `--max-sidecar-rollouts`.
pub const DEFAULT_MAX_SIDECAR_ROLLOUTS: u32 = 10;

/// The Progressing reason of an EventConsumer whose operator-side change waits for a turn.
pub const SIDECAR_UPDATE_QUEUED: &str = "SidecarUpdateQueued";

/// An EventConsumer: (namespace, name).
pub type Key = (String, String);

/// Why a pod template changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The user's spec or Secret data (or the Deployment is new): rolls at once.
    Spec,
    /// The operator alone (its sidecar image, mode or build): rolls when it gets a turn.
    Operator,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Spec => "spec",
            Cause::Operator => "operator",
        }
    }

    fn parse(s: Option<&str>) -> Cause {
        match s {
            Some("operator") => Cause::Operator,
            _ => Cause::Spec,
        }
    }
}

fn digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Digest of a pod template.
pub fn template_hash(template: &PodTemplateSpec) -> String {
    digest(&serde_json::to_vec(template).expect("a pod template always serializes"))
}

/// Digest of what the user controls: the spec without `replicas` (a scale, by hand or by an
/// autoscaler, is no reason to roll) and the referenced Secrets' data.
pub fn input_hash(spec: &EventConsumerSpec, secrets: &BTreeMap<String, SecretData>) -> String {
    let mut spec = serde_json::to_value(spec).expect("a spec always serializes");
    if let Some(o) = spec.as_object_mut() {
        o.remove("replicas");
    }
    let bytes = serde_json::to_vec(&(spec, secrets)).expect("serializes");
    digest(&bytes)
}

/// What the pacing needs to know of the running Deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Running<'a> {
    pub template_hash: Option<&'a str>,
    pub input_hash: Option<&'a str>,
    pub cause: Option<&'a str>,
    /// No pod runs and none is wanted: rolling it costs nothing, so it needs no turn.
    pub idle: bool,
}

impl<'a> Running<'a> {
    pub fn of(d: &'a Deployment) -> Running<'a> {
        let a = d.metadata.annotations.as_ref();
        let get = |k: &str| a.and_then(|a| a.get(k)).map(String::as_str);
        let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let running = d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        Running {
            template_hash: get(TEMPLATE_HASH_ANNOTATION),
            input_hash: get(INPUT_HASH_ANNOTATION),
            cause: get(ROLLOUT_CAUSE_ANNOTATION),
            idle: wanted == 0 && running == 0,
        }
    }
}

/// What to do with the Deployment's pod template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The template is the one running: nothing rolls; the cause of the last roll stays.
    Unchanged { cause: Cause },
    /// The template changes; an operator change of a Deployment with pods needs a turn.
    Roll { cause: Cause, needs_turn: bool },
}

impl Plan {
    /// The value of [`ROLLOUT_CAUSE_ANNOTATION`] to apply.
    pub fn cause(self) -> Cause {
        match self {
            Plan::Unchanged { cause } | Plan::Roll { cause, .. } => cause,
        }
    }
}

/// Decides how the desired template (`template`, from user input `input`) reaches the
/// running Deployment. `spec_applied`: the EventConsumer's status already describes its
/// current generation (used only for Deployments from an operator that did not record the
/// user input: then an unchanged generation means the change is the operator's). Pure.
pub fn plan(
    running: Option<&Running<'_>>,
    template: &str,
    input: &str,
    spec_applied: bool,
) -> Plan {
    let Some(r) = running else {
        // A new Deployment: nothing runs yet, nothing to pace.
        return Plan::Roll {
            cause: Cause::Spec,
            needs_turn: false,
        };
    };
    if r.template_hash == Some(template) {
        return Plan::Unchanged {
            cause: Cause::parse(r.cause),
        };
    }
    let operator = match r.input_hash {
        Some(h) => h == input,
        None => spec_applied,
    };
    if operator {
        Plan::Roll {
            cause: Cause::Operator,
            needs_turn: !r.idle,
        }
    } else {
        Plan::Roll {
            cause: Cause::Spec,
            needs_turn: false,
        }
    }
}

/// Whether a Deployment's rollout is complete: the controller saw its latest spec and every
/// pod runs the current template and is available.
pub fn rollout_complete(d: &Deployment) -> bool {
    let status = d.status.as_ref();
    let count = |f: fn(&DeploymentStatus) -> Option<i32>| status.and_then(f).unwrap_or(0);
    let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let updated = count(|s| s.updated_replicas);
    crate::status::status_is_current(d)
        && updated >= wanted
        && count(|s| s.replicas) == updated
        && count(|s| s.available_replicas) >= wanted
}

/// Whether a Deployment holds a turn: its template last changed for the operator and that
/// rollout is not complete.
pub fn holds_turn(d: &Deployment) -> bool {
    Running::of(d).cause == Some(Cause::Operator.as_str()) && !rollout_complete(d)
}

/// The sidecar image of a pod template (native sidecar or plain container).
pub fn sidecar_image(template: &PodTemplateSpec) -> Option<String> {
    let spec = template.spec.as_ref()?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .find(|c| c.name == SIDECAR_CONTAINER_NAME)
        .and_then(|c| c.image.clone())
}

/// One cached Deployment as the pacer sees it: its EventConsumer, its template hash, and
/// whether it holds a turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub key: Key,
    pub template_hash: Option<String>,
    pub holds_turn: bool,
}

impl Seen {
    pub fn of(d: &Deployment) -> Seen {
        Seen {
            key: (
                d.metadata.namespace.clone().unwrap_or_default(),
                d.metadata.name.clone().unwrap_or_default(),
            ),
            template_hash: Running::of(d).template_hash.map(str::to_owned),
            holds_turn: holds_turn(d),
        }
    }
}

/// The answer to a request for a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    Granted,
    /// All turns are taken: `rolling` Deployments roll for the operator now.
    Wait {
        rolling: usize,
    },
}

#[derive(Debug, Default)]
struct State {
    /// Turns granted whose apply the cache has not shown yet: key → the template applied.
    reserved: HashMap<Key, String>,
    /// EventConsumers waiting for a turn, first come first served.
    waiting: VecDeque<Key>,
}

/// The turns of operator-side rollouts: at most `max` at a time.
#[derive(Debug)]
pub struct Pacer {
    max: usize,
    state: Mutex<State>,
}

impl Pacer {
    pub fn new(max: u32) -> Pacer {
        Pacer {
            max: max.max(1) as usize,
            state: Mutex::new(State::default()),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// The EventConsumers holding a turn: those the cache shows rolling for the operator,
    /// and those granted one whose apply the cache does not show yet (a reservation ends
    /// once the cache shows the template it was granted for).
    fn occupied(state: &mut State, seen: &[Seen]) -> HashSet<Key> {
        let mut out = HashSet::new();
        for s in seen {
            if state.reserved.get(&s.key).map(String::as_str) == s.template_hash.as_deref()
                && s.template_hash.is_some()
            {
                state.reserved.remove(&s.key);
            }
            if s.holds_turn {
                out.insert(s.key.clone());
            }
        }
        out.extend(state.reserved.keys().cloned());
        out
    }

    /// Asks for a turn to apply `template` to `key`'s Deployment, given the cached
    /// Deployments. One already holding a turn keeps it.
    pub fn acquire(&self, key: &Key, template: &str, seen: &[Seen]) -> Turn {
        let mut state = self.state.lock().expect("not poisoned");
        let occupied = Self::occupied(&mut state, seen);
        if occupied.contains(key) || occupied.len() < self.max {
            state.reserved.insert(key.clone(), template.to_owned());
            state.waiting.retain(|k| k != key);
            Turn::Granted
        } else {
            if !state.waiting.contains(key) {
                state.waiting.push_back(key.clone());
            }
            Turn::Wait {
                rolling: occupied.len(),
            }
        }
    }

    /// The apply after a granted turn failed: give the turn back.
    pub fn release(&self, key: &Key) {
        self.state
            .lock()
            .expect("not poisoned")
            .reserved
            .remove(key);
    }

    /// `key` needs no turn (any more): off the waiting list.
    pub fn not_waiting(&self, key: &Key) {
        let mut state = self.state.lock().expect("not poisoned");
        if state.waiting.contains(key) {
            state.waiting.retain(|k| k != key);
        }
    }

    /// The EventConsumer was deleted.
    pub fn forget(&self, key: &Key) {
        let mut state = self.state.lock().expect("not poisoned");
        state.reserved.remove(key);
        state.waiting.retain(|k| k != key);
    }

    /// The waiting EventConsumers to reconcile now, first come first, as many as there are
    /// free turns; and (turns held, waiting) for the metrics.
    pub fn wake(&self, seen: &[Seen]) -> (Vec<Key>, usize, usize) {
        let mut state = self.state.lock().expect("not poisoned");
        let occupied = Self::occupied(&mut state, seen);
        let free = self.max.saturating_sub(occupied.len());
        let wake = state.waiting.iter().take(free).cloned().collect();
        (wake, occupied.len(), state.waiting.len())
    }

    /// Whether anyone waits (cheap: no scan of the cache).
    pub fn has_waiters(&self) -> bool {
        !self.state.lock().expect("not poisoned").waiting.is_empty()
    }
}

/// An operator-side change waiting for its turn (for the status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    /// The sidecar image the waiting template runs.
    pub image: Option<String>,
    pub rolling: usize,
    pub max: usize,
}

/// Sets the sidecar fields of a computed status: `sidecarImage` from the Deployment once its
/// rollout is complete (during a rollout the pods run a mix: the last complete value stays),
/// `pendingSidecarImage` and the Progressing reason while a change waits for its turn. Pure.
pub fn sidecar_status(
    status: &mut EventConsumerStatus,
    deployment: Option<&Deployment>,
    pending: Option<&Pending>,
) {
    if let Some(d) = deployment.filter(|d| rollout_complete(d)) {
        let image = d.spec.as_ref().and_then(|s| sidecar_image(&s.template));
        if image.is_some() {
            status.sidecar_image = image;
        }
    }
    status.pending_sidecar_image = pending.and_then(|p| p.image.clone());
    let Some(p) = pending else {
        return;
    };
    if let Some(c) = status.conditions.iter_mut().find(|c: &&mut Condition| {
        c.type_ == PROGRESSING && c.status == "False" && c.reason == "RolloutComplete"
    }) {
        c.reason = SIDECAR_UPDATE_QUEUED.into();
        c.message = format!(
            "the operator's sidecar (image {}) changed; the pods keep running {} until this EventConsumer's turn: at most {} EventConsumers roll for an operator change at a time (--max-sidecar-rollouts) and {} do now; a change of the spec rolls at once",
            p.image.as_deref().unwrap_or("unknown"),
            status.sidecar_image.as_deref().unwrap_or("the current one"),
            p.max,
            p.rolling
        );
    }
}

#[cfg(test)]
mod tests;
