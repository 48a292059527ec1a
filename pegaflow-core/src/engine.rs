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
use crate::session::Session;

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

/// The leading hits of a lookup, pinned in one session.
pub struct Pinned {
    session: Option<Arc<Session>>,
    pub blocks: Vec<PinnedBlock>,
}

impl Pinned {
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Host address and valid length of pinned block `i`.
    pub fn block(&self, i: usize) -> Option<(*const u8, usize)> {
        let s = self.session.as_ref()?;
        let b = self.blocks.get(i)?;
        let (ptr, _) = s.slot_ptr(b.slot)?;
        let len = s.ctl.slots()[b.slot as usize].len.load(Ordering::Relaxed) as usize;
        Some((ptr as *const u8, len))
    }
}

/// Free slots taken from the stash, to be committed or aborted.
pub struct Reservation {
    session: Option<Arc<Session>>,
    pub slots: Vec<u32>,
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
}

struct Inner {
    cfg: EngineConfig,
    socket: PathBuf,
    session: RwLock<Option<Arc<Session>>>,
    stop: AtomicBool,
    local: Local,
    ipc_reply: ReplySlot<OwnerMsg>,
    /// Serialises writes to our pin counters, which have a single writer.
    /// Per engine, not per session: pins taken before a reconnect are
    /// released into the same (resumed) client entry as new ones.
    pin_lock: parking_lot::Mutex<()>,
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
            socket,
            session: RwLock::new(None),
            stop: AtomicBool::new(false),
            local: Local::default(),
            ipc_reply: ReplySlot::default(),
            pin_lock: parking_lot::Mutex::new(()),
            published: Default::default(),
        });
        let first = match Session::connect(&inner.socket, inner.hello(), None, None) {
            Ok((s, reader)) => Some((Arc::new(s), reader)),
            Err(e @ (EngineError::Rejected { .. } | EngineError::SocketPermission { .. })) => {
                return Err(e)
            }
            Err(e) => {
                info!(socket = %inner.socket.display(), error = %e, "owner not reachable; running without cache until it is");
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

    /// Leading hits of `hashes` in `namespace`, without pinning.
    pub fn count_hits(&self, namespace: u64, hashes: &[[u8; 32]]) -> usize {
        let Some(s) = self.session() else { return 0 };
        let index = s.ctl.index();
        hashes
            .iter()
            .take_while(|h| index.get(&BlockKey::new(namespace, **h)).is_some())
            .count()
    }

    /// Leading hits of `hashes` in `namespace`, pinned: they stay valid until
    /// [`Engine::release`].
    pub fn lookup(&self, namespace: u64, hashes: &[[u8; 32]]) -> Pinned {
        self.inner
            .local
            .lookups
            .fetch_add(1, AtomicOrdering::Relaxed);
        let Some(s) = self.session() else {
            self.inner
                .local
                .miss_blocks
                .fetch_add(hashes.len() as u64, AtomicOrdering::Relaxed);
            return Pinned {
                session: None,
                blocks: Vec::new(),
            };
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
            let _g = self.inner.pin_lock.lock();
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
        let hits = blocks.len() as u64;
        let misses = hashes.len() as u64 - hits;
        client.entry.add_engine(EngineCounter::Lookups, 1);
        client
            .entry
            .add_engine(EngineCounter::LookupBlocks, hashes.len() as u64);
        client.entry.add_engine(EngineCounter::HitBlocks, hits);
        client.entry.add_engine(EngineCounter::MissBlocks, misses);
        self.inner
            .local
            .hit_blocks
            .fetch_add(hits, AtomicOrdering::Relaxed);
        self.inner
            .local
            .miss_blocks
            .fetch_add(misses, AtomicOrdering::Relaxed);
        self.touch(&s, &blocks);
        Pinned {
            session: Some(s),
            blocks,
        }
    }

    /// Tell the owner which blocks were hit (recency and frequency). Best
    /// effort: dropped if the ring is full.
    fn touch(&self, s: &Session, blocks: &[PinnedBlock]) {
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
            let _g = s.request_lock.lock();
            client.requests.push_many(&reqs)
        };
        if queued < reqs.len() {
            client
                .entry
                .add_engine(EngineCounter::TouchDropped, (reqs.len() - queued) as u64);
        }
    }

    /// Drop pins taken by [`Engine::lookup`]. Idempotent per block set only
    /// if called once; releasing twice is a caller bug and is ignored where
    /// the counter is already zero.
    pub fn release(&self, pinned: &Pinned) {
        let Some(s) = &pinned.session else { return };
        self.release_slots(s, pinned.blocks.iter().map(|b| b.slot));
    }

    /// Release pins by slot id (the vLLM scheduler hands ids across threads).
    pub fn release_blocks(&self, blocks: &[PinnedBlock]) {
        if let Some(s) = self.inner.session.read().clone() {
            self.release_slots(&s, blocks.iter().map(|b| b.slot));
        }
    }

    fn release_slots(&self, s: &Session, slots: impl Iterator<Item = u32>) {
        if !s.owns_entry() {
            // Our entry was reclaimed while we were away: the owner zeroed
            // our pins already.
            return;
        }
        let pins = s.client().pins;
        let _g = self.inner.pin_lock.lock();
        for slot in slots {
            if let Some(p) = pins.get(slot as usize) {
                withdraw_pin(p);
            }
        }
    }

    /// Up to `n` free slots for saving. Fewer (or none) when the pool is under
    /// pressure or the owner is away: those saves are dropped and counted;
    /// the caller never waits.
    pub fn reserve(&self, n: usize) -> Reservation {
        let Some(s) = self.session() else {
            self.inner
                .local
                .save_skipped_blocks
                .fetch_add(n as u64, AtomicOrdering::Relaxed);
            return Reservation {
                session: None,
                slots: Vec::new(),
            };
        };
        let client = s.client();
        let mut slots = Vec::with_capacity(n);
        let pop_all = |slots: &mut Vec<u32>| {
            let _g = s.stash_lock.lock();
            while slots.len() < n {
                match client.stash.pop() {
                    Ok(Some([w])) => slots.push(w as u32),
                    _ => break,
                }
            }
        };
        pop_all(&mut slots);
        // Short, or below half the target: tell the owner how much we need
        // and ring it now rather than at its next pass.
        let target = u64::from(client.entry.stash_target.load(Ordering::Relaxed));
        let asked = if slots.len() < n || client.stash.len() * 2 < target {
            let want = u32::try_from(n).unwrap_or(u32::MAX);
            if client.entry.stash_want.load(Ordering::Relaxed) < want {
                client.entry.stash_want.store(want, Ordering::Relaxed);
            }
            let asked = client
                .entry
                .refill_asked
                .fetch_add(1, Ordering::SeqCst)
                .wrapping_add(1);
            s.ring_owner();
            asked
        } else {
            0
        };
        if slots.len() < n {
            let deadline = Instant::now() + self.inner.cfg.reserve_wait;
            while slots.len() < n && Instant::now() < deadline {
                std::hint::spin_loop();
                pop_all(&mut slots);
                let done = client.entry.refill_done.load(Ordering::Acquire);
                if done.wrapping_sub(asked) as i32 >= 0 {
                    // The owner served our request and we are still short:
                    // the pool is under pressure. Don't wait any longer.
                    pop_all(&mut slots);
                    break;
                }
            }
        }
        let dropped = (n - slots.len()) as u64;
        if dropped > 0 {
            client
                .entry
                .add_engine(EngineCounter::SaveDroppedBlocks, dropped);
            self.inner
                .local
                .save_dropped_blocks
                .fetch_add(dropped, AtomicOrdering::Relaxed);
        }
        Reservation {
            session: Some(s),
            slots,
        }
    }

    /// Publish reserved slot `i` (whose copy has completed) under `key`.
    /// Returns false if the commit could not be queued (owner away, ring
    /// full): the block is then simply not cached.
    pub fn commit(&self, r: &Reservation, i: usize, key: BlockKey, len: u64) -> bool {
        let Some(&slot) = r.slots.get(i) else {
            return false;
        };
        self.push(r, Request::Commit { slot, len, key }, true)
    }

    /// Publish several reserved slots whose copies have completed: `items`
    /// are (index in the reservation, key, length). One ring transfer and
    /// one doorbell for the batch; if the ring fills, waits at most
    /// `reserve_wait` for the owner to make room. Returns how many were
    /// queued; out-of-range indices are skipped.
    pub fn commit_many(&self, r: &Reservation, items: &[(usize, BlockKey, u64)]) -> usize {
        let Some(s) = &r.session else { return 0 };
        if !s.is_alive() && !self.same_entry(s) {
            return 0;
        }
        let reqs: Vec<[u64; 8]> = items
            .iter()
            .filter_map(|&(i, key, len)| {
                r.slots
                    .get(i)
                    .map(|&slot| Request::Commit { slot, len, key }.encode())
            })
            .collect();
        let client = s.client();
        let deadline = Instant::now() + self.inner.cfg.reserve_wait;
        let mut queued = 0;
        loop {
            queued += {
                let _g = s.request_lock.lock();
                client.requests.push_many(&reqs[queued..])
            };
            s.ring_owner();
            if queued == reqs.len() || Instant::now() >= deadline {
                break;
            }
            std::hint::spin_loop();
        }
        client
            .entry
            .add_engine(EngineCounter::SaveBlocks, queued as u64);
        self.inner
            .local
            .saved_blocks
            .fetch_add(queued as u64, AtomicOrdering::Relaxed);
        if queued < reqs.len() {
            client
                .entry
                .add_engine(EngineCounter::CommitRingFull, (reqs.len() - queued) as u64);
        }
        queued
    }

    /// Give reserved slot `i` back unused.
    pub fn abort(&self, r: &Reservation, i: usize) -> bool {
        let Some(&slot) = r.slots.get(i) else {
            return false;
        };
        self.push(r, Request::Abort { slot }, false)
    }

    fn push(&self, r: &Reservation, req: Request, commit: bool) -> bool {
        let Some(s) = &r.session else { return false };
        if !s.is_alive() && !self.same_entry(s) {
            return false;
        }
        let client = s.client();
        let ok = {
            let _g = s.request_lock.lock();
            client.requests.push(&req.encode())
        };
        if ok {
            if commit {
                client.entry.add_engine(EngineCounter::SaveBlocks, 1);
                self.inner
                    .local
                    .saved_blocks
                    .fetch_add(1, AtomicOrdering::Relaxed);
            }
            s.ring_owner();
        } else {
            client.entry.add_engine(EngineCounter::CommitRingFull, 1);
        }
        ok
    }

    /// A dead session whose entry the reconnected one resumed: its rings are
    /// the same memory, so queued commits still count.
    fn same_entry(&self, old: &Session) -> bool {
        self.session().is_some_and(|cur| {
            cur.welcome.segment_id == old.welcome.segment_id
                && cur.welcome.client == old.welcome.client
        })
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
            // pool mapping `r` keeps alive.
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
    pub fn load_with(&self, pinned: &Pinned, mut read: impl FnMut(usize, &[u8])) {
        let start = Instant::now();
        let mut bytes = 0;
        for i in 0..pinned.len() {
            let Some((ptr, len)) = pinned.block(i) else {
                continue;
            };
            // SAFETY: the block is pinned (Committed, not evictable) and its
            // bytes are immutable while committed; `pinned` keeps the mapping.
            read(i, unsafe { std::slice::from_raw_parts(ptr, len) });
            bytes += len as u64;
        }
        self.note_load(pinned, bytes, start.elapsed());
    }

    /// Count a load done by a copy backend.
    pub fn note_load(&self, pinned: &Pinned, bytes: u64, took: Duration) {
        self.inner
            .local
            .loaded_blocks
            .fetch_add(pinned.len() as u64, AtomicOrdering::Relaxed);
        if let Some(s) = &pinned.session {
            let e = s.client().entry;
            e.add_engine(EngineCounter::LoadBlocks, pinned.len() as u64);
            e.add_engine(EngineCounter::LoadBytes, bytes);
            e.add_engine(EngineCounter::LoadNanos, took.as_nanos() as u64);
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

    /// Host address and capacity of any slot id (for pins handed over from
    /// another process, e.g. vLLM's scheduler to its workers).
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
        let _w = {
            let mut w = s.writer.lock();
            self.inner.ipc_reply.clear();
            proto::send(&mut *w, &ClientMsg::FetchIpc { key: key.into() })?;
            w
        };
        match self.inner.ipc_reply.take(timeout) {
            Some(OwnerMsg::IpcHandle { handle, .. }) => Ok(handle),
            Some(other) => Err(EngineError::Config(format!("unexpected reply: {other:?}"))),
            None => Err(EngineError::Timeout(timeout)),
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
        }
    }

    /// Client entry index while connected (tests, logs).
    pub fn client_id(&self) -> Option<u32> {
        self.session().map(|s| s.welcome.client)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, AtomicOrdering::SeqCst);
        if let Some(s) = self.session.get_mut().take() {
            let _ = proto::send(&mut *s.writer.lock(), &ClientMsg::Goodbye);
            let _ = s.writer.lock().shutdown(std::net::Shutdown::Both);
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
            prev.as_ref().map(|p| p.pool.clone()),
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
                for (key, handle) in inner.published.lock().iter() {
                    if let Err(e) = send_ipc(&s, key, handle) {
                        warn!(key, error = %e, "could not republish an IPC handle after reconnecting");
                    }
                }
                *inner.session.write() = Some(s);
                if prev.is_some() {
                    inner.local.reconnects.fetch_add(1, AtomicOrdering::Relaxed);
                }
                reader = Some(r);
            }
            Err(e) => {
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
