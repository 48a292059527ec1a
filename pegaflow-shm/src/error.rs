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
        "another pegaflow-owner (pid {pid}) already serves '{name}' (it holds the lock {path}); \
         stop it first, or start this one with a different --name"
    )]
    OwnerAlive {
        name: String,
        pid: u32,
        path: PathBuf,
    },

    #[error(
        "{path} is not a PegaFlow control segment (bad magic); \
         choose another --name, or start the owner with --discard-existing to replace it"
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

    #[error("{path} is {actual} bytes but {expected} bytes were expected: the pool file was replaced or truncated")]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },

    #[error(
        "{path} is {actual} bytes but its header describes {expected} bytes: the control segment \
         is truncated or corrupt and its cache cannot be re-adopted; start the owner with \
         --discard-existing to replace it with an empty one"
    )]
    Truncated {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },

    #[error(
        "{path} is not the pool file of this control segment (it is device {}, inode {}; the \
         segment was created with device {}, inode {}): the owner made new segments since; \
         reconnect to map the new ones",
        found.0, found.1, expected.0, expected.1
    )]
    PoolReplaced {
        path: PathBuf,
        expected: (u64, u64),
        found: (u64, u64),
    },

    #[error(
        "cannot reserve {} for {path}: {} free on that filesystem{}. Free space there, \
         start with a smaller --pool-size, or grow the filesystem (tmpfs: \
         `mount -o remount,size=N /dev/shm`; huge pages: raise vm.nr_hugepages)",
        human(*asked), human(*free), .hint
    )]
    NoSpace {
        path: PathBuf,
        asked: u64,
        free: u64,
        /// Extra context, e.g. what else on the filesystem holds space.
        hint: String,
    },

    #[error(
        "cannot give {path} mode {mode:o}{}: {source}; the owner's user must own the file \
         and be a member of that group (or run as root)",
        gid.map(|g| format!(" and group {g}")).unwrap_or_default()
    )]
    Permissions {
        path: PathBuf,
        mode: u32,
        gid: Option<u32>,
        source: std::io::Error,
    },

    #[error("{path}: the pool path is longer than the 255 bytes the control segment can record; use a shorter PEGAFLOW_SHM_DIR or --hugepage-dir")]
    PathTooLong { path: PathBuf },

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

/// `3221225472` -> `3.0 GiB` (for messages only; the owner's messages use it
/// too).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
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
