//! The Sluice sidecar configuration (placeholder until the consumer lands).
