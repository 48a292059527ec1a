//! Copy backends: how a planned list of [`Piece`]s moves between the pool
//! and the engine's KV cache.
//!
//! * [`host::HostBackend`]: `memcpy` on the calling thread. For CPU tensors
//!   and for tests on machines without a GPU.
//! * [`dma::DmaBackend`]: the GPU's copy engines, `cuMemcpyBatchAsync`
//!   where the driver has it (12.8+), one `cuMemcpy*Async` per coalesced
//!   piece otherwise. Uses no SMs.
//! * [`kernel::KernelBackend`]: a gather/scatter kernel over device-mapped
//!   pinned memory. Gets full PCIe speed on small pieces, where the copy
//!   engines pay a per-piece cost, at the price of some SM time.
//! * [`AutoBackend`]: the copy engines whenever they can do the job well
//!   (batched DMA), so the SMs stay with the engine's compute; the kernel
//!   where the driver has no batched DMA and pieces are small, and for
//!   loads on hosts where a measurement
//!   ([`AutoBackend::calibrate_loads`]) finds it faster.
//!
//! Every backend passes the same [`conformance`] suite: the host backend in
//! the unit tests here, the GPU backends in `tests/tests/gpu.rs` on a GPU
//! machine.
//!
//! Contract shared by all backends: a call enqueues the copies on `stream`
//! in order after the work already on it (the host backend copies before
//! returning); the pieces never overlap each other (planning guarantees
//! it); completion is observed through the stream (events, sync).

pub mod conformance;
pub mod dma;
pub mod host;
pub mod kernel;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use thiserror::Error;

use crate::cuda::pool::HostRegistration;
use crate::cuda::{CudaDevice, CudaError, DeviceBuffer, Event, Stream, StreamRef};
use crate::layout::Piece;

/// Which way bytes move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Pool to GPU (a load).
    HostToDevice,
    /// GPU to pool (a save).
    DeviceToHost,
}

/// Which backend to use; parsed from config strings `auto|host|dma|kernel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum CopyBackendKind {
    #[default]
    Auto,
    Host,
    Dma,
    Kernel,
}

impl fmt::Display for CopyBackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CopyBackendKind::Auto => "auto",
            CopyBackendKind::Host => "host",
            CopyBackendKind::Dma => "dma",
            CopyBackendKind::Kernel => "kernel",
        })
    }
}

impl FromStr for CopyBackendKind {
    type Err = CopyError;
    fn from_str(s: &str) -> Result<Self, CopyError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(CopyBackendKind::Auto),
            "host" => Ok(CopyBackendKind::Host),
            "dma" => Ok(CopyBackendKind::Dma),
            "kernel" => Ok(CopyBackendKind::Kernel),
            _ => Err(CopyError::UnknownBackend(s.to_string())),
        }
    }
}

/// Copy failures.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CopyError {
    #[error("unknown copy backend {0:?}; expected one of auto, host, dma, kernel")]
    UnknownBackend(String),
    #[error("copy backend {0} needs a CUDA device; none was given (no driver or no GPU?)")]
    NeedsDevice(CopyBackendKind),
    #[error("piece {index} ({host:#x} <-> {device:#x}, {len} bytes) is not 16-byte aligned; the {backend} backend needs aligned pieces")]
    Misaligned {
        backend: CopyBackendKind,
        index: usize,
        host: usize,
        device: u64,
        len: usize,
    },
    #[error("host address {host:#x} is not registered with CUDA (register the pool before copying with the {backend} backend)")]
    NotRegistered {
        backend: CopyBackendKind,
        host: usize,
    },
    #[error(transparent)]
    Cuda(#[from] CudaError),
}

/// A way to move pieces. Implementations are shared across threads (one per
/// engine process, used by its save and load streams).
pub trait CopyBackend: Send + Sync + fmt::Debug {
    /// What this backend is (for logs and benchmark tables).
    fn kind(&self) -> CopyBackendKind;

    /// A name for tables (`dma-batch`, `dma-loop`, `kernel`, ...).
    fn name(&self) -> &'static str;

    /// True when copies finish before [`CopyBackend::copy`] returns (no
    /// stream involved).
    fn is_synchronous(&self) -> bool;

    /// Enqueues the copies of `pieces` in direction `dir` on `stream`.
    ///
    /// # Safety
    /// For every piece, `host..host+len` is live host memory and
    /// `device..device+len` live memory of the backend's device (for the
    /// host backend: host memory), readable on the source side and writable
    /// on the destination side, not overlapping any other piece, and both
    /// stay alive and untouched by others until the copy completes on
    /// `stream`. GPU backends additionally need the host side pinned
    /// (registered, as the pool is by [`crate::cuda::register_pool`]) for
    /// asynchronous DMA and device-mapped for the kernel.
    unsafe fn copy(
        &self,
        pieces: &[Piece],
        dir: Direction,
        stream: StreamRef,
    ) -> Result<(), CopyError>;

    /// The copy kernel this backend can launch, for copies it does not
    /// plan itself (peer GPU to GPU: [`crate::cuda::ipc::copy_peer_blocks`]).
    fn kernel(&self) -> Option<&kernel::KernelBackend> {
        None
    }

    /// This backend as the [`AutoBackend`], which can be calibrated.
    fn auto(&self) -> Option<&AutoBackend> {
        None
    }
}

/// Mean piece size at and above which [`AutoBackend`] uses DMA.
///
/// From shared/BENCHMARKS.md (H200, PCIe Gen5): the kernel holds 51-52 GB/s
/// at every size; batched DMA passes it from about 256 KiB (52-54 GB/s) and
/// reaches 55 GB/s at 1 MiB. Between 256 KiB and 1 MiB they tie, and DMA
/// keeps the SMs free, so DMA from 256 KiB.
pub const AUTO_DMA_THRESHOLD: usize = 256 << 10;

/// Mean piece size at and above which [`AutoBackend`] copies with batched
/// DMA.
///
/// Measured on the H200 through the connector (docs/benchmarks.md): at
/// 32-64 KiB pieces batched DMA loads at 97-98% of the copy ceiling where the
/// kernel reaches 91%. Device-to-host batched DMA of such pieces is slower
/// in isolation (34-40 GB/s against the kernel's 52), but saves run on their
/// own stream, overlapped with the forward pass, where the kernel's SM time
/// would slow the compute (a cold 10K-token prefill took 3.5-4% longer with
/// kernel saves inside a real vLLM): the engine's user sees the compute,
/// not the save.
pub const AUTO_DMA_LOAD_THRESHOLD: usize = 32 << 10;

/// The choice is made per call from the mean piece length after
/// coalescing: batched DMA when the driver has `cuMemcpyBatchAsync` and
/// pieces are at least [`AUTO_DMA_LOAD_THRESHOLD`], plain DMA for pieces of
/// [`AUTO_DMA_THRESHOLD`] and more, the kernel otherwise. Measured on the
/// H200 (docs/benchmarks.md): DMA both ways reaches 92% of the
/// bidirectional ceiling, the kernel both ways 69%.
///
/// Loads of batched-DMA pieces go to the kernel instead once
/// [`AutoBackend::calibrate_loads`] has found it faster on this host: on
/// one H200 host batched DMA loads 32 KiB pieces at 97% of PCIe, on another
/// (same GPU and driver) at 65% where the kernel holds 91%.
#[derive(Debug)]
pub struct AutoBackend {
    dma: dma::DmaBackend,
    kernel: kernel::KernelBackend,
    threshold: usize,
    kernel_loads: AtomicBool,
}

/// Pool bytes each backend copies per timed run of
/// [`AutoBackend::calibrate_loads`]: 2.4 ms at PCIe Gen5 speed, long enough
/// that launch costs do not decide.
pub const CALIBRATION_BYTES: usize = 128 << 20;

/// What [`AutoBackend::calibrate_loads`] measured: the best of
/// [`CALIBRATION_RUNS`] runs each.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadCalibration {
    /// Piece size timed (the layout's).
    pub piece: usize,
    /// Bytes per run.
    pub bytes: usize,
    pub dma_gbps: f64,
    pub kernel_gbps: f64,
    /// What loads of such pieces use from now on.
    pub chosen: CopyBackendKind,
}

/// Timed runs per backend (after one untimed warm-up each).
pub const CALIBRATION_RUNS: usize = 3;

/// The load backend for measured rates: batched DMA unless the kernel is
/// more than 5% faster (DMA leaves the SMs to the forward pass it overlaps).
pub fn faster_load_backend(dma_gbps: f64, kernel_gbps: f64) -> CopyBackendKind {
    if kernel_gbps > dma_gbps * 1.05 {
        CopyBackendKind::Kernel
    } else {
        CopyBackendKind::Dma
    }
}

/// [`AutoBackend::choose`]'s rule, without a device: `mean` is the mean
/// piece length, `batched` whether the driver has batched DMA,
/// `kernel_loads` whether calibration chose the kernel for loads.
pub fn auto_choice(
    mean: usize,
    threshold: usize,
    batched: bool,
    kernel_loads: bool,
    dir: Direction,
) -> CopyBackendKind {
    let large = mean >= threshold;
    let batched_dma = batched
        && mean >= AUTO_DMA_LOAD_THRESHOLD
        && !(kernel_loads && dir == Direction::HostToDevice);
    if large || batched_dma {
        CopyBackendKind::Dma
    } else {
        CopyBackendKind::Kernel
    }
}

impl AutoBackend {
    pub fn new(device: &Arc<CudaDevice>) -> Result<Self, CopyError> {
        Ok(AutoBackend {
            dma: dma::DmaBackend::new(device)?,
            kernel: kernel::KernelBackend::new(device)?,
            threshold: AUTO_DMA_THRESHOLD,
            kernel_loads: AtomicBool::new(false),
        })
    }

    /// Overrides [`AUTO_DMA_THRESHOLD`].
    pub fn with_threshold(mut self, bytes: usize) -> Self {
        self.threshold = bytes;
        self
    }

    /// Which backend a call with these pieces would use.
    pub fn choose(&self, pieces: &[Piece], dir: Direction) -> CopyBackendKind {
        if pieces.is_empty() {
            return CopyBackendKind::Dma;
        }
        let mean = pieces.iter().map(|p| p.len).sum::<usize>() / pieces.len();
        auto_choice(
            mean,
            self.threshold,
            self.dma.batch_api().is_some(),
            self.kernel_loads.load(Ordering::Relaxed),
            dir,
        )
    }

    /// Times loads of `piece`-byte pieces from `pool` into a scratch GPU
    /// buffer with batched DMA and with the kernel, and from then on loads
    /// such pieces with the faster (see [`faster_load_backend`]). None:
    /// nothing to choose (no batched DMA, pieces the rule settles alone, a
    /// pool under `2 x CALIBRATION_BYTES`).
    ///
    /// Call it where the engine's GPU is otherwise quiet and on the thread
    /// that runs the engine's steps, never beside a CUDA graph capture: it
    /// allocates and frees `CALIBRATION_BYTES` of GPU memory and waits on
    /// events (about 20 ms in all). It reads the pool and writes nothing
    /// but its own buffer.
    pub fn calibrate_loads(
        &self,
        device: &Arc<CudaDevice>,
        pool: &HostRegistration,
        piece: usize,
    ) -> Result<Option<LoadCalibration>, CopyError> {
        if self.dma.batch_api().is_none()
            || piece < AUTO_DMA_LOAD_THRESHOLD
            || piece >= self.threshold
            || !piece.is_multiple_of(16)
        {
            return Ok(None);
        }
        // Every other piece of the pool: none coalesce, as in a real load.
        let n = CALIBRATION_BYTES / piece;
        if pool.len() < 2 * n * piece {
            return Ok(None);
        }
        device.bind()?;
        let scratch = DeviceBuffer::new(device, n * piece)?;
        let pieces: Vec<Piece> = (0..n)
            .map(|i| Piece {
                host: pool.base() + 2 * i * piece,
                device: scratch.ptr() + (i * piece) as u64,
                len: piece,
            })
            .collect();
        let stream = Stream::new(device)?;
        let (start, end) = (Event::timing(device)?, Event::timing(device)?);
        let backends: [&dyn CopyBackend; 2] = [&self.dma, &self.kernel];
        let mut best = [f64::INFINITY; 2];
        for run in 0..=CALIBRATION_RUNS {
            for (b, backend) in backends.iter().enumerate() {
                start.record(stream.as_ref())?;
                // SAFETY: every host range lies in the registered (pinned,
                // device-mapped) pool, which `pool` keeps mapped; every
                // device range in `scratch`, which outlives the copy (`end`
                // is synchronized before the next run and before it drops);
                // the pieces do not overlap.
                unsafe { backend.copy(&pieces, Direction::HostToDevice, stream.as_ref())? };
                end.record(stream.as_ref())?;
                end.synchronize()?;
                if run > 0 {
                    best[b] = best[b].min(end.elapsed_ms_since(&start)? as f64);
                }
            }
        }
        let bytes = n * piece;
        let gbps = |ms: f64| bytes as f64 / (ms * 1e-3) / 1e9;
        let (dma_gbps, kernel_gbps) = (gbps(best[0]), gbps(best[1]));
        let chosen = faster_load_backend(dma_gbps, kernel_gbps);
        self.kernel_loads
            .store(chosen == CopyBackendKind::Kernel, Ordering::Relaxed);
        tracing::info!(
            piece_kib = piece >> 10,
            dma_gbps,
            kernel_gbps,
            chosen = %chosen,
            "calibrated the load backend"
        );
        Ok(Some(LoadCalibration {
            piece,
            bytes,
            dma_gbps,
            kernel_gbps,
            chosen,
        }))
    }
}

impl CopyBackend for AutoBackend {
    fn kind(&self) -> CopyBackendKind {
        CopyBackendKind::Auto
    }
    fn name(&self) -> &'static str {
        "auto"
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
        match self.choose(pieces, dir) {
            // SAFETY: forwarded contract, identical for both backends.
            CopyBackendKind::Kernel => unsafe { self.kernel.copy(pieces, dir, stream) },
            // SAFETY: as above.
            _ => unsafe { self.dma.copy(pieces, dir, stream) },
        }
    }

    fn kernel(&self) -> Option<&kernel::KernelBackend> {
        Some(&self.kernel)
    }

    fn auto(&self) -> Option<&AutoBackend> {
        Some(self)
    }
}

/// Builds the backend `kind`. `device` is `None` on machines without CUDA
/// (or for CPU tensors): `Auto` then means `Host`, and `Dma`/`Kernel` are an
/// error.
pub fn make_backend(
    kind: CopyBackendKind,
    device: Option<&Arc<CudaDevice>>,
) -> Result<Arc<dyn CopyBackend>, CopyError> {
    Ok(match (kind, device) {
        (CopyBackendKind::Host, _) | (CopyBackendKind::Auto, None) => Arc::new(host::HostBackend),
        (CopyBackendKind::Auto, Some(d)) => Arc::new(AutoBackend::new(d)?),
        (CopyBackendKind::Dma, Some(d)) => Arc::new(dma::DmaBackend::new(d)?),
        (CopyBackendKind::Kernel, Some(d)) => Arc::new(kernel::KernelBackend::new(d)?),
        (k, None) => return Err(CopyError::NeedsDevice(k)),
    })
}

/// Checks 16-byte alignment of every piece (GPU backends).
pub(crate) fn check_aligned(backend: CopyBackendKind, pieces: &[Piece]) -> Result<(), CopyError> {
    for (index, p) in pieces.iter().enumerate() {
        if (p.host | p.len) % 16 != 0 || p.device % 16 != 0 {
            return Err(CopyError::Misaligned {
                backend,
                index,
                host: p.host,
                device: p.device,
                len: p.len,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_print() {
        for k in [
            CopyBackendKind::Auto,
            CopyBackendKind::Host,
            CopyBackendKind::Dma,
            CopyBackendKind::Kernel,
        ] {
            assert_eq!(k.to_string().parse::<CopyBackendKind>(), Ok(k));
        }
        assert_eq!(" DMA ".parse::<CopyBackendKind>(), Ok(CopyBackendKind::Dma));
        assert!(matches!(
            "nvlink".parse::<CopyBackendKind>(),
            Err(CopyError::UnknownBackend(_))
        ));
    }

    #[test]
    fn without_a_device_auto_is_host_and_gpu_kinds_fail() {
        assert_eq!(
            make_backend(CopyBackendKind::Auto, None)
                .map(|b| b.kind())
                .ok(),
            Some(CopyBackendKind::Host)
        );
        assert_eq!(
            make_backend(CopyBackendKind::Dma, None).err(),
            Some(CopyError::NeedsDevice(CopyBackendKind::Dma))
        );
        assert_eq!(
            make_backend(CopyBackendKind::Kernel, None).err(),
            Some(CopyError::NeedsDevice(CopyBackendKind::Kernel))
        );
    }

    #[test]
    fn the_kernel_loads_only_when_clearly_faster() {
        assert_eq!(faster_load_backend(36.1, 50.4), CopyBackendKind::Kernel);
        assert_eq!(faster_load_backend(53.8, 50.4), CopyBackendKind::Dma);
        // within 5%: DMA keeps the SMs free
        assert_eq!(faster_load_backend(50.0, 52.0), CopyBackendKind::Dma);
    }

    #[test]
    fn a_calibrated_kernel_takes_batched_loads_only() {
        use Direction::{DeviceToHost as D2H, HostToDevice as H2D};
        let t = AUTO_DMA_THRESHOLD;
        let k32 = 32 << 10;
        // uncalibrated: batched DMA both ways from 32 KiB
        assert_eq!(auto_choice(k32, t, true, false, H2D), CopyBackendKind::Dma);
        assert_eq!(auto_choice(k32, t, true, false, D2H), CopyBackendKind::Dma);
        // calibrated for the kernel: loads move, saves stay on the copy engines
        assert_eq!(
            auto_choice(k32, t, true, true, H2D),
            CopyBackendKind::Kernel
        );
        assert_eq!(auto_choice(k32, t, true, true, D2H), CopyBackendKind::Dma);
        // large pieces stay DMA, small ones the kernel, whatever was measured
        assert_eq!(auto_choice(t, t, true, true, H2D), CopyBackendKind::Dma);
        assert_eq!(
            auto_choice(16 << 10, t, true, false, H2D),
            CopyBackendKind::Kernel
        );
        // no batched DMA in the driver: the kernel below the threshold
        assert_eq!(
            auto_choice(k32, t, false, false, D2H),
            CopyBackendKind::Kernel
        );
    }

    #[test]
    fn alignment_check_names_the_piece() {
        let ok = Piece {
            host: 32,
            device: 64,
            len: 16,
        };
        let bad = Piece {
            host: 32,
            device: 64,
            len: 8,
        };
        assert!(check_aligned(CopyBackendKind::Dma, &[ok]).is_ok());
        assert!(matches!(
            check_aligned(CopyBackendKind::Dma, &[ok, bad]),
            Err(CopyError::Misaligned { index: 1, .. })
        ));
    }
}
