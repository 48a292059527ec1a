//! The SSD tier end to end: a real owner process with `--ssd-cache-path`
//! on this machine's disk, real engines, real SIGKILLs.
//!
//! Blocks are 256 KiB in an 8 MiB pool (32 slots), so a few dozen blocks
//! push the pool into the tier. `--disable-lfu-admission` admits every
//! block to the disk (TinyLFU writes only blocks seen at least twice).
//! Everything that reaches the pool from disk is checked byte for byte.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pegaflow_core::{BlockKey, Engine};
use pegaflow_tests::{check_block, eventually, fill_block, keys, owner_bin, OwnerProc};

const BS: usize = 256 << 10;
const NS: u64 = 0x55d0_0001;

/// A directory on the real disk (not tmpfs: O_DIRECT), beside the target dir.
fn disk_dir() -> tempfile::TempDir {
    let base = std::env::var_os("PEGAFLOW_SSD_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("current_exe");
            exe.ancestors()
                .nth(3)
                .expect("target dir")
                .join("ssd-tests")
        });
    std::fs::create_dir_all(&base).expect("ssd test dir");
    tempfile::tempdir_in(base).expect("tempdir")
}

fn ssd_owner(tag: &str, dir: &Path, extra: &[&str]) -> OwnerProc {
    ssd_owner_cap(tag, dir, "64mb", extra)
}

fn ssd_owner_cap(tag: &str, dir: &Path, capacity: &str, extra: &[&str]) -> OwnerProc {
    let mut args = vec!["--disable-lfu-admission"];
    args.extend_from_slice(extra);
    tier_owner(tag, dir, ("8mb", "64kb"), (capacity, "8mb"), &args)
}

/// An owner with a pool of `pool.0` (2 MiB slabs, slots of at least
/// `pool.1`) and the tier in `dir` (capacity, segment size).
fn tier_owner(
    tag: &str,
    dir: &Path,
    pool: (&str, &str),
    tier: (&str, &str),
    extra: &[&str],
) -> OwnerProc {
    let d = dir.display().to_string();
    let mut args = vec![
        "--pool-size",
        pool.0,
        "--slab-size",
        "2mb",
        "--min-slot-size",
        pool.1,
        "--ssd-cache-path",
        &d,
        "--ssd-cache-capacity",
        tier.0,
        "--ssd-segment-size",
        tier.1,
    ];
    args.extend_from_slice(extra);
    OwnerProc::start_with(tag, &args)
}

/// Offsets of the records a segment file holds (headers that say so).
fn records(file: &Path) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    let Ok(f) = std::fs::File::open(file) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut off = 4096u64;
    let mut h = vec![0u8; 4096];
    while f.read_exact_at(&mut h, off).is_ok() && &h[..8] == b"PFBLOCK1" {
        out.push(off);
        off += 4096 + BS as u64;
    }
    out
}

fn engine(o: &OwnerProc) -> Engine {
    let e = Engine::connect(o.engine_config(NS, BS as u64)).expect("connect");
    assert!(e.wait_connected(Duration::from_secs(5)));
    e
}

fn hashes(ks: &[BlockKey]) -> Vec<[u8; 32]> {
    ks.iter().map(|k| k.hash).collect()
}

fn save(e: &Engine, ks: &[BlockKey]) -> usize {
    e.save_with(ks, |i, buf| {
        fill_block(&ks[i], &mut buf[..BS]);
        BS
    })
}

/// Save in batches small enough for the write queue, waiting for each to
/// reach the disk (write-behind), so nothing is dropped for a full queue.
fn save_to_ssd(e: &Engine, ks: &[BlockKey]) {
    for chunk in ks.chunks(6) {
        assert_eq!(save(e, chunk), chunk.len(), "saves dropped");
        let h = hashes(chunk);
        assert!(
            eventually(Duration::from_secs(10), || e.ssd_hits(NS, &h) == h.len()),
            "blocks never reached the SSD tier"
        );
    }
}

/// Stage `ks` back and load them; returns how many were loaded byte-exact
/// (panics on a block with wrong bytes).
fn stage_and_load(e: &Engine, ks: &[BlockKey]) -> usize {
    let h = hashes(ks);
    let t = e.stage(NS, &h);
    assert!(
        eventually(Duration::from_secs(10), || e.stage_settled(&t)),
        "stage never settled"
    );
    let mut good = 0;
    for (k, hash) in ks.iter().zip(&h) {
        let p = e.lookup(NS, std::slice::from_ref(hash));
        e.load_with(&p, |_, data| {
            assert_eq!(data.len(), BS);
            assert!(check_block(k, data), "wrong bytes for a staged block");
            good += 1;
        });
    }
    good
}

fn seg_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pfs"))
        .collect();
    v.sort();
    v
}

fn remove_shm(o: &OwnerProc) {
    let _ = std::fs::remove_file(o.control());
    let _ = std::fs::remove_file(pegaflow_shm::segment::pool_path(
        &o.name,
        &pegaflow_shm::segment::PoolBacking::Shm,
    ));
}

#[test]
fn round_trip_restart_and_reboot_byte_exact() {
    let dir = disk_dir();
    let mut o = ssd_owner("ssd-rt", dir.path(), &[]);
    let e = engine(&o);
    let first = keys(NS, 1, 0, 24);
    save_to_ssd(&e, &first);
    // 48 more blocks push the first ones out of the 32-slot pool.
    let more = keys(NS, 1, 100, 48);
    save(&e, &more[..24]);
    save(&e, &more[24..]);
    let h = hashes(&first);
    assert!(
        e.count_hits(NS, &h) < first.len(),
        "the pool should have evicted some of the first blocks"
    );
    assert_eq!(e.ssd_hits(NS, &h), first.len());
    assert_eq!(
        stage_and_load(&e, &first[..12]),
        12,
        "staged blocks must hit"
    );

    // Owner restart (SIGKILL), segments kept: the SSD index comes back.
    o.kill9();
    o.spawn();
    assert!(e.wait_connected(Duration::from_secs(5)));
    assert!(
        eventually(Duration::from_secs(10), || e.ssd_hits(NS, &h) == h.len()),
        "SSD blocks not recovered after an owner restart"
    );
    assert_eq!(stage_and_load(&e, &first), first.len());

    // Reboot: /dev/shm emptied, the disk kept.
    o.kill9();
    remove_shm(&o);
    o.spawn();
    assert!(e.wait_connected(Duration::from_secs(5)));
    assert!(
        eventually(Duration::from_secs(10), || e.ssd_hits(NS, &h) == h.len()),
        "SSD blocks not recovered after a reboot; log:\n{}",
        o.log_text()
    );
    assert_eq!(e.count_hits(NS, &h), 0, "the pool is new after a reboot");
    assert_eq!(stage_and_load(&e, &first), first.len());
    // The line comes once the scan's last event was applied, which can be
    // after its blocks were already announced (and staged).
    assert!(eventually(Duration::from_secs(10), || o
        .log_text()
        .contains("SSD index recovered")));
}

#[test]
fn sigkill_mid_write_drops_torn_records_keeps_the_rest() {
    let dir = disk_dir();
    let mut o = ssd_owner("ssd-kill", dir.path(), &["--ssd-write-queue-depth", "16"]);
    let cfg = o.engine_config(NS, BS as u64);
    // A writer process of our own: blocks stream through the pool to disk.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let e = Engine::connect(cfg).unwrap();
            e.wait_connected(Duration::from_secs(5));
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 4000 {
                save(&e, &keys(NS, 2, i, 8));
                i += 8;
            }
            i
        })
    };
    let e = engine(&o);
    let probe = hashes(&keys(NS, 2, 0, 8));
    assert!(eventually(Duration::from_secs(10), || e
        .ssd_hits(NS, &probe)
        > 0));
    std::thread::sleep(Duration::from_millis(150));
    // Kill while the newest segment holds records (not right after it was
    // opened), so there is an unsealed record to tear below.
    // Kill while the newest segment holds records and is far from full
    // (about 30 fit), so it is still the one being written at the kill.
    let mut newest = PathBuf::new();
    assert!(eventually(Duration::from_secs(10), || {
        let files = seg_files(dir.path());
        match files.last() {
            Some(f) if (2..20).contains(&records(f).len()) => {
                newest = f.clone();
                true
            }
            _ => false,
        }
    }));
    o.kill9(); // mid-stream: writes in flight
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let saved = w.join().unwrap();
    // Make sure at least one torn record exists: cut the payload of the
    // newest (unsealed) segment's last record short, as a crash would.
    let tear_at = {
        use std::os::unix::fs::FileExt;
        let at = *records(&newest)
            .last()
            .expect("a record in the newest segment");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&newest)
            .unwrap()
            .write_all_at(&vec![0xEEu8; 8192], at + 4096 + 100_000)
            .unwrap();
        at
    };
    remove_shm(&o);
    o.spawn();
    assert!(e.wait_connected(Duration::from_secs(5)));
    assert!(
        eventually(Duration::from_secs(10), || o
            .log_text()
            .contains("SSD index recovered")),
        "recovery did not finish; log:\n{}",
        o.log_text()
    );
    let log = o.log_text();
    assert!(
        log.contains("torn") && !log.contains("torn_dropped=0"),
        "the torn record was not dropped (tore {} at {tear_at}); log:\n{log}",
        newest.display()
    );
    // Every block the tier still announces stages back byte-exact.
    let all = keys(NS, 2, 0, saved);
    let on_ssd: Vec<BlockKey> = all
        .iter()
        .filter(|k| e.ssd_hits(NS, &[k.hash]) == 1)
        .copied()
        .collect();
    assert!(!on_ssd.is_empty());
    let mut loaded = 0;
    // Chunks well inside the 32-slot pool (the engine's stash holds some):
    // a stage must not evict the blocks it just staged.
    for chunk in on_ssd.chunks(8) {
        loaded += stage_and_load(&e, chunk);
    }
    assert_eq!(loaded, on_ssd.len(), "an announced block did not stage");
}

#[test]
fn flipped_bytes_on_disk_are_detected_and_never_loaded() {
    let dir = disk_dir();
    let mut o = ssd_owner("ssd-flip", dir.path(), &[]);
    let e = engine(&o);
    let ks = keys(NS, 3, 0, 30);
    save_to_ssd(&e, &ks);
    o.terminate(); // clean stop: segments sealed
                   // Flip bytes in the payload of the first record of the oldest segment.
    let files = seg_files(dir.path());
    let victim = {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&files[0])
            .unwrap();
        let mut h = vec![0u8; 4096];
        f.read_exact_at(&mut h, 0).unwrap();
        assert_eq!(
            &h[12..16],
            &1u32.to_le_bytes(),
            "segment not sealed on a clean stop"
        );
        f.read_exact_at(&mut h, 4096).unwrap();
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&h[16..48]);
        let mut b = vec![0u8; 4096];
        f.read_exact_at(&mut b, 8192 + 4096).unwrap();
        b[7] ^= 0x40;
        f.write_all_at(&b, 8192 + 4096).unwrap();
        BlockKey::new(NS, hash)
    };
    remove_shm(&o);
    o.spawn();
    assert!(e.wait_connected(Duration::from_secs(5)));
    let h = hashes(&ks);
    assert!(eventually(Duration::from_secs(10), || e.ssd_hits(NS, &h) == h.len()));
    let t = e.stage(NS, &[victim.hash]);
    assert!(eventually(Duration::from_secs(10), || e.stage_settled(&t)));
    assert_eq!(
        e.count_hits(NS, &[victim.hash]),
        0,
        "a corrupt block reached the pool"
    );
    assert!(
        o.log_text().contains("does not match its checksum"),
        "checksum failure not reported; log:\n{}",
        o.log_text()
    );
    assert_eq!(
        e.ssd_hits(NS, &[victim.hash]),
        0,
        "a corrupt record stays announced"
    );
    let rest: Vec<BlockKey> = ks.iter().filter(|k| **k != victim).copied().collect();
    assert_eq!(stage_and_load(&e, &rest[..20]), 20);
}

#[test]
fn capacity_is_respected_and_the_oldest_segments_are_evicted() {
    let dir = disk_dir();
    let o = ssd_owner_cap("ssd-cap", dir.path(), "32mb", &[]);
    let e = engine(&o);
    // 3x the tier's capacity.
    let ks = keys(NS, 4, 0, 3 * 32 * 4);
    for chunk in ks.chunks(24) {
        save_to_ssd(&e, chunk);
        let bytes: u64 = seg_files(dir.path())
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum();
        assert!(bytes <= 32 << 20, "{bytes} bytes on disk for a 32 MiB tier");
    }
    let h = hashes(&ks);
    assert_eq!(
        e.ssd_hits(NS, &h[..24]),
        0,
        "the oldest blocks must be evicted"
    );
    let tail = &h[h.len() - 24..];
    assert_eq!(e.ssd_hits(NS, tail), 24, "the newest blocks must be kept");
    assert_eq!(stage_and_load(&e, &ks[ks.len() - 12..]), 12);
}

#[test]
fn unwritable_path_is_a_clear_start_error() {
    let dir = disk_dir();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let bad = file.join("ssd");
    let sock = dir.path().join("s.sock");
    let name = pegaflow_tests::unique_name("ssd-bad");
    let out = Command::new(owner_bin())
        .args([
            "--name",
            &name,
            "--metrics-addr",
            "",
            "--pool-size",
            "8mb",
            "--slab-size",
            "2mb",
        ])
        .arg("--socket")
        .arg(&sock)
        .arg("--ssd-cache-path")
        .arg(&bad)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(pegaflow_shm::segment::control_path(&name));
    let _ = std::fs::remove_file(pegaflow_shm::segment::lock_path(&name));
    let _ = std::fs::remove_file(pegaflow_shm::segment::pool_path(
        &name,
        &pegaflow_shm::segment::PoolBacking::Shm,
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--ssd-cache-path") && err.contains("write access"),
        "unclear error: {err}"
    );
}

struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Mount `fstype` at a new directory under `dir` (root only); `None` with a
/// message when that is not possible here.
fn mount(dir: &Path, fstype: &str, opts: &str) -> Option<(PathBuf, Unmount)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a {fstype} needs root");
        return None;
    }
    let mnt = dir.join(fstype);
    std::fs::create_dir(&mnt).unwrap();
    let mut c = Command::new("mount");
    c.args(["-t", fstype]);
    if !opts.is_empty() {
        c.args(["-o", opts]);
    }
    let ok = c
        .arg("pf-ssd-test")
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: cannot mount a {fstype} here");
        return None;
    }
    Some((mnt.clone(), Unmount(mnt)))
}

/// ramfs refuses O_DIRECT: the tier falls back to buffered I/O with a
/// warning, and works. (tmpfs takes O_DIRECT since Linux 6.6.)
#[test]
fn a_path_without_o_direct_falls_back_to_buffered_io() {
    let dir = disk_dir();
    let Some((mnt, _u)) = mount(dir.path(), "ramfs", "") else {
        return;
    };
    let o = ssd_owner("ssd-ramfs", &mnt, &[]);
    let log = o.log_text();
    assert!(
        log.contains("does not support O_DIRECT"),
        "no fallback warning:\n{log}"
    );
    let e = engine(&o);
    let ks = keys(NS, 6, 0, 12);
    save_to_ssd(&e, &ks);
    save(&e, &keys(NS, 6, 100, 40));
    assert_eq!(stage_and_load(&e, &ks), ks.len());
}

/// A small tmpfs that fills up under the tier. Needs root to mount.
#[test]
fn a_full_disk_degrades_without_stopping_the_owner() {
    let dir = disk_dir();
    let Some((mnt, _u)) = mount(dir.path(), "tmpfs", "size=24m") else {
        return;
    };
    let o = ssd_owner_cap("ssd-full", &mnt, "512gb", &[]);
    let log = o.log_text();
    assert!(
        log.contains("can hold only"),
        "capacity not clamped:\n{log}"
    );
    let e = engine(&o);
    save_to_ssd(&e, &keys(NS, 5, 0, 12));
    // Fill the filesystem behind the tier's back.
    let _ = std::fs::write(mnt.join("filler"), vec![1u8; 24 << 20]);
    let more = keys(NS, 5, 100, 200);
    for chunk in more.chunks(8) {
        save(&e, chunk);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        eventually(Duration::from_secs(10), || o
            .log_text()
            .contains("filesystem full")),
        "a full disk was not reported:\n{}",
        o.log_text()
    );
    // The owner still serves: the pool works, nothing crashed.
    let fresh = keys(NS, 5, 1000, 4);
    assert_eq!(save(&e, &fresh), 4);
    // Commits are published by the owner's loop, a moment later.
    assert!(eventually(Duration::from_secs(5), || e
        .count_hits(NS, &hashes(&fresh))
        == 4));
}

/// Every saved block is in the pool or on SSD (checked one by one).
fn kept_somewhere(e: &Engine, ks: &[BlockKey]) -> usize {
    hashes(ks)
        .iter()
        .filter(|h| {
            let one = std::slice::from_ref(*h);
            e.count_hits(NS, one) + e.ssd_hits(NS, one) > 0
        })
        .count()
}

#[test]
fn a_burst_of_evictions_is_queued_for_the_disk_not_dropped() {
    // One block on the device at a time: the blocks that a burst of saves
    // pushes out of the 32-slot pool wait in the write backlog (one 64 MiB
    // batch here) instead of being dropped for a full queue.
    let dir = disk_dir();
    let o = ssd_owner("ssd-burst", dir.path(), &["--ssd-write-queue-depth", "1"]);
    let e = engine(&o);
    let ks = keys(NS, 6, 0, 96);
    for chunk in ks.chunks(16) {
        assert_eq!(save(&e, chunk), chunk.len(), "saves dropped");
    }
    assert!(
        eventually(Duration::from_secs(20), || kept_somewhere(&e, &ks)
            == ks.len()),
        "{} of {} blocks kept in the pool or on SSD after a burst; owner log:\n{}",
        kept_somewhere(&e, &ks),
        ks.len(),
        o.log_text()
    );
    assert_eq!(stage_and_load(&e, &ks[..12]), 12);
}

#[test]
fn a_block_the_pools_admission_refuses_still_reaches_the_disk() {
    // TinyLFU on (the default): a full pool of blocks seen twice refuses a
    // block seen twice (a tie), but the SSD admits it (seen twice), so a
    // working set larger than the pool still reaches the tier.
    let dir = disk_dir();
    let o = tier_owner(
        "ssd-admit",
        dir.path(),
        ("8mb", "64kb"),
        ("64mb", "8mb"),
        &[],
    );
    let e = engine(&o);
    let resident = keys(NS, 7, 0, 32);
    for _ in 0..2 {
        save(&e, &resident);
    }
    let newcomers = keys(NS, 8, 0, 8);
    for _ in 0..2 {
        save(&e, &newcomers);
    }
    assert!(
        eventually(Duration::from_secs(10), || kept_somewhere(&e, &newcomers)
            == newcomers.len()),
        "{} of {} twice-saved blocks kept in the pool or on SSD; owner log:\n{}",
        kept_somewhere(&e, &newcomers),
        newcomers.len(),
        o.log_text()
    );
    let once = keys(NS, 9, 0, 8);
    save(&e, &once);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        e.ssd_hits(NS, &hashes(&once)[..1]),
        0,
        "a block seen once must not be written to SSD (TinyLFU admission)"
    );
}

#[test]
fn a_full_pool_keeps_room_for_the_next_request() {
    // A pool of 64 x 2 MiB, full, with the SSD tier behind it. The engine's
    // stash holds 16 free slots; each new request saves 32 blocks, so 16
    // need evictions (and copies to the tier), more than the connector's
    // short reservation wait covers: a full pool dropped much of every save
    // larger than the stash (on the H200, most of a 10K-token request).
    // The connector now announces a step's saves when the step starts
    // (`prepare_reserve`), and the owner fills the stash during the
    // forward pass.
    const BIG: usize = 2 << 20;
    let dir = disk_dir();
    let o = tier_owner(
        "ssd-room",
        dir.path(),
        ("128mb", "2mb"),
        ("512mb", "64mb"),
        &["--disable-lfu-admission"],
    );
    let mut cfg = o.engine_config(NS, BIG as u64);
    // The connector's default (2 ms) would still be tight on a loaded CI
    // machine for the owner's wake-up; 1 ms is far below 16 evictions.
    cfg.reserve_wait = Duration::from_millis(1);
    let e = Engine::connect(cfg).expect("connect");
    assert!(e.wait_connected(Duration::from_secs(5)));
    let save_big = |ks: &[BlockKey]| {
        e.save_with(ks, |i, buf| {
            fill_block(&ks[i], &mut buf[..BIG]);
            BIG
        })
    };
    let (mut asked, mut saved) = (0, 0);
    for r in 0..14u64 {
        let ks = keys(NS, 20 + r, 0, 32);
        e.prepare_reserve(ks.len());
        // The forward pass (a 10K-token prefill is ~0.5 s on an H200).
        std::thread::sleep(Duration::from_millis(30));
        let n = save_big(&ks);
        if r >= 6 {
            // The pool is full from the third request on.
            asked += ks.len();
            saved += n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        saved * 10 >= asked * 9,
        "a full pool dropped {} of {asked} blocks saved by the last 8 requests; owner log:\n{}",
        asked - saved,
        o.log_text()
    );
}
