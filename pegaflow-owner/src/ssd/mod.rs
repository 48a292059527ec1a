//! The SSD tier: a persistent second level behind the pool, owned by the
//! owner alone. Engines never touch the disk and never wait on it.
//!
//! ```text
//!   request loop (owner.rs / cache.rs)              I/O thread (uring.rs)
//!   --------------------------------                 ---------------------
//!   block evicted / written behind:
//!     admitted? copy slot -> aligned buffer  --Job::Write-->  checksum, io_uring write
//!   Stage{key} from an engine:
//!     reserve a slot (Writing(owner))        --Job::Read--->  io_uring readv into the slot,
//!   <-- Done::Read: commit it into the index <--Done-------   verify key + checksum
//!   start: list segment files, serve at once;  recovery threads (recover.rs) scan them
//! ```
//!
//! - [`segment`]: the on-disk format; [`uring`]: the I/O thread;
//!   [`index`]: the private key -> record index; [`recover`]: the scan.
//! - Placement: one open segment per path; blocks go round-robin to the
//!   paths that have a free write slot, so several devices write in
//!   parallel. Each path holds at most its share of `--ssd-cache-capacity`
//!   (clamped to its filesystem); when full, its oldest segment is evicted
//!   whole (FIFO), its blocks leave the index and the membership set.
//! - Bounds: `--ssd-write-queue-depth` is the number of pending write
//!   batches per path, as in the original PegaFlow: up to that many
//!   [`WRITE_BATCH_BYTES`] of blocks are copied out of the pool and queued
//!   (a burst of evictions is absorbed, not dropped), of which at most that
//!   many blocks are on the device at once (so stage reads never queue
//!   behind the backlog); a block offered beyond the backlog is dropped and
//!   counted (a pool slot is never held for the disk), at most
//!   `--ssd-prefetch-queue-depth` reads per path in flight, and at most
//!   [`MAX_PENDING_READS`] stage reads waiting (each holds a pool slot).
//! - A block is in the index (and the membership set engines read) only
//!   once its write completed; a read is committed into the pool only once
//!   its key and checksum were verified.

pub mod index;
pub mod recover;
pub mod segment;
pub mod uring;

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{bounded, Receiver, Sender, TrySendError};
use pegaflow_shm::segment::ControlSegment;
use pegaflow_shm::slot_table::BlockKey;
use tracing::{info, warn};

use crate::size::human;
use index::{Loc, SegMeta, SegState, SsdIndex};
use segment::{record_bytes, RecordHeader, SegmentHeader, HEADER_BYTES};
use uring::{AlignedBuf, Done, Job, ReadError};

/// Stage reads waiting for a read slot, over all paths.
pub const MAX_PENDING_READS: usize = 8192;
/// Bytes of one pending write batch: `--ssd-write-queue-depth` of them may
/// wait per path (8 x 64 MiB by default, a third of a 10K-token Llama-8B
/// request).
pub const WRITE_BATCH_BYTES: u64 = 64 * MIB;
const MIB: u64 = 1 << 20;
/// How long a path that could not create a segment is left alone.
const RETRY_FULL: Duration = Duration::from_secs(5);

/// The tier's settings (from the owner's flags).
#[derive(Clone, Debug)]
pub struct SsdConfig {
    pub paths: Vec<PathBuf>,
    pub capacity: u64,
    pub write_depth: u32,
    pub read_depth: u32,
    /// Segment file size; 0 = derived from the capacity.
    pub segment_bytes: u64,
}

/// Why the tier cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SsdError {
    #[error(
        "--ssd-cache-path {path}: cannot {what} ({source}); give the owner's user write access \
         to it, or choose another path"
    )]
    Path {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("--ssd-cache-path {path}: {why}")]
    Unusable { path: PathBuf, why: String },
    #[error("cannot start the SSD I/O thread (io_uring): {0}; the kernel may forbid io_uring (sysctl kernel.io_uring_disabled)")]
    Uring(std::io::Error),
}

/// Counters of the tier (exported as metrics; reset when the owner restarts).
#[derive(Default, Clone, Debug)]
pub struct SsdStats {
    pub written_blocks: u64,
    pub written_bytes: u64,
    pub write_behind_blocks: u64,
    pub write_errors: u64,
    pub dropped_queue_full: u64,
    pub dropped_not_admitted: u64,
    pub dropped_disk_full: u64,
    pub dropped_too_large: u64,
    pub stage_requests: u64,
    pub staged_blocks: u64,
    pub staged_bytes: u64,
    pub stage_in_pool: u64,
    pub stage_not_on_ssd: u64,
    pub stage_no_slot: u64,
    pub stage_queue_full: u64,
    pub stage_gone: u64,
    pub read_errors: u64,
    pub checksum_failures: u64,
    pub evicted_segments: u64,
    pub evicted_blocks: u64,
    pub membership_full: u64,
    pub recovered_blocks: u64,
    pub recovered_segments: u64,
    pub recovery_torn: u64,
    pub recovery_bad_segments: u64,
    pub recovery_broken_chains: u64,
    pub recovery_seconds: f64,
    pub recovering: bool,
    /// Gauges.
    pub blocks: u64,
    pub bytes_on_disk: u64,
    pub capacity_bytes: u64,
    pub segments: u64,
    pub paths: u64,
    pub direct_io: bool,
}

/// A stage read the loop asked for, finished.
#[derive(Debug)]
pub enum StageEvent {
    Staged { tag: u64, len: u64 },
    Failed { tag: u64, checksum: bool },
}

struct PathState {
    root: PathBuf,
    dir: PathBuf,
    direct: bool,
    capacity: u64,
    segment_bytes: u64,
    used: u64,
    /// Segments, oldest first.
    fifo: VecDeque<u32>,
    open: Option<u32>,
    /// Writes accepted and not completed: on the device or in `write_backlog`.
    writes_inflight: u32,
    /// Writes handed to the I/O thread (at most the write depth).
    writes_sent: u32,
    /// Copied blocks waiting for a device slot, oldest first.
    write_backlog: VecDeque<Job>,
    backlog_bytes: u64,
    reads_inflight: u32,
    read_wait: VecDeque<PendingRead>,
    retry_at: Option<Instant>,
}

struct PendingRead {
    key: BlockKey,
    loc: Loc,
    dst: usize,
    tag: u64,
}

pub struct Tier {
    cfg: SsdConfig,
    seg: Arc<ControlSegment>,
    pool_base: usize,
    pool_len: usize,
    jobs: Option<Sender<Job>>,
    overflow: VecDeque<Job>,
    done: Receiver<Done>,
    thread: Option<std::thread::JoinHandle<()>>,
    paths: Vec<PathState>,
    index: SsdIndex,
    next_seq: u64,
    rr: usize,
    free_bufs: Vec<AlignedBuf>,
    /// Writes in flight: key -> path.
    pending_writes: HashMap<BlockKey, usize>,
    /// Reads queued or in flight: tag -> path.
    read_paths: HashMap<u64, usize>,
    pending_reads: usize,
    events: Vec<StageEvent>,
    pub stats: SsdStats,
}

/// Owner's wake-up: rings the control segment's doorbell.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Free bytes of the filesystem of `dir`; `None` when it does not say
/// (ramfs reports no blocks at all).
fn fs_free(dir: &Path) -> Option<u64> {
    nix::sys::statvfs::statvfs(dir)
        .ok()
        .filter(|s| s.blocks() > 0)
        .map(|s| s.blocks_available() * s.fragment_size())
}

impl Tier {
    /// Open (or create) the tier's directories, register the segments
    /// found there, start the I/O thread and the background recovery.
    /// Returns before recovery is done: the pool is served meanwhile.
    pub fn start(
        cfg: SsdConfig,
        name: &str,
        seg: Arc<ControlSegment>,
        pool_base: *mut u8,
        pool_len: usize,
        wake: Wake,
    ) -> Result<Tier, SsdError> {
        let n = cfg.paths.len().max(1) as u64;
        let mut paths = Vec::new();
        let mut found: Vec<(u64, usize, PathBuf, u64)> = Vec::new();
        for (pi, root) in cfg.paths.iter().enumerate() {
            let dir = root.join(format!("pegaflow-{name}"));
            std::fs::create_dir_all(&dir).map_err(|source| SsdError::Path {
                path: root.clone(),
                what: "create its directory",
                source,
            })?;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
            let direct = uring::probe_direct(&dir).map_err(|source| SsdError::Path {
                path: root.clone(),
                what: "create files there",
                source,
            })?;
            if !direct {
                warn!(
                    path = %root.display(),
                    "the filesystem of --ssd-cache-path {} does not support O_DIRECT (tmpfs?): \
                     the tier uses buffered I/O there (page cache), slower and using memory",
                    root.display()
                );
            }
            let mut existing = 0;
            let entries = std::fs::read_dir(&dir).map_err(|source| SsdError::Path {
                path: root.clone(),
                what: "list its directory",
                source,
            })?;
            for e in entries.flatten() {
                let fname = e.file_name().to_string_lossy().into_owned();
                if let Some(seq) = segment::parse_file_name(&fname) {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    existing += len;
                    found.push((seq, pi, e.path(), len));
                }
            }
            let want = cfg.capacity / n;
            let can = fs_free(&dir).unwrap_or(want).saturating_add(existing);
            let capacity = if want > can {
                warn!(
                    path = %root.display(),
                    "--ssd-cache-capacity gives {} to {} but its filesystem can hold only {} \
                     (free space plus the tier's files): using {}",
                    human(want),
                    root.display(),
                    human(can),
                    human(can)
                );
                can
            } else {
                want
            };
            let segment_bytes = if cfg.segment_bytes > 0 {
                cfg.segment_bytes
            } else {
                (capacity / 8).clamp(16 * MIB, 256 * MIB) / MIB * MIB
            }
            .min(capacity / MIB * MIB);
            if segment_bytes < 2 * HEADER_BYTES + 4096 {
                return Err(SsdError::Unusable {
                    path: root.clone(),
                    why: format!(
                        "only {} of capacity: give the tier at least a few MiB per path",
                        human(capacity)
                    ),
                });
            }
            paths.push(PathState {
                root: root.clone(),
                dir,
                direct,
                capacity,
                segment_bytes,
                used: 0,
                fifo: VecDeque::new(),
                open: None,
                writes_inflight: 0,
                writes_sent: 0,
                write_backlog: VecDeque::new(),
                backlog_bytes: 0,
                reads_inflight: 0,
                read_wait: VecDeque::new(),
                retry_at: None,
            });
        }
        let depth = (cfg.write_depth + cfg.read_depth) * n as u32;
        let (jobs_tx, jobs_rx) = bounded::<Job>(depth as usize + 256);
        let (done_tx, done_rx) = bounded::<Done>(depth as usize + MAX_PENDING_READS + 256);
        let wake_io = wake.clone();
        let io = uring::IoThread::new(jobs_rx, done_tx.clone(), Box::new(move || wake_io()), depth)
            .map_err(SsdError::Uring)?;
        let thread = std::thread::Builder::new()
            .name("pegaflow-ssd-io".into())
            .spawn(move || io.run())
            .map_err(SsdError::Uring)?;
        let mut tier = Tier {
            stats: SsdStats {
                paths: n,
                capacity_bytes: paths.iter().map(|p| p.capacity).sum(),
                direct_io: paths.iter().all(|p| p.direct),
                ..Default::default()
            },
            cfg,
            seg,
            pool_base: pool_base as usize,
            pool_len,
            jobs: Some(jobs_tx),
            overflow: VecDeque::new(),
            done: done_rx,
            thread: Some(thread),
            paths,
            index: SsdIndex::default(),
            next_seq: 1,
            rr: 0,
            free_bufs: Vec::new(),
            pending_writes: HashMap::new(),
            read_paths: HashMap::new(),
            pending_reads: 0,
            events: Vec::new(),
        };
        // The membership set is rebuilt from disk: a previous owner's (or a
        // previous boot's) entries mean nothing now.
        tier.seg.ssd_set().clear();
        // Register what is on disk, oldest first; drop what exceeds the
        // capacity now (oldest first) before anything is read.
        found.sort_unstable_by_key(|f| f.0);
        let mut scan = Vec::new();
        for (seq, pi, file, len) in found {
            tier.next_seq = tier.next_seq.max(seq + 1);
            let id = tier.index.new_seg_id();
            tier.index.segs.insert(
                id,
                SegMeta {
                    path: pi,
                    file: file.clone(),
                    seq,
                    bytes: len,
                    next_off: len,
                    next_number: u32::MAX,
                    writes_inflight: 0,
                    state: SegState::Recovering,
                    keys: Vec::new(),
                },
            );
            let p = &mut tier.paths[pi];
            p.fifo.push_back(id);
            p.used += len;
            scan.push(recover::ToScan {
                seg: id,
                path: file,
                seq,
                direct: p.direct,
            });
        }
        for pi in 0..tier.paths.len() {
            while tier.paths[pi].used > tier.paths[pi].capacity {
                if !tier.evict_oldest(pi) {
                    break;
                }
            }
        }
        let scan: Vec<_> = scan
            .into_iter()
            .filter(|t| tier.index.segs.contains_key(&t.seg))
            .collect();
        tier.stats.recovering = !scan.is_empty();
        for p in &tier.paths {
            info!(
                path = %p.root.display(),
                capacity = human(p.capacity),
                segment = human(p.segment_bytes),
                segments_found = p.fifo.len(),
                direct_io = p.direct,
                "SSD tier path ready"
            );
        }
        if !scan.is_empty() {
            info!(
                segments = scan.len(),
                "recovering the SSD index in the background; the pool is served meanwhile"
            );
            recover::spawn(scan, done_tx, wake).map_err(SsdError::Uring)?;
        }
        tier.refresh_gauges();
        Ok(tier)
    }

    pub fn contains(&self, key: &BlockKey) -> bool {
        self.index.map.contains_key(key) || self.pending_writes.contains_key(key)
    }

    /// The record of `key`, if the tier has it.
    pub fn locate(&self, key: &BlockKey) -> Option<Loc> {
        self.index.get(key)
    }

    pub fn entries(&self) -> usize {
        self.index.map.len()
    }

    /// Whether a write would be accepted now (some path has a free slot).
    pub fn can_write(&self) -> bool {
        let now = Instant::now();
        self.paths.iter().any(|p| {
            p.writes_sent < self.cfg.write_depth
                && p.write_backlog.is_empty()
                && p.retry_at.is_none_or(|t| t <= now)
        })
    }

    /// Completions or queued jobs waiting for the loop.
    pub fn has_work(&self) -> bool {
        !self.done.is_empty() || !self.overflow.is_empty()
    }

    fn send(&mut self, job: Job) {
        let Some(tx) = &self.jobs else { return };
        if !self.overflow.is_empty() {
            self.overflow.push_back(job);
            return;
        }
        match tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(j)) => self.overflow.push_back(j),
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    fn flush(&mut self) {
        let Some(tx) = &self.jobs else { return };
        while let Some(j) = self.overflow.pop_front() {
            match tx.try_send(j) {
                Ok(()) => {}
                Err(TrySendError::Full(j)) => {
                    self.overflow.push_front(j);
                    return;
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }

    /// Copy a block out of the pool and queue it for writing. `src_off`
    /// is the slot's offset in the pool; the caller guarantees the slot's
    /// bytes do not change during the call (it is committed or evicting).
    /// Returns whether the block is (or will be) on SSD.
    pub fn offer(
        &mut self,
        key: BlockKey,
        len: u64,
        class: u64,
        src_off: u64,
        behind: bool,
    ) -> bool {
        if self.contains(&key) {
            return true;
        }
        if len == 0 || src_off.saturating_add(len) > self.pool_len as u64 {
            return false;
        }
        let now = Instant::now();
        let n = self.paths.len();
        let rec = record_bytes(len);
        let backlog_cap = u64::from(self.cfg.write_depth) * WRITE_BATCH_BYTES;
        let Some(pi) = (0..n).map(|k| (self.rr + k) % n).find(|&i| {
            let p = &self.paths[i];
            (p.writes_sent < self.cfg.write_depth || p.backlog_bytes + rec <= backlog_cap)
                && p.retry_at.is_none_or(|t| t <= now)
        }) else {
            if self
                .paths
                .iter()
                .all(|p| p.retry_at.is_some_and(|t| t > now))
            {
                self.stats.dropped_disk_full += 1;
            } else {
                self.stats.dropped_queue_full += 1;
            }
            return false;
        };
        self.rr = (pi + 1) % n;
        if rec + HEADER_BYTES > self.paths[pi].segment_bytes {
            self.stats.dropped_too_large += 1;
            return false;
        }
        let Some((seg, off, number, seq)) = self.alloc(pi, rec) else {
            self.stats.dropped_disk_full += 1;
            return false;
        };
        let mut buf = match self.free_bufs.pop() {
            Some(b) if b.len() as u64 >= rec => b,
            _ => AlignedBuf::new(rec as usize),
        };
        {
            let h = HEADER_BYTES as usize;
            let dst = buf.as_mut_slice();
            // SAFETY: src_off + len <= pool_len (checked above): inside the
            // pool mapping, which outlives the tier. The caller keeps the
            // slot's bytes stable (committed or evicting, never written).
            let src = unsafe {
                std::slice::from_raw_parts(
                    (self.pool_base as *const u8).add(src_off as usize),
                    len as usize,
                )
            };
            dst[h..h + len as usize].copy_from_slice(src);
            dst[h + len as usize..rec as usize].fill(0);
        }
        let header = RecordHeader {
            key,
            len,
            class,
            segment_seq: seq,
            number,
            checksum: 0,
        };
        self.paths[pi].writes_inflight += 1;
        if let Some(m) = self.index.segs.get_mut(&seg) {
            m.writes_inflight += 1;
        }
        self.pending_writes.insert(key, pi);
        if behind {
            self.stats.write_behind_blocks += 1;
        }
        let job = Job::Write {
            seg,
            off,
            header,
            buf,
        };
        let p = &mut self.paths[pi];
        if p.writes_sent < self.cfg.write_depth {
            p.writes_sent += 1;
            self.send(job);
        } else {
            p.backlog_bytes += rec;
            p.write_backlog.push_back(job);
        }
        true
    }

    /// Hand path `pi`'s backlog to the I/O thread as device slots free up.
    fn pump_writes(&mut self, pi: usize) {
        while self.paths[pi].writes_sent < self.cfg.write_depth {
            let Some(job) = self.paths[pi].write_backlog.pop_front() else {
                return;
            };
            if let Job::Write { header, .. } = &job {
                let p = &mut self.paths[pi];
                p.backlog_bytes = p.backlog_bytes.saturating_sub(record_bytes(header.len));
            }
            self.paths[pi].writes_sent += 1;
            self.send(job);
        }
    }

    /// Room for a record of `rec` bytes on path `pi`: (segment, offset,
    /// record number, segment seq).
    fn alloc(&mut self, pi: usize, rec: u64) -> Option<(u32, u64, u32, u64)> {
        if let Some(s) = self.paths[pi].open {
            if let Some(m) = self.index.segs.get_mut(&s) {
                if m.state == SegState::Open && m.next_off + rec <= m.bytes {
                    let at = (s, m.next_off, m.next_number, m.seq);
                    m.next_off += rec;
                    m.next_number += 1;
                    return Some(at);
                }
            }
            self.close_segment(s);
            self.paths[pi].open = None;
        }
        let bytes = self.paths[pi].segment_bytes;
        if bytes > self.paths[pi].capacity {
            return None;
        }
        while self.paths[pi].used + bytes > self.paths[pi].capacity {
            if !self.evict_oldest(pi) {
                return None;
            }
        }
        let id = self.index.new_seg_id();
        let seq = self.next_seq;
        self.next_seq += 1;
        let file = self.paths[pi].dir.join(segment::file_name(seq));
        let header = SegmentHeader {
            seq,
            bytes,
            sealed: false,
            records: 0,
            created_ns: now_ns(),
        };
        self.index.segs.insert(
            id,
            SegMeta {
                path: pi,
                file: file.clone(),
                seq,
                bytes,
                next_off: HEADER_BYTES + rec,
                next_number: 1,
                writes_inflight: 0,
                state: SegState::Open,
                keys: Vec::new(),
            },
        );
        let p = &mut self.paths[pi];
        p.fifo.push_back(id);
        p.used += bytes;
        p.open = Some(id);
        let direct = p.direct;
        self.send(Job::Create {
            seg: id,
            path: file,
            header,
            direct,
        });
        Some((id, HEADER_BYTES, 0, seq))
    }

    /// No more appends to `seg`; sealed once its writes completed.
    fn close_segment(&mut self, seg: u32) {
        if let Some(m) = self.index.segs.get_mut(&seg) {
            if m.state == SegState::Open {
                m.state = SegState::Full;
            }
        }
        self.maybe_seal(seg);
    }

    fn maybe_seal(&mut self, seg: u32) {
        let Some(m) = self.index.segs.get_mut(&seg) else {
            return;
        };
        if m.state != SegState::Full || m.writes_inflight > 0 {
            return;
        }
        m.state = SegState::Sealed;
        let header = SegmentHeader {
            seq: m.seq,
            bytes: m.bytes,
            sealed: true,
            records: u64::from(m.next_number),
            created_ns: now_ns(),
        };
        self.send(Job::Seal { seg, header });
    }

    /// Evict the oldest segment of path `pi` (FIFO). `false` if it has none.
    fn evict_oldest(&mut self, pi: usize) -> bool {
        let Some(id) = self.paths[pi].fifo.pop_front() else {
            return false;
        };
        if self.paths[pi].open == Some(id) {
            self.paths[pi].open = None;
        }
        let (meta, gone) = self.index.remove_segment(id);
        let set = self.seg.ssd_set();
        for k in &gone {
            set.remove(k);
        }
        self.stats.evicted_blocks += gone.len() as u64;
        self.stats.evicted_segments += 1;
        if let Some(m) = meta {
            self.paths[pi].used = self.paths[pi].used.saturating_sub(m.bytes);
            self.send(Job::Remove {
                seg: id,
                path: m.file,
            });
        }
        true
    }

    /// Queue a read of `key` (located at `loc`) into the pool at `dst_off`
    /// (a slot the caller reserved, at least `round_up(len)` bytes).
    /// `false`: too many reads waiting, or the record is gone; nothing was
    /// queued.
    pub fn read(&mut self, key: BlockKey, loc: Loc, dst_off: u64, tag: u64) -> bool {
        if self.pending_reads >= MAX_PENDING_READS {
            self.stats.stage_queue_full += 1;
            return false;
        }
        let Some(pi) = self.index.segs.get(&loc.seg).map(|m| m.path) else {
            self.stats.stage_gone += 1;
            return false;
        };
        if dst_off + segment::round_up(loc.len) > self.pool_len as u64 {
            return false;
        }
        self.pending_reads += 1;
        self.read_paths.insert(tag, pi);
        self.paths[pi].read_wait.push_back(PendingRead {
            key,
            loc,
            dst: self.pool_base + dst_off as usize,
            tag,
        });
        self.dispatch_reads();
        true
    }

    fn dispatch_reads(&mut self) {
        for pi in 0..self.paths.len() {
            while self.paths[pi].reads_inflight < self.cfg.read_depth {
                let Some(r) = self.paths[pi].read_wait.pop_front() else {
                    break;
                };
                // The segment may have been evicted while the read waited.
                if self.index.get(&r.key) != Some(r.loc) {
                    self.pending_reads -= 1;
                    self.read_paths.remove(&r.tag);
                    self.stats.stage_gone += 1;
                    self.events.push(StageEvent::Failed {
                        tag: r.tag,
                        checksum: false,
                    });
                    continue;
                }
                self.paths[pi].reads_inflight += 1;
                self.send(Job::Read {
                    seg: r.loc.seg,
                    off: r.loc.off,
                    key: r.key,
                    len: r.loc.len,
                    dst: r.dst,
                    tag: r.tag,
                });
            }
        }
    }

    /// Apply what the I/O thread and recovery reported; returns the stage
    /// reads that finished.
    pub fn poll(&mut self) -> Vec<StageEvent> {
        self.flush();
        let mut n = 0;
        while let Ok(d) = self.done.try_recv() {
            self.apply(d);
            n += 1;
            if n >= 4096 {
                break;
            }
        }
        self.dispatch_reads();
        self.flush();
        if n > 0 {
            self.refresh_gauges();
        }
        std::mem::take(&mut self.events)
    }

    fn refresh_gauges(&mut self) {
        self.stats.blocks = self.index.map.len() as u64;
        self.stats.segments = self.index.segs.len() as u64;
        self.stats.bytes_on_disk = self.paths.iter().map(|p| p.used).sum();
    }

    fn apply(&mut self, d: Done) {
        match d {
            Done::Created { seg, result } => {
                if let Err(e) = result {
                    let Some(m) = self.index.segs.get(&seg) else {
                        return;
                    };
                    let pi = m.path;
                    let full = e.raw_os_error() == Some(libc::ENOSPC);
                    warn!(
                        path = %self.paths[pi].root.display(),
                        error = %e,
                        "cannot create an SSD segment{}; writes to this path pause for {:?}",
                        if full { " (filesystem full: the path keeps what it holds and evicts its oldest segments to write more)" } else { "" },
                        RETRY_FULL
                    );
                    // Forget the segment; its queued writes fail (no file).
                    if let Some(pos) = self.paths[pi].fifo.iter().position(|&s| s == seg) {
                        self.paths[pi].fifo.remove(pos);
                    }
                    if let Some(m) = self.index.segs.remove(&seg) {
                        self.paths[pi].used = self.paths[pi].used.saturating_sub(m.bytes);
                    }
                    let p = &mut self.paths[pi];
                    if p.open == Some(seg) {
                        p.open = None;
                    }
                    if full {
                        // What it holds now is what this filesystem holds:
                        // the next segment replaces its oldest one.
                        p.capacity = p.used.max(p.segment_bytes);
                    }
                    p.retry_at = Some(Instant::now() + RETRY_FULL);
                    self.stats.capacity_bytes = self.paths.iter().map(|p| p.capacity).sum();
                }
            }
            Done::Written {
                seg,
                off,
                header,
                buf,
                result,
            } => {
                // Keep buffers for the next writes, not a whole burst's worth.
                if self.free_bufs.len() < 2 * self.cfg.write_depth as usize * self.paths.len() {
                    self.free_bufs.push(buf);
                }
                if let Some(pi) = self.pending_writes.remove(&header.key) {
                    let p = &mut self.paths[pi];
                    p.writes_inflight = p.writes_inflight.saturating_sub(1);
                    p.writes_sent = p.writes_sent.saturating_sub(1);
                    self.pump_writes(pi);
                }
                match result {
                    Ok(()) => {
                        let Some(m) = self.index.segs.get_mut(&seg) else {
                            return;
                        };
                        m.writes_inflight = m.writes_inflight.saturating_sub(1);
                        let loc = Loc {
                            seg,
                            seq: m.seq,
                            off,
                            len: header.len,
                            class: header.class,
                        };
                        if self.index.insert(header.key, loc) == Some(true)
                            && !self.seg.ssd_set().insert(&header.key)
                        {
                            self.stats.membership_full += 1;
                        }
                        self.stats.written_blocks += 1;
                        self.stats.written_bytes += header.len;
                        self.maybe_seal(seg);
                    }
                    Err(e) => {
                        if e.raw_os_error() == Some(libc::ENOSPC) {
                            self.stats.dropped_disk_full += 1;
                        } else {
                            self.stats.write_errors += 1;
                            warn!(seg, error = %e, "SSD write failed; block dropped");
                        }
                        if let Some(m) = self.index.segs.get_mut(&seg) {
                            m.writes_inflight = m.writes_inflight.saturating_sub(1);
                            // A hole ends the segment's chain: append no more.
                            if m.state == SegState::Open {
                                m.state = SegState::Full;
                            }
                        }
                        self.maybe_seal(seg);
                    }
                }
            }
            Done::Read { seg, tag, result } => {
                let _ = seg;
                self.pending_reads = self.pending_reads.saturating_sub(1);
                if let Some(pi) = self.read_paths.remove(&tag) {
                    let p = &mut self.paths[pi];
                    p.reads_inflight = p.reads_inflight.saturating_sub(1);
                }
                match result {
                    Ok(()) => self.events.push(StageEvent::Staged { tag, len: 0 }),
                    Err(e) => {
                        let checksum = !matches!(e, ReadError::Io(_));
                        if checksum {
                            self.stats.checksum_failures += 1;
                            warn!(
                                seg,
                                error = ?e,
                                "a block read back from SSD does not match its checksum or key \
                                 (bit rot, a torn write or a changed file): dropped, never loaded"
                            );
                        } else {
                            self.stats.read_errors += 1;
                        }
                        self.events.push(StageEvent::Failed { tag, checksum });
                    }
                }
            }
            Done::Recovered(r) => self.recovered(r),
            Done::RecoveryFinished { elapsed } => {
                self.stats.recovering = false;
                self.stats.recovery_seconds = elapsed.as_secs_f64();
                info!(
                    blocks = self.stats.recovered_blocks,
                    segments = self.stats.recovered_segments,
                    torn_dropped = self.stats.recovery_torn,
                    bad_segments = self.stats.recovery_bad_segments,
                    elapsed_ms = elapsed.as_millis() as u64,
                    "SSD index recovered"
                );
            }
        }
    }

    fn recovered(&mut self, r: recover::Recovered) {
        let Some(m) = self.index.segs.get(&r.seg) else {
            return; // evicted while it was scanned
        };
        let (pi, file, seq) = (m.path, m.file.clone(), m.seq);
        if let Some(why) = r.bad_segment {
            warn!(path = %file.display(), "dropping an SSD segment whose header does not check ({why})");
            self.stats.recovery_bad_segments += 1;
            if let Some(pos) = self.paths[pi].fifo.iter().position(|&s| s == r.seg) {
                self.paths[pi].fifo.remove(pos);
            }
            let (meta, _) = self.index.remove_segment(r.seg);
            if let Some(meta) = meta {
                self.paths[pi].used = self.paths[pi].used.saturating_sub(meta.bytes);
            }
            self.send(Job::Remove {
                seg: r.seg,
                path: file,
            });
            return;
        }
        let direct = self.paths[pi].direct;
        self.send(Job::Adopt {
            seg: r.seg,
            path: file.clone(),
            direct,
        });
        if let Some(m) = self.index.segs.get_mut(&r.seg) {
            m.state = SegState::Recovered;
        }
        if r.torn > 0 || r.broken_chain {
            warn!(
                path = %file.display(),
                torn = r.torn,
                broken_chain = r.broken_chain,
                kept = r.records.len(),
                "SSD segment had records that do not check (a write cut short by a crash, or corruption): dropped"
            );
        }
        self.stats.recovery_torn += r.torn;
        self.stats.recovery_broken_chains += u64::from(r.broken_chain);
        self.stats.recovered_segments += 1;
        let set = self.seg.ssd_set();
        for (h, off) in r.records {
            let loc = Loc {
                seg: r.seg,
                seq,
                off,
                len: h.len,
                class: h.class,
            };
            match self.index.insert(h.key, loc) {
                Some(true) => {
                    self.stats.recovered_blocks += 1;
                    if !set.insert(&h.key) {
                        self.stats.membership_full += 1;
                    }
                }
                Some(false) => self.stats.recovered_blocks += 1,
                None => {}
            }
        }
    }

    /// A stage read failed its checks: forget the record so nobody asks again.
    pub fn forget(&mut self, key: &BlockKey, loc: Loc) {
        if self.index.remove_at(key, loc.seg, loc.off) {
            self.seg.ssd_set().remove(key);
        }
    }

    /// Seal what can be sealed, wait (bounded) for writes in flight, stop
    /// the I/O thread.
    pub fn shutdown(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let open: Vec<u32> = self.paths.iter().filter_map(|p| p.open).collect();
        for s in open {
            self.close_segment(s);
        }
        for p in &mut self.paths {
            p.open = None;
        }
        while Instant::now() < deadline
            && (self.paths.iter().any(|p| p.writes_inflight > 0) || !self.overflow.is_empty())
        {
            self.poll();
            std::thread::sleep(Duration::from_millis(1));
        }
        self.flush();
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn stats(&self) -> SsdStats {
        self.stats.clone()
    }
}

impl Drop for Tier {
    fn drop(&mut self) {
        // The I/O thread may write into the pool: it must be gone before
        // the pool mapping is.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
