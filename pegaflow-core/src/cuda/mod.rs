//! The CUDA driver, loaded at run time.
//!
//! Everything here goes through cudarc's raw driver bindings with dynamic
//! loading, so the crate builds and its CPU paths run on machines without
//! CUDA. cudarc panics when `libcuda` is missing, so every entry point that
//! can reach the driver first asks [`driver_present`] and returns
//! [`CudaError::NoDriver`] instead.
//!
//! The handles are thin RAII wrappers: [`CudaDevice`] (the device's primary
//! context, the one PyTorch uses, so pointers from torch tensors are valid
//! in it), [`Stream`], [`Event`], [`DeviceBuffer`]. [`pool`] registers the
//! shared pool with the driver; [`ipc`] exports and imports CUDA IPC
//! handles and copies blocks between two engines' GPU caches.
//!
//! All driver calls made for a device bind its context to the calling
//! thread first ([`CudaDevice::bind`]); binding is a thread-local store in
//! the driver, cheap enough for every call.

pub mod ipc;
pub mod pool;

use std::ffi::{c_void, CStr};
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys;
use thiserror::Error;

pub use pool::{
    register_pool, register_pool_background, register_segment_background, HostRegistration,
    PendingRegistration,
};

/// A raw `CUstream` value. `StreamRef(0)` is the legacy default stream;
/// engines pass their own stream (torch: `torch.cuda.current_stream().cuda_stream`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct StreamRef(pub u64);

impl StreamRef {
    /// The legacy default stream.
    pub const DEFAULT: StreamRef = StreamRef(0);

    fn raw(self) -> sys::CUstream {
        self.0 as usize as sys::CUstream
    }
}

/// Driver failures. `code` is the raw `CUresult`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CudaError {
    #[error("no CUDA driver (libcuda) on this machine; use the host copy backend or install the NVIDIA driver")]
    NoDriver,
    #[error("{call} failed: {name} ({code})")]
    Driver {
        call: &'static str,
        code: u32,
        name: String,
    },
    #[error("the CUDA driver is version {found}; {what} needs {needed} or newer")]
    DriverTooOld {
        what: &'static str,
        found: i32,
        needed: i32,
    },
    #[error("{0}")]
    Unsupported(String),
}

impl CudaError {
    /// The raw `CUresult`, if this came from a driver call.
    pub fn code(&self) -> Option<u32> {
        match self {
            CudaError::Driver { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// True when `libcuda` can be loaded. Cached: the answer cannot change
/// within a process.
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: is_culib_present only tries dlopen on the candidate names and
    // drops the handle; it has no preconditions.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

fn require_driver() -> Result<(), CudaError> {
    if driver_present() {
        Ok(())
    } else {
        Err(CudaError::NoDriver)
    }
}

/// Turns a `CUresult` into a `Result`, naming the call.
pub(crate) fn check(call: &'static str, r: sys::CUresult) -> Result<(), CudaError> {
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut p: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: we only reach here after a driver call returned, so the
    // library is loaded; cuGetErrorName writes a static string pointer.
    let name = unsafe {
        if sys::cuGetErrorName(r, &mut p) == sys::CUresult::CUDA_SUCCESS && !p.is_null() {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        } else {
            format!("{r:?}")
        }
    };
    Err(CudaError::Driver {
        call,
        code: r as u32,
        name,
    })
}

/// `cuInit(0)`, once.
fn init() -> Result<(), CudaError> {
    require_driver()?;
    static INIT: OnceLock<Result<(), CudaError>> = OnceLock::new();
    // SAFETY: the driver is present (checked above); cuInit is thread-safe
    // and idempotent.
    INIT.get_or_init(|| check("cuInit", unsafe { sys::cuInit(0) }))
        .clone()
}

/// Driver version as `1000 * major + 10 * minor` (13000 for CUDA 13.0).
pub fn driver_version() -> Result<i32, CudaError> {
    init()?;
    let mut v = 0;
    // SAFETY: init succeeded; v is a valid out-pointer.
    check("cuDriverGetVersion", unsafe {
        sys::cuDriverGetVersion(&mut v)
    })?;
    Ok(v)
}

/// Number of CUDA devices (0 without a driver).
pub fn device_count() -> usize {
    if init().is_err() {
        return 0;
    }
    let mut n = 0;
    // SAFETY: init succeeded; n is a valid out-pointer.
    match check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut n) }) {
        Ok(()) => n.max(0) as usize,
        Err(_) => 0,
    }
}

/// One GPU, through its primary context.
#[derive(Debug)]
pub struct CudaDevice {
    ordinal: i32,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
}

// SAFETY: CUcontext is an opaque driver handle; the driver API is
// thread-safe and a context may be made current on any thread.
unsafe impl Send for CudaDevice {}
// SAFETY: as above; &CudaDevice only hands the handle to driver calls.
unsafe impl Sync for CudaDevice {}

impl CudaDevice {
    /// Retains device `ordinal`'s primary context (shared with PyTorch and
    /// any other runtime-API user in the process).
    pub fn open(ordinal: i32) -> Result<Arc<Self>, CudaError> {
        init()?;
        let mut dev: sys::CUdevice = 0;
        // SAFETY: init succeeded; dev is a valid out-pointer.
        check("cuDeviceGet", unsafe {
            sys::cuDeviceGet(&mut dev, ordinal)
        })?;
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: dev came from cuDeviceGet; ctx is a valid out-pointer.
        check("cuDevicePrimaryCtxRetain", unsafe {
            sys::cuDevicePrimaryCtxRetain(&mut ctx, dev)
        })?;
        let d = Arc::new(CudaDevice { ordinal, dev, ctx });
        d.bind()?;
        Ok(d)
    }

    pub fn ordinal(&self) -> i32 {
        self.ordinal
    }

    /// Makes this device's context current on the calling thread.
    pub fn bind(&self) -> Result<(), CudaError> {
        // SAFETY: ctx is a retained primary context, alive while self is.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.ctx) })
    }

    /// A device attribute.
    pub fn attribute(&self, attr: sys::CUdevice_attribute) -> Result<i32, CudaError> {
        let mut v = 0;
        // SAFETY: dev is valid; v is a valid out-pointer.
        check("cuDeviceGetAttribute", unsafe {
            sys::cuDeviceGetAttribute(&mut v, attr, self.dev)
        })?;
        Ok(v)
    }

    /// Streaming multiprocessors.
    pub fn sm_count(&self) -> Result<u32, CudaError> {
        Ok(
            self.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
                as u32,
        )
    }

    /// Whether the device can use the host pointer of registered memory
    /// directly (true on x86-64 Linux with unified addressing).
    pub fn host_pointer_is_device_pointer(&self) -> Result<bool, CudaError> {
        Ok(self.attribute(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM,
        )? != 0)
    }

    /// Waits for all work on the device.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.bind()?;
        // SAFETY: a context is current (bind above).
        check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // SAFETY: we retained the primary context in open(); release it once.
        unsafe {
            let _ = sys::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
    }
}

const CU_STREAM_NON_BLOCKING: u32 = 1;
const CU_EVENT_DISABLE_TIMING: u32 = 2;
const CU_EVENT_INTERPROCESS: u32 = 4;

/// A stream this crate created (non-blocking: it does not serialize with
/// the legacy default stream).
#[derive(Debug)]
pub struct Stream {
    raw: sys::CUstream,
    device: Arc<CudaDevice>,
}

// SAFETY: CUstream is an opaque driver handle usable from any thread with
// its context bound.
unsafe impl Send for Stream {}
// SAFETY: as above.
unsafe impl Sync for Stream {}

impl Stream {
    pub fn new(device: &Arc<CudaDevice>) -> Result<Self, CudaError> {
        device.bind()?;
        let mut raw: sys::CUstream = std::ptr::null_mut();
        // SAFETY: context bound; raw is a valid out-pointer.
        check("cuStreamCreate", unsafe {
            sys::cuStreamCreate(&mut raw, CU_STREAM_NON_BLOCKING)
        })?;
        Ok(Stream {
            raw,
            device: device.clone(),
        })
    }

    pub fn as_ref(&self) -> StreamRef {
        StreamRef(self.raw as usize as u64)
    }

    pub fn synchronize(&self) -> Result<(), CudaError> {
        stream_synchronize(&self.device, self.as_ref())
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: raw was created by us and is destroyed once; pending work
        // still completes (cuStreamDestroy does not cancel it).
        unsafe {
            let _ = self.device.bind();
            let _ = sys::cuStreamDestroy_v2(self.raw);
        }
    }
}

/// Waits for all work queued on `stream`.
pub fn stream_synchronize(device: &CudaDevice, stream: StreamRef) -> Result<(), CudaError> {
    device.bind()?;
    // SAFETY: the caller's stream handle belongs to device's context (a
    // wrong handle is reported by the driver, not UB for sync).
    check("cuStreamSynchronize", unsafe {
        sys::cuStreamSynchronize(stream.raw())
    })
}

/// A CUDA event.
#[derive(Debug)]
pub struct Event {
    raw: sys::CUevent,
    device: Arc<CudaDevice>,
    interprocess: bool,
}

// SAFETY: CUevent is an opaque driver handle usable from any thread.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

impl Event {
    /// An event for ordering only (no timing: cheaper to record).
    pub fn new(device: &Arc<CudaDevice>) -> Result<Self, CudaError> {
        Self::with_flags(device, CU_EVENT_DISABLE_TIMING, false)
    }

    /// An event that can be exported with [`ipc::export_event`]
    /// (INTERPROCESS | DISABLE_TIMING, as the driver requires).
    pub fn interprocess(device: &Arc<CudaDevice>) -> Result<Self, CudaError> {
        Self::with_flags(
            device,
            CU_EVENT_DISABLE_TIMING | CU_EVENT_INTERPROCESS,
            true,
        )
    }

    /// An event with timing, for benchmarks.
    pub fn timing(device: &Arc<CudaDevice>) -> Result<Self, CudaError> {
        Self::with_flags(device, 0, false)
    }

    fn with_flags(
        device: &Arc<CudaDevice>,
        flags: u32,
        interprocess: bool,
    ) -> Result<Self, CudaError> {
        device.bind()?;
        let mut raw: sys::CUevent = std::ptr::null_mut();
        // SAFETY: context bound; raw is a valid out-pointer.
        check("cuEventCreate", unsafe {
            sys::cuEventCreate(&mut raw, flags)
        })?;
        Ok(Event {
            raw,
            device: device.clone(),
            interprocess,
        })
    }

    pub fn is_interprocess(&self) -> bool {
        self.interprocess
    }

    /// Records the event after the work queued so far on `stream`.
    pub fn record(&self, stream: StreamRef) -> Result<(), CudaError> {
        self.device.bind()?;
        // SAFETY: raw is a live event of this context.
        check("cuEventRecord", unsafe {
            sys::cuEventRecord(self.raw, stream.raw())
        })
    }

    /// True once the recorded work has completed (also for a never-recorded
    /// event).
    pub fn query(&self) -> Result<bool, CudaError> {
        self.device.bind()?;
        // SAFETY: raw is a live event.
        let r = unsafe { sys::cuEventQuery(self.raw) };
        if r == sys::CUresult::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        check("cuEventQuery", r).map(|()| true)
    }

    /// Blocks the calling thread until the recorded work has completed.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.device.bind()?;
        // SAFETY: raw is a live event.
        check("cuEventSynchronize", unsafe {
            sys::cuEventSynchronize(self.raw)
        })
    }

    /// Makes `stream` wait (on the GPU) for this event: the host does not block.
    pub fn wait_on(&self, stream: StreamRef) -> Result<(), CudaError> {
        self.device.bind()?;
        // SAFETY: raw is a live event; the stream is the caller's.
        check("cuStreamWaitEvent", unsafe {
            sys::cuStreamWaitEvent(stream.raw(), self.raw, 0)
        })
    }

    /// Milliseconds between `start` and `self` (both timing events).
    pub fn elapsed_ms_since(&self, start: &Event) -> Result<f32, CudaError> {
        let mut ms = 0f32;
        // SAFETY: both are live events; ms is a valid out-pointer.
        check("cuEventElapsedTime", unsafe {
            sys::cuEventElapsedTime(&mut ms, start.raw, self.raw)
        })?;
        Ok(ms)
    }

    pub(crate) fn raw(&self) -> sys::CUevent {
        self.raw
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created (or imported) by us, destroyed once.
        unsafe {
            let _ = self.device.bind();
            let _ = sys::cuEventDestroy_v2(self.raw);
        }
    }
}

/// Plain device memory (`cuMemAlloc`): for tests, benchmarks and the copy
/// kernel's descriptor lists. Engines bring their own KV cache.
#[derive(Debug)]
pub struct DeviceBuffer {
    ptr: u64,
    len: usize,
    device: Arc<CudaDevice>,
}

impl DeviceBuffer {
    pub fn new(device: &Arc<CudaDevice>, len: usize) -> Result<Self, CudaError> {
        device.bind()?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: context bound; ptr is a valid out-pointer.
        check("cuMemAlloc", unsafe {
            sys::cuMemAlloc_v2(&mut ptr, len.max(1))
        })?;
        Ok(DeviceBuffer {
            ptr,
            len,
            device: device.clone(),
        })
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Byte fill; returns once the bytes are on the device.
    ///
    /// `cuMemsetD8` is asynchronous on the legacy stream, which our
    /// non-blocking streams do not wait for, so we synchronize the context:
    /// otherwise a copy queued right after could see the old bytes.
    pub fn memset(&self, byte: u8) -> Result<(), CudaError> {
        self.device.bind()?;
        // SAFETY: [ptr, ptr+len) is our allocation.
        check("cuMemsetD8", unsafe {
            sys::cuMemsetD8_v2(self.ptr, byte, self.len)
        })?;
        // SAFETY: context bound above.
        check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })
    }

    /// Copy of `src` to `offset`; returns once the bytes are on the device.
    ///
    /// A "synchronous" `cuMemcpyHtoD` from pageable memory returns when the
    /// source is staged, before the DMA lands, hence the context sync (same
    /// reason as [`DeviceBuffer::memset`]).
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<(), CudaError> {
        self.bounds(offset, src.len())?;
        self.device.bind()?;
        // SAFETY: bounds checked above; src is a live slice.
        check("cuMemcpyHtoD", unsafe {
            sys::cuMemcpyHtoD_v2(
                self.ptr + offset as u64,
                src.as_ptr() as *const c_void,
                src.len(),
            )
        })?;
        // SAFETY: context bound above.
        check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })
    }

    /// Synchronous copy from `offset` into `dst`.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), CudaError> {
        self.bounds(offset, dst.len())?;
        self.device.bind()?;
        // SAFETY: bounds checked above; dst is a live, exclusive slice.
        check("cuMemcpyDtoH", unsafe {
            sys::cuMemcpyDtoH_v2(
                dst.as_mut_ptr() as *mut c_void,
                self.ptr + offset as u64,
                dst.len(),
            )
        })
    }

    fn bounds(&self, offset: usize, len: usize) -> Result<(), CudaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(CudaError::Unsupported(format!(
                "device buffer access {offset}+{len} past its {} bytes",
                self.len
            ))),
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by us, freed once. Callers synchronize work that
        // uses the buffer before dropping it (cuMemFree also waits for the
        // device in practice, but we do not rely on that).
        unsafe {
            let _ = self.device.bind();
            let _ = sys::cuMemFree_v2(self.ptr);
        }
    }
}

/// Asynchronous host-to-device copy of one contiguous range.
///
/// # Safety
/// `src..src+len` must be readable host memory and `dst..dst+len` writable
/// device memory of `device`, both alive until the copy completes on
/// `stream`.
pub unsafe fn memcpy_htod_async(
    device: &CudaDevice,
    dst: u64,
    src: *const u8,
    len: usize,
    stream: StreamRef,
) -> Result<(), CudaError> {
    device.bind()?;
    // SAFETY: the caller guarantees both ranges (see # Safety).
    check("cuMemcpyHtoDAsync", unsafe {
        sys::cuMemcpyHtoDAsync_v2(dst, src as *const c_void, len, stream.raw())
    })
}

/// Asynchronous device-to-host copy of one contiguous range.
///
/// # Safety
/// As [`memcpy_htod_async`], with the roles swapped.
pub unsafe fn memcpy_dtoh_async(
    device: &CudaDevice,
    dst: *mut u8,
    src: u64,
    len: usize,
    stream: StreamRef,
) -> Result<(), CudaError> {
    device.bind()?;
    // SAFETY: the caller guarantees both ranges (see # Safety).
    check("cuMemcpyDtoHAsync", unsafe {
        sys::cuMemcpyDtoHAsync_v2(dst as *mut c_void, src, len, stream.raw())
    })
}

/// Asynchronous copy between any two unified addresses (device to device,
/// also across GPUs with peer access).
///
/// # Safety
/// `src..src+len` readable and `dst..dst+len` writable until the copy
/// completes on `stream`.
pub unsafe fn memcpy_async(
    device: &CudaDevice,
    dst: u64,
    src: u64,
    len: usize,
    stream: StreamRef,
) -> Result<(), CudaError> {
    device.bind()?;
    // SAFETY: the caller guarantees both ranges (see # Safety).
    check("cuMemcpyAsync", unsafe {
        sys::cuMemcpyAsync(dst, src, len, stream.raw())
    })
}

pub(crate) fn raw_stream(s: StreamRef) -> sys::CUstream {
    s.raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        if driver_present() {
            eprintln!("SKIPPED: a CUDA driver is present; this test covers machines without one");
            return;
        }
        assert_eq!(CudaDevice::open(0).err(), Some(CudaError::NoDriver));
        assert_eq!(driver_version(), Err(CudaError::NoDriver));
        assert_eq!(device_count(), 0);
    }
}
