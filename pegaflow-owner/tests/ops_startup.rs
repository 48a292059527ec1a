//! Start-up and segment lifecycle of a real `pegaflow-owner` process:
//! new segments are new files (old mappings keep their bytes), a changed
//! geometry is refused, lost files are logged, a full filesystem or a bad
//! socket path is refused cleanly and leaves nothing behind, `--group`
//! works under umask 022, and a corrupt or torn segment left by a dead
//! owner is repaired on adoption instead of served or spun on.
//!
//! Tests that need root (mounting a small tmpfs, creating a group, another
//! user's directory) print `SKIPPED: ...` and pass without it.

mod ops_support;

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ops_support::{hash, INSPECT, OWNER};
use pegaflow_core::{BlockKey, Engine, EngineConfig};
use pegaflow_shm::index::BUCKET_BYTES;
use pegaflow_shm::segment::{ControlSegment, PoolSegment};
use pegaflow_shm::slot_table::{SlotKind, SLAB_ENTRY_BYTES, SLOT_ENTRY_BYTES};
use pegaflow_shm::SegmentError;

const NS: u64 = 0x5eed_0000_0000_0001;
const SLOT: u64 = 64 << 10;
const LEN: usize = 60_000;
const WAIT: Duration = Duration::from_secs(30);

fn geometry(pool: &str) -> Vec<String> {
    [
        "--pool-size",
        pool,
        "--slab-size",
        "2mb",
        "--min-slot-size",
        "64kb",
    ]
    .map(String::from)
    .to_vec()
}

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// One owner instance: a private shm directory, socket and log.
struct Inst {
    name: String,
    shm: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Set for the umask test.
    umask: Option<u32>,
    _dir: tempfile::TempDir,
}

impl Inst {
    fn new(tag: &str) -> Inst {
        let dir = tempfile::tempdir().expect("tempdir");
        Inst {
            name: format!("st-{tag}-{}", std::process::id()),
            shm: dir.path().join("shm"),
            socket: dir.path().join("run").join("owner.sock"),
            log: dir.path().join("owner.log"),
            child: None,
            umask: None,
            _dir: dir,
        }
        .with_dirs()
    }

    fn with_dirs(self) -> Inst {
        std::fs::create_dir_all(&self.shm).unwrap();
        self
    }

    fn ctl(&self) -> PathBuf {
        self.shm.join(format!("pegaflow-{}.ctl", self.name))
    }

    fn pool(&self) -> PathBuf {
        self.shm.join(format!("pegaflow-{}.pool", self.name))
    }

    fn lock(&self) -> PathBuf {
        self.shm.join(format!("pegaflow-{}.lock", self.name))
    }

    fn command(&self, extra: &[String]) -> Command {
        let mut c = Command::new(OWNER);
        c.args(["--name", &self.name, "--socket"]).arg(&self.socket);
        if !extra.iter().any(|a| a == "--metrics-addr") {
            c.args(["--metrics-addr", ""]);
        }
        c.args(extra)
            .env("PEGAFLOW_SHM_DIR", &self.shm)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        if let Some(mask) = self.umask {
            // SAFETY: umask(2) between fork and exec is async-signal-safe.
            unsafe {
                c.pre_exec(move || {
                    libc::umask(mask);
                    Ok(())
                });
            }
        }
        c
    }

    fn log_file(&self) -> File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log")
    }

    /// Start and wait until the socket accepts.
    fn start(&mut self, extra: &[String]) {
        let log = self.log_file();
        let child = self
            .command(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn pegaflow-owner");
        self.child = Some(child);
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("owner exited early ({status}):\n{}", self.log_text());
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            assert!(
                t.elapsed() < WAIT,
                "owner not serving after {WAIT:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Run a start that must be refused: (exit code, stderr). Fails if it
    /// is still running after WAIT (it would be serving).
    fn refused(&self, extra: &[String]) -> (Option<i32>, String) {
        let mut child = self
            .command(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pegaflow-owner");
        let t = Instant::now();
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if t.elapsed() > WAIT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("a start that should be refused is still running after {WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "start was not refused: {err}");
        (out.status.code(), err)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn terminate(&mut self) {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().unwrap();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn engine(&self) -> Engine {
        let e = Engine::connect(EngineConfig {
            name: self.name.clone(),
            socket: Some(self.socket.clone()),
            label: "startup-test".into(),
            namespace: NS,
            slot_bytes: SLOT,
            reconnect_interval: Duration::from_millis(50),
            reserve_wait: Duration::from_millis(500),
        })
        .expect("engine");
        assert!(e.wait_connected(WAIT), "engine: {}", self.log_text());
        e
    }

    /// `pegaflow-inspect ARGS` on this instance.
    fn inspect(&self, args: &[&str]) -> std::process::Output {
        Command::new(INSPECT)
            .args(["--name", &self.name])
            .args(args)
            .env("PEGAFLOW_SHM_DIR", &self.shm)
            .output()
            .unwrap()
    }

    /// Files in the shm directory other than the lock file.
    fn segment_files(&self) -> Vec<String> {
        std::fs::read_dir(&self.shm)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect()
    }
}

impl Drop for Inst {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn key(i: u64) -> BlockKey {
    BlockKey::new(NS, hash(i))
}

/// Block contents: a function of the key index and a generation tag.
fn content(i: u64, tag: u8) -> Vec<u8> {
    (0..LEN)
        .map(|j| (i as u8).wrapping_mul(31) ^ tag ^ (j as u8))
        .collect()
}

/// Save keys `range` with content `tag` and wait until all are found.
fn save(e: &Engine, range: std::ops::Range<u64>, tag: u8) {
    let keys: Vec<BlockKey> = range.clone().map(key).collect();
    let t = Instant::now();
    let mut done = 0;
    while done < keys.len() {
        let first = done;
        let n = (keys.len() - first).min(8);
        done += e.save_with(&keys[first..first + n], |i, buf| {
            let c = content(range.start + (first + i) as u64, tag);
            buf[..LEN].copy_from_slice(&c);
            LEN
        });
        assert!(t.elapsed() < WAIT, "saved only {done} of {}", keys.len());
    }
    for i in range {
        assert!(
            eventually(|| e.count_hits(NS, &[hash(i)]) == 1),
            "block {i} never showed up in the index"
        );
    }
}

fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < WAIT {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// The bytes of block `i` as the engine loads them, if it is cached.
fn load(e: &Engine, i: u64) -> Option<Vec<u8>> {
    let p = e.lookup(NS, &[hash(i)]);
    let mut out = None;
    e.load_with(&p, |_, d| out = Some(d[..LEN].to_vec()));
    e.release(&p);
    out
}

/// Committed slots of a control file, read from outside.
fn committed_slots(ctl: &Path) -> Vec<u32> {
    let seg = ControlSegment::open_read_only(ctl).unwrap();
    seg.slots()
        .iter()
        .enumerate()
        .filter(|(_, s)| s.load_state().map(|s| s.kind) == Some(SlotKind::Committed))
        .map(|(i, _)| i as u32)
        .collect()
}

fn inode(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().ino()
}

// ---------------------------------------------------------------------------
// Item 1: new segments get a new identity.
// ---------------------------------------------------------------------------

/// A view of the segments as an engine that never noticed the restart keeps
/// them: its mappings and the committed blocks' bytes it read.
struct OldView {
    _ctl: ControlSegment,
    pool: PoolSegment,
    segment_id: u64,
    ctl_ino: u64,
    pool_ino: u64,
    pool_dev: u64,
    blocks: Vec<(u64, u64, Vec<u8>)>,
}

impl OldView {
    fn take(o: &Inst, pool_bytes: u64) -> OldView {
        let ctl = ControlSegment::open(&o.ctl()).unwrap();
        let (dev, ino) = ctl.pool_identity();
        assert_eq!(
            (dev, ino),
            {
                let m = std::fs::metadata(o.pool()).unwrap();
                (m.dev(), m.ino())
            },
            "the control header records the pool file's identity"
        );
        let pool = PoolSegment::open_checked(&o.pool(), pool_bytes, dev, ino).unwrap();
        let mut blocks = Vec::new();
        for slot in committed_slots(&o.ctl()) {
            let (off, _) = ctl.slot_location(slot).unwrap();
            blocks.push((u64::from(slot), off, read_pool(&pool, off)));
        }
        OldView {
            segment_id: ctl.header().segment_id,
            ctl_ino: inode(&o.ctl()),
            pool_ino: ino,
            pool_dev: dev,
            _ctl: ctl,
            pool,
            blocks,
        }
    }

    /// Every block still reads as it did.
    fn unchanged(&self) -> bool {
        self.blocks
            .iter()
            .all(|(_, off, bytes)| read_pool(&self.pool, *off) == *bytes)
    }
}

fn read_pool(pool: &PoolSegment, off: u64) -> Vec<u8> {
    assert!(off as usize + LEN <= pool.len());
    // SAFETY: off + LEN lies inside the mapping (checked above), which
    // `pool` keeps alive; nobody writes these pages any more (the owner
    // replaced the file), and a copy through a raw pointer forms no
    // reference to memory another process might write.
    let mut v = vec![0u8; LEN];
    unsafe { std::ptr::copy_nonoverlapping(pool.as_ptr().add(off as usize), v.as_mut_ptr(), LEN) };
    v
}

#[test]
fn discarding_restarts_make_new_files_and_old_mappings_keep_their_bytes() {
    let mut o = Inst::new("identity");
    o.start(&geometry("32mb"));
    let e = o.engine();
    save(&e, 0..16, 1);
    drop(e);
    let v1 = OldView::take(&o, 32 << 20);
    assert_eq!(v1.blocks.len(), 16);
    assert!(
        v1.blocks
            .iter()
            .any(|(_, _, b)| (0..16).any(|i| *b == content(i, 1))),
        "the snapshot holds the saved bytes"
    );

    // A copy of the control file, as kept for a bug report.
    o.terminate();
    let old_ctl = o._dir.path().join("old.ctl");
    std::fs::copy(o.ctl(), &old_ctl).unwrap();

    // Same size, --discard-existing.
    o.start(&[geometry("32mb"), vec!["--discard-existing".into()]].concat());
    assert!(v1.unchanged(), "an old mapping saw its bytes change");
    assert_ne!(inode(&o.pool()), v1.pool_ino, "new pool file, new inode");
    assert_ne!(inode(&o.ctl()), v1.ctl_ino, "new control file, new inode");
    // The new owner hands out the same offsets for other bytes: the old
    // mapping still does not see them.
    let e = o.engine();
    save(&e, 0..16, 2);
    assert_eq!(load(&e, 3), Some(content(3, 2)));
    drop(e);
    assert!(v1.unchanged(), "new saves landed in an old mapping");
    let v2 = OldView::take(&o, 32 << 20);
    // inspect tells which pool file belongs to which control segment.
    let status = |args: &[&str]| -> serde_json::Value {
        let out = Command::new(INSPECT)
            .args(args)
            .env("PEGAFLOW_SHM_DIR", &o.shm)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let live = status(&["--name", &o.name, "--json", "status"]);
    assert_eq!(live["pool"]["file_is_this_segments"], true, "{live}");
    let old = status(&["--control", old_ctl.to_str().unwrap(), "--json", "status"]);
    assert_eq!(old["pool"]["file_is_this_segments"], false, "{old}");
    assert_ne!(v2.segment_id, v1.segment_id, "a new segment id");
    // An engine holding the old identity is told the file was replaced.
    match PoolSegment::open_checked(&o.pool(), 32 << 20, v1.pool_dev, v1.pool_ino) {
        Err(SegmentError::PoolReplaced { .. }) => {}
        other => panic!("expected PoolReplaced, got {:?}", other.map(|_| ())),
    }

    // Another size, --discard-existing.
    o.terminate();
    o.start(&[geometry("64mb"), vec!["--discard-existing".into()]].concat());
    assert_ne!(inode(&o.pool()), v2.pool_ino);
    assert_ne!(inode(&o.ctl()), v2.ctl_ino);
    assert_eq!(std::fs::metadata(o.pool()).unwrap().len(), 64 << 20);
    assert!(v1.unchanged() && v2.unchanged(), "an old mapping changed");
    let log = o.log_text();
    assert!(
        log.contains(
            "--discard-existing: dropping the existing segments and the 16 committed blocks"
        ),
        "{log}"
    );

    // A second owner of the name is still refused, and names the first.
    let (code, err) = o.refused(&geometry("64mb"));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("pid {}", o.pid())) && err.contains(".lock"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------
// Item 14: a changed geometry is refused; lost files are logged.
// ---------------------------------------------------------------------------

#[test]
fn a_changed_pool_size_is_refused_unless_discarding() {
    let mut o = Inst::new("resize");
    o.start(&geometry("32mb"));
    let e = o.engine();
    save(&e, 0..20, 1);
    drop(e);
    o.terminate();
    let ctl_bytes = std::fs::read(o.ctl()).unwrap();
    let inodes = (inode(&o.ctl()), inode(&o.pool()));

    let (code, err) = o.refused(&geometry("64mb"));
    assert_eq!(code, Some(1), "{err}");
    for want in [
        "20 committed blocks",
        "--pool-size 32mb in the segment, 64mb asked",
        "--pool-size 32mb --slab-size 2mb --min-slot-size 64kb --max-clients 64",
        "--discard-existing",
    ] {
        assert!(err.contains(want), "missing '{want}' in: {err}");
    }
    let mut other_slot = geometry("32mb");
    other_slot[5] = "128kb".into();
    let (_, err) = o.refused(&other_slot);
    assert!(
        err.contains("--min-slot-size 64kb in the segment, 128kb asked"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(o.ctl()).unwrap(),
        ctl_bytes,
        "a refused start must not touch the segment"
    );
    assert_eq!((inode(&o.ctl()), inode(&o.pool())), inodes);

    // Without --pool-size (and --slab-size) the existing geometry is kept.
    o.start(&["--min-slot-size".to_string(), "64kb".to_string()]);
    let e = o.engine();
    assert_eq!(e.count_hits(NS, &(0..20).map(hash).collect::<Vec<_>>()), 20);
    assert_eq!(load(&e, 7), Some(content(7, 1)));
}

#[test]
fn lost_segment_files_are_logged_with_what_was_lost() {
    let mut o = Inst::new("lost");
    o.start(&geometry("32mb"));
    save(&o.engine(), 0..12, 1);
    o.kill9();
    std::fs::remove_file(o.pool()).unwrap();
    o.start(&geometry("32mb"));
    let log = o.log_text();
    assert!(
        log.contains(
            "the pool file is missing: the 12 committed blocks of the control segment are lost"
        ),
        "{log}"
    );
    let e = o.engine();
    assert_eq!(e.count_hits(NS, &[hash(0)]), 0);
    save(&e, 0..5, 2);
    drop(e);

    o.kill9();
    File::create(o.pool()).unwrap(); // truncate to 0
    o.start(&geometry("32mb"));
    assert!(
        o.log_text()
            .contains("the pool file is empty (0 bytes): the 5 committed blocks"),
        "{}",
        o.log_text()
    );
    save(&o.engine(), 0..3, 3);

    o.kill9();
    std::fs::remove_file(o.ctl()).unwrap();
    o.start(&geometry("32mb"));
    assert!(
        o.log_text()
            .contains("the control segment is missing but the pool file (32.0 MiB) exists"),
        "{}",
        o.log_text()
    );

    o.kill9();
    File::create(o.ctl()).unwrap();
    o.start(&geometry("32mb"));
    assert!(
        o.log_text().contains("control segment is empty (0 bytes)"),
        "{}",
        o.log_text()
    );
    assert_eq!(o.inspect(&["verify"]).status.code(), Some(0));
}

// ---------------------------------------------------------------------------
// Item 18: refusals mention the way out and leave nothing behind.
// ---------------------------------------------------------------------------

#[test]
fn a_truncated_control_file_is_refused_with_the_way_out() {
    let mut o = Inst::new("trunc");
    o.start(&geometry("32mb"));
    save(&o.engine(), 0..4, 1);
    o.terminate();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(o.ctl())
        .unwrap();
    f.set_len(8192).unwrap();
    let (code, err) = o.refused(&geometry("32mb"));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("truncated") && err.contains("--discard-existing"),
        "{err}"
    );
    assert_eq!(std::fs::metadata(o.ctl()).unwrap().len(), 8192, "untouched");
    o.start(&[geometry("32mb"), vec!["--discard-existing".into()]].concat());
}

#[test]
fn a_start_refused_late_removes_the_files_it_created() {
    let o = Inst::new("late");
    // Metrics is the last thing a start sets up: take its port.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let args = [geometry("32mb"), vec!["--metrics-addr".into(), addr]].concat();
    let (code, err) = o.refused(&args);
    assert_eq!(code, Some(1));
    assert!(err.contains("--metrics-addr"), "{err}");
    assert_eq!(o.segment_files(), Vec::<String>::new(), "files left behind");
    assert!(!o.socket.exists(), "socket left behind");
}

#[test]
fn temporary_files_of_a_start_that_died_are_removed() {
    let mut o = Inst::new("leftover");
    let ours = [
        o.shm.join(format!(".pegaflow-{}.ctl.new-123-00ff", o.name)),
        o.shm.join(format!(".pegaflow-{}.pool.new-4-abc", o.name)),
    ];
    // Another name's, and something that only looks alike.
    let theirs = [
        o.shm.join(format!(".pegaflow-{}.x.ctl.new-5-aa", o.name)),
        o.shm.join(format!(".pegaflow-{}.ctl.new-notes", o.name)),
    ];
    for p in ours.iter().chain(&theirs) {
        std::fs::write(p, b"x").unwrap();
    }
    o.start(&geometry("32mb"));
    for p in &ours {
        assert!(!p.exists(), "{} left", p.display());
    }
    for p in &theirs {
        assert!(p.exists(), "{} removed", p.display());
    }
    assert!(o
        .log_text()
        .contains("removed a temporary file of a start that did not finish"));
}

// ---------------------------------------------------------------------------
// Item 16: a full filesystem is refused up front, not a SIGBUS.
// ---------------------------------------------------------------------------

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop.
struct SmallTmpfs {
    dir: tempfile::TempDir,
}

impl SmallTmpfs {
    fn mount(size: &str) -> Option<SmallTmpfs> {
        if !root() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(SmallTmpfs { dir })
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn a_pool_larger_than_the_filesystem_is_refused_and_leaves_no_files() {
    let Some(fs) = SmallTmpfs::mount("64m") else {
        eprintln!("SKIPPED: needs root to mount a 64 MiB tmpfs (mount -t tmpfs)");
        return;
    };
    let mut o = Inst::new("full");
    o.shm = fs.dir.path().to_path_buf();
    let (code, err) = o.refused(&geometry("256mb"));
    assert_eq!(
        code,
        Some(1),
        "killed by a signal instead of refusing: {err}"
    );
    for want in [
        "cannot reserve 256.0 MiB",
        "free on that filesystem",
        "--pool-size",
    ] {
        assert!(err.contains(want), "missing '{want}' in: {err}");
    }
    assert_eq!(o.segment_files(), Vec::<String>::new(), "files left behind");
    // The space is all back.
    let st = nix::sys::statvfs::statvfs(fs.dir.path()).unwrap();
    assert!(st.blocks_available() * st.fragment_size() > 60 << 20);
    // A pool that fits still starts there, space reserved up front.
    o.start(&geometry("32mb"));
    let used = std::fs::metadata(o.pool()).unwrap().blocks() * 512;
    assert_eq!(used, 32 << 20, "the pool's space is reserved at start");
    o.terminate();
    drop(o);
}

/// `n` more 2 MiB huge pages reserved (root), given back on drop; and
/// hugetlbfs mounts that go away with it.
struct HugePages {
    before: u64,
    mounts: Vec<tempfile::TempDir>,
}

impl HugePages {
    fn reserve(n: u64) -> Option<HugePages> {
        const NR: &str = "/proc/sys/vm/nr_hugepages";
        if !root() {
            return None;
        }
        let before: u64 = std::fs::read_to_string(NR).ok()?.trim().parse().ok()?;
        std::fs::write(NR, (before + n).to_string()).ok()?;
        let hp = HugePages {
            before,
            mounts: Vec::new(),
        };
        (pegaflow_shm::segment::free_hugepages() >= n).then_some(hp)
    }

    /// A hugetlbfs of 2 MiB pages, `size` limited if given.
    fn mount(&mut self, size: Option<&str>) -> PathBuf {
        let dir = tempfile::tempdir().unwrap();
        let opts = match size {
            Some(s) => format!("pagesize=2M,size={s}"),
            None => "pagesize=2M".into(),
        };
        let ok = Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", &opts, "none"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount hugetlbfs");
        let p = dir.path().to_path_buf();
        self.mounts.push(dir);
        p
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        for m in &self.mounts {
            let _ = Command::new("umount").arg(m.path()).status();
        }
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", self.before.to_string());
    }
}

#[test]
fn hugetlbfs_pools_are_reserved_at_start_or_refused() {
    let Some(mut hp) = HugePages::reserve(40) else {
        eprintln!("SKIPPED: needs root and a writable /proc/sys/vm/nr_hugepages");
        return;
    };
    let free = hp.mount(None);
    let small = hp.mount(Some("32M"));
    let mut o = Inst::new("huge");
    let args = |dir: &Path, pool: &str| {
        [
            geometry(pool),
            vec!["--use-hugepages".into(), "--hugepage-dir".into()],
            vec![dir.display().to_string()],
        ]
        .concat()
    };
    // The mount's size= limit: refused when the mapping cannot reserve.
    let (code, err) = o.refused(&args(&small, "64mb"));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot reserve 64.0 MiB") && err.contains("32.0 MiB free"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&small).unwrap().count(), 0, "files left");
    assert_eq!(o.segment_files(), Vec::<String>::new());
    // More than there are: refused before anything is made.
    let (_, err) = o.refused(&args(&free, "256mb"));
    assert!(err.contains("not enough free 2 MiB huge pages"), "{err}");
    assert_eq!(std::fs::read_dir(&free).unwrap().count(), 0, "files left");
    // A pool that fits starts, and a restart re-adopts it.
    let before = pegaflow_shm::segment::free_hugepages();
    o.start(&args(&free, "64mb"));
    assert!(
        pegaflow_shm::segment::free_hugepages() + 32 <= before,
        "the pool's 32 huge pages are taken at start"
    );
    save(&o.engine(), 0..4, 1);
    o.terminate();
    o.start(&args(&free, "64mb"));
    assert_eq!(load(&o.engine(), 2), Some(content(2, 1)));
    o.kill9();
}

// ---------------------------------------------------------------------------
// Item 15: --group under umask 022.
// ---------------------------------------------------------------------------

/// A throw-away group; deleted on drop.
struct TempGroup {
    name: String,
    gid: u32,
}

impl TempGroup {
    fn create() -> Option<TempGroup> {
        if !root() {
            return None;
        }
        let name = format!("pfops{}", std::process::id() % 100_000);
        let ok = Command::new("groupadd")
            .arg(&name)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return None;
        }
        let gid = nix::unistd::Group::from_name(&name).ok()??.gid.as_raw();
        Some(TempGroup { name, gid })
    }
}

impl Drop for TempGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).status();
    }
}

#[test]
fn group_members_can_map_the_segments_under_umask_022() {
    let Some(group) = TempGroup::create() else {
        eprintln!("SKIPPED: needs root and groupadd to create a test group");
        return;
    };
    let mut o = Inst::new("group");
    o.umask = Some(0o022);
    // The socket directory must be reachable by the group member.
    std::fs::create_dir_all(o.socket.parent().unwrap()).unwrap();
    for d in [o._dir.path(), o.socket.parent().unwrap(), o.shm.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    o.start(&[geometry("32mb"), vec!["--group".into(), group.name.clone()]].concat());
    for p in [o.lock(), o.ctl(), o.pool(), o.socket.clone()] {
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o660, "{}", p.display());
        assert_eq!(m.gid(), group.gid, "{}", p.display());
    }
    // Another user in the group opens the control and pool files read-write
    // (what an engine's mmap needs).
    for p in [o.ctl(), o.pool()] {
        let gid = group.gid;
        let mut c = Command::new("sh");
        c.args(["-c", "exec 3<>\"$0\"", p.to_str().unwrap()]);
        // SAFETY: setgroups/setgid/setuid between fork and exec are
        // async-signal-safe.
        unsafe {
            c.pre_exec(move || {
                let groups = [gid];
                if libc::setgroups(1, groups.as_ptr()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "a group member cannot open {} read-write: {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---------------------------------------------------------------------------
// Item 17: socket paths.
// ---------------------------------------------------------------------------

#[test]
fn a_second_owner_never_takes_over_a_live_socket() {
    let mut a = Inst::new("sock-a");
    a.start(&geometry("32mb"));
    let mut b = Inst::new("sock-b");
    b.socket = a.socket.clone();
    let (code, err) = b.refused(&geometry("32mb"));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("in use by another pegaflow-owner")
            && err.contains(&format!("pid {}", a.pid()))
            && err.contains("--socket"),
        "{err}"
    );
    assert_eq!(b.segment_files(), Vec::<String>::new());
    // The first owner still owns it and serves.
    let s = std::os::unix::net::UnixStream::connect(&a.socket).unwrap();
    let cred = nix::sys::socket::getsockopt(
        &std::os::fd::AsFd::as_fd(&s),
        nix::sys::socket::sockopt::PeerCredentials,
    )
    .unwrap();
    assert_eq!(cred.pid() as u32, a.pid());
    save(&a.engine(), 0..2, 1);
    // A stale socket (its owner is dead) is replaced.
    a.kill9();
    b.start(&geometry("32mb"));
}

#[test]
fn a_socket_path_that_is_not_a_socket_is_refused_and_kept() {
    let mut o = Inst::new("regular");
    std::fs::create_dir_all(o.socket.parent().unwrap()).unwrap();
    std::fs::write(&o.socket, b"precious").unwrap();
    let (code, err) = o.refused(&geometry("32mb"));
    assert_eq!(code, Some(1));
    assert!(err.contains("is not a socket (a regular file)"), "{err}");
    assert_eq!(std::fs::read(&o.socket).unwrap(), b"precious");
    assert_eq!(o.segment_files(), Vec::<String>::new());
    let dir = o.socket.parent().unwrap().join("a-directory");
    std::fs::create_dir(&dir).unwrap();
    o.socket = dir.clone();
    let (_, err) = o.refused(&geometry("32mb"));
    assert!(err.contains("(a directory)"), "{err}");
    assert!(dir.is_dir());
}

#[test]
fn an_unsafe_socket_directory_is_refused() {
    let mut o = Inst::new("sockdir");
    let dir = o.socket.parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&dir).unwrap();
    // Writable by everyone, no sticky bit.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, err) = o.refused(&geometry("32mb"));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("is writable by everyone") && err.contains("chmod go-w"),
        "{err}"
    );
    assert_eq!(o.segment_files(), Vec::<String>::new());
    // Group-writable, no sticky bit.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775)).unwrap();
    let (_, err) = o.refused(&geometry("32mb"));
    assert!(err.contains("is writable by its group"), "{err}");
    // Sticky, like /tmp: fine.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    o.start(&geometry("32mb"));
    o.kill9();
    if !root() {
        eprintln!("SKIPPED (part): needs root to give the socket directory to another user");
        return;
    }
    // Squatted by another user, as a /tmp/pegaflow made by someone else.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let (_, err) = o.refused(&geometry("32mb"));
    assert!(
        err.contains("is owned by uid 65534, not by this owner's user"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------
// Items 5 and 6: a corrupt or torn segment left by a dead owner.
// ---------------------------------------------------------------------------

fn write_u64(ctl: &Path, off: u64, v: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(ctl).unwrap();
    f.write_all_at(&v.to_le_bytes(), off).unwrap();
}

#[test]
fn adoption_drops_corrupt_slots_and_slabs_and_says_so() {
    let mut o = Inst::new("corrupt");
    o.start(&geometry("32mb"));
    let e = o.engine();
    save(&e, 0..40, 1);
    drop(e);
    o.kill9();
    let (layout, per) = {
        let seg = ControlSegment::open_read_only(&o.ctl()).unwrap();
        (*seg.layout(), seg.geometry().slots_per_slab())
    };
    let committed = committed_slots(&o.ctl());
    assert_eq!(committed.len(), 40);
    // The slab with the most blocks gets a corrupt entry...
    let mut by_slab = std::collections::BTreeMap::<u64, Vec<u32>>::new();
    for &s in &committed {
        by_slab.entry(u64::from(s) / per).or_default().push(s);
    }
    let (&bad_slab, lost) = by_slab.iter().max_by_key(|(_, v)| v.len()).unwrap();
    let lost_in_slab = lost.len();
    write_u64(&o.ctl(), layout.slabs + bad_slab * SLAB_ENTRY_BYTES, 12345);
    // ...and one block elsewhere a 1 TiB length.
    let long = *committed
        .iter()
        .find(|&&s| u64::from(s) / per != bad_slab)
        .unwrap();
    write_u64(
        &o.ctl(),
        layout.slots + u64::from(long) * SLOT_ENTRY_BYTES + 48,
        1 << 40,
    );

    o.start(&geometry("32mb"));
    let log = o.log_text();
    assert!(
        log.contains(&format!(
            "adoption dropped {lost_in_slab} committed blocks of slab {bad_slab}: corrupt slab entry"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "adoption dropped {} committed blocks of a corrupt control segment",
            lost_in_slab + 1
        )),
        "{log}"
    );
    let out = o.inspect(&["verify"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify after adoption: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // What survived is served with the right bytes; what was dropped misses.
    let e = o.engine();
    let seg = ControlSegment::open_read_only(&o.ctl()).unwrap();
    let mut served = 0;
    for i in 0..40 {
        if let Some(b) = load(&e, i) {
            assert_eq!(b, content(i, 1), "block {i}");
            served += 1;
        }
    }
    assert_eq!(served, 40 - lost_in_slab - 1);
    // (free, or already in the new engine's stash)
    assert_ne!(
        seg.slots()[long as usize].load_state().unwrap().kind,
        SlotKind::Committed
    );
}

#[test]
fn adoption_never_frees_a_corrupt_block_a_live_engine_pins() {
    let mut o = Inst::new("pinned");
    o.start(&geometry("32mb"));
    let e = o.engine();
    save(&e, 0..8, 1);
    let pinned = e.lookup(NS, &[hash(0)]);
    assert_eq!(pinned.len(), 1);
    let slot = pinned.blocks[0].slot;
    let gen = pinned.blocks[0].gen;
    let other = committed_slots(&o.ctl())
        .into_iter()
        .find(|&s| s != slot)
        .unwrap();
    o.kill9();
    let layout = *ControlSegment::open_read_only(&o.ctl()).unwrap().layout();
    // Both blocks claim the reserved namespace 0 now.
    for s in [slot, other] {
        write_u64(
            &o.ctl(),
            layout.slots + u64::from(s) * SLOT_ENTRY_BYTES + 8,
            0,
        );
    }
    o.start(&geometry("32mb"));
    let seg = ControlSegment::open_read_only(&o.ctl()).unwrap();
    let st = seg.slots()[slot as usize].load_state().unwrap();
    assert_eq!(
        (st.kind, st.gen),
        (SlotKind::Committed, gen),
        "a slot a live engine pins was freed"
    );
    assert_eq!(
        seg.slots()[other as usize].load_state().unwrap().kind,
        SlotKind::Free
    );
    assert!(
        o.log_text().contains("kept out of service"),
        "{}",
        o.log_text()
    );
    e.release(&pinned);
}

#[test]
fn a_torn_index_bucket_does_not_stop_the_next_owner() {
    let mut o = Inst::new("torn");
    o.start(&geometry("32mb"));
    save(&o.engine(), 0..16, 1);
    o.kill9();
    // Make every occupied bucket odd, as an owner killed between the two
    // sequence stores of a write leaves one.
    let (index, buckets) = {
        let seg = ControlSegment::open_read_only(&o.ctl()).unwrap();
        (seg.layout().index, seg.geometry().index_buckets)
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(o.ctl())
        .unwrap();
    let mut torn = 0;
    for b in 0..buckets {
        let mut w = [0u8; 8];
        f.read_exact_at(&mut w, index + b * BUCKET_BYTES).unwrap();
        let seq = u32::from_le_bytes(w[..4].try_into().unwrap());
        if u32::from_le_bytes(w[4..].try_into().unwrap()) != 0 {
            f.write_all_at(&(seq | 1).to_le_bytes(), index + b * BUCKET_BYTES)
                .unwrap();
            torn += 1;
        }
    }
    assert_eq!(torn, 16);
    // It used to spin in adoption forever, before binding its socket.
    o.start(&geometry("32mb"));
    let e = o.engine();
    assert_eq!(e.count_hits(NS, &(0..16).map(hash).collect::<Vec<_>>()), 16);
    assert_eq!(load(&e, 5), Some(content(5, 1)));
    let v = o.inspect(&["verify"]);
    assert_eq!(
        v.status.code(),
        Some(0),
        "verify: {}{}\nowner log:\n{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr),
        o.log_text()
    );
}

#[test]
fn an_owner_killed_while_reclaiming_an_engine_leaves_a_clean_pool() {
    // An engine says goodbye and the owner is SIGKILLed at once: often in
    // the middle of reclaiming it (slots freed, entry not yet cleared).
    // The next owner used to keep that entry as a live engine's (its
    // process runs on), with a stash listing slots it no longer held and
    // any pins it had kept for as long as the process lives.
    let mut o = Inst::new("reclaim-kill");
    o.start(&geometry("32mb"));
    for round in 0..25u8 {
        save(&o.engine(), 0..16, round);
        o.kill9();
        o.start(&geometry("32mb"));
        let v = o.inspect(&["verify"]);
        assert_eq!(
            v.status.code(),
            Some(0),
            "round {round}: verify after the restart: {}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
    }
}
