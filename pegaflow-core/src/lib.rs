//! The engine side of PegaFlow: an in-process library that finds, pins,
//! saves and loads KV blocks in the owner's shared pool.
//!
//! - [`engine`]: the client of the owner (lookups, pins, saves, releases
//!   through shared memory; reconnects by itself);
//! - [`keys`]: block keys derived from content (the same in every process);
//! - [`layout`], [`copy`], [`transfer`], [`cuda`]: the data path between an
//!   engine's KV cache (GPU or host) and the pool.
pub mod copy;
pub mod cuda;
pub mod engine;
pub mod error;
pub mod keys;
pub mod layout;
mod session;
pub mod transfer;

pub use engine::{
    Engine, EngineConfig, EngineStats, Pinned, PinnedBlock, Reservation, StageTicket,
};
pub use error::EngineError;
pub use pegaflow_shm::slot_table::BlockKey;
