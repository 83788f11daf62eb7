//! The Sluice consumer sidecar.
//!
//! Pure parts, tested without I/O: [`offsets`] (the committable prefix), [`progress`] (a
//! partition's shared state for one assignment), [`policy`]
//! (response classification, retries and backoff), [`cloudevents`] (request headers) and the
//! scheduling in [`dispatch`]. The I/O shell: [`kafka`] (the consumer thread and rebalance
//! callbacks), [`deliver`] (HTTP and the dead-letter producer), [`workers`] (the long-lived
//! tasks deliveries run on), [`sidecar`] (wiring), [`admin`] (the admin HTTP endpoint) and
//! [`cli`].

pub mod admin;
pub mod cli;
pub mod cloudevents;
pub mod deliver;
pub mod dispatch;
pub mod kafka;
pub mod metrics;
pub mod offsets;
pub mod policy;
pub mod progress;
pub mod record;
pub mod sidecar;
pub mod workers;
