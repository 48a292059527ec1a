//! Creating, re-adopting and opening the two named segments.
//!
//! - The **control segment** (`/dev/shm/pegaflow-<name>.ctl`) holds the
//!   header, slab and slot tables, the index and the client table.
//! - The **pool segment** (`/dev/shm/pegaflow-<name>.pool`, or on a
//!   hugetlbfs mount with `--use-hugepages`) holds KV bytes only.
//!
//! Both are plain files, so they outlive any process: a restarted owner
//! re-adopts them and every committed block is still there. The owner holds
//! an exclusive `flock` on the control file for as long as it lives; the
//! kernel drops it when the owner dies, however it dies, so a second owner
//! is refused exactly while the first one is alive.
//!
//! This is the only module that turns mapped bytes into references: every
//! accessor below checks offsets against the validated [`Layout`] first.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use memmap2::{MmapOptions, MmapRaw};

use crate::client::ClientEntry;
use crate::error::SegmentError;
use crate::geometry::{Geometry, Layout, REQUEST_BYTES};
use crate::header::{Header, ABI_VERSION, MAGIC};
use crate::index::{Bucket, Index};
use crate::ring::{Ring, RingHeader};
use crate::slot_table::{SlabEntry, SlotEntry};
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

/// Free 2 MiB huge pages, from /proc/meminfo.
pub fn free_hugepages() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SegmentError + '_ {
    move |source| SegmentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn random_u64() -> u64 {
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

/// How the owner came to hold the control segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opened {
    Created,
    Adopted,
}

/// Owner-side options for [`ControlSegment::create_or_adopt`].
pub struct CreateOptions<'a> {
    pub name: &'a str,
    pub geometry: Geometry,
    /// File mode of both segments (0o600, or 0o660 with a group).
    pub mode: u32,
    /// Drop an existing segment of this name instead of re-adopting it.
    pub discard_existing: bool,
}

/// A mapped control segment.
pub struct ControlSegment {
    map: MmapRaw,
    /// Kept open by the owner: it carries the flock.
    _file: File,
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
    /// Owner: create the segment, or re-adopt the one a previous owner left.
    pub fn create_or_adopt(
        opts: &CreateOptions<'_>,
    ) -> Result<(ControlSegment, Opened), SegmentError> {
        opts.geometry.validate()?;
        let path = control_path(opts.name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(opts.mode)
            .open(&path)
            .map_err(io_err(&path))?;
        lock_exclusive(&file, &path, opts.name)?;
        let size = file.metadata().map_err(io_err(&path))?.len();
        let layout = opts.geometry.layout();
        if size > 0 && !opts.discard_existing {
            let seg = Self::map(file, &path, false)?;
            if seg.geometry != opts.geometry {
                return Err(SegmentError::GeometryMismatch {
                    path,
                    found: Box::new(seg.geometry),
                    expected: Box::new(opts.geometry),
                });
            }
            return Ok((seg, Opened::Adopted));
        }
        // Fresh segment: zero it (ftruncate to 0 drops any old content).
        file.set_len(0).map_err(io_err(&path))?;
        file.set_len(layout.total).map_err(io_err(&path))?;
        let map = MmapOptions::new()
            .len(layout.total as usize)
            .map_raw(&file)
            .map_err(io_err(&path))?;
        let seg = ControlSegment {
            map,
            _file: file,
            path,
            geometry: opts.geometry,
            layout,
        };
        seg.init_header();
        Ok((seg, Opened::Created))
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
            return Err(SegmentError::SizeMismatch {
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
            return Err(SegmentError::SizeMismatch {
                path: path.into(),
                actual: size,
                expected: layout.total,
            });
        }
        drop(probe);
        let map = map_hdr(layout.total).map_err(io_err(path))?;
        Ok(ControlSegment {
            map,
            _file: file,
            path: path.into(),
            geometry,
            layout,
        })
    }

    fn init_header(&self) {
        // SAFETY: the file was just truncated to zero and re-extended, so
        // nobody else has a view of it that could observe a torn header; the
        // mapping is writable, page-aligned and larger than a Header.
        let h = unsafe { &mut *(self.map.as_mut_ptr() as *mut Header) };
        h.magic = MAGIC;
        h.abi_version = ABI_VERSION;
        h.header_bytes = std::mem::size_of::<Header>() as u32;
        h.geometry = self.geometry;
        h.segment_id = random_u64();
        h.created_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Owner only: record where the pool lives, for `pegaflow-inspect`.
    pub fn set_pool_info(&self, pool: &Path, hugepages: bool) {
        let bytes = pool.as_os_str().as_encoded_bytes();
        let h = self.map.as_mut_ptr() as *mut Header;
        let n = bytes.len().min(255);
        // SAFETY: the mapping is writable and holds a Header at offset 0.
        // Only the owner (holding the segment lock) writes these plain
        // fields; readers treat them as informational and tolerate a torn
        // read. No reference to them is formed, only raw writes.
        unsafe {
            let dst = std::ptr::addr_of_mut!((*h).pool_path) as *mut u8;
            std::ptr::write_bytes(dst, 0, 256);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, n);
            std::ptr::addr_of_mut!((*h).hugepages).write(u32::from(hugepages));
        }
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

fn lock_exclusive(file: &File, path: &Path, name: &str) -> Result<(), SegmentError> {
    // SAFETY: flock on a valid, owned descriptor; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(SegmentError::Io {
            path: path.into(),
            source: err,
        });
    }
    // Someone holds it: name them if the header says who.
    let pid = ControlSegment::open_read_only(path)
        .map(|s| s.header().owner_pid.load(Ordering::SeqCst))
        .unwrap_or(0);
    Err(SegmentError::OwnerAlive {
        name: name.into(),
        pid,
        path: path.into(),
    })
}

/// A mapped pool segment.
pub struct PoolSegment {
    map: MmapRaw,
    path: PathBuf,
    /// (device, inode): identifies the file across remaps.
    pub identity: (u64, u64),
}

impl PoolSegment {
    /// Owner: create or re-adopt the pool file. Returns whether it already
    /// existed with the right size (its content is then kept).
    pub fn create_or_adopt(
        path: &Path,
        bytes: u64,
        mode: u32,
        hugepages: bool,
        discard_existing: bool,
    ) -> Result<(PoolSegment, Opened), SegmentError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(mode)
            .open(path)
            .map_err(io_err(path))?;
        let meta = file.metadata().map_err(io_err(path))?;
        let opened = if meta.len() == bytes && !discard_existing {
            Opened::Adopted
        } else {
            if hugepages {
                let needed = bytes.div_ceil(2 << 20);
                // Pages this file already holds come back when it is truncated.
                let free = free_hugepages() + meta.len() / (2 << 20);
                if free < needed {
                    return Err(SegmentError::NotEnoughHugepages {
                        needed,
                        free,
                        suggest: free_total_hugepages() + (needed - free),
                    });
                }
            }
            file.set_len(0).map_err(io_err(path))?;
            file.set_len(bytes).map_err(io_err(path))?;
            Opened::Created
        };
        let map = MmapOptions::new()
            .len(bytes as usize)
            .map_raw(&file)
            .map_err(io_err(path))?;
        Ok((
            PoolSegment {
                map,
                path: path.into(),
                identity: (meta.dev(), meta.ino()),
            },
            opened,
        ))
    }

    /// Engine: map an existing pool read-write.
    pub fn open(path: &Path, expected_bytes: u64) -> Result<PoolSegment, SegmentError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        let meta = file.metadata().map_err(io_err(path))?;
        if meta.len() != expected_bytes {
            return Err(SegmentError::SizeMismatch {
                path: path.into(),
                actual: meta.len(),
                expected: expected_bytes,
            });
        }
        let map = MmapOptions::new()
            .len(expected_bytes as usize)
            .map_raw(&file)
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
