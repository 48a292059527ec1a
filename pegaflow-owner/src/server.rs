//! The owner's Unix socket: accepts engines, checks their credentials,
//! answers their hello and CUDA IPC brokering messages, and notices their
//! death by hang-up.
//!
//! One thread polls the listener and every engine's connection. Nothing
//! here is on the hot path: engines talk to the socket once at connect and
//! then only to broker IPC handles.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use pegaflow_shm::proto::{self, ClientMsg, Hello, OwnerMsg, RejectReason};
use tracing::{debug, error, info, warn};

use crate::owner::{Owner, SHUTDOWN};

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

struct Conn {
    stream: UnixStream,
    client: Option<u32>,
    pid: i32,
}

pub struct Server {
    owner: Arc<Owner>,
    listener: UnixListener,
    path: PathBuf,
    access: Access,
    conns: HashMap<RawFd, Conn>,
    ipc: HashMap<String, Vec<u8>>,
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
            fds.extend(self.conns.keys().map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            }));
            // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd
            // of the given length for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 200) };
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
                    self.hang_up(fd, "its request ring was corrupt");
                }
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
        let mut stream = stream;
        if !self.access.allows(uid, gid, pid) {
            warn!(pid, uid, gid, "refused an engine with other credentials");
            let msg =
                format!(
                "permission denied: this owner runs as uid {} and admits only that user, root{}; \
                 run the engine as that user or start the owner with --group",
                self.access.uid,
                if self.access.gid.is_some() { " and its --group" } else { "" }
            );
            let _ = proto::send(
                &mut stream,
                &OwnerMsg::Rejected {
                    reason: RejectReason::PermissionDenied,
                    message: msg,
                },
            );
            return;
        }
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        let fd = stream.as_raw_fd();
        self.conns.insert(
            fd,
            Conn {
                stream,
                client: None,
                pid,
            },
        );
        debug!(pid, uid, "engine connected");
    }

    fn service(&mut self, fd: RawFd, revents: i16) {
        let Some(conn) = self.conns.get_mut(&fd) else {
            return;
        };
        if revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
            && revents & libc::POLLIN == 0
        {
            self.hang_up(fd, "hung up");
            return;
        }
        let msg: ClientMsg = match proto::recv(&mut conn.stream) {
            Ok(m) => m,
            Err(pegaflow_shm::ProtoError::Closed) => {
                self.hang_up(fd, "hung up");
                return;
            }
            Err(e) => {
                warn!(pid = conn.pid, client = ?conn.client, error = %e, "malformed message from an engine; disconnecting it");
                self.hang_up(fd, "sent a malformed message");
                return;
            }
        };
        let reply = match msg {
            ClientMsg::Hello(hello) => {
                if conn.client.is_some() {
                    Some(reject(
                        RejectReason::BadRequest,
                        "hello sent twice on one connection".into(),
                    ))
                } else {
                    let pid = conn.pid;
                    let r = self.hello(pid, &hello);
                    if let OwnerMsg::Welcome(w) = &r {
                        if let Some(c) = self.conns.get_mut(&fd) {
                            c.client = Some(w.client);
                        }
                    }
                    Some(r)
                }
            }
            ClientMsg::PublishIpc { key, handle } => {
                debug!(
                    pid = conn.pid,
                    key,
                    bytes = handle.len(),
                    "ipc handle published"
                );
                self.ipc.insert(key, handle);
                None
            }
            ClientMsg::FetchIpc { key } => {
                let handle = self.ipc.get(&key).cloned();
                Some(OwnerMsg::IpcHandle { key, handle })
            }
            ClientMsg::Goodbye => {
                self.hang_up(fd, "said goodbye");
                return;
            }
        };
        if let Some(reply) = reply {
            let Some(conn) = self.conns.get_mut(&fd) else {
                return;
            };
            let rejected = matches!(reply, OwnerMsg::Rejected { .. });
            if let Err(e) = proto::send(&mut conn.stream, &reply) {
                warn!(pid = conn.pid, client = ?conn.client, error = %e, "cannot answer an engine; disconnecting it");
                self.hang_up(fd, "stopped reading");
            } else if rejected {
                self.hang_up(fd, "was rejected");
            }
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

    fn hang_up(&mut self, fd: RawFd, why: &str) {
        let Some(conn) = self.conns.remove(&fd) else {
            return;
        };
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        if let Some(idx) = conn.client {
            let freed = self.owner.client_gone(idx);
            info!(
                pid = conn.pid,
                client = idx,
                reclaimed_slots = freed,
                "engine {why}; its slots and pins are reclaimed"
            );
        }
    }
}

fn reject(reason: RejectReason, message: String) -> OwnerMsg {
    OwnerMsg::Rejected { reason, message }
}
