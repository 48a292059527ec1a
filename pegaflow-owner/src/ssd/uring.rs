//! The SSD tier's I/O thread: every disk access of the tier runs here,
//! through one io_uring instance, so the owner's request loop never waits
//! on a disk.
//!
//! The request loop sends [`Job`]s on a bounded channel and gets [`Done`]s
//! back on another; after sending completions this thread rings the
//! owner's doorbell so a sleeping loop wakes up. Bounds: the loop never has
//! more than `write depth + read depth` block jobs in flight per path (it
//! holds back the rest itself), so neither channel fills in practice; the
//! thread blocks on a full completion channel rather than lose one.
//!
//! Reads and writes go through io_uring (`Write`, `Readv`), `O_DIRECT`
//! unless the path's filesystem refuses it (tmpfs), from 4 KiB-aligned
//! buffers ([`AlignedBuf`]) or straight into 4 KiB-aligned pool slots.
//! Segment creation (`open`, `fallocate`, header), sealing (`fdatasync`,
//! then one 4 KiB header write) and removal (`unlink`) are rare and run synchronously here.
//!
//! Checksums are computed here too: of a payload before it is written, and
//! of every block read back, before the loop is told it can be committed.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::Duration;

use crossbeam::channel::{Receiver, RecvTimeoutError, Sender};
use io_uring::{opcode, types, IoUring};
use pegaflow_shm::slot_table::BlockKey;
use tracing::{debug, warn};

use super::segment::{payload_checksum, round_up, RecordHeader, SegmentHeader, HEADER_BYTES};

/// A zeroed, 4 KiB-aligned heap buffer (what `O_DIRECT` needs).
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain bytes owned by this value; it moves between
// threads by value and is only accessed by its current owner.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let len = round_up(len.max(1) as u64) as usize;
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is our allocation, initialised (zeroed at birth).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("valid layout");
        // SAFETY: allocated in new() with this very layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// Work for the I/O thread.
pub enum Job {
    /// Create segment file `path` of `header.bytes` bytes (reserved with
    /// `fallocate`) and write its header.
    Create {
        seg: u32,
        path: PathBuf,
        header: SegmentHeader,
        direct: bool,
    },
    /// Write one record at `off` of segment `seg`: `buf` holds the payload
    /// at offset 4096 (header room before it); the thread computes the
    /// payload checksum and fills in the header.
    Write {
        seg: u32,
        off: u64,
        header: RecordHeader,
        buf: AlignedBuf,
    },
    /// Read the record at `off` of `seg` into `dst` (its payload, padded to
    /// 4 KiB; `dst` points into the pool), and check it is `key`, `len`
    /// bytes, with a matching checksum.
    Read {
        seg: u32,
        off: u64,
        key: BlockKey,
        len: u64,
        dst: usize,
        tag: u64,
    },
    /// Rewrite the segment's header as sealed (all its writes completed).
    Seal { seg: u32, header: SegmentHeader },
    /// Close and unlink the segment once its I/O in flight is done.
    Remove { seg: u32, path: PathBuf },
    /// Open an existing segment file for reads (recovered segments).
    Adopt {
        seg: u32,
        path: PathBuf,
        direct: bool,
    },
}

/// Why a block read back could not be used.
#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    /// The record header is not the key and length the index says.
    Header(&'static str),
    /// The payload does not match its checksum (flipped bits, torn write).
    Checksum,
}

/// What the I/O thread reports back.
pub enum Done {
    Created {
        seg: u32,
        result: io::Result<()>,
    },
    Written {
        seg: u32,
        off: u64,
        header: RecordHeader,
        buf: AlignedBuf,
        result: io::Result<()>,
    },
    Read {
        seg: u32,
        tag: u64,
        result: Result<(), ReadError>,
    },
    /// A recovery worker finished one segment file (see `recover`).
    Recovered(super::recover::Recovered),
    /// Recovery of every file found at start is over.
    RecoveryFinished {
        elapsed: Duration,
    },
}

struct OpenFile {
    file: File,
    inflight: u32,
    remove: Option<PathBuf>,
}

/// The two iovecs of a record read (header buffer, pool slot).
struct Iovecs([libc::iovec; 2]);

// SAFETY: plain pointers into memory the read owns for its duration (the
// header buffer in the same Op, a pool slot reserved for it); only the I/O
// thread that submitted the read touches them.
unsafe impl Send for Iovecs {}

enum Op {
    Write {
        seg: u32,
        off: u64,
        header: RecordHeader,
        buf: AlignedBuf,
        want: usize,
    },
    Read {
        seg: u32,
        off: u64,
        key: BlockKey,
        len: u64,
        dst: usize,
        tag: u64,
        hdr: AlignedBuf,
        // Boxed: the kernel reads the iovecs, which must not move.
        _iov: Box<Iovecs>,
        want: usize,
    },
}

pub struct IoThread {
    jobs: Receiver<Job>,
    done: Sender<Done>,
    wake: Box<dyn Fn() + Send>,
    ring: IoUring,
    files: HashMap<u32, OpenFile>,
    ops: Vec<Option<Op>>,
    free_ops: Vec<usize>,
    inflight: usize,
    backlog: VecDeque<Job>,
}

impl IoThread {
    pub fn new(
        jobs: Receiver<Job>,
        done: Sender<Done>,
        wake: Box<dyn Fn() + Send>,
        depth: u32,
    ) -> io::Result<IoThread> {
        let ring = IoUring::new(depth.clamp(8, 4096).next_power_of_two())?;
        Ok(IoThread {
            jobs,
            done,
            wake,
            ring,
            files: HashMap::new(),
            ops: Vec::new(),
            free_ops: Vec::new(),
            inflight: 0,
            backlog: VecDeque::new(),
        })
    }

    /// Serve jobs until the sending side is dropped and nothing is in flight.
    pub fn run(mut self) {
        let mut closed = false;
        loop {
            // [1] take jobs: block only when idle.
            if self.inflight == 0 && self.backlog.is_empty() {
                if closed {
                    break;
                }
                match self.jobs.recv_timeout(Duration::from_millis(200)) {
                    Ok(j) => self.backlog.push_back(j),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        closed = true;
                        continue;
                    }
                }
            }
            while let Ok(j) = self.jobs.try_recv() {
                self.backlog.push_back(j);
            }
            // [2] start what the ring has room for.
            let mut sent = false;
            while let Some(j) = self.backlog.pop_front() {
                if self.ring.submission().is_full() {
                    self.backlog.push_front(j);
                    break;
                }
                sent |= self.start(j);
            }
            // [3] submit, wait briefly for a completion, reap.
            if self.inflight > 0 {
                let ts = types::Timespec::new().nsec(1_000_000);
                let args = types::SubmitArgs::new().timespec(&ts);
                match self.ring.submitter().submit_with_args(1, &args) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                    Err(e) => warn!(error = %e, "io_uring submit failed; retrying"),
                }
            }
            sent |= self.reap();
            if sent {
                (self.wake)();
            }
        }
    }

    fn op_slot(&mut self, op: Op) -> usize {
        match self.free_ops.pop() {
            Some(i) => {
                self.ops[i] = Some(op);
                i
            }
            None => {
                self.ops.push(Some(op));
                self.ops.len() - 1
            }
        }
    }

    fn send(&self, d: Done) -> bool {
        // Blocks only if the loop is far behind; never drops a completion.
        self.done.send(d).is_ok()
    }

    /// Start one job; returns whether a completion was sent already.
    fn start(&mut self, job: Job) -> bool {
        match job {
            Job::Create {
                seg,
                path,
                header,
                direct,
            } => {
                let result = create_segment(&path, &header, direct);
                match result {
                    Ok(file) => {
                        self.files.insert(
                            seg,
                            OpenFile {
                                file,
                                inflight: 0,
                                remove: None,
                            },
                        );
                        self.send(Done::Created {
                            seg,
                            result: Ok(()),
                        })
                    }
                    Err(e) => self.send(Done::Created {
                        seg,
                        result: Err(e),
                    }),
                }
            }
            Job::Adopt { seg, path, direct } => {
                match open_segment(&path, direct) {
                    Ok(file) => {
                        self.files.insert(
                            seg,
                            OpenFile {
                                file,
                                inflight: 0,
                                remove: None,
                            },
                        );
                    }
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "cannot open a recovered SSD segment; its blocks will miss")
                    }
                }
                false
            }
            Job::Seal { seg, header } => {
                if let Some(f) = self.files.get(&seg) {
                    // The records first, then the header that vouches for
                    // them: an O_DIRECT write that completed may still sit
                    // in the device's volatile cache, and a power cut must
                    // not leave a sealed header over lost records (recovery
                    // trusts a sealed segment's record headers; payload
                    // checksums would still catch the loss at read time).
                    if let Err(e) = f.file.sync_data() {
                        warn!(seg, error = %e, "could not flush an SSD segment before sealing it; left unsealed (the next start verifies all of it)");
                        return false;
                    }
                    let mut b = AlignedBuf::new(HEADER_BYTES as usize);
                    header.encode(b.as_mut_slice());
                    if let Err(e) = f.file.write_all_at(b.as_slice(), 0) {
                        warn!(seg, error = %e, "could not seal an SSD segment; the next start verifies all of it");
                    }
                }
                false
            }
            Job::Remove { seg, path } => {
                if let Some(f) = self.files.get_mut(&seg) {
                    if f.inflight > 0 {
                        f.remove = Some(path);
                        return false;
                    }
                    self.files.remove(&seg);
                }
                if let Err(e) = std::fs::remove_file(&path) {
                    if e.kind() != io::ErrorKind::NotFound {
                        warn!(path = %path.display(), error = %e, "could not remove an evicted SSD segment");
                    }
                }
                false
            }
            Job::Write {
                seg,
                off,
                mut header,
                mut buf,
            } => {
                let Some(f) = self.files.get_mut(&seg) else {
                    return self.send(Done::Written {
                        seg,
                        off,
                        header,
                        buf,
                        result: Err(io::Error::new(
                            io::ErrorKind::NotFound,
                            "segment file not available",
                        )),
                    });
                };
                let h = HEADER_BYTES as usize;
                let want = h + round_up(header.len) as usize;
                header.checksum = payload_checksum(&buf.as_slice()[h..h + header.len as usize]);
                header.encode(&mut buf.as_mut_slice()[..h]);
                let fd = types::Fd(f.file.as_raw_fd());
                f.inflight += 1;
                let ptr = buf.as_slice().as_ptr();
                let i = self.op_slot(Op::Write {
                    seg,
                    off,
                    header,
                    buf,
                    want,
                });
                let sqe = opcode::Write::new(fd, ptr, want as u32)
                    .offset(off)
                    .build()
                    .user_data(i as u64);
                // SAFETY: the buffer lives in self.ops[i] (heap memory that
                // does not move) until its completion is reaped; the fd stays
                // open while inflight > 0. The ring had room (checked).
                unsafe {
                    let _ = self.ring.submission().push(&sqe);
                }
                self.inflight += 1;
                false
            }
            Job::Read {
                seg,
                off,
                key,
                len,
                dst,
                tag,
            } => {
                let Some(f) = self.files.get_mut(&seg) else {
                    return self.send(Done::Read {
                        seg,
                        tag,
                        result: Err(ReadError::Io(io::Error::new(
                            io::ErrorKind::NotFound,
                            "segment file not available",
                        ))),
                    });
                };
                let fd = types::Fd(f.file.as_raw_fd());
                f.inflight += 1;
                let mut hdr = AlignedBuf::new(HEADER_BYTES as usize);
                let padded = round_up(len) as usize;
                let iov = Box::new(Iovecs([
                    libc::iovec {
                        iov_base: hdr.as_mut_slice().as_mut_ptr() as *mut libc::c_void,
                        iov_len: HEADER_BYTES as usize,
                    },
                    libc::iovec {
                        iov_base: dst as *mut libc::c_void,
                        iov_len: padded,
                    },
                ]));
                let iov_ptr = iov.0.as_ptr();
                let want = HEADER_BYTES as usize + padded;
                let i = self.op_slot(Op::Read {
                    seg,
                    off,
                    key,
                    len,
                    dst,
                    tag,
                    hdr,
                    _iov: iov,
                    want,
                });
                let sqe = opcode::Readv::new(fd, iov_ptr, 2)
                    .offset(off)
                    .build()
                    .user_data(i as u64);
                // SAFETY: the iovecs (boxed) and the header buffer live in
                // self.ops[i] until the completion is reaped; `dst` is a
                // pool slot in Writing(owner) state that only this read
                // writes, inside the pool mapping, which the owner keeps
                // mapped until this thread has exited.
                unsafe {
                    let _ = self.ring.submission().push(&sqe);
                }
                self.inflight += 1;
                false
            }
        }
    }

    fn finish_file_op(&mut self, seg: u32) {
        let Some(f) = self.files.get_mut(&seg) else {
            return;
        };
        f.inflight -= 1;
        if f.inflight == 0 {
            if let Some(path) = f.remove.take() {
                self.files.remove(&seg);
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Reap completions; returns whether any was sent.
    fn reap(&mut self) -> bool {
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let mut sent = false;
        for (ud, res) in cqes {
            let i = ud as usize;
            let Some(op) = self.ops.get_mut(i).and_then(Option::take) else {
                continue;
            };
            self.free_ops.push(i);
            self.inflight -= 1;
            match op {
                Op::Write {
                    seg,
                    off,
                    header,
                    buf,
                    want,
                } => {
                    self.finish_file_op(seg);
                    let result = io_result(res, want);
                    sent |= self.send(Done::Written {
                        seg,
                        off,
                        header,
                        buf,
                        result,
                    });
                }
                Op::Read {
                    seg,
                    off,
                    key,
                    len,
                    dst,
                    tag,
                    hdr,
                    _iov: _,
                    want,
                } => {
                    self.finish_file_op(seg);
                    let result = io_result(res, want)
                        .map_err(ReadError::Io)
                        .and_then(|()| check_read(&hdr, key, len, dst));
                    if let Err(e) = &result {
                        debug!(seg, off, error = ?e, "SSD read failed");
                    }
                    sent |= self.send(Done::Read { seg, tag, result });
                }
            }
        }
        sent
    }
}

fn io_result(res: i32, want: usize) -> io::Result<()> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else if (res as usize) < want {
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("short transfer: {res} of {want} bytes"),
        ))
    } else {
        Ok(())
    }
}

fn check_read(hdr: &AlignedBuf, key: BlockKey, len: u64, dst: usize) -> Result<(), ReadError> {
    let h = RecordHeader::decode(hdr.as_slice()).map_err(ReadError::Header)?;
    if h.key != key || h.len != len {
        return Err(ReadError::Header("record is not the block the index names"));
    }
    // SAFETY: dst..dst+len is the pool slot the read just filled (Writing
    // by the owner: nobody else writes it), inside the pool mapping.
    let data = unsafe { std::slice::from_raw_parts(dst as *const u8, len as usize) };
    if payload_checksum(data) != h.checksum {
        return Err(ReadError::Checksum);
    }
    Ok(())
}

/// Open flags for segment files: `O_DIRECT` where the filesystem takes it.
fn options(direct: bool) -> OpenOptions {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o
}

pub fn open_segment(path: &std::path::Path, direct: bool) -> io::Result<File> {
    options(direct).open(path)
}

fn create_segment(
    path: &std::path::Path,
    header: &SegmentHeader,
    direct: bool,
) -> io::Result<File> {
    let file = {
        let mut o = options(direct);
        o.create_new(true).mode(0o600);
        o.open(path)?
    };
    let made = (|| {
        // SAFETY: fallocate on an open descriptor we own; no memory passed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, header.bytes as i64) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(e);
            }
            file.set_len(header.bytes)?;
        }
        let mut b = AlignedBuf::new(HEADER_BYTES as usize);
        header.encode(b.as_mut_slice());
        file.write_all_at(b.as_slice(), 0)
    })();
    match made {
        Ok(()) => Ok(file),
        Err(e) => {
            drop(file);
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

/// Whether files in `dir` can be opened with `O_DIRECT` (tmpfs: no).
pub fn probe_direct(dir: &std::path::Path) -> io::Result<bool> {
    let p = dir.join(format!(".probe-{}", std::process::id()));
    let r = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_DIRECT)
        .open(&p);
    let out = match r {
        Ok(f) => {
            // Some filesystems accept the flag but fail the I/O.
            let mut b = AlignedBuf::new(4096);
            b.as_mut_slice()[0] = 1;
            let ok = f.write_all_at(b.as_slice(), 0).is_ok();
            Ok(ok)
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_file(&p);
    if out.is_err() {
        // Not even a buffered file can be made there.
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&p)?;
        let _ = std::fs::remove_file(&p);
    }
    out
}
