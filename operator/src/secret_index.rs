//! The index from a Secret to the EventConsumers that reference it, kept from the
//! EventConsumer watch, so a Secret event finds its EventConsumers without scanning all of
//! them.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use kube::ResourceExt;
use kube::runtime::watcher::Event;

use crate::reconcile::Guarded;
use crate::secrets;

/// (namespace, name).
type Key = (String, String);

#[derive(Debug, Default)]
struct Inner {
    /// (namespace, Secret) → the EventConsumers in that namespace that reference it.
    by_secret: HashMap<Key, BTreeSet<String>>,
    /// (namespace, EventConsumer) → the Secrets it references.
    by_consumer: HashMap<Key, BTreeSet<String>>,
    /// A re-list under way: the references seen so far (replaces everything at its end).
    relist: Option<HashMap<Key, BTreeSet<String>>>,
}

/// Secret → EventConsumers, maintained from the EventConsumer watch events.
#[derive(Debug, Default)]
pub struct SecretIndex {
    inner: Mutex<Inner>,
}

/// The Secrets an EventConsumer references (none for one that does not parse).
fn references(obj: &Guarded) -> BTreeSet<String> {
    match &obj.0 {
        Ok(ec) => secrets::referenced_names(&ec.spec),
        Err(_) => BTreeSet::new(),
    }
}

fn key(obj: &Guarded) -> Key {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

impl Inner {
    fn set(&mut self, consumer: Key, refs: BTreeSet<String>) {
        let (ns, name) = &consumer;
        if let Some(old) = self.by_consumer.remove(&consumer) {
            for s in old.difference(&refs) {
                let k = (ns.clone(), s.clone());
                if let Some(set) = self.by_secret.get_mut(&k) {
                    set.remove(name);
                    if set.is_empty() {
                        self.by_secret.remove(&k);
                    }
                }
            }
        }
        for s in &refs {
            self.by_secret
                .entry((ns.clone(), s.clone()))
                .or_default()
                .insert(name.clone());
        }
        if !refs.is_empty() {
            self.by_consumer.insert(consumer, refs);
        }
    }
}

impl SecretIndex {
    /// Applies one event of the EventConsumer watch.
    pub fn apply(&self, event: &Event<Guarded>) {
        let mut inner = self.inner.lock().expect("not poisoned");
        match event {
            Event::Apply(obj) => inner.set(key(obj), references(obj)),
            Event::Delete(obj) => inner.set(key(obj), BTreeSet::new()),
            Event::Init => inner.relist = Some(HashMap::new()),
            Event::InitApply(obj) => {
                let refs = references(obj);
                if !refs.is_empty() {
                    inner.relist.get_or_insert_default().insert(key(obj), refs);
                }
            }
            Event::InitDone => {
                let listed = inner.relist.take().unwrap_or_default();
                inner.by_consumer.clear();
                inner.by_secret.clear();
                for (k, refs) in listed {
                    inner.set(k, refs);
                }
            }
        }
    }

    /// The EventConsumers in `namespace` that reference the Secret `name`.
    pub fn consumers(&self, namespace: &str, name: &str) -> Vec<String> {
        let inner = self.inner.lock().expect("not poisoned");
        inner
            .by_secret
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether any EventConsumer references the Secret.
    pub fn is_referenced(&self, namespace: &str, name: &str) -> bool {
        let inner = self.inner.lock().expect("not poisoned");
        inner
            .by_secret
            .contains_key(&(namespace.to_owned(), name.to_owned()))
    }

    /// (Secrets indexed, EventConsumers indexed), for tests and sizing.
    pub fn len(&self) -> (usize, usize) {
        let inner = self.inner.lock().expect("not poisoned");
        (inner.by_secret.len(), inner.by_consumer.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ec(ns: &str, name: &str, secrets: &[&str]) -> Guarded {
        let auth = match secrets {
            [] => String::new(),
            [sasl] => {
                format!(", auth: {{sasl: {{mechanism: PLAIN, secretRef: {{name: {sasl}}}}}}}")
            }
            [sasl, ca, ..] => format!(
                ", auth: {{sasl: {{mechanism: PLAIN, secretRef: {{name: {sasl}}}}}, tls: {{caSecretRef: {{name: {ca}, key: ca.crt}}}}}}"
            ),
        };
        let yaml = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: EventConsumer\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  kafka: {{bootstrapServers: 'k:9092', topics: [a]{auth}}}\n  delivery: {{url: 'http://127.0.0.1:8080/'}}\n  template: {{spec: {{containers: [{{name: app}}]}}}}\n"
        );
        let g: Guarded = serde_norway::from_str(&yaml).unwrap();
        assert!(g.0.is_ok(), "{yaml}");
        g
    }

    fn look(i: &SecretIndex, ns: &str, s: &str) -> Vec<String> {
        i.consumers(ns, s)
    }

    #[test]
    fn applies_add_change_and_remove_references() {
        let i = SecretIndex::default();
        i.apply(&Event::Apply(ec("a", "one", &["creds"])));
        i.apply(&Event::Apply(ec("a", "two", &["creds", "ca"])));
        i.apply(&Event::Apply(ec("b", "three", &["creds"])));
        i.apply(&Event::Apply(ec("a", "plain", &[])));
        assert_eq!(look(&i, "a", "creds"), ["one", "two"]);
        assert_eq!(look(&i, "a", "ca"), ["two"]);
        assert_eq!(look(&i, "b", "creds"), ["three"]);
        assert!(look(&i, "b", "ca").is_empty(), "namespaces are apart");
        assert_eq!(i.len(), (3, 3), "one without references is not kept");
        // two moves from creds+ca to other: ca is gone, creds loses it.
        i.apply(&Event::Apply(ec("a", "two", &["other"])));
        assert_eq!(look(&i, "a", "creds"), ["one"]);
        assert!(look(&i, "a", "ca").is_empty());
        assert!(!i.is_referenced("a", "ca"));
        assert_eq!(look(&i, "a", "other"), ["two"]);
        // Re-applying the same object changes nothing.
        i.apply(&Event::Apply(ec("a", "two", &["other"])));
        assert_eq!(look(&i, "a", "other"), ["two"]);
        // Deletion and dropping every reference.
        i.apply(&Event::Delete(ec("a", "one", &["creds"])));
        i.apply(&Event::Apply(ec("a", "two", &[])));
        assert!(look(&i, "a", "creds").is_empty());
        assert!(look(&i, "a", "other").is_empty());
        assert_eq!(i.len(), (1, 1));
        assert_eq!(look(&i, "b", "creds"), ["three"]);
        i.apply(&Event::Delete(ec("b", "three", &["creds"])));
        assert!(i.is_empty());
    }

    #[test]
    fn a_relist_replaces_everything_at_its_end() {
        let i = SecretIndex::default();
        i.apply(&Event::Apply(ec("a", "gone", &["old"])));
        i.apply(&Event::Apply(ec("a", "kept", &["creds"])));
        i.apply(&Event::Init);
        i.apply(&Event::InitApply(ec("a", "kept", &["creds", "ca"])));
        i.apply(&Event::InitApply(ec("a", "new", &["creds"])));
        // Until the re-list ends, the old view answers.
        assert_eq!(look(&i, "a", "old"), ["gone"]);
        assert_eq!(look(&i, "a", "creds"), ["kept"]);
        i.apply(&Event::InitDone);
        assert!(
            look(&i, "a", "old").is_empty(),
            "deleted while the watch was down"
        );
        assert_eq!(look(&i, "a", "creds"), ["kept", "new"]);
        assert_eq!(look(&i, "a", "ca"), ["kept"]);
        // An empty re-list empties the index; an InitDone without Init is harmless.
        i.apply(&Event::Init);
        i.apply(&Event::InitDone);
        assert!(i.is_empty());
        i.apply(&Event::InitDone);
        assert!(i.is_empty());
    }

    #[test]
    fn a_malformed_object_references_nothing_and_drops_what_it_referenced() {
        let i = SecretIndex::default();
        i.apply(&Event::Apply(ec("a", "x", &["creds"])));
        let bad: Guarded = serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "EventConsumer",
            "metadata": {"name": "x", "namespace": "a"}, "spec": {"kafka": 5}
        }))
        .unwrap();
        assert!(bad.0.is_err());
        i.apply(&Event::Apply(bad));
        assert!(look(&i, "a", "creds").is_empty());
    }
}
