//! The engine client: what an inference engine links to use the owner's
//! pool. Lookups, pins, saves and releases go through shared memory only.
//!
//! ```text
//!   lookup(ns, hashes)  -> Pinned        read index, pin, validate   (no syscall)
//!   reserve(n)          -> Reservation   pop free slots from the stash
//!   slot_ptr(slot)                       where to copy a block to/from
//!   commit(slot, key, len)               push Commit, ring the owner
//!   release(&Pinned)                     decrement own pin counters
//! ```
//!
//! ## When the owner is gone
//!
//! A background thread holds the socket. When the owner hangs up, the
//! session is dropped from use: lookups miss, reservations come back empty
//! (the saves are counted as skipped), and the thread reconnects every
//! `reconnect_interval`. A restarted owner that re-adopted the same
//! segments gives this engine back its client entry, pins and stash
//! included. Nothing is raised into the caller for any of it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailbox::Mailbox as ReplySlot;
use parking_lot::RwLock;
use pegaflow_shm::client::EngineCounter;
use pegaflow_shm::proto::{self, ClientMsg, Hello, OwnerMsg};
use pegaflow_shm::request::{Request, TOUCH_MAX};
use pegaflow_shm::segment::{default_socket_path, PoolSegment};
use pegaflow_shm::slot_table::{announce_pin, withdraw_pin, BlockKey};
use pegaflow_shm::sync::{fence, Ordering};
use tracing::{info, warn};

use crate::error::EngineError;
use crate::session::{Session, Shared};

/// How an engine finds and presents itself to the owner.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Owner instance name (`pegaflow-owner --name`).
    pub name: String,
    /// Owner socket; default derived from `name` as the owner does.
    pub socket: Option<PathBuf>,
    /// Shown in metrics and `pegaflow-inspect`.
    pub label: String,
    /// Namespace this engine saves into (0: lookups only).
    pub namespace: u64,
    /// Bytes of one block this engine saves (0: lookups only).
    pub slot_bytes: u64,
    pub reconnect_interval: Duration,
    /// How long `reserve` may wait for the owner to refill a short stash
    /// before dropping the rest of the save. Bounded and small: inference
    /// must not stall on the cache.
    pub reserve_wait: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            name: std::env::var("PEGAFLOW_NAME").unwrap_or_else(|_| "default".into()),
            socket: std::env::var_os("PEGAFLOW_SOCKET").map(PathBuf::from),
            label: String::new(),
            namespace: 0,
            slot_bytes: 0,
            reconnect_interval: Duration::from_millis(200),
            reserve_wait: Duration::from_millis(2),
        }
    }
}

impl EngineConfig {
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| default_socket_path(&self.name))
    }
}

/// A block this engine pinned: it stays readable until released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinnedBlock {
    pub slot: u32,
    pub gen: u32,
}

/// The leading hits of a lookup, pinned in one session. Each block stays
/// pinned until it is released ([`Pinned::release_range`],
/// [`Engine::release`]) or the `Pinned` is dropped: a pin can neither leak
/// nor be released twice, and it is always released into the client entry
/// it was taken in, whatever the engine reconnected to since.
pub struct Pinned {
    pub blocks: Vec<PinnedBlock>,
    segment_id: u64,
    state: parking_lot::Mutex<PinState>,
}

struct PinState {
    /// The session the pins were taken in; let go once none is held, so a
    /// fully released `Pinned` keeps no connection alive.
    session: Option<Arc<Session>>,
    /// Which blocks still hold their pin.
    held: Vec<bool>,
}

impl Pinned {
    fn new(session: Option<Arc<Session>>, blocks: Vec<PinnedBlock>) -> Pinned {
        Pinned {
            segment_id: session.as_ref().map_or(0, |s| s.welcome.segment_id),
            state: parking_lot::Mutex::new(PinState {
                session: (!blocks.is_empty()).then_some(session).flatten(),
                held: vec![true; blocks.len()],
            }),
            blocks,
        }
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The segment the pins were taken in (0 when none were).
    pub fn segment_id(&self) -> u64 {
        self.segment_id
    }

    /// Host address and valid length of pinned block `i`, if it is still
    /// pinned and still the block that was pinned.
    pub fn block(&self, i: usize) -> Option<(*const u8, usize)> {
        let st = self.state.lock();
        if !st.held.get(i).copied().unwrap_or(false) {
            return None;
        }
        let b = self.blocks.get(i)?;
        st.session.as_ref()?.committed_block(b.slot, b.gen)
    }

    /// Whether block `i` is still pinned and still the block that was pinned
    /// (checked after a copy out of it: `false` means the copy may hold other
    /// bytes). A block the owner has begun to evict is still valid: it backs
    /// off from the pin, and a slot is rewritten only in a later generation.
    pub fn still_valid(&self, i: usize) -> bool {
        let st = self.state.lock();
        match (&st.session, self.blocks.get(i), st.held.get(i)) {
            (Some(s), Some(b), Some(true)) => s.is_committed(b.slot, b.gen),
            _ => false,
        }
    }

    /// Release the pins of blocks `range` (those not released yet).
    pub fn release_range(&self, range: std::ops::Range<usize>) {
        let mut st = self.state.lock();
        let Some(s) = st.session.clone() else { return };
        let end = range.end.min(st.held.len());
        let start = range.start.min(end);
        if st.held[start..end].iter().any(|&h| h) {
            let pins = s.client().pins;
            let _g = s.shared.pin_lock.lock();
            for i in start..end {
                if std::mem::replace(&mut st.held[i], false) {
                    if let Some(p) = pins.get(self.blocks[i].slot as usize) {
                        withdraw_pin(p);
                    }
                }
            }
        }
        if !st.held.iter().any(|&h| h) {
            st.session = None;
        }
    }

    /// Release every pin still held.
    pub fn release_all(&self) {
        self.release_range(0..self.blocks.len());
    }

    /// Pins still held.
    pub fn held(&self) -> usize {
        self.state.lock().held.iter().filter(|&&h| h).count()
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.release_all();
    }
}

/// Free slots taken from the stash, to be committed or aborted. Whatever is
/// neither when it is dropped is aborted (drop it only once no copy into
/// its slots is in flight).
pub struct Reservation {
    session: Option<Arc<Session>>,
    pub slots: Vec<u32>,
    gens: Vec<u32>,
    /// Slots committed or aborted already.
    done: parking_lot::Mutex<Vec<bool>>,
}

impl Reservation {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Host address and capacity of reserved slot `i`.
    pub fn slot(&self, i: usize) -> Option<(*mut u8, usize)> {
        self.session.as_ref()?.slot_ptr(*self.slots.get(i)?)
    }

    /// The segment the slots belong to (0 when none were reserved).
    pub fn segment_id(&self) -> u64 {
        self.session.as_ref().map_or(0, |s| s.welcome.segment_id)
    }

    /// Queue `Commit`s (`Some(key, len)`) or `Abort`s (`None`) for the
    /// not-yet-done slots among `items`; returns how many were queued.
    /// Slots whose request cannot be queued stay ours: they go to the
    /// engine's spare list and are aborted once the owner serves our entry
    /// again.
    fn finish(&self, items: &[(usize, Option<(BlockKey, u64)>)], wait: Duration) -> usize {
        let Some(s) = &self.session else { return 0 };
        let mut done = self.done.lock();
        let mut reqs = Vec::with_capacity(items.len());
        let mut which = Vec::with_capacity(items.len());
        for &(i, what) in items {
            if i >= self.slots.len() || done[i] {
                continue;
            }
            done[i] = true;
            let (slot, gen) = (self.slots[i], self.gens[i]);
            reqs.push(match what {
                Some((key, len)) => Request::Commit {
                    slot,
                    gen,
                    len,
                    key,
                },
                None => Request::Abort { slot, gen },
            });
            which.push(i);
        }
        if reqs.is_empty() {
            return 0;
        }
        let serves = s.shared.serves(s);
        let queued = if serves {
            push_requests(s, &reqs, wait)
        } else {
            0
        };
        let client = s.client();
        client
            .entry
            .held_slots
            .fetch_sub(queued as u64, Ordering::Relaxed);
        if queued < reqs.len() {
            let id = s.id();
            let mut spare = s.shared.spare.lock();
            for &i in &which[queued..] {
                spare.push((id, self.slots[i], self.gens[i]));
            }
            if serves {
                client
                    .entry
                    .add_engine(EngineCounter::CommitRingFull, (reqs.len() - queued) as u64);
            }
        }
        queued
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let rest: Vec<_> = {
            let done = self.done.lock();
            (0..self.slots.len())
                .filter(|&i| !done[i])
                .map(|i| (i, None))
                .collect()
        };
        if !rest.is_empty() {
            self.finish(&rest, Duration::ZERO);
        }
    }
}

/// Push requests on a session's request ring (one producer at a time, per
/// engine), waiting at most `wait` for room; rings the owner. Returns how
/// many were queued.
fn push_requests(s: &Session, reqs: &[Request], wait: Duration) -> usize {
    let words: Vec<[u64; 8]> = reqs.iter().map(Request::encode).collect();
    let client = s.client();
    let deadline = Instant::now() + wait;
    let mut queued = 0;
    loop {
        queued += {
            let _g = s.shared.request_lock.lock();
            client.requests.push_many(&words[queued..])
        };
        s.ring_owner();
        if queued == words.len() || Instant::now() >= deadline {
            return queued;
        }
        std::hint::spin_loop();
    }
}

/// What [`Engine::stage`] queued: `queued` requests, settled once the
/// owner's count of finished stages reaches `until` in the same entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageTicket {
    pub queued: usize,
    pub until: u64,
    entry: Option<crate::session::EntryId>,
}

/// Counters this process keeps itself (also while disconnected).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub connected: bool,
    pub epoch: u64,
    pub reconnects: u64,
    pub lookups: u64,
    pub hit_blocks: u64,
    pub miss_blocks: u64,
    pub saved_blocks: u64,
    pub save_dropped_blocks: u64,
    pub save_skipped_blocks: u64,
    pub loaded_blocks: u64,
    /// Why the last attempt to reach the owner failed (`None` once
    /// connected): what a log line about an unreachable owner should say.
    pub last_error: Option<String>,
}

#[derive(Default)]
struct Local {
    reconnects: AtomicU64,
    lookups: AtomicU64,
    hit_blocks: AtomicU64,
    miss_blocks: AtomicU64,
    saved_blocks: AtomicU64,
    save_dropped_blocks: AtomicU64,
    save_skipped_blocks: AtomicU64,
    loaded_blocks: AtomicU64,
    last_error: parking_lot::Mutex<Option<String>>,
}

/// The last [`Engine::count_hits`] of a few namespaces: the hits it found.
///
/// vLLM's scheduler asks how many leading blocks every TP rank's namespace
/// holds (one `count_hits` per namespace), then pins the common prefix
/// (one `lookup` per namespace). That is one lookup per namespace, counted
/// by the probe; the `lookup` that pins a prefix of the probe's hits only
/// confirms it. A hit counted by the probe that is gone by the time it is
/// pinned (evicted in between: a race of microseconds) stays counted.
#[derive(Default)]
struct Probes {
    /// (namespace, the hits found), most recent last.
    last: Vec<(u64, Vec<[u8; 32]>)>,
}

impl Probes {
    /// Namespaces remembered: more than any TP degree a scheduler probes.
    const KEEP: usize = 16;

    fn record(&mut self, namespace: u64, hits: &[[u8; 32]]) {
        let mut v = match self.last.iter().position(|p| p.0 == namespace) {
            Some(i) => self.last.remove(i).1,
            None if self.last.len() >= Self::KEEP => self.last.remove(0).1,
            None => Vec::new(),
        };
        v.clear();
        v.extend_from_slice(hits);
        self.last.push((namespace, v));
    }

    /// Whether `hashes` pins hits the last probe of `namespace` counted
    /// (then the probe is used up: a second lookup counts again).
    fn confirm(&mut self, namespace: u64, hashes: &[[u8; 32]]) -> bool {
        let Some(i) = self.last.iter().position(|p| p.0 == namespace) else {
            return false;
        };
        let hits = &self.last[i].1;
        let ok =
            !hashes.is_empty() && hits.len() >= hashes.len() && hits[..hashes.len()] == *hashes;
        if ok {
            self.last.remove(i);
        }
        ok
    }
}

struct Inner {
    cfg: EngineConfig,
    probes: parking_lot::Mutex<Probes>,
    socket: PathBuf,
    session: RwLock<Option<Arc<Session>>>,
    stop: AtomicBool,
    local: Local,
    ipc_reply: ReplySlot<OwnerMsg>,
    /// Locks and spare slots shared by every session of this engine.
    shared: Arc<Shared>,
    /// IPC handles this engine published, republished on every reconnect.
    published: parking_lot::Mutex<std::collections::HashMap<String, Vec<u8>>>,
}

/// A connection to the owner; cheap to clone, safe to share across threads.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Connect to the owner. Succeeds when the owner is not running (the
    /// engine then works in degraded mode and connects when it appears);
    /// fails only when the owner refuses this engine (ABI mismatch,
    /// permissions, a block too large for its slabs).
    pub fn connect(cfg: EngineConfig) -> Result<Engine, EngineError> {
        if (cfg.namespace == 0) != (cfg.slot_bytes == 0) {
            return Err(EngineError::Config(
                "namespace and slot_bytes must both be set, or neither".into(),
            ));
        }
        let socket = cfg.socket_path();
        let inner = Arc::new(Inner {
            cfg,
            probes: Default::default(),
            socket,
            session: RwLock::new(None),
            stop: AtomicBool::new(false),
            local: Local::default(),
            ipc_reply: ReplySlot::default(),
            shared: Arc::default(),
            published: Default::default(),
        });
        let first = match Session::connect(&inner.socket, inner.hello(), None, inner.shared.clone())
        {
            Ok((s, reader)) => Some((Arc::new(s), reader)),
            Err(e @ (EngineError::Rejected { .. } | EngineError::SocketPermission { .. })) => {
                return Err(e)
            }
            Err(e) => {
                info!(socket = %inner.socket.display(), error = %e, "owner not reachable; running without cache until it is");
                *inner.local.last_error.lock() = Some(e.to_string());
                None
            }
        };
        let engine = Engine { inner };
        let weak = Arc::downgrade(&engine.inner);
        let (session, reader) = match first {
            Some((s, r)) => (Some(s), Some(r)),
            None => (None, None),
        };
        if let Some(s) = &session {
            info!(
                client = s.welcome.client,
                epoch = s.welcome.epoch,
                "connected to pegaflow-owner"
            );
        }
        *engine.inner.shared.live_entry.lock() = session.as_ref().map(|s| s.id());
        *engine.inner.session.write() = session;
        std::thread::Builder::new()
            .name("pegaflow-monitor".into())
            .spawn(move || monitor(weak, reader))
            .map_err(|e| EngineError::Config(format!("cannot start the monitor thread: {e}")))?;
        Ok(engine)
    }

    fn session(&self) -> Option<Arc<Session>> {
        self.inner
            .session
            .read()
            .as_ref()
            .filter(|s| s.is_alive())
            .cloned()
    }

    pub fn is_connected(&self) -> bool {
        self.session().is_some()
    }

    /// Wait up to `timeout` for a live session (tests, start-up).
    pub fn wait_connected(&self, timeout: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if self.is_connected() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.is_connected()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    /// The segment this engine is connected to now (0 while disconnected).
    pub fn segment_id(&self) -> u64 {
        self.session().map_or(0, |s| s.welcome.segment_id)
    }

    /// Leading hits of `hashes` in `namespace`, without pinning.
    ///
    /// Counted as a lookup (lookups, blocks asked, hits, misses): a
    /// scheduler probes with this, then pins the hits it will load with
    /// [`Engine::lookup`], which is then not counted a second time (see
    /// [`Probes`]).
    pub fn count_hits(&self, namespace: u64, hashes: &[[u8; 32]]) -> usize {
        let Some(s) = self.session() else {
            self.count_lookup(None, hashes.len() as u64, 0);
            return 0;
        };
        let index = s.ctl.index();
        let found = hashes
            .iter()
            .take_while(|h| index.get(&BlockKey::new(namespace, **h)).is_some())
            .count();
        self.count_lookup(Some(&s), hashes.len() as u64, found as u64);
        self.inner.probes.lock().record(namespace, &hashes[..found]);
        found
    }

    /// Count one lookup of `asked` blocks of which `hits` were found: in
    /// this process, and in the client entry when connected.
    fn count_lookup(&self, s: Option<&Session>, asked: u64, hits: u64) {
        let l = &self.inner.local;
        l.lookups.fetch_add(1, AtomicOrdering::Relaxed);
        l.hit_blocks.fetch_add(hits, AtomicOrdering::Relaxed);
        l.miss_blocks
            .fetch_add(asked - hits, AtomicOrdering::Relaxed);
        if let Some(s) = s {
            let e = s.client().entry;
            e.add_engine(EngineCounter::Lookups, 1);
            e.add_engine(EngineCounter::LookupBlocks, asked);
            e.add_engine(EngineCounter::HitBlocks, hits);
            e.add_engine(EngineCounter::MissBlocks, asked - hits);
        }
    }

    /// Leading blocks of `hashes` in `namespace` that the owner's SSD tier
    /// holds, from the membership set in shm (no syscall, no RPC). Call it
    /// with the hashes that follow the pool's hits. A block it counts may
    /// still miss after staging (false positives are allowed), and a block
    /// being moved may be missed: it only decides whether staging is worth
    /// waiting for.
    pub fn ssd_hits(&self, namespace: u64, hashes: &[[u8; 32]]) -> usize {
        let Some(s) = self.session() else { return 0 };
        let set = s.ctl.ssd_set();
        hashes
            .iter()
            .take_while(|h| set.contains(&BlockKey::new(namespace, **h)))
            .count()
    }

    /// Leading pool hits of `hashes`, and, when the pool's run ends before
    /// blocks the SSD tier holds, how many of those were queued for
    /// staging ([`Engine::stage`]). Never waits.
    pub fn count_hits_or_stage(&self, namespace: u64, hashes: &[[u8; 32]]) -> (usize, StageTicket) {
        let pool = self.count_hits(namespace, hashes);
        let rest = &hashes[pool..];
        let on_ssd = self.ssd_hits(namespace, rest);
        (pool, self.stage(namespace, &rest[..on_ssd]))
    }

    /// Ask the owner to read these blocks back from its SSD tier into the
    /// pool (one `Stage` request each, on the request ring). Never waits:
    /// requests that do not fit in half the ring are not queued. A later
    /// lookup hits what was staged; [`Engine::stage_settled`] says when the
    /// owner has finished every request up to this one.
    pub fn stage(&self, namespace: u64, hashes: &[[u8; 32]]) -> StageTicket {
        let Some(s) = self.session() else {
            return StageTicket::default();
        };
        if hashes.is_empty() {
            return StageTicket::default();
        }
        let reqs: Vec<[u64; 8]> = hashes
            .iter()
            .map(|h| {
                Request::Stage {
                    key: BlockKey::new(namespace, *h),
                }
                .encode()
            })
            .collect();
        let client = s.client();
        let queued = {
            let _g = s.shared.request_lock.lock();
            let room = (client.requests.capacity() / 2).saturating_sub(client.requests.len());
            let n = reqs.len().min(room as usize);
            client.requests.push_many(&reqs[..n])
        };
        if queued == 0 {
            return StageTicket::default();
        }
        let until = client.entry.engine_counters[EngineCounter::StageBlocks as usize]
            .fetch_add(queued as u64, Ordering::Relaxed)
            + queued as u64;
        s.ring_owner();
        StageTicket {
            queued,
            until,
            entry: Some(s.id()),
        }
    }

    /// Whether the owner has finished (staged, or given up on) every stage
    /// request this engine queued up to `ticket`. Also true once the engine
    /// is connected to another entry or segment (nothing will come), and
    /// for an empty ticket.
    pub fn stage_settled(&self, ticket: &StageTicket) -> bool {
        let Some(id) = ticket.entry else { return true };
        let Some(s) = self.session() else { return true };
        if s.id() != id {
            return true;
        }
        s.client()
            .entry
            .owner(pegaflow_shm::client::OwnerCounter::StagesDone)
            >= ticket.until
    }

    /// Leading hits of `hashes` in `namespace`, pinned: they stay valid until
    /// released (or the returned [`Pinned`] is dropped).
    ///
    /// Counted as a lookup unless it pins hits that [`Engine::count_hits`]
    /// just counted (a prefix of the hits of the last probe of this
    /// namespace).
    pub fn lookup(&self, namespace: u64, hashes: &[[u8; 32]]) -> Pinned {
        let probed = self.inner.probes.lock().confirm(namespace, hashes);
        let Some(s) = self.session() else {
            if !probed {
                self.count_lookup(None, hashes.len() as u64, 0);
            }
            return Pinned::new(None, Vec::new());
        };
        let client = s.client();
        let index = s.ctl.index();
        let slots = s.ctl.slots();
        // [a] The index: the leading run of keys it maps to a slot id that
        // exists. No writes, so the loads of successive keys overlap.
        let found: Vec<u32> = hashes
            .iter()
            .map_while(|h| index.get(&BlockKey::new(namespace, *h)))
            .take_while(|&slot| (slot as usize) < slots.len().min(client.pins.len()))
            .collect();
        let mut blocks = Vec::with_capacity(found.len());
        {
            // This client's pin counters have one writer at a time.
            let _g = s.shared.pin_lock.lock();
            // [b] Announce every pin, [c] one fence, [d] validate in chain
            // order against the slot table (which decides, not the index);
            // the first failure ends the hit run and withdraws the rest.
            let announced = found
                .iter()
                .take_while(|&&slot| announce_pin(&client.pins[slot as usize]))
                .count();
            fence(Ordering::SeqCst);
            for (i, &slot) in found[..announced].iter().enumerate() {
                match slots[slot as usize].validate(&BlockKey::new(namespace, hashes[i])) {
                    Some(gen) => blocks.push(PinnedBlock { slot, gen }),
                    None => {
                        for &rest in &found[i..announced] {
                            withdraw_pin(&client.pins[rest as usize]);
                        }
                        break;
                    }
                }
            }
        }
        if !probed {
            self.count_lookup(Some(&s), hashes.len() as u64, blocks.len() as u64);
        }
        touch(&s, &blocks);
        Pinned::new(Some(s), blocks)
    }

    /// Drop every pin a lookup took that is still held (same as dropping the
    /// `Pinned`; releasing twice is harmless).
    pub fn release(&self, pinned: &Pinned) {
        pinned.release_all();
    }

    /// Say that a reservation of `n` slots is coming (a step's saves, known
    /// when the step starts): if the stash holds fewer, ask the owner now
    /// to fill it to `n`, evicting if the pool is full, and return at once.
    /// The reservation, a forward pass later, then finds its slots in the
    /// stash instead of waiting for evictions its short wait cannot cover
    /// (with a full pool, a save larger than the stash otherwise loses the
    /// difference). Harmless when the reservation never comes: the engine
    /// gives a stash beyond twice its target back at its next reservation.
    pub fn prepare_reserve(&self, n: usize) {
        let Some(s) = self.session() else { return };
        let client = s.client();
        let have = client.stash.len();
        let n = n as u64;
        if n <= have {
            return;
        }
        // The owner fills the stash until it holds `n` (capped at half the
        // class).
        ask_refill(&s, n);
    }

    /// Up to `n` free slots for saving. Fewer (or none) when the pool is under
    /// pressure or the owner is away: those saves are dropped and counted;
    /// the caller waits at most `reserve_wait`, and only when the stash is
    /// short.
    pub fn reserve(&self, n: usize) -> Reservation {
        let Some(s) = self.session() else {
            self.note_skipped(n as u64);
            return Reservation {
                session: None,
                slots: Vec::new(),
                gens: Vec::new(),
                done: Default::default(),
            };
        };
        let client = s.client();
        let mut got: Vec<(u32, u32)> = Vec::with_capacity(n);
        // Slots left over from requests that could not be queued come first.
        {
            let id = s.id();
            let mut spare = s.shared.spare.lock();
            while got.len() < n {
                let Some(pos) = spare.iter().position(|e| e.0 == id) else {
                    break;
                };
                let (_, slot, gen) = spare.swap_remove(pos);
                if s.is_ours_writing(slot, gen) {
                    got.push((slot, gen));
                    // Counted in held_slots already.
                    client.entry.held_slots.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        let pop_all = |got: &mut Vec<(u32, u32)>| {
            let _g = s.shared.stash_lock.lock();
            while got.len() < n {
                match client.stash.pop() {
                    Ok(Some([w])) => got.push((w as u32, (w >> 32) as u32)),
                    _ => break,
                }
            }
        };
        pop_all(&mut got);
        // Short, or below half the target: ask the owner to refill now
        // rather than at its next pass, saying how many we still need.
        let target = u64::from(client.entry.stash_target.load(Ordering::Relaxed));
        let short = n - got.len();
        let asked = if short > 0 || client.stash.len() * 2 < target {
            ask_refill(&s, short as u64)
        } else {
            0
        };
        if got.len() < n {
            let deadline = Instant::now() + self.inner.cfg.reserve_wait;
            while got.len() < n && Instant::now() < deadline {
                std::hint::spin_loop();
                pop_all(&mut got);
                let done = client.entry.refill_done.load(Ordering::Acquire);
                if done.wrapping_sub(asked) as i32 >= 0 {
                    // The owner served our request and we are still short:
                    // the pool is under pressure. Don't wait any longer.
                    pop_all(&mut got);
                    break;
                }
            }
            // We stop waiting: an owner that had not got to it yet must not
            // fill the stash for a reservation that is over.
            client.entry.stash_want.store(0, Ordering::Relaxed);
        }
        client
            .entry
            .held_slots
            .fetch_add(got.len() as u64, Ordering::Relaxed);
        trim_stash(&s, target);
        let dropped = (n - got.len()) as u64;
        if dropped > 0 {
            client
                .entry
                .add_engine(EngineCounter::SaveDroppedBlocks, dropped);
            self.inner
                .local
                .save_dropped_blocks
                .fetch_add(dropped, AtomicOrdering::Relaxed);
        }
        let (slots, gens) = got.into_iter().unzip();
        Reservation {
            session: Some(s),
            slots,
            gens,
            done: parking_lot::Mutex::new(vec![false; n - dropped as usize]),
        }
    }

    /// Publish reserved slot `i` (whose copy has completed) under `key`.
    /// Returns false if the commit could not be queued (owner away, ring
    /// full): the block is then simply not cached.
    pub fn commit(&self, r: &Reservation, i: usize, key: BlockKey, len: u64) -> bool {
        self.commit_many(r, &[(i, key, len)]) == 1
    }

    /// Publish several reserved slots whose copies have completed: `items`
    /// are (index in the reservation, key, length). One ring transfer and
    /// one doorbell for the batch; if the ring fills, waits at most
    /// `reserve_wait` for the owner to make room. Returns how many were
    /// queued; out-of-range or already finished indices are skipped.
    pub fn commit_many(&self, r: &Reservation, items: &[(usize, BlockKey, u64)]) -> usize {
        let items: Vec<_> = items
            .iter()
            .map(|&(i, key, len)| (i, Some((key, len))))
            .collect();
        let queued = r.finish(&items, self.inner.cfg.reserve_wait);
        if let Some(s) = &r.session {
            s.client()
                .entry
                .add_engine(EngineCounter::SaveBlocks, queued as u64);
        }
        self.inner
            .local
            .saved_blocks
            .fetch_add(queued as u64, AtomicOrdering::Relaxed);
        queued
    }

    /// Give reserved slot `i` back unused.
    pub fn abort(&self, r: &Reservation, i: usize) -> bool {
        r.finish(&[(i, None)], self.inner.cfg.reserve_wait) == 1
    }

    /// Save `keys` through the host: reserve, let `fill` write each block,
    /// commit. Returns how many were committed (the CPU copy path; GPU
    /// copies use `transfer` and commit after their event completes).
    pub fn save_with(
        &self,
        keys: &[BlockKey],
        mut fill: impl FnMut(usize, &mut [u8]) -> usize,
    ) -> usize {
        let r = self.reserve(keys.len());
        let start = Instant::now();
        let mut items = Vec::with_capacity(r.len());
        let mut bytes = 0;
        for (i, key) in keys.iter().enumerate().take(r.len()) {
            let Some((ptr, cap)) = r.slot(i) else {
                continue;
            };
            // SAFETY: the slot is Writing(us): no other process reads or
            // writes it until we commit or abort, and ptr..ptr+cap lies in the
            // pool mapping `r` keeps alive. The bytes are written through
            // this slice only, by this thread.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr, cap) };
            let len = fill(i, dst).min(cap);
            bytes += len as u64;
            items.push((i, *key, len as u64));
        }
        let done = self.commit_many(&r, &items);
        if let Some(s) = &r.session {
            let e = s.client().entry;
            e.add_engine(EngineCounter::SaveBytes, bytes);
            e.add_engine(EngineCounter::SaveNanos, start.elapsed().as_nanos() as u64);
        }
        done
    }

    /// Load pinned blocks through the host: `read` gets each block's bytes.
    /// Returns how many blocks were read and still valid afterwards; a
    /// block that is not (its pin was lost, so the bytes may have changed
    /// under the read) is reported with `ok == false` and must be treated
    /// as a miss.
    pub fn load_with(&self, pinned: &Pinned, mut read: impl FnMut(usize, &[u8])) -> usize {
        self.load_checked(pinned, |i, data, ok| {
            if ok {
                read(i, data)
            }
        })
    }

    /// As [`Engine::load_with`], handing every block to `read` with whether
    /// it was still valid after the read (`read` may have seen bytes of
    /// another key when it is not).
    pub fn load_checked(&self, pinned: &Pinned, mut read: impl FnMut(usize, &[u8], bool)) -> usize {
        let start = Instant::now();
        let mut bytes = 0;
        let mut good = 0;
        for i in 0..pinned.len() {
            let Some((ptr, len)) = pinned.block(i) else {
                continue;
            };
            // SAFETY: ptr..ptr+len lies in the pool mapping `pinned` keeps
            // alive (committed_block bounds it by the slot). The block is
            // pinned, so committed bytes are immutable; should the pin have
            // been lost, the bytes may change under the read, which only
            // makes them stale (plain bytes, no invariant), and the check
            // below reports it.
            let data = unsafe { std::slice::from_raw_parts(ptr, len) };
            let ok = pinned.still_valid(i);
            read(i, data, ok);
            if ok {
                good += 1;
                bytes += len as u64;
            }
        }
        self.note_load(pinned, bytes, start.elapsed());
        good
    }

    /// Count a load done by a copy backend.
    pub fn note_load(&self, pinned: &Pinned, bytes: u64, took: Duration) {
        self.note_loaded(pinned.len() as u64, bytes, took);
    }

    /// Count `blocks` loaded (`bytes` in `took`) by a copy backend.
    pub fn note_loaded(&self, blocks: u64, bytes: u64, took: Duration) {
        self.inner
            .local
            .loaded_blocks
            .fetch_add(blocks, AtomicOrdering::Relaxed);
        if let Some(s) = self.session() {
            let e = s.client().entry;
            e.add_engine(EngineCounter::LoadBlocks, blocks);
            e.add_engine(EngineCounter::LoadBytes, bytes);
            e.add_engine(EngineCounter::LoadNanos, took.as_nanos() as u64);
        }
    }

    /// Count `blocks` whose save was skipped before any slot was asked
    /// for: the owner is away, or (a caller's decision) the pool cannot be
    /// used yet, e.g. its CUDA registration is still running. Published
    /// in the client entry now, or when the engine reconnects.
    pub fn note_skipped(&self, blocks: u64) {
        if blocks == 0 {
            return;
        }
        self.inner
            .local
            .save_skipped_blocks
            .fetch_add(blocks, AtomicOrdering::Relaxed);
        match self.session() {
            Some(s) => s
                .client()
                .entry
                .add_engine(EngineCounter::SaveSkippedBlocks, blocks),
            None => {
                self.inner
                    .shared
                    .skipped_unpublished
                    .fetch_add(blocks, AtomicOrdering::Relaxed);
            }
        }
    }

    /// Count a save done by a copy backend (bytes and time).
    pub fn note_save(&self, bytes: u64, took: Duration) {
        if let Some(s) = self.session() {
            let e = s.client().entry;
            e.add_engine(EngineCounter::SaveBytes, bytes);
            e.add_engine(EngineCounter::SaveNanos, took.as_nanos() as u64);
        }
    }

    /// Host address and length of a block another process pinned (vLLM's
    /// scheduler pins, its workers copy): only if this engine is connected
    /// to that very segment and the slot still holds the block committed at
    /// that generation (`Committed`, or `Evicting` while the owner checks
    /// pins). The pin that protects it is the other process's.
    pub fn pinned_block(&self, segment_id: u64, slot: u32, gen: u32) -> Option<(*const u8, usize)> {
        let s = self.session()?;
        if s.welcome.segment_id != segment_id {
            return None;
        }
        s.committed_block(slot, gen)
    }

    /// Whether `slot` of `segment_id` still holds the block committed at
    /// `gen` (checked after copying out of it; an eviction that is only
    /// begun does not count, see [`Pinned::still_valid`]).
    pub fn still_committed(&self, segment_id: u64, slot: u32, gen: u32) -> bool {
        // A session that died keeps its mapping: what it says about its
        // segment stays true for blocks pinned in it.
        let guard = self.inner.session.read();
        guard
            .as_ref()
            .filter(|s| s.welcome.segment_id == segment_id)
            .is_some_and(|s| s.is_committed(slot, gen))
    }

    /// Host address and capacity of any slot id of the current segment
    /// (tools and tests; copies use [`Engine::pinned_block`]).
    pub fn slot_ptr(&self, slot: u32) -> Option<(*mut u8, usize)> {
        self.session()?.slot_ptr(slot)
    }

    /// The current pool mapping, to register with CUDA. Changes only if the
    /// owner was restarted on a different pool.
    pub fn pool(&self) -> Option<Arc<PoolSegment>> {
        self.session().map(|s| s.pool.clone())
    }

    /// Store a CUDA IPC handle with the owner under `key`.
    /// The engine remembers it and publishes it again whenever it
    /// reconnects, so a restarted owner (which keeps handles in memory only)
    /// learns it back without the caller doing anything.
    pub fn publish_ipc(&self, key: &str, handle: &[u8]) -> Result<(), EngineError> {
        self.inner
            .published
            .lock()
            .insert(key.to_string(), handle.to_vec());
        let s = self.session().ok_or(EngineError::OwnerGone)?;
        send_ipc(&s, key, handle)
    }

    /// The CUDA IPC handle another engine published under `key`.
    pub fn fetch_ipc(&self, key: &str, timeout: Duration) -> Result<Option<Vec<u8>>, EngineError> {
        let s = self.session().ok_or(EngineError::OwnerGone)?;
        let deadline = Instant::now() + timeout;
        let _w = {
            let mut w = s.writer.lock();
            self.inner.ipc_reply.clear();
            proto::send(&mut *w, &ClientMsg::FetchIpc { key: key.into() })?;
            w
        };
        // Replies come in request order; a late one to an earlier fetch
        // that timed out is not ours.
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.inner.ipc_reply.take(left) {
                Some(OwnerMsg::IpcHandle { key: k, handle }) if k == key => return Ok(handle),
                Some(OwnerMsg::IpcHandle { .. }) => continue,
                Some(other) => {
                    return Err(EngineError::Config(format!("unexpected reply: {other:?}")))
                }
                None => return Err(EngineError::Timeout(timeout)),
            }
        }
    }

    pub fn stats(&self) -> EngineStats {
        let l = &self.inner.local;
        let s = self.session();
        EngineStats {
            connected: s.is_some(),
            epoch: s.map(|s| s.welcome.epoch).unwrap_or(0),
            reconnects: l.reconnects.load(AtomicOrdering::Relaxed),
            lookups: l.lookups.load(AtomicOrdering::Relaxed),
            hit_blocks: l.hit_blocks.load(AtomicOrdering::Relaxed),
            miss_blocks: l.miss_blocks.load(AtomicOrdering::Relaxed),
            saved_blocks: l.saved_blocks.load(AtomicOrdering::Relaxed),
            save_dropped_blocks: l.save_dropped_blocks.load(AtomicOrdering::Relaxed),
            save_skipped_blocks: l.save_skipped_blocks.load(AtomicOrdering::Relaxed),
            loaded_blocks: l.loaded_blocks.load(AtomicOrdering::Relaxed),
            last_error: l.last_error.lock().clone(),
        }
    }

    /// The version of the owner this engine is connected to (`None` while
    /// disconnected, or from an owner that does not record it).
    pub fn owner_version(&self) -> Option<String> {
        self.session()?.ctl.header().owner_version()
    }

    /// Client entry index while connected (tests, logs).
    pub fn client_id(&self) -> Option<u32> {
        self.session().map(|s| s.welcome.client)
    }
}

/// Give back what our stash holds beyond twice its target (a refill that
/// outlived the reservation it was for): only the consumer can take slots
/// out of a stash, so idle stashes decay here, the next time we reserve.
/// Ask the owner to fill the stash until it holds `want` slots (the ask
/// is served at its next pass, which the doorbell starts now). Returns the
/// ask's number, for waiting on `refill_done`.
fn ask_refill(s: &Session, want: u64) -> u32 {
    let client = s.client();
    let want = u32::try_from(want).unwrap_or(u32::MAX);
    client.entry.stash_want.store(want, Ordering::Relaxed);
    let asked = client
        .entry
        .refill_asked
        .fetch_add(1, Ordering::SeqCst)
        .wrapping_add(1);
    s.ring_owner();
    asked
}

fn trim_stash(s: &Session, target: u64) {
    let client = s.client();
    let excess = client.stash.len().saturating_sub(target.max(1) * 2);
    if excess == 0 {
        return;
    }
    let keep = target.max(1);
    let mut back = Vec::new();
    {
        let _g = s.shared.stash_lock.lock();
        while client.stash.len() > keep {
            match client.stash.pop() {
                Ok(Some([w])) => back.push(Request::Abort {
                    slot: w as u32,
                    gen: (w >> 32) as u32,
                }),
                _ => break,
            }
        }
    }
    let queued = push_requests(s, &back, Duration::ZERO);
    if queued < back.len() {
        // Still ours: the next reserve takes them first.
        let id = s.id();
        let mut spare = s.shared.spare.lock();
        for r in &back[queued..] {
            if let Request::Abort { slot, gen } = *r {
                spare.push((id, slot, gen));
            }
        }
        client
            .entry
            .held_slots
            .fetch_add((back.len() - queued) as u64, Ordering::Relaxed);
    }
}

/// Tell the owner which blocks were hit (recency and frequency). Best
/// effort: dropped when the request ring is half full, so hints never take
/// the room commits need.
fn touch(s: &Session, blocks: &[PinnedBlock]) {
    if blocks.is_empty() {
        return;
    }
    // Tail first: the chain's first blocks end up most recent, so under
    // pressure a chain is evicted from its end and shared prefixes (the
    // blocks most chains hit) last.
    let slots: Vec<u32> = blocks.iter().rev().map(|b| b.slot).collect();
    let reqs: Vec<[u64; 8]> = slots
        .chunks(TOUCH_MAX)
        .map(|chunk| {
            let mut ids = [0u32; TOUCH_MAX];
            ids[..chunk.len()].copy_from_slice(chunk);
            Request::Touch {
                count: chunk.len() as u32,
                slots: ids,
            }
            .encode()
        })
        .collect();
    let client = s.client();
    let queued = {
        let _g = s.shared.request_lock.lock();
        let room = (client.requests.capacity() / 2).saturating_sub(client.requests.len());
        let n = reqs.len().min(room as usize);
        client.requests.push_many(&reqs[..n])
    };
    if queued < reqs.len() {
        client
            .entry
            .add_engine(EngineCounter::TouchDropped, (reqs.len() - queued) as u64);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, AtomicOrdering::SeqCst);
        if let Some(s) = self.session.get_mut().take() {
            // Wake the monitor thread (blocked reading the socket). The
            // goodbye goes out when the last pin or reservation of the
            // session is gone (Session::drop), so the owner frees nothing
            // still in use.
            let _ = s.writer.lock().shutdown(std::net::Shutdown::Read);
        }
    }
}

impl Inner {
    fn hello(&self) -> Hello {
        Hello {
            abi_version: pegaflow_shm::ABI_VERSION,
            pid: std::process::id(),
            label: self.cfg.label.clone(),
            namespace: self.cfg.namespace,
            slot_bytes: self.cfg.slot_bytes,
            resume: None,
        }
    }

    /// Work owed to a new session: republish our IPC handles, hand back the
    /// spare slots of this entry (or forget those of an entry that is not
    /// ours any more), count the saves skipped while we were away.
    fn settle(&self, s: &Session) {
        for (key, handle) in self.published.lock().iter() {
            if let Err(e) = send_ipc(s, key, handle) {
                warn!(key, error = %e, "could not republish an IPC handle after reconnecting");
            }
        }
        let id = s.id();
        let (mine, other): (Vec<_>, Vec<_>) = std::mem::take(&mut *self.shared.spare.lock())
            .into_iter()
            .partition(|e| e.0 == id);
        if !other.is_empty() {
            info!(
                slots = other.len(),
                "reserved slots of an earlier client entry are left to the owner, which frees them when this process exits"
            );
        }
        if !mine.is_empty() {
            let reqs: Vec<Request> = mine
                .iter()
                .filter(|&&(_, slot, gen)| s.is_ours_writing(slot, gen))
                .map(|&(_, slot, gen)| Request::Abort { slot, gen })
                .collect();
            let queued = push_requests(s, &reqs, self.cfg.reserve_wait);
            s.client()
                .entry
                .held_slots
                .fetch_sub(mine.len() as u64, Ordering::Relaxed);
            if queued < reqs.len() {
                // Back into the list: the next reserve reuses them.
                let mut spare = self.shared.spare.lock();
                for r in &reqs[queued..] {
                    if let Request::Abort { slot, gen } = *r {
                        spare.push((id, slot, gen));
                        s.client().entry.held_slots.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        let skipped = self
            .shared
            .skipped_unpublished
            .swap(0, AtomicOrdering::Relaxed);
        if skipped > 0 {
            s.client()
                .entry
                .add_engine(EngineCounter::SaveSkippedBlocks, skipped);
        }
    }
}

fn send_ipc(s: &Session, key: &str, handle: &[u8]) -> Result<(), EngineError> {
    let msg = ClientMsg::PublishIpc {
        key: key.into(),
        handle: handle.to_vec(),
    };
    proto::send(&mut *s.writer.lock(), &msg)?;
    Ok(())
}

/// Background thread: read the socket until the owner hangs up, then
/// reconnect. Holds only a weak reference so dropping the engine ends it.
fn monitor(weak: std::sync::Weak<Inner>, mut reader: Option<std::os::unix::net::UnixStream>) {
    let mut last_warn = Instant::now() - Duration::from_secs(60);
    loop {
        if let Some(r) = reader.as_mut() {
            // Blocks until a reply or the hang-up.
            match proto::recv::<OwnerMsg>(r) {
                Ok(msg @ OwnerMsg::IpcHandle { .. }) => {
                    if let Some(inner) = weak.upgrade() {
                        inner.ipc_reply.put(msg);
                    }
                    continue;
                }
                Ok(other) => {
                    warn!(?other, "unexpected message from the owner; ignored");
                    continue;
                }
                Err(_) => {
                    let Some(inner) = weak.upgrade() else { return };
                    if inner.stop.load(AtomicOrdering::SeqCst) {
                        return;
                    }
                    *inner.shared.live_entry.lock() = None;
                    if let Some(s) = inner.session.read().as_ref() {
                        s.alive.store(false, AtomicOrdering::Release);
                    }
                    warn!(socket = %inner.socket.display(), "pegaflow-owner went away; lookups miss and saves are skipped until it is back");
                    reader = None;
                }
            }
        }
        let Some(inner) = weak.upgrade() else { return };
        if inner.stop.load(AtomicOrdering::SeqCst) {
            return;
        }
        let interval = inner.cfg.reconnect_interval;
        let prev = inner.session.read().clone();
        match Session::connect(
            &inner.socket,
            inner.hello(),
            prev.as_deref(),
            inner.shared.clone(),
        ) {
            Ok((s, r)) => {
                let resumed = s.welcome.resumed;
                info!(
                    client = s.welcome.client,
                    epoch = s.welcome.epoch,
                    resumed,
                    "connected to pegaflow-owner"
                );
                let s = Arc::new(s);
                *inner.local.last_error.lock() = None;
                *inner.shared.live_entry.lock() = Some(s.id());
                inner.settle(&s);
                *inner.session.write() = Some(s);
                if prev.is_some() {
                    inner.local.reconnects.fetch_add(1, AtomicOrdering::Relaxed);
                }
                reader = Some(r);
            }
            Err(e) => {
                *inner.local.last_error.lock() = Some(e.to_string());
                if last_warn.elapsed() > Duration::from_secs(30) {
                    if matches!(
                        e,
                        EngineError::Rejected { .. } | EngineError::SocketPermission { .. }
                    ) {
                        tracing::error!(error = %e, "pegaflow-owner refuses this engine; still retrying");
                    } else {
                        info!(error = %e, "pegaflow-owner not reachable yet; retrying");
                    }
                    last_warn = Instant::now();
                }
                drop(inner);
                std::thread::sleep(interval);
            }
        }
    }
}

/// A tiny one-value mailbox with a timeout (replies to IPC fetches).
mod mailbox {
    use std::time::Duration;

    use parking_lot::{Condvar, Mutex};

    pub struct Mailbox<T> {
        value: Mutex<Option<T>>,
        ready: Condvar,
    }

    impl<T> Default for Mailbox<T> {
        fn default() -> Self {
            Mailbox {
                value: Mutex::new(None),
                ready: Condvar::new(),
            }
        }
    }

    impl<T> Mailbox<T> {
        pub fn put(&self, v: T) {
            *self.value.lock() = Some(v);
            self.ready.notify_all();
        }

        pub fn clear(&self) {
            self.value.lock().take();
        }

        pub fn take(&self, timeout: Duration) -> Option<T> {
            let mut g = self.value.lock();
            if g.is_none() {
                self.ready.wait_for(&mut g, timeout);
            }
            g.take()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Probes;

    fn h(i: u8) -> [u8; 32] {
        [i; 32]
    }

    #[test]
    fn a_lookup_pinning_a_probed_prefix_is_the_same_lookup_once() {
        let mut p = Probes::default();
        p.record(1, &[h(1), h(2), h(3)]);
        p.record(2, &[h(1)]);
        // another namespace, a longer chain, another chain: not the probe
        assert!(!p.confirm(3, &[h(1)]));
        assert!(!p.confirm(1, &[h(1), h(2), h(3), h(4)]));
        assert!(!p.confirm(1, &[h(9)]));
        assert!(!p.confirm(1, &[]));
        // the common prefix of two ranks' probes, once each
        assert!(p.confirm(1, &[h(1)]));
        assert!(p.confirm(2, &[h(1)]));
        assert!(!p.confirm(1, &[h(1)]));
        assert!(!p.confirm(2, &[h(1)]));
        // a probe with no hits confirms nothing
        p.record(1, &[]);
        assert!(!p.confirm(1, &[h(1)]));
        // bounded: the oldest namespace is forgotten
        for ns in 0..=Probes::KEEP as u64 {
            p.record(100 + ns, &[h(1)]);
        }
        assert!(!p.confirm(100, &[h(1)]));
        assert!(p.confirm(100 + Probes::KEEP as u64, &[h(1)]));
    }
}
