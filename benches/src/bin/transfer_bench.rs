//! GPU transfer benchmark (issue 3, item 7).
//!
//! The reference workload of shared/BENCHMARKS.md: a Llama-3.1-8B-shaped
//! vLLM KV cache (32 layers, bf16, 16-token blocks, 8 KV heads, head dim
//! 128: a 32 KiB K piece and a 32 KiB V piece per layer per block), 8
//! requests of 625 blocks. The pool is a file in /dev/shm (or on a hugetlbfs
//! mount), mapped shared, touched and registered with `cuMemHostRegister`
//! exactly as an engine does (`pegaflow_core::cuda::register_pool_background`).
//!
//! For each pool backing, layout (piece size, layer count) and backend it
//! measures: load one request, save 8 requests layer by layer, and save
//! while loading (4 requests each way), with GB/s (1e9 bytes), p50/p99
//! latency, the contiguous ceiling measured in the same run (one 1 GiB
//! `cuMemcpyAsync` each way between the same registered pool and device,
//! and both at once), and the ratio. Every run verifies every byte it moved:
//! GPU blocks hold a pattern derived from (block, layer, K/V, offset); saves
//! are checked in the slots, loads on the GPU after clearing it.
//!
//! Usage:
//!   transfer_bench [--quick] [--shm-dir DIR] [--huge-dir DIR] [--json PATH]
//!   transfer_bench register --gib N --dir DIR    (registration timing only)
//!
//! Prints one table and one JSON line (`TRANSFER_BENCH_JSON {...}`).
//! Without a CUDA driver it prints `SKIPPED: ...` and exits 0.

use std::fmt::Write as _;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pegaflow_core::copy::conformance::piece_tag;
use pegaflow_core::copy::dma::{DmaBackend, DmaMode};
use pegaflow_core::copy::kernel::KernelBackend;
use pegaflow_core::copy::{AutoBackend, CopyBackend};
use pegaflow_core::cuda::{self, CudaDevice, DeviceBuffer, Event, HostRegistration, Stream};
use pegaflow_core::layout::{KvLayout, PieceOrder};
use pegaflow_core::transfer::KvTransfer;

type Res<T> = Result<T, String>;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const GIB: usize = 1024 * MIB;
const REQUESTS: usize = 8;
const BLOCKS_PER_REQUEST: usize = 625;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !cuda::driver_present() || cuda::device_count() == 0 {
        println!("SKIPPED: no CUDA driver (libcuda) or no GPU on this machine");
        return;
    }
    let r = if args.first().map(String::as_str) == Some("register") {
        register_mode(&args[1..])
    } else {
        bench_mode(&args)
    };
    if let Err(e) = r {
        eprintln!("transfer_bench: {e}");
        std::process::exit(1);
    }
}

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(4)
        .min(32)
}

// ------------------------------------------------------------ pool file

/// A pool file mapped shared, as the owner creates it and an engine maps it.
struct Pool {
    path: PathBuf,
    base: *mut u8,
    len: usize,
    page: usize,
    create_touch: Duration,
}

// SAFETY: a plain mapping; the benchmark coordinates access to it.
unsafe impl Sync for Pool {}
// SAFETY: as above.
unsafe impl Send for Pool {}

fn hugetlbfs_mounted(dir: &Path) -> bool {
    let Ok(m) = std::fs::read_to_string("/proc/mounts") else {
        return false;
    };
    let d = dir.to_string_lossy();
    m.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[2] == "hugetlbfs" && f[1] == d
    })
}

fn huge_pages_free() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("HugePages_Free:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

impl Pool {
    /// Creates `len` bytes in `dir`, maps them and touches every page with
    /// all cores (what the owner does at start).
    fn create(dir: &Path, len: usize, huge: bool) -> Res<Pool> {
        let page = if huge { 2 * MIB } else { 4 * KIB };
        let len = len.next_multiple_of(2 * MIB);
        if huge && huge_pages_free() * 2 * MIB < len {
            return Err(format!(
                "only {} free 2 MiB hugepages, need {}",
                huge_pages_free(),
                len / (2 * MIB)
            ));
        }
        let path = dir.join(format!("pegaflow-bench-{}", std::process::id()));
        let t = Instant::now();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| format!("create {path:?}: {e}"))?;
        f.set_len(len as u64)
            .map_err(|e| format!("size {path:?}: {e}"))?;
        // SAFETY: shared mapping of a file we own, no fixed address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            let _ = std::fs::remove_file(&path);
            return Err(format!(
                "mmap {path:?}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let base = base as *mut u8;
        let n = threads();
        let per = (len / page).div_ceil(n) * page;
        let addr = base as usize;
        std::thread::scope(|s| {
            for i in 0..n {
                s.spawn(move || {
                    let (a, b) = (i * per, ((i + 1) * per).min(len));
                    let mut o = a;
                    while o < b {
                        // SAFETY: inside the mapping; one writer per page.
                        unsafe { std::ptr::write_volatile((addr + o) as *mut u8, 0) };
                        o += page;
                    }
                });
            }
        });
        Ok(Pool {
            path,
            base,
            len,
            page,
            create_touch: t.elapsed(),
        })
    }

    fn slot(&self, slot_bytes: usize, i: usize) -> usize {
        self.base as usize + i * slot_bytes
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: mapped in create(), unmapped once; registrations were
        // dropped before (callers drop them first).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
        let _ = std::fs::remove_file(&self.path);
    }
}

// ------------------------------------------------------- registration

fn register_mode(args: &[String]) -> Res<()> {
    let gib: usize = arg(args, "--gib")
        .unwrap_or("64")
        .parse()
        .map_err(|e| format!("--gib: {e}"))?;
    let dir = PathBuf::from(arg(args, "--dir").unwrap_or("/dev/shm"));
    let huge = hugetlbfs_mounted(&dir);
    let d = CudaDevice::open(0).map_err(|e| e.to_string())?;
    let pool = match Pool::create(&dir, gib * GIB, huge) {
        Ok(p) => p,
        Err(e) => {
            println!(
                "REGISTER {{\"backing\":\"{}\",\"gib\":{gib},\"skipped\":\"{e}\"}}",
                if huge { "hugetlbfs" } else { "shm" }
            );
            return Ok(());
        }
    };
    // SAFETY: the mapping outlives the registration (dropped first below).
    let pending = unsafe { cuda::register_pool_background(&d, pool.base, pool.len) };
    let t = Instant::now();
    let reg = pending.wait().map_err(|e| e.to_string())?;
    let waited = t.elapsed();
    // The pending handle holds a second Arc: drop it, or dropping `reg`
    // would not unregister and the timing below would read zero.
    drop(pending);
    let t = Instant::now();
    drop(reg);
    let unreg = t.elapsed();
    println!(
        "REGISTER {{\"backing\":\"{}\",\"page_kib\":{},\"gib\":{gib},\"create_touch_s\":{:.2},\"register_s\":{:.2},\"unregister_s\":{:.2}}}",
        if huge { "hugetlbfs" } else { "shm" },
        pool.page / KIB,
        pool.create_touch.as_secs_f64(),
        waited.as_secs_f64(),
        unreg.as_secs_f64()
    );
    Ok(())
}

// ------------------------------------------------------------- patterns

/// The 8-byte word `w` of the piece with `tag`: unique per piece and offset,
/// so a misplaced or stale piece cannot pass verification.
#[inline]
fn word(tag: u64, w: usize) -> u64 {
    tag.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (w as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)
        ^ 0x0123_4567_89AB_CDEF
}

fn fill_piece(buf: &mut [u8], tag: u64) {
    for (w, c) in buf.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&word(tag, w).to_le_bytes());
    }
}

fn piece_ok(buf: &[u8], tag: u64) -> bool {
    buf.chunks_exact(8)
        .enumerate()
        .all(|(w, c)| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])) == word(tag, w))
}

// ---------------------------------------------------------------- cache

/// The engine's KV cache on the GPU.
struct Cache {
    layout: KvLayout,
    bufs: Vec<DeviceBuffer>,
}

#[derive(Clone, Copy, Debug)]
enum Shape {
    /// `[2, nb, block_tokens, 8, 128]` per layer: K and V pieces.
    PerLayer { layers: usize, block_tokens: usize },
    /// `[nb, 2, block_tokens, 8, 128]` per layer: K+V adjacent, one piece.
    BlockLeading { layers: usize },
    /// One tensor, a block is one piece covering all layers.
    CrossLayer { layers: usize },
}

impl Shape {
    fn name(&self) -> String {
        match self {
            Shape::PerLayer {
                layers,
                block_tokens,
            } => format!("per-layer L{layers} bt{block_tokens}"),
            Shape::BlockLeading { layers } => format!("block-leading L{layers}"),
            Shape::CrossLayer { layers } => format!("cross-layer L{layers}"),
        }
    }
}

/// Bytes per token per layer per K or V: 8 heads x 128 x bf16.
const TOKEN_BYTES: usize = 8 * 128 * 2;

impl Cache {
    fn new(d: &Arc<CudaDevice>, shape: Shape, num_blocks: usize) -> Res<Cache> {
        let e = |e: cuda::CudaError| e.to_string();
        let (layout, bufs) = match shape {
            Shape::PerLayer {
                layers,
                block_tokens,
            } => {
                let piece = block_tokens * TOKEN_BYTES;
                let bufs = (0..layers)
                    .map(|_| DeviceBuffer::new(d, 2 * num_blocks * piece))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(e)?;
                let bases = bufs.iter().map(|b| b.ptr()).collect();
                (
                    KvLayout::split_kv(
                        bases,
                        num_blocks,
                        block_tokens,
                        piece,
                        num_blocks * piece,
                        piece,
                        2,
                        PieceOrder::Nhd,
                    ),
                    bufs,
                )
            }
            Shape::BlockLeading { layers } => {
                let piece = 16 * TOKEN_BYTES;
                let bufs = (0..layers)
                    .map(|_| DeviceBuffer::new(d, 2 * num_blocks * piece))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(e)?;
                let bases = bufs.iter().map(|b| b.ptr()).collect();
                (
                    KvLayout::split_kv(
                        bases,
                        num_blocks,
                        16,
                        2 * piece,
                        piece,
                        piece,
                        2,
                        PieceOrder::Nhd,
                    ),
                    bufs,
                )
            }
            Shape::CrossLayer { layers } => {
                let piece = layers * 2 * 16 * TOKEN_BYTES;
                let buf = DeviceBuffer::new(d, num_blocks * piece).map_err(e)?;
                (
                    KvLayout::cross_layer(
                        buf.ptr(),
                        layers,
                        num_blocks,
                        16,
                        piece,
                        piece,
                        2,
                        PieceOrder::Nhd,
                    ),
                    vec![buf],
                )
            }
        };
        layout.validate().map_err(|e| e.to_string())?;
        Ok(Cache { layout, bufs })
    }

    /// Work items covering the cache: (segment, lo, hi) byte ranges of
    /// about 256 MiB. Pieces sit at multiples of `piece_bytes` in every
    /// shape we build, so ranges cut at such multiples never split a piece.
    fn chunks(&self) -> Vec<(usize, usize, usize)> {
        let pb = self.layout.piece_bytes;
        let step = ((256 * MIB) / pb).max(1) * pb;
        let mut v = Vec::new();
        for (s, b) in self.bufs.iter().enumerate() {
            let mut lo = 0;
            while lo < b.len() {
                let hi = (lo + step).min(b.len());
                v.push((s, lo, hi));
                lo = hi;
            }
        }
        v
    }

    /// Every piece of block `b`: (segment buffer offset, tag).
    fn pieces_of(&self, s: usize, b: u32) -> impl Iterator<Item = (usize, u64)> + '_ {
        let l = &self.layout;
        (0..l.pieces_per_segment()).map(move |p| {
            (
                (l.device_addr(s, b, p) - l.segment_bases[s]) as usize,
                piece_tag(s, b, p),
            )
        })
    }

    /// Runs `f` over every chunk on all cores.
    fn par_chunks(&self, f: impl Fn(usize, usize, usize) -> Res<()> + Sync) -> Res<()> {
        let items = self.chunks();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let errs: Vec<String> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..threads())
                .map(|_| {
                    let (f, items, next) = (&f, &items, &next);
                    sc.spawn(move || -> Res<()> {
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&(s, lo, hi)) = items.get(i) else {
                                return Ok(());
                            };
                            f(s, lo, hi)?;
                        }
                    })
                })
                .collect();
            hs.into_iter()
                .filter_map(|h| {
                    h.join()
                        .unwrap_or(Err("worker thread panicked".into()))
                        .err()
                })
                .collect()
        });
        errs.into_iter().next().map_or(Ok(()), Err)
    }

    /// Writes the pattern of every block in `want` (all when `None`); every
    /// other byte becomes zero.
    fn fill_blocks(&self, want: Option<&[bool]>) -> Res<()> {
        let pb = self.layout.piece_bytes;
        self.par_chunks(|s, lo, hi| {
            let mut img = vec![0u8; hi - lo];
            for b in 0..self.layout.num_blocks as u32 {
                if want.is_some_and(|w| !w[b as usize]) {
                    continue;
                }
                for (off, tag) in self.pieces_of(s, b) {
                    if off >= lo && off < hi {
                        fill_piece(&mut img[off - lo..off - lo + pb], tag);
                    }
                }
            }
            self.bufs[s].write(lo, &img).map_err(|e| e.to_string())
        })
    }

    fn fill(&self) -> Res<()> {
        self.fill_blocks(None)
    }

    fn clear(&self) -> Res<()> {
        for b in &self.bufs {
            b.memset(0).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Checks that `blocks` hold their pattern and every other byte of the
    /// cache is zero (it was cleared before the loads).
    fn verify_loaded(&self, blocks: &[u32]) -> Res<()> {
        let mut loaded = vec![false; self.layout.num_blocks];
        for &b in blocks {
            loaded[b as usize] = true;
        }
        let pb = self.layout.piece_bytes;
        let loaded = &loaded;
        self.par_chunks(|s, lo, hi| {
            let mut img = vec![0u8; hi - lo];
            self.bufs[s].read(lo, &mut img).map_err(|e| e.to_string())?;
            let mut covered = vec![false; (hi - lo).div_ceil(pb)];
            for b in 0..self.layout.num_blocks as u32 {
                if !loaded[b as usize] {
                    continue;
                }
                for (off, tag) in self.pieces_of(s, b) {
                    if off >= lo && off < hi {
                        if !piece_ok(&img[off - lo..off - lo + pb], tag) {
                            return Err(format!(
                                "load verify: segment {s} block {b} piece at {off:#x} is wrong"
                            ));
                        }
                        covered[(off - lo) / pb] = true;
                    }
                }
            }
            for (i, c) in img.chunks(pb).enumerate() {
                if !covered[i] && c.iter().any(|&x| x != 0) {
                    return Err(format!(
                        "load verify: segment {s} bytes at {:#x} written but not loaded",
                        lo + i * pb
                    ));
                }
            }
            Ok(())
        })
    }
}

/// Checks slot `slots[i]` holds block `blocks[i]`.
fn verify_saved(l: &KvLayout, blocks: &[u32], slots: &[usize]) -> Res<()> {
    let n = threads();
    let per = blocks.len().div_ceil(n).max(1);
    let errs: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = blocks
            .chunks(per)
            .zip(slots.chunks(per))
            .map(|(bs, ss)| {
                sc.spawn(move || -> Res<()> {
                    for (&b, &slot) in bs.iter().zip(ss) {
                        for s in 0..l.num_segments() {
                            for p in 0..l.pieces_per_segment() {
                                // SAFETY: slot lies in the mapped pool; all
                                // saves completed before verification.
                                let got = unsafe { std::slice::from_raw_parts((slot + l.slot_offset(s, p)) as *const u8, l.piece_bytes) };
                                if !piece_ok(got, piece_tag(s, b, p)) {
                                    return Err(format!("save verify: block {b} segment {s} piece {p} wrong in slot {slot:#x}"));
                                }
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter()
            .filter_map(|h| {
                h.join()
                    .unwrap_or(Err("verify thread panicked".into()))
                    .err()
            })
            .collect()
    });
    errs.into_iter().next().map_or(Ok(()), Err)
}

fn clear_slots(slots: &[usize], slot_bytes: usize) {
    for &s in slots {
        // SAFETY: slots lie in the mapped pool; no copy is in flight.
        unsafe { std::ptr::write_bytes(s as *mut u8, 0, slot_bytes) };
    }
}

// ------------------------------------------------------------ timing

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return 0.0;
    }
    s[((s.len() - 1) as f64 * p).round() as usize]
}

struct Row {
    backing: String,
    shape: String,
    op: &'static str,
    backend: String,
    piece_kib: usize,
    pieces_per_call: usize,
    bytes: usize,
    gbps: f64,
    p50_ms: f64,
    p99_ms: f64,
    ceiling: f64,
    verified: bool,
    note: String,
}

impl Row {
    fn ratio(&self) -> f64 {
        if self.ceiling > 0.0 {
            self.gbps / self.ceiling
        } else {
            0.0
        }
    }
}

struct Ceilings {
    h2d: f64,
    d2h: f64,
    bidir: f64,
}

/// One 1 GiB `cuMemcpyAsync` each way between the registered pool and the
/// device, best of `reps`, plus both directions at once on two streams.
fn measure_ceilings(d: &Arc<CudaDevice>, pool: &Pool, reps: usize) -> Res<Ceilings> {
    let e = |e: cuda::CudaError| e.to_string();
    let n = GIB;
    if pool.len < 2 * n {
        return Err("pool smaller than 2 GiB; cannot measure the ceiling".into());
    }
    let dev = DeviceBuffer::new(d, 2 * n).map_err(e)?;
    let (a, b) = (Stream::new(d).map_err(e)?, Stream::new(d).map_err(e)?);
    let (t0, t1, t2) = (
        Event::timing(d).map_err(e)?,
        Event::timing(d).map_err(e)?,
        Event::timing(d).map_err(e)?,
    );
    let one = |dir: u8| -> Res<f64> {
        let mut best = 0f64;
        for _ in 0..reps {
            t0.record(a.as_ref()).map_err(e)?;
            // SAFETY: both ranges lie in the live pool / device buffer.
            unsafe {
                if dir == 0 {
                    cuda::memcpy_htod_async(d, dev.ptr(), pool.base, n, a.as_ref()).map_err(e)?;
                } else {
                    cuda::memcpy_dtoh_async(d, pool.base, dev.ptr(), n, a.as_ref()).map_err(e)?;
                }
            }
            t1.record(a.as_ref()).map_err(e)?;
            t1.synchronize().map_err(e)?;
            let ms = t1.elapsed_ms_since(&t0).map_err(e)? as f64;
            best = best.max(n as f64 / (ms * 1e-3) / 1e9);
        }
        Ok(best)
    };
    let h2d = one(0)?;
    let d2h = one(1)?;
    let mut bidir = 0f64;
    for _ in 0..reps {
        d.synchronize().map_err(e)?;
        t0.record(a.as_ref()).map_err(e)?;
        t0.wait_on(b.as_ref()).map_err(e)?;
        // SAFETY: disjoint halves of the pool and of the device buffer.
        unsafe {
            cuda::memcpy_htod_async(d, dev.ptr(), pool.base, n, a.as_ref()).map_err(e)?;
            cuda::memcpy_dtoh_async(d, pool.base.add(n), dev.ptr() + n as u64, n, b.as_ref())
                .map_err(e)?;
        }
        t1.record(a.as_ref()).map_err(e)?;
        t2.record(b.as_ref()).map_err(e)?;
        t1.synchronize().map_err(e)?;
        t2.synchronize().map_err(e)?;
        let ms = (t1.elapsed_ms_since(&t0).map_err(e)? as f64)
            .max(t2.elapsed_ms_since(&t0).map_err(e)? as f64);
        bidir = bidir.max(2.0 * n as f64 / (ms * 1e-3) / 1e9);
    }
    Ok(Ceilings { h2d, d2h, bidir })
}

fn backends(d: &Arc<CudaDevice>) -> Res<Vec<Arc<dyn CopyBackend>>> {
    let e = |e: pegaflow_core::copy::CopyError| e.to_string();
    Ok(vec![
        Arc::new(KernelBackend::new(d).map_err(e)?),
        Arc::new(DmaBackend::new(d).map_err(e)?),
        Arc::new(DmaBackend::with_mode(d, DmaMode::PerPiece).map_err(e)?),
        Arc::new(AutoBackend::new(d).map_err(e)?),
    ])
}

/// Deterministic shuffle (splitmix64 Fisher-Yates).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = seed;
    for i in (1..n).rev() {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        v.swap(i, (z % (i as u64 + 1)) as usize);
    }
    v
}

struct Ctx<'a> {
    d: &'a Arc<CudaDevice>,
    pool: &'a Pool,
    reg: &'a Arc<HostRegistration>,
    ceil: &'a Ceilings,
    backing: &'a str,
    quick: bool,
}

/// All three operations for one shape and backend; rows appended to `out`.
fn run_shape_backend(
    cx: &Ctx,
    cache: &Cache,
    backend: &Arc<dyn CopyBackend>,
    label: &str,
    out: &mut Vec<Row>,
) -> Res<()> {
    let e = |e: pegaflow_core::transfer::TransferError| e.to_string();
    let l = &cache.layout;
    let sb = l.slot_bytes();
    let total = REQUESTS * BLOCKS_PER_REQUEST;
    if total * sb > cx.pool.len {
        return Err(format!(
            "pool of {} bytes too small for {total} slots of {sb}",
            cx.pool.len
        ));
    }
    // vLLM hands out scattered block ids; the owner hands out scattered slots.
    let gpu: Vec<u32> = shuffled(l.num_blocks, 1)
        .into_iter()
        .take(total)
        .map(|b| b as u32)
        .collect();
    let slot_ids = shuffled(cx.pool.len / sb, 2);
    let slots: Vec<usize> = slot_ids
        .iter()
        .take(total)
        .map(|&i| cx.pool.slot(sb, i))
        .collect();
    let req = |r: usize| r * BLOCKS_PER_REQUEST..(r + 1) * BLOCKS_PER_REQUEST;
    let save_stream = Stream::new(cx.d).map_err(|e| e.to_string())?;
    let load_stream = Stream::new(cx.d).map_err(|e| e.to_string())?;
    let mut saver = KvTransfer::new(l.clone(), backend.clone(), Some(cx.d.clone()))
        .map_err(e)?
        .with_pool(cx.reg.clone());
    let mut loader = KvTransfer::new(l.clone(), backend.clone(), Some(cx.d.clone()))
        .map_err(e)?
        .with_pool(cx.reg.clone());
    let slow = backend.name() == "dma-loop";
    let piece_kib = l.piece_bytes / KIB;
    let segs = l.num_segments();
    let mk = |op: &'static str,
              bytes: usize,
              times: &[f64],
              ceiling: f64,
              pieces: usize,
              note: String| Row {
        backing: cx.backing.into(),
        shape: String::new(),
        op,
        backend: label.into(),
        piece_kib,
        pieces_per_call: pieces,
        bytes,
        gbps: bytes as f64 / percentile(times, 0.5) / 1e9,
        p50_ms: percentile(times, 0.5) * 1e3,
        p99_ms: percentile(times, 0.99) * 1e3,
        ceiling,
        verified: true,
        note,
    };

    // ---- save 8 requests, layer by layer (one call per layer, all blocks).
    cache.fill()?;
    clear_slots(&slots, sb);
    let iters = if cx.quick || slow { 2 } else { 4 };
    let mut times = Vec::new();
    for it in 0..iters + 1 {
        let t = Instant::now();
        for s in 0..segs {
            // SAFETY: slots inside the registered pool, cache alive.
            unsafe { saver.save(s..s + 1, &gpu, &slots, save_stream.as_ref()) }.map_err(e)?;
        }
        saver.save_done(true).map_err(e)?;
        if it > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    verify_saved(l, &gpu, &slots)?;
    let pieces = l.plan(&gpu, &slots, 0..1).map_err(|e| e.to_string())?.len();
    out.push(mk(
        "save 8 req",
        total * sb,
        &times,
        cx.ceil.d2h,
        pieces,
        String::new(),
    ));

    // ---- load one request (all layers, per-layer events, wait last).
    cache.clear()?;
    let iters = if cx.quick || slow { 3 } else { 10 };
    let (g0, s0) = (&gpu[req(0)], &slots[req(0)]);
    let mut times = Vec::new();
    for it in 0..iters + 1 {
        let t = Instant::now();
        // SAFETY: as above.
        unsafe { loader.load(0..segs, g0, s0, load_stream.as_ref()) }.map_err(e)?;
        loader.wait_layer(segs - 1).map_err(e)?;
        if it > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    cache.verify_loaded(g0)?;
    let pieces = l.plan(g0, s0, 0..1).map_err(|e| e.to_string())?.len();
    out.push(mk(
        "load 1 req",
        BLOCKS_PER_REQUEST * sb,
        &times,
        cx.ceil.h2d,
        pieces,
        String::new(),
    ));

    // ---- save 4 requests while loading 4 others, layer-interleaved.
    if slow {
        // ~1 s an iteration and known to be link-bound by per-call cost.
        return Ok(());
    }
    cache.fill()?;
    let (gl, sl) = (
        &gpu[0..4 * BLOCKS_PER_REQUEST],
        &slots[0..4 * BLOCKS_PER_REQUEST],
    );
    let (gs, ss) = (
        &gpu[4 * BLOCKS_PER_REQUEST..],
        &slots[4 * BLOCKS_PER_REQUEST..],
    );
    // Slots of requests 0..4 hold the saved blocks from above; loading
    // rewrites the same pattern, so clear the destination blocks first by
    // clearing the whole cache and refilling only the save side.
    refill_blocks(cache, gs)?;
    clear_slots(ss, sb);
    let iters = if cx.quick { 2 } else { 4 };
    let mut times = Vec::new();
    for it in 0..iters + 1 {
        let t = Instant::now();
        for s in 0..segs {
            // SAFETY: disjoint blocks and slots on the two streams.
            unsafe {
                saver
                    .save(s..s + 1, gs, ss, save_stream.as_ref())
                    .map_err(e)?;
                loader
                    .load(s..s + 1, gl, sl, load_stream.as_ref())
                    .map_err(e)?;
            }
        }
        saver.save_done(true).map_err(e)?;
        loader.wait_layer(segs - 1).map_err(e)?;
        if it > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    verify_saved(l, gs, ss)?;
    // The GPU holds the loaded blocks of 0..4 and the (re)filled save side.
    let mut all = gl.to_vec();
    all.extend_from_slice(gs);
    cache.verify_loaded(&all)?;
    let bytes = (gl.len() + gs.len()) * sb;
    out.push(mk(
        "save+load 4+4",
        bytes,
        &times,
        cx.ceil.bidir,
        0,
        String::new(),
    ));
    Ok(())
}

/// Writes the pattern into `blocks` only (others become zero).
fn refill_blocks(cache: &Cache, blocks: &[u32]) -> Res<()> {
    let mut want = vec![false; cache.layout.num_blocks];
    for &b in blocks {
        want[b as usize] = true;
    }
    cache.fill_blocks(Some(&want))
}

fn bench_mode(args: &[String]) -> Res<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let shm_dir = PathBuf::from(arg(args, "--shm-dir").unwrap_or("/dev/shm"));
    let huge_dir = PathBuf::from(arg(args, "--huge-dir").unwrap_or("/dev/hugepages"));
    let only_backing = arg(args, "--backing");
    let d = CudaDevice::open(0).map_err(|e| e.to_string())?;
    let version = cuda::driver_version().map_err(|e| e.to_string())?;
    let batch = pegaflow_core::copy::dma::BatchApi::load().map_err(|e| e.to_string())?;
    println!(
        "device 0, driver {version}, SMs {}, batch copy: {:?}",
        d.sm_count().map_err(|e| e.to_string())?,
        batch
    );

    let mut rows: Vec<Row> = Vec::new();
    let mut ceilings_json = String::new();
    let mut notes: Vec<String> = Vec::new();
    let pool_bytes = REQUESTS * BLOCKS_PER_REQUEST * 2 * MIB + GIB; // 10.5 GB of slots + margin
    let backings: Vec<(&str, PathBuf, bool)> = vec![
        ("shm", shm_dir, false),
        ("hugetlbfs", huge_dir.clone(), true),
    ];
    for (backing, dir, huge) in backings {
        if only_backing.is_some_and(|b| b != backing) {
            continue;
        }
        if huge && !hugetlbfs_mounted(&dir) {
            let n = format!("hugetlbfs: SKIPPED, {dir:?} is not a hugetlbfs mount");
            println!("{n}");
            notes.push(n);
            continue;
        }
        let pool = match Pool::create(&dir, pool_bytes, huge) {
            Ok(p) => p,
            Err(e) => {
                let n = format!("{backing}: SKIPPED, {e}");
                println!("{n}");
                notes.push(n);
                continue;
            }
        };
        // As an engine: registration on a background thread while the rest
        // of start-up (here: allocating the cache) goes on.
        // SAFETY: the pool outlives the registration (dropped first below).
        let pending = unsafe { cuda::register_pool_background(&d, pool.base, pool.len) };
        let shapes: Vec<Shape> = if backing == "shm" && !quick {
            vec![
                Shape::PerLayer {
                    layers: 32,
                    block_tokens: 16,
                },
                Shape::PerLayer {
                    layers: 32,
                    block_tokens: 8,
                },
                Shape::BlockLeading { layers: 32 },
                Shape::CrossLayer { layers: 32 },
                Shape::PerLayer {
                    layers: 8,
                    block_tokens: 16,
                },
            ]
        } else {
            vec![Shape::PerLayer {
                layers: 32,
                block_tokens: 16,
            }]
        };
        let t_wait = Instant::now();
        let reg = pending.wait().map_err(|e| e.to_string())?;
        println!(
            "{backing}: pool {:.1} GiB, create+touch {:.2} s, cuMemHostRegister {:.2} s (waited {:.2} s)",
            pool.len as f64 / GIB as f64,
            pool.create_touch.as_secs_f64(),
            reg.took().as_secs_f64(),
            t_wait.elapsed().as_secs_f64()
        );
        let ceil = measure_ceilings(&d, &pool, if quick { 2 } else { 4 })?;
        println!("{backing}: contiguous ceiling (1 GiB cuMemcpyAsync): H2D {:.1} GB/s, D2H {:.1} GB/s, both at once {:.1} GB/s", ceil.h2d, ceil.d2h, ceil.bidir);
        let _ = write!(
            ceilings_json,
            "{}\"{backing}\":{{\"h2d\":{:.2},\"d2h\":{:.2},\"bidir\":{:.2},\"pool_gib\":{:.1},\"create_touch_s\":{:.2},\"register_s\":{:.2}}}",
            if ceilings_json.is_empty() { "" } else { "," },
            ceil.h2d,
            ceil.d2h,
            ceil.bidir,
            pool.len as f64 / GIB as f64,
            pool.create_touch.as_secs_f64(),
            reg.took().as_secs_f64()
        );
        let cx = Ctx {
            d: &d,
            pool: &pool,
            reg: &reg,
            ceil: &ceil,
            backing,
            quick,
        };
        let all_backends = backends(&d)?;
        let by_name = |n: &str| all_backends.iter().find(|b| b.name() == n).cloned();
        for shape in shapes {
            // Enough blocks for 8 requests, scattered among 10% more.
            let cache = Cache::new(&d, shape, REQUESTS * BLOCKS_PER_REQUEST * 11 / 10)?;
            let reference = matches!(
                shape,
                Shape::PerLayer {
                    layers: 32,
                    block_tokens: 16
                }
            );
            // Every backend on the reference shape (plus a sweep of the copy
            // kernel's grid); elsewhere the kernel and batched DMA, and auto
            // where it would pick DMA (2 MiB pieces).
            let mut runs: Vec<(String, Arc<dyn CopyBackend>)> = Vec::new();
            let names: &[&str] = if reference && backing == "shm" {
                &["kernel", "dma-batch", "dma-loop", "auto"]
            } else if reference {
                &["kernel", "dma-batch"]
            } else if matches!(shape, Shape::CrossLayer { .. }) {
                &["kernel", "dma-batch", "auto"]
            } else {
                &["kernel", "dma-batch"]
            };
            for n in names {
                if let Some(b) = by_name(n) {
                    runs.push((n.to_string(), b));
                }
            }
            if reference && backing == "shm" && !quick {
                for ctas in [33u32, 66, 264, 528] {
                    let k = KernelBackend::new(&d)
                        .map_err(|e| e.to_string())?
                        .with_max_ctas(ctas);
                    runs.push((format!("kernel/{ctas}"), Arc::new(k)));
                }
            }
            for (label, b) in &runs {
                if let Some(auto) = b.auto() {
                    // as the engine does at its first save: loads of this
                    // piece size by whichever backend is faster here
                    match auto.calibrate_loads(&d, &reg, cache.layout.piece_bytes) {
                        Ok(Some(c)) => println!(
                            "  {backing}: auto's load calibration, {} KiB pieces: batched DMA {:.1} GB/s, kernel {:.1} GB/s: {}",
                            c.piece >> 10, c.dma_gbps, c.kernel_gbps, c.chosen
                        ),
                        Ok(None) => {}
                        Err(e) => println!("  {backing}: auto's load calibration failed: {e}"),
                    }
                }
                let before = rows.len();
                match run_shape_backend(&cx, &cache, b, label, &mut rows) {
                    Ok(()) => {}
                    Err(err) => {
                        println!("FAILED {backing} {} {label}: {err}", shape.name());
                        rows.push(Row {
                            backing: backing.into(),
                            shape: String::new(),
                            op: "FAILED",
                            backend: label.clone(),
                            piece_kib: 0,
                            pieces_per_call: 0,
                            bytes: 0,
                            gbps: 0.0,
                            p50_ms: 0.0,
                            p99_ms: 0.0,
                            ceiling: 0.0,
                            verified: false,
                            note: err,
                        });
                    }
                }
                for r in &mut rows[before..] {
                    r.shape = shape.name();
                }
                for r in &rows[before..] {
                    println!(
                        "  {:<9} {:<24} {:<14} {:<9} {:>7.1} GB/s  p50 {:>8.2} ms  p99 {:>8.2} ms  ratio {:>5.1}%  {}",
                        r.backing,
                        r.shape,
                        r.op,
                        r.backend,
                        r.gbps,
                        r.p50_ms,
                        r.p99_ms,
                        100.0 * r.ratio(),
                        if r.verified { "bytes OK" } else { "NOT VERIFIED" }
                    );
                }
            }
        }
        // Unregister before unmapping.
        drop(reg);
        drop(pool);
    }

    // ---- the table and the JSON line.
    println!();
    println!(
        "| pool | layout | op | backend | piece KiB | pieces/call | GB moved | GB/s | p50 ms | p99 ms | ceiling GB/s | ratio | bytes |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.2} | {:.2} | {:.1} | {:.1}% | {} |",
            r.backing,
            r.shape,
            r.op,
            r.backend,
            r.piece_kib,
            r.pieces_per_call,
            r.bytes as f64 / 1e9,
            r.gbps,
            r.p50_ms,
            r.p99_ms,
            r.ceiling,
            100.0 * r.ratio(),
            if r.verified { "verified" } else { &r.note }
        );
    }
    let mut j = String::new();
    let _ = write!(
        j,
        "{{\"driver\":{version},\"batch\":\"{}\",\"ceilings\":{{{ceilings_json}}},\"rows\":[",
        batch.map(|b| b.signature()).unwrap_or("none")
    );
    for (i, r) in rows.iter().enumerate() {
        let _ = write!(
            j,
            "{}{{\"pool\":\"{}\",\"layout\":\"{}\",\"op\":\"{}\",\"backend\":\"{}\",\"piece_kib\":{},\"pieces_per_call\":{},\"bytes\":{},\"gbps\":{:.2},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"ceiling_gbps\":{:.2},\"ratio\":{:.4},\"verified\":{}}}",
            if i == 0 { "" } else { "," },
            r.backing,
            r.shape,
            r.op,
            r.backend,
            r.piece_kib,
            r.pieces_per_call,
            r.bytes,
            r.gbps,
            r.p50_ms,
            r.p99_ms,
            r.ceiling,
            r.ratio(),
            r.verified
        );
    }
    let _ = write!(
        j,
        "],\"notes\":[{}]}}",
        notes
            .iter()
            .map(|n| format!("{:?}", n))
            .collect::<Vec<_>>()
            .join(",")
    );
    println!("TRANSFER_BENCH_JSON {j}");
    if let Some(p) = arg(args, "--json") {
        std::fs::write(p, &j).map_err(|e| format!("write {p}: {e}"))?;
    }
    if rows.iter().any(|r| !r.verified) {
        return Err("some runs failed or were not verified (see FAILED lines)".into());
    }
    Ok(())
}
