//! The owner: creates or re-adopts the segments, runs the request loop and
//! owns every piece of cache state.
//!
//! Two threads share [`Owner`]: the socket server (hello, hang-up) and the
//! request loop (drain rings, refill stashes, housekeeping). Both take the
//! one state mutex; neither is on an engine's hot path, which touches shm
//! only.
//!
//! ## Client life
//!
//! ```text
//!   FREE --hello--> LIVE --goodbye--> reclaimed (FREE)
//!                    |  \--hang-up without goodbye, or thrown out--> QUARANTINED
//!                    |                 --process gone--> reclaimed (FREE)
//!                    |                 --same process resumes with its token--> LIVE
//!                    \--owner restart, process alive--> ORPHANED (same exits)
//! ```
//!
//! A socket hang-up is not proof that an engine stopped touching its slots:
//! the process may still be exiting with GPU copies in flight, or the owner
//! may have thrown out a live engine. Only a goodbye (sent once every copy
//! finished and every pin was released) or the process being gone (a
//! zombie or reaped: its files, the GPU context among them, are released)
//! lets the owner free its writing slots and forget its pins.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pegaflow_shm::client::client_state;
use pegaflow_shm::doorbell::Doorbell;
use pegaflow_shm::header::owner_state;
use pegaflow_shm::proto::{Hello, RejectReason, Welcome};
use pegaflow_shm::segment::{pid_alive, process_start_time, ControlSegment, PoolSegment};
use pegaflow_shm::sync::Ordering;
use tracing::{error, info, warn};

use crate::cache::Cache;

/// Set by SIGINT/SIGTERM.
pub static SHUTDOWN: AtomicBool = AtomicBool::new(false);

/// How long the request loop spins on empty rings before sleeping.
const SPIN: Duration = Duration::from_micros(50);
/// Longest sleep; bounds how late housekeeping runs.
const SLEEP: Duration = Duration::from_millis(100);
const HOUSEKEEPING: Duration = Duration::from_millis(250);
/// How often a client that just hung up is checked for its process having
/// exited (an exiting process becomes a zombie within milliseconds), and for
/// how long before falling back to the housekeeping period.
const EXIT_POLL: Duration = Duration::from_millis(5);
const EXIT_POLL_FOR: Duration = Duration::from_secs(2);

/// Owner-private facts about one client entry.
#[derive(Default, Clone)]
struct ClientSlot {
    class: Option<usize>,
    /// Its requests are no longer applied (corrupt ring): the server hangs
    /// up on it and it is quarantined.
    kicked: bool,
}

struct State {
    cache: Cache,
    clients: Vec<ClientSlot>,
    /// Entries not FREE, so a pass does not scan the whole client table.
    active: Vec<u32>,
    kicked: Vec<u32>,
    /// Clients quarantined lately, watched closely for their exit.
    exiting: Vec<(u32, Instant)>,
}

impl State {
    fn refresh_active(&mut self, seg: &ControlSegment) {
        self.active.clear();
        self.active.extend((0..seg.max_clients()).filter(|&i| {
            seg.client(i)
                .is_some_and(|c| c.entry.state() != client_state::FREE)
        }));
        self.cache.set_pin_holders(&self.active);
    }
}

pub struct Owner {
    // Dropped first: the SSD tier's I/O thread writes into the pool, so it
    // must be stopped before the pool is unmapped (fields drop in order).
    state: Mutex<State>,
    seg: Arc<ControlSegment>,
    pool: PoolSegment,
    epoch: u64,
    pub started: Instant,
    /// Milliseconds after `started` at which the request loop last went
    /// round (`/health` compares it with the stall threshold).
    heartbeat_ms: AtomicU64,
}

impl Owner {
    pub fn new(seg: Arc<ControlSegment>, pool: PoolSegment, cache: Cache, epoch: u64) -> Owner {
        let n = seg.max_clients() as usize;
        let owner = Owner {
            state: Mutex::new(State {
                cache,
                clients: vec![ClientSlot::default(); n],
                active: Vec::new(),
                kicked: Vec::new(),
                exiting: Vec::new(),
            }),
            seg,
            pool,
            epoch,
            started: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
        };
        // Orphans of the previous owner keep their class, so their stashes
        // keep being served once they resume.
        {
            let mut st = owner.state.lock();
            for i in 0..owner.seg.max_clients() {
                let c = owner.seg.client(i).expect("in range");
                if matches!(
                    c.entry.state(),
                    client_state::ORPHANED | client_state::QUARANTINED
                ) {
                    let bytes = c.entry.slot_bytes.load(Ordering::Relaxed);
                    st.clients[i as usize].class = (bytes != 0)
                        .then(|| st.cache.class_for(bytes).ok())
                        .flatten();
                }
            }
            st.refresh_active(&owner.seg);
        }
        owner
    }

    pub fn segment(&self) -> &Arc<ControlSegment> {
        &self.seg
    }

    pub fn pool(&self) -> &PoolSegment {
        &self.pool
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Run `f` with the cache locked (metrics, tests).
    pub fn with_cache<R>(&self, f: impl FnOnce(&Cache) -> R) -> R {
        f(&self.state.lock().cache)
    }

    /// As [`Owner::with_cache`], giving up after `wait`: `None` means the
    /// state stayed locked that long, i.e. the owner is stuck.
    pub fn try_with_cache<R>(&self, wait: Duration, f: impl FnOnce(&Cache) -> R) -> Option<R> {
        self.state.try_lock_for(wait).map(|st| f(&st.cache))
    }

    /// How long ago the request loop last went round (it does at least
    /// every 100 ms, idle or not).
    pub fn loop_lag(&self) -> Duration {
        let beat = Duration::from_millis(self.heartbeat_ms.load(AtomicOrdering::Relaxed));
        self.started.elapsed().saturating_sub(beat)
    }

    fn beat(&self) {
        self.heartbeat_ms.store(
            self.started.elapsed().as_millis() as u64,
            AtomicOrdering::Relaxed,
        );
    }

    /// Admit an engine: resume its entry (after an owner restart, or after it
    /// was quarantined while alive) or give it a fresh one.
    pub fn admit(&self, pid: u32, hello: &Hello) -> Result<Welcome, (RejectReason, String)> {
        let mut st = self.state.lock();
        let seg = self.seg.clone();
        let header = seg.header();
        // Resume only the very process the entry belongs to, presenting its
        // token, on this segment, with the same block size.
        let resumed = hello.resume.as_ref().and_then(|r| {
            let c = seg.client(r.client)?;
            let ok = r.segment_id == header.segment_id
                && matches!(
                    c.entry.state(),
                    client_state::ORPHANED | client_state::QUARANTINED
                )
                && c.entry.token.load(Ordering::Relaxed) == r.token
                && c.entry.pid.load(Ordering::Relaxed) == pid
                && process_start_time(pid) == Some(c.entry.start_time.load(Ordering::Relaxed))
                && c.entry.slot_bytes.load(Ordering::Relaxed) == hello.slot_bytes;
            ok.then_some(r.client)
        });
        let class = if hello.slot_bytes != 0 {
            Some(
                st.cache
                    .class_for(hello.slot_bytes)
                    .map_err(|e| (RejectReason::BadLayout, e.to_string()))?,
            )
        } else {
            None
        };
        let idx = match resumed {
            Some(i) => i,
            None => (0..seg.max_clients())
                .find(|&i| seg.client(i).is_some_and(|c| c.entry.state() == client_state::FREE))
                .ok_or_else(|| {
                    (
                        RejectReason::TooManyClients,
                        format!(
                            "all {} client entries are in use: restart the owner with a larger --max-clients",
                            seg.max_clients()
                        ),
                    )
                })?,
        };
        let c = seg.client(idx).expect("found above");
        let token = if resumed.is_some() {
            // Its requests were not applied while it was away; a ring it
            // corrupted (the reason it may have been thrown out) starts over.
            if let Err(e) = c.requests.consume(0, |_| {}) {
                let dropped = c.requests.discard();
                warn!(pid, client = idx, error = %e, dropped, "resumed engine's request ring was corrupt; its queued requests are dropped");
            }
            st.exiting.retain(|&(i, _)| i != idx);
            c.entry.token.load(Ordering::Relaxed)
        } else {
            // A FREE entry has no user left (its last one exited or said
            // goodbye), so its rings and pins can be reset. Zero the pins
            // anyway rather than trust that: a phantom pin would make a
            // block unevictable forever.
            c.requests.reset();
            c.stash.reset();
            for p in c.pins {
                if p.load(Ordering::Relaxed) != 0 {
                    p.store(0, Ordering::Relaxed);
                }
            }
            c.entry.clear();
            c.entry.pid.store(pid, Ordering::Relaxed);
            c.entry
                .start_time
                .store(process_start_time(pid).unwrap_or(0), Ordering::Relaxed);
            let token = fresh_token(pid, idx);
            c.entry.token.store(token, Ordering::Relaxed);
            c.entry.namespace.store(hello.namespace, Ordering::Relaxed);
            c.entry
                .slot_bytes
                .store(hello.slot_bytes, Ordering::Relaxed);
            c.entry.set_label(&hello.label);
            token
        };
        c.entry.epoch.store(self.epoch, Ordering::Relaxed);
        c.entry.state.store(client_state::LIVE, Ordering::SeqCst);
        st.clients[idx as usize] = ClientSlot {
            class,
            kicked: false,
        };
        Self::retarget(&mut st, &seg);
        drop(st);
        Doorbell {
            word: &header.doorbell,
            sleeping: &header.owner_sleeping,
        }
        .ring();
        info!(
            pid,
            client = idx,
            label = hello.label,
            namespace = format!("{:#018x}", hello.namespace),
            slot_bytes = hello.slot_bytes,
            resumed = resumed.is_some(),
            "engine admitted"
        );
        Ok(Welcome {
            client: idx,
            token,
            epoch: self.epoch,
            segment_id: header.segment_id,
            control_path: seg.path().display().to_string(),
            pool_path: self.pool.path().display().to_string(),
            geometry: *seg.geometry(),
            resumed: resumed.is_some(),
        })
    }

    /// Stash targets: a sixteenth of a class's capacity shared by its
    /// engines, at least 16 each (but never more than a quarter of the
    /// class), at most the ring. Engines that need more say so
    /// (`stash_want`) and get up to half the class.
    fn retarget(st: &mut State, seg: &ControlSegment) {
        st.refresh_active(seg);
        let cap = seg.geometry().stash_ring_cap;
        let mut per_class: std::collections::HashMap<usize, u64> = Default::default();
        for c in st.clients.iter().filter_map(|c| c.class) {
            *per_class.entry(c).or_default() += 1;
        }
        for (i, slot) in st.clients.iter().enumerate() {
            let Some(class) = slot.class else { continue };
            let n = per_class[&class];
            let class_cap = st.cache.class_capacity(class);
            let floor = 16.min(class_cap / 4).max(1);
            let target = (class_cap / 16 / n).clamp(floor, cap);
            if let Some(c) = seg.client(i as u32) {
                c.entry.stash_target.store(target as u32, Ordering::Relaxed);
            }
        }
    }

    /// An engine said goodbye: its copies finished and its pins were
    /// released, so everything it held is reclaimed now.
    pub fn client_gone(&self, idx: u32) -> u64 {
        let mut st = self.state.lock();
        let Some(c) = self.seg.client(idx) else {
            return 0;
        };
        let freed = st.cache.reclaim(&c);
        st.clients[idx as usize] = ClientSlot::default();
        st.exiting.retain(|&(i, _)| i != idx);
        Self::retarget(&mut st, &self.seg);
        freed
    }

    /// An engine's connection ended without a goodbye (it hung up, or the
    /// owner threw it out). If its process is already gone it is reclaimed
    /// now; otherwise it is quarantined until it is (see the module docs).
    /// Returns the slots freed, `None` when quarantined.
    pub fn client_lost(&self, idx: u32) -> Option<u64> {
        let mut st = self.state.lock();
        let c = self.seg.client(idx)?;
        if !process_alive(&c) {
            let freed = st.cache.reclaim(&c);
            st.clients[idx as usize] = ClientSlot::default();
            Self::retarget(&mut st, &self.seg);
            return Some(freed);
        }
        c.entry
            .state
            .store(client_state::QUARANTINED, Ordering::SeqCst);
        st.exiting.retain(|&(i, _)| i != idx);
        st.exiting.push((idx, Instant::now()));
        Self::retarget(&mut st, &self.seg);
        None
    }

    /// Clients the request loop disconnected since the last call.
    pub fn take_kicked(&self) -> Vec<u32> {
        std::mem::take(&mut self.state.lock().kicked)
    }

    /// One pass over every client. Returns requests applied + slots stashed.
    pub fn pass(&self) -> usize {
        let mut st = self.state.lock();
        let st = &mut *st;
        let mut work = 0;
        for k in 0..st.active.len() {
            let i = st.active[k];
            let c = self.seg.client(i).expect("in range");
            if st.clients[i as usize].kicked || c.entry.state() == client_state::QUARANTINED {
                continue;
            }
            match st.cache.drain(&c) {
                Ok(n) => work += n,
                Err(e) => {
                    error!(
                        client = i,
                        pid = c.entry.pid.load(Ordering::Relaxed),
                        label = %c.entry.label(),
                        namespace = format!("{:#018x}", c.entry.namespace.load(Ordering::Relaxed)),
                        error = %e,
                        "engine corrupted its request ring; disconnecting it (other engines are unaffected)"
                    );
                    st.clients[i as usize].kicked = true;
                    st.kicked.push(i);
                    continue;
                }
            }
            match st.clients[i as usize].class {
                Some(class) => work += st.cache.refill(&c, class) as usize,
                // A lookup-only engine has no stash to refill; answer its
                // request anyway, or has_work() stays true forever.
                None => {
                    let asked = c.entry.refill_asked.load(Ordering::Acquire);
                    c.entry.refill_done.store(asked, Ordering::Release);
                }
            }
        }
        work += st.cache.ssd_poll();
        st.cache.publish_tick();
        work
    }

    /// Idle time: write cold popular blocks to the SSD tier ahead of their
    /// eviction. Returns blocks queued.
    fn write_behind(&self) -> usize {
        self.state.lock().cache.ssd_write_behind(16)
    }

    /// Orphaned and quarantined clients whose process exited are reclaimed.
    /// `all`: every such client (the periodic pass); otherwise only those
    /// that hung up lately.
    fn housekeeping(&self, all: bool) {
        let mut st = self.state.lock();
        let now = Instant::now();
        st.exiting
            .retain(|&(_, t)| now.duration_since(t) < EXIT_POLL_FOR);
        let candidates: Vec<u32> = if all {
            (0..self.seg.max_clients()).collect()
        } else {
            st.exiting.iter().map(|&(i, _)| i).collect()
        };
        let mut changed = false;
        for i in candidates {
            let c = self.seg.client(i).expect("in range");
            let state = c.entry.state();
            if !matches!(state, client_state::ORPHANED | client_state::QUARANTINED)
                || process_alive(&c)
            {
                continue;
            }
            let pid = c.entry.pid.load(Ordering::Relaxed);
            let freed = st.cache.reclaim(&c);
            st.clients[i as usize] = ClientSlot::default();
            st.exiting.retain(|&(x, _)| x != i);
            changed = true;
            info!(
                pid,
                client = i,
                reclaimed_slots = freed,
                was = if state == client_state::ORPHANED {
                    "orphaned"
                } else {
                    "quarantined"
                },
                "engine process exited; its slots and pins are reclaimed"
            );
        }
        if changed || all {
            Self::retarget(&mut st, &self.seg);
        }
    }

    /// Whether a client that hung up lately is still being watched.
    fn watching_exits(&self) -> bool {
        !self.state.lock().exiting.is_empty()
    }

    fn has_work(&self) -> bool {
        let st = self.state.lock();
        if st.cache.ssd_has_work() {
            return true;
        }
        st.active
            .iter()
            .filter(|&&i| !st.clients[i as usize].kicked)
            .filter_map(|&i| self.seg.client(i))
            .filter(|c| c.entry.state() != client_state::QUARANTINED)
            .any(|c| {
                !c.requests.is_empty()
                    || c.entry.refill_asked.load(Ordering::Relaxed)
                        != c.entry.refill_done.load(Ordering::Relaxed)
            })
    }

    /// The request loop; returns on shutdown.
    pub fn run(&self) {
        let header = self.seg.header();
        header
            .owner_state
            .store(owner_state::RUNNING, Ordering::SeqCst);
        let bell = Doorbell {
            word: &header.doorbell,
            sleeping: &header.owner_sleeping,
        };
        let mut last_housekeeping = Instant::now();
        let mut last_exit_poll = Instant::now();
        let mut idle_since = Instant::now();
        while !SHUTDOWN.load(AtomicOrdering::Relaxed) {
            self.beat();
            if self.pass() > 0 || self.write_behind() > 0 {
                idle_since = Instant::now();
                continue;
            }
            let watching = self.watching_exits();
            if last_housekeeping.elapsed() >= HOUSEKEEPING {
                self.housekeeping(true);
                last_housekeeping = Instant::now();
            } else if watching && last_exit_poll.elapsed() >= EXIT_POLL {
                self.housekeeping(false);
                last_exit_poll = Instant::now();
            }
            if idle_since.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let sleep = if watching { EXIT_POLL } else { SLEEP };
            bell.wait(sleep, || {
                self.has_work() || SHUTDOWN.load(AtomicOrdering::Relaxed)
            });
            idle_since = Instant::now() - SPIN;
        }
        self.state.lock().cache.ssd_shutdown();
        header
            .owner_state
            .store(owner_state::STOPPED, Ordering::SeqCst);
        info!("owner stopped; segments kept for the next owner");
    }
}

/// Whether the process a client entry names is still running (not a
/// zombie, not gone, not a later process that reused its pid).
fn process_alive(c: &pegaflow_shm::segment::ClientView<'_>) -> bool {
    let pid = c.entry.pid.load(Ordering::Relaxed);
    pid_alive(pid) && process_start_time(pid) == Some(c.entry.start_time.load(Ordering::Relaxed))
}

fn fresh_token(pid: u32, idx: u32) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut x = t.as_nanos() as u64 ^ (u64::from(pid) << 32) ^ u64::from(idx);
    // splitmix64: tokens only need to be unguessable by accident.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}
