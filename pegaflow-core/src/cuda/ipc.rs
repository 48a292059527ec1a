//! CUDA IPC: handles an engine gives the owner to broker to other engines
//! of the node, and GPU-to-GPU block copies between two engines' caches.
//!
//! * Events: a saving engine records an interprocess event after each
//!   save; a loader imports it and makes its stream wait on it
//!   ([`Event::wait_on`]) instead of blocking its host thread on a save
//!   still in flight. Imported events share state with the exporter's, so a
//!   wait sees the exporter's most recent record.
//! * Memory: [`export_kv`] exports the allocations behind a [`KvLayout`]
//!   (per-layer tensors may live in one caching-allocator segment or in
//!   many; each distinct allocation is exported once, segments are
//!   `(allocation, offset)`); [`ImportedKv::open`] maps them in another
//!   process and rebuilds the layout at the mapped addresses, and
//!   [`copy_peer_blocks`] copies blocks between the two caches with the
//!   copy engines (same GPU, or two GPUs with peer access, which the import
//!   enables lazily).
//!
//! Handles are plain `[u8; 64]` so the owner can pass them over its socket
//! without knowing CUDA. Memory from PyTorch's expandable segments
//! (`cuMemCreate`) cannot be exported this way: the driver refuses
//! `cuIpcGetMemHandle` on it and [`export_kv`] reports that error.
//!
//! A process cannot import its own handles (the driver refuses); the tests
//! use two processes.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::sys;
use thiserror::Error;

use super::{check, CudaDevice, CudaError, Event, StreamRef};
use crate::copy::dma::{copy_device_to_device, BatchApi};
use crate::copy::kernel::KernelBackend;
use crate::copy::{CopyBackendKind, CopyError};
use crate::layout::{KvKind, KvLayout, PieceOrder, PlanError};

/// Bytes of a CUDA IPC handle (event or memory).
pub const IPC_HANDLE_BYTES: usize = 64;

/// IPC failures.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum IpcError {
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error(
        "IPC: event was not created interprocess; create save events with Event::interprocess"
    )]
    NotInterprocess,
    #[error("IPC: segment {segment} ({start:#x}..{end:#x}) spans more than one allocation; it cannot be exported as one handle")]
    SpansAllocations {
        segment: usize,
        start: u64,
        end: u64,
    },
    #[error("IPC: layouts differ ({0}); peer copies need the same kind, segments and piece size on both sides")]
    Incompatible(String),
    #[error("IPC: export names allocation {index} but has {count}")]
    BadExport { index: usize, count: usize },
    #[error("IPC: malformed export encoding ({0})")]
    Decode(&'static str),
    #[error("IPC: local block {0} is named twice in one peer copy")]
    DuplicateBlock(u32),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Copy(#[from] CopyError),
}

fn to_chars(h: &[u8; IPC_HANDLE_BYTES]) -> [std::ffi::c_char; IPC_HANDLE_BYTES] {
    h.map(|b| b as std::ffi::c_char)
}

fn to_bytes(h: &[std::ffi::c_char; IPC_HANDLE_BYTES]) -> [u8; IPC_HANDLE_BYTES] {
    h.map(|c| c as u8)
}

/// Exports an interprocess event.
pub fn export_event(ev: &Event) -> Result<[u8; IPC_HANDLE_BYTES], IpcError> {
    if !ev.is_interprocess() {
        return Err(IpcError::NotInterprocess);
    }
    ev.device.bind()?;
    let mut h = sys::CUipcEventHandle {
        reserved: [0; IPC_HANDLE_BYTES],
    };
    // SAFETY: ev is a live interprocess event; h is a valid out-pointer.
    check("cuIpcGetEventHandle", unsafe {
        sys::cuIpcGetEventHandle(&mut h, ev.raw())
    })?;
    Ok(to_bytes(&h.reserved))
}

/// Imports an event exported by another process.
pub fn import_event(
    device: &Arc<CudaDevice>,
    handle: &[u8; IPC_HANDLE_BYTES],
) -> Result<Event, IpcError> {
    device.bind()?;
    let mut raw: sys::CUevent = std::ptr::null_mut();
    let h = sys::CUipcEventHandle {
        reserved: to_chars(handle),
    };
    // SAFETY: context bound; the driver validates the handle bytes.
    check("cuIpcOpenEventHandle", unsafe {
        sys::cuIpcOpenEventHandle(&mut raw, h)
    })?;
    Ok(Event {
        raw,
        device: device.clone(),
        interprocess: true,
    })
}

/// One exported allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpcMemExport {
    pub handle: [u8; IPC_HANDLE_BYTES],
    /// Size of the allocation (for bounds checks on the importing side).
    pub alloc_len: u64,
}

/// The allocation containing `ptr`: `(base, len)`.
pub fn allocation_of(device: &CudaDevice, ptr: u64) -> Result<(u64, u64), CudaError> {
    device.bind()?;
    let (mut base, mut len) = (0u64, 0usize);
    // SAFETY: out-pointers valid; the driver checks ptr.
    check("cuMemGetAddressRange", unsafe {
        sys::cuMemGetAddressRange_v2(&mut base, &mut len, ptr)
    })?;
    Ok((base, len as u64))
}

/// Exports the allocation containing `ptr`; returns it with `ptr`'s offset
/// inside it.
pub fn export_mem(device: &CudaDevice, ptr: u64) -> Result<(IpcMemExport, u64), IpcError> {
    let (base, alloc_len) = allocation_of(device, ptr)?;
    let mut h = sys::CUipcMemHandle {
        reserved: [0; IPC_HANDLE_BYTES],
    };
    // SAFETY: base is the start of a live allocation (from the driver).
    check("cuIpcGetMemHandle", unsafe {
        sys::cuIpcGetMemHandle(&mut h, base)
    })?;
    Ok((
        IpcMemExport {
            handle: to_bytes(&h.reserved),
            alloc_len,
        },
        ptr - base,
    ))
}

/// An allocation of another process mapped into this one; unmapped on drop.
#[derive(Debug)]
pub struct ImportedMem {
    base: u64,
    len: u64,
    device: Arc<CudaDevice>,
}

impl ImportedMem {
    pub fn open(device: &Arc<CudaDevice>, export: &IpcMemExport) -> Result<Self, IpcError> {
        device.bind()?;
        let mut base = 0u64;
        let h = sys::CUipcMemHandle {
            reserved: to_chars(&export.handle),
        };
        const LAZY_ENABLE_PEER_ACCESS: u32 = 1;
        // SAFETY: context bound; the driver validates the handle.
        check("cuIpcOpenMemHandle", unsafe {
            sys::cuIpcOpenMemHandle_v2(&mut base, h, LAZY_ENABLE_PEER_ACCESS)
        })?;
        Ok(ImportedMem {
            base,
            len: export.alloc_len,
            device: device.clone(),
        })
    }
    pub fn base(&self) -> u64 {
        self.base
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for ImportedMem {
    fn drop(&mut self) {
        // SAFETY: opened in open(), closed once; users synchronize their
        // copies before dropping (ImportedKv documents it).
        unsafe {
            let _ = self.device.bind();
            let _ = sys::cuIpcCloseMemHandle(self.base);
        }
    }
}

/// A KV cache's memory, exported: the distinct allocations and, per
/// segment, `(allocation index, offset)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvIpcExport {
    pub allocations: Vec<IpcMemExport>,
    pub segments: Vec<(u32, u64)>,
}

impl KvIpcExport {
    /// A flat little-endian encoding for the owner's socket.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(self.allocations.len() as u32).to_le_bytes());
        for a in &self.allocations {
            v.extend_from_slice(&a.handle);
            v.extend_from_slice(&a.alloc_len.to_le_bytes());
        }
        v.extend_from_slice(&(self.segments.len() as u32).to_le_bytes());
        for &(i, off) in &self.segments {
            v.extend_from_slice(&i.to_le_bytes());
            v.extend_from_slice(&off.to_le_bytes());
        }
        v
    }

    /// Inverse of [`KvIpcExport::encode`]; bytes from another process are
    /// checked, never trusted.
    pub fn decode(mut b: &[u8]) -> Result<Self, IpcError> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], IpcError> {
            if b.len() < n {
                return Err(IpcError::Decode("truncated"));
            }
            let (h, t) = b.split_at(n);
            *b = t;
            Ok(h)
        }
        fn u32_(b: &mut &[u8]) -> Result<u32, IpcError> {
            Ok(u32::from_le_bytes(
                take(b, 4)?
                    .try_into()
                    .map_err(|_| IpcError::Decode("u32"))?,
            ))
        }
        fn u64_(b: &mut &[u8]) -> Result<u64, IpcError> {
            Ok(u64::from_le_bytes(
                take(b, 8)?
                    .try_into()
                    .map_err(|_| IpcError::Decode("u64"))?,
            ))
        }
        let na = u32_(&mut b)? as usize;
        if na > b.len() / (IPC_HANDLE_BYTES + 8) {
            return Err(IpcError::Decode("allocation count"));
        }
        let mut allocations = Vec::with_capacity(na);
        for _ in 0..na {
            let handle: [u8; IPC_HANDLE_BYTES] = take(&mut b, IPC_HANDLE_BYTES)?
                .try_into()
                .map_err(|_| IpcError::Decode("handle"))?;
            allocations.push(IpcMemExport {
                handle,
                alloc_len: u64_(&mut b)?,
            });
        }
        let ns = u32_(&mut b)? as usize;
        if ns > b.len() / 12 {
            return Err(IpcError::Decode("segment count"));
        }
        let mut segments = Vec::with_capacity(ns);
        for _ in 0..ns {
            let i = u32_(&mut b)?;
            if i as usize >= na {
                return Err(IpcError::BadExport {
                    index: i as usize,
                    count: na,
                });
            }
            segments.push((i, u64_(&mut b)?));
        }
        if !b.is_empty() {
            return Err(IpcError::Decode("trailing bytes"));
        }
        Ok(KvIpcExport {
            allocations,
            segments,
        })
    }
}

/// What an engine publishes so another engine of the node can copy its
/// blocks: its cache's layout (the bases are the exporter's addresses; the
/// importer maps the allocations and rebuilds them) and its exported
/// allocations. One owner-brokered blob per engine (or TP rank).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerExport {
    pub layout: KvLayout,
    pub kv: KvIpcExport,
}

const PEER_EXPORT_MAGIC: u32 = u32::from_le_bytes(*b"PGPX");

impl PeerExport {
    /// Exports `layout`'s allocations (see [`export_kv`]).
    pub fn new(device: &CudaDevice, layout: &KvLayout) -> Result<Self, IpcError> {
        Ok(PeerExport {
            kv: export_kv(device, layout)?,
            layout: layout.clone(),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let l = &self.layout;
        let mut v = Vec::new();
        v.extend_from_slice(&PEER_EXPORT_MAGIC.to_le_bytes());
        v.push(match l.kind {
            KvKind::SplitKv => 0,
            KvKind::Mla => 1,
            KvKind::CrossLayer => 2,
        });
        v.push(match l.order {
            PieceOrder::Nhd => 0,
            PieceOrder::Hnd => 1,
            PieceOrder::Opaque => 2,
        });
        for x in [
            l.segment_bases.len(),
            l.num_layers,
            l.num_blocks,
            l.block_tokens,
            l.block_stride,
            l.kv_stride,
            l.piece_bytes,
            l.dtype_size,
        ] {
            v.extend_from_slice(&(x as u64).to_le_bytes());
        }
        v.extend_from_slice(&self.kv.encode());
        v
    }

    /// Inverse of [`PeerExport::encode`]. The layout comes back with the
    /// exporter's bases (meaningless here until [`ImportedKv::open`]) and is
    /// validated; bytes from another process are checked, never trusted.
    pub fn decode(b: &[u8]) -> Result<Self, IpcError> {
        const FIXED: usize = 4 + 2 + 8 * 8;
        if b.len() < FIXED || b[..4] != PEER_EXPORT_MAGIC.to_le_bytes() {
            return Err(IpcError::Decode("not a peer export"));
        }
        let kind = match b[4] {
            0 => KvKind::SplitKv,
            1 => KvKind::Mla,
            2 => KvKind::CrossLayer,
            _ => return Err(IpcError::Decode("KV kind")),
        };
        let order = match b[5] {
            0 => PieceOrder::Nhd,
            1 => PieceOrder::Hnd,
            2 => PieceOrder::Opaque,
            _ => return Err(IpcError::Decode("piece order")),
        };
        let mut f = [0usize; 8];
        for (i, x) in f.iter_mut().enumerate() {
            let o = 6 + 8 * i;
            let v = u64::from_le_bytes(
                b[o..o + 8]
                    .try_into()
                    .map_err(|_| IpcError::Decode("u64"))?,
            );
            *x = usize::try_from(v).map_err(|_| IpcError::Decode("size"))?;
        }
        let kv = KvIpcExport::decode(&b[FIXED..])?;
        let [segments, num_layers, num_blocks, block_tokens, block_stride, kv_stride, piece_bytes, dtype_size] =
            f;
        if segments != kv.segments.len() || segments > 1 << 16 {
            return Err(IpcError::Decode("segment count"));
        }
        let layout = KvLayout {
            kind,
            order,
            // placeholder bases (aligned, distinct) so the shape validates
            segment_bases: (0..segments as u64).map(|s| (s + 1) << 40).collect(),
            num_layers,
            num_blocks,
            block_tokens,
            block_stride,
            kv_stride,
            piece_bytes,
            dtype_size,
        };
        layout
            .validate()
            .map_err(|e| IpcError::Incompatible(e.to_string()))?;
        Ok(PeerExport { layout, kv })
    }

    /// Why a cache of `local`'s layout cannot take this engine's blocks as
    /// its own (None: same kind, order, segments, block and element sizes).
    pub fn incompatible_with(&self, local: &KvLayout) -> Option<String> {
        let r = &self.layout;
        let same = r.kind == local.kind
            && r.order == local.order
            && r.num_segments() == local.num_segments()
            && r.num_layers == local.num_layers
            && r.piece_bytes == local.piece_bytes
            && r.block_tokens == local.block_tokens
            && r.dtype_size == local.dtype_size;
        (!same).then(|| {
            format!(
                "peer {:?}/{:?}, {} segments, {} layers, {} B pieces, {} tokens, {} B elements; \
                 here {:?}/{:?}, {}, {}, {}, {}, {}",
                r.kind,
                r.order,
                r.num_segments(),
                r.num_layers,
                r.piece_bytes,
                r.block_tokens,
                r.dtype_size,
                local.kind,
                local.order,
                local.num_segments(),
                local.num_layers,
                local.piece_bytes,
                local.block_tokens,
                local.dtype_size
            )
        })
    }
}

/// Exports every allocation behind `layout` (validated).
pub fn export_kv(device: &CudaDevice, layout: &KvLayout) -> Result<KvIpcExport, IpcError> {
    let extent = (layout.num_blocks as u64 - 1) * layout.block_stride as u64
        + ((layout.pieces_per_segment() - 1) * layout.kv_stride) as u64
        + layout.piece_bytes as u64;
    let mut bases: Vec<u64> = Vec::new();
    let mut out = KvIpcExport {
        allocations: Vec::new(),
        segments: Vec::new(),
    };
    for (s, &seg) in layout.segment_bases.iter().enumerate() {
        let (base, len) = allocation_of(device, seg)?;
        if seg + extent > base + len {
            return Err(IpcError::SpansAllocations {
                segment: s,
                start: seg,
                end: seg + extent,
            });
        }
        let idx = match bases.iter().position(|&b| b == base) {
            Some(i) => i,
            None => {
                let (e, _) = export_mem(device, base)?;
                bases.push(base);
                out.allocations.push(e);
                bases.len() - 1
            }
        };
        out.segments.push((idx as u32, seg - base));
    }
    Ok(out)
}

/// Another engine's KV cache mapped into this process.
///
/// Dropping it unmaps the memory: synchronize any stream that copies from
/// or to it first.
#[derive(Debug)]
pub struct ImportedKv {
    mems: Vec<ImportedMem>,
    layout: KvLayout,
}

impl ImportedKv {
    /// Maps `export` and builds the remote layout: `template` is the remote
    /// engine's layout (strides, sizes; its bases are ignored).
    pub fn open(
        device: &Arc<CudaDevice>,
        export: &KvIpcExport,
        template: &KvLayout,
    ) -> Result<Self, IpcError> {
        if export.segments.len() != template.num_segments() {
            return Err(IpcError::Incompatible(format!(
                "export has {} segments, layout {}",
                export.segments.len(),
                template.num_segments()
            )));
        }
        let mems = export
            .allocations
            .iter()
            .map(|a| ImportedMem::open(device, a))
            .collect::<Result<Vec<_>, _>>()?;
        let mut layout = template.clone();
        let extent = (layout.num_blocks as u64 - 1) * layout.block_stride as u64
            + ((layout.pieces_per_segment() - 1) * layout.kv_stride) as u64
            + layout.piece_bytes as u64;
        for (s, &(i, off)) in export.segments.iter().enumerate() {
            let m = mems.get(i as usize).ok_or(IpcError::BadExport {
                index: i as usize,
                count: mems.len(),
            })?;
            if off.checked_add(extent).is_none_or(|e| e > m.len) {
                return Err(IpcError::SpansAllocations {
                    segment: s,
                    start: m.base + off,
                    end: m.base + off.saturating_add(extent),
                });
            }
            layout.segment_bases[s] = m.base + off;
        }
        layout
            .validate()
            .map_err(|e| IpcError::Incompatible(e.to_string()))?;
        Ok(ImportedKv { mems, layout })
    }

    /// The remote cache at its addresses in this process.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn allocations(&self) -> usize {
        self.mems.len()
    }
}

/// Which way a peer copy goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerDirection {
    /// Remote blocks into local blocks.
    Pull,
    /// Local blocks into remote blocks.
    Push,
}

/// Mean run length below which [`copy_peer_blocks`] uses the copy kernel:
/// the copy engines pay a setup cost per run. A hand-over whose blocks are
/// contiguous on both sides is one run per layer (megabytes); blocks in
/// other orders (vLLM's free queue hands out a finished request's blocks in
/// reverse, every other cycle) are one run per block and layer (64 KiB for
/// Qwen3-8B), which the engines copied at about a quarter of NVLink's speed.
pub const PEER_KERNEL_BELOW: usize = 1 << 20;

/// The copies `(dst, src, len)` of `pairs[i] = (local_block, remote_block)`
/// for `segments`, pieces adjacent on both sides coalesced. Pairs are
/// taken in the order of their local blocks (copies are independent), so
/// blocks that run backwards on both sides coalesce too. Pieces are visited
/// in memory order: block by block when a block's pieces are adjacent
/// (vLLM's `[blocks, 2, ...]` layouts), piece by piece when a piece's
/// blocks are (`[2, blocks, ...]`, FlashAttention's).
pub fn plan_peer_copies(
    local: &KvLayout,
    remote: &KvLayout,
    pairs: &[(u32, u32)],
    segments: Range<usize>,
    dir: PeerDirection,
) -> Result<Vec<(u64, u64, usize)>, IpcError> {
    if local.kind != remote.kind
        || local.num_segments() != remote.num_segments()
        || local.piece_bytes != remote.piece_bytes
    {
        return Err(IpcError::Incompatible(format!(
            "local {:?}/{} segments/{} B pieces, remote {:?}/{}/{}",
            local.kind,
            local.num_segments(),
            local.piece_bytes,
            remote.kind,
            remote.num_segments(),
            remote.piece_bytes
        )));
    }
    if segments.start > segments.end || segments.end > local.num_segments() {
        return Err(PlanError::SegmentRange {
            start: segments.start,
            end: segments.end,
            segments: local.num_segments(),
        }
        .into());
    }
    for &(l, r) in pairs {
        if l as usize >= local.num_blocks {
            return Err(PlanError::BlockOutOfRange {
                block: l,
                num_blocks: local.num_blocks,
            }
            .into());
        }
        if r as usize >= remote.num_blocks {
            return Err(PlanError::BlockOutOfRange {
                block: r,
                num_blocks: remote.num_blocks,
            }
            .into());
        }
    }
    let mut pairs = pairs.to_vec();
    pairs.sort_unstable();
    if let Some(w) = pairs.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(IpcError::DuplicateBlock(w[0].0));
    }
    let pieces = local.pieces_per_segment();
    let len = local.piece_bytes;
    let piece_major = pieces > 1 && local.block_stride == len && remote.block_stride == len;
    let mut copies: Vec<(u64, u64, usize)> =
        Vec::with_capacity(pairs.len() * pieces * segments.len());
    let mut add = |s: usize, (l, r): (u32, u32), p: usize| {
        let (la, ra) = (local.device_addr(s, l, p), remote.device_addr(s, r, p));
        let (dst, src) = match dir {
            PeerDirection::Pull => (la, ra),
            PeerDirection::Push => (ra, la),
        };
        match copies.last_mut() {
            Some(last) if last.0 + last.2 as u64 == dst && last.1 + last.2 as u64 == src => {
                last.2 += len
            }
            _ => copies.push((dst, src, len)),
        }
    };
    for s in segments {
        if piece_major {
            for p in 0..pieces {
                pairs.iter().for_each(|&lr| add(s, lr, p));
            }
        } else {
            for &lr in &pairs {
                (0..pieces).for_each(|p| add(s, lr, p));
            }
        }
    }
    Ok(copies)
}

/// Copies `pairs[i] = (local_block, remote_block)` for `segments` between
/// two GPU caches on `stream` ([`plan_peer_copies`]): with the copy engines
/// when the runs are long, with `kernel` (when given) when their mean is
/// below [`PEER_KERNEL_BELOW`]. Returns which of the two copied.
///
/// # Safety
/// Both layouts describe live device memory reachable from `device`'s
/// context (local memory, or an [`ImportedKv`] kept alive) until the copies
/// complete on `stream`; nobody else writes the destination blocks
/// meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn copy_peer_blocks(
    device: &CudaDevice,
    local: &KvLayout,
    remote: &KvLayout,
    pairs: &[(u32, u32)],
    segments: Range<usize>,
    dir: PeerDirection,
    kernel: Option<&KernelBackend>,
    stream: StreamRef,
) -> Result<CopyBackendKind, IpcError> {
    let copies = plan_peer_copies(local, remote, pairs, segments, dir)?;
    if copies.is_empty() {
        return Ok(CopyBackendKind::Dma);
    }
    let mean = copies.iter().map(|c| c.2).sum::<usize>() / copies.len();
    if let (Some(k), true) = (kernel, mean < PEER_KERNEL_BELOW) {
        // SAFETY: the caller guarantees both caches (see # Safety); the
        // addresses come from validated layouts with in-range, distinct
        // local block ids (checked by the plan), so no runs overlap.
        unsafe { k.copy_device_to_device(&copies, stream)? };
        return Ok(CopyBackendKind::Kernel);
    }
    let batch = BatchApi::load()?;
    // SAFETY: the caller guarantees both caches (see # Safety); addresses
    // were computed from validated layouts with in-range block ids.
    unsafe { copy_device_to_device(device, batch, &copies, stream)? };
    Ok(CopyBackendKind::Dma)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vLLM's block-leading layout ([blocks, 2, tokens, heads, dim] per
    /// layer): a block's K and V pieces are adjacent.
    fn block_leading(base: u64, layers: usize, blocks: usize) -> KvLayout {
        let piece = 32 << 10;
        let bases = (0..layers as u64)
            .map(|l| base + l * (blocks * 2 * piece) as u64)
            .collect();
        let l = KvLayout::split_kv(
            bases,
            blocks,
            16,
            2 * piece,
            piece,
            piece,
            2,
            PieceOrder::Nhd,
        );
        l.validate().unwrap();
        l
    }

    /// FlashAttention's layout ([2, blocks, tokens, heads, dim] per layer):
    /// a piece's blocks are adjacent.
    fn kv_leading(base: u64, layers: usize, blocks: usize) -> KvLayout {
        let piece = 32 << 10;
        let bases = (0..layers as u64)
            .map(|l| base + l * (2 * blocks * piece) as u64)
            .collect();
        let l = KvLayout::split_kv(
            bases,
            blocks,
            16,
            piece,
            blocks * piece,
            piece,
            2,
            PieceOrder::Nhd,
        );
        l.validate().unwrap();
        l
    }

    #[test]
    fn peer_copies_coalesce_each_piece_in_a_kv_leading_layout() {
        // two instances with different cache sizes: other K-to-V strides
        let (local, remote) = (kv_leading(1 << 32, 3, 64), kv_leading(1 << 40, 3, 96));
        let up: Vec<(u32, u32)> = (0..20).map(|i| (10 + i, 30 + i)).collect();
        let runs = plan_peer_copies(&local, &remote, &up, 0..3, PeerDirection::Pull).unwrap();
        assert_eq!(runs.len(), 3 * 2, "one run per layer for K and one for V");
        assert_eq!(
            runs[1],
            (
                local.device_addr(0, 10, 1),
                remote.device_addr(0, 30, 1),
                20 * (32 << 10)
            )
        );
        let push = plan_peer_copies(&local, &remote, &up, 0..3, PeerDirection::Push).unwrap();
        assert_eq!(
            push[1],
            (
                remote.device_addr(0, 30, 1),
                local.device_addr(0, 10, 1),
                20 * (32 << 10)
            )
        );
    }

    #[test]
    fn peer_copies_coalesce_blocks_running_the_same_way_on_both_sides() {
        let (local, remote) = (block_leading(1 << 32, 3, 64), block_leading(1 << 40, 3, 64));
        let plan = |pairs: &[(u32, u32)]| {
            plan_peer_copies(&local, &remote, pairs, 0..3, PeerDirection::Pull).unwrap()
        };
        // ascending on both sides: one run per layer
        let up: Vec<(u32, u32)> = (0..20).map(|i| (10 + i, 30 + i)).collect();
        let runs = plan(&up);
        assert_eq!(runs.len(), 3);
        assert_eq!(
            runs[0],
            (
                local.device_addr(0, 10, 0),
                remote.device_addr(0, 30, 0),
                20 * (64 << 10)
            )
        );
        // backwards on both sides (vLLM's free queue): the same runs
        let down: Vec<(u32, u32)> = up.iter().rev().copied().collect();
        assert_eq!(plan(&down), runs);
        // opposite ways: one run per block and layer, every byte once
        let opposite: Vec<(u32, u32)> = (0..20).map(|i| (10 + i, 49 - i)).collect();
        let runs = plan(&opposite);
        assert_eq!(runs.len(), 3 * 20);
        assert_eq!(runs.iter().map(|r| r.2).sum::<usize>(), 3 * 20 * (64 << 10));
        assert!(runs.contains(&(
            local.device_addr(2, 10, 0),
            remote.device_addr(2, 49, 0),
            64 << 10
        )));
        // a local block named twice would be two copies into one block
        let err = plan_peer_copies(
            &local,
            &remote,
            &[(3, 4), (3, 5)],
            0..3,
            PeerDirection::Pull,
        );
        assert!(matches!(err, Err(IpcError::DuplicateBlock(3))), "{err:?}");
        let err = plan_peer_copies(&local, &remote, &[(64, 0)], 0..3, PeerDirection::Pull);
        assert!(matches!(err, Err(IpcError::Plan(_))), "{err:?}");
    }

    #[test]
    fn export_encoding_round_trips_and_rejects_garbage() {
        let e = KvIpcExport {
            allocations: vec![
                IpcMemExport {
                    handle: [7; 64],
                    alloc_len: 1 << 30,
                },
                IpcMemExport {
                    handle: [9; 64],
                    alloc_len: 4096,
                },
            ],
            segments: vec![(0, 0), (0, 1 << 20), (1, 256)],
        };
        let b = e.encode();
        assert_eq!(KvIpcExport::decode(&b), Ok(e));
        assert!(KvIpcExport::decode(&b[..b.len() - 1]).is_err());
        let mut bad = b.clone();
        let n = bad.len();
        bad[n - 12] = 5; // segment names allocation 5
        assert!(matches!(
            KvIpcExport::decode(&bad),
            Err(IpcError::BadExport { index: 5, count: 2 })
        ));
        assert!(KvIpcExport::decode(&[0xff; 4]).is_err());
        let mut extra = b;
        extra.push(0);
        assert!(KvIpcExport::decode(&extra).is_err());
    }

    #[test]
    fn peer_export_round_trips_and_rejects_garbage() {
        let layout = KvLayout {
            kind: KvKind::SplitKv,
            order: PieceOrder::Nhd,
            segment_bases: vec![1 << 20, 1 << 30],
            num_layers: 2,
            num_blocks: 4,
            block_tokens: 16,
            block_stride: 4096,
            kv_stride: 2048,
            piece_bytes: 2048,
            dtype_size: 2,
        };
        let kv = KvIpcExport {
            allocations: vec![IpcMemExport {
                handle: [3; 64],
                alloc_len: 1 << 31,
            }],
            segments: vec![(0, 0), (0, 1 << 20)],
        };
        let e = PeerExport {
            layout: layout.clone(),
            kv,
        };
        let d = PeerExport::decode(&e.encode()).unwrap();
        assert_eq!(d.kv, e.kv);
        assert_eq!(d.incompatible_with(&layout), None);
        let mut other = layout.clone();
        other.piece_bytes = 1024;
        other.block_stride = 2048;
        other.kv_stride = 1024;
        assert!(d.incompatible_with(&other).is_some());
        let b = e.encode();
        for cut in [0, 3, 10, b.len() - 1] {
            assert!(PeerExport::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = b.clone();
        bad[4] = 9;
        assert!(PeerExport::decode(&bad).is_err());
        let mut bad = b;
        bad[6] = 3; // three segments, two exported
        assert!(PeerExport::decode(&bad).is_err());
    }
}
