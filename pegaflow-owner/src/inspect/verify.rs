//! `pegaflow-inspect verify`: the invariants of the slot table, the index,
//! the slab table and the client areas, checked from outside.
//!
//! Checks (see `pegaflow_shm::{slot_table, index, ring}` for why they hold):
//!
//! - slab table: an unassigned slab has no slots; an assigned one was cut
//!   the way the owner cuts (`stride` = block size rounded up to 4 KiB and
//!   to the minimum slot size, `nslots = slab / stride`);
//! - slot table: every state word decodes; slots outside assigned slabs are
//!   free; every `Committed` slot has a namespace, a length within its
//!   stride, and is in the index, reachable from its home bucket; every
//!   `Writing(c)` slot belongs to an existing client entry;
//! - index: every entry points at an in-range `Committed` slot with the same
//!   key, is reachable from its home bucket, and no key appears twice;
//! - clients: states are known; ring positions satisfy
//!   `head <= tail <= head + cap`; stash entries are in-range slots in state
//!   `Writing(that client)` with the generation the stash claims; a FREE
//!   entry holds no pins; a live entry pins only committed slots; a client
//!   has no more `Writing` slots than its stash holds plus what it says it
//!   holds (`held_slots`): any beyond are leaked.
//!
//! Findings have a severity: an `error` is corruption (exit status 1), a
//! `warning` is a state a crash leaves behind that the next owner repairs
//! (an eviction or an index update cut short), or an engine that died and
//! is not reclaimed yet.

use std::collections::HashMap;

use pegaflow_shm::client::client_state;
use pegaflow_shm::index::{home, MAX_PROBES};
use pegaflow_shm::slot_table::{BlockKey, SlotKind, SlotState};
use pegaflow_shm::sync::Ordering;

use super::{assigned_slots, hex, owner_facts, slot_kind_name, BucketRead, Target};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// One violated invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// Short name of the check, e.g. `committed-not-indexed`.
    pub check: &'static str,
    /// What it is about, e.g. `slot 17`; with `check`, identifies the
    /// finding across the re-check.
    pub subject: String,
    pub detail: String,
}

impl Finding {
    fn error(check: &'static str, subject: String, detail: String) -> Finding {
        Finding {
            severity: Severity::Error,
            check,
            subject,
            detail,
        }
    }

    fn warning(check: &'static str, subject: String, detail: String) -> Finding {
        Finding {
            severity: Severity::Warning,
            check,
            subject,
            detail,
        }
    }
}

/// What `verify` looked at, for the report.
#[derive(Default, Clone, Debug)]
pub struct Counts {
    pub slabs_assigned: u64,
    pub slots_checked: u64,
    pub committed: u64,
    pub index_entries: u64,
    pub clients: u64,
    pub stash_entries: u64,
}

/// Run every check once.
pub fn check(t: &Target) -> (Vec<Finding>, Counts) {
    let mut f = Vec::new();
    let mut counts = Counts::default();
    let seg = &t.seg;
    let g = *seg.geometry();
    let owner = owner_facts(seg);
    let index_mask = g.index_buckets - 1;

    // Slab table.
    let per = g.slots_per_slab();
    for (s, slab) in seg.slabs().iter().enumerate() {
        let stride = slab.stride.load(Ordering::Acquire);
        let nslots = u64::from(slab.nslots.load(Ordering::Relaxed));
        let bytes = slab.slot_bytes.load(Ordering::Relaxed);
        let subject = format!("slab {s}");
        if stride == 0 {
            if nslots != 0 {
                f.push(Finding::error(
                    "slab-unassigned-with-slots",
                    subject,
                    format!("stride 0 (unassigned) but nslots {nslots}"),
                ));
            }
            continue;
        }
        counts.slabs_assigned += 1;
        let want = bytes.max(g.granule_bytes).div_ceil(4096) * 4096;
        if bytes == 0 || stride != want || stride > g.slab_bytes {
            f.push(Finding::error(
                "slab-bad-stride",
                subject,
                format!(
                    "block size {bytes} with stride {stride}: expected stride {want} \
                     (at most the slab size {})",
                    g.slab_bytes
                ),
            ));
        } else if nslots != g.slab_bytes / stride || nslots > per {
            f.push(Finding::error(
                "slab-bad-nslots",
                subject,
                format!(
                    "{nslots} slots of stride {stride}: a slab of {} holds {}",
                    g.slab_bytes,
                    g.slab_bytes / stride
                ),
            ));
        }
    }

    // Slot table.
    let assigned = assigned_slots(seg);
    let mut writing: HashMap<u32, u64> = HashMap::new();
    let in_assigned: std::collections::HashSet<u32> = assigned.iter().map(|s| s.slot).collect();
    let slots = seg.slots();
    for (id, e) in slots.iter().enumerate() {
        if in_assigned.contains(&(id as u32)) {
            continue;
        }
        let raw = e.state.load(Ordering::SeqCst);
        match SlotState::unpack(raw) {
            Some(st) if st.kind == SlotKind::Free => {}
            Some(st) => f.push(Finding::error(
                "slot-outside-slab",
                format!("slot {id}"),
                format!(
                    "is {} but lies outside every assigned slab",
                    slot_kind_name(st.kind)
                ),
            )),
            None => f.push(Finding::error(
                "slot-garbage-state",
                format!("slot {id}"),
                format!("state word {raw:#018x} is no valid state"),
            )),
        }
    }
    let buckets = match t.buckets() {
        Ok(b) => Buckets::new(b),
        Err(e) => {
            f.push(Finding::error(
                "index-unreadable",
                "index".into(),
                e.to_string(),
            ));
            return (f, counts);
        }
    };
    for s in &assigned {
        counts.slots_checked += 1;
        let subject = format!("slot {}", s.slot);
        let Some(st) = s.state else {
            f.push(Finding::error(
                "slot-garbage-state",
                subject,
                format!("state word {:#018x} is no valid state", s.raw_state),
            ));
            continue;
        };
        let e = &slots[s.slot as usize];
        match st.kind {
            SlotKind::Free => {}
            // The owner itself fills it from its SSD tier (a stage read).
            SlotKind::Writing if st.client == pegaflow_shm::slot_table::OWNER_WRITER => {}
            SlotKind::Writing => {
                let c = u32::from(st.client);
                *writing.entry(c).or_default() += 1;
                let owner_ok = seg
                    .client(c)
                    .map(|v| v.entry.state())
                    .filter(|&cs| cs != client_state::FREE);
                if owner_ok.is_none() {
                    f.push(Finding::error(
                        "writing-slot-without-client",
                        subject,
                        format!("is Writing(client {c}) but client entry {c} is not in use: the slot leaked"),
                    ));
                }
            }
            SlotKind::Committed | SlotKind::Evicting => {
                if st.kind == SlotKind::Evicting {
                    f.push(Finding::warning(
                        "eviction-cut-short",
                        subject.clone(),
                        if owner.alive {
                            "stays Evicting: the owner started evicting it and has not finished"
                                .into()
                        } else {
                            "was being evicted when the owner died; the next owner re-checks it"
                                .into()
                        },
                    ));
                }
                counts.committed += 1;
                let key = e.key();
                let len = e.len.load(Ordering::Relaxed);
                if key.namespace == 0 {
                    f.push(Finding::error(
                        "committed-zero-namespace",
                        subject.clone(),
                        "is committed under the reserved namespace 0".into(),
                    ));
                }
                if len > s.stride {
                    f.push(Finding::error(
                        "committed-too-long",
                        subject.clone(),
                        format!("holds {len} bytes in a slot of {} bytes", s.stride),
                    ));
                }
                match buckets.find(&key) {
                    None => f.push(Finding::error(
                        "committed-not-indexed",
                        subject,
                        format!(
                            "is committed (namespace {:#018x}, hash {}) but the index has no entry for its key",
                            key.namespace,
                            hex(&key.hash)
                        ),
                    )),
                    Some((at, slot)) if slot != s.slot => f.push(Finding::error(
                        "committed-indexed-elsewhere",
                        subject,
                        format!("index bucket {at} maps its key to slot {slot}"),
                    )),
                    Some((at, _)) => {
                        if !buckets.reachable(&key, at, index_mask) {
                            f.push(Finding::error(
                                "committed-unreachable",
                                subject,
                                format!(
                                    "is in index bucket {at}, which a lookup starting at its home bucket {} never reaches",
                                    home(&key, index_mask)
                                ),
                            ));
                        }
                    }
                }
            }
        }
    }

    // Index.
    let mut seen: HashMap<BlockKey, usize> = HashMap::new();
    for (at, b) in buckets.all.iter().enumerate() {
        let subject = format!("index bucket {at}");
        let (key, slot) = match *b {
            BucketRead::Empty => continue,
            BucketRead::Torn { seq } => {
                f.push(Finding::warning(
                    "index-bucket-torn",
                    subject,
                    format!(
                        "sequence {seq} stays odd: the owner {} in the middle of updating it; \
                         the next owner rebuilds the index",
                        if owner.alive { "is stuck" } else { "died" }
                    ),
                ));
                continue;
            }
            BucketRead::Entry { key, slot } => (key, slot),
        };
        counts.index_entries += 1;
        if let Some(first) = seen.insert(key, at) {
            f.push(Finding::error(
                "index-duplicate-key",
                subject.clone(),
                format!("holds the same key as bucket {first}"),
            ));
        }
        let Some(e) = slots.get(slot as usize) else {
            f.push(Finding::error(
                "index-slot-out-of-range",
                subject,
                format!("points at slot {slot}; the pool has {} slots", slots.len()),
            ));
            continue;
        };
        let st = e.load_state();
        match st.map(|s| s.kind) {
            Some(SlotKind::Committed) | Some(SlotKind::Evicting) => {
                let sk = e.key();
                if sk != key {
                    f.push(Finding::error(
                        "index-key-mismatch",
                        subject.clone(),
                        format!(
                            "maps namespace {:#018x} hash {} to slot {slot}, which holds namespace {:#018x} hash {}",
                            key.namespace,
                            hex(&key.hash),
                            sk.namespace,
                            hex(&sk.hash)
                        ),
                    ));
                }
            }
            other => f.push(Finding::error(
                "index-slot-not-committed",
                subject.clone(),
                format!(
                    "points at slot {slot}, which is {}",
                    other.map(slot_kind_name).unwrap_or("garbage")
                ),
            )),
        }
        if !buckets.reachable(&key, at, index_mask) {
            f.push(Finding::error(
                "index-unreachable",
                subject,
                format!(
                    "(slot {slot}) is not reachable from its home bucket {}",
                    home(&key, index_mask)
                ),
            ));
        }
    }

    // Clients.
    for i in 0..seg.max_clients() {
        let Some(c) = seg.client(i) else { continue };
        let state = c.entry.state();
        let subject = format!("client {i}");
        if state == client_state::FREE {
            let pinned = c
                .pins
                .iter()
                .enumerate()
                .find(|(_, p)| p.load(Ordering::Relaxed) != 0);
            if let Some((slot, p)) = pinned {
                f.push(Finding::error(
                    "free-client-holds-pins",
                    subject,
                    format!(
                        "is FREE but pins slot {slot} ({} times): that slot can never be evicted",
                        p.load(Ordering::Relaxed)
                    ),
                ));
            }
            continue;
        }
        if !matches!(
            state,
            client_state::LIVE | client_state::ORPHANED | client_state::QUARANTINED
        ) {
            f.push(Finding::error(
                "client-bad-state",
                subject,
                format!("state {state} is no valid client state"),
            ));
            continue;
        }
        counts.clients += 1;
        let pid = c.entry.pid.load(Ordering::Relaxed);
        if owner.alive && state == client_state::LIVE && !pegaflow_shm::segment::pid_alive(pid) {
            f.push(Finding::warning(
                "client-process-gone",
                subject.clone(),
                format!("engine pid {pid} has exited but its entry is still live; the owner reclaims it when it sees the hang-up"),
            ));
        }
        for (what, ring_cap, (head, tail)) in [
            (
                "request ring",
                c.requests.capacity(),
                c.requests.positions(),
            ),
            ("stash", c.stash.capacity(), c.stash.positions()),
        ] {
            if tail < head || tail - head > ring_cap {
                f.push(Finding::error(
                    "ring-positions",
                    format!("{subject} {what}"),
                    format!("head {head}, tail {tail}, capacity {ring_cap}: violates head <= tail <= head + capacity"),
                ));
            }
        }
        let (head, tail) = c.stash.positions();
        let held = c.entry.held_slots.load(Ordering::Relaxed);
        let mine = writing.get(&i).copied().unwrap_or(0);
        if tail >= head && tail - head <= c.stash.capacity() && mine > (tail - head) + held {
            f.push(Finding::error(
                "writing-slots-leaked",
                subject.clone(),
                format!(
                    "has {mine} slots in Writing, but only {} in its stash and {held} held by the \
                     engine: {} are leaked until the engine exits",
                    tail - head,
                    mine - (tail - head) - held
                ),
            ));
        }
        if tail >= head && tail - head <= c.stash.capacity() {
            match t.stash_words(i, head, tail) {
                Ok(words) => {
                    for (k, w) in words.iter().enumerate() {
                        counts.stash_entries += 1;
                        let slot = *w as u32;
                        let gen = (*w >> 32) as u32;
                        let sub = format!("{subject} stash[{}]", head + k as u64);
                        let Some(e) = slots.get(slot as usize) else {
                            f.push(Finding::error(
                                "stash-slot-out-of-range",
                                sub,
                                format!("holds slot {slot}; the pool has {} slots", slots.len()),
                            ));
                            continue;
                        };
                        match e.load_state() {
                            Some(st)
                                if st.kind == SlotKind::Writing
                                    && u32::from(st.client) == i
                                    && st.gen == gen => {}
                            st => f.push(Finding::error(
                                "stash-slot-not-writing",
                                sub,
                                format!(
                                    "holds slot {slot} generation {gen}, but that slot is {}",
                                    describe(st)
                                ),
                            )),
                        }
                    }
                }
                Err(e) => f.push(Finding::error(
                    "stash-unreadable",
                    subject.clone(),
                    e.to_string(),
                )),
            }
        }
        for (slot, p) in c.pins.iter().enumerate() {
            let n = p.load(Ordering::Relaxed);
            if n == 0 {
                continue;
            }
            let kind = slots[slot].load_state().map(|s| s.kind);
            if !matches!(kind, Some(SlotKind::Committed) | Some(SlotKind::Evicting)) {
                f.push(Finding::error(
                    "pin-on-uncommitted-slot",
                    format!("{subject} slot {slot}"),
                    format!(
                        "pins slot {slot} {n} times, but the slot is {}",
                        kind.map(slot_kind_name).unwrap_or("garbage")
                    ),
                ));
            }
        }
    }
    (f, counts)
}

fn describe(st: Option<SlotState>) -> String {
    match st {
        None => "garbage".into(),
        Some(s) if s.kind == SlotKind::Writing => {
            format!("Writing(client {}) generation {}", s.client, s.gen)
        }
        Some(s) => format!("{} generation {}", slot_kind_name(s.kind), s.gen),
    }
}

/// The whole index, read once, with the first bucket of every key.
struct Buckets {
    all: Vec<BucketRead>,
    by_key: HashMap<BlockKey, (usize, u32)>,
}

impl Buckets {
    fn new(all: Vec<BucketRead>) -> Buckets {
        let mut by_key = HashMap::new();
        for (at, b) in all.iter().enumerate() {
            if let BucketRead::Entry { key, slot } = *b {
                by_key.entry(key).or_insert((at, slot));
            }
        }
        Buckets { all, by_key }
    }

    fn find(&self, key: &BlockKey) -> Option<(usize, u32)> {
        self.by_key.get(key).copied()
    }

    /// Whether a reader starting at `key`'s home bucket reaches `at` before
    /// an empty bucket or the probe limit.
    fn reachable(&self, key: &BlockKey, at: usize, mask: u64) -> bool {
        let h = home(key, mask);
        for k in 0..MAX_PROBES as u64 {
            let b = (h.wrapping_add(k) & mask) as usize;
            if b == at {
                return true;
            }
            if self.all[b] == BucketRead::Empty {
                return false;
            }
        }
        false
    }
}

/// Check, and if anything is found, pause and check again: a live owner
/// can be caught mid-update. Only findings seen both times are reported.
pub fn verify(t: &Target, pause: std::time::Duration) -> (Vec<Finding>, Counts) {
    let (first, counts) = check(t);
    if first.is_empty() {
        return (first, counts);
    }
    std::thread::sleep(pause);
    let (second, counts) = check(t);
    let confirmed = second
        .into_iter()
        .filter(|f| {
            first
                .iter()
                .any(|g| g.check == f.check && g.subject == f.subject)
        })
        .collect();
    (confirmed, counts)
}
