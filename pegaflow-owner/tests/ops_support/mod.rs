//! Shared by the `ops_*` tests: a real `pegaflow-owner` process in a private
//! shm directory, HTTP scrapes, `pegaflow-inspect` runs and an engine.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pegaflow_core::{BlockKey, Engine, EngineConfig};

pub const OWNER: &str = env!("CARGO_BIN_EXE_pegaflow-owner");
pub const INSPECT: &str = env!("CARGO_BIN_EXE_pegaflow-inspect");
pub const SLOT_BYTES: u64 = 64 << 10;
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A free TCP port on 127.0.0.1 (free when we looked).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// An owner process, killed on drop; its segments live in `dir`.
pub struct OwnerProc {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub metrics: SocketAddr,
    /// Flags added to every start.
    pub extra: Vec<String>,
    child: Option<Child>,
}

impl OwnerProc {
    /// Start an owner with a 64 MiB pool of 2 MiB slabs and wait for /health.
    pub fn start(tag: &str) -> OwnerProc {
        Self::start_with(tag, &[])
    }

    /// [`OwnerProc::start`] with more flags.
    pub fn start_with(tag: &str, extra: &[&str]) -> OwnerProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let name = format!("ops-{tag}-{}", std::process::id());
        let socket = dir.path().join("owner.sock");
        let mut o = OwnerProc {
            name,
            socket,
            metrics: SocketAddr::from(([127, 0, 0, 1], 0)),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir,
            child: None,
        };
        o.launch();
        o
    }

    pub fn shm_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn control(&self) -> PathBuf {
        self.dir.path().join(format!("pegaflow-{}.ctl", self.name))
    }

    pub fn command(&self, metrics_addr: &str) -> Command {
        let mut c = Command::new(OWNER);
        c.args(["--name", &self.name, "--socket"])
            .arg(&self.socket)
            .args([
                "--pool-size",
                "64mb",
                "--slab-size",
                "2mb",
                "--min-slot-size",
                "64kb",
                "--metrics-addr",
                metrics_addr,
            ])
            .args(&self.extra)
            .env("PEGAFLOW_SHM_DIR", self.dir.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        c
    }

    /// (Re)start the owner on a fresh port, retrying if the port was taken
    /// between our look and its bind.
    pub fn launch(&mut self) {
        for _ in 0..5 {
            let port = free_port();
            self.metrics = SocketAddr::from(([127, 0, 0, 1], port));
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join("owner.log"))
                .expect("owner log");
            let child = self
                .command(&self.metrics.to_string())
                .stdout(log.try_clone().expect("dup log"))
                .stderr(log)
                .spawn()
                .expect("spawn pegaflow-owner");
            self.child = Some(child);
            let deadline = Instant::now() + TIMEOUT;
            loop {
                if let Ok((200, _)) = http_get(self.metrics, "/health") {
                    return;
                }
                if let Some(status) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    let log = self.log();
                    assert!(
                        log.contains("--metrics-addr"),
                        "owner exited with {status} before serving: {log}"
                    );
                    break; // port race: try another one
                }
                assert!(
                    Instant::now() < deadline,
                    "owner did not become healthy: {}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("could not start the owner on a free port: {}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("owner.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("owner running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(s) = c.try_wait().expect("wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "owner ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn scrape(&self) -> String {
        let (code, body) = http_get(self.metrics, "/metrics").expect("scrape /metrics");
        assert_eq!(code, 200, "{body}");
        body
    }

    /// A scrape, or "" when /metrics does not answer 200.
    pub fn scrape_or_empty(&self) -> String {
        match http_get(self.metrics, "/metrics") {
            Ok((200, body)) => body,
            _ => String::new(),
        }
    }

    /// Scrape until `f` accepts the text.
    pub fn scrape_until(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let text = self.scrape();
            if f(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last scrape:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn engine(&self, label: &str, namespace: u64, slot_bytes: u64) -> Engine {
        let e = Engine::connect(EngineConfig {
            name: self.name.clone(),
            socket: Some(self.socket.clone()),
            label: label.into(),
            namespace,
            slot_bytes,
            ..Default::default()
        })
        .expect("engine connects");
        assert!(
            e.wait_connected(TIMEOUT),
            "engine did not connect: {}",
            self.log()
        );
        e
    }

    /// Run `pegaflow-inspect ARGS` against this owner's name and shm dir.
    pub fn inspect(&self, args: &[&str]) -> Output {
        Command::new(INSPECT)
            .args(["--name", &self.name])
            .args(args)
            .env("PEGAFLOW_SHM_DIR", self.dir.path())
            .output()
            .expect("run pegaflow-inspect")
    }
}

impl Drop for OwnerProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `pegaflow-inspect ARGS` with no name or shm dir of ours.
pub fn inspect_raw(args: &[&str]) -> Output {
    Command::new(INSPECT)
        .args(args)
        .output()
        .expect("run pegaflow-inspect")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): stdout {} stderr {}",
            stdout(o),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// GET `path`; (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_string()))
}

/// The value of one sample in a scrape (labels in exposition order).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    pegaflow_owner::metrics::find_sample(text, name, labels)
}

pub fn hash(i: u64) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    h[8..16].copy_from_slice(&i.to_le_bytes());
    h
}

pub fn keys(namespace: u64, range: std::ops::Range<u64>) -> Vec<BlockKey> {
    range.map(|i| BlockKey::new(namespace, hash(i))).collect()
}

/// Save `keys` (block i filled with byte i, `len` bytes each), never
/// asking for more slots than the engine's stash holds (so no save is
/// dropped); returns blocks committed.
pub fn save_all(
    owner: &OwnerProc,
    e: &Engine,
    label: &str,
    keys: &[BlockKey],
    len: usize,
) -> usize {
    let stash = |t: &str| {
        t.lines()
            .find(|l| {
                l.starts_with("pegaflow_client_stash_slots{")
                    && l.contains(&format!("label=\"{label}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0) as usize
    };
    let mut done = 0;
    while done < keys.len() {
        let t = owner.scrape_until("free slots in the stash", |t| stash(t) > 0);
        let n = stash(&t).min(keys.len() - done);
        let first = done;
        done += e.save_with(&keys[first..first + n], |i, buf| {
            buf[..len].fill((first + i) as u8);
            len
        });
    }
    done
}

/// One thread of another process stopped with ptrace (the rest of the
/// process runs on): how the tests wedge the owner's request loop, which
/// runs on the owner's main thread. Resumed on drop.
pub struct ThreadStop {
    tid: i32,
}

impl ThreadStop {
    /// Stop thread `tid` (of a child of this process). `Err` when this
    /// machine forbids ptrace (a container without CAP_SYS_PTRACE under
    /// Yama scope 2 or 3, a seccomp filter).
    pub fn new(tid: u32) -> Result<ThreadStop, std::io::Error> {
        let tid = tid as i32;
        // SAFETY: PTRACE_SEIZE/INTERRUPT take no pointers (addr and data 0).
        let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0usize, 0usize) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stop = ThreadStop { tid };
        // SAFETY: as above.
        if unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0usize, 0usize) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut status = 0;
        // SAFETY: status is a valid out pointer; __WALL waits for a thread.
        let got = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        if got != tid || !libc::WIFSTOPPED(status) {
            return Err(std::io::Error::other(format!(
                "thread {tid} did not stop (waitpid {got}, status {status:#x})"
            )));
        }
        Ok(stop)
    }
}

impl Drop for ThreadStop {
    fn drop(&mut self) {
        // SAFETY: detaching a tracee we stopped; no pointers.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.tid, 0usize, 0usize) };
    }
}
