//! The Sluice consumer sidecar (placeholder).
