//! Shared helpers for the PegaFlow benchmarks.
