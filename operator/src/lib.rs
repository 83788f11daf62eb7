//! The Sluice operator: the `EventConsumer` resource, the rules that turn it into Kafka and
//! pod settings, and (next) the reconciler.

pub mod build;
pub mod crd;
pub mod generate;
pub mod tuning;
