//! The Secrets an EventConsumer references (Kafka credentials) and the one it owns (the drain
//! token).
//!
//! The drain token is generated once per EventConsumer: 32 random bytes, hex encoded, kept
//! in the Secret `<name>-sluice-drain` (key `drain-token`), owned by the EventConsumer so it
//! is garbage collected with it. The reconciler reads it on every pass and creates it only
//! when it is absent (a create race between two passes is settled by the API server: the
//! loser reads the winner's token). It reaches the sidecar as a mounted file
//! (`drain.tokenFile`), never through the ConfigMap; the kubelet can only send a literal
//! header, so it also appears in the preStop hook of the pod template.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, ResourceExt};
use rand::Rng;

use crate::build::{
    DRAIN_TOKEN_KEY, FIELD_MANAGER, SecretData, child_labels, drain_secret_name, owner_reference,
};
use crate::crd::EventConsumerSpec;
use crate::error::Error;

/// One Secret key the spec references, with the spec field that references it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRef {
    pub key: String,
    /// The spec field that names the key (for a missing key).
    pub field: &'static str,
    /// The spec field that names the Secret (for a missing Secret).
    pub secret_field: &'static str,
}

/// The Secrets the spec references, by name, with the keys needed from each.
pub fn referenced(spec: &EventConsumerSpec) -> BTreeMap<String, Vec<KeyRef>> {
    let mut out: BTreeMap<String, Vec<KeyRef>> = BTreeMap::new();
    let mut add = |name: &str, key: &str, field: &'static str, secret_field: &'static str| {
        out.entry(name.to_owned()).or_default().push(KeyRef {
            key: key.to_owned(),
            field,
            secret_field,
        });
    };
    if let Some(auth) = &spec.kafka.auth {
        if let Some(sasl) = &auth.sasl {
            let r = &sasl.secret_ref;
            // A literal username is not read from the Secret.
            if sasl.username.is_none() {
                add(
                    &r.name,
                    &r.username_key,
                    "spec.kafka.auth.sasl.secretRef.usernameKey",
                    "spec.kafka.auth.sasl.secretRef.name",
                );
            }
            add(
                &r.name,
                &r.password_key,
                "spec.kafka.auth.sasl.secretRef.passwordKey",
                "spec.kafka.auth.sasl.secretRef.name",
            );
        }
        if let Some(tls) = &auth.tls {
            if let Some(ca) = &tls.ca_secret_ref {
                add(
                    &ca.name,
                    &ca.key,
                    "spec.kafka.auth.tls.caSecretRef.key",
                    "spec.kafka.auth.tls.caSecretRef.name",
                );
            }
            if let Some(c) = &tls.client_cert_secret_ref {
                add(
                    &c.name,
                    &c.cert_key,
                    "spec.kafka.auth.tls.clientCertSecretRef.certKey",
                    "spec.kafka.auth.tls.clientCertSecretRef.name",
                );
                add(
                    &c.name,
                    &c.key_key,
                    "spec.kafka.auth.tls.clientCertSecretRef.keyKey",
                    "spec.kafka.auth.tls.clientCertSecretRef.name",
                );
            }
        }
    }
    out
}

/// The names of the referenced Secrets (to map Secret changes to EventConsumers).
pub fn referenced_names(spec: &EventConsumerSpec) -> BTreeSet<String> {
    referenced(spec).into_keys().collect()
}

/// The referenced keys of one fetched Secret, or the error that names what is missing.
pub fn extract(
    namespace: &str,
    name: &str,
    keys: &[KeyRef],
    secret: Option<&Secret>,
) -> Result<SecretData, Error> {
    let Some(secret) = secret else {
        return Err(Error::SecretNotFound {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            field: keys
                .first()
                .map(|k| k.secret_field)
                .unwrap_or("spec.kafka.auth"),
        });
    };
    let data = secret.data.as_ref();
    let mut out = SecretData::new();
    for k in keys {
        match data.and_then(|d| d.get(&k.key)) {
            Some(v) => {
                out.insert(k.key.clone(), v.0.clone());
            }
            None => {
                return Err(Error::SecretKeyMissing {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    key: k.key.clone(),
                    field: k.field,
                });
            }
        }
    }
    Ok(out)
}

/// (namespace, name) → (resourceVersion read at, the Secret).
type Entries = HashMap<(String, String), (String, Arc<Secret>)>;

/// The Secrets the reconciler has read, each with the resourceVersion it was read at. The
/// controller's metadata-only Secret watch says which resourceVersion is current, so a
/// Secret is read (GET) only when it changed since, not on every reconcile; only Secrets an
/// EventConsumer reads are kept (its references and its drain token), not every Secret of
/// the cluster.
#[derive(Debug, Default)]
pub struct SecretCache {
    entries: Mutex<Entries>,
    /// Size after the last sweep of deleted Secrets.
    swept: Mutex<usize>,
}

/// Whether a cached read is current: the watch shows the resourceVersion it was read at.
/// Pure.
pub fn current(watched: Option<&str>, cached: Option<&str>) -> bool {
    matches!((watched, cached), (Some(w), Some(c)) if w == c)
}

impl SecretCache {
    fn get(&self, namespace: &str, name: &str, watched: Option<&str>) -> Option<Arc<Secret>> {
        let entries = self.entries.lock().expect("not poisoned");
        let (rv, secret) = entries.get(&(namespace.to_owned(), name.to_owned()))?;
        current(watched, Some(rv)).then(|| secret.clone())
    }

    fn put(
        &self,
        namespace: &str,
        name: &str,
        secret: Option<&Secret>,
        meta: Option<&Store<PartialObjectMeta<Secret>>>,
    ) {
        let key = (namespace.to_owned(), name.to_owned());
        let mut entries = self.entries.lock().expect("not poisoned");
        match secret.and_then(|s| s.resource_version().map(|rv| (rv, s))) {
            Some((rv, s)) => {
                let mut s = s.clone();
                s.metadata.managed_fields = None;
                entries.insert(key, (rv, Arc::new(s)));
            }
            None => {
                entries.remove(&key);
            }
        }
        // Drop Secrets deleted since (their EventConsumers are gone) whenever the cache has
        // doubled since the last sweep: bounded by twice what is in use.
        let mut swept = self.swept.lock().expect("not poisoned");
        if let Some(meta) = meta
            && entries.len() > (*swept).max(64) * 2
        {
            entries.retain(|(ns, n), _| meta.get(&ObjectRef::new(n).within(ns)).is_some());
            *swept = entries.len();
        }
    }

    /// Whether a read of this Secret is held (current or not).
    fn holds(&self, namespace: &str, name: &str) -> bool {
        self.entries
            .lock()
            .expect("not poisoned")
            .contains_key(&(namespace.to_owned(), name.to_owned()))
    }

    /// Forgets a Secret (its EventConsumer was deleted).
    pub fn remove(&self, namespace: &str, name: &str) {
        self.entries
            .lock()
            .expect("not poisoned")
            .remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// Secrets held.
    pub fn len(&self) -> usize {
        self.entries.lock().expect("not poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads the Secrets of one namespace: from the [`SecretCache`] when the watch shows the
/// cached read is current, else from the API server.
pub struct SecretReader<'a> {
    pub api: &'a Api<Secret>,
    pub namespace: &'a str,
    /// The metadata-only Secret watch's cache (none outside the controller: always GET).
    pub meta: Option<&'a Store<PartialObjectMeta<Secret>>>,
    /// The drain-token Secrets' watch cache, trimmed by [`trim_drain_secret`].
    pub owned: Option<&'a Store<Secret>>,
    pub cache: &'a SecretCache,
}

impl SecretReader<'_> {
    /// The Secret, or `None` if it does not exist.
    pub async fn get_opt(&self, name: &str) -> Result<Option<Secret>, kube::Error> {
        let watched = self.meta.and_then(|m| {
            m.get(&ObjectRef::new(name).within(self.namespace))
                .and_then(|s| s.resource_version())
        });
        if let Some(s) = self.cache.get(self.namespace, name, watched.as_deref()) {
            return Ok(Some((*s).clone()));
        }
        let secret = self.api.get_opt(name).await?;
        self.remember(name, secret.as_ref());
        Ok(secret)
    }

    /// A drain-token Secret as the watch of every replica holds it — unless this replica has
    /// read or written it itself (the [`SecretCache`] then knows of a version the watch may
    /// not show yet: [`SecretReader::get_opt`] decides). A replica that has just become
    /// leader has read nothing, so its catch-up pass reads every token from here.
    fn watched_drain_secret(&self, name: &str) -> Option<Secret> {
        if self.cache.holds(self.namespace, name) {
            return None;
        }
        self.owned?
            .get(&ObjectRef::new(name).within(self.namespace))
            .map(|s| (*s).clone())
    }

    /// Whether the Secret watch, fully listed, shows no Secret of this name. It may lag a
    /// Secret created a moment ago, so this only spares a read before a create (whose
    /// conflict says the Secret exists after all).
    fn known_absent(&self, name: &str) -> bool {
        use futures::FutureExt;
        self.meta.is_some_and(|m| {
            matches!(m.wait_until_ready().now_or_never(), Some(Ok(())))
                && m.get(&ObjectRef::new(name).within(self.namespace))
                    .is_none()
        })
    }

    /// Keeps a Secret this reconcile read or wrote (the watch will show its resourceVersion).
    fn remember(&self, name: &str, secret: Option<&Secret>) {
        self.cache.put(self.namespace, name, secret, self.meta);
    }
}

/// Reads every referenced Secret and returns the referenced keys' data.
pub async fn fetch_referenced(
    reader: &SecretReader<'_>,
    namespace: &str,
    spec: &EventConsumerSpec,
) -> Result<BTreeMap<String, SecretData>, Error> {
    let mut out = BTreeMap::new();
    for (name, keys) in referenced(spec) {
        let secret = reader
            .get_opt(&name)
            .await
            .map_err(|source| Error::GetSecret {
                namespace: namespace.to_owned(),
                name: name.clone(),
                source,
            })?;
        let data = extract(namespace, &name, &keys, secret.as_ref())?;
        out.insert(name, data);
    }
    Ok(out)
}

/// Trims a drain-token Secret for the cache of every replica: the token key, and of the
/// metadata only name, namespace, resourceVersion and owner references (what
/// [`ensure_drain_token`] and the store read).
pub fn trim_drain_secret(s: &mut Secret) {
    let m = &mut s.metadata;
    *m = ObjectMeta {
        name: m.name.take(),
        namespace: m.namespace.take(),
        resource_version: m.resource_version.take(),
        owner_references: m.owner_references.take(),
        ..Default::default()
    };
    if let Some(data) = s.data.as_mut() {
        data.retain(|k, _| k == DRAIN_TOKEN_KEY);
    }
    s.string_data = None;
    s.type_ = None;
}

/// A new random drain token: 32 bytes, hex encoded.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A usable token: non-empty visible ASCII (it travels as an HTTP header value).
pub fn valid_token(t: &[u8]) -> Option<String> {
    let ok = !t.is_empty() && t.len() <= 256 && t.iter().all(|b| b.is_ascii_graphic());
    ok.then(|| String::from_utf8_lossy(t).into_owned())
}

/// The drain-token Secret of an EventConsumer with the given token.
pub fn drain_secret(namespace: &str, ec: &str, uid: &str, token: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(drain_secret_name(ec)),
            namespace: Some(namespace.to_owned()),
            labels: Some(child_labels(ec)),
            owner_references: Some(vec![owner_reference(ec, uid)]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            DRAIN_TOKEN_KEY.to_owned(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// Whether a Secret is owned by the EventConsumer with this UID (a drain-token Secret left by
/// a deleted EventConsumer of the same name, not yet garbage collected, is not).
pub fn owned_by(secret: &Secret, uid: &str) -> bool {
    secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "EventConsumer" && o.uid == uid)
}

/// The EventConsumer's drain token: read from its Secret, created once if absent, and
/// replaced if the Secret holds no usable token or belongs to a previous EventConsumer of
/// the same name (another UID): a recreated EventConsumer never adopts the old token.
pub async fn ensure_drain_token(
    reader: &SecretReader<'_>,
    namespace: &str,
    ec: &str,
    uid: &str,
) -> Result<String, Error> {
    let api = reader.api;
    let name = drain_secret_name(ec);
    let err = |source| Error::DrainToken {
        namespace: namespace.to_owned(),
        name: name.clone(),
        source,
    };
    let stored = |s: &Secret| {
        if !owned_by(s, uid) {
            return None;
        }
        s.data
            .as_ref()
            .and_then(|d| d.get(DRAIN_TOKEN_KEY))
            .and_then(|v| valid_token(&v.0))
    };
    // A new EventConsumer's Secret does not exist yet: when the watch shows none, create it
    // without reading first.
    let existing = if let Some(watched) = reader.watched_drain_secret(&name) {
        Some(watched)
    } else if reader.known_absent(&name) {
        None
    } else {
        reader.get_opt(&name).await.map_err(err)?
    };
    if let Some(existing) = existing {
        if let Some(token) = stored(&existing) {
            return Ok(token);
        }
        let token = new_token();
        let written = api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(drain_secret(namespace, ec, uid, &token)),
            )
            .await
            .map_err(err)?;
        reader.remember(&name, Some(&written));
        return Ok(token);
    }
    let token = new_token();
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api
        .create(&pp, &drain_secret(namespace, ec, uid, &token))
        .await
    {
        Ok(created) => {
            reader.remember(&name, Some(&created));
            Ok(token)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            // It exists after all (another pass created it first, or the watch had not shown
            // it yet): use its token; one that is not this EventConsumer's fails this pass,
            // and the retry reads it and replaces it.
            let existing = api.get(&name).await.map_err(err)?;
            reader.remember(&name, Some(&existing));
            stored(&existing).ok_or_else(|| {
                err(kube::Error::Api(Box::new(
                    kube::core::Status::failure(
                        "the drain-token Secret holds no usable token",
                        "Invalid",
                    )
                    .with_code(409),
                )))
            })
        }
        Err(e) => Err(err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_read_is_used_only_at_the_resource_version_the_watch_shows() {
        assert!(current(Some("7"), Some("7")));
        assert!(!current(Some("8"), Some("7")), "changed since: read again");
        assert!(
            !current(None, Some("7")),
            "not in the watch (yet, or deleted): read"
        );
        assert!(!current(Some("7"), None), "never read");
        assert!(!current(None, None));
    }

    #[test]
    fn the_cache_answers_only_for_a_current_read_and_forgets() {
        let cache = SecretCache::default();
        let mut s = drain_secret("ns", "ec", "uid", "t");
        s.metadata.resource_version = Some("7".into());
        cache.put("ns", "ec-sluice-drain", Some(&s), None);
        assert_eq!(cache.len(), 1);
        assert!(cache.get("ns", "ec-sluice-drain", Some("7")).is_some());
        assert!(cache.get("ns", "ec-sluice-drain", Some("8")).is_none());
        assert!(cache.get("other", "ec-sluice-drain", Some("7")).is_none());
        // A read that found nothing drops the entry.
        cache.put("ns", "ec-sluice-drain", None, None);
        assert!(cache.is_empty());
        cache.put("ns", "ec-sluice-drain", Some(&s), None);
        cache.remove("ns", "ec-sluice-drain");
        assert!(cache.is_empty());
    }

    fn spec(auth: &str) -> EventConsumerSpec {
        serde_norway::from_str(&format!(
            "kafka: {{bootstrapServers: 'k:9092', topics: [a], auth: {auth}}}\ndelivery: {{url: 'http://127.0.0.1:8080/'}}\ntemplate: {{spec: {{containers: [{{name: app}}]}}}}"
        ))
        .unwrap()
    }

    fn secret(data: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn references_are_grouped_by_secret_with_their_fields() {
        let s = spec(
            "{sasl: {mechanism: PLAIN, secretRef: {name: shared}}, tls: {caSecretRef: {name: shared, key: ca}, clientCertSecretRef: {name: cert}}}",
        );
        let r = referenced(&s);
        assert_eq!(r.keys().collect::<Vec<_>>(), ["cert", "shared"]);
        let keys: Vec<_> = r["shared"].iter().map(|k| k.key.as_str()).collect();
        assert_eq!(keys, ["username", "password", "ca"]);
        assert_eq!(
            r["cert"][0].field,
            "spec.kafka.auth.tls.clientCertSecretRef.certKey"
        );
        let cert_keys: Vec<_> = r["cert"].iter().map(|k| k.key.as_str()).collect();
        assert_eq!(
            cert_keys,
            ["tls.crt", "tls.key"],
            "kubernetes.io/tls by default"
        );
        assert_eq!(referenced_names(&s).len(), 2);
        let none: EventConsumerSpec = serde_norway::from_str(
            "kafka: {bootstrapServers: 'k:9092', topics: [a]}\ndelivery: {url: 'http://127.0.0.1:8080/'}\ntemplate: {spec: {containers: [{name: app}]}}",
        )
        .unwrap();
        assert!(referenced(&none).is_empty());
    }

    #[test]
    fn strimzi_layout_secrets_are_read_by_their_own_keys() {
        // A KafkaUser's SCRAM Secret (keys password and sasl.jaas.config, named after the
        // user) with the username written in the spec, the cluster CA from
        // <cluster>-cluster-ca-cert, and a TLS KafkaUser's Secret (user.crt, user.key).
        let s = spec(
            "{sasl: {mechanism: SCRAM-SHA-512, username: app, secretRef: {name: app}}, tls: {caSecretRef: {name: my-cluster-cluster-ca-cert}, clientCertSecretRef: {name: app-tls, certKey: user.crt, keyKey: user.key}}}",
        );
        let r = referenced(&s);
        let keys = |name: &str| -> Vec<String> { r[name].iter().map(|k| k.key.clone()).collect() };
        assert_eq!(keys("app"), ["password"], "no username key is read");
        assert_eq!(keys("my-cluster-cluster-ca-cert"), ["ca.crt"]);
        assert_eq!(keys("app-tls"), ["user.crt", "user.key"]);
        assert_eq!(
            r["app-tls"][1].field,
            "spec.kafka.auth.tls.clientCertSecretRef.keyKey"
        );
        // The Secret as the User Operator writes it is accepted as it is.
        let strimzi = secret(&[
            ("password", "p"),
            (
                "sasl.jaas.config",
                "org.apache...ScramLoginModule required ...;",
            ),
        ]);
        let data = extract("ns", "app", &r["app"], Some(&strimzi)).unwrap();
        assert_eq!(data.keys().collect::<Vec<_>>(), ["password"]);
        // A TLS user's Secret without user.key names the field that asked for it.
        let e = extract(
            "ns",
            "app-tls",
            &r["app-tls"],
            Some(&secret(&[("user.crt", "c"), ("ca.crt", "x")])),
        )
        .unwrap_err();
        assert!(e.to_string().contains("no key \"user.key\""), "{e}");
        assert!(
            e.to_string()
                .contains("spec.kafka.auth.tls.clientCertSecretRef.keyKey"),
            "{e}"
        );
    }

    #[test]
    fn extract_names_the_missing_secret_or_key() {
        let keys = vec![
            KeyRef {
                key: "username".into(),
                field: "spec.kafka.auth.sasl.secretRef.usernameKey",
                secret_field: "spec.kafka.auth.sasl.secretRef.name",
            },
            KeyRef {
                key: "password".into(),
                field: "spec.kafka.auth.sasl.secretRef.passwordKey",
                secret_field: "spec.kafka.auth.sasl.secretRef.name",
            },
        ];
        let e = extract("ns", "user", &keys, None).unwrap_err();
        assert_eq!(e.reason(), "SecretNotFound");
        assert!(e.to_string().contains(
            "Secret ns/user, referenced by spec.kafka.auth.sasl.secretRef.name, does not exist"
        ));
        let e = extract("ns", "user", &keys, Some(&secret(&[("username", "u")]))).unwrap_err();
        assert_eq!(e.reason(), "SecretKeyMissing");
        assert!(e.to_string().contains("no key \"password\""));
        let ok = extract(
            "ns",
            "user",
            &keys,
            Some(&secret(&[
                ("username", "u"),
                ("password", "p"),
                ("other", "x"),
            ])),
        )
        .unwrap();
        assert_eq!(ok.len(), 2, "only referenced keys feed the hash");
        assert_eq!(ok["password"], b"p");
    }

    #[test]
    fn tokens_are_random_hex_and_validated() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(valid_token(a.as_bytes()), Some(a));
        assert_eq!(valid_token(b""), None);
        assert_eq!(valid_token(b"has space"), None);
        assert_eq!(valid_token(b"line\n"), None);
    }

    #[test]
    fn a_watched_drain_secret_keeps_only_its_token_and_owners() {
        let mut s = drain_secret("ns", "ec", "uid-1", "tok");
        s.metadata.resource_version = Some("9".into());
        s.metadata.annotations.get_or_insert_default().insert(
            "kubectl.kubernetes.io/last-applied-configuration".into(),
            "{}".into(),
        );
        s.data
            .as_mut()
            .unwrap()
            .insert("other".into(), ByteString(vec![0; 4096]));
        trim_drain_secret(&mut s);
        assert_eq!(s.metadata.name.as_deref(), Some("ec-sluice-drain"));
        assert_eq!(s.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(s.metadata.resource_version.as_deref(), Some("9"));
        assert!(s.metadata.annotations.is_none() && s.metadata.labels.is_none());
        assert_eq!(s.data.as_ref().unwrap().len(), 1);
        assert!(owned_by(&s, "uid-1"), "the owner check still works");
        assert_eq!(
            valid_token(&s.data.as_ref().unwrap()[DRAIN_TOKEN_KEY].0).as_deref(),
            Some("tok")
        );
    }

    #[test]
    fn the_drain_secret_is_owned_and_labelled() {
        let s = drain_secret("ns", "ec", "uid-1", "tok");
        assert_eq!(s.metadata.name.as_deref(), Some("ec-sluice-drain"));
        assert_eq!(
            s.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-1"
        );
        assert_eq!(s.data.as_ref().unwrap()[DRAIN_TOKEN_KEY].0, b"tok");
        assert!(owned_by(&s, "uid-1"));
        assert!(!owned_by(&s, "uid-2"), "a previous EventConsumer's Secret");
        assert!(!owned_by(&Secret::default(), "uid-1"));
    }
}
