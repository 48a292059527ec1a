//! The owner: creates or re-adopts the segments, runs the request loop and
//! owns every piece of cache state.
//!
//! Two threads share [`Owner`]: the socket server (hello, hang-up) and the
//! request loop (drain rings, refill stashes, housekeeping). Both take the
//! one state mutex; neither is on an engine's hot path, which touches shm
//! only.

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pegaflow_shm::client::client_state;
use pegaflow_shm::doorbell::Doorbell;
use pegaflow_shm::header::owner_state;
use pegaflow_shm::proto::{Hello, RejectReason, Welcome};
use pegaflow_shm::segment::{pid_alive, process_start_time, ControlSegment, PoolSegment};
use pegaflow_shm::sync::Ordering;
use tracing::{error, info};

use crate::cache::Cache;

/// Set by SIGINT/SIGTERM.
pub static SHUTDOWN: AtomicBool = AtomicBool::new(false);

/// How long the request loop spins on empty rings before sleeping.
const SPIN: Duration = Duration::from_micros(50);
/// Longest sleep; bounds how late housekeeping runs.
const SLEEP: Duration = Duration::from_millis(100);
const HOUSEKEEPING: Duration = Duration::from_millis(250);

/// Owner-private facts about one client entry.
#[derive(Default, Clone)]
struct ClientSlot {
    class: Option<usize>,
    kicked: bool,
}

struct State {
    cache: Cache,
    clients: Vec<ClientSlot>,
    /// Entries not FREE, so a pass does not scan the whole client table.
    active: Vec<u32>,
    kicked: Vec<u32>,
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
    seg: Arc<ControlSegment>,
    pool: PoolSegment,
    state: Mutex<State>,
    epoch: u64,
    pub started: Instant,
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
            }),
            seg,
            pool,
            epoch,
            started: Instant::now(),
        };
        // Orphans of the previous owner keep their class, so their stashes
        // keep being served once they resume.
        {
            let mut st = owner.state.lock();
            for i in 0..owner.seg.max_clients() {
                let c = owner.seg.client(i).expect("in range");
                if c.entry.state() == client_state::ORPHANED {
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

    /// Admit an engine: find or resume its client entry.
    pub fn admit(&self, pid: u32, hello: &Hello) -> Result<Welcome, (RejectReason, String)> {
        let mut st = self.state.lock();
        let seg = self.seg.clone();
        let class = if hello.slot_bytes != 0 {
            Some(
                st.cache
                    .class_for(hello.slot_bytes)
                    .map_err(|e| (RejectReason::BadLayout, e.to_string()))?,
            )
        } else {
            None
        };
        let header = seg.header();
        // Resume an orphaned entry of this very process, if it asks.
        let resumed = hello.resume.as_ref().and_then(|r| {
            let c = seg.client(r.client)?;
            let ok = r.segment_id == header.segment_id
                && c.entry.state() == client_state::ORPHANED
                && c.entry.token.load(Ordering::Relaxed) == r.token
                && c.entry.pid.load(Ordering::Relaxed) == pid
                && c.entry.slot_bytes.load(Ordering::Relaxed) == hello.slot_bytes;
            ok.then_some(r.client)
        });
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
            c.entry.token.load(Ordering::Relaxed)
        } else {
            c.requests.reset();
            c.stash.reset();
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

    /// An engine's connection closed: reclaim everything it held.
    pub fn client_gone(&self, idx: u32) -> u64 {
        let mut st = self.state.lock();
        let Some(c) = self.seg.client(idx) else {
            return 0;
        };
        let freed = st.cache.reclaim(&c);
        st.clients[idx as usize] = ClientSlot::default();
        Self::retarget(&mut st, &self.seg);
        freed
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
            if st.clients[i as usize].kicked {
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
            if let Some(class) = st.clients[i as usize].class {
                work += st.cache.refill(&c, class) as usize;
            }
        }
        st.cache.publish_tick();
        work
    }

    /// Orphans whose process exited are reclaimed.
    fn housekeeping(&self) {
        let mut st = self.state.lock();
        for i in 0..self.seg.max_clients() {
            let c = self.seg.client(i).expect("in range");
            if c.entry.state() != client_state::ORPHANED {
                continue;
            }
            let pid = c.entry.pid.load(Ordering::Relaxed);
            let same = pid_alive(pid)
                && process_start_time(pid) == Some(c.entry.start_time.load(Ordering::Relaxed));
            if !same {
                let freed = st.cache.reclaim(&c);
                st.clients[i as usize] = ClientSlot::default();
                info!(
                    pid,
                    client = i,
                    reclaimed_slots = freed,
                    "engine exited before resuming; reclaimed"
                );
            }
        }
        Self::retarget(&mut st, &self.seg);
    }

    fn has_work(&self) -> bool {
        let st = self.state.lock();
        st.active
            .iter()
            .filter_map(|&i| self.seg.client(i))
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
        let mut idle_since = Instant::now();
        while !SHUTDOWN.load(AtomicOrdering::Relaxed) {
            if self.pass() > 0 {
                idle_since = Instant::now();
                continue;
            }
            if last_housekeeping.elapsed() >= HOUSEKEEPING {
                self.housekeeping();
                last_housekeeping = Instant::now();
            }
            if idle_since.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            bell.wait(SLEEP, || {
                self.has_work() || SHUTDOWN.load(AtomicOrdering::Relaxed)
            });
            idle_since = Instant::now() - SPIN;
        }
        header
            .owner_state
            .store(owner_state::STOPPED, Ordering::SeqCst);
        info!("owner stopped; segments kept for the next owner");
    }
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
