//! The hold table: how a prefill instance lends a finished prompt's GPU
//! blocks to the decode instance that copies them (P/D on one node, see
//! docs/pd.md), and how it learns the decode is done with them.
//!
//! One table per prefill (producer) instance, a file in `/dev/shm` created
//! by its scheduler; decode (consumer) instances map it by the name the
//! prefill's `kv_transfer_params` carry. Nothing in the params is trusted:
//! the GPU block ids, the prompt's key and the producer's namespaces are in
//! the table, written only by the producer, and a consumer copies only a
//! hold whose key is its own prompt's.
//!
//! A slot holds one request's blocks: the number of blocks, the content
//! key of the last one (which names the whole prefix, keys are chained)
//! and the producer's GPU block ids; plus one state word per TP rank,
//! `ticket << 32 | state << 24 | pid`:
//!
//! ```text
//!   producer: hold           consumer rank r: take        consumer: done
//!   FREE ───────────► HELD(t) ───────────────► TAKEN(t, pid) ─────────► DONE(t)
//!                        │ producer: expire (hold timed out)               │
//!                        └──────────────► EXPIRED(t) ◄─── pid dead ────────┘ (TAKEN only)
//!   producer: free (once every rank is DONE or EXPIRED) ─► FREE
//! ```
//!
//! Invariants:
//! 1. Only the producer writes a slot's contents, and only while every
//!    rank's word is FREE; it publishes them with a release store of
//!    HELD(t). Contents are immutable until the producer frees the slot.
//! 2. The producer lets vLLM reuse the blocks only once every rank's word
//!    is DONE or EXPIRED ([`HoldTable::over`]). A consumer copies only
//!    after its compare-and-swap HELD(t) -> TAKEN(t, pid) succeeded, so a
//!    hold can never expire under a copy: EXPIRED comes from HELD, or from
//!    TAKEN once the taking process is gone (its CUDA context, and with it
//!    every copy it queued, died first).
//! 3. Tickets are never reused within a table (a 32-bit counter the
//!    producer advances per hold), so a consumer holding an old ticket
//!    finds a different word and gives up.
//!
//! The table is engine-to-engine shared memory: all of it is read through
//! atomics, every length from the file is bounds-checked, and a table
//! whose header is not complete (`ready`) or not of this version is
//! refused.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use memmap2::MmapMut;
use thiserror::Error;

use crate::segment::pid_alive;

/// "PGFHOLD1" little-endian.
pub const HOLD_MAGIC: u64 = u64::from_le_bytes(*b"PGFHOLD1");
pub const HOLD_VERSION: u32 = 1;
/// TP ranks a table can describe.
pub const MAX_RANKS: usize = 8;
/// Bytes of a rank's peer key (the owner-brokered name of its exported KV
/// cache), NUL-padded.
pub const PEER_KEY_BYTES: usize = 64;
/// Bytes of a block key.
pub const KEY_BYTES: usize = 32;
/// Largest table this code creates or maps.
pub const MAX_TABLE_BYTES: usize = 256 << 20;
/// Where tables live, and their names' prefix.
pub const SHM_DIR: &str = "/dev/shm";
pub const NAME_PREFIX: &str = "pegaflow-pd-";

/// A rank's hold state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum HoldState {
    Free = 0,
    Held = 1,
    Taken = 2,
    Done = 3,
    Expired = 4,
}

impl HoldState {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Free,
            1 => Self::Held,
            2 => Self::Taken,
            3 => Self::Done,
            4 => Self::Expired,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Free => "free",
            Self::Held => "held",
            Self::Taken => "taken",
            Self::Done => "done",
            Self::Expired => "expired",
        }
    }
}

/// One decoded state word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Word {
    pub ticket: u32,
    pub state: HoldState,
    pub pid: u32,
}

const PID_MASK: u64 = (1 << 24) - 1;

fn pack(ticket: u32, state: HoldState, pid: u32) -> u64 {
    (ticket as u64) << 32 | (state as u64) << 24 | (pid as u64 & PID_MASK)
}

fn unpack(w: u64) -> Option<Word> {
    Some(Word {
        ticket: (w >> 32) as u32,
        state: HoldState::from_u8((w >> 24) as u8)?,
        pid: (w & PID_MASK) as u32,
    })
}

/// The table's header, at offset 0.
#[repr(C)]
pub struct HoldHeader {
    pub magic: AtomicU64,
    pub version: AtomicU32,
    pub ranks: AtomicU32,
    pub capacity: AtomicU32,
    pub max_blocks: AtomicU32,
    pub slot_bytes: AtomicU32,
    pub creator_pid: AtomicU32,
    /// Random per table: tells a re-created table of the same name apart.
    pub nonce: AtomicU64,
    /// The producer's namespace of each rank (same model, layout and TP:
    /// the consumer's must be equal).
    pub namespaces: [AtomicU64; MAX_RANKS],
    /// 1 once everything above is written (release).
    pub ready: AtomicU32,
    _pad: u32,
    pub peer_keys: [[AtomicU64; PEER_KEY_BYTES / 8]; MAX_RANKS],
}

/// Bytes before slot 0.
pub const HEADER_BYTES: usize = 1024;
const _: () = assert!(std::mem::size_of::<HoldHeader>() <= HEADER_BYTES);
const _: () = assert!(std::mem::align_of::<HoldHeader>() == 8);

/// A slot's fixed part; `max_blocks` u32 block ids follow.
#[repr(C)]
pub struct SlotHead {
    pub words: [AtomicU64; MAX_RANKS],
    pub blocks: AtomicU32,
    _pad: u32,
    pub key: [AtomicU64; KEY_BYTES / 8],
}
const SLOT_HEAD_BYTES: usize = std::mem::size_of::<SlotHead>();
const _: () = assert!(SLOT_HEAD_BYTES == 8 * MAX_RANKS + 8 + KEY_BYTES);

/// Bytes of one slot for `max_blocks` blocks (64-byte aligned).
pub fn slot_bytes(max_blocks: usize) -> usize {
    (SLOT_HEAD_BYTES + 4 * max_blocks).div_ceil(64) * 64
}

#[derive(Debug, Error)]
pub enum HoldError {
    #[error("hold table {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("hold table name {0:?} is not one PegaFlow makes (pegaflow-pd-<16..64 hex digits>)")]
    BadName(String),
    #[error("hold table {path} is not usable: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("hold table {path} belongs to a live process ({pid}); is another instance using the same kv_transfer_config.engine_id?")]
    InUse { path: PathBuf, pid: u32 },
    #[error("hold table geometry: {0}")]
    Geometry(String),
    #[error("slot {slot} is out of range (capacity {capacity})")]
    SlotRange { slot: u32, capacity: u32 },
    #[error("rank {rank} is out of range ({ranks} ranks)")]
    RankRange { rank: u32, ranks: u32 },
    #[error("slot {slot} is still in use (rank {rank}: {state:?}); free it first")]
    Busy {
        slot: u32,
        rank: u32,
        state: Option<HoldState>,
    },
    #[error("{n} blocks do not fit a slot of {max} (max_model_len grew?)")]
    TooManyBlocks { n: usize, max: usize },
}

/// Whether `name` is a table name PegaFlow makes: the prefix and 16..64
/// lowercase hex digits (nothing a client could use to name another file).
pub fn valid_name(name: &str) -> bool {
    name.strip_prefix(NAME_PREFIX).is_some_and(|h| {
        (16..=64).contains(&h.len())
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// A taken hold: the last lent block's key and the producer's block ids.
pub type Lent = ([u8; KEY_BYTES], Vec<u32>);

/// Geometry of a new table.
#[derive(Clone, Debug)]
pub struct HoldSpec {
    /// Holds wanted; the table gets as many as fit [`MAX_TABLE_BYTES`]
    /// (see [`HoldTable::capacity`]).
    pub capacity: u32,
    pub max_blocks: u32,
    pub namespaces: Vec<u64>,
    pub peer_keys: Vec<String>,
}

/// A mapped hold table (producer or consumer side).
pub struct HoldTable {
    map: MmapMut,
    path: PathBuf,
    name: String,
    ranks: u32,
    capacity: u32,
    max_blocks: u32,
    slot_bytes: usize,
}

impl std::fmt::Debug for HoldTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HoldTable")
            .field("name", &self.name)
            .field("ranks", &self.ranks)
            .field("capacity", &self.capacity)
            .field("max_blocks", &self.max_blocks)
            .finish()
    }
}

impl HoldTable {
    /// Creates the table `name` in `dir` (the producer's scheduler). A
    /// leftover of a dead process under the same name is replaced, and so
    /// are other dead processes' tables in `dir`.
    pub fn create(dir: &Path, name: &str, spec: &HoldSpec) -> Result<Self, HoldError> {
        if !valid_name(name) {
            return Err(HoldError::BadName(name.into()));
        }
        let ranks = spec.namespaces.len();
        if ranks == 0 || ranks > MAX_RANKS || spec.peer_keys.len() != ranks {
            return Err(HoldError::Geometry(format!(
                "{ranks} ranks ({} peer keys); 1..={MAX_RANKS} supported",
                spec.peer_keys.len()
            )));
        }
        if let Some(k) = spec
            .peer_keys
            .iter()
            .find(|k| k.len() >= PEER_KEY_BYTES || k.contains('\0'))
        {
            return Err(HoldError::Geometry(format!("peer key {k:?} too long")));
        }
        let sb = slot_bytes(spec.max_blocks as usize);
        let fit = ((MAX_TABLE_BYTES - HEADER_BYTES) / sb) as u32;
        let capacity = spec.capacity.min(fit);
        if capacity == 0 || spec.max_blocks == 0 {
            return Err(HoldError::Geometry(format!(
                "{} slots of {} blocks ({sb} bytes each; a table holds at most {MAX_TABLE_BYTES} bytes)",
                spec.capacity, spec.max_blocks
            )));
        }
        let len = HEADER_BYTES as u64 + capacity as u64 * sb as u64;
        sweep_dead(dir);
        let path = dir.join(name);
        let io_err = |source| HoldError::Io {
            path: path.clone(),
            source,
        };
        let file = match create_excl(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if let Some(pid) = creator_of(&path).filter(|&p| pid_alive(p)) {
                    return Err(HoldError::InUse { path, pid });
                }
                std::fs::remove_file(&path).map_err(io_err)?;
                create_excl(&path).map_err(io_err)?
            }
            Err(e) => return Err(io_err(e)),
        };
        file.set_len(len).map_err(io_err)?;
        // SAFETY: a file we just created and sized; other processes map it
        // too, which is why every access goes through atomics.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(io_err)?;
        let t = HoldTable {
            map,
            path: path.clone(),
            name: name.into(),
            ranks: ranks as u32,
            capacity,
            max_blocks: spec.max_blocks,
            slot_bytes: sb,
        };
        let h = t.header();
        h.magic.store(HOLD_MAGIC, Ordering::Relaxed);
        h.version.store(HOLD_VERSION, Ordering::Relaxed);
        h.ranks.store(ranks as u32, Ordering::Relaxed);
        h.capacity.store(capacity, Ordering::Relaxed);
        h.max_blocks.store(spec.max_blocks, Ordering::Relaxed);
        h.slot_bytes.store(sb as u32, Ordering::Relaxed);
        h.creator_pid.store(std::process::id(), Ordering::Relaxed);
        h.nonce
            .store(crate::segment::random_u64() | 1, Ordering::Relaxed);
        for (i, ns) in spec.namespaces.iter().enumerate() {
            h.namespaces[i].store(*ns, Ordering::Relaxed);
        }
        for (i, k) in spec.peer_keys.iter().enumerate() {
            let mut b = [0u8; PEER_KEY_BYTES];
            b[..k.len()].copy_from_slice(k.as_bytes());
            for (j, w) in h.peer_keys[i].iter().enumerate() {
                w.store(
                    u64::from_le_bytes(b[j * 8..j * 8 + 8].try_into().expect("8 bytes")),
                    Ordering::Relaxed,
                );
            }
        }
        h.ready.store(1, Ordering::Release);
        Ok(t)
    }

    /// Maps the table `name` of `dir` (a consumer), checking its header.
    pub fn open(dir: &Path, name: &str) -> Result<Self, HoldError> {
        if !valid_name(name) {
            return Err(HoldError::BadName(name.into()));
        }
        let path = dir.join(name);
        let io_err = |source| HoldError::Io {
            path: path.clone(),
            source,
        };
        let invalid = |why: String| HoldError::Invalid {
            path: path.clone(),
            why,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        if len < HEADER_BYTES as u64 || len > MAX_TABLE_BYTES as u64 {
            return Err(invalid(format!("{len} bytes")));
        }
        // SAFETY: shared file of a checked size; every access is atomic.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(io_err)?;
        // SAFETY: the map is at least HEADER_BYTES long and page aligned;
        // HoldHeader is atomics only (any bytes are a valid value).
        let h = unsafe { &*(map.as_ptr() as *const HoldHeader) };
        if h.ready.load(Ordering::Acquire) != 1 {
            return Err(invalid("its producer has not finished writing it".into()));
        }
        let (magic, version) = (
            h.magic.load(Ordering::Relaxed),
            h.version.load(Ordering::Relaxed),
        );
        if magic != HOLD_MAGIC || version != HOLD_VERSION {
            return Err(invalid(format!(
                "magic {magic:#x} version {version} (this build reads version {HOLD_VERSION}: \
                 run the same pegaflow on both instances)"
            )));
        }
        let ranks = h.ranks.load(Ordering::Relaxed);
        let capacity = h.capacity.load(Ordering::Relaxed);
        let max_blocks = h.max_blocks.load(Ordering::Relaxed);
        let sb = h.slot_bytes.load(Ordering::Relaxed) as usize;
        if ranks == 0
            || ranks as usize > MAX_RANKS
            || max_blocks == 0
            || sb != slot_bytes(max_blocks as usize)
            || HEADER_BYTES as u64 + capacity as u64 * sb as u64 != len
        {
            return Err(invalid(format!(
                "{ranks} ranks, {capacity} slots of {sb} bytes for {max_blocks} blocks in {len} bytes"
            )));
        }
        Ok(HoldTable {
            map,
            path,
            name: name.into(),
            ranks,
            capacity,
            max_blocks,
            slot_bytes: sb,
        })
    }

    fn header(&self) -> &HoldHeader {
        // SAFETY: the map is at least HEADER_BYTES (checked at creation or
        // open) and page aligned; HoldHeader is atomics only.
        unsafe { &*(self.map.as_ptr() as *const HoldHeader) }
    }

    fn slot(&self, slot: u32) -> Result<(&SlotHead, &[AtomicU32]), HoldError> {
        if slot >= self.capacity {
            return Err(HoldError::SlotRange {
                slot,
                capacity: self.capacity,
            });
        }
        let off = HEADER_BYTES + slot as usize * self.slot_bytes;
        // SAFETY: off + slot_bytes <= map length (checked geometry), off is
        // 64-byte aligned; SlotHead and the block ids are atomics only.
        unsafe {
            let p = self.map.as_ptr().add(off);
            let head = &*(p as *const SlotHead);
            let ids = std::slice::from_raw_parts(
                p.add(SLOT_HEAD_BYTES) as *const AtomicU32,
                self.max_blocks as usize,
            );
            Ok((head, ids))
        }
    }

    fn rank(&self, rank: u32) -> Result<usize, HoldError> {
        if rank >= self.ranks {
            return Err(HoldError::RankRange {
                rank,
                ranks: self.ranks,
            });
        }
        Ok(rank as usize)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn ranks(&self) -> u32 {
        self.ranks
    }
    pub fn capacity(&self) -> u32 {
        self.capacity
    }
    pub fn max_blocks(&self) -> u32 {
        self.max_blocks
    }
    pub fn nonce(&self) -> u64 {
        self.header().nonce.load(Ordering::Relaxed)
    }
    pub fn creator_pid(&self) -> u32 {
        self.header().creator_pid.load(Ordering::Relaxed)
    }
    /// Whether the producer that created the table still runs.
    pub fn creator_alive(&self) -> bool {
        pid_alive(self.creator_pid())
    }
    pub fn namespaces(&self) -> Vec<u64> {
        let h = self.header();
        (0..self.ranks as usize)
            .map(|i| h.namespaces[i].load(Ordering::Relaxed))
            .collect()
    }
    pub fn peer_keys(&self) -> Vec<String> {
        let h = self.header();
        (0..self.ranks as usize)
            .map(|i| {
                let b: Vec<u8> = h.peer_keys[i]
                    .iter()
                    .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
                    .take_while(|&c| c != 0)
                    .collect();
                String::from_utf8_lossy(&b).into_owned()
            })
            .collect()
    }

    /// Rank `rank`'s word of `slot` (None: garbage in the state byte).
    pub fn word(&self, slot: u32, rank: u32) -> Result<Option<Word>, HoldError> {
        let r = self.rank(rank)?;
        let (head, _) = self.slot(slot)?;
        Ok(unpack(head.words[r].load(Ordering::Acquire)))
    }

    // ------------------------------------------------------------ producer

    /// Lends `blocks` (GPU block ids, the prompt's first `blocks.len()`)
    /// under `ticket`; `key` is the last block's content key.
    pub fn hold(
        &self,
        slot: u32,
        ticket: u32,
        key: &[u8; KEY_BYTES],
        blocks: &[u32],
    ) -> Result<(), HoldError> {
        let (head, ids) = self.slot(slot)?;
        if blocks.len() > ids.len() {
            return Err(HoldError::TooManyBlocks {
                n: blocks.len(),
                max: ids.len(),
            });
        }
        for r in 0..self.ranks {
            let w = head.words[r as usize].load(Ordering::Acquire);
            if w != 0 {
                return Err(HoldError::Busy {
                    slot,
                    rank: r,
                    state: unpack(w).map(|w| w.state),
                });
            }
        }
        head.blocks.store(blocks.len() as u32, Ordering::Relaxed);
        for (i, w) in head.key.iter().enumerate() {
            w.store(
                u64::from_le_bytes(key[i * 8..i * 8 + 8].try_into().expect("8 bytes")),
                Ordering::Relaxed,
            );
        }
        for (d, &b) in ids.iter().zip(blocks) {
            d.store(b, Ordering::Relaxed);
        }
        // [1] the contents above happen-before any consumer's acquire load
        // of HELD(ticket) below (invariant 1).
        for r in 0..self.ranks as usize {
            head.words[r].store(pack(ticket, HoldState::Held, 0), Ordering::Release);
        }
        Ok(())
    }

    /// Whether every rank is DONE or EXPIRED under `ticket`: the producer
    /// may give the blocks back.
    pub fn over(&self, slot: u32, ticket: u32) -> Result<bool, HoldError> {
        let (head, _) = self.slot(slot)?;
        Ok((0..self.ranks as usize).all(|r| {
            unpack(head.words[r].load(Ordering::Acquire)).is_some_and(|w| {
                w.ticket == ticket && matches!(w.state, HoldState::Done | HoldState::Expired)
            })
        }))
    }

    /// The hold timed out: ranks not taken yet expire, ranks taken by a
    /// process that is gone too. Returns [`HoldTable::over`].
    pub fn expire(&self, slot: u32, ticket: u32) -> Result<bool, HoldError> {
        let (head, _) = self.slot(slot)?;
        for r in 0..self.ranks as usize {
            let cur = head.words[r].load(Ordering::Acquire);
            let Some(w) = unpack(cur) else {
                // garbage: nobody can be copying under a word we cannot read
                head.words[r].store(pack(ticket, HoldState::Expired, 0), Ordering::Release);
                continue;
            };
            if w.ticket != ticket {
                continue;
            }
            let expire = match w.state {
                HoldState::Held => true,
                HoldState::Taken => !pid_alive(w.pid),
                _ => false,
            };
            if expire {
                let _ = head.words[r].compare_exchange(
                    cur,
                    pack(ticket, HoldState::Expired, 0),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
        }
        self.over(slot, ticket)
    }

    /// Frees a slot whose hold is over (the producer; after vLLM got the
    /// blocks back). Refuses while a rank is still HELD or TAKEN.
    pub fn free(&self, slot: u32, ticket: u32) -> Result<(), HoldError> {
        let (head, _) = self.slot(slot)?;
        for r in 0..self.ranks {
            let w = unpack(head.words[r as usize].load(Ordering::Acquire));
            let over = w.is_some_and(|w| {
                w.ticket == ticket && matches!(w.state, HoldState::Done | HoldState::Expired)
            });
            if !over {
                return Err(HoldError::Busy {
                    slot,
                    rank: r,
                    state: w.map(|w| w.state),
                });
            }
        }
        for r in 0..self.ranks as usize {
            head.words[r].store(0, Ordering::Release);
        }
        Ok(())
    }

    // ------------------------------------------------------------ consumer

    fn read_contents(
        &self,
        head: &SlotHead,
        ids: &[AtomicU32],
    ) -> Option<([u8; KEY_BYTES], Vec<u32>)> {
        let n = head.blocks.load(Ordering::Relaxed) as usize;
        if n > ids.len() {
            return None;
        }
        let mut key = [0u8; KEY_BYTES];
        for (i, w) in head.key.iter().enumerate() {
            key[i * 8..i * 8 + 8].copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        Some((
            key,
            ids[..n].iter().map(|b| b.load(Ordering::Relaxed)).collect(),
        ))
    }

    /// A hold every rank still offers under `ticket`: its block count and
    /// key (None when any rank moved on, or the contents are garbage).
    /// Nothing is taken: the workers take their ranks before copying.
    pub fn peek(
        &self,
        slot: u32,
        ticket: u32,
    ) -> Result<Option<(usize, [u8; KEY_BYTES])>, HoldError> {
        let (head, ids) = self.slot(slot)?;
        let held = |head: &SlotHead| {
            (0..self.ranks as usize).all(|r| {
                unpack(head.words[r].load(Ordering::Acquire))
                    .is_some_and(|w| w.ticket == ticket && w.state == HoldState::Held)
            })
        };
        if !held(head) {
            return Ok(None);
        }
        let got = self.read_contents(head, ids);
        // Seqlock-style: contents read between two loads that both saw
        // HELD(ticket) are that hold's (invariant 1; tickets never repeat).
        fence(Ordering::Acquire);
        if !held(head) {
            return Ok(None);
        }
        Ok(got.map(|(k, b)| (b.len(), k)))
    }

    /// Takes rank `rank`'s part of the hold for this process: HELD(ticket)
    /// -> TAKEN(ticket, pid). Returns the key and the producer's block ids,
    /// or None when the hold is gone (expired, freed, another ticket).
    pub fn take(&self, slot: u32, ticket: u32, rank: u32) -> Result<Option<Lent>, HoldError> {
        let r = self.rank(rank)?;
        let (head, ids) = self.slot(slot)?;
        let pid = std::process::id();
        if head.words[r]
            .compare_exchange(
                pack(ticket, HoldState::Held, 0),
                pack(ticket, HoldState::Taken, pid),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return Ok(None);
        }
        match self.read_contents(head, ids) {
            Some(c) => Ok(Some(c)),
            None => {
                // garbage count: give the rank back as done, copy nothing
                self.done(slot, ticket, rank)?;
                Ok(None)
            }
        }
    }

    /// The copies of a taken rank completed (or will never be issued):
    /// TAKEN(ticket, this pid) -> DONE(ticket). False when the word was not
    /// ours to finish.
    pub fn done(&self, slot: u32, ticket: u32, rank: u32) -> Result<bool, HoldError> {
        let r = self.rank(rank)?;
        let (head, _) = self.slot(slot)?;
        Ok(head.words[r]
            .compare_exchange(
                pack(ticket, HoldState::Taken, std::process::id()),
                pack(ticket, HoldState::Done, 0),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok())
    }

    /// Removes the file (the producer at shutdown); mappings stay valid.
    pub fn unlink(&self) -> Result<(), HoldError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(HoldError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

fn create_excl(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

fn creator_of(path: &Path) -> Option<u32> {
    let f = File::open(path).ok()?;
    if f.metadata().ok()?.len() < HEADER_BYTES as u64 {
        return None;
    }
    // SAFETY: a read-only map of a file another process may write; every
    // read of it below is atomic.
    let map = unsafe { memmap2::Mmap::map(&f) }.ok()?;
    // SAFETY: the map is at least HEADER_BYTES long and page aligned;
    // HoldHeader is atomics only (any bytes are a valid value).
    let h = unsafe { &*(map.as_ptr() as *const HoldHeader) };
    (h.magic.load(Ordering::Relaxed) == HOLD_MAGIC).then(|| h.creator_pid.load(Ordering::Relaxed))
}

/// Removes tables in `dir` left by processes that are gone (a producer
/// SIGKILLed never unlinks its own).
fn sweep_dead(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !valid_name(name) {
            continue;
        }
        let p = e.path();
        if let Some(pid) = creator_of(&p) {
            if !pid_alive(pid) {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ranks: usize) -> HoldSpec {
        HoldSpec {
            capacity: 4,
            max_blocks: 8,
            namespaces: (0..ranks as u64).map(|r| 100 + r).collect(),
            peer_keys: (0..ranks).map(|r| format!("pd/x/{r}")).collect(),
        }
    }

    const NAME: &str = "pegaflow-pd-00112233445566778899";

    #[test]
    fn a_hold_goes_held_taken_done_and_back_to_free() {
        let dir = tempfile::tempdir().unwrap();
        let p = HoldTable::create(dir.path(), NAME, &spec(2)).unwrap();
        let c = HoldTable::open(dir.path(), NAME).unwrap();
        assert_eq!(c.namespaces(), vec![100, 101]);
        assert_eq!(c.peer_keys(), vec!["pd/x/0", "pd/x/1"]);
        assert_eq!(c.nonce(), p.nonce());
        let key = [7u8; 32];
        p.hold(1, 5, &key, &[9, 8, 7]).unwrap();
        assert_eq!(c.peek(1, 5).unwrap(), Some((3, key)));
        assert_eq!(c.peek(1, 4).unwrap(), None, "another ticket");
        assert_eq!(c.take(1, 5, 0).unwrap(), Some((key, vec![9, 8, 7])));
        assert_eq!(c.take(1, 5, 0).unwrap(), None, "taken once");
        assert_eq!(c.peek(1, 5).unwrap(), None, "no longer offered whole");
        assert!(!p.over(1, 5).unwrap());
        assert!(matches!(p.free(1, 5), Err(HoldError::Busy { .. })));
        assert!(c.done(1, 5, 0).unwrap());
        assert!(!p.over(1, 5).unwrap(), "rank 1 still held");
        assert!(c.take(1, 5, 1).unwrap().is_some());
        assert!(c.done(1, 5, 1).unwrap());
        assert!(p.over(1, 5).unwrap());
        p.free(1, 5).unwrap();
        assert_eq!(c.word(1, 0).unwrap().unwrap().state, HoldState::Free);
        assert!(matches!(
            p.hold(9, 1, &key, &[1]),
            Err(HoldError::SlotRange { .. })
        ));
        assert!(matches!(
            p.hold(0, 1, &key, &[0; 9]),
            Err(HoldError::TooManyBlocks { .. })
        ));
    }

    #[test]
    fn an_expired_hold_cannot_be_taken_and_a_taken_one_does_not_expire() {
        let dir = tempfile::tempdir().unwrap();
        let p = HoldTable::create(dir.path(), NAME, &spec(2)).unwrap();
        let c = HoldTable::open(dir.path(), NAME).unwrap();
        p.hold(0, 1, &[1; 32], &[3]).unwrap();
        assert!(c.take(0, 1, 0).unwrap().is_some());
        // rank 0 taken by this (live) process: only rank 1 expires
        assert!(!p.expire(0, 1).unwrap());
        assert_eq!(c.word(0, 0).unwrap().unwrap().state, HoldState::Taken);
        assert_eq!(c.word(0, 1).unwrap().unwrap().state, HoldState::Expired);
        assert_eq!(c.take(0, 1, 1).unwrap(), None, "expired");
        assert!(c.done(0, 1, 0).unwrap());
        assert!(p.over(0, 1).unwrap());
        p.free(0, 1).unwrap();
        p.hold(0, 2, &[1; 32], &[3]).unwrap();
        assert!(!c.done(0, 2, 0).unwrap(), "not taken: nothing to finish");
    }

    #[test]
    fn a_hold_taken_by_a_process_that_exited_expires_before_it_is_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let p = HoldTable::create(dir.path(), NAME, &spec(1)).unwrap();
        p.hold(0, 3, &[1; 32], &[5]).unwrap();
        // a decode that took the hold and was SIGKILLed: exited, its parent
        // has not waited for it yet (a zombie; its CUDA context is gone)
        let child = std::process::Command::new("true").spawn().unwrap();
        let (head, _) = p.slot(0).unwrap();
        head.words[0].store(pack(3, HoldState::Taken, child.id()), Ordering::Release);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !p.expire(0, 3).unwrap() {
            assert!(
                std::time::Instant::now() < deadline,
                "the hold of an exited taker never expired"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(child); // reaped when the test process exits
    }

    #[test]
    fn a_second_producer_of_a_live_table_is_refused_and_a_dead_ones_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let _p = HoldTable::create(dir.path(), NAME, &spec(1)).unwrap();
        assert!(matches!(
            HoldTable::create(dir.path(), NAME, &spec(1)),
            Err(HoldError::InUse { .. })
        ));
        // a table whose creator is gone (pid 0 is never alive)
        let other = "pegaflow-pd-ffffffffffffffff";
        let t = HoldTable::create(dir.path(), other, &spec(1)).unwrap();
        t.header().creator_pid.store(0, Ordering::Relaxed);
        drop(t);
        let _q =
            HoldTable::create(dir.path(), NAME.replace("00", "11").as_str(), &spec(1)).unwrap();
        assert!(!dir.path().join(other).exists(), "swept");
    }

    #[test]
    fn a_table_gets_the_slots_that_fit_and_frees_only_its_own_ticket() {
        let dir = tempfile::tempdir().unwrap();
        let mut sp = spec(1);
        sp.capacity = u32::MAX;
        sp.max_blocks = 1 << 16;
        let t = HoldTable::create(dir.path(), NAME, &sp).unwrap();
        let fit = ((MAX_TABLE_BYTES - HEADER_BYTES) / slot_bytes(1 << 16)) as u32;
        assert_eq!(t.capacity(), fit);
        assert_eq!(HoldTable::open(dir.path(), NAME).unwrap().capacity(), fit);
        t.hold(0, 7, &[1; 32], &[1]).unwrap();
        assert!(t.expire(0, 7).unwrap());
        assert!(
            matches!(t.free(0, 8), Err(HoldError::Busy { .. })),
            "another ticket's hold"
        );
        t.free(0, 7).unwrap();
        sp.max_blocks = u32::MAX;
        assert!(matches!(
            HoldTable::create(dir.path(), "pegaflow-pd-abababababababab", &sp),
            Err(HoldError::Geometry(_))
        ));
    }

    #[test]
    fn bad_names_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for n in [
            "../etc/passwd",
            "pegaflow-pd-",
            "pegaflow-pd-XYZ0000000000000000",
            "pool",
        ] {
            assert!(
                matches!(HoldTable::open(dir.path(), n), Err(HoldError::BadName(_))),
                "{n}"
            );
        }
        std::fs::write(dir.path().join(NAME), vec![0u8; 4096]).unwrap();
        assert!(matches!(
            HoldTable::open(dir.path(), NAME),
            Err(HoldError::Invalid { .. })
        ));
        let mut junk = vec![0xffu8; 4096];
        junk[..8].copy_from_slice(&HOLD_MAGIC.to_le_bytes());
        std::fs::write(dir.path().join(NAME), &junk).unwrap();
        assert!(matches!(
            HoldTable::open(dir.path(), NAME),
            Err(HoldError::Invalid { .. })
        ));
    }

    #[test]
    fn garbage_in_a_slot_is_never_copied() {
        let dir = tempfile::tempdir().unwrap();
        let p = HoldTable::create(dir.path(), NAME, &spec(1)).unwrap();
        let c = HoldTable::open(dir.path(), NAME).unwrap();
        p.hold(2, 3, &[0; 32], &[1, 2]).unwrap();
        let (head, _) = p.slot(2).unwrap();
        head.blocks.store(1 << 30, Ordering::Relaxed);
        assert_eq!(c.peek(2, 3).unwrap(), None);
        assert_eq!(c.take(2, 3, 0).unwrap(), None);
        assert!(p.over(2, 3).unwrap(), "given back as done");
        head.words[0].store(0xdead_beef_ffff_ffff, Ordering::Relaxed);
        assert_eq!(c.word(2, 0).unwrap(), None);
        assert!(p.expire(2, 3).unwrap());
    }
}
