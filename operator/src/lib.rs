//! The Sluice operator (placeholder).
