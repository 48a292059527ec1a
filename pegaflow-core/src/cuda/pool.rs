//! Registering the pool mapping with the driver (`cuMemHostRegister`).
//!
//! Registration pins every page of the mapping and maps it into the GPU's
//! address space: DMA engines can then copy to and from it at full PCIe
//! speed and the copy kernel can read and write it directly. It is done
//! once per process per mapping; on a 64 GiB pool it takes seconds on 4 KiB
//! pages (see docs/benchmarks-gpu.md), so [`register_pool_background`] runs
//! it on its own thread and the engine waits only when it first needs to
//! copy ([`PendingRegistration::wait`]).

use std::ffi::c_void;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::sys;

use pegaflow_shm::segment::PoolSegment;

use super::{check, CudaDevice, CudaError};

const CU_MEMHOSTREGISTER_PORTABLE: u32 = 1;
const CU_MEMHOSTREGISTER_DEVICEMAP: u32 = 2;

/// A registered host range; unregistered on drop (when this process did the
/// registering).
pub struct HostRegistration {
    base: usize,
    len: usize,
    device_ptr: u64,
    took: Duration,
    owned: bool,
    device: Arc<CudaDevice>,
    /// The mapping this registration covers, when the registration owns it
    /// ([`register_segment_background`]): dropped only after the range is
    /// unregistered, so registered memory is never unmapped first.
    mapping: Option<Arc<PoolSegment>>,
}

impl std::fmt::Debug for HostRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostRegistration")
            .field("base", &format_args!("{:#x}", self.base))
            .field("len", &self.len)
            .field("owned", &self.owned)
            .field("owns_mapping", &self.mapping.is_some())
            .finish()
    }
}

// SAFETY: holds addresses as integers and an Arc<CudaDevice> (Send+Sync);
// unregistering from another thread is allowed by the driver.
unsafe impl Send for HostRegistration {}
// SAFETY: as above; &self methods only read.
unsafe impl Sync for HostRegistration {}

impl HostRegistration {
    pub fn base(&self) -> usize {
        self.base
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The device address of `base` (equal to `base` where the device can
    /// use host pointers of registered memory, as on x86-64 Linux).
    pub fn device_ptr(&self) -> u64 {
        self.device_ptr
    }
    /// How long `cuMemHostRegister` took.
    pub fn took(&self) -> Duration {
        self.took
    }
    /// False when the range was already registered in this process (by
    /// another registration or another library) and is left registered on
    /// drop.
    pub fn owned(&self) -> bool {
        self.owned
    }
    /// True when `[addr, addr + len)` lies inside the registered range.
    pub fn contains(&self, addr: usize, len: usize) -> bool {
        addr >= self.base
            && addr
                .checked_add(len)
                .is_some_and(|e| e <= self.base + self.len)
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        // SAFETY: we registered exactly this base; the owner of the
        // registration keeps it alive while copies may use it.
        unsafe {
            let _ = self.device.bind();
            let _ = sys::cuMemHostUnregister(self.base as *mut c_void);
        }
    }
}

/// Registers `[base, base + len)` (portable + device-mapped), blocking.
///
/// # Safety
/// `[base, base + len)` must be a live mapping of this process that stays
/// mapped until the returned registration is dropped (unmapping registered
/// memory is undefined behaviour in the driver).
pub unsafe fn register_pool(
    device: &Arc<CudaDevice>,
    base: *mut u8,
    len: usize,
) -> Result<HostRegistration, CudaError> {
    device.bind()?;
    let t = Instant::now();
    // SAFETY: the caller guarantees the range is mapped (see # Safety).
    let r = unsafe {
        sys::cuMemHostRegister_v2(
            base as *mut c_void,
            len,
            CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP,
        )
    };
    let took = t.elapsed();
    let owned = if r == sys::CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED {
        // Registered earlier in this process (e.g. a second KvTransfer over
        // the same pool): usable, but not ours to unregister.
        false
    } else {
        check("cuMemHostRegister", r)?;
        true
    };
    let mut device_ptr: sys::CUdeviceptr = 0;
    // SAFETY: the range is registered now; device_ptr is a valid out-pointer.
    let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device_ptr, base as *mut c_void, 0) };
    let reg = HostRegistration {
        base: base as usize,
        len,
        device_ptr,
        took,
        owned,
        device: device.clone(),
        mapping: None,
    };
    check("cuMemHostGetDevicePointer", r)?;
    tracing::info!(
        base = format_args!("{:#x}", base as usize),
        len_gib = len as f64 / (1u64 << 30) as f64,
        took_ms = took.as_secs_f64() * 1e3,
        owned,
        "registered the pool mapping with CUDA"
    );
    Ok(reg)
}

type Slot = Mutex<Option<Result<Arc<HostRegistration>, CudaError>>>;

/// A registration running on a background thread.
#[derive(Clone, Debug)]
pub struct PendingRegistration {
    state: Arc<(Slot, Condvar)>,
}

impl PendingRegistration {
    /// Blocks until the registration finished; every caller gets the same
    /// result.
    pub fn wait(&self) -> Result<Arc<HostRegistration>, CudaError> {
        let (m, cv) = &*self.state;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        while g.is_none() {
            g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.as_ref().cloned().unwrap_or(Err(CudaError::Unsupported(
            "registration thread vanished".into(),
        )))
    }

    /// The result if the registration already finished.
    pub fn try_get(&self) -> Option<Result<Arc<HostRegistration>, CudaError>> {
        let (m, _) = &*self.state;
        m.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Starts [`register_pool`] on a new thread and returns at once.
///
/// # Safety
/// As [`register_pool`]: the mapping must stay mapped until the resulting
/// registration (and every clone of its `Arc`) is dropped.
pub unsafe fn register_pool_background(
    device: &Arc<CudaDevice>,
    base: *mut u8,
    len: usize,
) -> PendingRegistration {
    let state: Arc<(Slot, Condvar)> = Arc::new((Mutex::new(None), Condvar::new()));
    let pending = PendingRegistration {
        state: state.clone(),
    };
    let device = device.clone();
    let base_addr = base as usize;
    let spawn = std::thread::Builder::new()
        .name("pegaflow-register".into())
        .spawn(move || {
            // SAFETY: the caller of register_pool_background upholds
            // register_pool's contract for this range.
            let r = unsafe { register_pool(&device, base_addr as *mut u8, len) }.map(Arc::new);
            let (m, cv) = &*state;
            *m.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            cv.notify_all();
        });
    if let Err(e) = spawn {
        let (m, _) = &*pending.state;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = Some(Err(CudaError::Unsupported(format!(
            "cannot start the registration thread: {e}"
        ))));
    }
    pending
}

/// Registers a pool mapping on a background thread; the registration holds
/// the mapping, so it cannot be unmapped while registered however the
/// `Arc`s are dropped.
pub fn register_segment_background(
    device: &Arc<CudaDevice>,
    pool: Arc<PoolSegment>,
) -> PendingRegistration {
    let state: Arc<(Slot, Condvar)> = Arc::new((Mutex::new(None), Condvar::new()));
    let pending = PendingRegistration {
        state: state.clone(),
    };
    let device = device.clone();
    let spawn = std::thread::Builder::new()
        .name("pegaflow-register".into())
        .spawn(move || {
            // SAFETY: the range is `pool`'s mapping, which the registration
            // keeps alive (field `mapping`) until after it unregisters.
            let r = unsafe { register_pool(&device, pool.as_ptr(), pool.len()) }.map(|mut reg| {
                reg.mapping = Some(pool);
                Arc::new(reg)
            });
            let (m, cv) = &*state;
            *m.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            cv.notify_all();
        });
    if let Err(e) = spawn {
        let (m, _) = &*pending.state;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = Some(Err(CudaError::Unsupported(format!(
            "cannot start the registration thread: {e}"
        ))));
    }
    pending
}
