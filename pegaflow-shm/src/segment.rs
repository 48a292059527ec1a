//! Creating, re-adopting and opening the two named segments.
//!
//! - The **control segment** (`/dev/shm/pegaflow-<name>.ctl`) holds the
//!   header, slab and slot tables, the index and the client table.
//! - The **pool segment** (`/dev/shm/pegaflow-<name>.pool`, or on a
//!   hugetlbfs mount with `--use-hugepages`) holds KV bytes only.
//!
//! Both are plain files, so they outlive any process: a restarted owner
//! re-adopts them and every committed block is still there.
//!
//! ## Owner lock
//!
//! The owner holds an exclusive `flock` on a third file,
//! `pegaflow-<name>.lock` ([`OwnerLock`]), for as long as it lives; the
//! kernel drops it when the owner dies, however it dies, so a second owner
//! is refused exactly while the first one is alive. The lock file is never
//! replaced, unlike the segments.
//!
//! ## New segments are new files
//!
//! A segment is never truncated or rewritten in place. A new one is built
//! under a temporary name in the same directory ([`NewFile`]): created,
//! given its mode and group explicitly, its whole size reserved
//! (`fallocate`, or the mapping's reservation on hugetlbfs: a full
//! filesystem is a clear error at start, not a SIGBUS later), its header written while no other process can have it mapped,
//! and only then renamed over the final path. An engine that still maps the
//! old file keeps the old pages (and its CUDA registration keeps covering
//! them): it can never see another key's bytes at an offset it had
//! validated. The control header records the pool file's device and inode,
//! and engines map a pool only if the file at its path is that inode
//! ([`PoolSegment::open_checked`]).
//!
//! This is the only module that turns mapped bytes into references: every
//! accessor below checks offsets against the validated [`Layout`] first.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use memmap2::{MmapOptions, MmapRaw};

use crate::client::ClientEntry;
use crate::error::SegmentError;
use crate::geometry::{Geometry, Layout, REQUEST_BYTES};
use crate::header::{Header, ABI_VERSION, MAGIC};
use crate::index::{Bucket, Index};
use crate::ring::{Ring, RingHeader};
use crate::slot_table::{SlabEntry, SlotEntry, SlotKind};
use crate::ssd_set::SsdSet;
use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// Where a pool lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolBacking {
    /// A file in `/dev/shm` (tmpfs, 4 KiB pages): works everywhere.
    Shm,
    /// A file on this hugetlbfs mount (2 MiB pages).
    Hugetlbfs(PathBuf),
}

/// Directory of the control segment and the default pool backing.
pub fn shm_dir() -> PathBuf {
    std::env::var_os("PEGAFLOW_SHM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm"))
}

pub fn control_path(name: &str) -> PathBuf {
    shm_dir().join(format!("pegaflow-{name}.ctl"))
}

/// The owner's lock file: `<shm_dir>/pegaflow-<name>.lock`.
pub fn lock_path(name: &str) -> PathBuf {
    shm_dir().join(format!("pegaflow-{name}.lock"))
}

pub fn pool_path(name: &str, backing: &PoolBacking) -> PathBuf {
    match backing {
        PoolBacking::Shm => shm_dir().join(format!("pegaflow-{name}.pool")),
        PoolBacking::Hugetlbfs(mount) => mount.join(format!("pegaflow-{name}.pool")),
    }
}

/// The first hugetlbfs mount with 2 MiB pages, from /proc/mounts.
pub fn find_hugetlbfs() -> Result<PathBuf, SegmentError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|source| SegmentError::Io {
        path: "/proc/mounts".into(),
        source,
    })?;
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && f[2] == "hugetlbfs").then(|| (f[1], f[3]))
        })
        // No pagesize option means the default huge page size (2 MiB on x86).
        .find(|(_, opts)| !opts.contains("pagesize=") || opts.contains("pagesize=2M"))
        .map(|(mnt, _)| PathBuf::from(mnt.replace("\\040", " ")))
        .ok_or(SegmentError::NoHugetlbfs)
}

/// 2 MiB huge pages free and not reserved by a mapping, from /proc/meminfo
/// (`HugePages_Free - HugePages_Rsvd`): what a new pool can still get.
pub fn free_hugepages() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    field("HugePages_Free:").saturating_sub(field("HugePages_Rsvd:"))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SegmentError + '_ {
    move |source| SegmentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if File::open("/dev/urandom")
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        // Not secret, only distinct: time and pid will do.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 40);
    }
    u64::from_le_bytes(b)
}

/// Mode and group the owner gives every file it creates or re-adopts
/// (lock, segments, socket).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms {
    /// 0o600, or 0o660 with a group.
    pub mode: u32,
    pub gid: Option<u32>,
}

impl Perms {
    pub const PRIVATE: Perms = Perms {
        mode: 0o600,
        gid: None,
    };

    /// Give `file` this mode and group, explicitly: `open(2)`'s mode is
    /// masked by the process umask (0o022 makes 0o660 into 0o640, and a
    /// group member could not map the segment), `fchmod(2)`'s is not.
    /// Changes only what differs, so re-adopting a file someone else owns
    /// with the right mode already is no error.
    pub fn apply(&self, file: &File, path: &Path) -> Result<(), SegmentError> {
        let meta = file.metadata().map_err(io_err(path))?;
        let fail = |source| SegmentError::Permissions {
            path: path.into(),
            mode: self.mode,
            gid: self.gid,
            source,
        };
        if let Some(gid) = self.gid.filter(|&g| g != meta.gid()) {
            // SAFETY: fchown on an owned, open descriptor; uid -1 keeps the owner.
            if unsafe { libc::fchown(file.as_raw_fd(), u32::MAX, gid) } != 0 {
                return Err(fail(io::Error::last_os_error()));
            }
        }
        if meta.mode() & 0o7777 != self.mode {
            // SAFETY: fchmod on an owned, open descriptor.
            if unsafe { libc::fchmod(file.as_raw_fd(), self.mode) } != 0 {
                return Err(fail(io::Error::last_os_error()));
            }
        }
        Ok(())
    }
}

/// The single-owner lock of an instance name, held for the owner's life.
///
/// An exclusive `flock` on `pegaflow-<name>.lock`, a file that is created
/// once and never replaced or truncated to another inode: whoever holds it
/// may replace the segments. It contains the holder's pid (text), so a
/// refused owner can name the one that runs.
pub struct OwnerLock {
    _file: File,
    path: PathBuf,
}

impl OwnerLock {
    /// Take the lock of `name`, or fail with [`SegmentError::OwnerAlive`]
    /// naming the owner that holds it.
    pub fn acquire(name: &str, perms: Perms) -> Result<OwnerLock, SegmentError> {
        let path = lock_path(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(perms.mode)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock on a valid, owned descriptor; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(SegmentError::Io { path, source: err });
            }
            return Err(SegmentError::OwnerAlive {
                name: name.into(),
                pid: lock_holder(&path, name),
                path,
            });
        }
        perms.apply(&file, &path)?;
        let pid = format!("{}\n", std::process::id());
        file.set_len(0).map_err(io_err(&path))?;
        file.write_all_at(pid.as_bytes(), 0)
            .map_err(io_err(&path))?;
        Ok(OwnerLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Pid of the owner holding `name`'s lock: from the lock file, else from
/// the control header (0 if neither says).
fn lock_holder(lock: &Path, name: &str) -> u32 {
    std::fs::read_to_string(lock)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&p| p != 0)
        .or_else(|| {
            ControlSegment::open_read_only(&control_path(name))
                .ok()
                .map(|s| s.header().owner_pid.load(Ordering::SeqCst))
        })
        .unwrap_or(0)
}

/// A file being built under a temporary name beside its final path.
/// [`NewFile::publish`] renames it into place; dropping it unpublished
/// removes it, so a start that fails half-way leaves nothing behind.
pub struct NewFile {
    tmp: PathBuf,
    path: PathBuf,
    published: bool,
}

impl NewFile {
    /// Create `.<file name>.new-<pid>-<random>` beside `path` (same
    /// directory, so the rename is atomic), with `perms` applied.
    fn create(path: &Path, perms: Perms) -> Result<(File, NewFile), SegmentError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let base = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(
            ".{base}.new-{}-{:016x}",
            std::process::id(),
            random_u64()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(perms.mode)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        let new = NewFile {
            tmp,
            path: path.into(),
            published: false,
        };
        perms.apply(&file, &new.tmp)?;
        Ok((file, new))
    }

    /// The path the file will have once published.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rename the file over its final path (replacing any file there; whoever
    /// maps that one keeps its pages).
    pub fn publish(mut self) -> Result<PathBuf, SegmentError> {
        std::fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))?;
        self.published = true;
        Ok(self.path.clone())
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Remove the temporary files of a start of `name` that died before
/// publishing them. Call only while holding `name`'s [`OwnerLock`]: then no
/// other process is building any. Returns the paths removed.
pub fn remove_unpublished(name: &str, backing: &PoolBacking) -> Vec<PathBuf> {
    let targets = [control_path(name), pool_path(name, backing)];
    let mut removed = Vec::new();
    for target in &targets {
        let (Some(dir), Some(base)) = (target.parent(), target.file_name()) else {
            continue;
        };
        let prefix = format!(".{}.new-", base.to_string_lossy());
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let fname = e.file_name().to_string_lossy().into_owned();
            // Exactly `<prefix><pid>-<hex>`: another name's files never match.
            let ours = fname.strip_prefix(&prefix).is_some_and(|rest| {
                rest.split_once('-').is_some_and(|(pid, rnd)| {
                    !pid.is_empty()
                        && pid.bytes().all(|b| b.is_ascii_digit())
                        && !rnd.is_empty()
                        && rnd.bytes().all(|b| b.is_ascii_hexdigit())
                })
            });
            if ours && std::fs::remove_file(e.path()).is_ok() {
                removed.push(e.path());
            }
        }
    }
    removed
}

/// What is at a segment path before the owner touches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileState {
    Missing,
    /// Zero bytes long (a start cut short by an older version, or a file
    /// someone truncated).
    Empty,
    Present {
        len: u64,
        /// (device, inode)
        id: (u64, u64),
    },
}

/// Look at `path` without opening it.
pub fn probe_file(path: &Path) -> Result<FileState, SegmentError> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() == 0 => Ok(FileState::Empty),
        Ok(m) => Ok(FileState::Present {
            len: m.len(),
            id: (m.dev(), m.ino()),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(FileState::Missing),
        Err(e) => Err(SegmentError::Io {
            path: path.into(),
            source: e,
        }),
    }
}

/// Allocate `bytes` for `file` up front (`fallocate(2)`), 1 GiB at a time,
/// calling `progress` with the bytes reserved so far. On a filesystem that
/// does not support it, the file is only extended (its pages are then
/// allocated on first touch).
///
/// On hugetlbfs (`hugepages`) the file is only sized: there the shared
/// mapping the owner makes next reserves every huge page of it (mmap fails
/// with ENOMEM otherwise, see [`PoolSegment::create`]), and faults on a
/// reserved mapping cannot fail. `fallocate` would reserve them too, but
/// it zeroes each page on one thread, where the parallel prefault that
/// follows is many times faster on a large pool.
fn reserve(
    file: &File,
    new: &NewFile,
    bytes: u64,
    hugepages: bool,
    progress: &mut dyn FnMut(u64),
) -> Result<(), SegmentError> {
    const CHUNK: u64 = 1 << 30;
    if hugepages {
        return file.set_len(bytes).map_err(io_err(&new.path));
    }
    let mut off = 0;
    while off < bytes {
        let len = CHUNK.min(bytes - off);
        // SAFETY: fallocate on an owned, open descriptor; no memory is passed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, off as i64, len as i64) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) => {
                    return file.set_len(bytes).map_err(io_err(&new.path));
                }
                Some(libc::ENOSPC) => {
                    // What we reserved so far is given back before measuring.
                    file.set_len(0).map_err(io_err(&new.path))?;
                    return Err(no_space(&new.path, bytes, hugepages));
                }
                _ => {
                    return Err(SegmentError::Io {
                        path: new.path.clone(),
                        source: err,
                    })
                }
            }
        }
        off += len;
        progress(off);
    }
    Ok(())
}

fn no_space(path: &Path, asked: u64, hugepages: bool) -> SegmentError {
    let dir = path.parent().unwrap_or(Path::new("."));
    let fs = nix::sys::statvfs::statvfs(dir).ok();
    let fs_free = fs
        .as_ref()
        .map(|s| s.blocks_available() * s.fragment_size());
    let free = if hugepages {
        // A hugetlbfs mount with size= reports its own limit; one without
        // reports no blocks at all.
        let global = free_hugepages() * (2 << 20);
        match fs.as_ref().filter(|s| s.blocks() > 0) {
            Some(_) => global.min(fs_free.unwrap_or(global)),
            None => global,
        }
    } else {
        fs_free.unwrap_or(0)
    };
    let hint = if hugepages {
        format!(
            " ({} free 2 MiB huge pages not reserved by other mappings; the mount's size= \
             option can also limit it)",
            free_hugepages()
        )
    } else {
        format!(" ({})", dir.display())
    };
    SegmentError::NoSpace {
        path: path.into(),
        asked,
        free,
        hint,
    }
}

/// Reserve whatever of an adopted file is not allocated yet (a file someone
/// copied sparse): cheap to check (`st_blocks`), and it keeps the promise
/// that a running owner never meets a full filesystem in its segments. On
/// hugetlbfs the mapping reserves the pages (see [`reserve`]).
fn ensure_reserved(file: &File, path: &Path, hugepages: bool) -> Result<(), SegmentError> {
    if hugepages {
        return Ok(());
    }
    let meta = file.metadata().map_err(io_err(path))?;
    if meta.blocks() * 512 >= meta.len() {
        return Ok(());
    }
    // SAFETY: fallocate on an owned, open descriptor; KEEP_SIZE never
    // changes the file's length.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            0,
            meta.len() as i64,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) => Ok(()),
            Some(libc::ENOSPC) => Err(no_space(path, meta.len(), hugepages)),
            _ => Err(SegmentError::Io {
                path: path.into(),
                source: err,
            }),
        };
    }
    Ok(())
}

/// A mapped control segment.
pub struct ControlSegment {
    map: MmapRaw,
    file: File,
    path: PathBuf,
    geometry: Geometry,
    layout: Layout,
}

/// An engine's (or the owner's) view of one client area.
pub struct ClientView<'a> {
    pub index: u32,
    pub entry: &'a ClientEntry,
    /// Engine -> owner requests (8 words each).
    pub requests: Ring<'a, 8>,
    /// Owner -> engine free slots (`slot | gen << 32`).
    pub stash: Ring<'a, 1>,
    /// This client's pin counter for every slot.
    pub pins: &'a [AtomicU32],
}

impl ControlSegment {
    /// Owner: build a new, empty control segment for `path` as a
    /// [`NewFile`] (publish it to make it visible), recording `pool` as its
    /// pool. Its whole size is reserved up front.
    pub fn create(
        path: &Path,
        geometry: Geometry,
        perms: Perms,
        pool: &PoolSegment,
        hugepages: bool,
    ) -> Result<(ControlSegment, NewFile), SegmentError> {
        geometry.validate()?;
        let pool_path = pool.path().as_os_str().as_encoded_bytes();
        if pool_path.len() > 255 {
            return Err(SegmentError::PathTooLong {
                path: pool.path().into(),
            });
        }
        let layout = geometry.layout();
        let (file, new) = NewFile::create(path, perms)?;
        reserve(&file, &new, layout.total, false, &mut |_| {})?;
        let map = MmapOptions::new()
            .len(layout.total as usize)
            .map_raw(&file)
            .map_err(io_err(path))?;
        let seg = ControlSegment {
            map,
            file,
            path: path.into(),
            geometry,
            layout,
        };
        // SAFETY: the file was created by us a moment ago under a random
        // temporary name (O_EXCL) and is not published yet, so no other
        // process has it mapped.
        unsafe { seg.init_header(pool_path, hugepages, pool.identity) };
        Ok((seg, new))
    }

    /// Owner, re-adopting a segment opened with [`ControlSegment::open`]:
    /// give it `perms` and reserve any part of it that is not allocated.
    pub fn take_over(&self, perms: Perms) -> Result<(), SegmentError> {
        perms.apply(&self.file, &self.path)?;
        ensure_reserved(&self.file, &self.path, false)
    }

    /// Engine: open a running owner's segment read-write.
    pub fn open(path: &Path) -> Result<ControlSegment, SegmentError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        Self::map(file, path, false)
    }

    /// `pegaflow-inspect`: map read-only; never writes, takes no lock, and
    /// works on a segment whose owner is dead.
    pub fn open_read_only(path: &Path) -> Result<ControlSegment, SegmentError> {
        let file = File::open(path).map_err(io_err(path))?;
        Self::map(file, path, true)
    }

    fn map(file: File, path: &Path, read_only: bool) -> Result<ControlSegment, SegmentError> {
        let size = file.metadata().map_err(io_err(path))?.len();
        let hdr_len = std::mem::size_of::<Header>() as u64;
        if size < hdr_len {
            return Err(SegmentError::Truncated {
                path: path.into(),
                actual: size,
                expected: hdr_len,
            });
        }
        let map_hdr = |len: u64| {
            let mut o = MmapOptions::new();
            o.len(len as usize);
            if read_only {
                o.map_raw_read_only(&file)
            } else {
                o.map_raw(&file)
            }
        };
        let probe = map_hdr(hdr_len).map_err(io_err(path))?;
        // SAFETY: the mapping is at least size_of::<Header>() bytes and
        // page-aligned; Header is repr(C) of integers and atomics, for which
        // any bit pattern is valid.
        let hdr = unsafe { &*(probe.as_ptr() as *const Header) };
        if hdr.magic != MAGIC {
            return Err(SegmentError::BadMagic { path: path.into() });
        }
        if hdr.abi_version != ABI_VERSION {
            return Err(SegmentError::AbiMismatch {
                path: path.into(),
                found: hdr.abi_version,
                expected: ABI_VERSION,
            });
        }
        let geometry = hdr.geometry;
        geometry.validate()?;
        let layout = geometry.layout();
        if size < layout.total {
            return Err(SegmentError::Truncated {
                path: path.into(),
                actual: size,
                expected: layout.total,
            });
        }
        drop(probe);
        let map = map_hdr(layout.total).map_err(io_err(path))?;
        Ok(ControlSegment {
            map,
            file,
            path: path.into(),
            geometry,
            layout,
        })
    }

    /// # Safety
    ///
    /// No other process may have the file mapped (it is a fresh, unpublished
    /// [`NewFile`]): the header's plain fields are written through a `&mut`.
    unsafe fn init_header(&self, pool_path: &[u8], hugepages: bool, pool_id: (u64, u64)) {
        // The mapping is writable, page-aligned and larger than a Header;
        // exclusive per the caller's contract.
        let h = &mut *(self.map.as_mut_ptr() as *mut Header);
        h.magic = MAGIC;
        h.abi_version = ABI_VERSION;
        h.header_bytes = std::mem::size_of::<Header>() as u32;
        h.geometry = self.geometry;
        h.segment_id = random_u64();
        h.created_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let n = pool_path.len().min(h.pool_path.len() - 1);
        h.pool_path[..n].copy_from_slice(&pool_path[..n]);
        h.hugepages = u32::from(hugepages);
        (h.pool_dev, h.pool_ino) = pool_id;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pool file's (device, inode) recorded at creation.
    pub fn pool_identity(&self) -> (u64, u64) {
        let h = self.header();
        (h.pool_dev, h.pool_ino)
    }

    /// Slots whose state is committed (or evicting): the blocks this
    /// segment caches. For logging what a discarded segment held.
    pub fn committed_slots(&self) -> u64 {
        self.slots()
            .iter()
            .filter(|e| {
                matches!(
                    e.load_state().map(|s| s.kind),
                    Some(SlotKind::Committed | SlotKind::Evicting)
                )
            })
            .count() as u64
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Base and length of the mapping.
    pub fn bytes(&self) -> (*const u8, usize) {
        (self.map.as_ptr(), self.map.len())
    }

    /// # Safety
    ///
    /// `offset + count * size_of::<T>()` must lie within the mapping, the
    /// offset must be aligned for `T`, and any bit pattern must be a valid
    /// `T` (true of the atomics-only shm structs).
    unsafe fn slice_at<T>(&self, offset: u64, count: u64) -> &[T] {
        debug_assert!(offset + count * std::mem::size_of::<T>() as u64 <= self.map.len() as u64);
        debug_assert_eq!(offset as usize % std::mem::align_of::<T>(), 0);
        std::slice::from_raw_parts(
            self.map.as_ptr().add(offset as usize) as *const T,
            count as usize,
        )
    }

    pub fn header(&self) -> &Header {
        // SAFETY: offset 0, length checked in map(); Header is all atomics
        // and integers.
        unsafe { &self.slice_at::<Header>(self.layout.header, 1)[0] }
    }

    pub fn slabs(&self) -> &[SlabEntry] {
        // SAFETY: the layout places num_slabs entries at `slabs`, inside the
        // mapping (map() checked the file is layout.total bytes), 4 KiB aligned.
        unsafe { self.slice_at(self.layout.slabs, self.geometry.num_slabs()) }
    }

    pub fn slots(&self) -> &[SlotEntry] {
        // SAFETY: as for slabs, with num_slots entries at `slots`.
        unsafe { self.slice_at(self.layout.slots, self.geometry.num_slots()) }
    }

    pub fn index(&self) -> Index<'_> {
        // SAFETY: as for slabs, with index_buckets buckets at `index`.
        Index::new(unsafe {
            self.slice_at::<Bucket>(self.layout.index, self.geometry.index_buckets)
        })
    }

    /// The SSD membership set (owner writes, engines read).
    pub fn ssd_set(&self) -> SsdSet<'_> {
        // SAFETY: the layout places ssd_buckets() u64 words at `ssd`, inside
        // the mapping, 4 KiB aligned; AtomicU64 accepts any bit pattern.
        SsdSet::new(unsafe {
            self.slice_at::<AtomicU64>(self.layout.ssd, self.geometry.ssd_buckets())
        })
    }

    pub fn max_clients(&self) -> u32 {
        self.geometry.max_clients as u32
    }

    /// Client area `i`; `None` when out of range (ids from other processes
    /// are untrusted).
    pub fn client(&self, i: u32) -> Option<ClientView<'_>> {
        if u64::from(i) >= self.geometry.max_clients {
            return None;
        }
        let cl = &self.layout.client;
        let base = self.layout.clients + u64::from(i) * cl.bytes;
        let g = &self.geometry;
        // SAFETY: client area i lies inside the mapping (i < max_clients and
        // the layout reserves max_clients areas); each region offset comes
        // from ClientLayout and is 4 KiB aligned; all types are atomics.
        unsafe {
            let entry = &self.slice_at::<ClientEntry>(base, 1)[0];
            let req_hdr = &self.slice_at::<RingHeader>(base + cl.request_ring, 1)[0];
            let req_words = self.slice_at::<AtomicU64>(
                base + cl.request_ring + std::mem::size_of::<RingHeader>() as u64,
                g.request_ring_cap * (REQUEST_BYTES / 8),
            );
            let stash_hdr = &self.slice_at::<RingHeader>(base + cl.stash_ring, 1)[0];
            let stash_words = self.slice_at::<AtomicU64>(
                base + cl.stash_ring + std::mem::size_of::<RingHeader>() as u64,
                g.stash_ring_cap,
            );
            let pins = self.slice_at::<AtomicU32>(base + cl.pins, g.num_slots());
            Some(ClientView {
                index: i,
                entry,
                requests: Ring::new(req_hdr, req_words),
                stash: Ring::new(stash_hdr, stash_words),
                pins,
            })
        }
    }

    /// Where slot `slot` lives in the pool: `(offset, stride)`. `None` for an
    /// id out of range or in a slab not cut into that many slots.
    pub fn slot_location(&self, slot: u32) -> Option<(u64, u64)> {
        let g = &self.geometry;
        let per = g.slots_per_slab();
        let slab = u64::from(slot) / per;
        let idx = u64::from(slot) % per;
        let entry = self.slabs().get(slab as usize)?;
        let stride = entry.stride.load(Ordering::Acquire);
        let nslots = u64::from(entry.nslots.load(Ordering::Acquire));
        if stride == 0 || idx >= nslots || (idx + 1) * stride > g.slab_bytes {
            return None;
        }
        Some((slab * g.slab_bytes + idx * stride, stride))
    }
}

/// Create and publish a new pool and control segment of `name` (tmpfs
/// backing), replacing any: no lock, no adoption. For tests and tools; the
/// owner decides between adopting and creating in `pegaflow-owner`.
pub fn create_published(
    name: &str,
    geometry: Geometry,
    perms: Perms,
) -> Result<(ControlSegment, PoolSegment), SegmentError> {
    let (pool, pool_new) = PoolSegment::create(
        &pool_path(name, &PoolBacking::Shm),
        geometry.pool_bytes,
        perms,
        false,
        &mut |_| {},
    )?;
    let (seg, ctl_new) =
        ControlSegment::create(&control_path(name), geometry, perms, &pool, false)?;
    pool_new.publish()?;
    ctl_new.publish()?;
    Ok((seg, pool))
}

/// Whether a process with this pid exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // Field 3 (state) follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Start time of a process (clock ticks since boot), to tell a pid's owner
/// apart from a later process that reused it.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // Fields after the command: state is field 3, starttime field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A mapped pool segment.
pub struct PoolSegment {
    map: MmapRaw,
    path: PathBuf,
    /// (device, inode): identifies the file across remaps.
    pub identity: (u64, u64),
}

impl PoolSegment {
    /// Owner: build a new pool file for `path` as a [`NewFile`] (publish it
    /// to make it visible). Its whole size is reserved up front; `progress`
    /// is called with the bytes reserved so far, every GiB.
    pub fn create(
        path: &Path,
        bytes: u64,
        perms: Perms,
        hugepages: bool,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(PoolSegment, NewFile), SegmentError> {
        if hugepages {
            let needed = bytes.div_ceil(2 << 20);
            let free = free_hugepages();
            if free < needed {
                return Err(SegmentError::NotEnoughHugepages {
                    needed,
                    free,
                    suggest: free_total_hugepages() + (needed - free),
                });
            }
        }
        let (file, new) = NewFile::create(path, perms)?;
        reserve(&file, &new, bytes, hugepages, progress)?;
        let pool = Self::map(&file, path, bytes).map_err(|e| match e {
            // hugetlbfs: the huge pages could not be reserved for the mapping.
            SegmentError::Io { source, .. }
                if hugepages && source.raw_os_error() == Some(libc::ENOMEM) =>
            {
                no_space(path, bytes, true)
            }
            e => e,
        })?;
        Ok((pool, new))
    }

    /// Owner: map the existing pool file to re-adopt it. It must be the
    /// inode the control segment recorded, of `bytes` bytes; it is given
    /// `perms` and any part not allocated is reserved.
    pub fn adopt(
        path: &Path,
        bytes: u64,
        expected: (u64, u64),
        perms: Perms,
        hugepages: bool,
    ) -> Result<PoolSegment, SegmentError> {
        let file = Self::open_file(path, bytes, Some(expected))?;
        perms.apply(&file, path)?;
        ensure_reserved(&file, path, hugepages)?;
        Self::map(&file, path, bytes)
    }

    /// Engine: map an existing pool read-write.
    pub fn open(path: &Path, expected_bytes: u64) -> Result<PoolSegment, SegmentError> {
        let file = Self::open_file(path, expected_bytes, None)?;
        Self::map(&file, path, expected_bytes)
    }

    /// Engine: map the pool only if the file now at `path` is the inode the
    /// control header names (`Header::pool_dev`, `pool_ino`), so a mapping
    /// of a file the owner has since replaced is never taken for the new
    /// one. The check is made on the opened descriptor, not the path.
    pub fn open_checked(
        path: &Path,
        expected_bytes: u64,
        expected_dev: u64,
        expected_ino: u64,
    ) -> Result<PoolSegment, SegmentError> {
        let file = Self::open_file(path, expected_bytes, Some((expected_dev, expected_ino)))?;
        Self::map(&file, path, expected_bytes)
    }

    fn open_file(
        path: &Path,
        bytes: u64,
        expected: Option<(u64, u64)>,
    ) -> Result<File, SegmentError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        let meta = file.metadata().map_err(io_err(path))?;
        let found = (meta.dev(), meta.ino());
        if let Some(expected) = expected.filter(|&e| e != found) {
            return Err(SegmentError::PoolReplaced {
                path: path.into(),
                expected,
                found,
            });
        }
        if meta.len() != bytes {
            return Err(SegmentError::SizeMismatch {
                path: path.into(),
                actual: meta.len(),
                expected: bytes,
            });
        }
        Ok(file)
    }

    fn map(file: &File, path: &Path, bytes: u64) -> Result<PoolSegment, SegmentError> {
        let meta = file.metadata().map_err(io_err(path))?;
        let map = MmapOptions::new()
            .len(bytes as usize)
            .map_raw(file)
            .map_err(io_err(path))?;
        Ok(PoolSegment {
            map,
            path: path.into(),
            identity: (meta.dev(), meta.ino()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }
}

fn free_total_hugepages() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("HugePages_Total:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The owner's socket when `--socket` is not given; engines apply the same
/// rule, so both sides agree without configuration:
/// `$PEGAFLOW_RUN_DIR/<name>.sock` if set, else `/run/pegaflow/<name>.sock`
/// when `/run/pegaflow` exists (the systemd unit's RuntimeDirectory) or we
/// are root, else `/tmp/pegaflow/<name>.sock`.
pub fn default_socket_path(name: &str) -> PathBuf {
    let file = format!("{name}.sock");
    if let Some(dir) = std::env::var_os("PEGAFLOW_RUN_DIR") {
        return PathBuf::from(dir).join(file);
    }
    let run = Path::new("/run/pegaflow");
    // SAFETY: geteuid has no preconditions.
    if run.is_dir() || (unsafe { libc::geteuid() } == 0 && Path::new("/run").is_dir()) {
        return run.join(file);
    }
    PathBuf::from("/tmp/pegaflow").join(file)
}
