//! The conformance suite every [`CopyBackend`] must pass.
//!
//! Generic over the backend and over [`TestMemory`], which provides the
//! "device" and "host" memory the backend works on: plain heap memory for
//! the host backend ([`HostMemory`], run by the unit tests on every
//! machine), GPU memory plus registered host memory for the GPU backends
//! ([`GpuMemory`], run by `tests/tests/gpu.rs` on a GPU machine).
//!
//! Each case panics with a message naming the case, the layout and the
//! first wrong byte. Cases check bytes, never only return codes: a fast copy
//! of the wrong bytes is a failure.

use std::ops::Range;
use std::sync::Arc;

use crate::cuda::{self, CudaDevice, CudaError, DeviceBuffer, HostRegistration, StreamRef};
use crate::layout::{KvLayout, Piece, PieceOrder};

use super::{CopyBackend, Direction};

/// Memory a backend under test copies between.
pub trait TestMemory {
    /// `len` bytes of zeroed device memory, 256-byte aligned, alive until
    /// `self` is dropped.
    fn alloc_device(&mut self, len: usize) -> u64;
    fn write_device(&mut self, addr: u64, data: &[u8]);
    fn read_device(&mut self, addr: u64, out: &mut [u8]);
    /// `len` bytes of zeroed host memory usable by the backend (pinned and
    /// device-mapped for GPU backends), 4096-byte aligned, alive until
    /// `self` is dropped.
    fn alloc_host(&mut self, len: usize) -> usize;
    /// The stream copies are enqueued on.
    fn stream(&self) -> StreamRef;
    /// Waits for everything enqueued on [`TestMemory::stream`].
    fn sync(&mut self);
}

/// Runs every case; panics on the first failure.
pub fn run_all(backend: &dyn CopyBackend, mem: &mut dyn TestMemory) {
    type Case = fn(&dyn CopyBackend, &mut dyn TestMemory);
    let cases: [(&str, Case); 8] = [
        ("empty_list_is_a_no_op", empty_list_is_a_no_op),
        ("round_trip_split_kv_leading", |b, m| {
            round_trip(b, m, LayoutCase::SplitKvLeading)
        }),
        ("round_trip_split_block_leading", |b, m| {
            round_trip(b, m, LayoutCase::SplitBlockLeading)
        }),
        ("round_trip_mla", |b, m| round_trip(b, m, LayoutCase::Mla)),
        ("round_trip_cross_layer", |b, m| {
            round_trip(b, m, LayoutCase::CrossLayer)
        }),
        ("mixed_sizes_and_guard_bytes", mixed_sizes_and_guard_bytes),
        ("many_small_pieces", many_small_pieces),
        ("copies_follow_stream_order", copies_follow_stream_order),
    ];
    for (name, case) in cases {
        eprintln!("conformance[{}]: {name}", backend.name());
        case(backend, mem);
    }
}

/// Deterministic bytes for (tag, index): a splitmix64 stream.
pub fn pattern(tag: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    while out.len() < len {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Tag of piece `p` of `block` in `segment`, shared by tests and benchmarks.
pub fn piece_tag(segment: usize, block: u32, piece: usize) -> u64 {
    ((segment as u64) << 40) ^ ((block as u64) << 8) ^ piece as u64 ^ 0xA5A5_0000_0000_0000
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or(if a.len() != b.len() {
            Some(a.len().min(b.len()))
        } else {
            None
        })
}

#[track_caller]
fn assert_bytes(what: &str, got: &[u8], want: &[u8]) {
    if let Some(i) = first_diff(got, want) {
        panic!(
            "{what}: byte {i} of {} differs: got {:#04x}, want {:#04x}",
            want.len(),
            got.get(i).copied().unwrap_or(0),
            want.get(i).copied().unwrap_or(0)
        );
    }
}

fn host_slice<'a>(addr: usize, len: usize) -> &'a [u8] {
    // SAFETY: only called on ranges handed out by TestMemory::alloc_host,
    // which stay alive as long as the memory object, after sync (no copy
    // in flight writes them).
    unsafe { std::slice::from_raw_parts(addr as *const u8, len) }
}

fn host_slice_mut<'a>(addr: usize, len: usize) -> &'a mut [u8] {
    // SAFETY: as host_slice; the suite holds no other reference to it.
    unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) }
}

fn copy(b: &dyn CopyBackend, m: &mut dyn TestMemory, pieces: &[Piece], dir: Direction) {
    // SAFETY: every piece of the suite lies inside memory from `m`, pieces
    // never overlap, and the suite syncs before touching or freeing it.
    unsafe { b.copy(pieces, dir, m.stream()) }
        .unwrap_or_else(|e| panic!("{} copy failed: {e}", b.name()));
}

fn empty_list_is_a_no_op(b: &dyn CopyBackend, m: &mut dyn TestMemory) {
    copy(b, m, &[], Direction::HostToDevice);
    copy(b, m, &[], Direction::DeviceToHost);
    m.sync();
}

/// The layouts the round trip covers.
#[derive(Clone, Copy, Debug)]
pub enum LayoutCase {
    /// `[2, nb, ...]` per layer (vLLM FlashAttention NHD / HND).
    SplitKvLeading,
    /// `[nb, 2, ...]` per layer.
    SplitBlockLeading,
    /// One piece per layer per block.
    Mla,
    /// One piece per block for all layers.
    CrossLayer,
}

/// A layout allocated in test memory, with the device bytes each segment
/// was filled with.
pub struct TestCache {
    pub layout: KvLayout,
    /// Device allocation of each segment: (base, bytes).
    pub segments: Vec<(u64, usize)>,
}

impl TestCache {
    /// Allocates `case` with `layers`, `num_blocks`, `piece` bytes.
    pub fn new(
        m: &mut dyn TestMemory,
        case: LayoutCase,
        layers: usize,
        num_blocks: usize,
        piece: usize,
    ) -> Self {
        let (seg_bytes, nseg) = match case {
            LayoutCase::SplitKvLeading | LayoutCase::SplitBlockLeading => {
                (2 * num_blocks * piece, layers)
            }
            LayoutCase::Mla => (num_blocks * piece, layers),
            LayoutCase::CrossLayer => (num_blocks * piece * layers, 1),
        };
        let segments: Vec<(u64, usize)> = (0..nseg)
            .map(|_| (m.alloc_device(seg_bytes), seg_bytes))
            .collect();
        let bases = segments.iter().map(|s| s.0).collect::<Vec<_>>();
        let layout = match case {
            LayoutCase::SplitKvLeading => KvLayout::split_kv(
                bases,
                num_blocks,
                16,
                piece,
                num_blocks * piece,
                piece,
                2,
                PieceOrder::Nhd,
            ),
            LayoutCase::SplitBlockLeading => KvLayout::split_kv(
                bases,
                num_blocks,
                16,
                2 * piece,
                piece,
                piece,
                2,
                PieceOrder::Hnd,
            ),
            LayoutCase::Mla => KvLayout::mla(bases, num_blocks, 16, piece, piece, 2),
            LayoutCase::CrossLayer => KvLayout::cross_layer(
                bases[0],
                layers,
                num_blocks,
                16,
                piece * layers,
                piece * layers,
                2,
                PieceOrder::Nhd,
            ),
        };
        layout
            .validate()
            .unwrap_or_else(|e| panic!("test layout {case:?} invalid: {e}"));
        TestCache { layout, segments }
    }

    /// Fills every piece of every block with [`pattern`]`(`[`piece_tag`]`)`
    /// and the gaps with 0xEE.
    pub fn fill(&self, m: &mut dyn TestMemory) {
        for (s, &(base, bytes)) in self.segments.iter().enumerate() {
            let mut buf = vec![0xEEu8; bytes];
            for b in 0..self.layout.num_blocks as u32 {
                for p in 0..self.layout.pieces_per_segment() {
                    let off = (self.layout.device_addr(s, b, p) - base) as usize;
                    buf[off..off + self.layout.piece_bytes]
                        .copy_from_slice(&pattern(piece_tag(s, b, p), self.layout.piece_bytes));
                }
            }
            m.write_device(base, &buf);
        }
    }

    /// Zeroes all segments.
    pub fn clear(&self, m: &mut dyn TestMemory) {
        for &(base, bytes) in &self.segments {
            m.write_device(base, &vec![0u8; bytes]);
        }
    }

    /// Checks that GPU block `dst_blocks[i]` holds the pattern of
    /// `src_blocks[i]` and every other byte is zero.
    pub fn verify_loaded(
        &self,
        m: &mut dyn TestMemory,
        src_blocks: &[u32],
        dst_blocks: &[u32],
        what: &str,
    ) {
        for (s, &(base, bytes)) in self.segments.iter().enumerate() {
            let mut want = vec![0u8; bytes];
            for (&src, &dst) in src_blocks.iter().zip(dst_blocks) {
                for p in 0..self.layout.pieces_per_segment() {
                    let off = (self.layout.device_addr(s, dst, p) - base) as usize;
                    want[off..off + self.layout.piece_bytes]
                        .copy_from_slice(&pattern(piece_tag(s, src, p), self.layout.piece_bytes));
                }
            }
            let mut got = vec![0u8; bytes];
            m.read_device(base, &mut got);
            assert_bytes(&format!("{what}: segment {s}"), &got, &want);
        }
    }

    /// Checks slot `slots[i]` holds block `blocks[i]` in slot layout.
    pub fn verify_saved(
        &self,
        blocks: &[u32],
        slots: &[usize],
        segments: Range<usize>,
        what: &str,
    ) {
        for (&b, &slot) in blocks.iter().zip(slots) {
            for s in segments.clone() {
                for p in 0..self.layout.pieces_per_segment() {
                    let got = host_slice(
                        slot + self.layout.slot_offset(s, p),
                        self.layout.piece_bytes,
                    );
                    assert_bytes(
                        &format!("{what}: block {b} segment {s} piece {p}"),
                        got,
                        &pattern(piece_tag(s, b, p), self.layout.piece_bytes),
                    );
                }
            }
        }
    }
}

fn round_trip(b: &dyn CopyBackend, m: &mut dyn TestMemory, case: LayoutCase) {
    let piece = match case {
        LayoutCase::CrossLayer => 4096,
        _ => 2048,
    };
    let cache = TestCache::new(m, case, 3, 12, piece);
    cache.fill(m);
    let l = &cache.layout;
    // Adjacent and scattered blocks; slots partly packed, partly spread.
    let blocks: [u32; 6] = [5, 6, 0, 11, 3, 4];
    let slot_index = [0usize, 1, 2, 5, 6, 9];
    let pool = m.alloc_host(10 * l.slot_bytes());
    let slots: Vec<usize> = slot_index
        .iter()
        .map(|i| pool + i * l.slot_bytes())
        .collect();
    let what = format!("{} {case:?}", b.name());

    // Save layer by layer, as an engine does after each layer's forward.
    for seg in 0..l.num_segments() {
        let pieces = l.plan(&blocks, &slots, seg..seg + 1).expect("plan save");
        copy(b, m, &pieces, Direction::DeviceToHost);
    }
    m.sync();
    cache.verify_saved(
        &blocks,
        &slots,
        0..l.num_segments(),
        &format!("{what} save"),
    );
    // Slots not written stay zero.
    for i in [3usize, 4, 7, 8] {
        assert!(
            host_slice(pool + i * l.slot_bytes(), l.slot_bytes())
                .iter()
                .all(|&x| x == 0),
            "{what}: save wrote outside its slots (slot {i})"
        );
    }

    // Load all segments at once into other GPU blocks.
    cache.clear(m);
    let dst: [u32; 6] = [1, 2, 3, 9, 10, 7];
    let pieces = l
        .plan(&dst, &slots, 0..l.num_segments())
        .expect("plan load");
    copy(b, m, &pieces, Direction::HostToDevice);
    m.sync();
    cache.verify_loaded(m, &blocks, &dst, &format!("{what} load"));
}

fn mixed_sizes_and_guard_bytes(b: &dyn CopyBackend, m: &mut dyn TestMemory) {
    // Sizes below, at and above the kernel's chunking and a multi-MiB one,
    // each surrounded by 64 guard bytes on both sides.
    let sizes = [
        16usize,
        48,
        4096 + 16,
        32 << 10,
        (300 << 10) + 16,
        (8 << 20) + 16,
    ];
    let guard = 64usize;
    let total: usize = sizes.iter().map(|s| s + 2 * guard).sum();
    let dev = m.alloc_device(total);
    let host = m.alloc_host(total);
    let mut pieces = Vec::new();
    let mut off = 0;
    for &s in &sizes {
        pieces.push(Piece {
            host: host + off + guard,
            device: dev + (off + guard) as u64,
            len: s,
        });
        off += s + 2 * guard;
    }
    let src = pattern(7, total);
    host_slice_mut(host, total).copy_from_slice(&src);
    m.write_device(dev, &vec![0xEE; total]);
    copy(b, m, &pieces, Direction::HostToDevice);
    m.sync();
    let mut want = vec![0xEEu8; total];
    for p in &pieces {
        let o = p.host - host;
        want[o..o + p.len].copy_from_slice(&src[o..o + p.len]);
    }
    let mut got = vec![0u8; total];
    m.read_device(dev, &mut got);
    assert_bytes(&format!("{} mixed H2D", b.name()), &got, &want);

    // And back into zeroed host memory: guards stay zero.
    host_slice_mut(host, total).fill(0);
    copy(b, m, &pieces, Direction::DeviceToHost);
    m.sync();
    let mut want_h = vec![0u8; total];
    for p in &pieces {
        let o = p.host - host;
        want_h[o..o + p.len].copy_from_slice(&src[o..o + p.len]);
    }
    assert_bytes(
        &format!("{} mixed D2H", b.name()),
        host_slice(host, total),
        &want_h,
    );
}

fn many_small_pieces(b: &dyn CopyBackend, m: &mut dyn TestMemory) {
    // More pieces than one grid dimension of 65535 blocks; reversed order
    // on the device side so nothing coalesces.
    let n = 70_000usize;
    let len = 16usize;
    let dev = m.alloc_device(n * 2 * len);
    let host = m.alloc_host(n * len);
    let src = pattern(11, n * len);
    host_slice_mut(host, n * len).copy_from_slice(&src);
    let pieces: Vec<Piece> = (0..n)
        .map(|i| Piece {
            host: host + i * len,
            device: dev + ((n - 1 - i) * 2 * len) as u64,
            len,
        })
        .collect();
    copy(b, m, &pieces, Direction::HostToDevice);
    m.sync();
    let mut got = vec![0u8; n * 2 * len];
    m.read_device(dev, &mut got);
    for i in 0..n {
        let o = (n - 1 - i) * 2 * len;
        assert_bytes(
            &format!("{} many H2D piece {i}", b.name()),
            &got[o..o + len],
            &src[i * len..(i + 1) * len],
        );
        assert!(
            got[o + len..o + 2 * len].iter().all(|&x| x == 0),
            "{}: many H2D wrote a gap",
            b.name()
        );
    }
    host_slice_mut(host, n * len).fill(0);
    copy(b, m, &pieces, Direction::DeviceToHost);
    m.sync();
    assert_bytes(
        &format!("{} many D2H", b.name()),
        host_slice(host, n * len),
        &src,
    );
}

fn copies_follow_stream_order(b: &dyn CopyBackend, m: &mut dyn TestMemory) {
    // Save a buffer to host, load it elsewhere, save again, with no sync in
    // between: each copy must see the previous one's result. Catches
    // backends that reuse staging buffers (kernel descriptors) too early.
    let len = 64 << 10;
    let n = 16;
    let dev_a = m.alloc_device(n * len);
    let dev_b = m.alloc_device(n * len);
    let host = m.alloc_host(n * len);
    let host2 = m.alloc_host(n * len);
    let src = pattern(23, n * len);
    m.write_device(dev_a, &src);
    let a_to_h: Vec<Piece> = (0..n)
        .map(|i| Piece {
            host: host + i * len,
            device: dev_a + ((n - 1 - i) * len) as u64,
            len,
        })
        .collect();
    let h_to_b: Vec<Piece> = (0..n)
        .map(|i| Piece {
            host: host + i * len,
            device: dev_b + (i * len) as u64,
            len,
        })
        .collect();
    let b_to_h2: Vec<Piece> = (0..n)
        .map(|i| Piece {
            host: host2 + i * len,
            device: dev_b + ((n - 1 - i) * len) as u64,
            len,
        })
        .collect();
    copy(b, m, &a_to_h, Direction::DeviceToHost);
    copy(b, m, &h_to_b, Direction::HostToDevice);
    copy(b, m, &b_to_h2, Direction::DeviceToHost);
    m.sync();
    // dev_a chunk j -> host chunk n-1-j -> dev_b chunk n-1-j -> host2 chunk j.
    assert_bytes(
        &format!("{} stream order", b.name()),
        host_slice(host2, n * len),
        &src,
    );
}

/// Heap memory standing in for both sides (host backend).
#[derive(Default)]
pub struct HostMemory {
    allocs: Vec<(*mut u8, std::alloc::Layout)>,
}

impl HostMemory {
    fn alloc(&mut self, len: usize, align: usize) -> usize {
        let layout =
            std::alloc::Layout::from_size_align(len.max(1), align).expect("test allocation layout");
        // SAFETY: layout has non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!p.is_null(), "test allocation of {len} bytes failed");
        self.allocs.push((p, layout));
        p as usize
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        for &(p, l) in &self.allocs {
            // SAFETY: allocated in alloc() with this layout, freed once.
            unsafe { std::alloc::dealloc(p, l) };
        }
    }
}

impl TestMemory for HostMemory {
    fn alloc_device(&mut self, len: usize) -> u64 {
        self.alloc(len, 256) as u64
    }
    fn write_device(&mut self, addr: u64, data: &[u8]) {
        host_slice_mut(addr as usize, data.len()).copy_from_slice(data);
    }
    fn read_device(&mut self, addr: u64, out: &mut [u8]) {
        out.copy_from_slice(host_slice(addr as usize, out.len()));
    }
    fn alloc_host(&mut self, len: usize) -> usize {
        self.alloc(len, 4096)
    }
    fn stream(&self) -> StreamRef {
        StreamRef::DEFAULT
    }
    fn sync(&mut self) {}
}

/// GPU memory plus anonymous host mappings registered like the pool.
pub struct GpuMemory {
    device: Arc<CudaDevice>,
    stream: cuda::Stream,
    device_bufs: Vec<DeviceBuffer>,
    // Registrations drop before the mappings they cover (field order).
    regs: Vec<HostRegistration>,
    maps: Vec<(*mut libc::c_void, usize)>,
}

impl GpuMemory {
    pub fn new(device: &Arc<CudaDevice>) -> Result<Self, CudaError> {
        Ok(GpuMemory {
            device: device.clone(),
            stream: cuda::Stream::new(device)?,
            device_bufs: Vec::new(),
            regs: Vec::new(),
            maps: Vec::new(),
        })
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    fn find(&self, addr: u64, len: usize) -> (&DeviceBuffer, usize) {
        for b in &self.device_bufs {
            if addr >= b.ptr() && addr + len as u64 <= b.ptr() + b.len() as u64 {
                return (b, (addr - b.ptr()) as usize);
            }
        }
        panic!("address {addr:#x}+{len} is not in a test device buffer");
    }
}

impl Drop for GpuMemory {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        self.regs.clear();
        for &(p, len) in &self.maps {
            // SAFETY: mapped in alloc_host, unmapped once, after its
            // registration was dropped above.
            unsafe { libc::munmap(p, len) };
        }
    }
}

impl TestMemory for GpuMemory {
    fn alloc_device(&mut self, len: usize) -> u64 {
        let b = DeviceBuffer::new(&self.device, len).expect("cuMemAlloc for the test");
        b.memset(0).expect("cuMemsetD8 for the test");
        let p = b.ptr();
        self.device_bufs.push(b);
        p
    }
    fn write_device(&mut self, addr: u64, data: &[u8]) {
        self.stream.synchronize().expect("sync before write");
        let (b, off) = self.find(addr, data.len());
        b.write(off, data).expect("cuMemcpyHtoD for the test");
    }
    fn read_device(&mut self, addr: u64, out: &mut [u8]) {
        self.stream.synchronize().expect("sync before read");
        let (b, off) = self.find(addr, out.len());
        b.read(off, out).expect("cuMemcpyDtoH for the test");
    }
    fn alloc_host(&mut self, len: usize) -> usize {
        let len = len.max(1).next_multiple_of(4096);
        // SAFETY: anonymous private mapping, no fixed address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(p != libc::MAP_FAILED, "mmap of {len} test bytes failed");
        self.maps.push((p, len));
        // SAFETY: the mapping lives until Drop, which drops the
        // registration first.
        let reg = unsafe { cuda::register_pool(&self.device, p as *mut u8, len) }
            .expect("cuMemHostRegister for the test");
        self.regs.push(reg);
        p as usize
    }
    fn stream(&self) -> StreamRef {
        self.stream.as_ref()
    }
    fn sync(&mut self) {
        self.stream.synchronize().expect("stream sync");
    }
}
