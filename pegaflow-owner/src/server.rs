//! The owner's Unix socket: accepts engines, checks their credentials,
//! answers their hello and CUDA IPC brokering messages, and notices when
//! they go.
//!
//! One thread polls the listener and every engine's connection. Nothing
//! here is on the hot path: engines talk to the socket once at connect and
//! then only to broker IPC handles. No peer can stall it: connections are
//! non-blocking, frames are assembled from whatever bytes arrived, replies
//! are queued and written as the peer reads them, and a peer that stays
//! mid-frame or stops reading for too long is disconnected (quarantined,
//! see `owner.rs`, never reclaimed while its process lives).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use pegaflow_shm::client::client_state;
use pegaflow_shm::proto::{self, ClientMsg, Hello, OwnerMsg, RejectReason};
use pegaflow_shm::sync::Ordering;
use tracing::{debug, error, info, warn};

use crate::owner::{Owner, SHUTDOWN};

/// A frame must arrive whole within this long once its first byte did.
const FRAME_DEADLINE: Duration = Duration::from_secs(10);
/// Replies queued for a peer that does not read them, before it is dropped.
const MAX_OUTBOX: usize = 4 << 20;
/// Brokered CUDA IPC handles: the owner keeps at most this many bytes and
/// keys (a handle is 64 bytes; a buggy engine must not grow the owner).
const MAX_IPC_BYTES: usize = 64 << 20;
const MAX_IPC_KEYS: usize = 1 << 16;
/// How often handles of engines that are gone are forgotten.
const IPC_SWEEP: Duration = Duration::from_secs(1);

/// Who may connect.
#[derive(Clone, Debug)]
pub struct Access {
    pub uid: u32,
    pub gid: Option<u32>,
}

impl Access {
    fn allows(&self, uid: u32, gid: u32, pid: i32) -> bool {
        if uid == 0 || uid == self.uid {
            return true;
        }
        let Some(group) = self.gid else { return false };
        gid == group || supplementary_groups(pid).contains(&group)
    }
}

fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Why the owner will not listen on a socket path.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(
        "socket {path} is in use by another pegaflow-owner{}; pick another --socket \
         (or stop that owner)",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    InUse { path: PathBuf, pid: Option<i32> },

    #[error(
        "--socket {path} exists and is not a socket ({kind}); the owner never deletes it: \
         pick another --socket, or remove the file yourself if it is stale"
    )]
    NotASocket { path: PathBuf, kind: &'static str },

    #[error(
        "socket directory {dir} is owned by uid {uid}, not by this owner's user (uid {me}) or \
         root: that user could replace the socket and receive every engine's hello. Remove the \
         directory (or give it to uid {me}), or pick another --socket (or PEGAFLOW_RUN_DIR)"
    )]
    DirForeign { dir: PathBuf, uid: u32, me: u32 },

    #[error(
        "socket directory {dir} is writable by {who} (mode {mode:o}) without the sticky bit: \
         anyone there could replace the socket. Run `chmod go-w {dir}` (or `chmod +t`), or pick \
         another --socket (or PEGAFLOW_RUN_DIR)"
    )]
    DirOpen {
        dir: PathBuf,
        mode: u32,
        who: &'static str,
    },

    #[error(
        "cannot tell whether socket {path} is in use ({source}); remove it if no owner uses it, \
         or pick another --socket"
    )]
    Probe { path: PathBuf, source: io::Error },

    #[error("cannot listen on {path}: {source}; pass --socket with a writable path")]
    Io { path: PathBuf, source: io::Error },
}

/// Check that the owner may take `path` without harming anyone: its
/// directory is safe (owned by us or root, not writable by others unless
/// sticky), and whatever is at the path is a socket nobody accepts on.
/// Read-only: run it before touching anything else, so a refused start
/// changes nothing. Returns whether a stale socket is there.
pub fn check_socket_path(path: &Path) -> Result<bool, BindError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BindError::Io { path, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match std::fs::metadata(&dir) {
        Ok(m) => {
            let me = nix::unistd::geteuid().as_raw();
            if m.uid() != me && m.uid() != 0 {
                return Err(BindError::DirForeign {
                    dir,
                    uid: m.uid(),
                    me,
                });
            }
            let mode = m.mode() & 0o7777;
            if mode & 0o022 != 0 && mode & 0o1000 == 0 {
                let who = if mode & 0o002 != 0 {
                    "everyone"
                } else {
                    "its group"
                };
                return Err(BindError::DirOpen { dir, mode, who });
            }
        }
        // Created by bind(), as ours.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err(&dir)(e)),
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err(path)(e)),
    };
    let ft = meta.file_type();
    if !ft.is_socket() {
        let kind = if ft.is_file() {
            "a regular file"
        } else if ft.is_dir() {
            "a directory"
        } else if ft.is_symlink() {
            "a symbolic link"
        } else {
            "not a socket"
        };
        return Err(BindError::NotASocket {
            path: path.into(),
            kind,
        });
    }
    match UnixStream::connect(path) {
        Ok(s) => {
            let pid = getsockopt(&s.as_fd(), PeerCredentials)
                .ok()
                .map(|c| c.pid())
                .filter(|&p| p > 0);
            Err(BindError::InUse {
                path: path.into(),
                pid,
            })
        }
        // Nobody listens: a dead owner's socket.
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(BindError::Probe {
            path: path.into(),
            source,
        }),
    }
}

/// Bind the socket after [`check_socket_path`], replacing a stale one, and
/// give it `mode` (and `gid`) explicitly, whatever the umask.
pub fn bind(path: &Path, mode: u32, gid: Option<u32>) -> Result<UnixListener, BindError> {
    let io_err = |source| BindError::Io {
        path: path.to_path_buf(),
        source,
    };
    let stale = check_socket_path(path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            // Ours, and 0755 whatever the umask: engines must traverse it,
            // nobody else may write to it.
            std::os::unix::fs::DirBuilderExt::mode(
                std::fs::DirBuilder::new().recursive(true),
                0o755,
            )
            .create(dir)
            .map_err(io_err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(io_err)?;
        }
    }
    if stale {
        match std::fs::remove_file(path) {
            Ok(()) => debug!(path = %path.display(), "removed a stale socket"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    // No moment with a socket more open than asked: bind under a umask
    // that leaves at most `mode` (this runs before any other thread).
    // SAFETY: umask has no preconditions; it is restored right after.
    let old = unsafe { libc::umask(!mode & 0o777) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(io_err)?;
    if let Some(g) = gid {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(g)))
            .map_err(|e| io_err(e.into()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
    listener.set_nonblocking(true).map_err(io_err)?;
    Ok(listener)
}

/// How a connection ended, which decides what happens to its client entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// The engine said goodbye: reclaim everything now.
    Goodbye,
    /// Anything else: reclaim once the process is gone (quarantine).
    Lost,
}

struct Conn {
    stream: UnixStream,
    client: Option<u32>,
    pid: i32,
    /// Bytes received that do not make a whole frame yet.
    inbox: Vec<u8>,
    /// When the frame now in `inbox` started arriving.
    partial_since: Option<Instant>,
    /// Encoded replies not yet written.
    outbox: Vec<u8>,
    /// Close once `outbox` is written (after a rejection).
    closing: bool,
}

/// One brokered handle, and the client entry that published it (its
/// handles are forgotten once that entry is reclaimed).
struct IpcEntry {
    handle: Vec<u8>,
    publisher: Option<(u32, u64)>,
}

pub struct Server {
    owner: Arc<Owner>,
    listener: UnixListener,
    path: PathBuf,
    access: Access,
    conns: HashMap<RawFd, Conn>,
    ipc: HashMap<String, IpcEntry>,
    ipc_bytes: usize,
    last_sweep: Instant,
}

impl Server {
    pub fn new(owner: Arc<Owner>, listener: UnixListener, path: PathBuf, access: Access) -> Server {
        Server {
            owner,
            listener,
            path,
            access,
            conns: HashMap::new(),
            ipc: HashMap::new(),
            ipc_bytes: 0,
            last_sweep: Instant::now(),
        }
    }

    /// Serve until shutdown.
    pub fn run(mut self) {
        while !SHUTDOWN.load(AtomicOrdering::Relaxed) {
            let mut fds = vec![libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            fds.extend(self.conns.iter().map(|(&fd, c)| libc::pollfd {
                fd,
                events: libc::POLLIN
                    | if c.outbox.is_empty() {
                        0
                    } else {
                        libc::POLLOUT
                    },
                revents: 0,
            }));
            // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd
            // of the given length for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    error!(error = %e, "poll on the engine socket failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            for pfd in &fds[1..] {
                if pfd.revents != 0 {
                    self.service(pfd.fd, pfd.revents);
                }
            }
            if fds[0].revents != 0 {
                self.accept_all();
            }
            // Engines the owner threw out (corrupt ring): close them.
            for idx in self.owner.take_kicked() {
                let fd = self
                    .conns
                    .iter()
                    .find(|(_, c)| c.client == Some(idx))
                    .map(|(&fd, _)| fd);
                if let Some(fd) = fd {
                    self.hang_up(
                        fd,
                        Ending::Lost,
                        "was thrown out: its request ring was corrupt",
                    );
                }
            }
            let stalled: Vec<RawFd> = self
                .conns
                .iter()
                .filter(|(_, c)| {
                    c.partial_since
                        .is_some_and(|t| t.elapsed() > FRAME_DEADLINE)
                })
                .map(|(&fd, _)| fd)
                .collect();
            for fd in stalled {
                self.hang_up(fd, Ending::Lost, "stalled in the middle of a message");
            }
            if self.last_sweep.elapsed() >= IPC_SWEEP {
                self.sweep_ipc();
                self.last_sweep = Instant::now();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.accept(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    return;
                }
            }
        }
    }

    fn accept(&mut self, stream: UnixStream) {
        let cred = match getsockopt(&stream.as_fd(), PeerCredentials) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot read the peer credentials of a connection; closing it");
                return;
            }
        };
        let (pid, uid, gid) = (cred.pid(), cred.uid(), cred.gid());
        if stream.set_nonblocking(true).is_err() {
            warn!(
                pid,
                "cannot make an engine connection non-blocking; closing it"
            );
            return;
        }
        let fd = stream.as_raw_fd();
        let mut conn = Conn {
            stream,
            client: None,
            pid,
            inbox: Vec::new(),
            partial_since: None,
            outbox: Vec::new(),
            closing: false,
        };
        if !self.access.allows(uid, gid, pid) {
            warn!(pid, uid, gid, "refused an engine with other credentials");
            let msg =
                format!(
                "permission denied: this owner runs as uid {} and admits only that user, root{}; \
                 run the engine as that user or start the owner with --group",
                self.access.uid,
                if self.access.gid.is_some() { " and its --group" } else { "" }
            );
            queue(&mut conn, &reject(RejectReason::PermissionDenied, msg));
            conn.closing = true;
        }
        self.conns.insert(fd, conn);
        self.flush(fd);
        debug!(pid, uid, "engine connected");
    }

    fn service(&mut self, fd: RawFd, revents: i16) {
        if revents & libc::POLLOUT != 0 {
            self.flush(fd);
        }
        let Some(conn) = self.conns.get_mut(&fd) else {
            return;
        };
        // Read what is there, never more than a frame's worth past a
        // partial one (a peer cannot make us buffer without bound).
        let mut eof = false;
        let mut chunk = [0u8; 16 << 10];
        while conn.inbox.len() <= proto::MAX_FRAME as usize + 4 {
            match conn.stream.read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => conn.inbox.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        loop {
            let Some(conn) = self.conns.get_mut(&fd) else {
                return;
            };
            match proto::take_frame::<ClientMsg>(&mut conn.inbox) {
                Ok(Some(msg)) => {
                    if let Some(ending) = self.handle(fd, msg) {
                        let why = match ending {
                            Ending::Goodbye => "said goodbye",
                            Ending::Lost => "sent a message out of order",
                        };
                        self.hang_up(fd, ending, why);
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(pid = conn.pid, client = ?conn.client, error = %e, "malformed message from an engine; disconnecting it");
                    self.hang_up(fd, Ending::Lost, "sent a malformed message");
                    return;
                }
            }
        }
        let Some(conn) = self.conns.get_mut(&fd) else {
            return;
        };
        conn.partial_since = match (conn.inbox.is_empty(), conn.partial_since) {
            (true, _) => None,
            (false, None) => Some(Instant::now()),
            (false, since) => since,
        };
        if eof
            || (revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
                && revents & libc::POLLIN == 0)
        {
            self.hang_up(fd, Ending::Lost, "hung up");
            return;
        }
        self.flush(fd);
    }

    /// Apply one message; `Some` when the connection must end.
    fn handle(&mut self, fd: RawFd, msg: ClientMsg) -> Option<Ending> {
        let conn = self.conns.get_mut(&fd)?;
        let (pid, client) = (conn.pid, conn.client);
        let reply = match msg {
            ClientMsg::Hello(hello) => {
                if client.is_some() {
                    warn!(
                        pid,
                        client, "hello sent twice on one connection; disconnecting it"
                    );
                    return Some(Ending::Lost);
                }
                let r = self.hello(pid, &hello);
                if let Some(c) = self.conns.get_mut(&fd) {
                    match &r {
                        OwnerMsg::Welcome(w) => c.client = Some(w.client),
                        _ => c.closing = true,
                    }
                }
                Some(r)
            }
            ClientMsg::PublishIpc { key, handle } => {
                self.publish_ipc(pid, client, key, handle);
                None
            }
            ClientMsg::FetchIpc { key } => {
                let handle = self.ipc.get(&key).map(|e| e.handle.clone());
                Some(OwnerMsg::IpcHandle { key, handle })
            }
            ClientMsg::Goodbye => return Some(Ending::Goodbye),
        };
        if let (Some(reply), Some(conn)) = (reply, self.conns.get_mut(&fd)) {
            queue(conn, &reply);
        }
        None
    }

    fn publish_ipc(&mut self, pid: i32, client: Option<u32>, key: String, handle: Vec<u8>) {
        let old = self.ipc.get(&key).map_or(0, |e| e.handle.len() + key.len());
        let new = handle.len() + key.len();
        let too_many = old == 0 && self.ipc.len() >= MAX_IPC_KEYS;
        if too_many || self.ipc_bytes - old + new > MAX_IPC_BYTES {
            warn!(
                pid,
                key,
                bytes = handle.len(),
                held_keys = self.ipc.len(),
                held_bytes = self.ipc_bytes,
                "IPC handle refused: the owner already holds {MAX_IPC_KEYS} keys or {} MiB of handles",
                MAX_IPC_BYTES >> 20
            );
            return;
        }
        debug!(pid, key, bytes = handle.len(), "ipc handle published");
        let publisher = client.and_then(|c| {
            let token = self
                .owner
                .segment()
                .client(c)?
                .entry
                .token
                .load(Ordering::Relaxed);
            Some((c, token))
        });
        self.ipc_bytes = self.ipc_bytes - old + new;
        self.ipc.insert(key, IpcEntry { handle, publisher });
    }

    /// Forget handles whose publisher's entry was reclaimed (its process
    /// exited or it said goodbye): they name memory that may be gone.
    /// Engines republish theirs when they reconnect.
    fn sweep_ipc(&mut self) {
        let seg = self.owner.segment().clone();
        let before = self.ipc.len();
        let mut freed = 0;
        self.ipc.retain(|key, e| {
            let keep = e.publisher.is_none_or(|(c, token)| {
                seg.client(c).is_some_and(|v| {
                    v.entry.state() != client_state::FREE
                        && v.entry.token.load(Ordering::Relaxed) == token
                })
            });
            if !keep {
                freed += e.handle.len() + key.len();
            }
            keep
        });
        self.ipc_bytes -= freed;
        if self.ipc.len() < before {
            debug!(
                dropped = before - self.ipc.len(),
                "forgot IPC handles of engines that are gone"
            );
        }
    }

    /// Write queued replies as far as the peer takes them.
    fn flush(&mut self, fd: RawFd) {
        let Some(conn) = self.conns.get_mut(&fd) else {
            return;
        };
        while !conn.outbox.is_empty() {
            match conn.stream.write(&conn.outbox) {
                Ok(0) => break,
                Ok(n) => {
                    conn.outbox.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!(pid = conn.pid, error = %e, "cannot write to an engine");
                    self.hang_up(fd, Ending::Lost, "stopped reading");
                    return;
                }
            }
        }
        if conn.outbox.len() > MAX_OUTBOX {
            self.hang_up(fd, Ending::Lost, "does not read the owner's replies");
        } else if conn.closing && conn.outbox.is_empty() {
            self.hang_up(fd, Ending::Lost, "was rejected");
        }
    }

    fn hello(&mut self, pid: i32, hello: &Hello) -> OwnerMsg {
        if hello.abi_version != pegaflow_shm::ABI_VERSION {
            warn!(
                pid,
                label = hello.label,
                found = hello.abi_version,
                expected = pegaflow_shm::ABI_VERSION,
                "engine speaks another shm ABI version; rejected"
            );
            return reject(
                RejectReason::AbiMismatch,
                format!(
                    "engine speaks shm ABI version {}, this owner speaks {}: upgrade the engine's \
                     pegaflow package and the owner together (docs/operations.md, upgrades)",
                    hello.abi_version,
                    pegaflow_shm::ABI_VERSION
                ),
            );
        }
        if hello.pid != pid as u32 {
            return reject(
                RejectReason::BadRequest,
                format!(
                    "hello claims pid {} but the socket peer is pid {pid}",
                    hello.pid
                ),
            );
        }
        match self.owner.admit(pid as u32, hello) {
            Ok(w) => OwnerMsg::Welcome(w),
            Err((reason, message)) => {
                warn!(
                    pid,
                    label = hello.label,
                    namespace = format!("{:#018x}", hello.namespace),
                    slot_bytes = hello.slot_bytes,
                    %message,
                    "engine rejected"
                );
                reject(reason, message)
            }
        }
    }

    fn hang_up(&mut self, fd: RawFd, ending: Ending, why: &str) {
        let Some(conn) = self.conns.remove(&fd) else {
            return;
        };
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        let Some(idx) = conn.client else { return };
        match ending {
            Ending::Goodbye => {
                let freed = self.owner.client_gone(idx);
                info!(
                    pid = conn.pid,
                    client = idx,
                    reclaimed_slots = freed,
                    "engine {why}; its slots are reclaimed"
                );
            }
            Ending::Lost => match self.owner.client_lost(idx) {
                Some(freed) => info!(
                    pid = conn.pid,
                    client = idx,
                    reclaimed_slots = freed,
                    "engine {why} and its process is gone; its slots and pins are reclaimed"
                ),
                None => info!(
                    pid = conn.pid,
                    client = idx,
                    "engine {why} while its process lives; its pins and writing slots are kept \
                     until the process exits or resumes"
                ),
            },
        }
    }
}

fn queue(conn: &mut Conn, msg: &OwnerMsg) {
    match proto::encode(msg) {
        Ok(frame) => conn.outbox.extend_from_slice(&frame),
        Err(e) => error!(pid = conn.pid, error = %e, "cannot encode a reply"),
    }
}

fn reject(reason: RejectReason, message: String) -> OwnerMsg {
    OwnerMsg::Rejected { reason, message }
}
