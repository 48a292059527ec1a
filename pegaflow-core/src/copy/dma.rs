//! DMA backend: the GPU's copy engines, no SMs.
//!
//! One `cuMemcpy*Async` costs a few microseconds of setup, so 32 KiB pieces
//! get ~10 GB/s one call at a time. `cuMemcpyBatchAsync` (driver 12.8+)
//! hands the whole list to the driver in one call (~40 GB/s at 32 KiB on an
//! H200). Its signature changed in CUDA 13: the 12.8 symbol
//! `cuMemcpyBatchAsync` takes a `failIdx` out-pointer, the 13.0 symbol
//! `cuMemcpyBatchAsync_v2` does not. We look the symbols up ourselves at run
//! time (cudarc's binding is compiled for one toolkit version) and pick by
//! driver version: `_v2` on 13.0+, the 12.8 one on 12.8/12.9, the per-piece
//! loop otherwise.

use std::sync::Arc;

use cudarc::driver::sys;

use crate::cuda::{self, check, CudaDevice, CudaError, StreamRef};
use crate::layout::Piece;

use super::{CopyBackend, CopyBackendKind, CopyError, Direction};

/// `CUmemcpyAttributes` (identical in 12.8 and 13.0).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MemcpyAttributes {
    src_access_order: u32,
    src_loc_hint: MemLocation,
    dst_loc_hint: MemLocation,
    flags: u32,
}

/// `CUmemLocation`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MemLocation {
    kind: u32,
    id: i32,
}

const _: () = assert!(std::mem::size_of::<MemcpyAttributes>() == 24);

/// `CU_MEMCPY_SRC_ACCESS_ORDER_STREAM`: sources are read in stream order,
/// like every other async copy.
const SRC_ACCESS_ORDER_STREAM: u32 = 1;

/// Most copies handed to one `cuMemcpyBatchAsync` call.
const BATCH_MAX: usize = 65536;

type BatchV1 = unsafe extern "C" fn(
    *mut sys::CUdeviceptr,
    *mut sys::CUdeviceptr,
    *mut usize,
    usize,
    *mut MemcpyAttributes,
    *mut usize,
    usize,
    *mut usize,
    sys::CUstream,
) -> sys::CUresult;

type BatchV2 = unsafe extern "C" fn(
    *mut sys::CUdeviceptr,
    *mut sys::CUdeviceptr,
    *mut usize,
    usize,
    *mut MemcpyAttributes,
    *mut usize,
    usize,
    sys::CUstream,
) -> sys::CUresult;

/// The batched-copy entry point this driver offers.
#[derive(Clone, Copy)]
pub struct BatchApi(BatchFn);

#[derive(Clone, Copy)]
enum BatchFn {
    /// CUDA 12.8 / 12.9 signature (`failIdx` out-pointer).
    V1(BatchV1),
    /// CUDA 13.0+ signature.
    V2(BatchV2),
}

impl std::fmt::Debug for BatchApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.signature())
    }
}

impl BatchApi {
    /// Which symbol and signature is in use.
    pub fn signature(&self) -> &'static str {
        match self.0 {
            BatchFn::V1(_) => "cuMemcpyBatchAsync (12.8 signature)",
            BatchFn::V2(_) => "cuMemcpyBatchAsync_v2 (13.0 signature)",
        }
    }

    /// Looks the entry point up in the loaded driver; `None` when the driver
    /// predates 12.8 (or the symbol is missing).
    pub fn load() -> Result<Option<BatchApi>, CudaError> {
        let version = cuda::driver_version()?;
        // SAFETY: driver_version succeeded, so libcuda is loaded; culib()
        // returns the same handle. The symbol types are the driver's
        // documented signatures for these exact symbol names (see the
        // module docs), so calling through them is sound.
        unsafe {
            let lib = sys::culib();
            if version >= 13000 {
                if let Ok(f) = lib.get::<BatchV2>(b"cuMemcpyBatchAsync_v2\0") {
                    return Ok(Some(BatchApi(BatchFn::V2(*f))));
                }
            }
            if version >= 12080 {
                if let Ok(f) = lib.get::<BatchV1>(b"cuMemcpyBatchAsync\0") {
                    return Ok(Some(BatchApi(BatchFn::V1(*f))));
                }
            }
        }
        Ok(None)
    }

    /// One batched copy of `dsts[i] <- srcs[i]` (`sizes[i]` bytes).
    ///
    /// # Safety
    /// Each range valid as for `cuMemcpyAsync` until the copies complete on
    /// `stream`, which must not be the legacy default stream (the driver
    /// refuses it).
    pub unsafe fn copy(
        &self,
        dsts: &mut [sys::CUdeviceptr],
        srcs: &mut [sys::CUdeviceptr],
        sizes: &mut [usize],
        stream: StreamRef,
    ) -> Result<(), CudaError> {
        debug_assert!(dsts.len() == srcs.len() && srcs.len() == sizes.len());
        if dsts.is_empty() {
            return Ok(());
        }
        let s = cuda::raw_stream(stream);
        // Batches of at most BATCH_MAX: the largest count measured on an
        // H200 (shared/measurements); the driver documents no limit, but a
        // refusal here would fail the whole save.
        let mut start = 0;
        while start < dsts.len() {
            let end = (start + BATCH_MAX).min(dsts.len());
            let n = end - start;
            let mut attr = MemcpyAttributes {
                src_access_order: SRC_ACCESS_ORDER_STREAM,
                ..Default::default()
            };
            // One attribute set applies from index 0 to the end.
            let mut attr_idx = 0usize;
            let (d, sr, sz) = (
                dsts[start..end].as_mut_ptr(),
                srcs[start..end].as_mut_ptr(),
                sizes[start..end].as_mut_ptr(),
            );
            // SAFETY: arrays are live for the call (the driver reads them
            // before returning); the caller guarantees the ranges (see
            // # Safety).
            let r = unsafe {
                match self.0 {
                    BatchFn::V1(f) => {
                        let mut fail = 0usize;
                        f(d, sr, sz, n, &mut attr, &mut attr_idx, 1, &mut fail, s)
                    }
                    BatchFn::V2(f) => f(d, sr, sz, n, &mut attr, &mut attr_idx, 1, s),
                }
            };
            check("cuMemcpyBatchAsync", r)?;
            start = end;
        }
        Ok(())
    }
}

/// How the DMA backend issues copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaMode {
    /// `cuMemcpyBatchAsync` when available, else per piece.
    Auto,
    /// One `cuMemcpy{HtoD,DtoH}Async` per coalesced piece.
    PerPiece,
}

/// See the module docs.
#[derive(Debug)]
pub struct DmaBackend {
    device: Arc<CudaDevice>,
    batch: Option<BatchApi>,
}

impl DmaBackend {
    pub fn new(device: &Arc<CudaDevice>) -> Result<Self, CopyError> {
        Self::with_mode(device, DmaMode::Auto)
    }

    pub fn with_mode(device: &Arc<CudaDevice>, mode: DmaMode) -> Result<Self, CopyError> {
        let batch = match mode {
            DmaMode::Auto => BatchApi::load()?,
            DmaMode::PerPiece => None,
        };
        tracing::debug!(?batch, "DMA copy backend");
        Ok(DmaBackend {
            device: device.clone(),
            batch,
        })
    }

    /// The batched entry point in use, if any.
    pub fn batch_api(&self) -> Option<BatchApi> {
        self.batch
    }
}

impl CopyBackend for DmaBackend {
    fn kind(&self) -> CopyBackendKind {
        CopyBackendKind::Dma
    }
    fn name(&self) -> &'static str {
        if self.batch.is_some() {
            "dma-batch"
        } else {
            "dma-loop"
        }
    }
    fn is_synchronous(&self) -> bool {
        false
    }
    unsafe fn copy(
        &self,
        pieces: &[Piece],
        dir: Direction,
        stream: StreamRef,
    ) -> Result<(), CopyError> {
        if pieces.is_empty() {
            return Ok(());
        }
        self.device.bind()?;
        // The batch API refuses the legacy default stream; a single piece
        // gains nothing from batching.
        if let (Some(batch), false, true) =
            (self.batch, stream == StreamRef::DEFAULT, pieces.len() > 1)
        {
            let n = pieces.len();
            let mut dsts = Vec::with_capacity(n);
            let mut srcs = Vec::with_capacity(n);
            let mut sizes = Vec::with_capacity(n);
            for p in pieces {
                let (d, s) = match dir {
                    Direction::HostToDevice => (p.device, p.host as u64),
                    Direction::DeviceToHost => (p.host as u64, p.device),
                };
                dsts.push(d);
                srcs.push(s);
                sizes.push(p.len);
            }
            // SAFETY: the caller guarantees every range (CopyBackend::copy
            // # Safety); the stream is not the default one (checked above).
            unsafe { batch.copy(&mut dsts, &mut srcs, &mut sizes, stream)? };
            return Ok(());
        }
        for p in pieces {
            // SAFETY: the caller guarantees every range (CopyBackend::copy
            // # Safety).
            unsafe {
                match dir {
                    Direction::HostToDevice => cuda::memcpy_htod_async(
                        &self.device,
                        p.device,
                        p.host as *const u8,
                        p.len,
                        stream,
                    )?,
                    Direction::DeviceToHost => cuda::memcpy_dtoh_async(
                        &self.device,
                        p.host as *mut u8,
                        p.device,
                        p.len,
                        stream,
                    )?,
                }
            }
        }
        Ok(())
    }
}

/// Asynchronous device-to-device copies (peer copies between engines),
/// batched when the driver can.
///
/// # Safety
/// Every `(dst, src, len)` range valid device memory (or peer-accessible)
/// until the copies complete on `stream`; no destination overlaps another
/// piece.
pub unsafe fn copy_device_to_device(
    device: &CudaDevice,
    batch: Option<BatchApi>,
    copies: &[(u64, u64, usize)],
    stream: StreamRef,
) -> Result<(), CudaError> {
    device.bind()?;
    if let (Some(b), false, true) = (batch, stream == StreamRef::DEFAULT, copies.len() > 1) {
        let mut d: Vec<u64> = copies.iter().map(|c| c.0).collect();
        let mut s: Vec<u64> = copies.iter().map(|c| c.1).collect();
        let mut n: Vec<usize> = copies.iter().map(|c| c.2).collect();
        // SAFETY: forwarded contract.
        return unsafe { b.copy(&mut d, &mut s, &mut n, stream) };
    }
    for &(d, s, n) in copies {
        // SAFETY: forwarded contract.
        unsafe { cuda::memcpy_async(device, d, s, n, stream)? };
    }
    Ok(())
}
