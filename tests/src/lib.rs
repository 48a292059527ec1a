//! Helpers shared by the multi-process tests in `tests/tests/`: a real
//! `pegaflow-owner` process with a private name and socket, deterministic
//! block contents, and an audit of the control segment read from outside.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pegaflow_shm::client::client_state;
use pegaflow_shm::segment::{control_path, ControlSegment};
use pegaflow_shm::slot_table::{BlockKey, SlotKind};
use pegaflow_shm::sync::Ordering;

/// `target/<profile>/NAME`, next to the running test binary.
pub fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build it first with `cargo build --workspace --bins` (the README's test command does)",
        path.display()
    );
    path
}

/// The owner binary: `$PEGAFLOW_OWNER_BIN`, else next to the test binary
/// (GPU machines get it carried in, without a cargo target directory).
pub fn owner_bin() -> PathBuf {
    match std::env::var_os("PEGAFLOW_OWNER_BIN") {
        Some(p) => PathBuf::from(p),
        None => target_bin("pegaflow-owner"),
    }
}

/// A unique instance name per test and process.
pub fn unique_name(tag: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("t-{tag}-{}-{n}", std::process::id())
}

/// A running owner; killed (SIGKILL) and its segments removed on drop.
pub struct OwnerProc {
    pub name: String,
    pub socket: PathBuf,
    pub args: Vec<String>,
    pub child: Option<Child>,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl OwnerProc {
    /// Start with a small pool: 32 MiB, 2 MiB slabs, 64 KiB minimum slots.
    pub fn start(tag: &str) -> OwnerProc {
        Self::start_with(
            tag,
            &[
                "--pool-size",
                "32mb",
                "--slab-size",
                "2mb",
                "--min-slot-size",
                "64kb",
            ],
        )
    }

    pub fn start_with(tag: &str, extra: &[&str]) -> OwnerProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let name = unique_name(tag);
        let socket = dir.path().join("owner.sock");
        let mut args: Vec<String> = vec![
            "--name".into(),
            name.clone(),
            "--socket".into(),
            socket.display().to_string(),
        ];
        // Metrics off unless the test asks for an address.
        if !extra.contains(&"--metrics-addr") {
            args.extend(["--metrics-addr".into(), String::new()]);
        }
        args.extend(["--log-level".into(), "debug".into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = dir.path().join("owner.log");
        let mut o = OwnerProc {
            name,
            socket,
            args,
            child: None,
            log,
            _dir: dir,
        };
        o.spawn();
        o
    }

    /// (Re)start the process with the same arguments and wait for its socket.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(owner_bin())
            .args(&self.args)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn pegaflow-owner");
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(20));
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "pegaflow-owner exited early ({status}); log:\n{}",
                    self.log_text()
                );
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "pegaflow-owner not ready after {timeout:?}; log:\n{}",
            self.log_text()
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: kill(2) with a pid we own; no memory involved.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().ok()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn control(&self) -> PathBuf {
        control_path(&self.name)
    }

    pub fn engine_config(&self, namespace: u64, slot_bytes: u64) -> pegaflow_core::EngineConfig {
        pegaflow_core::EngineConfig {
            name: self.name.clone(),
            socket: Some(self.socket.clone()),
            label: "test".into(),
            namespace,
            slot_bytes,
            reconnect_interval: Duration::from_millis(50),
            // CI machines are loaded; production keeps the 2 ms default.
            reserve_wait: Duration::from_millis(500),
        }
    }
}

impl Drop for OwnerProc {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_file(control_path(&self.name));
        let _ = std::fs::remove_file(pegaflow_shm::segment::lock_path(&self.name));
        let _ = std::fs::remove_file(pegaflow_shm::segment::pool_path(
            &self.name,
            &pegaflow_shm::segment::PoolBacking::Shm,
        ));
    }
}

/// The i-th block hash of a seed.
pub fn hash_of(seed: u64, i: u64) -> [u8; 32] {
    let a = xxhash_rust::xxh3::xxh3_128_with_seed(&i.to_le_bytes(), seed);
    let b = xxhash_rust::xxh3::xxh3_128_with_seed(&i.to_le_bytes(), seed ^ 0x5bd1_e995);
    let mut h = [0u8; 32];
    h[..16].copy_from_slice(&a.to_le_bytes());
    h[16..].copy_from_slice(&b.to_le_bytes());
    h
}

pub fn keys(ns: u64, seed: u64, start: u64, count: u64) -> Vec<BlockKey> {
    (start..start + count)
        .map(|i| BlockKey::new(ns, hash_of(seed, i)))
        .collect()
}

/// The first `len` bytes of a key's block, as 8-byte words: word `i` is
/// `base ^ i * K` in little-endian order, `base` a hash of the key.
/// Computed in a plain loop into one buffer because the tests check a few
/// GB of blocks in debug builds (5x faster there than word by word).
fn block_words(key: &BlockKey, len: usize) -> Vec<u64> {
    let base = xxhash_rust::xxh3::xxh3_64_with_seed(&key.hash, key.namespace);
    let n = len.div_ceil(8);
    let mut words = Vec::with_capacity(n);
    let mut i = 0u64;
    while (i as usize) < n {
        words.push((base ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le());
        i += 1;
    }
    words
}

fn word_bytes(words: &[u64]) -> &[u8] {
    // SAFETY: u64 has no padding and u8 no alignment requirement; the slice
    // covers exactly the words' bytes and borrows them for its lifetime.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 8) }
}

/// Deterministic contents of a block: a function of its key and offset.
pub fn fill_block(key: &BlockKey, buf: &mut [u8]) {
    let words = block_words(key, buf.len());
    buf.copy_from_slice(&word_bytes(&words)[..buf.len()]);
}

/// Whether `data` holds what `fill_block` writes for `key`.
pub fn check_block(key: &BlockKey, data: &[u8]) -> bool {
    let words = block_words(key, data.len());
    &word_bytes(&words)[..data.len()] == data
}

/// Length of a key's block among blocks of `slot_bytes`: blocks of one
/// class vary in length (a full slot, or up to 3/16 short), a function of
/// the key so that every process agrees on it.
pub fn block_len(key: &BlockKey, slot_bytes: u64) -> usize {
    (slot_bytes - u64::from(key.hash[0] % 4) * (slot_bytes / 16)) as usize
}

/// Whether `data` is exactly the block `key` has among blocks of
/// `slot_bytes` (length and bytes).
pub fn block_ok(key: &BlockKey, slot_bytes: u64, data: &[u8]) -> bool {
    data.len() == block_len(key, slot_bytes) && check_block(key, data)
}

/// What the control segment says, read as `pegaflow-inspect` would.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Audit {
    pub free: u64,
    pub committed: u64,
    pub evicting: u64,
    /// Writing slots per client index.
    pub writing: std::collections::BTreeMap<u16, u64>,
    /// Non-zero pin counters per client index.
    pub pins: std::collections::BTreeMap<u32, u64>,
    /// (client index, state, pid, stash length)
    pub clients: Vec<(u32, u32, u32, u64)>,
    pub index_entries: u64,
    pub bad_index_entries: u64,
}

impl Audit {
    pub fn read(ctl: &Path) -> Audit {
        let seg = ControlSegment::open_read_only(ctl).expect("open control segment");
        let mut a = Audit::default();
        let g = *seg.geometry();
        for slab in 0..g.num_slabs() as u32 {
            let nslots = seg.slabs()[slab as usize].nslots.load(Ordering::Acquire);
            let first = slab * g.slots_per_slab() as u32;
            for slot in first..first + nslots {
                match seg.slots()[slot as usize]
                    .load_state()
                    .map(|s| (s.kind, s.client))
                {
                    Some((SlotKind::Free, _)) => a.free += 1,
                    Some((SlotKind::Committed, _)) => a.committed += 1,
                    Some((SlotKind::Evicting, _)) => a.evicting += 1,
                    Some((SlotKind::Writing, c)) => *a.writing.entry(c).or_default() += 1,
                    None => panic!("garbage state in slot {slot}"),
                }
            }
        }
        for i in 0..seg.max_clients() {
            let c = seg.client(i).unwrap();
            let pinned = c
                .pins
                .iter()
                .filter(|p| p.load(Ordering::Relaxed) != 0)
                .count() as u64;
            if pinned > 0 {
                a.pins.insert(i, pinned);
            }
            let st = c.entry.state();
            if st != client_state::FREE {
                a.clients
                    .push((i, st, c.entry.pid.load(Ordering::Relaxed), c.stash.len()));
            }
        }
        for (_, key, slot) in seg.index().entries() {
            a.index_entries += 1;
            let e = &seg.slots()[slot as usize];
            if e.load_state().map(|s| s.kind) != Some(SlotKind::Committed) || e.key() != key {
                a.bad_index_entries += 1;
            }
        }
        a
    }

    /// Writing slots not accounted for by live clients' stashes.
    pub fn leaked_writing(&self) -> u64 {
        let mut leaked = 0;
        for (&c, &n) in &self.writing {
            let stash = self
                .clients
                .iter()
                .find(|x| x.0 == u32::from(c))
                .map(|x| x.3)
                .unwrap_or(0);
            leaked += n.saturating_sub(stash);
        }
        leaked
    }
}

/// Poll `f` until it is true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    loop {
        if f() {
            return true;
        }
        if t.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Spawn `pf-engine` (the test engine driver) with arguments.
pub fn engine_cmd(bin: &Path, args: &[String]) -> Command {
    let mut c = Command::new(bin);
    c.args(args).env("NO_COLOR", "1").stdin(Stdio::null());
    c
}
