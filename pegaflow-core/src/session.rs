//! One connection to one owner: the socket, the mapped segments and this
//! engine's client entry. A [`Session`] is immutable once made; the engine
//! swaps in a new one when it reconnects.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;

use parking_lot::Mutex;
use pegaflow_shm::doorbell::Doorbell;
use pegaflow_shm::proto::{self, ClientMsg, Hello, OwnerMsg, Resume, Welcome};
use pegaflow_shm::segment::{ClientView, ControlSegment, PoolSegment};
use pegaflow_shm::sync::Ordering;

use crate::error::EngineError;

pub struct Session {
    pub ctl: ControlSegment,
    pub pool: Arc<PoolSegment>,
    pub welcome: Welcome,
    /// Writer half of the socket (IPC requests, goodbye).
    pub writer: Mutex<UnixStream>,
    /// Cleared when the owner hangs up.
    pub alive: AtomicBool,
    /// Serialises this process's producers of the request ring (SPSC).
    pub request_lock: Mutex<()>,
    /// Serialises this process's consumers of the stash ring (SPSC).
    pub stash_lock: Mutex<()>,
}

impl Session {
    /// Connect, say hello, map the segments. `previous` lets the owner give
    /// back our entry after its restart.
    pub fn connect(
        socket: &Path,
        hello: Hello,
        previous: Option<&Session>,
        reuse_pool: Option<Arc<PoolSegment>>,
    ) -> Result<(Session, UnixStream), EngineError> {
        let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => EngineError::SocketPermission {
                path: socket.into(),
            },
            _ => EngineError::Proto(e.into()),
        })?;
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .ok();
        let hello = Hello {
            resume: previous.map(|p| Resume {
                segment_id: p.welcome.segment_id,
                client: p.welcome.client,
                token: p.welcome.token,
            }),
            ..hello
        };
        // The owner may refuse us before reading our hello (credentials) and
        // close; its answer is then already waiting even if our send failed.
        let sent = proto::send(&mut stream, &ClientMsg::Hello(hello));
        let reply = proto::recv::<OwnerMsg>(&mut stream);
        let welcome = match (reply, sent) {
            (Ok(OwnerMsg::Rejected { reason, message }), _) => {
                return Err(EngineError::Rejected { reason, message })
            }
            (_, Err(e)) | (Err(e), Ok(())) => return Err(e.into()),
            (Ok(OwnerMsg::Welcome(w)), Ok(())) => w,
            (Ok(other), Ok(())) => {
                return Err(EngineError::Config(format!(
                    "unexpected reply to hello: {other:?}"
                )))
            }
        };
        stream.set_read_timeout(None).ok();
        let ctl = ControlSegment::open(&PathBuf::from(&welcome.control_path))?;
        if ctl.header().segment_id != welcome.segment_id {
            return Err(EngineError::Config(
                "owner's segment changed during connect; retrying".into(),
            ));
        }
        let pool_path = PathBuf::from(&welcome.pool_path);
        let pool_bytes = ctl.geometry().pool_bytes;
        // Keep the old mapping (and its CUDA registration) when the pool is
        // the same file.
        let pool = match reuse_pool {
            Some(p)
                if p.path() == pool_path
                    && p.len() as u64 == pool_bytes
                    && same_file(&p, &pool_path) =>
            {
                p
            }
            _ => Arc::new(PoolSegment::open(&pool_path, pool_bytes)?),
        };
        let reader = stream
            .try_clone()
            .map_err(|e| EngineError::Proto(e.into()))?;
        let session = Session {
            ctl,
            pool,
            welcome,
            writer: Mutex::new(stream),
            alive: AtomicBool::new(true),
            request_lock: Mutex::new(()),
            stash_lock: Mutex::new(()),
        };
        Ok((session, reader))
    }

    pub fn client(&self) -> ClientView<'_> {
        self.ctl
            .client(self.welcome.client)
            .expect("owner gave an in-range client id")
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(AtomicOrdering::Acquire)
    }

    /// Whether our client entry is still ours (so our pins may be touched).
    pub fn owns_entry(&self) -> bool {
        self.client().entry.token.load(Ordering::Relaxed) == self.welcome.token
    }

    pub fn ring_owner(&self) {
        let h = self.ctl.header();
        Doorbell {
            word: &h.doorbell,
            sleeping: &h.owner_sleeping,
        }
        .ring();
    }

    /// Host address of `slot` and its capacity, if the id is valid.
    pub fn slot_ptr(&self, slot: u32) -> Option<(*mut u8, usize)> {
        let (off, stride) = self.ctl.slot_location(slot)?;
        if off + stride > self.pool.len() as u64 {
            return None;
        }
        // SAFETY: off + stride <= pool length, checked above, so the pointer
        // stays inside the live pool mapping held by `self.pool`.
        Some((
            unsafe { self.pool.as_ptr().add(off as usize) },
            stride as usize,
        ))
    }
}

fn same_file(pool: &PoolSegment, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| (m.dev(), m.ino()) == pool.identity)
        .unwrap_or(false)
}
