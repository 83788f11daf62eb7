//! The Sluice operator: the `EventConsumer` resource, the rules that turn it into Kafka and
//! pod settings, and (next) the reconciler.

pub mod autoscaler;
pub mod build;
pub mod catalogue;
pub mod collector;
pub mod crd;
pub mod crd_check;
pub mod error;
pub mod generate;
pub mod lag;
pub mod leader;
pub mod metrics;
pub mod pacing;
pub mod reconcile;
pub mod run;
pub mod secret_index;
pub mod secrets;
pub mod status;
pub mod tuning;
