//! `pegaflow-inspect`: read a PegaFlow control segment without disturbing
//! it.
//!
//! ## Why this is safe on a live owner
//!
//! - The segment is mapped read-only (`ControlSegment::open_read_only`,
//!   `PROT_READ`): a write would fault, so none can happen by mistake. No
//!   `flock` is taken, so a live owner is not blocked and a dead one's
//!   segment can be read post-mortem.
//! - Nothing here calls a ring's `pop` (it moves `head`). Stash entries are
//!   read with `pread` on the control file, which shares the page cache with
//!   every mapping of it.
//! - Index buckets are read with `pread` too and decoded here
//!   ([`decode_bucket`]), never through `Index::get`: a dead owner can leave
//!   a bucket with an odd sequence number forever, which the seqlock reader
//!   would spin on.
//!
//! A live owner keeps writing while we read, so a snapshot can be
//! inconsistent for a moment; `verify` re-checks a finding after a pause
//! before it reports it.
//!
//! This module depends on `pegaflow-shm`, std and `serde_json` only.

pub mod report;
pub mod verify;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use pegaflow_shm::client::{client_state, ClientEntry, ENGINE_COUNTER_NAMES, OWNER_COUNTER_NAMES};
use pegaflow_shm::header::owner_state;
use pegaflow_shm::index::{Bucket, BUCKET_BYTES};
use pegaflow_shm::ring::RingHeader;
use pegaflow_shm::segment::{pid_alive, ControlSegment};
use pegaflow_shm::slot_table::{BlockKey, SlotKind, SlotState};
use pegaflow_shm::sync::Ordering;
use pegaflow_shm::SegmentError;

/// Failure to read the segment at all (exit status 2).
#[derive(Debug)]
pub enum InspectError {
    /// Missing file, wrong magic or ABI, truncated...
    Open {
        path: PathBuf,
        source: Box<SegmentError>,
    },
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl std::fmt::Display for InspectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InspectError::Open { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())?;
                if let SegmentError::Io { source: e, .. } = source.as_ref() {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        write!(
                            f,
                            "; no owner has created this instance: check --name (or PEGAFLOW_NAME), \
                             PEGAFLOW_SHM_DIR, or pass --control PATH"
                        )?;
                    } else if e.kind() == std::io::ErrorKind::PermissionDenied {
                        write!(
                            f,
                            "; run as the owner's user, or as a member of its --group"
                        )?;
                    }
                }
                Ok(())
            }
            InspectError::Io { path, source } => write!(f, "{}: {source}", path.display()),
        }
    }
}

impl std::error::Error for InspectError {}

/// A mapped control segment plus a plain file handle for `pread`.
pub struct Target {
    pub seg: ControlSegment,
    pub path: PathBuf,
    file: File,
}

impl Target {
    pub fn open(path: &Path) -> Result<Target, InspectError> {
        let seg = ControlSegment::open_read_only(path).map_err(|source| InspectError::Open {
            path: path.into(),
            source: Box::new(source),
        })?;
        let file = File::open(path).map_err(|source| InspectError::Io {
            path: path.into(),
            source,
        })?;
        Ok(Target {
            seg,
            path: path.into(),
            file,
        })
    }

    /// Every index bucket. A bucket caught mid-update (odd sequence) is
    /// read again a few times before it is reported as torn.
    pub fn buckets(&self) -> Result<Vec<BucketRead>, InspectError> {
        let g = self.seg.geometry();
        let base = self.seg.layout().index;
        let mut raw = vec![0u8; (g.index_buckets * BUCKET_BYTES) as usize];
        self.read_at(&mut raw, base)?;
        let mut out: Vec<BucketRead> = raw
            .chunks_exact(BUCKET_BYTES as usize)
            .map(decode_bucket)
            .collect();
        for (i, b) in out.iter_mut().enumerate() {
            let mut tries = 0;
            while matches!(b, BucketRead::Torn { .. }) && tries < 20 {
                std::thread::sleep(std::time::Duration::from_millis(1));
                let mut one = [0u8; BUCKET_BYTES as usize];
                self.read_at(&mut one, base + i as u64 * BUCKET_BYTES)?;
                *b = decode_bucket(&one);
                tries += 1;
            }
        }
        Ok(out)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), InspectError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| InspectError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Stash words of client `i` between `head` and `tail` (at most `cap`).
    pub fn stash_words(&self, i: u32, head: u64, tail: u64) -> Result<Vec<u64>, InspectError> {
        let g = self.seg.geometry();
        let l = self.seg.layout();
        let cap = g.stash_ring_cap;
        let base = l.clients
            + u64::from(i) * l.client.bytes
            + l.client.stash_ring
            + std::mem::size_of::<RingHeader>() as u64;
        let mut raw = vec![0u8; (cap * 8) as usize];
        self.read_at(&mut raw, base)?;
        let n = tail.wrapping_sub(head).min(cap);
        Ok((0..n)
            .map(|k| {
                let at = (head.wrapping_add(k) & (cap - 1)) as usize * 8;
                u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes"))
            })
            .collect())
    }
}

/// One bucket of the index as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BucketRead {
    Empty,
    Entry {
        key: BlockKey,
        slot: u32,
    },
    /// The sequence number stayed odd: the owner is (or died) in the middle
    /// of rewriting this bucket.
    Torn {
        seq: u32,
    },
}

/// Decode one bucket's 64 bytes (`pegaflow_shm::index::Bucket`: `seq: u32`,
/// `slot_plus_one: u32`, `namespace: u64`, `hash: [u64; 4]`, little-endian).
pub fn decode_bucket(b: &[u8]) -> BucketRead {
    let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let seq = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes"));
    let plus_one = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
    if seq & 1 == 1 {
        return BucketRead::Torn { seq };
    }
    if plus_one == 0 {
        return BucketRead::Empty;
    }
    BucketRead::Entry {
        key: BlockKey::from_words(word(8), [word(16), word(24), word(32), word(40)]),
        slot: plus_one - 1,
    }
}

const _: () = assert!(std::mem::size_of::<Bucket>() as u64 == BUCKET_BYTES && BUCKET_BYTES == 64);

pub fn owner_state_name(s: u32) -> &'static str {
    match s {
        owner_state::EMPTY => "empty",
        owner_state::INITIALISING => "initialising",
        owner_state::RUNNING => "running",
        owner_state::STOPPED => "stopped",
        _ => "invalid",
    }
}

pub fn client_state_name(s: u32) -> &'static str {
    match s {
        client_state::FREE => "free",
        client_state::LIVE => "live",
        client_state::ORPHANED => "orphaned",
        client_state::QUARANTINED => "quarantined",
        _ => "invalid",
    }
}

pub fn slot_kind_name(k: SlotKind) -> &'static str {
    match k {
        SlotKind::Free => "free",
        SlotKind::Writing => "writing",
        SlotKind::Committed => "committed",
        SlotKind::Evicting => "evicting",
    }
}

pub fn hex(hash: &[u8; 32]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the header says about the owner.
pub struct OwnerFacts {
    pub state: u32,
    pub pid: u32,
    pub alive: bool,
    pub epoch: u64,
    pub tick: u64,
}

pub fn owner_facts(seg: &ControlSegment) -> OwnerFacts {
    let h = seg.header();
    let pid = h.owner_pid.load(Ordering::SeqCst);
    let state = h.owner_state.load(Ordering::SeqCst);
    OwnerFacts {
        state,
        pid,
        alive: state != owner_state::STOPPED && pid_alive(pid),
        epoch: h.owner_epoch.load(Ordering::SeqCst),
        tick: h.owner_tick.load(Ordering::Relaxed),
    }
}

/// One slot of an assigned slab.
pub struct SlotInfo {
    pub slot: u32,
    pub slab: u32,
    pub stride: u64,
    pub state: Option<SlotState>,
    pub raw_state: u64,
}

/// Every slot of every assigned slab (slabs with a stride), in id order.
pub fn assigned_slots(seg: &ControlSegment) -> Vec<SlotInfo> {
    let per = seg.geometry().slots_per_slab();
    let slots = seg.slots();
    let mut out = Vec::new();
    for (s, slab) in seg.slabs().iter().enumerate() {
        let stride = slab.stride.load(Ordering::Acquire);
        if stride == 0 {
            continue;
        }
        let n = u64::from(slab.nslots.load(Ordering::Relaxed)).min(per);
        for k in 0..n {
            let id = s as u64 * per + k;
            let raw = slots[id as usize].state.load(Ordering::SeqCst);
            out.push(SlotInfo {
                slot: id as u32,
                slab: s as u32,
                stride,
                state: SlotState::unpack(raw),
                raw_state: raw,
            });
        }
    }
    out
}

/// A client entry's counters as (name, value) pairs.
pub fn engine_counters(e: &ClientEntry) -> Vec<(&'static str, u64)> {
    ENGINE_COUNTER_NAMES
        .iter()
        .zip(&e.engine_counters)
        .map(|(n, c)| (*n, c.load(Ordering::Relaxed)))
        .collect()
}

pub fn owner_counters(e: &ClientEntry) -> Vec<(&'static str, u64)> {
    OWNER_COUNTER_NAMES
        .iter()
        .zip(&e.owner_counters)
        .map(|(n, c)| (*n, c.load(Ordering::Relaxed)))
        .collect()
}

/// Parse a namespace given as decimal or `0x` hex.
pub fn parse_namespace(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|e| format!("namespace '{s}': {e} (decimal or 0x-prefixed hex)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_bucket_is_reported_not_spun_on() {
        let mut b = [0u8; 64];
        assert_eq!(decode_bucket(&b), BucketRead::Empty);
        b[0] = 7;
        assert_eq!(decode_bucket(&b), BucketRead::Torn { seq: 7 });
        b[0] = 8;
        b[4] = 5;
        b[8] = 3;
        b[16] = 0xab;
        match decode_bucket(&b) {
            BucketRead::Entry { key, slot } => {
                assert_eq!((key.namespace, slot, key.hash[0]), (3, 4, 0xab));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn namespaces_parse_in_hex_and_decimal() {
        assert_eq!(parse_namespace("0x10"), Ok(16));
        assert_eq!(parse_namespace("16"), Ok(16));
        assert!(parse_namespace("zz").is_err());
    }
}
