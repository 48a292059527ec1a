//! A scriptable engine process for the multi-process tests:
//!
//! ```text
//! pf-engine save  SOCKET NAME NS SLOT_BYTES SEED START COUNT [stay]
//!                                          # prints "saved N" then "visible N"; stay: then sleep
//! pf-engine load  SOCKET NAME NS SEED START COUNT              # prints "hits H ok V bad B"
//! pf-engine chaos SOCKET NAME NS SLOT_BYTES SEED               # random saves and verified loads forever
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
    let cfg = EngineConfig {
        name: name.into(),
        socket: Some(socket.into()),
        label: format!("pf-engine {}", std::process::id()),
        namespace: if slot_bytes > 0 { ns } else { 0 },
        slot_bytes,
        reconnect_interval: Duration::from_millis(50),
        // CI machines are loaded; production keeps the 2 ms default.
        reserve_wait: Duration::from_millis(500),
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
            let e = connect(&socket, &name, ns, slot_bytes);
            let mut x = seed | 1;
            let mut rnd = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            loop {
                let start = rnd() % 192;
                let count = 1 + rnd() % 32;
                if rnd() % 2 == 0 {
                    let ks = keys(ns, 7, start, count);
                    e.save_with(&ks, |i, buf| {
                        fill_block(&ks[i], &mut buf[..slot_bytes as usize]);
                        slot_bytes as usize
                    });
                } else {
                    let (_, _, bad) = load_verify(&e, ns, 7, start, count);
                    if bad > 0 {
                        println!("CORRUPT");
                        std::process::exit(3);
                    }
                }
            }
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
