//! Multi-process stress tests of the ring and the pin/evict handshake over a
//! real control segment (and pool) in shared memory: forked children play
//! engines, the test process plays the owner.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-verify cargo test -p pegaflow-shm --test shm_stress --release
//! ```
//!
//! Children inherit the parent's `MAP_SHARED` mappings across `fork`, so they
//! use the very same `ControlSegment`; they only touch atomics in shared
//! memory, never allocate or lock, and leave with `_exit(code)`.

#![cfg(not(loom))]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pegaflow_shm::doorbell::Doorbell;
use pegaflow_shm::geometry::Geometry;
use pegaflow_shm::request::Request;
use pegaflow_shm::segment::{create_published, ControlSegment, Perms, PoolSegment};
use pegaflow_shm::slot_table::{any_pinned, withdraw_pin, BlockKey, SlotKind, SlotState};

/// One temporary directory (on tmpfs when there is one) for every segment
/// of this test binary, exported as `PEGAFLOW_SHM_DIR` before any is made.
fn shm_dir() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("a temporary directory");
        std::env::set_var("PEGAFLOW_SHM_DIR", d.path());
        d
    })
    .path()
    .to_path_buf()
}

/// A fresh control segment and its 2 MiB pool, published.
fn segments(test: &str) -> (ControlSegment, PoolSegment) {
    shm_dir();
    let name = format!("stress-{}-{test}", std::process::id());
    let geometry = Geometry::for_pool(2 << 20, 2 << 20, 4096, 4).expect("geometry");
    create_published(&name, geometry, Perms::PRIVATE).expect("segments")
}

/// A page of shared anonymous memory for the test's own bookkeeping (the
/// stop flag), so nothing but the protocol under test lives in the segment.
struct SharedPage(*mut AtomicU64);

impl SharedPage {
    fn new() -> SharedPage {
        // SAFETY: a fresh anonymous shared mapping; no existing memory is
        // affected. Zeroed pages are valid AtomicU64s.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        SharedPage(p as *mut AtomicU64)
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < 512);
        // SAFETY: inside the 4096-byte mapping, 8-byte aligned, lives as long
        // as self.
        unsafe { &*self.0.add(i) }
    }
}

impl Drop for SharedPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what new() mapped.
        unsafe { libc::munmap(self.0 as *mut libc::c_void, 4096) };
    }
}

/// Fork a child that runs `f` and exits with its return value.
fn fork_child(f: impl FnOnce() -> i32) -> libc::pid_t {
    // SAFETY: the child only runs `f`, which touches shared atomics and
    // calls async-signal-safe functions (sched_yield, _exit); it never
    // returns into the test harness.
    match unsafe { libc::fork() } {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            let code = f();
            // SAFETY: leaves the child without running the parent's
            // destructors or atexit handlers.
            unsafe { libc::_exit(code) }
        }
        pid => pid,
    }
}

/// Wait for `pid`; its exit code (128 + signal if it was killed).
fn reap(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid: {}", std::io::Error::last_os_error());
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }
}

fn yield_cpu() {
    // SAFETY: no preconditions.
    unsafe { libc::sched_yield() };
}

// ---------------------------------------------------------------------------
// Request rings
// ---------------------------------------------------------------------------

const REQUESTS: u64 = 200_000;

/// Request `i` of client `c`: every field depends on both.
fn request(c: u32, i: u64) -> Request {
    let mut hash = [0u8; 32];
    hash[..8].copy_from_slice(&i.to_le_bytes());
    hash[8..16].copy_from_slice(&(!i).to_le_bytes());
    hash[31] = c as u8;
    Request::Commit {
        slot: i as u32 ^ c,
        gen: (i >> 3) as u32,
        len: i.wrapping_mul(0x9E37_79B9) ^ u64::from(c),
        key: BlockKey::new(u64::from(c) << 32 | 7, hash),
    }
}

/// Two engine processes each push `REQUESTS` requests through their own
/// request ring and ring the doorbell; the owner (this process) pops them
/// all, sleeping on the doorbell when both rings are empty, and checks that
/// each ring delivers exactly its stream, in order.
#[test]
fn request_rings_across_processes() {
    let (seg, _pool) = segments("rings");
    let producers: Vec<_> = (0..2u32)
        .map(|c| {
            let seg = &seg;
            fork_child(move || {
                let view = seg.client(c).expect("client area");
                let h = seg.header();
                let bell = Doorbell {
                    word: &h.doorbell,
                    sleeping: &h.owner_sleeping,
                };
                for i in 0..REQUESTS {
                    let e = request(c, i).encode();
                    while !view.requests.push(&e) {
                        bell.ring();
                        yield_cpu();
                    }
                    if i % 64 == 0 {
                        bell.ring();
                    }
                }
                bell.ring();
                0
            })
        })
        .collect();

    let views: Vec<_> = (0..2).map(|c| seg.client(c).unwrap()).collect();
    let h = seg.header();
    let bell = Doorbell {
        word: &h.doorbell,
        sleeping: &h.owner_sleeping,
    };
    let mut next = [0u64; 2];
    let mut sleeps = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while next.iter().any(|&n| n < REQUESTS) {
        assert!(Instant::now() < deadline, "stalled at {next:?}");
        let mut got = 0;
        for (c, view) in views.iter().enumerate() {
            got += view
                .requests
                .consume(256, |w| {
                    let r = Request::decode(w).expect("a valid request");
                    assert_eq!(r, request(c as u32, next[c]), "ring {c} entry {}", next[c]);
                    next[c] += 1;
                })
                .expect("ring not corrupt");
        }
        if got == 0 {
            sleeps += 1;
            bell.wait(Duration::from_millis(50), || {
                views.iter().any(|v| !v.requests.is_empty())
            });
        }
    }
    for pid in producers {
        assert_eq!(reap(pid), 0, "producer failed");
    }
    for v in &views {
        assert_eq!(v.requests.pop(), Ok(None), "more than was pushed");
        assert_eq!(v.requests.positions(), (REQUESTS, REQUESTS));
    }
    eprintln!(
        "rings: {} requests delivered, {sleeps} idle waits",
        2 * REQUESTS
    );
}

// ---------------------------------------------------------------------------
// Pin / evict
// ---------------------------------------------------------------------------

const SLOTS: u32 = 4;
const ENGINES: u32 = 2;
const DATA_WORDS: usize = 8;

fn key(slot: u32, variant: u32) -> BlockKey {
    let mut hash = [0u8; 32];
    hash[0] = slot as u8;
    hash[1] = variant as u8;
    BlockKey::new(9, hash)
}

/// What a slot's bytes hold in the life `gen`, under key `variant`.
fn data_for(slot: u32, variant: u32, gen: u32) -> u64 {
    u64::from(slot) << 48 | u64::from(variant) << 40 | u64::from(gen)
}

/// Engine exit codes.
const TORN_OR_REUSED: i32 = 10;
const FREED_WHILE_PINNED: i32 = 11;

/// Engines (forked children, clients 1..=2) keep pinning the four slots
/// under either of the two keys each slot alternates between, check under
/// the pin that the slot's pool bytes are the ones of the life they
/// validated, and unpin. The owner (this process) keeps evicting, rewriting
/// the bytes and re-committing the slots under the other key, backing off
/// from pins. Any reuse under a pin shows as wrong bytes in an engine.
#[test]
fn pins_against_eviction_across_processes() {
    let (seg, pool) = segments("pins");
    let data = |slot: u32| -> &[AtomicU64] {
        // SAFETY: slot * 4096 + 64 bytes lie inside the 2 MiB pool mapping,
        // page aligned; the pool is only accessed through atomics here.
        unsafe {
            std::slice::from_raw_parts(
                pool.as_ptr().add(slot as usize * 4096) as *const AtomicU64,
                DATA_WORDS,
            )
        }
    };
    let page = SharedPage::new();
    let stop = page.word(0);
    let slots = seg.slots();

    for s in 0..SLOTS {
        for w in data(s) {
            w.store(data_for(s, 0, 0), Ordering::Relaxed);
        }
        slots[s as usize].start_writing(SlotState::FREE, 0);
        slots[s as usize].commit(slots[s as usize].load_state().unwrap(), &key(s, 0), 64, 0);
    }

    let engines: Vec<_> = (1..=ENGINES)
        .map(|c| {
            let (seg, data) = (&seg, &data);
            fork_child(move || {
                let view = seg.client(c).expect("client area");
                let slots = seg.slots();
                let mut pins = 0u64;
                let mut round = 0u32;
                while stop.load(Ordering::Relaxed) == 0 {
                    round = round.wrapping_add(1);
                    let s = round % SLOTS;
                    let variant = (round / SLOTS) % 2;
                    let pin = &view.pins[s as usize];
                    let Some(gen) = slots[s as usize].try_pin(pin, &key(s, variant)) else {
                        continue;
                    };
                    pins += 1;
                    // Hold the pin a while, re-reading the bytes.
                    for _ in 0..(round % 7) * 20 {
                        for w in data(s) {
                            if w.load(Ordering::Relaxed) != data_for(s, variant, gen) {
                                return TORN_OR_REUSED;
                            }
                        }
                    }
                    let st = slots[s as usize].load_state().expect("valid state");
                    if st.gen != gen || !matches!(st.kind, SlotKind::Committed | SlotKind::Evicting)
                    {
                        return FREED_WHILE_PINNED;
                    }
                    withdraw_pin(pin);
                }
                view.entry.engine_counters[0].store(pins, Ordering::SeqCst);
                0
            })
        })
        .collect();

    let views: Vec<_> = (1..=ENGINES).map(|c| seg.client(c).unwrap()).collect();
    let (mut evictions, mut aborts) = (0u64, 0u64);
    let end = Instant::now() + Duration::from_secs(3);
    let mut tick = 1;
    while Instant::now() < end {
        for s in 0..SLOTS {
            let slot = &slots[s as usize];
            let Some(st) = slot.begin_evict() else {
                panic!("slot {s} not committed: {:?}", slot.load_state());
            };
            if any_pinned(views.iter().map(|v| &v.pins[s as usize])) {
                slot.abort_evict(st);
                aborts += 1;
                continue;
            }
            slot.free(st);
            let free = slot.load_state().unwrap();
            let variant = free.gen % 2;
            // The slot is ours: a new block lands in it, then is published.
            for w in data(s) {
                w.store(data_for(s, variant, free.gen), Ordering::Relaxed);
            }
            slot.start_writing(free, 0);
            tick += 1;
            slot.commit(slot.load_state().unwrap(), &key(s, variant), 64, tick);
            evictions += 1;
        }
    }
    stop.store(1, Ordering::Relaxed);
    let codes: Vec<_> = engines.into_iter().map(reap).collect();
    let pins: Vec<_> = views
        .iter()
        .map(|v| v.entry.engine_counters[0].load(Ordering::SeqCst))
        .collect();
    eprintln!("pins: {evictions} evictions, {aborts} backed off, engine pins {pins:?}");
    assert!(
        codes.iter().all(|&c| c == 0),
        "engine exit codes {codes:?} ({TORN_OR_REUSED}: bytes changed under a pin, \
         {FREED_WHILE_PINNED}: slot freed under a pin)"
    );
    for v in &views {
        for p in v.pins.iter().take(SLOTS as usize) {
            assert_eq!(p.load(Ordering::SeqCst), 0, "pin left behind");
        }
    }
    assert!(evictions > 100, "owner starved: {evictions} evictions");
    assert!(pins.iter().all(|&p| p > 100), "engines starved: {pins:?}");
    assert!(aborts > 0, "no contention: the test did not test anything");
}
