//! A scriptable engine process for the multi-process tests:
//!
//! ```text
//! pf-engine save  SOCKET NAME NS SLOT_BYTES SEED START COUNT [stay]
//!                                          # prints "saved N" then "visible N"; stay: then sleep
//! pf-engine load  SOCKET NAME NS SEED START COUNT              # prints "hits H ok V bad B"
//! pf-engine chaos SOCKET NAME NS SLOT_BYTES SEED [KEY=VALUE..] # random saves and verified loads until
//!                                                              # killed (options: see `mod chaos`)
//! pf-engine hold  SOCKET NAME NS SEED START COUNT              # pin, print "pinned N", sleep
//! pf-engine pinall SOCKET NAME NS SEED START COUNT             # pin every block of the range that
//!                                                              # is cached (one lookup each), as hold
//! pf-engine hangup SOCKET NAME NS SLOT_BYTES N                 # take N stash slots by hand, hang up,
//!                                                              # print "hungup SLOT...", sleep
//! pf-engine bad   SOCKET NAME NS SLOT_BYTES                    # connect by hand, queue one commit of an
//!                                                              # out-of-range slot, print "bad 1", sleep
//! ```
//!
//! `save`, `load`, `hold` and `pinall` then print what the engine counted:
//! `stats lookups=L hits=H misses=M saved=S dropped=D skipped=K loaded=N`.
//!
//! Exit codes: 0 ok, 2 usage, 3 corrupt data seen, 4 engine error.

use std::time::Duration;

use pegaflow_core::{Engine, EngineConfig};
use pegaflow_tests::{check_block, fill_block, hash_of, keys};

fn arg<T: std::str::FromStr>(a: &[String], i: usize) -> T {
    a.get(i).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        eprintln!("usage: see the module docs of tests/src/bin/pf-engine.rs");
        std::process::exit(2)
    })
}

fn connect(socket: &str, name: &str, ns: u64, slot_bytes: u64) -> Engine {
    // CI machines are loaded; production keeps the 2 ms default.
    connect_with(socket, name, ns, slot_bytes, Duration::from_millis(500))
}

fn connect_with(
    socket: &str,
    name: &str,
    ns: u64,
    slot_bytes: u64,
    reserve_wait: Duration,
) -> Engine {
    let cfg = EngineConfig {
        name: name.into(),
        socket: Some(socket.into()),
        label: format!("pf-engine {}", std::process::id()),
        namespace: if slot_bytes > 0 { ns } else { 0 },
        slot_bytes,
        reconnect_interval: Duration::from_millis(50),
        reserve_wait,
    };
    match Engine::connect(cfg) {
        Ok(e) => e,
        Err(e) => {
            println!("error {e}");
            eprintln!("pf-engine: {e}");
            std::process::exit(4)
        }
    }
}

fn report(e: &Engine) {
    let s = e.stats();
    println!(
        "stats lookups={} hits={} misses={} saved={} dropped={} skipped={} loaded={}",
        s.lookups,
        s.hit_blocks,
        s.miss_blocks,
        s.saved_blocks,
        s.save_dropped_blocks,
        s.save_skipped_blocks,
        s.loaded_blocks
    );
}

fn load_verify(e: &Engine, ns: u64, seed: u64, start: u64, count: u64) -> (usize, usize, usize) {
    let ks = keys(ns, seed, start, count);
    let hashes: Vec<[u8; 32]> = ks.iter().map(|k| k.hash).collect();
    let pinned = e.lookup(ns, &hashes);
    let (mut ok, mut bad) = (0, 0);
    e.load_with(&pinned, |i, data| {
        if check_block(&ks[i], data) {
            ok += 1
        } else {
            bad += 1
        }
    });
    e.release(&pinned);
    (pinned.len(), ok, bad)
}

/// Connect by hand and queue one request the owner must refuse (a commit
/// into a slot id past the pool); stay connected.
fn queue_bad_request(socket: &str, ns: u64, slot_bytes: u64) -> std::os::unix::net::UnixStream {
    use pegaflow_shm::proto::{self, ClientMsg, Hello, OwnerMsg};
    use pegaflow_shm::request::Request;
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    let hello = Hello {
        abi_version: pegaflow_shm::ABI_VERSION,
        pid: std::process::id(),
        label: "pf-engine bad".into(),
        namespace: ns,
        slot_bytes,
        resume: None,
    };
    proto::send(&mut s, &ClientMsg::Hello(hello)).expect("hello");
    let OwnerMsg::Welcome(w) = proto::recv::<OwnerMsg>(&mut s).expect("welcome") else {
        eprintln!("pf-engine: not welcomed");
        std::process::exit(4)
    };
    let seg = pegaflow_shm::segment::ControlSegment::open(std::path::Path::new(&w.control_path))
        .expect("map control segment");
    let me = seg.client(w.client).expect("client in range");
    let bad = Request::Commit {
        slot: u32::MAX,
        gen: 1,
        len: slot_bytes,
        key: pegaflow_shm::slot_table::BlockKey::new(ns, hash_of(0xbad, 0)),
    };
    assert_eq!(me.requests.push_many(&[bad.encode()]), 1, "ring has room");
    let h = seg.header();
    pegaflow_shm::doorbell::Doorbell {
        word: &h.doorbell,
        sleeping: &h.owner_sleeping,
    }
    .ring();
    s
}

/// Speak the protocol by hand: hello, take `n` slots from the stash (they
/// are `Writing(us)` now), then close the socket while staying alive.
fn take_and_hang_up(socket: &str, ns: u64, slot_bytes: u64, n: usize) -> Vec<u32> {
    use pegaflow_shm::proto::{self, ClientMsg, Hello, OwnerMsg};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    let hello = Hello {
        abi_version: pegaflow_shm::ABI_VERSION,
        pid: std::process::id(),
        label: "pf-engine hangup".into(),
        namespace: ns,
        slot_bytes,
        resume: None,
    };
    proto::send(&mut s, &ClientMsg::Hello(hello)).expect("hello");
    let OwnerMsg::Welcome(w) = proto::recv::<OwnerMsg>(&mut s).expect("welcome") else {
        eprintln!("pf-engine: not welcomed");
        std::process::exit(4)
    };
    let seg = pegaflow_shm::segment::ControlSegment::open(std::path::Path::new(&w.control_path))
        .expect("map control segment");
    let me = seg.client(w.client).expect("client in range");
    let mut slots = Vec::new();
    // Ask for the slots as an engine's reserve does (the pool may be full).
    me.entry
        .stash_want
        .store(n as u32, pegaflow_shm::sync::Ordering::Relaxed);
    me.entry
        .refill_asked
        .fetch_add(1, pegaflow_shm::sync::Ordering::SeqCst);
    let h = seg.header();
    pegaflow_shm::doorbell::Doorbell {
        word: &h.doorbell,
        sleeping: &h.owner_sleeping,
    }
    .ring();
    let t = std::time::Instant::now();
    while slots.len() < n && t.elapsed() < Duration::from_secs(5) {
        match me.stash.pop() {
            Ok(Some([word])) => slots.push(word as u32),
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    drop(s);
    slots
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let cmd = a.get(1).map(String::as_str).unwrap_or("");
    let (socket, name): (String, String) = (arg(&a, 2), arg(&a, 3));
    let ns: u64 = arg(&a, 4);
    match cmd {
        "save" => {
            let (slot_bytes, seed, start, count): (u64, u64, u64, u64) =
                (arg(&a, 5), arg(&a, 6), arg(&a, 7), arg(&a, 8));
            let e = connect(&socket, &name, ns, slot_bytes);
            e.wait_connected(Duration::from_secs(5));
            // The stash fills right after connecting; give it a moment.
            std::thread::sleep(Duration::from_millis(20));
            let ks = keys(ns, seed, start, count);
            let saved = e.save_with(&ks, |i, buf| {
                fill_block(&ks[i], &mut buf[..slot_bytes as usize]);
                slot_bytes as usize
            });
            println!("saved {saved}");
            let hashes: Vec<[u8; 32]> = ks.iter().map(|k| k.hash).collect();
            let t = std::time::Instant::now();
            while e.count_hits(ns, &hashes) < saved && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(1));
            }
            println!("visible {}", e.count_hits(ns, &hashes));
            report(&e);
            if a.get(9).map(String::as_str) == Some("stay") {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        "bad" => {
            let slot_bytes: u64 = arg(&a, 5);
            let _socket = queue_bad_request(&socket, ns, slot_bytes);
            println!("bad 1");
            std::thread::sleep(Duration::from_secs(3600));
        }
        "load" => {
            let (seed, start, count): (u64, u64, u64) = (arg(&a, 5), arg(&a, 6), arg(&a, 7));
            let e = connect(&socket, &name, ns, 0);
            e.wait_connected(Duration::from_secs(5));
            let (hits, ok, bad) = load_verify(&e, ns, seed, start, count);
            println!("hits {hits} ok {ok} bad {bad}");
            report(&e);
            if bad > 0 {
                std::process::exit(3);
            }
        }
        "hold" => {
            let (seed, start, count): (u64, u64, u64) = (arg(&a, 5), arg(&a, 6), arg(&a, 7));
            let e = connect(&socket, &name, ns, 0);
            e.wait_connected(Duration::from_secs(5));
            let hashes: Vec<[u8; 32]> = (start..start + count).map(|i| hash_of(seed, i)).collect();
            let pinned = e.lookup(ns, &hashes);
            println!("pinned {}", pinned.len());
            report(&e);
            std::thread::sleep(Duration::from_secs(3600));
        }
        "pinall" => {
            let (seed, start, count): (u64, u64, u64) = (arg(&a, 5), arg(&a, 6), arg(&a, 7));
            let e = connect(&socket, &name, ns, 0);
            e.wait_connected(Duration::from_secs(5));
            let held: Vec<_> = (start..start + count)
                .map(|i| e.lookup(ns, &[hash_of(seed, i)]))
                .filter(|p| !p.is_empty())
                .collect();
            println!("pinned {}", held.len());
            report(&e);
            std::thread::sleep(Duration::from_secs(3600));
        }
        "chaos" => {
            let (slot_bytes, seed): (u64, u64) = (arg(&a, 5), arg(&a, 6));
            chaos::run(&socket, &name, ns, slot_bytes, seed, &a[7.min(a.len())..]);
        }
        "hangup" => {
            let (slot_bytes, n): (u64, usize) = (arg(&a, 5), arg(&a, 6));
            let slots = take_and_hang_up(&socket, ns, slot_bytes, n);
            let list: Vec<String> = slots.iter().map(u32::to_string).collect();
            println!("hungup {}", list.join(" "));
            std::thread::sleep(Duration::from_secs(3600));
        }
        _ => {
            eprintln!("usage: pf-engine save|load|chaos|hold|hangup|bad ...");
            std::process::exit(2);
        }
    }
}

/// `chaos`: random saves, lookups and verified loads, until killed or (with
/// `stdin_stop=1`) until stdin closes. Every block's bytes and length are a
/// function of its key (`fill_block`, `block_len`), so any load that the
/// engine API reports valid but that holds other bytes is corruption: the
/// process prints `CORRUPT ...` and exits 3. A load reported invalid
/// (`load_checked` gives `ok == false`: the block changed under the read)
/// is a miss, as it is for an inference engine.
///
/// Options follow the positional arguments as `key=value`:
///
/// | key | default | meaning |
/// |---|---|---|
/// | `keys` | 224 | key space per namespace: indices `0..keys` of key seed 7 |
/// | `peers` | none | namespaces it also loads from: `NS:SLOT_BYTES[,NS:SLOT_BYTES...]` |
/// | `threads` | 1 | threads running operations on one `Engine` |
/// | `pace_us` | 0 | pause between two operations of a thread |
/// | `hold_ms` | 0 | longest a lookup's pins are kept before release (0: released at once) |
/// | `status_ms` | 0 | print a status line this often (0: never) |
/// | `report` | 0 | print the keys seen committed, per segment |
/// | `reserve_wait_ms` | 500 | `EngineConfig::reserve_wait` |
/// | `stdin_stop` | 0 | release everything and exit 0 once stdin closes |
///
/// Output lines:
///
/// ```text
/// status ops=N saves=N ... connected=0|1 segment=HEX     every status_ms
/// committed SEGMENT_HEX NS I I I ...    keys seen committed (pinned and validated) in that segment
/// done ops=N ...                         after a clean stop (stdin_stop)
/// CORRUPT ...                            wrong bytes behind a valid load; exit 3
/// INVALID ...                            a pinned block no longer valid at its load (a lost pin)
/// ```
mod chaos {
    use std::collections::HashSet;
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use pegaflow_core::{BlockKey, Engine, Pinned, Reservation};
    use pegaflow_tests::{block_len, block_ok, fill_block, keys};

    /// Seed of the key hashes (`keys(ns, KEY_SEED, i, n)`), shared with
    /// the tests that check what the engines saved.
    pub const KEY_SEED: u64 = 7;
    /// Longest run of keys one operation saves or looks up.
    const MAX_RUN: u64 = 32;
    /// Lookups one thread keeps pinned at once.
    const MAX_HELD: usize = 6;

    struct Opts {
        keys: u64,
        peers: Vec<Space>,
        threads: usize,
        pace: Duration,
        hold_ms: u64,
        status: Duration,
        report: bool,
        reserve_wait: Duration,
        stdin_stop: bool,
    }

    fn usage(what: &str) -> ! {
        eprintln!("pf-engine chaos: {what}; see the module docs of tests/src/bin/pf-engine.rs");
        std::process::exit(2)
    }

    fn number(key: &str, v: &str) -> u64 {
        v.parse()
            .unwrap_or_else(|_| usage(&format!("{key}={v} is not a number")))
    }

    fn parse(rest: &[String]) -> Opts {
        let mut o = Opts {
            keys: 224,
            peers: Vec::new(),
            threads: 1,
            pace: Duration::ZERO,
            hold_ms: 0,
            status: Duration::ZERO,
            report: false,
            reserve_wait: Duration::from_millis(500),
            stdin_stop: false,
        };
        for kv in rest {
            let Some((k, v)) = kv.split_once('=') else {
                usage(&format!("option {kv} is not key=value"))
            };
            match k {
                "keys" => o.keys = number(k, v).max(1),
                "peers" => {
                    for p in v.split(',').filter(|p| !p.is_empty()) {
                        let Some((ns, sb)) = p.split_once(':') else {
                            usage(&format!("peer {p} is not NS:SLOT_BYTES"))
                        };
                        let (ns, slot_bytes) = (number(k, ns), number(k, sb));
                        if ns == 0 || slot_bytes == 0 {
                            usage(&format!("peer {p} needs a namespace and a block size"));
                        }
                        o.peers.push(Space { ns, slot_bytes });
                    }
                }
                "threads" => o.threads = number(k, v).clamp(1, 16) as usize,
                "pace_us" => o.pace = Duration::from_micros(number(k, v)),
                "hold_ms" => o.hold_ms = number(k, v),
                "status_ms" => o.status = Duration::from_millis(number(k, v)),
                "report" => o.report = number(k, v) != 0,
                "reserve_wait_ms" => o.reserve_wait = Duration::from_millis(number(k, v)),
                "stdin_stop" => o.stdin_stop = number(k, v) != 0,
                _ => usage(&format!("unknown option {k}")),
            }
        }
        o
    }

    /// A namespace and the block size its blocks are saved with.
    #[derive(Clone, Copy, Debug)]
    struct Space {
        ns: u64,
        slot_bytes: u64,
    }

    macro_rules! stats {
        ($($field:ident),* $(,)?) => {
            /// Counters of every thread, printed as `name=value`.
            #[derive(Default)]
            struct Stats { $($field: AtomicU64,)* }

            impl Stats {
                fn line(&self) -> String {
                    let mut s = String::new();
                    $(s.push_str(&format!("{}={} ", stringify!($field), self.$field.load(Ordering::Relaxed)));)*
                    s
                }
            }
        };
    }

    stats!(
        ops,
        saves,
        reserved_blocks,
        saved_blocks,
        // Reserved slots never committed: aborted explicitly or by the
        // reservation's drop.
        uncommitted_blocks,
        dropped_reservations,
        lookups,
        hit_blocks,
        // Loaded and byte-exact.
        verified_blocks,
        // Pinned but reported invalid (or gone) at the load: misses.
        invalid_blocks,
        holds,
        rechecks,
        committed_reported,
    );

    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    struct Shared {
        stats: Stats,
        /// (segment, namespace, index) already printed as committed.
        reported: Mutex<HashSet<(u64, u64, u64)>>,
        stop: AtomicBool,
    }

    /// Pins one thread keeps for a while.
    struct Held {
        pinned: Pinned,
        space: Space,
        start: u64,
        until: Instant,
        /// When the lookup pinned them.
        taken: Instant,
        /// Blocks released early (`recheck_held`).
        released: Vec<bool>,
    }

    struct Worker<'a> {
        e: Engine,
        /// The owner's control file, read (not mapped for writing) to say
        /// what became of a block that went invalid under its pin.
        control: std::path::PathBuf,
        own: Option<Space>,
        spaces: Vec<Space>,
        opts: &'a Opts,
        shared: &'a Shared,
        rng: u64,
        held: Vec<Held>,
    }

    impl Worker<'_> {
        fn rnd(&mut self) -> u64 {
            // xorshift64*
            self.rng ^= self.rng >> 12;
            self.rng ^= self.rng << 25;
            self.rng ^= self.rng >> 27;
            self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            if n == 0 {
                0
            } else {
                self.rnd() % n
            }
        }

        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                let j = self.below(i as u64 + 1) as usize;
                v.swap(i, j);
            }
        }

        /// A run of keys: `start..start + count` inside the key space.
        fn range(&mut self) -> (u64, u64) {
            let start = self.below(self.opts.keys);
            let count = (1 + self.below(MAX_RUN)).min(self.opts.keys - start);
            (start, count)
        }

        fn step(&mut self) {
            add(&self.shared.stats.ops, 1);
            self.expire_held();
            let r = self.below(100);
            match self.own {
                Some(sp) if r < 45 => self.save(sp),
                _ if r < 90 || self.held.is_empty() => {
                    let which = self.below(self.spaces.len() as u64) as usize;
                    let sp = self.spaces[which];
                    let (start, count) = self.range();
                    self.look(sp, start, count, true);
                }
                _ => self.recheck_held(),
            }
        }

        /// Write each reserved slot `i` with the block of `ks[i]`; the
        /// (index, key, length) to commit.
        fn fill(&self, r: &Reservation, ks: &[BlockKey], sb: u64) -> Vec<(usize, BlockKey, u64)> {
            let mut items = Vec::with_capacity(r.len());
            for (i, key) in ks.iter().enumerate().take(r.len()) {
                let Some((ptr, cap)) = r.slot(i) else {
                    continue;
                };
                let n = block_len(key, sb);
                if n > cap {
                    continue;
                }
                // SAFETY: slot i of `r` is Writing(us) until it is committed
                // or aborted, so no other process touches it; ptr..ptr+cap
                // lies in the pool mapping `r` keeps alive; this thread is
                // the only writer of the slice while it lives.
                let dst = unsafe { std::slice::from_raw_parts_mut(ptr, cap) };
                fill_block(key, &mut dst[..n]);
                items.push((i, *key, n as u64));
            }
            items
        }

        fn save(&mut self, sp: Space) {
            let (start, count) = self.range();
            let ks = keys(sp.ns, KEY_SEED, start, count);
            let st = &self.shared.stats;
            add(&st.saves, 1);
            let variant = self.below(8);
            let (reserved, committed) = match variant {
                // The plain path: reserve, fill, commit in order.
                0..=3 => {
                    let n = self.e.save_with(&ks, |i, buf| {
                        let n = block_len(&ks[i], sp.slot_bytes).min(buf.len());
                        fill_block(&ks[i], &mut buf[..n]);
                        n
                    });
                    (n, n)
                }
                // Some slots committed, out of order and in two batches; the
                // rest aborted by the reservation's drop.
                4 | 5 => {
                    let r = self.e.reserve(ks.len());
                    let mut items = self.fill(&r, &ks, sp.slot_bytes);
                    self.shuffle(&mut items);
                    let keep = self.below(items.len() as u64 + 1) as usize;
                    items.truncate(keep);
                    let cut = self.below(items.len() as u64 + 1) as usize;
                    let n = self.e.commit_many(&r, &items[cut..])
                        + self.e.commit_many(&r, &items[..cut]);
                    if n < r.len() {
                        add(&st.dropped_reservations, 1);
                    }
                    (r.len(), n)
                }
                // Reserved (and perhaps written), then dropped uncommitted.
                6 => {
                    let r = self.e.reserve(ks.len());
                    if self.below(2) == 0 {
                        self.fill(&r, &ks, sp.slot_bytes);
                    }
                    add(&st.dropped_reservations, 1);
                    (r.len(), 0)
                }
                // Held a moment, then committed one by one, last first.
                _ => {
                    let r = self.e.reserve(ks.len());
                    let items = self.fill(&r, &ks, sp.slot_bytes);
                    std::thread::sleep(Duration::from_micros(self.below(3000)));
                    let n = items
                        .iter()
                        .rev()
                        .filter(|&&(i, key, len)| self.e.commit(&r, i, key, len))
                        .count();
                    (r.len(), n)
                }
            };
            add(&st.reserved_blocks, reserved as u64);
            add(&st.saved_blocks, committed as u64);
            add(&st.uncommitted_blocks, (reserved - committed) as u64);
            // Look the run up again now and then: it reports the keys the
            // owner published, and loads them back.
            if committed > 0 && self.below(2) == 0 {
                if self.below(2) == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                self.look(sp, start, count, false);
            }
        }

        /// Look a run up, report and verify its hits, then release them
        /// (in pieces, out of order) or keep them pinned for a while.
        fn look(&mut self, sp: Space, start: u64, count: u64, may_hold: bool) {
            let ks = keys(sp.ns, KEY_SEED, start, count);
            let hashes: Vec<[u8; 32]> = ks.iter().map(|k| k.hash).collect();
            let p = self.e.lookup(sp.ns, &hashes);
            let st = &self.shared.stats;
            add(&st.lookups, 1);
            add(&st.hit_blocks, p.len() as u64);
            self.report(p.segment_id(), sp.ns, start, p.len() as u64);
            let taken = Instant::now();
            let released = vec![false; p.len()];
            self.verify(&p, sp, start, taken, &released);
            let hold = may_hold
                && self.opts.hold_ms > 0
                && !p.is_empty()
                && self.held.len() < MAX_HELD
                && self.below(3) == 0;
            if hold {
                add(&st.holds, 1);
                let until = Instant::now() + Duration::from_millis(self.below(self.opts.hold_ms));
                self.held.push(Held {
                    pinned: p,
                    space: sp,
                    start,
                    until,
                    taken,
                    released,
                });
            } else {
                self.release(p);
            }
        }

        /// Copy out every block still pinned (all but `released`) and check
        /// it against its key. Wrong bytes behind a valid load: `CORRUPT`,
        /// exit 3. A block no longer valid is a miss for the engine, but it
        /// was pinned, and a pinned block is never evicted or reused: it is
        /// reported (`INVALID`) with what the owner log needs to explain it.
        fn verify(&self, p: &Pinned, sp: Space, start: u64, taken: Instant, released: &[bool]) {
            let mut seen = vec![None; p.len()];
            self.e.load_checked(p, |i, data, ok| {
                seen[i] = Some(ok);
                if !ok {
                    return;
                }
                let key = BlockKey::new(sp.ns, pegaflow_tests::hash_of(KEY_SEED, start + i as u64));
                if block_ok(&key, sp.slot_bytes, data) {
                    return;
                }
                let b = p.blocks[i];
                // A load the API calls valid holds other bytes: the one thing
                // a KV cache must never do.
                println!(
                    "CORRUPT segment={:x} ns={} key={} slot={} gen={} len={} want_len={} still_valid={}",
                    p.segment_id(),
                    sp.ns,
                    start + i as u64,
                    b.slot,
                    b.gen,
                    data.len(),
                    block_len(&key, sp.slot_bytes),
                    p.still_valid(i),
                );
                std::process::exit(3);
            });
            let mut good = 0;
            for (i, seen) in seen.iter().enumerate() {
                if released.get(i).copied().unwrap_or(false) {
                    continue;
                }
                if *seen == Some(true) {
                    good += 1;
                    continue;
                }
                add(&self.shared.stats.invalid_blocks, 1);
                let b = p.blocks[i];
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                // The slot as the segment file says now (if it is still the
                // file of that segment).
                let state_now =
                    pegaflow_shm::segment::ControlSegment::open_read_only(&self.control)
                        .ok()
                        .filter(|c| c.header().segment_id == p.segment_id())
                        .and_then(|c| c.slots().get(b.slot as usize).and_then(|e| e.load_state()))
                        .map_or("unknown".to_string(), |st| {
                            format!("{:?}/{}/gen{}", st.kind, st.client, st.gen)
                        });
                println!(
                    "INVALID unix_ms={now_ms} pid={} segment={:x} ns={} key={} slot={} gen={} why={} state_now={state_now} pinned_ms_ago={} client_now={:?} segment_now={:x}",
                    std::process::id(),
                    p.segment_id(),
                    sp.ns,
                    start + i as u64,
                    b.slot,
                    b.gen,
                    if seen.is_some() { "changed-during-the-read" } else { "not-committed-at-its-generation" },
                    taken.elapsed().as_millis(),
                    self.e.client_id(),
                    self.e.segment_id(),
                );
            }
            add(&self.shared.stats.verified_blocks, good);
        }

        /// Release in up to four pieces, in random order, sometimes a piece
        /// twice, sometimes by dropping the `Pinned`.
        fn release(&mut self, p: Pinned) {
            let n = p.len();
            if n == 0 || self.below(5) == 0 {
                return;
            }
            let mut cuts = vec![0, n];
            for _ in 0..self.below(4) {
                cuts.push(self.below(n as u64 + 1) as usize);
            }
            cuts.sort_unstable();
            cuts.dedup();
            let mut pieces: Vec<_> = cuts.windows(2).map(|w| w[0]..w[1]).collect();
            self.shuffle(&mut pieces);
            for r in pieces {
                p.release_range(r);
            }
            if self.below(4) == 0 {
                self.e.release(&p);
            }
        }

        fn expire_held(&mut self) {
            let now = Instant::now();
            let mut i = 0;
            while i < self.held.len() {
                if self.held[i].until <= now {
                    let h = self.held.swap_remove(i);
                    self.verify(&h.pinned, h.space, h.start, h.taken, &h.released);
                    self.release(h.pinned);
                } else {
                    i += 1;
                }
            }
        }

        /// Load a held lookup again (its blocks must not have changed), and
        /// sometimes release a piece of it early.
        fn recheck_held(&mut self) {
            let i = self.below(self.held.len() as u64) as usize;
            add(&self.shared.stats.rechecks, 1);
            let h = &self.held[i];
            self.verify(&h.pinned, h.space, h.start, h.taken, &h.released);
            if self.below(2) == 0 {
                let n = self.held[i].pinned.len();
                let a = self.below(n as u64 + 1) as usize;
                let b = self.below(n as u64 + 1) as usize;
                let h = &mut self.held[i];
                h.pinned.release_range(a.min(b)..a.max(b));
                h.released[a.min(b)..a.max(b)].fill(true);
            }
        }

        fn report(&self, segment: u64, ns: u64, start: u64, hits: u64) {
            if !self.opts.report || hits == 0 || segment == 0 {
                return;
            }
            let new: Vec<u64> = {
                let mut seen = self
                    .shared
                    .reported
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                (start..start + hits)
                    .filter(|&i| seen.insert((segment, ns, i)))
                    .collect()
            };
            add(&self.shared.stats.committed_reported, new.len() as u64);
            // Short lines: a pipe write of up to 4 KiB is atomic, so a kill
            // never leaves half a line for the reader to misparse.
            for chunk in new.chunks(64) {
                let list: Vec<String> = chunk.iter().map(u64::to_string).collect();
                println!("committed {segment:x} {ns} {}", list.join(" "));
            }
        }
    }

    fn status(e: &Engine, shared: &Shared) -> String {
        format!(
            "{}connected={} segment={:x}",
            shared.stats.line(),
            u8::from(e.is_connected()),
            e.segment_id()
        )
    }

    pub fn run(socket: &str, name: &str, ns: u64, slot_bytes: u64, seed: u64, rest: &[String]) {
        let opts = parse(rest);
        let e = super::connect_with(socket, name, ns, slot_bytes, opts.reserve_wait);
        let own = (slot_bytes > 0).then_some(Space { ns, slot_bytes });
        let spaces: Vec<Space> = own.into_iter().chain(opts.peers.iter().copied()).collect();
        if spaces.is_empty() {
            usage("a lookup-only engine (SLOT_BYTES 0) needs peers=...");
        }
        let shared = Shared {
            stats: Stats::default(),
            reported: Mutex::new(HashSet::new()),
            stop: AtomicBool::new(false),
        };
        std::thread::scope(|scope| {
            if opts.stdin_stop {
                scope.spawn(|| {
                    let _ =
                        std::io::copy(&mut std::io::stdin().lock().by_ref(), &mut std::io::sink());
                    shared.stop.store(true, Ordering::Relaxed);
                });
            }
            if !opts.status.is_zero() {
                scope.spawn(|| {
                    let mut next = Instant::now() + opts.status;
                    while !shared.stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(10));
                        if Instant::now() >= next {
                            println!("status {}", status(&e, &shared));
                            next += opts.status;
                        }
                    }
                });
            }
            for t in 0..opts.threads as u64 {
                let (e, opts, shared, spaces) = (e.clone(), &opts, &shared, spaces.clone());
                scope.spawn(move || {
                    let mut w = Worker {
                        e,
                        control: pegaflow_shm::segment::control_path(name),
                        own,
                        spaces,
                        opts,
                        shared,
                        rng: (seed ^ t.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1,
                        held: Vec::new(),
                    };
                    while !shared.stop.load(Ordering::Relaxed) {
                        w.step();
                        if !opts.pace.is_zero() {
                            std::thread::sleep(opts.pace);
                        }
                    }
                    // Held pins are released as `w` drops.
                });
            }
        });
        println!("done {}", status(&e, &shared));
        // The goodbye goes out as the last session holder goes.
        drop(e);
    }
}
