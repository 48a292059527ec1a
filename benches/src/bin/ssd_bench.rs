//! SSD tier benchmark: the device's raw io_uring `O_DIRECT` ceiling and the
//! tier's write, stage and recovery speed on the same device, in one run.
//!
//! ```text
//! ssd_bench --dir /path/on/ssd [--raw-gib 4] [--blocks 625] [--reps 10]
//!           [--owner-bin target/release/pegaflow-owner]
//! ```
//!
//! 1. raw: 2 MiB `O_DIRECT` writes, then reads, of `--raw-gib` GiB through
//!    one io_uring, at queue depths 1..32 (the best is the ceiling);
//! 2. tier writes: an engine saves `--blocks` 2 MiB blocks into a real
//!    owner's pool; the time until every one is on SSD (write-behind);
//!    then the tier alone: the owner restarted over the same pool with the
//!    tier emptied writes them all while nothing else runs;
//! 3. recovery and staging, `--reps` times: SIGKILL the owner, delete its
//!    shm segments (a reboot), restart it, time the background recovery,
//!    then stage all blocks (one 10K-token Llama-8B request: 625 x 2 MiB)
//!    and time until the pool holds them; every block is verified.
//!
//! Prints a table and one JSON line. No Rust toolchain needed where it
//! runs: carry this binary and `pegaflow-owner`.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use pegaflow_core::{BlockKey, Engine, EngineConfig};

const BLOCK: usize = 2 << 20;
const NS: u64 = 0xB5D0_0001;

struct Args {
    dir: PathBuf,
    raw_gib: u64,
    blocks: usize,
    reps: usize,
    owner: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        dir: PathBuf::from("."),
        raw_gib: 4,
        blocks: 625,
        reps: 10,
        owner: std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("pegaflow-owner")))
            .unwrap_or_else(|| "pegaflow-owner".into()),
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let val = v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--dir" => a.dir = val.into(),
            "--raw-gib" => a.raw_gib = val.parse().expect("--raw-gib N"),
            "--blocks" => a.blocks = val.parse().expect("--blocks N"),
            "--reps" => a.reps = val.parse().expect("--reps N"),
            "--owner-bin" => a.owner = val.into(),
            other => {
                eprintln!("unknown argument {other}; see the top of benches/src/bin/ssd_bench.rs");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    if let Some(p) = std::env::var_os("PEGAFLOW_OWNER_BIN") {
        a.owner = p.into();
    }
    a
}

struct Aligned(*mut u8, usize);
impl Aligned {
    fn new(len: usize) -> Aligned {
        let l = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(l) };
        assert!(!p.is_null());
        Aligned(p, len)
    }
}
impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe {
            std::alloc::dealloc(
                self.0,
                std::alloc::Layout::from_size_align(self.1, 4096).unwrap(),
            )
        }
    }
}

/// GB/s of `total` bytes moved in 2 MiB ops at queue depth `qd`.
fn raw(path: &Path, total: u64, qd: usize, write: bool) -> f64 {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("open with O_DIRECT (is --dir on a filesystem that supports it?)");
    let mut ring = IoUring::new(64).unwrap();
    let bufs: Vec<Aligned> = (0..qd).map(|_| Aligned::new(BLOCK)).collect();
    let n = (total / BLOCK as u64) as usize;
    let (mut next, mut done, mut inflight) = (0usize, 0usize, 0usize);
    let mut free: Vec<usize> = (0..qd).collect();
    let t = Instant::now();
    while done < n {
        while inflight < qd && next < n {
            let b = free.pop().unwrap();
            let off = (next * BLOCK) as u64;
            let e = if write {
                opcode::Write::new(types::Fd(f.as_raw_fd()), bufs[b].0, BLOCK as u32)
                    .offset(off)
                    .build()
            } else {
                opcode::Read::new(types::Fd(f.as_raw_fd()), bufs[b].0, BLOCK as u32)
                    .offset(off)
                    .build()
            };
            // SAFETY: buffer b is not reused until its completion is reaped.
            unsafe { ring.submission().push(&e.user_data(b as u64)).unwrap() };
            next += 1;
            inflight += 1;
        }
        ring.submit_and_wait(1).unwrap();
        let cq: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (b, r) in cq {
            assert_eq!(r as usize, BLOCK, "raw I/O failed: {r}");
            free.push(b as usize);
            inflight -= 1;
            done += 1;
        }
    }
    total as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn fill(key: &BlockKey, buf: &mut [u8]) {
    let base = xxhash_rust::xxh3::xxh3_64_with_seed(&key.hash, key.namespace);
    for (i, c) in buf.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(base ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes());
    }
}

fn key(i: usize) -> BlockKey {
    let a = xxhash_rust::xxh3::xxh3_128_with_seed(&(i as u64).to_le_bytes(), 77);
    let mut h = [0u8; 32];
    h[..16].copy_from_slice(&a.to_le_bytes());
    h[16..24].copy_from_slice(&(i as u64).to_le_bytes());
    BlockKey::new(NS, h)
}

struct Owner {
    args: Vec<String>,
    bin: PathBuf,
    name: String,
    sock: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Owner {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new(&self.bin)
                .args(&self.args)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn pegaflow-owner (--owner-bin)"),
        );
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.sock).is_err() {
            assert!(t.elapsed() < Duration::from_secs(60), "owner not ready");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    /// A clean stop (SIGTERM): segments sealed, the pool kept.
    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child, not yet waited for.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn wipe_shm(&self) {
        use pegaflow_shm::segment::*;
        let _ = std::fs::remove_file(control_path(&self.name));
        let _ = std::fs::remove_file(pool_path(&self.name, &PoolBacking::Shm));
    }
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.kill();
        self.wipe_shm();
        let _ = std::fs::remove_file(pegaflow_shm::segment::lock_path(&self.name));
    }
}

fn wait(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    true
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let a = args();
    let work = tempfile::tempdir_in(&a.dir).expect("--dir must be a writable directory");
    println!(
        "device of {}: see `df {}` and `lsblk`",
        a.dir.display(),
        a.dir.display()
    );

    // 1. Raw ceiling.
    let rawf = work.path().join("raw.bin");
    let total = a.raw_gib << 30;
    let mut rows = Vec::new();
    for qd in [1, 2, 4, 8, 16, 32] {
        let w = raw(&rawf, total, qd, true);
        let r = raw(&rawf, total, qd, false);
        println!("raw O_DIRECT 2 MiB  qd {qd:>2}: write {w:6.2} GB/s  read {r:6.2} GB/s");
        rows.push((qd, w, r));
    }
    let _ = std::fs::remove_file(&rawf);
    let raw_w = rows.iter().map(|r| r.1).fold(0.0, f64::max);
    let raw_r = rows.iter().map(|r| r.2).fold(0.0, f64::max);

    // 2. Tier writes (write-behind of a pool-resident working set).
    let n = a.blocks;
    let pool_mib = ((n * 2 + 256) / 2 * 2).next_power_of_two().max(512);
    let name = format!("ssdbench-{}", std::process::id());
    let sock = work.path().join("owner.sock");
    let ssd = work.path().join("tier");
    std::fs::create_dir_all(&ssd).unwrap();
    let mut o = Owner {
        args: [
            "--name",
            &name,
            "--metrics-addr",
            "",
            // Prefaulted, as the owner runs by default: a fresh tmpfs pool
            // faulted in 4 KiB pages by the saves (and, after a reboot, by
            // the staged reads) would time the kernel, not the tier.
            "--disable-lfu-admission",
            "--pool-size",
            &format!("{pool_mib}mb"),
            "--slab-size",
            "32mb",
            "--min-slot-size",
            "2mb",
            "--ssd-cache-path",
            &ssd.display().to_string(),
            "--ssd-cache-capacity",
            &format!("{}mb", n * 3 + 512),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(["--socket".to_string(), sock.display().to_string()])
        // Extra owner flags, e.g. PEGAFLOW_BENCH_OWNER_ARGS="--ssd-prefetch-queue-depth 16".
        .chain(
            std::env::var("PEGAFLOW_BENCH_OWNER_ARGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(String::from),
        )
        .collect(),
        bin: a.owner.clone(),
        name: name.clone(),
        sock: sock.clone(),
        log: work.path().join("owner.log"),
        child: None,
    };
    o.spawn();
    let e = Engine::connect(EngineConfig {
        name: name.clone(),
        socket: Some(sock.clone()),
        label: "ssd-bench".into(),
        namespace: NS,
        slot_bytes: BLOCK as u64,
        reconnect_interval: Duration::from_millis(20),
        reserve_wait: Duration::from_secs(1),
    })
    .unwrap();
    assert!(e.wait_connected(Duration::from_secs(10)));
    let keys: Vec<BlockKey> = (0..n).map(key).collect();
    let hashes: Vec<[u8; 32]> = keys.iter().map(|k| k.hash).collect();
    let t = Instant::now();
    for chunk in keys.chunks(64) {
        let saved = e.save_with(chunk, |i, buf| {
            fill(&chunk[i], &mut buf[..BLOCK]);
            BLOCK
        });
        assert_eq!(saved, chunk.len(), "saves dropped: pool too small?");
    }
    let saved_at = t.elapsed();
    assert!(
        wait(Duration::from_secs(600), || e.ssd_hits(NS, &hashes) == n),
        "blocks never reached the tier; owner log:\n{}",
        o.log_text()
    );
    let write_s = t.elapsed().as_secs_f64();
    let tier_w = (n * BLOCK) as f64 / write_s / 1e9;
    println!(
        "tier write-behind: {n} x 2 MiB on SSD in {write_s:.2} s from the first save ({tier_w:.2} GB/s; \
         the saves into the pool took {:.2} s of it, the disk finished {:.2} s after them)",
        saved_at.as_secs_f64(),
        write_s - saved_at.as_secs_f64()
    );
    // Clean stop: segments sealed.
    o.terminate();

    // 2b. The tier's own write speed: the same blocks in the pool (kept by
    // the restart), the tier emptied, so the restarted owner's write-behind
    // writes all of them while nothing else runs.
    let tier_dir = ssd.join(format!("pegaflow-{name}"));
    for f in std::fs::read_dir(&tier_dir).into_iter().flatten().flatten() {
        let _ = std::fs::remove_file(f.path());
    }
    o.spawn();
    let t = Instant::now();
    assert!(e.wait_connected(Duration::from_secs(10)));
    assert!(
        wait(Duration::from_secs(600), || e.ssd_hits(NS, &hashes) == n),
        "write-behind never finished; owner log:\n{}",
        o.log_text()
    );
    let drain_s = t.elapsed().as_secs_f64();
    let drain_w = (n * BLOCK) as f64 / drain_s / 1e9;
    println!(
        "tier write-behind alone (blocks already in the pool, tier empty): {n} x 2 MiB in {drain_s:.2} s = {drain_w:.2} GB/s"
    );
    o.terminate();

    // 3. Reboot, recover, stage; repeated.
    let mut lat = Vec::new();
    let mut rec = Vec::new();
    let mut verified = 0usize;
    for _ in 0..a.reps {
        o.kill();
        o.wipe_shm();
        let t0 = Instant::now();
        o.spawn();
        let ready = t0.elapsed();
        assert!(e.wait_connected(Duration::from_secs(10)));
        assert!(
            wait(Duration::from_secs(120), || e.ssd_hits(NS, &hashes) == n),
            "recovery incomplete; log:\n{}",
            o.log_text()
        );
        rec.push((t0.elapsed() - ready).as_secs_f64());
        assert_eq!(e.count_hits(NS, &hashes), 0);
        let t1 = Instant::now();
        let ticket = e.stage(NS, &hashes);
        assert_eq!(ticket.queued, n);
        assert!(
            wait(Duration::from_secs(120), || e.count_hits(NS, &hashes) == n),
            "staging incomplete; log:\n{}",
            o.log_text()
        );
        lat.push(t1.elapsed().as_secs_f64());
        let p = e.lookup(NS, &hashes);
        let mut want = vec![0u8; BLOCK];
        verified += e.load_with(&p, |i, d| {
            fill(&keys[i], &mut want);
            assert!(d == &want[..], "block {i} differs after staging");
        });
    }
    assert_eq!(verified, n * a.reps);
    let bytes = (n * BLOCK) as f64;
    let (p50, p99) = (pct(&mut lat.clone(), 0.5), pct(&mut lat.clone(), 0.99));
    let stage_gbps = bytes / p50 / 1e9;
    let rec_p50 = pct(&mut rec, 0.5);
    let rec_per_100g = rec_p50 * 100e9 / bytes;
    println!(
        "stage {n} blocks ({:.2} GB): p50 {:.1} ms, p99 {:.1} ms over {} reps = {stage_gbps:.2} GB/s at p50; all {verified} blocks byte-exact",
        bytes / 1e9,
        p50 * 1e3,
        p99 * 1e3,
        a.reps
    );
    println!(
        "recovery after a reboot: {:.1} ms for {:.2} GB of sealed segments = {rec_per_100g:.2} s per 100 GB (header scan)",
        rec_p50 * 1e3,
        bytes / 1e9
    );
    println!(
        "ratios to the raw ceiling: tier write {:.0} % (with the saves) and {:.0} % (alone) of {raw_w:.2} GB/s, stage read {:.0} % of {raw_r:.2} GB/s",
        tier_w / raw_w * 100.0,
        drain_w / raw_w * 100.0,
        stage_gbps / raw_r * 100.0
    );
    println!(
        "{{\"raw_write_gbps\":{raw_w:.3},\"raw_read_gbps\":{raw_r:.3},\"tier_write_gbps\":{tier_w:.3},\"tier_write_alone_gbps\":{drain_w:.3},\"write_alone_ratio\":{:.3},\"stage_gbps_p50\":{stage_gbps:.3},\"stage_ms_p50\":{:.2},\"stage_ms_p99\":{:.2},\"blocks\":{n},\"recovery_s_per_100gb\":{rec_per_100g:.3},\"write_ratio\":{:.3},\"read_ratio\":{:.3},\"verified_blocks\":{verified}}}",
        drain_w / raw_w,
        p50 * 1e3,
        p99 * 1e3,
        tier_w / raw_w,
        stage_gbps / raw_r
    );
}
