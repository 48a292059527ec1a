//! One connection to one owner: the socket, the mapped segments and this
//! engine's client entry. A [`Session`] is immutable once made; the engine
//! swaps in a new one when it reconnects.
//!
//! Pins and reservations remember the session they were taken in, and act
//! on that session's entry and mapping for their whole life: after a
//! reconnect to the same entry (resumed) that is the same memory; after a
//! reconnect to a new segment it is the old one, which the owner no longer
//! serves but which still holds the old bytes. Nothing taken in one
//! session is ever applied to another segment's slots.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;

use parking_lot::Mutex;
use pegaflow_shm::doorbell::Doorbell;
use pegaflow_shm::proto::{self, ClientMsg, Hello, OwnerMsg, Resume, Welcome};
use pegaflow_shm::segment::{ClientView, ControlSegment, PoolSegment};
use pegaflow_shm::slot_table::{SlotKind, SlotState};
use pegaflow_shm::sync::Ordering;

use crate::error::EngineError;

/// Which client entry of which segment: what a pin or a reservation
/// belongs to. Two sessions with the same id act on the same memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EntryId {
    pub segment_id: u64,
    pub client: u32,
    pub token: u64,
}

/// State one engine shares across all of its sessions.
///
/// The locks serialise this process's writers of its client entry: the
/// request ring has one producer, the stash ring one consumer and the pin
/// counters one writer. They are per engine, not per session, because a
/// pin or reservation taken before a reconnect writes to the same (resumed)
/// entry as the new session does.
#[derive(Default)]
pub struct Shared {
    pub request_lock: Mutex<()>,
    pub stash_lock: Mutex<()>,
    pub pin_lock: Mutex<()>,
    /// Reserved slots whose commit or abort could not be queued (the owner
    /// was away, or the ring stayed full): still `Writing(us, gen)` in
    /// their entry, aborted once that entry is ours again, forgotten when
    /// it is not (the owner reclaims them when this process exits).
    pub spare: Mutex<Vec<(EntryId, u32, u32)>>,
    /// Saves skipped while disconnected, not yet added to the shared
    /// counters (the owner's metrics read those).
    pub skipped_unpublished: AtomicU64,
    /// The entry the owner serves for us right now, if any. A session whose
    /// socket died but whose entry was resumed by a newer session still
    /// pushes requests: its mapping is the same memory.
    pub live_entry: Mutex<Option<EntryId>>,
}

impl Shared {
    /// Whether requests pushed through `s` reach an owner that applies them.
    pub fn serves(&self, s: &Session) -> bool {
        s.is_alive() || *self.live_entry.lock() == Some(s.id())
    }
}

pub struct Session {
    pub ctl: ControlSegment,
    pub pool: Arc<PoolSegment>,
    pub welcome: Welcome,
    pub shared: Arc<Shared>,
    /// Writer half of the socket (IPC requests, goodbye).
    pub writer: Mutex<UnixStream>,
    /// Cleared when the owner hangs up.
    pub alive: AtomicBool,
}

impl Session {
    /// Connect, say hello, map the segments. `previous` lets the owner give
    /// back our entry after its restart (or after it threw us out), and
    /// lets us keep its pool mapping (and CUDA registration) when the owner
    /// still serves the very same segment.
    pub fn connect(
        socket: &Path,
        hello: Hello,
        previous: Option<&Session>,
        shared: Arc<Shared>,
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
        // The header names the pool file by inode: a mapping is only ever of
        // the pool this segment describes, never of a file that replaced it.
        let (dev, ino) = ctl.pool_identity();
        // Keep the old mapping (and its CUDA registration) only for the
        // same segment and the same file.
        let pool = match previous {
            Some(p)
                if p.welcome.segment_id == welcome.segment_id
                    && p.pool.identity == (dev, ino)
                    && p.pool.len() as u64 == pool_bytes =>
            {
                p.pool.clone()
            }
            _ => Arc::new(PoolSegment::open_checked(&pool_path, pool_bytes, dev, ino)?),
        };
        let reader = stream
            .try_clone()
            .map_err(|e| EngineError::Proto(e.into()))?;
        let session = Session {
            ctl,
            pool,
            welcome,
            shared,
            writer: Mutex::new(stream),
            alive: AtomicBool::new(true),
        };
        Ok((session, reader))
    }

    pub fn id(&self) -> EntryId {
        EntryId {
            segment_id: self.welcome.segment_id,
            client: self.welcome.client,
            token: self.welcome.token,
        }
    }

    pub fn client(&self) -> ClientView<'_> {
        self.ctl
            .client(self.welcome.client)
            .expect("owner gave an in-range client id")
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(AtomicOrdering::Acquire)
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

    /// Host address and valid length of a committed block: `slot` must
    /// still hold the block committed at generation `gen` ([`Self::is_committed`];
    /// the pin of whoever handed it over keeps it so). The length is clamped
    /// to the slot, whatever the slot table says.
    pub fn committed_block(&self, slot: u32, gen: u32) -> Option<(*const u8, usize)> {
        if !self.is_committed(slot, gen) {
            return None;
        }
        let (ptr, cap) = self.slot_ptr(slot)?;
        let len = self.ctl.slots()[slot as usize].len.load(Ordering::Relaxed);
        Some((ptr as *const u8, len.min(cap as u64) as usize))
    }

    /// Whether `slot` still holds the block committed at generation `gen`:
    /// it is `Committed` at `gen`, or `Evicting` at `gen`. An eviction the
    /// owner began is not one it finished: it backs off from a pin (for the
    /// microseconds of its pin check, or until the next owner if it died
    /// there), and a slot is rewritten only after it was freed, which moves
    /// it to the next generation. So bytes read before this says true were
    /// the committed ones. New pins are never taken on `Evicting`
    /// ([`pegaflow_shm::slot_table::SlotEntry::validate`]).
    pub fn is_committed(&self, slot: u32, gen: u32) -> bool {
        self.ctl
            .slots()
            .get(slot as usize)
            .and_then(|e| e.load_state())
            .is_some_and(|s| {
                matches!(s.kind, SlotKind::Committed | SlotKind::Evicting) && s.gen == gen
            })
    }

    /// Whether `slot` is `Writing(us)` at generation `gen`.
    pub fn is_ours_writing(&self, slot: u32, gen: u32) -> bool {
        let me = self.welcome.client;
        self.ctl
            .slots()
            .get(slot as usize)
            .and_then(|e| e.load_state())
            .is_some_and(|s: SlotState| {
                s.kind == SlotKind::Writing && u32::from(s.client) == me && s.gen == gen
            })
    }
}

impl Drop for Session {
    /// The last holder of this session is gone: no pin or reservation taken
    /// in it remains, so a goodbye lets the owner reclaim the entry at once
    /// (a dead socket just ignores it).
    fn drop(&mut self) {
        if self.is_alive() {
            let w = self.writer.get_mut();
            let _ = proto::send(w, &ClientMsg::Goodbye);
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
    }
}
