//! Kernel backend: a gather/scatter kernel over device-mapped pinned memory.
//!
//! The kernel (`kernels/copy.cu`, shipped as PTX in `kernels/copy.ptx` and
//! JIT-compiled by the driver at load) reads a list of `{src, dst, len}`
//! descriptors and copies each with 16-byte vector loads and stores, one
//! thread block per descriptor (grid-stride). The host side of every piece
//! is read or written by the SMs directly over PCIe, so there is no
//! per-piece setup cost: small pieces move at link speed.
//!
//! Descriptor lists live in pinned, device-mapped host memory ("slabs") the
//! kernel reads directly, so a launch needs no extra upload. A slab is
//! reused only once the event recorded after the launch that read it has
//! completed; the host never waits on the GPU unless more than
//! [`MAX_SLABS`] launches are in flight.
//!
//! Requirements checked at construction: the device can use host pointers
//! of registered memory as device pointers (true on x86-64 Linux), so a
//! pool address is valid in the kernel as is.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys;

use crate::cuda::{self, check, CudaDevice, CudaError, Event, StreamRef};
use crate::layout::Piece;

use super::{check_aligned, CopyBackend, CopyBackendKind, CopyError, Direction};

/// The PTX, NUL-terminated for `cuModuleLoadData`.
static PTX: &str = concat!(include_str!("../../kernels/copy.ptx"), "\0");
const KERNEL_NAME: &[u8] = b"pegaflow_copy_pieces\0";

/// Threads per block; the kernel is compiled with `__launch_bounds__(512)`.
const THREADS: u32 = 512;
/// Pieces longer than this are split so one big piece spreads over many
/// thread blocks.
pub const CHUNK_BYTES: usize = 256 << 10;
/// Launches in flight before the host waits for the oldest.
pub const MAX_SLABS: usize = 256;

const CU_MEMHOSTALLOC_PORTABLE: u32 = 1;
const CU_MEMHOSTALLOC_DEVICEMAP: u32 = 2;

/// One copy for the kernel; must match `PegaCopyDesc` in copy.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Desc {
    src: u64,
    dst: u64,
    len: u64,
}

const _: () = assert!(std::mem::size_of::<Desc>() == 24);

/// Pinned, mapped host memory holding one launch's descriptors.
#[derive(Debug)]
struct Slab {
    host: *mut Desc,
    capacity: usize,
    /// Recorded after the launch that reads this slab.
    done: Event,
}

// SAFETY: the pointer is a pinned allocation owned by the slab; access is
// serialized by the backend's mutex and by the slab's event.
unsafe impl Send for Slab {}

impl Slab {
    fn new(device: &Arc<CudaDevice>, capacity: usize) -> Result<Slab, CudaError> {
        device.bind()?;
        let mut p: *mut c_void = std::ptr::null_mut();
        let bytes = capacity * std::mem::size_of::<Desc>();
        // SAFETY: context bound; p is a valid out-pointer.
        check("cuMemHostAlloc", unsafe {
            sys::cuMemHostAlloc(
                &mut p,
                bytes,
                CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP,
            )
        })?;
        let done = match Event::new(device) {
            Ok(e) => e,
            Err(e) => {
                // SAFETY: allocated just above, not shared yet.
                unsafe { sys::cuMemFreeHost(p) };
                return Err(e);
            }
        };
        Ok(Slab {
            host: p as *mut Desc,
            capacity,
            done,
        })
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        // A slab is dropped only by the backend's Drop, which synchronizes
        // each slab's event first (a kernel may still read it otherwise).
        let _ = self.done.synchronize();
        // SAFETY: allocated with cuMemHostAlloc in Slab::new, freed once.
        unsafe {
            let _ = sys::cuMemFreeHost(self.host as *mut c_void);
        }
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct KernelBackend {
    device: Arc<CudaDevice>,
    module: sys::CUmodule,
    func: sys::CUfunction,
    max_ctas: u32,
    slabs: Mutex<Vec<Slab>>,
}

// SAFETY: CUmodule/CUfunction are driver handles usable from any thread;
// mutable state (slabs) sits behind a Mutex.
unsafe impl Send for KernelBackend {}
// SAFETY: as above.
unsafe impl Sync for KernelBackend {}

impl KernelBackend {
    /// Loads the PTX into `device`'s context (the driver JIT-compiles it for
    /// the GPU; a driver older than PTX ISA 7.0 / CUDA 11.0 refuses it).
    pub fn new(device: &Arc<CudaDevice>) -> Result<Self, CopyError> {
        device.bind()?;
        if !device.host_pointer_is_device_pointer()? {
            return Err(CudaError::Unsupported(
                "the copy kernel needs CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM; use the dma backend".into(),
            )
            .into());
        }
        let mut module: sys::CUmodule = std::ptr::null_mut();
        // SAFETY: PTX is a NUL-terminated PTX text; context bound.
        check("cuModuleLoadData(copy.ptx)", unsafe {
            sys::cuModuleLoadData(&mut module, PTX.as_ptr() as *const c_void)
        })?;
        let mut func: sys::CUfunction = std::ptr::null_mut();
        // SAFETY: module loaded above; name is NUL-terminated.
        let r = unsafe {
            sys::cuModuleGetFunction(
                &mut func,
                module,
                KERNEL_NAME.as_ptr() as *const std::ffi::c_char,
            )
        };
        if let Err(e) = check("cuModuleGetFunction(pegaflow_copy_pieces)", r) {
            // SAFETY: loaded above, not shared.
            unsafe { sys::cuModuleUnload(module) };
            return Err(e.into());
        }
        // One 512-thread block per SM: a quarter of the GPU's thread slots.
        // Still far more bytes in flight than PCIe needs (132 x 512 x 64 B
        // on an H200), and it leaves room for a second copy kernel (save and
        // load at once) and for the forward pass. A full-GPU grid (4 per SM)
        // made concurrent save and load kernels run one after the other.
        let max_ctas = device.sm_count()?.max(1);
        Ok(KernelBackend {
            device: device.clone(),
            module,
            func,
            max_ctas,
            slabs: Mutex::new(Vec::new()),
        })
    }

    /// Caps the grid (e.g. to leave SMs to a concurrent forward pass).
    pub fn with_max_ctas(mut self, ctas: u32) -> Self {
        self.max_ctas = ctas.max(1);
        self
    }

    pub fn max_ctas(&self) -> u32 {
        self.max_ctas
    }

    /// Copies `copies[i] = (dst, src, len)` between two addresses of
    /// device memory this context can access (its own, or a peer GPU's
    /// mapped through CUDA IPC) on `stream`: one launch whatever the number
    /// of runs, where the copy engines pay a setup cost per run.
    ///
    /// # Safety
    /// Every `src..src+len` is readable and every `dst..dst+len` writable
    /// device memory for this context, the runs do not overlap, and all
    /// stay alive and untouched by others until the copy completes on
    /// `stream`.
    pub unsafe fn copy_device_to_device(
        &self,
        copies: &[(u64, u64, usize)],
        stream: StreamRef,
    ) -> Result<(), CopyError> {
        for (index, &(dst, src, len)) in copies.iter().enumerate() {
            if !(dst | src | len as u64).is_multiple_of(16) {
                return Err(CopyError::Misaligned {
                    backend: CopyBackendKind::Kernel,
                    index,
                    host: src as usize,
                    device: dst,
                    len,
                });
            }
        }
        // SAFETY: forwarded contract.
        unsafe { self.launch(copies.iter().copied(), stream) }
    }

    /// One launch over `runs` of `(dst, src, len)`, each split into
    /// [`CHUNK_BYTES`] descriptors.
    ///
    /// # Safety
    /// As [`KernelBackend::copy_device_to_device`], for addresses the
    /// kernel can dereference; 16-byte aligned (checked by the callers).
    unsafe fn launch(
        &self,
        runs: impl Iterator<Item = (u64, u64, usize)> + Clone,
        stream: StreamRef,
    ) -> Result<(), CopyError> {
        let n: usize = runs.clone().map(|r| r.2.div_ceil(CHUNK_BYTES)).sum();
        if n == 0 {
            return Ok(());
        }
        self.device.bind()?;
        let mut slabs = self.slabs.lock().unwrap_or_else(|e| e.into_inner());
        let slab = self.take_slab(&mut slabs, n)?;
        // SAFETY: the slab holds `capacity >= n` descriptors, is pinned host
        // memory owned by us, and no launch reads it (its event completed).
        let descs = unsafe { std::slice::from_raw_parts_mut(slab.host, n) };
        let mut i = 0;
        for (dst, src, len) in runs {
            let mut off = 0;
            while off < len {
                let l = (len - off).min(CHUNK_BYTES);
                descs[i] = Desc {
                    src: src + off as u64,
                    dst: dst + off as u64,
                    len: l as u64,
                };
                i += 1;
                off += l;
            }
        }
        debug_assert_eq!(i, n);
        // Mapped pinned memory on a UVA system: the host pointer is the
        // device pointer (checked in new()).
        let mut descs_ptr = slab.host as u64;
        let mut count = n as u64;
        let mut params = [
            &mut descs_ptr as *mut u64 as *mut c_void,
            &mut count as *mut u64 as *mut c_void,
        ];
        let grid = (n as u64).min(self.max_ctas as u64) as u32;
        // SAFETY: func takes (const PegaCopyDesc*, unsigned long long);
        // params point at locals that outlive the call (the driver copies
        // them at launch). The descriptors stay valid until slab.done
        // fires; the caller guarantees the pieces (CopyBackend::copy).
        let r = unsafe {
            sys::cuLaunchKernel(
                self.func,
                grid,
                1,
                1,
                THREADS,
                1,
                1,
                0,
                cuda::raw_stream(stream),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        let launched = check("cuLaunchKernel(pegaflow_copy_pieces)", r);
        let recorded = slab.done.record(stream);
        if launched.is_ok() && recorded.is_err() {
            // The event does not cover this launch, so nothing would stop
            // a later call from rewriting descriptors the kernel still
            // reads: wait for the stream before the slab goes back.
            let _ = cuda::stream_synchronize(&self.device, stream);
        }
        slabs.push(slab);
        launched?;
        recorded?;
        Ok(())
    }

    /// A free slab of at least `n` descriptors, taken out of the pool.
    fn take_slab(&self, slabs: &mut Vec<Slab>, n: usize) -> Result<Slab, CudaError> {
        // Free = its last launch completed.
        let mut free_small = None;
        for i in 0..slabs.len() {
            if slabs[i].done.query()? {
                if slabs[i].capacity >= n {
                    return Ok(slabs.swap_remove(i));
                }
                free_small = Some(i);
            }
        }
        if let Some(i) = free_small {
            // Too small: replace it rather than growing the pool.
            drop(slabs.swap_remove(i));
        } else if slabs.len() >= MAX_SLABS {
            // Everything in flight: wait for one (the oldest is first).
            let s = slabs.remove(0);
            drop(s);
        }
        Slab::new(&self.device, n.next_power_of_two().max(1024))
    }
}

impl Drop for KernelBackend {
    fn drop(&mut self) {
        let slabs = std::mem::take(&mut *self.slabs.lock().unwrap_or_else(|e| e.into_inner()));
        drop(slabs); // each waits for its launch
                     // SAFETY: loaded in new(), unloaded once; no launch is in flight
                     // (all slab events completed above).
        unsafe {
            let _ = self.device.bind();
            let _ = sys::cuModuleUnload(self.module);
        }
    }
}

impl CopyBackend for KernelBackend {
    fn kind(&self) -> CopyBackendKind {
        CopyBackendKind::Kernel
    }
    fn name(&self) -> &'static str {
        "kernel"
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
        check_aligned(CopyBackendKind::Kernel, pieces)?;
        let runs = pieces.iter().map(|p| {
            let (h, d) = (p.host as u64, p.device);
            match dir {
                Direction::HostToDevice => (d, h, p.len),
                Direction::DeviceToHost => (h, d, p.len),
            }
        });
        // SAFETY: forwarded contract (CopyBackend::copy); on a UVA system a
        // mapped pinned host address is valid in the kernel as is.
        unsafe { self.launch(runs, stream) }
    }

    fn kernel(&self) -> Option<&KernelBackend> {
        Some(self)
    }
}
