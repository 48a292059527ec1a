//! Chaos: several `pf-engine chaos` processes save, look up and load
//! key-derived blocks of three namespaces (two block sizes in one stride,
//! one twice as large, every block a key-dependent length) while this test,
//! at random moments, SIGKILLs engines and starts new ones, SIGSTOPs engines
//! and the owner for up to 3 s, SIGKILLs or SIGTERMs the owner and restarts
//! it (it re-adopts the segments), and sometimes restarts it with
//! `--discard-existing` (a new segment: engines must notice and keep going)
//! and a new `--pool-size`: a roomy pool, where nothing is evicted, or one
//! time in three a tight one, a third of what the keys need, where blocks
//! are evicted under pins all the time.
//! The engines hold pins for up to 1.5 s, drop reservations uncommitted,
//! commit out of order and release pins in pieces; each runs two threads.
//!
//! What must hold, checked after everything stopped cleanly (engines exit
//! once their stdin closes, so the owner reclaims their entries):
//!
//! - no engine ever read wrong bytes: a load `Engine::load_checked` calls
//!   valid whose bytes or length differ from the key's is `CORRUPT` (exit 3);
//! - no pin is lost: a load it calls invalid is a miss for the engine, but
//!   a pinned block is never evicted or reused, so the test fails on any;
//! - before each discard and at the end, every key an engine saw committed
//!   (pinned and validated in a lookup) in that segment is still there,
//!   byte-exact, if its pool was the roomy one; every key that hits is
//!   byte-exact in any pool;
//! - no engine hangs: each keeps making progress and stops when asked;
//! - the control segment holds no pins, no writing slots, no stash entries
//!   and no client entries but FREE ones once the engines are gone, and
//!   `pegaflow-inspect verify` is clean.
//!
//! Environment:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `PEGAFLOW_CHAOS_SECS` | 120 | seconds of chaos (the whole test takes about 10 s more) |
//! | `PEGAFLOW_CHAOS_SEED` | from the clock | replay a run's sequence of actions (timing still varies) |
//! | `PEGAFLOW_CHAOS_PRESSURE` | 0 | 1: every pool is the tight one |
//! | `PEGAFLOW_CHAOS_LOG` | none | copy the owner's log (debug level, every restart) to this file at the end, pass or fail |
//!
//! A long manual run, with the summary printed:
//! `PEGAFLOW_CHAOS_SECS=600 cargo test -p pegaflow-tests --test chaos -- --nocapture`

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pegaflow_core::Engine;
use pegaflow_shm::segment::ControlSegment;
use pegaflow_shm::slot_table::BlockKey;
use pegaflow_tests::{block_ok, engine_cmd, eventually, hash_of, Audit, OwnerProc};

/// One namespace the engines save into: its block size.
#[derive(Clone, Copy, Debug)]
struct Space {
    ns: u64,
    slot_bytes: u64,
}

/// 64 KiB and 60 KiB blocks are two classes of one stride (the minimum slot
/// is 64 KiB); 128 KiB blocks a third. Blocks are up to 3/16 shorter than
/// their class (`block_len`).
const SPACES: [Space; 3] = [
    Space {
        ns: 0xc4a0_5001,
        slot_bytes: 64 << 10,
    },
    Space {
        ns: 0xc4a0_5002,
        slot_bytes: 60 << 10,
    },
    Space {
        ns: 0xc4a0_5003,
        slot_bytes: 128 << 10,
    },
];
/// Keys per namespace (`pf-engine chaos keys=`), of key seed 7.
const KEYS: u64 = 160;
const KEY_SEED: u64 = 7;
/// The roomy pool: the keys take 40 MiB in 64 KiB and 128 KiB slots;
/// engines' stashes, what they hold mid-save and what dead engines hold
/// until they are reclaimed stay well under the rest, so nothing is ever
/// evicted.
const POOL: &str = "192mb";
/// The tight pool: a third of what the keys need.
const POOL_TIGHT: &str = "16mb";
const ENGINES_START: usize = 4;
const ENGINES_MIN: usize = 2;
const ENGINES_MAX: usize = 5;
/// Longest SIGSTOP of an engine or the owner.
const STOP_MAX_MS: u64 = 3000;
/// An engine that neither is stopped nor made progress for this long hangs.
const STALL: Duration = Duration::from_secs(20);

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
    )
}

/// xorshift64*: the test's own choices, replayable from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

/// What the engines print, gathered by one reader thread per engine.
#[derive(Default)]
struct Reports {
    /// Keys seen committed, per segment: (namespace, index).
    committed: HashMap<u64, HashSet<(u64, u64)>>,
    /// The last status (or final `done`) line of each engine, by number.
    status: HashMap<u32, BTreeMap<String, u64>>,
    /// When each engine's `ops` last grew.
    progress: HashMap<u32, (u64, Instant)>,
    corrupt: Vec<String>,
    /// Pinned blocks found invalid at their load (lost pins).
    invalid: Vec<String>,
    /// Lines nobody expects (an engine error).
    odd: Vec<String>,
}

fn read_engine(no: u32, pid: u32, out: impl Read, reports: Arc<Mutex<Reports>>) {
    let mut r = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        // A line cut short by a kill is not a report.
        if !line.ends_with('\n') {
            return;
        }
        let mut words = line.split_whitespace();
        let mut rep = reports.lock().unwrap();
        match words.next() {
            Some("committed") => {
                let seg = words.next().and_then(|s| u64::from_str_radix(s, 16).ok());
                let ns = words.next().and_then(|s| s.parse::<u64>().ok());
                if let (Some(seg), Some(ns)) = (seg, ns) {
                    let set = rep.committed.entry(seg).or_default();
                    set.extend(words.filter_map(|w| w.parse::<u64>().ok()).map(|i| (ns, i)));
                }
            }
            Some("status" | "done") => {
                let map: BTreeMap<String, u64> = words
                    .filter_map(|w| w.split_once('='))
                    .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                    .collect();
                let ops = map.get("ops").copied().unwrap_or(0);
                let grew = rep.progress.get(&no).is_none_or(|&(o, _)| ops > o);
                if grew {
                    rep.progress.insert(no, (ops, Instant::now()));
                }
                rep.status.insert(no, map);
            }
            Some("CORRUPT") => rep
                .corrupt
                .push(format!("engine {no} (pid {pid}): {}", line.trim())),
            Some("INVALID") => rep
                .invalid
                .push(format!("engine {no} (pid {pid}): {}", line.trim())),
            _ => rep
                .odd
                .push(format!("engine {no} (pid {pid}): {}", line.trim())),
        }
    }
}

/// One `pf-engine chaos` process.
struct EngineProc {
    no: u32,
    child: Child,
    stdin: Option<ChildStdin>,
    reader: Option<JoinHandle<()>>,
    stderr: PathBuf,
    role: String,
    stopped_until: Option<Instant>,
}

impl EngineProc {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for EngineProc {
    /// However the test ends, no engine outlives it (a stopped one included).
    fn drop(&mut self) {
        signal(self.pid(), libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a child's pid; no memory involved.
    unsafe { libc::kill(pid, sig) };
}

/// Whether `pid` is in the stopped state (`T` in /proc/PID/stat).
fn is_stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

/// SIGSTOP, and wait until the process is stopped (delivery is
/// asynchronous).
fn stop_process(pid: i32) -> bool {
    signal(pid, libc::SIGSTOP);
    eventually(Duration::from_secs(2), || is_stopped(pid))
}

#[derive(Default, Debug)]
struct Counts {
    engines_spawned: u64,
    engine_kills: u64,
    engine_stops: u64,
    owner_stops: u64,
    owner_kills: u64,
    owner_terms: u64,
    discards: u64,
    verifies_midway: u64,
    verify_midway_errors: u64,
}

struct Chaos {
    seed: u64,
    rng: Rng,
    owner: OwnerProc,
    owner_stopped_until: Option<Instant>,
    engines: Vec<EngineProc>,
    reports: Arc<Mutex<Reports>>,
    /// Every segment the owner served, in order.
    segments: Vec<u64>,
    counts: Counts,
    /// Engines' stderr files.
    logs: tempfile::TempDir,
    bin: PathBuf,
    /// `PEGAFLOW_CHAOS_PRESSURE=1`: every pool is the tight one.
    always_tight: bool,
    /// The current segment's pool is the tight one (blocks are evicted).
    tight: bool,
    tight_segments: u64,
    started: Instant,
    first_midway_error: Option<String>,
    /// A lookup-only engine in this process: checks every segment's keys
    /// before it is discarded.
    verifier: Option<Engine>,
    /// Segments checked before their discard, and the keys checked.
    eras_checked: u64,
    era_keys_checked: u64,
}

impl Chaos {
    /// `PEGAFLOW_CHAOS_LOG`: keep the owner's log.
    fn keep_log(&self) {
        if let Some(to) = std::env::var_os("PEGAFLOW_CHAOS_LOG") {
            if let Err(e) = std::fs::copy(&self.owner.log, &to) {
                eprintln!(
                    "cannot copy the owner log to {}: {e}",
                    PathBuf::from(to).display()
                );
            }
        }
    }

    /// Fail with everything needed to look into it and replay it.
    fn fail(&self, what: &str) -> ! {
        self.keep_log();
        let log = self.owner.log_text();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(80)..].join("\n");
        panic!(
            "chaos failed after {:.1} s: {what}\n\
             replay with PEGAFLOW_CHAOS_SEED={} (timing still varies)\n\
             counts: {:?}\nsegments: {:x?}\n--- last lines of the owner log ---\n{tail}",
            self.started.elapsed().as_secs_f64(),
            self.seed,
            self.counts,
            self.segments,
        );
    }

    fn segment_now(&self) -> u64 {
        match ControlSegment::open_read_only(&self.owner.control()) {
            Ok(seg) => seg.header().segment_id,
            Err(e) => self.fail(&format!("cannot read the control segment: {e}")),
        }
    }

    fn spawn_engine(&mut self) {
        let no = self.counts.engines_spawned as u32;
        self.counts.engines_spawned += 1;
        let own = match self.rng.below(5) {
            0 => None,
            n => Some(SPACES[(n - 1) as usize % SPACES.len()]),
        };
        let peers: Vec<String> = SPACES
            .iter()
            .filter(|s| own.is_none_or(|o| o.ns != s.ns))
            .map(|s| format!("{}:{}", s.ns, s.slot_bytes))
            .collect();
        let (ns, slot_bytes) = own.map_or((0, 0), |s| (s.ns, s.slot_bytes));
        let role = own.map_or("lookups only".to_string(), |s| {
            format!("saves {:#x} ({} KiB)", s.ns, s.slot_bytes >> 10)
        });
        let seed = self.rng.next() | 1;
        let args: Vec<String> = vec![
            "chaos".into(),
            self.owner.socket.display().to_string(),
            self.owner.name.clone(),
            ns.to_string(),
            slot_bytes.to_string(),
            seed.to_string(),
            format!("keys={KEYS}"),
            format!("peers={}", peers.join(",")),
            "threads=2".into(),
            // Two cores shared with the rest of the test suite: the engines
            // pause between operations (about 10% of a core each).
            "pace_us=15000".into(),
            "hold_ms=1500".into(),
            "status_ms=500".into(),
            "report=1".into(),
            // The production default: saves are dropped, never waited for.
            "reserve_wait_ms=2".into(),
            "stdin_stop=1".into(),
        ];
        let stderr = self.logs.path().join(format!("engine-{no}.err"));
        let err_file = std::fs::File::create(&stderr).expect("engine stderr file");
        let mut child = engine_cmd(&self.bin, &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err_file)
            .spawn()
            .expect("spawn pf-engine");
        let pid = child.id();
        let out = child.stdout.take().expect("piped stdout");
        let reports = self.reports.clone();
        reports
            .lock()
            .unwrap()
            .progress
            .insert(no, (0, Instant::now()));
        let reader = std::thread::spawn(move || read_engine(no, pid, out, reports));
        self.engines.push(EngineProc {
            no,
            stdin: child.stdin.take(),
            child,
            reader: Some(reader),
            stderr,
            role,
            stopped_until: None,
        });
    }

    fn kill_engine(&mut self, i: usize) {
        let mut e = self.engines.swap_remove(i);
        let _ = e.child.kill();
        let _ = e.child.wait();
        signal(e.pid(), libc::SIGCONT);
        if let Some(r) = e.reader.take() {
            let _ = r.join();
        }
        self.counts.engine_kills += 1;
    }

    fn restart_owner(&mut self, how: &str) {
        let old = *self.segments.last().expect("a segment");
        if how == "discard" {
            self.check_era(old);
        }
        match how {
            "term" => {
                // A stopped owner cannot act on SIGTERM.
                signal(self.owner.pid() as i32, libc::SIGCONT);
                let status = self.owner.terminate();
                if !status.is_some_and(|s| s.success()) {
                    self.fail(&format!("owner exited with {status:?} on SIGTERM"));
                }
                self.counts.owner_terms += 1;
            }
            _ => {
                self.owner.kill9();
                if how == "kill" {
                    self.counts.owner_kills += 1;
                }
            }
        }
        self.owner_stopped_until = None;
        // Engines run on without it for a moment.
        std::thread::sleep(Duration::from_millis(self.rng.below(400)));
        if how == "discard" {
            // A new segment may have a new size: that takes a discard.
            self.tight = self.always_tight || self.rng.below(3) == 0;
            let size = if self.tight { POOL_TIGHT } else { POOL };
            if let Some(i) = self.owner.args.iter().position(|a| a == "--pool-size") {
                self.owner.args[i + 1] = size.into();
            }
            self.owner.args.push("--discard-existing".into());
            self.owner.spawn();
            self.owner.args.pop();
            self.counts.discards += 1;
            self.tight_segments += u64::from(self.tight);
        } else {
            self.owner.spawn();
        }
        let now = self.segment_now();
        match (how, now == old) {
            ("discard", true) => self.fail("a discarding restart kept the segment id"),
            ("kill" | "term", false) => {
                self.fail("a restart without --discard-existing made a new segment")
            }
            _ => {}
        }
        if now != old {
            self.segments.push(now);
        }
    }

    /// Before a segment is discarded: every key seen committed in it is
    /// there, byte-exact, and so is every other key that hits.
    fn check_era(&mut self, segment: u64) {
        // Lookups need no owner, but connecting does.
        if self.owner_stopped_until.take().is_some() {
            signal(self.owner.pid() as i32, libc::SIGCONT);
        }
        let Some(v) = self.verifier.clone() else {
            return;
        };
        if !eventually(Duration::from_secs(10), || v.segment_id() == segment) {
            self.fail(&format!(
                "the verifying engine did not connect to segment {segment:x} within 10 s"
            ));
        }
        let (verified, _) = verify_keys(self, &v, segment, !self.tight);
        self.eras_checked += 1;
        self.era_keys_checked += verified;
    }

    /// `pegaflow-inspect verify` against the live owner; returns its exit
    /// status and output.
    fn inspect_verify(&self) -> (Option<i32>, String) {
        let out = std::process::Command::new(pegaflow_tests::target_bin("pegaflow-inspect"))
            .args(["--name", &self.owner.name, "verify", "--recheck-ms", "100"])
            .output()
            .expect("run pegaflow-inspect");
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// One random action.
    fn act(&mut self) {
        let now = Instant::now();
        match self.rng.below(100) {
            0..=24 if !self.engines.is_empty() => {
                let i = self.rng.below(self.engines.len() as u64) as usize;
                self.kill_engine(i);
                if self.engines.len() < ENGINES_MIN || self.rng.below(10) < 7 {
                    self.spawn_engine();
                }
            }
            25..=34 if self.engines.len() < ENGINES_MAX => self.spawn_engine(),
            35..=54 => {
                let running: Vec<usize> = (0..self.engines.len())
                    .filter(|&i| self.engines[i].stopped_until.is_none())
                    .collect();
                if running.is_empty() {
                    return;
                }
                let i = running[self.rng.below(running.len() as u64) as usize];
                let ms = self.rng.between(100, STOP_MAX_MS);
                if !stop_process(self.engines[i].pid()) {
                    let e = &self.engines[i];
                    self.fail(&format!("engine {} did not stop on SIGSTOP", e.no));
                }
                self.engines[i].stopped_until = Some(now + Duration::from_millis(ms));
                self.counts.engine_stops += 1;
            }
            55..=64 if self.owner_stopped_until.is_none() => {
                let ms = self.rng.between(100, STOP_MAX_MS);
                if !stop_process(self.owner.pid() as i32) {
                    self.fail("the owner did not stop on SIGSTOP");
                }
                self.owner_stopped_until = Some(now + Duration::from_millis(ms));
                self.counts.owner_stops += 1;
            }
            65..=72 => self.restart_owner("kill"),
            73..=75 => self.restart_owner("term"),
            76..=78 => self.restart_owner("discard"),
            79..=84
                if self.owner_stopped_until.is_none()
                    && self.engines.iter().all(|e| e.stopped_until.is_none()) =>
            {
                // Informational: engines are mid-operation, so a finding
                // may be a moment caught between two steps.
                let (code, text) = self.inspect_verify();
                self.counts.verifies_midway += 1;
                if code != Some(0) {
                    self.counts.verify_midway_errors += 1;
                    self.first_midway_error.get_or_insert(text);
                }
            }
            _ => {}
        }
    }

    /// Resume what is due, and fail on corruption, a dead or a hung engine.
    fn watch(&mut self) {
        let now = Instant::now();
        if self.owner_stopped_until.is_some_and(|t| t <= now) {
            signal(self.owner.pid() as i32, libc::SIGCONT);
            self.owner_stopped_until = None;
        }
        for e in &mut self.engines {
            if e.stopped_until.is_some_and(|t| t <= now) {
                signal(e.pid(), libc::SIGCONT);
                e.stopped_until = None;
                // Progress is measured from the moment it runs again.
                self.reports
                    .lock()
                    .unwrap()
                    .progress
                    .entry(e.no)
                    .and_modify(|p| p.1 = now);
            }
        }
        let rep = self.reports.lock().unwrap();
        if let Some(c) = rep.corrupt.first() {
            let msg = format!("an engine read wrong bytes: {c}");
            drop(rep);
            self.fail(&msg);
        }
        // Not wrong bytes (the API said so, and the engine takes it as a
        // miss), but a pinned block is never evicted or reused: a block that
        // changed under its pin means a pin was lost.
        if let Some(first) = rep.invalid.first() {
            let msg = format!(
                "{} pinned blocks were no longer valid when loaded: pins were lost; first: {first}",
                rep.invalid.len()
            );
            drop(rep);
            self.fail(&msg);
        }
        if let Some(o) = rep.odd.first() {
            let msg = format!("unexpected engine output: {o}");
            drop(rep);
            self.fail(&msg);
        }
        let stalled = self.engines.iter().find(|e| {
            e.stopped_until.is_none()
                && rep
                    .progress
                    .get(&e.no)
                    .is_some_and(|&(_, t)| now.duration_since(t) > STALL)
        });
        if let Some(e) = stalled {
            let msg = format!(
                "engine {} (pid {}, {}) made no progress for {STALL:?}: a hang; its stderr:\n{}",
                e.no,
                e.pid(),
                e.role,
                e.stderr_text()
            );
            drop(rep);
            self.fail(&msg);
        }
        drop(rep);
        let mut exited = None;
        for e in &mut self.engines {
            if let Ok(Some(status)) = e.child.try_wait() {
                exited = Some((e.no, e.role.clone(), status, e.stderr_text()));
                break;
            }
        }
        if let Some((no, role, status, stderr)) = exited {
            // Let its reader take in a last CORRUPT line first.
            std::thread::sleep(Duration::from_millis(100));
            let corrupt = self.reports.lock().unwrap().corrupt.first().cloned();
            self.fail(&format!(
                "engine {no} ({role}) exited by itself: {status}; {corrupt:?}; stderr:\n{stderr}"
            ));
        }
    }

    /// Every engine and the owner run again; engines exit once their stdin
    /// closes (pins released, goodbye sent).
    fn stop_engines(&mut self) {
        if self.owner_stopped_until.take().is_some() {
            signal(self.owner.pid() as i32, libc::SIGCONT);
        }
        for e in &mut self.engines {
            if e.stopped_until.take().is_some() {
                signal(e.pid(), libc::SIGCONT);
            }
            drop(e.stdin.take());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..self.engines.len() {
            let status = loop {
                match self.engines[i].child.try_wait() {
                    Ok(Some(s)) => break s,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let e = &self.engines[i];
                        self.fail(&format!(
                            "engine {} (pid {}, {}) did not stop within 30 s of being asked: a hang; stderr:\n{}",
                            e.no,
                            e.pid(),
                            e.role,
                            e.stderr_text()
                        ));
                    }
                }
            };
            if let Some(r) = self.engines[i].reader.take() {
                let _ = r.join();
            }
            if !status.success() {
                let e = &self.engines[i];
                let corrupt = self.reports.lock().unwrap().corrupt.first().cloned();
                self.fail(&format!(
                    "engine {} ({}) ended with {status} when asked to stop; {corrupt:?}; stderr:\n{}",
                    e.no,
                    e.role,
                    e.stderr_text()
                ));
            }
        }
        self.engines.clear();
    }

    /// The client table is empty and nothing is held: no pins, no writing
    /// slots, no stash entries, no index entry pointing astray.
    fn audit_empty(&self, when: &str) -> Audit {
        let ctl = self.owner.control();
        let clean = |a: &Audit| {
            a.clients.is_empty()
                && a.pins.is_empty()
                && a.writing.is_empty()
                && a.evicting == 0
                && a.bad_index_entries == 0
                && a.committed == a.index_entries
        };
        if !eventually(Duration::from_secs(10), || clean(&Audit::read(&ctl))) {
            let a = Audit::read(&ctl);
            self.fail(&format!(
                "{when}: the segment still holds something (clients are (index, state, pid, stash)): {a:?}"
            ));
        }
        Audit::read(&ctl)
    }
}

/// Every key of every namespace, looked up one by one: those that hit must
/// load byte-exact (and valid: nothing else releases this engine's pins),
/// and (`exact`: the pool evicts nothing) every key an engine saw committed
/// in this segment must hit. Returns (keys verified, keys known committed
/// here).
fn verify_keys(chaos: &Chaos, e: &Engine, segment: u64, exact: bool) -> (u64, u64) {
    let known: HashSet<(u64, u64)> = chaos
        .reports
        .lock()
        .unwrap()
        .committed
        .get(&segment)
        .cloned()
        .unwrap_or_default();
    let mut verified = 0;
    let mut lost = Vec::new();
    for sp in SPACES {
        for i in 0..KEYS {
            let key = BlockKey::new(sp.ns, hash_of(KEY_SEED, i));
            let p = e.lookup(sp.ns, &[key.hash]);
            if p.is_empty() {
                if known.contains(&(sp.ns, i)) {
                    lost.push((sp.ns, i));
                }
                continue;
            }
            let mut result = None;
            e.load_checked(&p, |_, data, ok| {
                result = Some((ok, block_ok(&key, sp.slot_bytes, data), data.len()))
            });
            match result {
                Some((true, true, _)) => verified += 1,
                other => chaos.fail(&format!(
                    "key {i} of namespace {:#x} hits but does not load byte-exact: (valid, exact, len) = {other:?}",
                    sp.ns
                )),
            }
        }
    }
    if exact && !lost.is_empty() {
        chaos.fail(&format!(
            "{} keys seen committed in segment {segment:x} are gone (nothing is evicted in this pool): {:x?}",
            lost.len(),
            &lost[..lost.len().min(20)]
        ));
    }
    (verified, known.len() as u64)
}

/// WARN and ERROR lines of the owner log, counted by message (numbers
/// masked), each with its first line.
fn owner_warnings(log: &str) -> BTreeMap<String, (u64, String)> {
    let mut out: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for line in log.lines() {
        let Some(rest) = line
            .split_once(" WARN ")
            .or(line.split_once(" ERROR "))
            .map(|(_, r)| r)
        else {
            continue;
        };
        let msg = rest.split_once(": ").map_or(rest, |(_, m)| m);
        // Fields follow the message as ` key=value`.
        let msg = match msg.split_once('=') {
            Some((m, _)) => m.rsplit_once(' ').map_or(m, |(m, _)| m),
            None => msg,
        };
        let msg: String = msg
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .collect();
        let e = out.entry(msg).or_insert_with(|| (0, line.to_string()));
        e.0 += 1;
    }
    out
}

/// The sum of one counter over every engine's last status line.
fn total(reports: &Reports, key: &str) -> u64 {
    reports
        .status
        .values()
        .map(|m| m.get(key).copied().unwrap_or(0))
        .sum()
}

#[test]
fn chaos_keeps_every_committed_block_byte_exact() {
    let secs = env_u64("PEGAFLOW_CHAOS_SECS").unwrap_or(120);
    let seed = env_u64("PEGAFLOW_CHAOS_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        (t.as_nanos() as u64 ^ u64::from(std::process::id())) | 1
    });
    let always_tight = env_u64("PEGAFLOW_CHAOS_PRESSURE").unwrap_or(0) != 0;
    eprintln!("chaos: seed {seed} ({secs} s; replay with PEGAFLOW_CHAOS_SEED={seed})");
    let pool = if always_tight { POOL_TIGHT } else { POOL };
    let owner = OwnerProc::start_with(
        "chaos",
        &[
            "--pool-size",
            pool,
            "--slab-size",
            "2mb",
            "--min-slot-size",
            "64kb",
        ],
    );
    let mut chaos = Chaos {
        seed,
        rng: Rng(seed),
        owner,
        owner_stopped_until: None,
        engines: Vec::new(),
        reports: Arc::default(),
        segments: Vec::new(),
        counts: Counts::default(),
        logs: tempfile::tempdir().expect("tempdir"),
        bin: PathBuf::from(env!("CARGO_BIN_EXE_pf-engine")),
        always_tight,
        tight: always_tight,
        tight_segments: u64::from(always_tight),
        started: Instant::now(),
        first_midway_error: None,
        verifier: None,
        eras_checked: 0,
        era_keys_checked: 0,
    };
    let first = chaos.segment_now();
    chaos.segments.push(first);
    match Engine::connect(chaos.owner.engine_config(0, 0)) {
        Ok(e) => chaos.verifier = Some(e),
        Err(err) => chaos.fail(&format!("the verifying engine cannot connect: {err}")),
    }
    for _ in 0..ENGINES_START {
        chaos.spawn_engine();
    }

    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut next = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        chaos.watch();
        if Instant::now() >= next {
            chaos.act();
            next = Instant::now() + Duration::from_millis(chaos.rng.between(150, 700));
        }
    }
    let chaos_time = chaos.started.elapsed();

    chaos.stop_engines();
    // The engines' last words: no corruption, no lost pin.
    chaos.watch();
    let segment = chaos.segment_now();
    assert_eq!(Some(&segment), chaos.segments.last());
    chaos.verifier = None;
    chaos.audit_empty("after the engines exited");
    let e = match Engine::connect(chaos.owner.engine_config(0, 0)) {
        Ok(e) => e,
        Err(err) => chaos.fail(&format!("the verifying engine cannot connect: {err}")),
    };
    if !e.wait_connected(Duration::from_secs(10)) || e.segment_id() != segment {
        chaos.fail("the verifying engine is not connected to the final segment");
    }
    let (verified, known) = verify_keys(&chaos, &e, segment, !chaos.tight);
    drop(e);
    let audit = chaos.audit_empty("after the verifying engine left");
    let (code, text) = chaos.inspect_verify();
    if code != Some(0) {
        chaos.fail(&format!("pegaflow-inspect verify is not clean:\n{text}"));
    }
    chaos.keep_log();
    let status = chaos.owner.terminate();
    if !status.is_some_and(|s| s.success()) {
        chaos.fail(&format!(
            "the owner exited with {status:?} on SIGTERM at the end"
        ));
    }

    let rep = chaos.reports.lock().unwrap();
    let c = &chaos.counts;
    println!(
        "chaos summary (seed {seed}{}): {:.0} s of chaos, {:.0} s in all\n\
         \x20 engines: {} started, {} SIGKILLed, {} SIGSTOPped\n\
         \x20 owner: {} SIGSTOPs, {} SIGKILL restarts, {} SIGTERM restarts, {} discarding restarts ({} segments, {} of them with the tight pool)\n\
         \x20 engine operations: {} ({} saves: {} blocks committed, {} reserved and left uncommitted, {} reservations dropped; \
         {} lookups: {} blocks hit, {} loaded byte-exact, {} invalid at load (misses); {} lookups held pinned)\n\
         \x20 wrong bytes read: {}\n\
         \x20 final segment ({} pool): {} keys verified byte-exact, {} seen committed by engines{}, {} committed blocks\n\
         \x20 discarded segments checked just before their discard: {} ({} keys byte-exact; in roomy pools every key seen committed present)\n\
         \x20 inspect verify mid-run: {} runs, {} with findings",
        if always_tight { ", every pool tight" } else { "" },
        chaos_time.as_secs_f64(),
        chaos.started.elapsed().as_secs_f64(),
        c.engines_spawned,
        c.engine_kills,
        c.engine_stops,
        c.owner_stops,
        c.owner_kills,
        c.owner_terms,
        c.discards,
        chaos.segments.len(),
        chaos.tight_segments,
        total(&rep, "ops"),
        total(&rep, "saves"),
        total(&rep, "saved_blocks"),
        total(&rep, "uncommitted_blocks"),
        total(&rep, "dropped_reservations"),
        total(&rep, "lookups"),
        total(&rep, "hit_blocks"),
        total(&rep, "verified_blocks"),
        total(&rep, "invalid_blocks"),
        total(&rep, "holds"),
        rep.corrupt.len(),
        if chaos.tight { "tight" } else { "roomy" },
        verified,
        known,
        if chaos.tight { " (evicted ones may be gone)" } else { " (all present)" },
        audit.committed,
        chaos.eras_checked,
        chaos.era_keys_checked,
        c.verifies_midway,
        c.verify_midway_errors,
    );
    for (msg, (n, first)) in owner_warnings(&chaos.owner.log_text()) {
        println!("  owner log: {n} x \"{msg}\", first: {first}");
    }
    if let Some(t) = &chaos.first_midway_error {
        println!("first mid-run verify finding:\n{t}");
    }
    // The final segment may hold nothing when the last owner restart
    // discarded its pool shortly before the end; the discarded segments were
    // checked just before their discard.
    assert!(
        total(&rep, "verified_blocks") > 0 && verified + chaos.era_keys_checked > 0,
        "the chaos run verified nothing"
    );
}
