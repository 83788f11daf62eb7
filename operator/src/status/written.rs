//! What this replica last wrote to each EventConsumer's status, until its cache shows it.
//!
//! A reconcile compares the status it computes with the one it read from the cache, and
//! writes only on a change. Right after a write the cache may still hold the status from
//! before it (the watch event of the write has not arrived), and a reconcile in that moment
//! — started by a child's change, say — compared against that older status: new conditions,
//! new transition times, a second write and the same events published twice. At 1 000 new
//! EventConsumers that was 1.11 status writes per EventConsumer instead of 1. With this
//! record, while the cache still shows exactly what it showed before this replica's last
//! write, the reconcile compares against that write instead.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::crd::EventConsumerStatus;

/// (namespace, name).
type Key = (String, String);

struct Entry {
    uid: String,
    /// The status the cache showed when the write was made.
    before: Option<EventConsumerStatus>,
    written: EventConsumerStatus,
}

#[derive(Default)]
pub struct Written {
    entries: Mutex<HashMap<Key, Entry>>,
}

impl Written {
    /// The status to compare a new one against: the cache's, except while the cache still
    /// shows exactly what it showed before this replica's last write to the same object
    /// (same uid), when it is that write. Once the cache shows something else (the write,
    /// or anyone's later change), the record is dropped and the cache is believed.
    pub fn current(
        &self,
        ns: &str,
        name: &str,
        uid: &str,
        cached: Option<&EventConsumerStatus>,
    ) -> Option<EventConsumerStatus> {
        let mut entries = self.entries.lock().expect("not poisoned");
        let key = (ns.to_owned(), name.to_owned());
        match entries.get(&key) {
            Some(e) if e.uid == uid && e.before.as_ref() == cached => Some(e.written.clone()),
            Some(_) => {
                entries.remove(&key);
                cached.cloned()
            }
            None => cached.cloned(),
        }
    }

    /// Records a write: `before` is what the cache showed, `written` what was written.
    pub fn record(
        &self,
        ns: &str,
        name: &str,
        uid: &str,
        before: Option<&EventConsumerStatus>,
        written: &EventConsumerStatus,
    ) {
        self.entries.lock().expect("not poisoned").insert(
            (ns.to_owned(), name.to_owned()),
            Entry {
                uid: uid.to_owned(),
                before: before.cloned(),
                written: written.clone(),
            },
        );
    }

    /// Forgets an EventConsumer (deleted).
    pub fn forget(&self, ns: &str, name: &str) {
        self.entries
            .lock()
            .expect("not poisoned")
            .remove(&(ns.to_owned(), name.to_owned()));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().expect("not poisoned").len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(phase: &str) -> EventConsumerStatus {
        EventConsumerStatus {
            topics: Some(phase.to_owned()),
            ..Default::default()
        }
    }

    #[test]
    fn a_cache_that_has_not_seen_the_write_yet_is_compared_as_the_write() {
        let w = Written::default();
        let (a, b) = (status("a"), status("b"));
        // Nothing recorded: the cache.
        assert_eq!(w.current("ns", "ec", "u1", Some(&a)), Some(a.clone()));
        assert_eq!(w.current("ns", "ec", "u1", None), None);

        // First status of a new object: the cache had none.
        w.record("ns", "ec", "u1", None, &a);
        assert_eq!(w.current("ns", "ec", "u1", None), Some(a.clone()), "stale");
        assert_eq!(w.len(), 1);
        // The cache caught up: believed, and the record dropped.
        assert_eq!(w.current("ns", "ec", "u1", Some(&a)), Some(a.clone()));
        assert!(w.is_empty());

        // A later write, then someone else's change before the cache showed ours: the
        // cache shows neither "before" nor the write, so it is believed.
        w.record("ns", "ec", "u1", Some(&a), &b);
        assert_eq!(w.current("ns", "ec", "u1", Some(&a)), Some(b.clone()));
        let c = status("c");
        assert_eq!(w.current("ns", "ec", "u1", Some(&c)), Some(c.clone()));
        assert!(w.is_empty());
        assert_eq!(w.current("ns", "ec", "u1", Some(&a)), Some(a.clone()));
    }

    #[test]
    fn a_record_applies_to_the_same_object_only() {
        let w = Written::default();
        let a = status("a");
        w.record("ns", "ec", "u1", None, &a);
        // Recreated under the same name: a new uid, the cache is believed.
        assert_eq!(w.current("ns", "ec", "u2", None), None);
        assert!(w.is_empty());
        // Another name or namespace has no record.
        w.record("ns", "ec", "u1", None, &a);
        assert_eq!(w.current("ns", "other", "u1", None), None);
        assert_eq!(w.current("other", "ec", "u1", None), None);
        w.forget("ns", "ec");
        assert!(w.is_empty());
    }
}
