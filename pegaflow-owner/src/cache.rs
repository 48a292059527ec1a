//! The owner's private cache state over the shared segments: slot classes,
//! slab assignment, free lists, LRU order and TinyLFU admission.
//!
//! The slot table in shm is the source of truth; everything here can be
//! rebuilt from it ([`Cache::adopt`]), which is what a restarted owner does.
//!
//! ## Invariants (checked by `verify` and the property tests)
//!
//! - A slot is in exactly one of: its class's free list (state `Free`), a
//!   client's stash or in flight (`Writing(c)`), its class's LRU and the
//!   index (`Committed`).
//! - A slab is either unassigned (stride 0, in `free_slabs`) or belongs to
//!   exactly one class.
//! - A slot is made `Free` only after `begin_evict` and an empty pin check
//!   (see `pegaflow_shm::slot_table`).

use std::collections::HashMap;
use std::sync::Arc;

use pegaflow_shm::client::{client_state, OwnerCounter, ENGINE_COUNTERS};
use pegaflow_shm::index::InsertError;
use pegaflow_shm::request::Request;
use pegaflow_shm::segment::{pid_alive, process_start_time, ClientView, ControlSegment};
use pegaflow_shm::slot_table::{any_pinned, BlockKey, SlotKind, SlotState, OWNER_WRITER};
use pegaflow_shm::sync::Ordering;
use pegaflow_shm::Geometry;
use tracing::{debug, info, warn};

use crate::evict::{key_hash, Lru, TinyLfu};
use crate::ssd::index::Loc;
use crate::ssd::{StageEvent, Tier};

/// How many LRU candidates one eviction looks at before giving up (all
/// pinned): bounds the owner's work per refill.
const EVICT_SCAN: usize = 256;
/// Requests drained from one client per pass, so one busy engine cannot
/// starve the others.
const DRAIN_BATCH: usize = 4096;
/// Distinct block sizes one pool serves. Each class costs the owner an LRU
/// of 8 bytes per slot id, so an engine sending arbitrary sizes must not
/// be able to grow the owner without bound; real nodes use a handful.
pub const MAX_CLASSES: usize = 32;
/// With TinyLFU admission, a block goes to the SSD tier only once it was
/// seen at least this often (saved and hit once): one-off prompts never
/// wear the disk.
pub const SSD_ADMIT_MIN: u32 = 2;
/// Blocks looked at per class per idle pass for write-behind, from the
/// cold end of the LRU (the next to be evicted first).
const WRITE_BEHIND_SCAN: usize = 4096;

/// A block being read back from SSD into a slot in `Writing(OWNER_WRITER)`.
struct Staging {
    key: BlockKey,
    gen: u32,
    loc: Loc,
    /// Clients (entry, token) whose `Stage` this read answers.
    waiters: Vec<(u32, u64)>,
}

/// One block size: the slabs cut into it and their slots' order.
struct Class {
    slot_bytes: u64,
    stride: u64,
    slabs: Vec<u32>,
    free: Vec<u32>,
    lru: Lru,
}

/// Owner-side counters not tied to one client (exported as metrics).
#[derive(Default, Clone, Debug)]
pub struct CacheStats {
    pub commits: u64,
    pub duplicates: u64,
    pub admission_rejects: u64,
    pub evictions: u64,
    pub evict_pinned_skips: u64,
    pub bad_requests: u64,
    pub reclaimed_slots: u64,
    pub reclaimed_clients: u64,
    pub stash_starved: u64,
    /// Engine counters of client entries reclaimed since start (added just
    /// before the entry is cleared), so node totals stay exact and
    /// monotonic when engines leave.
    pub retired_engine: [u64; ENGINE_COUNTERS],
    /// Evictions per namespace; namespaces beyond the first
    /// [`NAMESPACE_STATS`] are counted under 0.
    pub namespace_evictions: HashMap<u64, u64>,
}

/// Namespaces with their own eviction counter (engines choose namespaces,
/// so the map must stay bounded).
const NAMESPACE_STATS: usize = 64;

impl CacheStats {
    fn evicted_from(&mut self, namespace: u64) {
        let ns = if self.namespace_evictions.contains_key(&namespace)
            || self.namespace_evictions.len() < NAMESPACE_STATS
        {
            namespace
        } else {
            0
        };
        *self.namespace_evictions.entry(ns).or_default() += 1;
    }

    /// Keep the engine counters of an entry about to be cleared.
    fn retire(&mut self, client: &ClientView<'_>) {
        for (r, c) in self
            .retired_engine
            .iter_mut()
            .zip(&client.entry.engine_counters)
        {
            *r = r.wrapping_add(c.load(Ordering::Relaxed));
        }
    }
}

pub struct Cache {
    seg: Arc<ControlSegment>,
    classes: Vec<Class>,
    class_by_bytes: HashMap<u64, usize>,
    free_slabs: Vec<u32>,
    lfu: TinyLfu,
    admission: bool,
    /// See [`Cache::set_pin_holders`].
    pin_holders: Vec<u32>,
    tick: u64,
    pub stats: CacheStats,
    /// The SSD tier, when configured.
    pub ssd: Option<Tier>,
    staging: HashMap<u32, Staging>,
    staging_keys: HashMap<BlockKey, u32>,
    /// The tick at which write-behind last found nothing to write: no scan
    /// again until something was committed or touched.
    write_behind_done_at: Option<u64>,
}

/// What went wrong with one request from one engine.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("slot {slot} out of range (pool has {max} slots)")]
    SlotOutOfRange { slot: u32, max: u64 },
    #[error("slot {slot} is {state:?}, not being written by this client at generation {gen}")]
    NotWriting {
        slot: u32,
        gen: u32,
        state: Option<SlotState>,
    },
    #[error("commit of {len} bytes into slot {slot} of {stride} bytes")]
    TooLong { slot: u32, len: u64, stride: u64 },
    #[error("namespace 0 is reserved")]
    ZeroNamespace,
    #[error(transparent)]
    Decode(#[from] pegaflow_shm::DecodeError),
}

/// Cannot serve a block size.
#[derive(Debug, thiserror::Error)]
pub enum ClassError {
    #[error(
        "block of {slot_bytes} bytes does not fit a slab of {slab_bytes} bytes: \
         restart the owner with --slab-size of at least {needed} (a multiple of 2 MiB)"
    )]
    TooLarge {
        slot_bytes: u64,
        slab_bytes: u64,
        needed: u64,
    },
    #[error(
        "this pool already serves {max} distinct block sizes; a block of {slot_bytes} bytes \
         would be one more: run engines of other shapes against another owner (--name)"
    )]
    TooMany { slot_bytes: u64, max: usize },
}

impl Cache {
    /// A cache over a freshly created (all-zero) segment.
    pub fn new(seg: Arc<ControlSegment>, admission: bool) -> Cache {
        let g = *seg.geometry();
        Cache {
            classes: Vec::new(),
            class_by_bytes: HashMap::new(),
            free_slabs: (0..g.num_slabs() as u32).rev().collect(),
            lfu: TinyLfu::new(g.num_slots().min(1 << 24) as usize),
            admission,
            pin_holders: (0..seg.max_clients()).collect(),
            tick: seg.header().owner_tick.load(Ordering::Relaxed),
            stats: CacheStats::default(),
            seg,
            ssd: None,
            staging: HashMap::new(),
            staging_keys: HashMap::new(),
            write_behind_done_at: None,
        }
    }

    /// Put the SSD tier behind this cache.
    pub fn attach_ssd(&mut self, tier: Tier) {
        self.ssd = Some(tier);
    }

    /// Whether the SSD tier has completions or queued jobs to handle.
    pub fn ssd_has_work(&self) -> bool {
        self.ssd.as_ref().is_some_and(|t| t.has_work())
    }

    /// Stop the tier's I/O (owner shutdown); blocks staged meanwhile stay
    /// `Writing(owner)` and are freed by the next owner's adoption.
    pub fn ssd_shutdown(&mut self) {
        if let Some(t) = self.ssd.as_mut() {
            t.shutdown();
        }
    }

    /// Whether the SSD tier would take `key` (TinyLFU: seen often enough).
    fn ssd_admits(&self, key: &BlockKey) -> bool {
        !self.admission || self.lfu.estimate(key_hash(key.namespace, &key.hash)) >= SSD_ADMIT_MIN
    }

    /// Offer the block of committed (or evicting) `slot` of `class` to the
    /// SSD tier, copying it out of the pool. `behind`: written while still
    /// cached (write-behind), not on eviction.
    fn offer_to_ssd(&mut self, slot: u32, class: usize, behind: bool) {
        let entry = &self.seg.slots()[slot as usize];
        let key = entry.key();
        let len = entry.len.load(Ordering::Relaxed);
        self.offer_block_to_ssd(key, len, slot, class, behind);
    }

    /// Offer `len` bytes of `slot` as the block `key` (the slot need not be
    /// committed: a commit the pool's admission refused is still worth a
    /// place on SSD). The caller keeps the slot's bytes stable meanwhile.
    fn offer_block_to_ssd(
        &mut self,
        key: BlockKey,
        len: u64,
        slot: u32,
        class: usize,
        behind: bool,
    ) {
        let Some((off, stride)) = self.seg.slot_location(slot) else {
            return;
        };
        let admitted = self.ssd_admits(&key);
        let class_bytes = self.classes[class].slot_bytes;
        let Some(tier) = self.ssd.as_mut() else {
            return;
        };
        if tier.contains(&key) {
            return;
        }
        if !admitted {
            if !behind {
                tier.stats.dropped_not_admitted += 1;
            }
            return;
        }
        tier.offer(key, len.min(stride), class_bytes, off, behind);
    }

    /// Write cold, admitted blocks that the tier does not hold yet, while
    /// it has room for writes (the owner calls this when idle). Returns
    /// blocks queued.
    pub fn ssd_write_behind(&mut self, budget: usize) -> usize {
        let Some(tier) = self.ssd.as_ref() else {
            return 0;
        };
        if !tier.can_write() || self.write_behind_done_at == Some(self.tick) {
            return 0;
        }
        let mut cands = Vec::new();
        for (ci, c) in self.classes.iter().enumerate() {
            for slot in c.lru.iter_cold().take(WRITE_BEHIND_SCAN) {
                let key = self.seg.slots()[slot as usize].key();
                if !tier.contains(&key) && self.ssd_admits(&key) {
                    cands.push((slot, ci));
                    if cands.len() >= budget {
                        break;
                    }
                }
            }
        }
        if cands.is_empty() {
            self.write_behind_done_at = Some(self.tick);
        }
        let mut n = 0;
        for (slot, ci) in cands.into_iter().take(budget) {
            if !self.ssd.as_ref().is_some_and(|t| t.can_write()) {
                break;
            }
            self.offer_to_ssd(slot, ci, true);
            n += 1;
        }
        n
    }

    /// An engine asked for `key` to be read back from SSD.
    fn stage(&mut self, client: &ClientView<'_>, key: BlockKey) {
        let who = (client.index, client.entry.token.load(Ordering::Relaxed));
        let done = |c: &ClientView<'_>| c.entry.add_owner(OwnerCounter::StagesDone, 1);
        let Some(tier) = self.ssd.as_mut() else {
            return done(client);
        };
        tier.stats.stage_requests += 1;
        if self.seg.index().get(&key).is_some() {
            tier.stats.stage_in_pool += 1;
            return done(client);
        }
        if let Some(&slot) = self.staging_keys.get(&key) {
            if let Some(s) = self.staging.get_mut(&slot) {
                s.waiters.push(who);
                return;
            }
        }
        let Some(loc) = tier.locate(&key) else {
            tier.stats.stage_not_on_ssd += 1;
            return done(client);
        };
        let Ok(class) = self.class_for(loc.class) else {
            return done(client);
        };
        let Some(slot) = self.take_free(class, true) else {
            if let Some(t) = self.ssd.as_mut() {
                t.stats.stage_no_slot += 1;
            }
            return done(client);
        };
        let entry = &self.seg.slots()[slot as usize];
        let st = entry.load_state().unwrap_or(SlotState::FREE);
        let fits = self
            .seg
            .slot_location(slot)
            .filter(|&(_, stride)| crate::ssd::segment::round_up(loc.len) <= stride);
        let Some((off, _)) = fits else {
            self.classes[class].free.push(slot);
            return done(client);
        };
        entry.start_writing(st, OWNER_WRITER);
        let tier = self.ssd.as_mut().expect("checked above");
        if !tier.read(key, loc, off, u64::from(slot)) {
            let st = entry.load_state().unwrap_or(SlotState::FREE);
            self.release_slot(slot, st);
            return done(client);
        }
        self.staging.insert(
            slot,
            Staging {
                key,
                gen: st.gen,
                loc,
                waiters: vec![who],
            },
        );
        self.staging_keys.insert(key, slot);
    }

    /// Apply the SSD tier's completions: staged blocks are committed into
    /// the pool (and the index), failed ones freed. Returns events handled.
    pub fn ssd_poll(&mut self) -> usize {
        let Some(tier) = self.ssd.as_mut() else {
            return 0;
        };
        let events = tier.poll();
        let n = events.len();
        for ev in events {
            let (tag, ok, checksum) = match ev {
                StageEvent::Staged { tag, .. } => (tag, true, false),
                StageEvent::Failed { tag, checksum } => (tag, false, checksum),
            };
            let slot = tag as u32;
            let Some(s) = self.staging.remove(&slot) else {
                continue;
            };
            self.staging_keys.remove(&s.key);
            let entry = &self.seg.slots()[slot as usize];
            let Some(st) = entry.load_state().filter(|x| {
                x.kind == SlotKind::Writing && x.client == OWNER_WRITER && x.gen == s.gen
            }) else {
                continue;
            };
            let staged = ok && self.publish_staged(slot, st, &s);
            if !staged {
                self.release_slot(slot, st);
                if checksum {
                    if let Some(t) = self.ssd.as_mut() {
                        t.forget(&s.key, s.loc);
                    }
                }
            }
            for (c, token) in s.waiters {
                if let Some(cv) = self.seg.client(c) {
                    if cv.entry.token.load(Ordering::Relaxed) == token {
                        cv.entry.add_owner(OwnerCounter::StagesDone, 1);
                        if staged {
                            cv.entry.add_owner(OwnerCounter::StagedBlocks, 1);
                        }
                    }
                }
            }
        }
        n
    }

    /// Commit a block read back from SSD into `slot`. `false`: not
    /// published (the pool got the key meanwhile, or no class).
    fn publish_staged(&mut self, slot: u32, st: SlotState, s: &Staging) -> bool {
        let index = self.seg.index();
        if index.get(&s.key).is_some() {
            return false;
        }
        let Some(class) = self.class_of_slot(slot) else {
            return false;
        };
        self.tick += 1;
        let entry = &self.seg.slots()[slot as usize];
        entry.commit(st, &s.key, s.loc.len, self.tick);
        if index.insert(&s.key, slot).is_err() {
            let st = entry.begin_evict().expect("just committed");
            entry.free(st);
            self.classes[class].free.push(slot);
            return true; // freed here: the caller must not free again
        }
        self.lfu.record(key_hash(s.key.namespace, &s.key.hash));
        self.classes[class].lru.insert_hot(slot);
        if let Some(t) = self.ssd.as_mut() {
            t.stats.staged_blocks += 1;
            t.stats.staged_bytes += s.loc.len;
        }
        true
    }

    pub fn segment(&self) -> &Arc<ControlSegment> {
        &self.seg
    }

    /// The class serving blocks of `slot_bytes`, created on first use.
    pub fn class_for(&mut self, slot_bytes: u64) -> Result<usize, ClassError> {
        if let Some(&c) = self.class_by_bytes.get(&slot_bytes) {
            return Ok(c);
        }
        let g = *self.seg.geometry();
        let stride = slot_bytes.max(g.granule_bytes).div_ceil(4096) * 4096;
        if slot_bytes == 0 || stride > g.slab_bytes {
            return Err(ClassError::TooLarge {
                slot_bytes,
                slab_bytes: g.slab_bytes,
                needed: stride.div_ceil(2 << 20) * (2 << 20),
            });
        }
        if self.classes.len() >= MAX_CLASSES {
            return Err(ClassError::TooMany {
                slot_bytes,
                max: MAX_CLASSES,
            });
        }
        let id = self.classes.len();
        self.classes.push(Class {
            slot_bytes,
            stride,
            slabs: Vec::new(),
            free: Vec::new(),
            lru: Lru::new(g.num_slots() as u32),
        });
        self.class_by_bytes.insert(slot_bytes, id);
        Ok(id)
    }

    /// Slots a class could hold if it had the whole pool.
    pub fn class_capacity(&self, class: usize) -> u64 {
        let g = self.seg.geometry();
        g.num_slabs() * (g.slab_bytes / self.classes[class].stride)
    }

    /// Give one unassigned slab to `class`, cutting it into slots.
    fn grow(&mut self, class: usize) -> bool {
        let Some(slab) = self.free_slabs.pop() else {
            return false;
        };
        let g = *self.seg.geometry();
        let c = &mut self.classes[class];
        let nslots = (g.slab_bytes / c.stride) as u32;
        let entry = &self.seg.slabs()[slab as usize];
        entry.slot_bytes.store(c.slot_bytes, Ordering::Relaxed);
        entry.nslots.store(nslots, Ordering::Relaxed);
        // Publish stride last: readers treat stride 0 as "unassigned".
        entry.stride.store(c.stride, Ordering::Release);
        let first = slab * g.slots_per_slab() as u32;
        c.slabs.push(slab);
        c.free.extend((first..first + nslots).rev());
        debug!(
            slab,
            class,
            slot_bytes = c.slot_bytes,
            nslots,
            "slab assigned"
        );
        true
    }

    /// The client entries that can hold pins: every entry not `FREE`. A free
    /// entry's counters were zeroed when it was reclaimed and it can only
    /// pin after being admitted, which happens under the owner's lock and
    /// updates this list; so the eviction check reads only these.
    pub fn set_pin_holders(&mut self, clients: &[u32]) {
        self.pin_holders.clear();
        self.pin_holders.extend_from_slice(clients);
    }

    /// Evict the coldest unpinned committed slot of `class`; returns it, now `Free`.
    fn evict_one(&mut self, class: usize) -> Option<u32> {
        let seg = &self.seg;
        let holders = &self.pin_holders;
        let mut stale = Vec::new();
        let mut pinned = Vec::new();
        let victim = self.classes[class]
            .lru
            .iter_cold()
            .take(EVICT_SCAN)
            .find_map(|slot| {
                let entry = &seg.slots()[slot as usize];
                let Some(st) = entry.begin_evict() else {
                    // Not committed: our LRU is stale for this slot.
                    stale.push(slot);
                    return None;
                };
                let is_pinned = any_pinned(
                    holders
                        .iter()
                        .filter_map(|&c| seg.client(c))
                        .map(|c| &c.pins[slot as usize]),
                );
                if is_pinned {
                    entry.abort_evict(st);
                    pinned.push(slot);
                    return None;
                }
                Some((slot, st))
            });
        self.stats.evict_pinned_skips += pinned.len() as u64;
        for slot in stale {
            self.classes[class].lru.remove(slot);
        }
        // A pinned block is being read: as good as used now. Moving it to
        // the hot end keeps the scan window free of it, so a long load (or
        // pins held by a waiting request) at the cold end cannot hide the
        // evictable blocks behind it from every later eviction.
        for slot in pinned {
            self.classes[class].lru.touch(slot);
        }
        let (slot, st) = victim?;
        if self.ssd.is_some() {
            // Evicting and unpinned: its bytes cannot change under the copy.
            self.offer_to_ssd(slot, class, false);
        }
        let entry = &self.seg.slots()[slot as usize];
        let key = entry.key();
        self.seg.index().remove(&key, slot);
        self.classes[class].lru.remove(slot);
        entry.free(st);
        self.stats.evictions += 1;
        self.stats.evicted_from(key.namespace);
        Some(slot)
    }

    /// A free slot of `class`: from its free list, a new slab, or (only if
    /// `may_evict`) by evicting the coldest unpinned block.
    fn take_free(&mut self, class: usize, may_evict: bool) -> Option<u32> {
        if let Some(s) = self.classes[class].free.pop() {
            return Some(s);
        }
        if self.grow(class) {
            return self.classes[class].free.pop();
        }
        if may_evict {
            self.evict_one(class)
        } else {
            None
        }
    }

    /// Whether `class` can only get slots by evicting.
    fn under_pressure(&self, class: usize) -> bool {
        self.classes[class].free.is_empty() && self.free_slabs.is_empty()
    }

    /// Top up a client's stash. Free slots are handed out freely, up to the
    /// client's base target; committed blocks are evicted only to serve an
    /// explicit request (`refill_asked` ahead of `refill_done`), and then only
    /// up to the shortfall the engine published (`stash_want`). So an idle
    /// stash never costs a cached block, and a stash never stays inflated
    /// after one large reservation. Returns slots added.
    pub fn refill(&mut self, client: &ClientView<'_>, class: usize) -> u32 {
        // Read the request before working, publish it as served after: a
        // request made meanwhile stays pending for the next pass.
        let asked = client.entry.refill_asked.load(Ordering::Acquire);
        let pending = asked != client.entry.refill_done.load(Ordering::Relaxed);
        let cap = client.stash.capacity();
        let base = u64::from(client.entry.stash_target.load(Ordering::Relaxed)).min(cap);
        let most = (self.class_capacity(class) / 2).min(cap);
        // Re-read per slot: an engine that stopped waiting retracts its want.
        let target = |c: &ClientView<'_>| {
            if pending {
                let want = u64::from(c.entry.stash_want.load(Ordering::Relaxed));
                base.max(want.min(most))
            } else {
                base
            }
        };
        let mut added = 0;
        while client.stash.len() < target(client) {
            let Some(slot) = self.take_free(class, pending) else {
                if pending {
                    self.stats.stash_starved += 1;
                }
                break;
            };
            let entry = &self.seg.slots()[slot as usize];
            let st = entry.load_state().unwrap_or(SlotState::FREE);
            entry.start_writing(st, client.index as u16);
            if !client
                .stash
                .push(&[u64::from(slot) | u64::from(st.gen) << 32])
            {
                // Cannot happen (len < target <= capacity), but never lose a slot.
                entry.free(SlotState {
                    gen: st.gen.wrapping_sub(1),
                    ..st
                });
                self.classes[class].free.push(slot);
                break;
            }
            added += 1;
        }
        if added > 0 {
            client
                .entry
                .add_owner(OwnerCounter::SlotsStashed, u64::from(added));
        }
        if pending {
            client.entry.refill_done.store(asked, Ordering::Release);
        }
        added
    }

    /// Apply the queued requests of one client, at most `DRAIN_BATCH` so
    /// one busy engine cannot starve the others. Returns how many.
    pub fn drain(
        &mut self,
        client: &ClientView<'_>,
    ) -> Result<usize, pegaflow_shm::ring::RingError> {
        client.requests.consume(DRAIN_BATCH, |words| {
            if let Err(e) = self.apply(client, words) {
                self.stats.bad_requests += 1;
                client.entry.add_owner(OwnerCounter::BadRequests, 1);
                warn!(
                    client = client.index,
                    pid = client.entry.pid.load(Ordering::Relaxed),
                    label = %client.entry.label(),
                    namespace = format!("{:#018x}", client.entry.namespace.load(Ordering::Relaxed)),
                    error = %e,
                    "ignored a bad request from an engine"
                );
            }
        })
    }

    /// The slot's state if it is `Writing(client, gen)`: the only state in
    /// which a client's commit or abort may touch it.
    fn writing_slot(
        &self,
        client: &ClientView<'_>,
        slot: u32,
        gen: u32,
    ) -> Result<SlotState, RequestError> {
        let max = self.seg.geometry().num_slots();
        let entry = self
            .seg
            .slots()
            .get(slot as usize)
            .ok_or(RequestError::SlotOutOfRange { slot, max })?;
        let st = entry.load_state();
        match st {
            Some(s)
                if s.kind == SlotKind::Writing
                    && u32::from(s.client) == client.index
                    && s.gen == gen =>
            {
                Ok(s)
            }
            _ => Err(RequestError::NotWriting {
                slot,
                gen,
                state: st,
            }),
        }
    }

    fn class_of_slot(&self, slot: u32) -> Option<usize> {
        let (_, stride) = self.seg.slot_location(slot)?;
        let slab = u64::from(slot) / self.seg.geometry().slots_per_slab();
        let bytes = self.seg.slabs()[slab as usize]
            .slot_bytes
            .load(Ordering::Relaxed);
        self.class_by_bytes
            .get(&bytes)
            .copied()
            .filter(|&c| self.classes[c].stride == stride)
    }

    fn release_slot(&mut self, slot: u32, st: SlotState) {
        self.seg.slots()[slot as usize].free(st);
        if let Some(c) = self.class_of_slot(slot) {
            self.classes[c].free.push(slot);
        }
    }

    fn apply(&mut self, client: &ClientView<'_>, words: &[u64; 8]) -> Result<(), RequestError> {
        match Request::decode(words)? {
            Request::Commit {
                slot,
                gen,
                len,
                key,
            } => self.commit(client, slot, gen, len, key),
            Request::Abort { slot, gen } => {
                let st = self.writing_slot(client, slot, gen)?;
                self.release_slot(slot, st);
                client.entry.add_owner(OwnerCounter::Aborts, 1);
                Ok(())
            }
            Request::Touch { count, slots } => {
                self.tick += 1;
                for &slot in &slots[..count as usize] {
                    self.touch(slot);
                }
                Ok(())
            }
            Request::Stage { key } => {
                self.stage(client, key);
                Ok(())
            }
        }
    }

    fn touch(&mut self, slot: u32) {
        let Some(entry) = self.seg.slots().get(slot as usize) else {
            return;
        };
        if entry.load_state().map(|s| s.kind) != Some(SlotKind::Committed) {
            return;
        }
        let key = entry.key();
        entry.last_access.store(self.tick, Ordering::Relaxed);
        self.lfu.record(key_hash(key.namespace, &key.hash));
        if let Some(c) = self.class_of_slot(slot) {
            self.classes[c].lru.touch(slot);
        }
    }

    fn commit(
        &mut self,
        client: &ClientView<'_>,
        slot: u32,
        gen: u32,
        len: u64,
        key: BlockKey,
    ) -> Result<(), RequestError> {
        let st = self.writing_slot(client, slot, gen)?;
        if key.namespace == 0 {
            self.release_slot(slot, st);
            return Err(RequestError::ZeroNamespace);
        }
        let stride = self.seg.slot_location(slot).map(|(_, s)| s).unwrap_or(0);
        if len > stride {
            self.release_slot(slot, st);
            return Err(RequestError::TooLong { slot, len, stride });
        }
        let Some(class) = self.class_of_slot(slot) else {
            self.release_slot(slot, st);
            return Err(RequestError::SlotOutOfRange {
                slot,
                max: self.seg.geometry().num_slots(),
            });
        };
        let kh = key_hash(key.namespace, &key.hash);
        self.lfu.record(kh);
        let index = self.seg.index();
        if index.get(&key).is_some() {
            self.release_slot(slot, st);
            self.stats.duplicates += 1;
            client.entry.add_owner(OwnerCounter::CommitDuplicates, 1);
            return Ok(());
        }
        if self.admission && self.under_pressure(class) {
            if let Some(victim) = self.classes[class].lru.coldest() {
                let vk = self.seg.slots()[victim as usize].key();
                if !self.lfu.admit(kh, key_hash(vk.namespace, &vk.hash)) {
                    // The pool keeps its (as hot) blocks, but a block seen
                    // often enough still goes to SSD: otherwise a working
                    // set larger than the pool never reaches the tier.
                    // Writing(this engine), committed by nobody: stable.
                    if self.ssd.is_some() {
                        self.offer_block_to_ssd(key, len, slot, class, false);
                    }
                    self.release_slot(slot, st);
                    self.stats.admission_rejects += 1;
                    client.entry.add_owner(OwnerCounter::AdmissionRejects, 1);
                    return Ok(());
                }
            }
        }
        self.tick += 1;
        let entry = &self.seg.slots()[slot as usize];
        entry.commit(st, &key, len, self.tick);
        match index.insert(&key, slot) {
            Ok(()) => {}
            Err(InsertError::Duplicate(_)) | Err(InsertError::Full) => {
                // Unreachable while the index has two buckets per slot; keep
                // the slot consistent rather than trusting that.
                let st = entry.begin_evict().expect("just committed");
                entry.free(st);
                if let Some(c) = self.class_of_slot(slot) {
                    self.classes[c].free.push(slot);
                }
                warn!(
                    slot,
                    client = client.index,
                    pid = client.entry.pid.load(Ordering::Relaxed),
                    namespace = format!("{:#018x}", key.namespace),
                    "index full; commit dropped"
                );
                return Ok(());
            }
        }
        self.classes[class].lru.insert_hot(slot);
        self.stats.commits += 1;
        client.entry.add_owner(OwnerCounter::Commits, 1);
        Ok(())
    }

    /// A client is gone for good (its process exited, or it said goodbye
    /// after finishing its copies): apply what it queued, free what it was
    /// writing, zero its pins and clear its entry. Returns slots freed.
    ///
    /// Never call this for a client whose process may still run copies into
    /// its writing slots or read its pinned ones: quarantine it instead.
    pub fn reclaim(&mut self, client: &ClientView<'_>) -> u64 {
        // First of all, the entry stops naming a process: an owner killed
        // half-way through (slots freed, entry not yet cleared) leaves an
        // entry the next owner's adoption takes for a dead engine's and
        // reclaims whole, instead of keeping it as a live engine's
        // (ORPHANED) with a stash of slots it no longer holds and pins
        // that would never be released while that process runs.
        let pid = client.entry.pid.swap(0, Ordering::SeqCst);
        if let Err(e) = self.drain(client) {
            warn!(
                client = client.index,
                pid,
                namespace = format!("{:#018x}", client.entry.namespace.load(Ordering::Relaxed)),
                error = %e,
                "request ring of a dead client is corrupt; discarded"
            );
        }
        let mut freed = 0;
        for slot in 0..self.seg.geometry().num_slots() as u32 {
            let entry = &self.seg.slots()[slot as usize];
            if let Some(st) = entry.load_state() {
                if st.kind == SlotKind::Writing && u32::from(st.client) == client.index {
                    self.release_slot(slot, st);
                    freed += 1;
                }
            }
        }
        for p in client.pins {
            if p.load(Ordering::Relaxed) != 0 {
                p.store(0, Ordering::SeqCst);
            }
        }
        client.requests.reset();
        client.stash.reset();
        self.stats.retire(client);
        client.entry.clear();
        self.stats.reclaimed_slots += freed;
        self.stats.reclaimed_clients += 1;
        freed
    }

    /// Rebuild private state from a segment a previous owner left behind.
    /// Clients whose process still lives become `ORPHANED` (kept for them to
    /// resume); everything of the others is reclaimed.
    ///
    /// The segment is not trusted: every slab entry and every slot is
    /// checked against the geometry ([`check_slab`], [`slot_problem`]).
    /// A corrupt slab entry is repaired when the block size it records
    /// determines the rest, else the slab is dropped with its blocks; an
    /// invalid slot is dropped. Dropping a committed block goes through
    /// `begin_evict` and the pin check like any eviction: a block a live
    /// (orphaned) engine pins, or a slot it is writing, is never freed; it
    /// is kept out of service instead (not indexed, not reusable) and the
    /// next adoption looks at it again. Every drop is counted in the log.
    pub fn adopt(seg: Arc<ControlSegment>, admission: bool) -> (Cache, AdoptReport) {
        let started = std::time::Instant::now();
        let g = *seg.geometry();
        let per = g.slots_per_slab() as u32;
        info!(
            slabs = g.num_slabs(),
            slots = g.num_slots(),
            clients = g.max_clients,
            "re-adopting segment: rebuilding the index and LRU from the slot table"
        );
        let mut cache = Cache::new(seg.clone(), admission);
        cache.free_slabs.clear();
        let mut report = AdoptReport::default();
        // [1] clients: alive ones are kept for resumption, with their pins.
        let mut alive = vec![false; g.max_clients as usize];
        for i in 0..seg.max_clients() {
            let c = seg.client(i).expect("in range");
            let state = c.entry.state();
            if state == client_state::FREE {
                continue;
            }
            let pid = c.entry.pid.load(Ordering::Relaxed);
            let same = pid_alive(pid)
                && process_start_time(pid) == Some(c.entry.start_time.load(Ordering::Relaxed));
            if same {
                c.entry
                    .state
                    .store(client_state::ORPHANED, Ordering::SeqCst);
                alive[i as usize] = true;
                report.orphaned_clients += 1;
            }
        }
        // Only live engines' pins count: the dead ones' are zeroed in [5].
        let adopter = Adopter {
            seg: &seg,
            holders: (0..seg.max_clients())
                .filter(|&i| alive[i as usize])
                .collect(),
            alive: &alive,
        };
        // [2] the index is rebuilt from scratch (it may have been mid-update
        // when the previous owner died), without reading through its seqlock.
        let index = seg.index();
        index.reset();
        // [3] slabs and their slots.
        let mut committed: Vec<(u64, u32)> = Vec::new();
        for (slab, e) in seg.slabs().iter().enumerate() {
            let slab = slab as u32;
            let first = slab * per;
            let stride = e.stride.load(Ordering::Acquire);
            let bytes = e.slot_bytes.load(Ordering::Relaxed);
            let nslots = e.nslots.load(Ordering::Relaxed);
            let verdict = match check_slab(&g, stride, bytes, nslots) {
                SlabCheck::Valid { nslots: n } => match cache.class_for(bytes) {
                    // check_slab derived the stride as class_for does.
                    Ok(c) if cache.classes[c].stride == stride => Ok((c, n)),
                    _ => Err(SlabCheck::Corrupt("no class for its block size")),
                },
                other => Err(other),
            };
            let (class, n) = match verdict {
                Ok(v) => v,
                Err(check) => {
                    // No usable layout: every slot id of the slab goes.
                    let mut drops = Drops::default();
                    for slot in first..first + per {
                        adopter.drop_loose(slot, &mut drops);
                    }
                    report.absorb(&drops);
                    if let SlabCheck::Corrupt(why) = check {
                        report.dropped.corrupt_slab += drops.committed;
                        report.corrupt_slabs += 1;
                        warn!(
                            slab,
                            stride,
                            slot_bytes = bytes,
                            nslots,
                            "adoption dropped {} committed blocks of slab {slab}: corrupt slab entry ({why})",
                            drops.committed
                        );
                    } else if drops.committed > 0 {
                        report.dropped.outside_slab += drops.committed;
                        warn!(
                            slab,
                            "adoption dropped {} committed blocks of slab {slab}: the slab is unassigned",
                            drops.committed
                        );
                    }
                    release_slab(&mut cache, e, slab, drops.kept);
                    continue;
                }
            };
            if n != nslots {
                warn!(
                    slab,
                    stride,
                    slot_bytes = bytes,
                    "repaired slab entry {slab}: nslots {nslots} -> {n} (a slab of {} holds {n} slots of stride {stride})",
                    g.slab_bytes
                );
                e.nslots.store(n, Ordering::Release);
                report.repaired_slabs += 1;
            }
            cache.classes[class].slabs.push(slab);
            let mut drops = Drops::default();
            for slot in first..first + n {
                if let Some(slot) = adopter.adopt_slot(
                    slot,
                    stride,
                    &index,
                    &mut committed,
                    &mut drops,
                    &mut report,
                ) {
                    cache.classes[class].free.push(slot);
                }
            }
            // Ids past nslots have no place in the pool.
            let mut outside = Drops::default();
            for slot in first + n..first + per {
                adopter.drop_loose(slot, &mut outside);
            }
            report.dropped.outside_slab += outside.committed;
            report.absorb(&drops);
            report.absorb(&outside);
        }
        for class in cache.classes.iter_mut() {
            class.free.reverse();
        }
        cache.free_slabs.reverse();
        // [4] LRU order from the last-access ticks the slots carry.
        committed.sort_unstable();
        for &(tick, slot) in &committed {
            if let Some(c) = cache.class_of_slot(slot) {
                cache.classes[c].lru.insert_hot(slot);
            }
            cache.tick = cache.tick.max(tick);
        }
        report.committed = committed.len() as u64;
        // [5] dead clients: nothing of theirs survives.
        for i in 0..seg.max_clients() {
            let c = seg.client(i).expect("in range");
            if !alive[i as usize] && c.entry.state() != client_state::FREE {
                for p in c.pins {
                    p.store(0, Ordering::Relaxed);
                }
                c.requests.reset();
                c.stash.reset();
                cache.stats.retire(&c);
                c.entry.clear();
                report.dead_clients += 1;
            }
        }
        report.elapsed = started.elapsed();
        let d = &report.dropped;
        if d.total() > 0 || report.garbage_slots > 0 {
            warn!(
                dropped_blocks = d.total(),
                corrupt_slab = d.corrupt_slab,
                outside_slab = d.outside_slab,
                bad_len = d.bad_len,
                zero_namespace = d.zero_namespace,
                duplicate_key = d.duplicate_key,
                index_full = d.index_full,
                garbage_slots = report.garbage_slots,
                "adoption dropped {} committed blocks of a corrupt control segment: {} in corrupt \
                 slabs, {} outside any slab, {} with a length of 0 or larger than their slot, {} \
                 under namespace 0, {} duplicate keys, {} the index had no room for; and freed {} \
                 slots with a garbage state",
                d.total(),
                d.corrupt_slab,
                d.outside_slab,
                d.bad_len,
                d.zero_namespace,
                d.duplicate_key,
                d.index_full,
                report.garbage_slots
            );
        }
        if report.quarantined_slots > 0 {
            warn!(
                quarantined_slots = report.quarantined_slots,
                "{} invalid slots are pinned or being written by live engines: kept out of \
                 service (not indexed, not reused) until the next owner start",
                report.quarantined_slots
            );
        }
        info!(
            committed = report.committed,
            orphaned_clients = report.orphaned_clients,
            dead_clients = report.dead_clients,
            writing_reclaimed = report.writing_reclaimed,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "re-adopted segment"
        );
        (cache, report)
    }

    /// Committed slots per class, free slots, and so on: for metrics.
    pub fn occupancy(&self) -> Occupancy {
        let mut o = Occupancy {
            free_slabs: self.free_slabs.len() as u64,
            ..Default::default()
        };
        for c in &self.classes {
            o.committed_slots += c.lru.len() as u64;
            o.committed_bytes += c.lru.len() as u64 * c.slot_bytes;
            o.free_slots += c.free.len() as u64;
            o.assigned_slabs += c.slabs.len() as u64;
            o.classes += 1;
        }
        o
    }

    /// Advance and publish the owner's tick (persisted for LRU rebuild).
    pub fn publish_tick(&self) {
        self.seg
            .header()
            .owner_tick
            .store(self.tick, Ordering::Relaxed);
    }

    /// Check the private state against the slot table; `Err` names the first
    /// violated invariant. Used by tests.
    pub fn verify(&self) -> Result<(), String> {
        let seg = &self.seg;
        for (ci, c) in self.classes.iter().enumerate() {
            for &s in &c.free {
                let st = seg.slots()[s as usize].load_state();
                if st.map(|s| s.kind) != Some(SlotKind::Free) {
                    return Err(format!("slot {s} in free list of class {ci} is {st:?}"));
                }
            }
            for s in c.lru.iter_cold() {
                let st = seg.slots()[s as usize].load_state();
                if st.map(|s| s.kind) != Some(SlotKind::Committed) {
                    return Err(format!("slot {s} in LRU of class {ci} is {st:?}"));
                }
                if seg.index().get(&seg.slots()[s as usize].key()) != Some(s) {
                    return Err(format!("committed slot {s} not found in the index"));
                }
            }
        }
        Ok(())
    }
}

/// What [`check_slab`] makes of a slab entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlabCheck {
    /// Stride 0: not cut into slots.
    Unassigned,
    /// Consistent; `nslots` is what the entry must say (a wrong count is
    /// repaired: stride and block size determine it).
    Valid { nslots: u32 },
    /// Not consistent with the geometry; its slots cannot be located.
    Corrupt(&'static str),
}

/// Check one slab entry against the geometry: the stride is the one the
/// owner derives from the block size (a multiple of 4 KiB, at least the
/// granule, at most the slab), and `nslots = slab_bytes / stride`.
pub fn check_slab(g: &Geometry, stride: u64, slot_bytes: u64, nslots: u32) -> SlabCheck {
    if stride == 0 {
        return if nslots == 0 && slot_bytes == 0 {
            SlabCheck::Unassigned
        } else {
            SlabCheck::Corrupt("stride 0 with slots")
        };
    }
    if !stride.is_multiple_of(4096) || stride < g.granule_bytes || stride > g.slab_bytes {
        return SlabCheck::Corrupt("impossible stride");
    }
    if slot_bytes == 0 || slot_bytes > stride {
        return SlabCheck::Corrupt("block size 0 or larger than the stride");
    }
    if stride != slot_bytes.max(g.granule_bytes).div_ceil(4096) * 4096 {
        return SlabCheck::Corrupt("stride does not match the block size");
    }
    SlabCheck::Valid {
        nslots: (g.slab_bytes / stride) as u32,
    }
}

/// Why a committed slot of a valid slab cannot be served.
pub fn slot_problem(namespace: u64, len: u64, stride: u64) -> Option<&'static str> {
    if namespace == 0 {
        Some("namespace 0")
    } else if len == 0 || len > stride {
        Some("length 0 or larger than the slot")
    } else {
        None
    }
}

/// Per-slab tally of what adoption dropped.
#[derive(Default)]
struct Drops {
    /// Committed blocks dropped.
    committed: u64,
    /// Slots with an undecodable state, freed.
    garbage: u64,
    /// Slots that should go but a live engine pins or writes.
    kept: u64,
}

/// Adoption's view of who may still hold slots.
struct Adopter<'a> {
    seg: &'a ControlSegment,
    /// Live (orphaned) clients: their pins hold slots.
    holders: Vec<u32>,
    alive: &'a [bool],
}

impl Adopter<'_> {
    fn pinned(&self, slot: u32) -> bool {
        any_pinned(
            self.holders
                .iter()
                .filter_map(|&c| self.seg.client(c))
                .map(|c| &c.pins[slot as usize]),
        )
    }

    /// Free a committed slot the way eviction does: `Evicting`, then the
    /// pin check. `false` (slot left committed) if a live engine pins it.
    fn drop_committed(&self, slot: u32) -> bool {
        let entry = &self.seg.slots()[slot as usize];
        let Some(st) = entry.begin_evict() else {
            return false;
        };
        if self.pinned(slot) {
            entry.abort_evict(st);
            return false;
        }
        entry.free(st);
        true
    }

    /// A slot with an undecodable state word: freed (generation carried on,
    /// so no stale reference validates) unless a live engine pins it.
    fn drop_garbage(&self, slot: u32, raw: u64, drops: &mut Drops) -> bool {
        if self.pinned(slot) {
            drops.kept += 1;
            return false;
        }
        debug!(
            slot,
            state = format!("{raw:#018x}"),
            "garbage slot state; freeing the slot"
        );
        self.seg.slots()[slot as usize].free(SlotState {
            gen: (raw >> 32) as u32,
            ..SlotState::FREE
        });
        drops.garbage += 1;
        true
    }

    /// A slot id that has no place in the pool (unassigned or corrupt slab,
    /// or past its slab's nslots): anything but `Free` there is dropped,
    /// unless a live engine holds it. Not put in any free list.
    fn drop_loose(&self, slot: u32, drops: &mut Drops) {
        let entry = &self.seg.slots()[slot as usize];
        let raw = entry.state.load(Ordering::SeqCst);
        match SlotState::unpack(raw) {
            None => {
                self.drop_garbage(slot, raw, drops);
            }
            Some(st) if st.kind == SlotKind::Free => {}
            Some(st) if st.kind == SlotKind::Writing => {
                if self.alive.get(st.client as usize) == Some(&true) {
                    drops.kept += 1;
                } else {
                    entry.free(st);
                }
            }
            Some(st) => {
                if st.kind == SlotKind::Evicting {
                    entry.abort_evict(st);
                }
                if self.drop_committed(slot) {
                    drops.committed += 1;
                } else {
                    drops.kept += 1;
                }
            }
        }
    }

    /// One slot of a valid slab of `stride`: committed ones are checked and
    /// indexed, writing ones of live engines kept, the rest freed. Returns
    /// the slot if it is now free for the class's free list.
    fn adopt_slot(
        &self,
        slot: u32,
        stride: u64,
        index: &pegaflow_shm::index::Index<'_>,
        committed: &mut Vec<(u64, u32)>,
        drops: &mut Drops,
        report: &mut AdoptReport,
    ) -> Option<u32> {
        let entry = &self.seg.slots()[slot as usize];
        let raw = entry.state.load(Ordering::SeqCst);
        let Some(st) = SlotState::unpack(raw) else {
            return self.drop_garbage(slot, raw, drops).then_some(slot);
        };
        match st.kind {
            SlotKind::Committed | SlotKind::Evicting => {
                // An eviction that was cut short: the pin check is redone later.
                if st.kind == SlotKind::Evicting {
                    entry.abort_evict(st);
                }
                let key = entry.key();
                let len = entry.len.load(Ordering::Relaxed);
                let problem = match slot_problem(key.namespace, len, stride) {
                    Some(p) => Some(p),
                    None => match index.insert(&key, slot) {
                        Ok(()) => {
                            committed.push((entry.last_access.load(Ordering::Relaxed), slot));
                            return None;
                        }
                        Err(InsertError::Duplicate(_)) => Some("duplicate key"),
                        Err(InsertError::Full) => Some("index full"),
                    },
                };
                let d = &mut report.dropped;
                match problem {
                    Some("namespace 0") => d.zero_namespace += 1,
                    Some("duplicate key") => d.duplicate_key += 1,
                    Some("index full") => d.index_full += 1,
                    _ => d.bad_len += 1,
                }
                debug!(
                    slot,
                    len,
                    stride,
                    namespace = format!("{:#018x}", key.namespace),
                    "dropping a committed slot: {}",
                    problem.unwrap_or("")
                );
                if self.drop_committed(slot) {
                    Some(slot)
                } else {
                    drops.kept += 1;
                    None
                }
            }
            SlotKind::Writing if self.alive.get(st.client as usize) == Some(&true) => {
                report.writing_kept += 1;
                None
            }
            SlotKind::Writing | SlotKind::Free => {
                if st.kind == SlotKind::Writing {
                    report.writing_reclaimed += 1;
                }
                entry.free(st);
                Some(slot)
            }
        }
    }
}

/// A slab whose slots were all dropped goes back to the unassigned pool;
/// one that still has slots a live engine holds stays out of service.
fn release_slab(cache: &mut Cache, e: &pegaflow_shm::slot_table::SlabEntry, slab: u32, kept: u64) {
    e.stride.store(0, Ordering::Release);
    e.nslots.store(0, Ordering::Relaxed);
    e.slot_bytes.store(0, Ordering::Relaxed);
    if kept == 0 {
        cache.free_slabs.push(slab);
    } else {
        warn!(
            slab,
            kept, "slab {slab} stays out of service: live engines still hold {kept} of its slots"
        );
    }
}

#[derive(Default, Debug, Clone)]
pub struct Occupancy {
    pub committed_slots: u64,
    pub committed_bytes: u64,
    pub free_slots: u64,
    pub free_slabs: u64,
    pub assigned_slabs: u64,
    pub classes: u64,
}

#[derive(Default, Debug, Clone)]
pub struct AdoptReport {
    pub committed: u64,
    pub orphaned_clients: u64,
    pub dead_clients: u64,
    pub writing_kept: u64,
    pub writing_reclaimed: u64,
    /// Committed blocks dropped because the segment was corrupt.
    pub dropped: Dropped,
    /// Slab entries whose slot count was wrong and was rewritten.
    pub repaired_slabs: u64,
    /// Slab entries that made no sense (their slots were dropped).
    pub corrupt_slabs: u64,
    /// Slots with an undecodable state word, freed.
    pub garbage_slots: u64,
    /// Invalid slots a live engine pins or writes: kept out of service.
    pub quarantined_slots: u64,
    pub elapsed: std::time::Duration,
}

/// Committed blocks adoption dropped, by reason.
#[derive(Default, Debug, Clone)]
pub struct Dropped {
    pub corrupt_slab: u64,
    pub outside_slab: u64,
    pub bad_len: u64,
    pub zero_namespace: u64,
    pub duplicate_key: u64,
    pub index_full: u64,
}

impl Dropped {
    pub fn total(&self) -> u64 {
        self.corrupt_slab
            + self.outside_slab
            + self.bad_len
            + self.zero_namespace
            + self.duplicate_key
            + self.index_full
    }
}

impl AdoptReport {
    fn absorb(&mut self, d: &Drops) {
        self.garbage_slots += d.garbage;
        self.quarantined_slots += d.kept;
    }
}
