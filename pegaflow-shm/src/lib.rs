//! The shared-memory ABI of PegaFlow.
//!
//! Both the owner daemon and every engine compile against this crate. It
//! holds plain `#[repr(C)]` data at fixed offsets (never pointers), the
//! lock-free algorithms that run over it, and the small control-plane
//! protocol spoken on the owner's Unix socket. No threads, no CUDA.
//!
//! Map of the crate (see `docs/abi.md` for the byte layout):
//! - [`geometry`]: pool geometry and the control segment's layout;
//! - [`header`]: magic, ABI version, owner epoch, doorbell;
//! - [`slot_table`]: slab and slot tables, the pin/evict handshake;
//! - [`index`]: the seqlock hash index engines read without locks;
//! - [`client`]: the client table and its counters;
//! - [`ring`], [`request`]: SPSC rings and what engines put in them;
//! - [`doorbell`]: the futex that lets an idle owner sleep;
//! - [`segment`]: creating, re-adopting and mapping the segments;
//! - [`proto`]: the socket hello and CUDA IPC brokering messages.

pub mod client;
pub mod doorbell;
pub mod error;
pub mod geometry;
pub mod header;
pub mod index;
pub mod proto;
pub mod request;
pub mod ring;
#[cfg(not(loom))]
pub mod segment;
pub mod slot_table;
pub mod sync;

pub use error::{DecodeError, GeometryError, ProtoError, SegmentError};
pub use geometry::Geometry;
pub use header::ABI_VERSION;
pub use slot_table::{BlockKey, SlotKind, SlotState};
