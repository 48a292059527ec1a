//! No wrong bytes, no hangs, no leaks when the protocol is stressed from the
//! side: an engine the owner throws out while it lives, a socket that hangs
//! up before its process is gone, commits that cannot be queued, an idle
//! stash, a late IPC reply, a peer that trickles its frames.
//!
//! Each test reproduces a finding of the 2026-11-29 protocol review (issue 9)
//! against a real owner process and real shared memory.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use pegaflow_core::Engine;
use pegaflow_shm::client::{client_state, EngineCounter};
use pegaflow_shm::doorbell::Doorbell;
use pegaflow_shm::proto::{self, ClientMsg, Hello, OwnerMsg, Welcome};
use pegaflow_shm::segment::ControlSegment;
use pegaflow_shm::slot_table::{BlockKey, SlotKind, SlotState};
use pegaflow_shm::sync::Ordering;
use pegaflow_tests::{check_block, eventually, fill_block, keys, Audit, OwnerProc};

const NS: u64 = 0x1e97_0001;
const SLOT: u64 = 64 << 10;
/// `OwnerProc::start`'s pool: 512 slots of 64 KiB.
const POOL: &[&str] = &["--pool-size", "32mb"];
const SLAB: &[&str] = &["--slab-size", "2mb"];
const MIN_SLOT: &[&str] = &["--min-slot-size", "64kb"];

fn hashes(ks: &[BlockKey]) -> Vec<[u8; 32]> {
    ks.iter().map(|k| k.hash).collect()
}

fn save(e: &Engine, ks: &[BlockKey]) -> usize {
    e.save_with(ks, |i, buf| {
        fill_block(&ks[i], &mut buf[..SLOT as usize]);
        SLOT as usize
    })
}

fn connected(owner: &OwnerProc, ns: u64, slot: u64) -> Engine {
    let e = Engine::connect(owner.engine_config(ns, slot)).unwrap();
    assert!(e.wait_connected(Duration::from_secs(5)));
    e
}

/// Every key loads byte-exact through a fresh lookup.
fn all_exact(e: &Engine, ks: &[BlockKey]) -> (usize, usize) {
    let p = e.lookup(NS, &hashes(ks));
    let (mut ok, mut bad) = (0, 0);
    e.load_with(&p, |i, d| {
        if check_block(&ks[i], d) {
            ok += 1
        } else {
            bad += 1
        }
    });
    e.release(&p);
    (ok, bad)
}

/// A client that speaks the protocol by hand.
struct Raw {
    stream: UnixStream,
    welcome: Welcome,
    seg: ControlSegment,
}

impl Raw {
    fn connect(owner: &OwnerProc, slot_bytes: u64) -> Raw {
        let mut stream = UnixStream::connect(&owner.socket).unwrap();
        let hello = ClientMsg::Hello(Hello {
            abi_version: pegaflow_shm::ABI_VERSION,
            pid: std::process::id(),
            label: "raw".into(),
            namespace: if slot_bytes > 0 { NS } else { 0 },
            slot_bytes,
            resume: None,
        });
        proto::send(&mut stream, &hello).unwrap();
        let welcome = match proto::recv::<OwnerMsg>(&mut stream).unwrap() {
            OwnerMsg::Welcome(w) => w,
            other => panic!("{other:?}"),
        };
        let seg = ControlSegment::open(Path::new(&welcome.control_path)).unwrap();
        Raw {
            stream,
            welcome,
            seg,
        }
    }

    fn client(&self) -> pegaflow_shm::segment::ClientView<'_> {
        self.seg.client(self.welcome.client).unwrap()
    }

    /// Take `n` slots from the stash, as an engine reserving them would.
    fn take(&self, n: usize) -> Vec<u32> {
        let c = self.client();
        let mut out = Vec::new();
        assert!(
            eventually(Duration::from_secs(5), || {
                while out.len() < n {
                    match c.stash.pop() {
                        Ok(Some([w])) => out.push(w as u32),
                        _ => break,
                    }
                }
                out.len() == n
            }),
            "stash gave {} of {n} slots",
            out.len()
        );
        out
    }
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIGSTOP a process and wait until it is stopped (delivery is
/// asynchronous: it may still run for a moment after kill(2) returns).
fn stop(pid: i32) {
    // SAFETY: kill(2) on a child's pid; no memory involved.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    assert!(eventually(Duration::from_secs(2), || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with('T'))
            })
            .unwrap_or(false)
    }));
}

/// A `pf-engine hangup` child: it takes `n` stash slots by hand and closes
/// its socket, then lives on. Returns it and the slots it holds.
fn hang_up_child(owner: &OwnerProc, n: usize) -> (KillOnDrop, Vec<u32>) {
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_pf-engine"));
    let mut child = KillOnDrop(
        pegaflow_tests::engine_cmd(
            &bin,
            &[
                "hangup".into(),
                owner.socket.display().to_string(),
                owner.name.clone(),
                NS.to_string(),
                SLOT.to_string(),
                n.to_string(),
            ],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.0.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let held = line
        .trim()
        .strip_prefix("hungup ")
        .unwrap_or_else(|| panic!("unexpected: {line:?}"))
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    (child, held)
}

/// Each slot with its full state now.
fn states(ctl: &Path, slots: &[u32]) -> Vec<(u32, SlotState)> {
    let seg = ControlSegment::open_read_only(ctl).unwrap();
    slots
        .iter()
        .map(|&s| (s, seg.slots()[s as usize].load_state().unwrap()))
        .collect()
}

/// Whether every slot was freed since `before` (its generation moved on).
fn reclaimed(ctl: &Path, before: &[(u32, SlotState)]) -> bool {
    let seg = ControlSegment::open_read_only(ctl).unwrap();
    before.iter().all(|&(s, b)| {
        seg.slots()[s as usize]
            .load_state()
            .is_some_and(|now| now.gen != b.gen)
    })
}

fn slot_state(ctl: &Path, slot: u32) -> (SlotKind, u16) {
    let seg = ControlSegment::open_read_only(ctl).unwrap();
    let st = seg.slots()[slot as usize].load_state().unwrap();
    (st.kind, st.client)
}

fn ring_owner(seg: &ControlSegment) {
    let h = seg.header();
    Doorbell {
        word: &h.doorbell,
        sleeping: &h.owner_sleeping,
    }
    .ring();
}

/// Review C2: the owner throws out a live engine (here: its request ring
/// is corrupt). Its pins must keep their blocks, its reserved slots must not
/// be handed to anyone else, and once it is back its commits land in its own
/// slots only.
#[test]
fn kicked_live_engine_keeps_its_pins_and_reserved_slots() {
    // Plain LRU: A's late blocks must be admitted into the full pool.
    let owner = OwnerProc::start_with(
        "kick",
        &[POOL, SLAB, MIN_SLOT, &["--disable-lfu-admission"]].concat(),
    );
    let a = connected(&owner, NS, SLOT);
    let ka = keys(NS, 1, 0, 8);
    assert_eq!(save(&a, &ka), 8);
    assert!(eventually(Duration::from_secs(2), || a
        .count_hits(NS, &hashes(&ka))
        == 8));
    let pinned = a.lookup(NS, &hashes(&ka));
    assert_eq!(pinned.len(), 8);
    let reserved = a.reserve(8);
    assert_eq!(reserved.len(), 8);
    let a_client = a.client_id().unwrap();

    // Corrupt A's request ring from outside: the owner kicks A.
    {
        let seg = ControlSegment::open(&owner.control()).unwrap();
        let c = seg.client(a_client).unwrap();
        let (head, _) = c.requests.positions();
        c.requests
            .tail_cell()
            .store(head + 1_000_000, Ordering::SeqCst);
        ring_owner(&seg);
    }
    assert!(
        eventually(Duration::from_secs(3), || owner
            .log_text()
            .contains("corrupted its request ring")),
        "the owner should throw the engine out"
    );

    // Another engine fills the whole pool (512 slots) several times over.
    let b = connected(&owner, NS, SLOT);
    for round in 0..4 {
        let kb = keys(NS, 100 + round, 0, 128);
        for chunk in kb.chunks(32) {
            save(&b, chunk);
        }
    }
    // A's pinned blocks were never evicted or overwritten.
    let mut ok = 0;
    a.load_with(&pinned, |i, d| ok += check_block(&ka[i], d) as usize);
    assert_eq!(ok, 8, "a pinned block was evicted or overwritten under A");
    // A's reserved slots are still A's, not B's.
    for i in 0..reserved.len() {
        let slot = reserved.slots[i];
        let (kind, client) = slot_state(&owner.control(), slot);
        assert_eq!(
            (kind, u32::from(client)),
            (SlotKind::Writing, a_client),
            "reserved slot {slot} of the thrown-out engine was handed on"
        );
    }
    // A is back (the same process resumes its entry), writes and commits.
    assert!(a.wait_connected(Duration::from_secs(5)));
    let ka2 = keys(NS, 2, 0, 8);
    for (i, k) in ka2.iter().enumerate() {
        let (ptr, _) = reserved.slot(i).unwrap();
        // SAFETY: the slot is reserved by A (checked above: Writing(A)).
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, SLOT as usize) };
        fill_block(k, buf);
    }
    let items: Vec<_> = ka2.iter().enumerate().map(|(i, k)| (i, *k, SLOT)).collect();
    let queued = a.commit_many(&reserved, &items);
    assert_eq!(
        queued, 8,
        "A's commits could not be queued after its return"
    );
    a.release(&pinned);
    assert!(
        eventually(Duration::from_secs(2), || a.count_hits(NS, &hashes(&ka2))
            == 8),
        "A's commits after its return: {} of 8 visible; owner log:\n{}",
        a.count_hits(NS, &hashes(&ka2)),
        owner.log_text()
    );
    assert_eq!(all_exact(&a, &ka2), (8, 0));
    // Nothing B committed was overwritten by A's late commit.
    let kb = keys(NS, 103, 0, 128);
    let p = b.lookup(NS, &hashes(&kb));
    let mut bad = 0;
    b.load_with(&p, |i, d| bad += !check_block(&kb[i], d) as usize);
    b.release(&p);
    assert_eq!(bad, 0, "B read another key's bytes");
    let audit = Audit::read(&owner.control());
    assert_eq!(audit.bad_index_entries, 0, "{audit:?}");
}

/// Review M4: a hang-up while the process lives (it closed the socket, or
/// it is still exiting with copies in flight) must not hand its writing
/// slots to others; once the process is gone they are freed.
#[test]
fn writing_slots_outlive_the_hang_up_until_the_process_is_gone() {
    let owner = OwnerProc::start("hangup");
    let raw = Raw::connect(&owner, SLOT);
    let mine = raw.take(6);
    let me = raw.welcome.client;
    drop(raw.stream);
    std::thread::sleep(Duration::from_millis(300));
    for &s in &mine {
        assert_eq!(
            slot_state(&owner.control(), s),
            (SlotKind::Writing, me as u16),
            "slot {s} freed while its writer process still lives"
        );
    }
    // Pool pressure: another engine must not be given those slots.
    let b = connected(&owner, NS, SLOT);
    for round in 0..3 {
        for chunk in keys(NS, 200 + round, 0, 160).chunks(32) {
            save(&b, chunk);
        }
    }
    for &s in &mine {
        assert_eq!(slot_state(&owner.control(), s).0, SlotKind::Writing);
    }

    // A child process that hangs up and then dies: its slots come back.
    let (mut child, held) = hang_up_child(&owner, 5);
    assert_eq!(held.len(), 5);
    std::thread::sleep(Duration::from_millis(300));
    for &s in &held {
        assert_eq!(slot_state(&owner.control(), s).0, SlotKind::Writing);
    }
    let before = states(&owner.control(), &held);
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    // Reclaimed: freed, so at the next generation (another engine's stash
    // may take them at once, so "not Writing" would be the wrong test).
    assert!(
        eventually(Duration::from_secs(2), || reclaimed(
            &owner.control(),
            &before
        )),
        "slots of a dead process are reclaimed within 2 s"
    );
}

/// Review m1: a lookup-only engine that calls reserve() must not make the
/// owner spin on a full core forever.
#[test]
fn owner_sleeps_after_a_reserve_from_a_lookup_only_engine() {
    let owner = OwnerProc::start("spin");
    let e = connected(&owner, 0, 0);
    assert_eq!(e.reserve(4).len(), 0);
    std::thread::sleep(Duration::from_millis(300));
    let ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", owner.pid())).unwrap();
        let rest = stat.rsplit_once(')').unwrap().1;
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|x| x.parse().unwrap())
            .collect();
        f[0] + f[1]
    };
    let t0 = ticks();
    std::thread::sleep(Duration::from_secs(1));
    let used = ticks() - t0;
    // An idle owner sleeps on its doorbell; 100 ticks would be a full core.
    assert!(used < 20, "idle owner used {used} clock ticks in 1 s");
}

/// Review M1: slots whose commit could not be queued (the owner was down
/// at that moment) must not stay `Writing` for the engine's whole life.
#[test]
fn commits_lost_to_an_owner_outage_do_not_leak_slots() {
    let mut owner = OwnerProc::start("leak-outage");
    let e = connected(&owner, NS, SLOT);
    let ks = keys(NS, 3, 0, 8);
    let r = e.reserve(8);
    assert_eq!(r.len(), 8);
    owner.kill9();
    assert!(eventually(Duration::from_secs(2), || !e.is_connected()));
    let items: Vec<_> = ks.iter().enumerate().map(|(i, k)| (i, *k, SLOT)).collect();
    e.commit_many(&r, &items);
    drop(r);
    owner.spawn();
    assert!(e.wait_connected(Duration::from_secs(5)));
    assert!(
        eventually(Duration::from_secs(3), || Audit::read(&owner.control())
            .leaked_writing()
            == 0),
        "writing slots leaked: {:?}",
        Audit::read(&owner.control())
    );
}

/// Review M1: a request ring full of best-effort touches must not make a
/// commit fail (and leak its slots).
#[test]
fn touches_never_starve_commits() {
    let owner = OwnerProc::start("leak-ring");
    let e = connected(&owner, NS, SLOT);
    let ks = keys(NS, 4, 0, 14);
    assert_eq!(save(&e, &ks), 14);
    assert!(eventually(Duration::from_secs(2), || e
        .count_hits(NS, &hashes(&ks))
        == 14));
    let r = e.reserve(8);
    assert_eq!(r.len(), 8);
    // Stop the owner and fill the ring with touches (one per lookup).
    stop(owner.pid() as i32);
    let cap = ControlSegment::open_read_only(&owner.control())
        .unwrap()
        .client(e.client_id().unwrap())
        .unwrap()
        .requests
        .capacity();
    for _ in 0..cap + 16 {
        let p = e.lookup(NS, &hashes(&ks));
        e.release(&p);
    }
    let k2 = keys(NS, 5, 0, 8);
    let items: Vec<_> = k2.iter().enumerate().map(|(i, k)| (i, *k, SLOT)).collect();
    let queued = e.commit_many(&r, &items);
    // SAFETY: as above.
    unsafe { libc::kill(owner.pid() as i32, libc::SIGCONT) };
    drop(r);
    assert_eq!(queued, 8, "touches filled the ring and starved the commit");
    assert!(eventually(Duration::from_secs(3), || Audit::read(
        &owner.control()
    )
    .leaked_writing()
        == 0));
}

/// Review M2: after an owner restart the engine resumes its entry; a
/// reservation taken before the restart commits through the same request
/// ring as the new session's touches. Two producers on one SPSC ring lose or
/// tear requests and get a healthy engine thrown out.
#[test]
fn one_producer_per_ring_across_a_resume() {
    let mut owner = OwnerProc::start("twoprod");
    let e = connected(&owner, NS, SLOT);
    let hot = keys(NS, 6, 0, 14);
    assert_eq!(save(&e, &hot), 14);
    for round in 0..4u64 {
        assert!(eventually(Duration::from_secs(2), || e
            .count_hits(NS, &hashes(&hot))
            == 14));
        let r = e.reserve(96);
        assert_eq!(r.len(), 96);
        owner.kill9();
        owner.spawn();
        assert!(e.wait_connected(Duration::from_secs(5)));
        let ks = keys(NS, 1000 + round, 0, 96);
        for (i, k) in ks.iter().enumerate() {
            let (ptr, _) = r.slot(i).unwrap();
            // SAFETY: reserved by this engine, resumed entry.
            fill_block(k, unsafe {
                std::slice::from_raw_parts_mut(ptr, SLOT as usize)
            });
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let touchers: Vec<_> = (0..3)
            .map(|_| {
                let (e, hot, stop) = (e.clone(), hot.clone(), stop.clone());
                std::thread::spawn(move || {
                    let hs = hashes(&hot[..1]);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let p = e.lookup(NS, &hs);
                        e.release(&p);
                    }
                })
            })
            .collect();
        let mut queued = 0;
        for (i, k) in ks.iter().enumerate() {
            queued += e.commit_many(&r, &[(i, *k, SLOT)]);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in touchers {
            t.join().unwrap();
        }
        assert_eq!(queued, 96);
        assert!(
            eventually(Duration::from_secs(3), || e.count_hits(NS, &hashes(&ks))
                == 96),
            "round {round}: commits lost: {} of 96 visible; owner log:\n{}",
            e.count_hits(NS, &hashes(&ks)),
            owner.log_text()
        );
        assert!(!owner.log_text().contains("corrupted its request ring"));
        assert!(!owner.log_text().contains("ignored a bad request"));
        assert_eq!(all_exact(&e, &ks), (96, 0));
    }
}

/// Review m2 / issue 9 item 12: after one large save an idle engine's stash
/// must not be refilled to that size by evicting cached blocks.
#[test]
fn idle_stash_does_not_evict_the_cache() {
    let owner = OwnerProc::start("stash");
    let filler = connected(&owner, NS, SLOT);
    for chunk in keys(NS, 8, 0, 300).chunks(30) {
        save(&filler, chunk);
    }
    let big = connected(&owner, NS, SLOT);
    let kb = keys(NS, 9, 0, 250);
    save(&big, &kb);
    std::thread::sleep(Duration::from_millis(300));
    let before = Audit::read(&owner.control()).committed;
    // A few one-block saves, as decode steps make: each may evict the one
    // block it needs, not refill the stash to the size of the big save.
    for i in 0..4 {
        save(&big, &keys(NS, 11, i, 1));
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = Audit::read(&owner.control());
    // An engine that saves keeps its base stash (16 slots here) topped
    // up, evicting if it must; nothing beyond that.
    assert!(
        after.committed + 24 >= before,
        "idle stashes evicted cached blocks: {before} committed before, {after:?}"
    );
    let client = big.client_id().unwrap();
    let stash = after
        .clients
        .iter()
        .find(|c| c.0 == client)
        .map(|c| c.3)
        .unwrap();
    assert!(
        stash <= 64,
        "an idle engine's stash holds {stash} of 512 slots"
    );
}

/// Review m3: a reply to a fetch that timed out must not be returned as the
/// handle of the next key.
#[test]
fn late_ipc_reply_is_not_taken_for_another_key() {
    let owner = OwnerProc::start("ipc");
    let publisher = connected(&owner, 0, 0);
    publisher.publish_ipc("x", &[7u8; 64]).unwrap();
    let e = connected(&owner, 0, 0);
    assert!(eventually(Duration::from_secs(2), || e
        .fetch_ipc("x", Duration::from_secs(1))
        .ok()
        .flatten()
        .is_some()));
    // The reply to "x" and the one to "y" arrive back to back; repeat so
    // the waiter wakes between them at least once.
    let pid = owner.pid() as i32;
    for round in 0..40 {
        stop(pid);
        assert!(e.fetch_ipc("x", Duration::from_millis(5)).is_err());
        let resume = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        });
        let got = e.fetch_ipc("y", Duration::from_secs(2)).unwrap();
        resume.join().unwrap();
        assert_eq!(
            got, None,
            "round {round}: the late reply for 'x' was returned for 'y'"
        );
    }
}

/// Issue 9 item 7: one peer that trickles a frame must not stall the
/// admission of others, nor the reclaim of a dead engine.
#[test]
fn a_trickling_peer_stalls_nobody() {
    let owner = OwnerProc::start("trickle");
    let mut slow = UnixStream::connect(&owner.socket).unwrap();
    let frame = {
        let mut buf = Vec::new();
        proto::send(
            &mut buf,
            &ClientMsg::Hello(Hello {
                abi_version: pegaflow_shm::ABI_VERSION,
                pid: std::process::id(),
                label: "slow".into(),
                namespace: 0,
                slot_bytes: 0,
                resume: None,
            }),
        )
        .unwrap();
        buf
    };
    let trickle = std::thread::spawn(move || {
        for b in frame.iter().take(8) {
            let _ = std::io::Write::write_all(&mut slow, &[*b]);
            std::thread::sleep(Duration::from_millis(700));
        }
        slow
    });
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let e = connected(&owner, NS, SLOT);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "admission took {:?} behind a trickling peer",
        t.elapsed()
    );
    // A killed engine is reclaimed promptly meanwhile, too.
    let (mut child, held) = hang_up_child(&owner, 4);
    let before = states(&owner.control(), &held);
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(1), || reclaimed(
            &owner.control(),
            &before
        )),
        "a killed engine was not reclaimed within 1 s behind a trickling peer"
    );
    drop(e);
    let _ = trickle.join();
}

/// Issue 9 item 2 (review m8): a new engine's pin counters start at zero
/// even if a previous user of its entry left some behind.
#[test]
fn admission_zeroes_the_pin_counters() {
    let owner = OwnerProc::start("pins0");
    let seed = connected(&owner, NS, SLOT);
    let ks = keys(NS, 10, 0, 4);
    save(&seed, &ks);
    assert!(eventually(Duration::from_secs(2), || seed
        .count_hits(NS, &hashes(&ks))
        == 4));
    let seg = ControlSegment::open(&owner.control()).unwrap();
    let slot = seg.index().get(&ks[0]).unwrap();
    // The first free entry: the next engine gets it. Leave a phantom pin.
    let free = (0..seg.max_clients())
        .find(|&i| seg.client(i).unwrap().entry.state() == client_state::FREE)
        .unwrap();
    seg.client(free).unwrap().pins[slot as usize].store(3, Ordering::SeqCst);
    let next = connected(&owner, 0, 0);
    assert_eq!(next.client_id(), Some(free));
    assert_eq!(
        seg.client(free).unwrap().pins[slot as usize].load(Ordering::SeqCst),
        0,
        "a phantom pin survived admission"
    );
}

/// Issue 9 item 18: saves skipped while the owner is away are counted where
/// the owner's metrics read them.
#[test]
fn skipped_saves_reach_the_shared_counters() {
    let mut owner = OwnerProc::start("skipped");
    let e = connected(&owner, NS, SLOT);
    owner.kill9();
    assert!(eventually(Duration::from_secs(2), || !e.is_connected()));
    assert_eq!(e.reserve(5).len(), 0);
    owner.spawn();
    assert!(e.wait_connected(Duration::from_secs(5)));
    let seg = ControlSegment::open_read_only(&owner.control()).unwrap();
    let c = seg.client(e.client_id().unwrap()).unwrap();
    assert!(
        eventually(Duration::from_secs(2), || c
            .entry
            .engine(EngineCounter::SaveSkippedBlocks)
            >= 5),
        "skipped saves: {}",
        c.entry.engine(EngineCounter::SaveSkippedBlocks)
    );
}

/// Issue 9 item 1: an owner restarted with `--discard-existing` under
/// running engines. Nothing pinned or reserved before the restart may read
/// or write the new segment's blocks: an old reservation's late save and
/// commit land nowhere, an old pin reads its own (old) bytes or nothing,
/// and a block handed over by segment id and generation (the scheduler to
/// worker path) is refused in the new segment.
#[test]
fn a_discarding_restart_never_mixes_segments() {
    let mut owner = OwnerProc::start("discard");
    let a = connected(&owner, NS, SLOT);
    let ka = keys(NS, 20, 0, 16);
    assert_eq!(save(&a, &ka), 16);
    assert!(eventually(Duration::from_secs(2), || a
        .count_hits(NS, &hashes(&ka))
        == 16));
    let pinned = a.lookup(NS, &hashes(&ka));
    assert_eq!(pinned.len(), 16);
    let old_segment = pinned.segment_id();
    let handed: Vec<_> = pinned.blocks.clone();
    let reserved = a.reserve(16);
    assert_eq!(reserved.len(), 16);

    owner.kill9();
    owner.args.push("--discard-existing".into());
    owner.spawn();
    assert!(eventually(Duration::from_secs(5), || a.is_connected()
        && a.segment_id() != old_segment));
    // Another engine fills the new segment at the same slot ids.
    let c = connected(&owner, NS, SLOT);
    let kc = keys(NS, 21, 0, 64);
    assert_eq!(save(&c, &kc), 64);
    assert!(eventually(Duration::from_secs(2), || c
        .count_hits(NS, &hashes(&kc))
        == 64));

    // The old reservation finishes its save after the restart.
    let late = keys(NS, 22, 0, 16);
    for (i, k) in late.iter().enumerate() {
        let (ptr, _) = reserved.slot(i).unwrap();
        // SAFETY: reserved by A in the old segment, which its mapping keeps.
        fill_block(k, unsafe {
            std::slice::from_raw_parts_mut(ptr, SLOT as usize)
        });
    }
    let items: Vec<_> = late
        .iter()
        .enumerate()
        .map(|(i, k)| (i, *k, SLOT))
        .collect();
    a.commit_many(&reserved, &items);
    drop(reserved);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(a.count_hits(NS, &hashes(&late)), 0, "an old commit landed");
    assert_eq!(all_exact(&c, &kc), (64, 0), "new blocks were overwritten");

    // The old pins read their own bytes (the old file's pages) or nothing.
    let mut wrong = 0;
    a.load_checked(&pinned, |i, d, ok| {
        if ok && !check_block(&ka[i], d) {
            wrong += 1
        }
    });
    assert_eq!(wrong, 0, "an old pin returned another key's bytes");
    // Handed over by id, the old blocks are refused in the new segment.
    for b in &handed {
        assert!(a.pinned_block(old_segment, b.slot, b.gen).is_none());
    }
    drop(pinned);
    let audit = Audit::read(&owner.control());
    assert_eq!(audit.bad_index_entries, 0, "{audit:?}");
}

/// Issue 9 item 10: `pegaflow-inspect verify` flags writing slots that are
/// neither in a client's stash nor held by the engine, and accepts the
/// same slots while the engine says it holds them.
#[test]
fn verify_flags_leaked_writing_slots() {
    let owner = OwnerProc::start("verifyleak");
    let raw = Raw::connect(&owner, SLOT);
    raw.take(3);
    let inspect = |args: &[&str]| {
        std::process::Command::new(pegaflow_tests::target_bin("pegaflow-inspect"))
            .args(["--name", &owner.name])
            .args(args)
            .output()
            .unwrap()
    };
    let out = inspect(&["verify", "--recheck-ms", "20"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "verify passed with 3 leaked slots:\n{text}"
    );
    assert!(text.contains("writing-slots-leaked"), "{text}");
    // An engine that holds them for a copy in flight says so.
    raw.client().entry.held_slots.store(3, Ordering::Relaxed);
    let out = inspect(&["verify", "--recheck-ms", "20"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
}

/// Issue 9 item 13: an engine cannot grow the owner without bound: distinct
/// block sizes are capped (each costs the owner an LRU), brokered IPC
/// handles are capped, and the handles of an engine that left are dropped.
#[test]
fn owner_memory_is_bounded_against_engines() {
    let owner = OwnerProc::start("bounded");
    let mut held = Vec::new();
    let mut refused = None;
    for i in 0..40u64 {
        let mut s = UnixStream::connect(&owner.socket).unwrap();
        let hello = ClientMsg::Hello(Hello {
            abi_version: pegaflow_shm::ABI_VERSION,
            pid: std::process::id(),
            label: format!("size {i}"),
            namespace: NS + i,
            slot_bytes: SLOT + i * 4096,
            resume: None,
        });
        proto::send(&mut s, &hello).unwrap();
        match proto::recv::<OwnerMsg>(&mut s).unwrap() {
            OwnerMsg::Welcome(_) => held.push(s),
            OwnerMsg::Rejected { message, .. } => {
                refused = Some((i, message));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    let (at, message) = refused.expect("40 distinct block sizes were all accepted");
    assert_eq!(at, 32, "refused at the {at}th size: {message}");
    assert!(message.contains("distinct block sizes"), "{message}");
    drop(held);

    let e = connected(&owner, 0, 0);
    let big = vec![0x5au8; 1000 << 10];
    for i in 0..70 {
        e.publish_ipc(&format!("k{i}"), &big).unwrap();
    }
    let fetch = |k: &str| e.fetch_ipc(k, Duration::from_secs(2)).unwrap();
    assert!(eventually(Duration::from_secs(5), || fetch("k0").is_some()));
    assert_eq!(fetch("k69"), None, "handles beyond 64 MiB must be refused");
    assert!(owner.log_text().contains("IPC handle refused"));

    let publisher = connected(&owner, 0, 0);
    publisher.publish_ipc("gone", &[1u8; 64]).unwrap();
    assert!(eventually(Duration::from_secs(2), || fetch("gone").is_some()));
    drop(publisher);
    assert!(
        eventually(Duration::from_secs(3), || fetch("gone").is_none()),
        "the handle of an engine that left is still brokered"
    );
}
