//! The client table: one entry per connected engine, with its counters.
//!
//! Each entry is followed (in its client area, see [`crate::geometry::ClientLayout`])
//! by the engine's request ring, its stash ring and its pin counters.
//!
//! Ownership of fields:
//! - the owner writes the identity fields (`state`, `pid`, `token`, ...)
//!   and the `owner_counters`;
//! - the engine writes `engine_counters`, `refill_asked` and `stash_want` only.
//!
//! Owner counters have one writer, so a `Relaxed` load+store increments
//! them; engine counters use `fetch_add` since an engine counts from several
//! threads. Readers (metrics, `pegaflow-inspect`) see monotonic values.

use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// `ClientEntry::state` values.
pub mod client_state {
    /// Unused entry (zeroed memory).
    pub const FREE: u32 = 0;
    /// An engine is connected on the owner's socket.
    pub const LIVE: u32 = 1;
    /// The owner restarted while this engine was alive; its pins, stash and
    /// rings are kept until it reconnects or its process exits.
    pub const ORPHANED: u32 = 2;
    /// The connection ended without a goodbye while the process may still
    /// live: it hung up while exiting (copies may still be in flight), or
    /// the owner threw it out (corrupt ring, bad frame, a stalled socket).
    /// Its pins keep their blocks and its writing slots stay its own; its
    /// requests are not applied. It is reclaimed once its process is gone,
    /// or resumed by the same process with its token.
    pub const QUARANTINED: u32 = 3;
}

macro_rules! counters {
    ($enum:ident, $names:ident, $count:ident { $($variant:ident => $name:literal,)* }) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(usize)]
        pub enum $enum { $($variant,)* }
        pub const $names: &[&str] = &[$($name,)*];
        pub const $count: usize = $names.len();
    };
}

counters!(EngineCounter, ENGINE_COUNTER_NAMES, ENGINE_COUNTERS {
    Lookups => "lookups",
    LookupBlocks => "lookup_blocks",
    HitBlocks => "hit_blocks",
    MissBlocks => "miss_blocks",
    SaveBlocks => "save_blocks",
    SaveBytes => "save_bytes",
    SaveNanos => "save_nanos",
    SaveDroppedBlocks => "save_dropped_blocks",
    SaveSkippedBlocks => "save_skipped_blocks",
    LoadBlocks => "load_blocks",
    LoadBytes => "load_bytes",
    LoadNanos => "load_nanos",
    TouchDropped => "touch_dropped",
    CommitRingFull => "commit_ring_full",
    StageBlocks => "stage_blocks",
});

counters!(OwnerCounter, OWNER_COUNTER_NAMES, OWNER_COUNTERS {
    Commits => "commits",
    CommitDuplicates => "commit_duplicates",
    AdmissionRejects => "admission_rejects",
    Aborts => "aborts",
    BadRequests => "bad_requests",
    SlotsStashed => "slots_stashed",
    StagesDone => "stages_done",
    StagedBlocks => "staged_blocks",
});

pub const LABEL_BYTES: usize = 64;

#[repr(C, align(64))]
pub struct ClientEntry {
    /// `client_state::*`.
    pub state: AtomicU32,
    pub pid: AtomicU32,
    /// Process start time (clock ticks since boot, /proc/PID/stat field 22):
    /// with `pid` it names one process even after pid reuse.
    pub start_time: AtomicU64,
    /// Secret the engine presents to resume this entry after an owner restart.
    pub token: AtomicU64,
    /// Namespace the engine saves into; 0 = none (lookup-only client).
    pub namespace: AtomicU64,
    /// Block size the engine saves; 0 = none.
    pub slot_bytes: AtomicU64,
    /// Owner epoch in which the engine last (re)connected.
    pub epoch: AtomicU64,
    /// Free slots the owner tries to keep in this engine's stash.
    pub stash_target: AtomicU32,
    /// Engine: bumped (wrapping) each time it needs its stash refilled now.
    /// The owner serves a request by running one refill that may evict.
    pub refill_asked: AtomicU32,
    pub uid: AtomicU32,
    /// Largest reservation the engine asked for recently; the owner keeps
    /// the stash at least this full (up to the ring).
    pub stash_want: AtomicU32,
    pub label: [AtomicU64; LABEL_BYTES / 8],
    pub engine_counters: [AtomicU64; 16],
    pub owner_counters: [AtomicU64; 8],
    /// Owner: the `refill_asked` value its last finished refill started
    /// from. `refill_done == refill_asked` means every request was served.
    pub refill_done: AtomicU32,
    pub _reserved0: u32,
    /// Engine (a gauge): slots it took from its stash and has not committed
    /// or aborted yet. `pegaflow-inspect verify` compares it with the slot
    /// table: `Writing` slots of a client beyond its stash and this number
    /// are leaked.
    pub held_slots: AtomicU64,
    pub _reserved: [u64; 6],
}

#[cfg(not(loom))]
const _: () = {
    assert!(ENGINE_COUNTERS <= 16 && OWNER_COUNTERS <= 8);
    assert!(std::mem::size_of::<ClientEntry>() == 384);
};

impl ClientEntry {
    pub fn state(&self) -> u32 {
        self.state.load(Ordering::SeqCst)
    }

    pub fn engine(&self, c: EngineCounter) -> u64 {
        self.engine_counters[c as usize].load(Ordering::Relaxed)
    }

    /// Engine only. An engine counts from several threads, so this is a
    /// real read-modify-write.
    pub fn add_engine(&self, c: EngineCounter, n: u64) {
        self.engine_counters[c as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn owner(&self, c: OwnerCounter) -> u64 {
        self.owner_counters[c as usize].load(Ordering::Relaxed)
    }

    /// Owner only (single writer).
    pub fn add_owner(&self, c: OwnerCounter, n: u64) {
        let cell = &self.owner_counters[c as usize];
        cell.store(
            cell.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    pub fn set_label(&self, label: &str) {
        let mut bytes = [0u8; LABEL_BYTES];
        let n = label.len().min(LABEL_BYTES);
        bytes[..n].copy_from_slice(&label.as_bytes()[..n]);
        for (cell, chunk) in self.label.iter().zip(bytes.chunks_exact(8)) {
            cell.store(
                u64::from_le_bytes(chunk.try_into().expect("8 bytes")),
                Ordering::Relaxed,
            );
        }
    }

    pub fn label(&self) -> String {
        let mut bytes = Vec::with_capacity(LABEL_BYTES);
        for cell in &self.label {
            bytes.extend_from_slice(&cell.load(Ordering::Relaxed).to_le_bytes());
        }
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    }

    /// Owner only: zero every field and counter (entry becomes `FREE`).
    pub fn clear(&self) {
        self.state.store(client_state::FREE, Ordering::SeqCst);
        for f in [
            &self.start_time,
            &self.token,
            &self.namespace,
            &self.slot_bytes,
            &self.epoch,
        ] {
            f.store(0, Ordering::Relaxed);
        }
        for f in [
            &self.pid,
            &self.stash_target,
            &self.refill_asked,
            &self.refill_done,
            &self.uid,
            &self.stash_want,
        ] {
            f.store(0, Ordering::Relaxed);
        }
        self.held_slots.store(0, Ordering::Relaxed);
        for f in self
            .label
            .iter()
            .chain(&self.engine_counters)
            .chain(&self.owner_counters)
        {
            f.store(0, Ordering::Relaxed);
        }
    }
}
