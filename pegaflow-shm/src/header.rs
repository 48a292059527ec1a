//! The control segment header: identity, ABI version, geometry, owner state
//! and the owner's doorbell.
//!
//! The owner writes every field; engines and `pegaflow-inspect` only read,
//! except for `doorbell`, which engines bump to wake a sleeping owner.
//!
//! The plain (non-atomic) fields are written once, while the segment is a
//! fresh file under a temporary name that no other process can have mapped
//! (see `segment`), and never again: every later reader sees them settled.

use crate::geometry::Geometry;
use crate::sync::{AtomicU32, AtomicU64};

/// First eight bytes of every control segment.
pub const MAGIC: [u8; 8] = *b"PEGAFLOW";
/// Bumped on every incompatible change to any shared structure; see docs/abi.md.
pub const ABI_VERSION: u32 = 3;

/// `Header::owner_state` values.
pub mod owner_state {
    /// Zero-filled, not yet initialised.
    pub const EMPTY: u32 = 0;
    /// An owner is building or re-adopting the segment.
    pub const INITIALISING: u32 = 1;
    /// An owner serves the segment.
    pub const RUNNING: u32 = 2;
    /// The last owner exited cleanly.
    pub const STOPPED: u32 = 3;
}

#[repr(C, align(64))]
pub struct Header {
    pub magic: [u8; 8],
    pub abi_version: u32,
    pub header_bytes: u32,
    pub geometry: Geometry,
    /// Random id chosen when the segment is created; engines compare it to
    /// know whether a reconnect found the same segment or a new one.
    pub segment_id: u64,
    pub created_unix_ns: u64,
    /// `owner_state::*`.
    pub owner_state: AtomicU32,
    pub owner_pid: AtomicU32,
    /// Incremented by every owner that starts on this segment (1 = first).
    pub owner_epoch: AtomicU64,
    /// Futex word: engines add 1 after queueing work; the owner sleeps on it.
    pub doorbell: AtomicU32,
    /// 1 while the owner is (about to be) asleep on `doorbell`.
    pub owner_sleeping: AtomicU32,
    /// Monotonic tick the owner advances; used as a coarse clock for LRU
    /// state that must survive restarts.
    pub owner_tick: AtomicU64,
    /// Path of the pool file, NUL padded (for `pegaflow-inspect`).
    pub pool_path: [u8; 256],
    /// 1 when the pool is on hugetlbfs.
    pub hugepages: u32,
    pub _reserved0: u32,
    /// Device and inode of the pool file created with this segment. An
    /// engine maps the pool only if the file at `pool_path` is this inode
    /// (`PoolSegment::open_checked`): a restart that made new segments made
    /// a new pool file, and an old mapping must never be taken for it.
    pub pool_dev: u64,
    pub pool_ino: u64,
    /// Version of the owner serving the segment (`pegaflow-owner
    /// --version`), UTF-8, NUL padded; written by every owner at start,
    /// before it accepts engines. All zero: an owner older than the field.
    pub owner_version: [AtomicU64; OWNER_VERSION_BYTES / 8],
    pub _reserved: [u64; 10],
}

/// Room for the owner's version string in the header.
pub const OWNER_VERSION_BYTES: usize = 32;

#[cfg(not(loom))]
const _: () = {
    assert!(std::mem::size_of::<Header>() == 512);
    assert!(std::mem::align_of::<Header>() == 64);
};

impl Header {
    /// Record the version of the owner starting on this segment (cut to
    /// [`OWNER_VERSION_BYTES`]). Owner only, before it accepts engines.
    pub fn set_owner_version(&self, version: &str) {
        let mut bytes = [0u8; OWNER_VERSION_BYTES];
        let n = version.len().min(OWNER_VERSION_BYTES);
        bytes[..n].copy_from_slice(&version.as_bytes()[..n]);
        for (cell, chunk) in self.owner_version.iter().zip(bytes.chunks_exact(8)) {
            let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            cell.store(word, crate::sync::Ordering::Relaxed);
        }
    }

    /// The version the serving owner recorded; `None` when it recorded none.
    pub fn owner_version(&self) -> Option<String> {
        let mut bytes = Vec::with_capacity(OWNER_VERSION_BYTES);
        for cell in &self.owner_version {
            bytes.extend_from_slice(&cell.load(crate::sync::Ordering::Relaxed).to_le_bytes());
        }
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        (end > 0).then(|| String::from_utf8_lossy(&bytes[..end]).into_owned())
    }

    pub fn pool_path(&self) -> String {
        let end = self
            .pool_path
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.pool_path.len());
        String::from_utf8_lossy(&self.pool_path[..end]).into_owned()
    }
}
