//! Typed errors of the shared-memory layer. Each variant says what went wrong
//! and what the operator or engine should do about it.

use std::path::PathBuf;

use crate::geometry::Geometry;

#[derive(Debug, thiserror::Error)]
pub enum GeometryError {
    #[error("invalid pool geometry: {what} (got {geometry:?})")]
    Invalid {
        what: &'static str,
        geometry: Box<Geometry>,
    },
}

/// Errors creating, opening or re-adopting a segment.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error(
        "another pegaflow-owner (pid {pid}) already serves '{name}' ({path}); \
         stop it first, or start this one with a different --name"
    )]
    OwnerAlive {
        name: String,
        pid: u32,
        path: PathBuf,
    },

    #[error(
        "{path} is not a PegaFlow control segment (bad magic); \
         remove it or choose another --name"
    )]
    BadMagic { path: PathBuf },

    #[error(
        "{path} was written with shm ABI version {found}, this binary speaks version {expected}; \
         the cached blocks cannot be re-adopted across ABI versions: stop every engine and owner \
         of this name, then start the owner with --discard-existing (see docs/operations.md)"
    )]
    AbiMismatch {
        path: PathBuf,
        found: u32,
        expected: u32,
    },

    #[error(
        "{path} has pool geometry {found:?} but the owner was asked for {expected:?}; \
         start with the same --pool-size/--slab-size/--min-slot-size/--max-clients to keep the cache, \
         or with --discard-existing to drop it"
    )]
    GeometryMismatch {
        path: PathBuf,
        found: Box<Geometry>,
        expected: Box<Geometry>,
    },

    #[error("{path} is {actual} bytes but its header describes {expected} bytes: the segment is truncated or corrupt")]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },

    #[error(transparent)]
    Geometry(#[from] GeometryError),

    #[error(
        "no hugetlbfs mount with 2 MiB pages found in /proc/mounts; mount one with \
         `mount -t hugetlbfs -o pagesize=2M none /dev/hugepages` or run without --use-hugepages"
    )]
    NoHugetlbfs,

    #[error(
        "not enough free 2 MiB huge pages: need {needed} for the pool, {free} free; \
         reserve more with `echo {suggest} > /proc/sys/vm/nr_hugepages` (as root) \
         or shrink --pool-size"
    )]
    NotEnoughHugepages {
        needed: u64,
        free: u64,
        suggest: u64,
    },

    #[error("{path}: owner has not finished initialising the segment (state {state}); retry in a moment")]
    NotReady { path: PathBuf, state: u32 },
}

/// Errors decoding a request that an engine put in its ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown request tag {0:#x}")]
    UnknownTag(u32),
    #[error("touch request claims {0} slots, at most 14 fit")]
    BadCount(u32),
    #[error("reserved bytes are not zero")]
    NonZeroPadding,
}

/// Errors of the socket protocol between engines and the owner.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("socket i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer closed the connection")]
    Closed,
    #[error("message of {0} bytes exceeds the 1 MiB limit")]
    TooLarge(u32),
    #[error("malformed message: {0}")]
    Decode(String),
}
