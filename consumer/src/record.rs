//! An owned Kafka record, detached from librdkafka's buffers.

use std::sync::Arc;

use bytes::Bytes;

/// A topic and partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tp {
    pub topic: Arc<str>,
    pub partition: i32,
}

impl Tp {
    pub fn new(topic: &str, partition: i32) -> Tp {
        Tp {
            topic: Arc::from(topic),
            partition,
        }
    }
}

/// A borrowed topic and partition that looks up a [`Tp`]-keyed `hashbrown` map without
/// building a `Tp` (an allocation for the topic's name) for every fetched record. Its derived
/// `Hash` hashes the same fields in the same order as `Tp`'s (`Arc<str>` hashes as `str`), so
/// equal values hash equally, as `Equivalent` requires.
#[derive(Clone, Copy, Debug, Hash)]
pub struct TpRef<'a> {
    pub topic: &'a str,
    pub partition: i32,
}

impl hashbrown::Equivalent<Tp> for TpRef<'_> {
    fn equivalent(&self, tp: &Tp) -> bool {
        self.partition == tp.partition && self.topic == &*tp.topic
    }
}

impl std::fmt::Display for Tp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// One consumed record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub tp: Tp,
    pub offset: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Milliseconds since the Unix epoch, when the record has a timestamp.
    pub timestamp_ms: Option<i64>,
}

impl Record {
    /// Bytes held by this record (key, value and headers), for memory bounds.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len)
            + self.value.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Bytes::len))
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn a_borrowed_topic_and_partition_finds_exactly_its_own_entry() {
        let mut map: hashbrown::HashMap<Tp, u32> = hashbrown::HashMap::new();
        for (i, topic) in ["orders", "order", "orders-dlq", ""]
            .into_iter()
            .enumerate()
        {
            for p in [0, 1, 12, -1, i32::MAX] {
                map.insert(
                    Tp::new(topic, p),
                    (i as u32) * 1000 + p.unsigned_abs() % 1000,
                );
            }
        }
        for (i, topic) in ["orders", "order", "orders-dlq", ""]
            .into_iter()
            .enumerate()
        {
            for p in [0, 1, 12, -1, i32::MAX] {
                let key = TpRef {
                    topic,
                    partition: p,
                };
                let (tp, v) = map.get_key_value(&key).expect("found by its borrowed form");
                assert_eq!((&*tp.topic, tp.partition), (topic, p));
                assert_eq!(*v, (i as u32) * 1000 + p.unsigned_abs() % 1000);
                assert_eq!(
                    map.hasher().hash_one(key),
                    map.hasher().hash_one(tp),
                    "equal values hash equally"
                );
            }
        }
        for (topic, p) in [("orders", 2), ("ordersx", 0), ("Orders", 0), ("orde", 1)] {
            assert!(
                map.get(&TpRef {
                    topic,
                    partition: p
                })
                .is_none()
            );
        }
    }
}
