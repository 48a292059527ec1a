//! `KvCache`: one engine's KV cache bound to the owner's pool.
//!
//! Saves are split in three so a connector can copy layer by layer while
//! the forward pass runs, and commit only after the copies completed:
//!
//! ```text
//!   h = begin_save(gpu_blocks, hashes)   reserve slots (fewer under pressure)
//!   save_layers(h, l, l + 1, stream)     copy layer l of those blocks (per layer)
//!   end_save(h)                          no more layers for h
//!   poll_saves(wait)                     commit every ended save whose copies completed
//! ```
//!
//! Loads copy from blocks the scheduler pinned (`Engine.lookup`), named by
//! the segment and `(slot, generation)` they were pinned in:
//!
//! ```text
//!   h = load(segment_id, blocks, gpu_blocks)   check every block, queue the copies
//!   poll_loads(wait)                           [(h, failed_gpu_blocks)] once copied
//! ```
//!
//! A block is copied only if this engine is connected to that segment and
//! the slot still holds that generation, and it is checked again once the
//! copy completed: a block that changed is reported as failed (vLLM then
//! recomputes it), never handed over as loaded.
//!
//! Nothing here waits on the inference path: a pool whose CUDA
//! registration is still running makes loads fail fast and saves skip.
//!
//! Invariants: a reserved slot is committed only after `save_done` (its
//! bytes are complete) and aborted only after it (no copy still writes it);
//! the torch tensors behind the layout are kept alive by `keepalive`; the
//! pool mapping is kept alive by its CUDA registration.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use pegaflow_core::copy::{make_backend, CopyBackend, CopyBackendKind, LoadCalibration};
use pegaflow_core::cuda::ipc::{copy_peer_blocks, ImportedKv, PeerDirection, PeerExport};
use pegaflow_core::cuda::{
    register_segment_background, CudaDevice, HostRegistration, PendingRegistration, StreamRef,
};
use pegaflow_core::layout::{
    namespace_fingerprint as core_fingerprint, KvKind, KvLayout, PieceOrder,
};
use pegaflow_core::transfer::KvTransfer;
use pegaflow_core::{BlockKey, Engine, EngineConfig, Reservation};
use pegaflow_shm::segment::PoolSegment;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{
    copy_err, engine_err, transfer_err, ConfigError, LayoutError, OwnerUnavailable, TransferError,
};
use crate::{to_hashes, PyEngine};

fn parse_kind(s: &str) -> PyResult<KvKind> {
    match s.to_ascii_lowercase().as_str() {
        "split_kv" | "split" => Ok(KvKind::SplitKv),
        "mla" => Ok(KvKind::Mla),
        "cross_layer" => Ok(KvKind::CrossLayer),
        _ => Err(LayoutError::new_err(format!(
            "unknown KV kind {s:?}; expected split_kv, mla or cross_layer"
        ))),
    }
}

fn parse_order(s: &str) -> PyResult<PieceOrder> {
    match s.to_ascii_lowercase().as_str() {
        "nhd" => Ok(PieceOrder::Nhd),
        "hnd" => Ok(PieceOrder::Hnd),
        "opaque" => Ok(PieceOrder::Opaque),
        _ => Err(LayoutError::new_err(format!(
            "unknown piece order {s:?}; expected nhd, hnd or opaque"
        ))),
    }
}

/// The namespace a KV cache of this shape saves into; computable without
/// the tensors (the scheduler has none). Same inputs as `KvCache`.
#[pyfunction]
#[pyo3(signature = (*, model, dtype, kind, order, num_layers, num_segments, piece_bytes, block_tokens, dtype_size, tp_size, tp_rank))]
#[allow(clippy::too_many_arguments)]
pub fn namespace_fingerprint(
    model: &str,
    dtype: &str,
    kind: &str,
    order: &str,
    num_layers: usize,
    num_segments: usize,
    piece_bytes: usize,
    block_tokens: usize,
    dtype_size: usize,
    tp_size: u32,
    tp_rank: Option<u32>,
) -> PyResult<u64> {
    let l = KvLayout {
        kind: parse_kind(kind)?,
        order: parse_order(order)?,
        segment_bases: vec![0; num_segments],
        num_layers,
        num_blocks: 1,
        block_tokens,
        block_stride: piece_bytes,
        kv_stride: 0,
        piece_bytes,
        dtype_size,
    };
    Ok(fingerprint(model, dtype, &l, tp_size, tp_rank))
}

fn fingerprint(model: &str, dtype: &str, l: &KvLayout, tp_size: u32, tp_rank: Option<u32>) -> u64 {
    // 0 means "no namespace" to the engine client; remap the 2^-64 case.
    match core_fingerprint(model, dtype, l, tp_size, tp_rank) {
        0 => 1,
        v => v,
    }
}

/// A pool mapping and its CUDA registration (which owns the mapping too,
/// so dropping these in any order never unmaps registered memory).
struct PoolBinding {
    reg: Option<Arc<HostRegistration>>,
    pending: Option<PendingRegistration>,
    pool: Arc<PoolSegment>,
}

struct PendingLoad {
    segment_id: u64,
    blocks: Vec<(u32, u32)>,
    gpu_blocks: Vec<u32>,
    bytes: u64,
    started: Instant,
}

struct PendingSave {
    /// Shared by the saves of one step; slots `first..first + keys.len()`
    /// are this save's. Slots never committed are aborted when the last
    /// save holding it is gone.
    reservation: Arc<Reservation>,
    first: usize,
    keys: Vec<BlockKey>,
    gpu_blocks: Vec<u32>,
    slots: Vec<usize>,
    ended: bool,
    started: Instant,
}

struct State {
    transfer: KvTransfer,
    binding: Option<PoolBinding>,
    saves: BTreeMap<u64, PendingSave>,
    loads: BTreeMap<u64, PendingLoad>,
    next_handle: u64,
    /// Other engines' caches mapped for peer copies (`pull_peer`), by the
    /// key they were published under; most recent last.
    peers: Vec<(String, ImportedKv)>,
    /// The load backend's calibration: None until the first save, then
    /// what it measured (None inside when there was nothing to choose).
    calibration: Option<Option<LoadCalibration>>,
}

/// Peer caches kept mapped at once (one per prefill instance and rank; a
/// restarted one publishes under a new key).
const MAX_PEERS: usize = 16;

#[pyclass(name = "KvCache", module = "pegaflow._native", frozen)]
pub struct PyKvCache {
    engine: Py<PyEngine>,
    core: Engine,
    layout: KvLayout,
    backend: Arc<dyn CopyBackend>,
    device: Option<Arc<CudaDevice>>,
    namespace: u64,
    state: Mutex<State>,
    _keepalive: Option<Py<PyAny>>,
}

impl PyKvCache {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes sure GPU copies target the current pool mapping, registered
    /// with CUDA. Returns false when they cannot run now: the owner is
    /// away, the registration is still running, or copies into an earlier
    /// mapping are still in flight. Never waits.
    fn ensure_pool(&self, st: &mut State) -> PyResult<bool> {
        let Some(device) = &self.device else {
            return Ok(self.core.is_connected());
        };
        let Some(pool) = self.core.pool() else {
            return Ok(false);
        };
        let same = st
            .binding
            .as_ref()
            .is_some_and(|b| Arc::ptr_eq(&b.pool, &pool));
        if !same {
            // The owner came back on another segment. Copies queued against
            // the old mapping must finish before its registration goes.
            if st.binding.is_some()
                && !(st.transfer.save_done(false).unwrap_or(false)
                    && st.transfer.loads_done(false).unwrap_or(false))
            {
                return Ok(false);
            }
            st.binding = Some(PoolBinding {
                reg: None,
                pending: Some(register_segment_background(device, pool.clone())),
                pool,
            });
        }
        let b = st.binding.as_mut().expect("binding set above");
        if b.reg.is_none() {
            let pending = b.pending.as_ref().expect("pending until registered");
            match pending.try_get() {
                None => return Ok(false),
                Some(Err(e)) => {
                    st.binding = None;
                    return Err(TransferError::new_err(format!(
                        "registering the pool with CUDA failed: {e}"
                    )));
                }
                Some(Ok(reg)) => {
                    b.reg = Some(reg.clone());
                    b.pending = None;
                    st.transfer = KvTransfer::new(
                        self.layout.clone(),
                        self.backend.clone(),
                        self.device.clone(),
                    )
                    .map_err(transfer_err)?
                    .with_pool(reg);
                }
            }
        }
        Ok(true)
    }

    /// Times the pool-to-GPU backends once, at the first save: the end of a
    /// real forward pass (never a CUDA graph capture, which a concurrent
    /// allocation would break), the GPU quiet, the pool registered.
    fn calibrate_loads(&self, st: &mut State) {
        let (Some(auto), Some(device), Some(reg)) = (
            self.backend.auto(),
            self.device.as_ref(),
            st.binding.as_ref().and_then(|b| b.reg.clone()),
        ) else {
            st.calibration = Some(None);
            return;
        };
        st.calibration = Some(
            match auto.calibrate_loads(device, &reg, self.layout.piece_bytes) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "could not time the load backends; loads use batched DMA");
                    None
                }
            },
        );
    }

    /// Loads whose copies completed, each with the GPU blocks that failed
    /// the check after the copy.
    fn finished_loads(&self, st: &mut State, wait: bool) -> PyResult<Vec<(u64, Vec<u32>)>> {
        if st.loads.is_empty() || !st.transfer.loads_done(wait).map_err(transfer_err)? {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(st.loads.len());
        for (h, ld) in std::mem::take(&mut st.loads) {
            let failed: Vec<u32> = ld
                .blocks
                .iter()
                .zip(&ld.gpu_blocks)
                .filter(|((slot, gen), _)| !self.core.still_committed(ld.segment_id, *slot, *gen))
                .map(|(_, &g)| g)
                .collect();
            let good = (ld.blocks.len() - failed.len()) as u64;
            let per = ld.bytes / ld.blocks.len().max(1) as u64;
            self.core
                .note_loaded(good, good * per, ld.started.elapsed());
            out.push((h, failed));
        }
        Ok(out)
    }

    fn begin_saves_locked(
        &self,
        st: &mut State,
        saves: Vec<(Vec<u32>, Vec<[u8; 32]>)>,
    ) -> PyResult<Vec<(u64, usize)>> {
        for (gpu_blocks, hashes) in &saves {
            if gpu_blocks.len() != hashes.len() {
                return Err(ConfigError::new_err(format!(
                    "begin_save: {} blocks but {} hashes",
                    gpu_blocks.len(),
                    hashes.len()
                )));
            }
            if let Some(&b) = gpu_blocks
                .iter()
                .find(|&&b| b as usize >= self.layout.num_blocks)
            {
                return Err(ConfigError::new_err(format!(
                    "begin_save: block id {b} out of range (the cache has {} blocks)",
                    self.layout.num_blocks
                )));
            }
        }
        let total: usize = saves.iter().map(|(b, _)| b.len()).sum();
        if total == 0 || !self.ensure_pool(st)? {
            // Owner away or pool not registered yet: skipped, and counted.
            self.core.note_skipped(total as u64);
            return Ok(saves.iter().map(|_| (0, 0)).collect());
        }
        if st.calibration.is_none() {
            self.calibrate_loads(st);
        }
        let need = self.layout.slot_bytes();
        let r = self.core.reserve(total);
        let mut addrs = Vec::with_capacity(r.len());
        for i in 0..r.len() {
            match r.slot(i) {
                Some((p, cap)) if cap >= need => addrs.push(p as usize),
                other => {
                    // `r` aborts its slots when dropped.
                    return Err(TransferError::new_err(format!(
                        "reserved slot {i} is unusable ({:?} bytes, need {need}); was the owner \
                         restarted with another geometry?",
                        other.map(|o| o.1)
                    )));
                }
            }
        }
        // Hand the reserved slots out in order: the first saves get theirs.
        let r = Arc::new(r);
        let mut out = Vec::with_capacity(saves.len());
        let mut at = 0;
        for (gpu_blocks, hashes) in saves {
            let n = gpu_blocks.len().min(addrs.len() - at);
            if n == 0 {
                out.push((0, 0));
                continue;
            }
            let h = st.next_handle;
            st.next_handle += 1;
            st.saves.insert(
                h,
                PendingSave {
                    keys: hashes[..n]
                        .iter()
                        .map(|k| BlockKey::new(self.namespace, *k))
                        .collect(),
                    gpu_blocks: gpu_blocks[..n].to_vec(),
                    slots: addrs[at..at + n].to_vec(),
                    first: at,
                    reservation: r.clone(),
                    ended: false,
                    started: Instant::now(),
                },
            );
            at += n;
            out.push((h, n));
        }
        Ok(out)
    }

    fn segments(&self, start: usize, end: Option<usize>) -> PyResult<std::ops::Range<usize>> {
        let n = self.layout.num_segments();
        let end = end.unwrap_or(n);
        if start > end || end > n {
            return Err(ConfigError::new_err(format!(
                "layer range {start}..{end} out of range (the cache has {n} segments)"
            )));
        }
        Ok(start..end)
    }

    fn commit_done(&self, st: &mut State, wait: bool) -> PyResult<Vec<(u64, usize)>> {
        if !st.saves.values().any(|s| s.ended) {
            return Ok(Vec::new());
        }
        if !st.transfer.save_done(wait).map_err(transfer_err)? {
            return Ok(Vec::new());
        }
        let ended: Vec<u64> = st
            .saves
            .iter()
            .filter(|(_, s)| s.ended)
            .map(|(h, _)| *h)
            .collect();
        let len = self.layout.slot_bytes() as u64;
        let mut out = Vec::with_capacity(ended.len());
        for h in ended {
            let s = st.saves.remove(&h).expect("listed above");
            let items: Vec<_> = s
                .keys
                .iter()
                .enumerate()
                .map(|(i, k)| (s.first + i, *k, len))
                .collect();
            let n = self.core.commit_many(&s.reservation, &items);
            self.core
                .note_save(len * s.keys.len() as u64, s.started.elapsed());
            out.push((h, n));
        }
        Ok(out)
    }
}

#[pymethods]
impl PyKvCache {
    /// See `pegaflow/_native.pyi`.
    #[new]
    #[pyo3(signature = (*, kind, order, segment_bases, num_layers, num_blocks, block_tokens, block_stride, kv_stride, piece_bytes, dtype_size, model, dtype, tp_size=1, tp_rank=None, namespace=None, name=None, socket=None, label=String::new(), backend="auto", device=None, keepalive=None, reserve_wait=0.002))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        kind: &str,
        order: &str,
        segment_bases: Vec<u64>,
        num_layers: usize,
        num_blocks: usize,
        block_tokens: usize,
        block_stride: usize,
        kv_stride: usize,
        piece_bytes: usize,
        dtype_size: usize,
        model: &str,
        dtype: &str,
        tp_size: u32,
        tp_rank: Option<u32>,
        namespace: Option<u64>,
        name: Option<String>,
        socket: Option<std::path::PathBuf>,
        label: String,
        backend: &str,
        device: Option<i32>,
        keepalive: Option<Py<PyAny>>,
        reserve_wait: f64,
    ) -> PyResult<Self> {
        if !(reserve_wait.is_finite() && (0.0..=10.0).contains(&reserve_wait)) {
            return Err(ConfigError::new_err(format!(
                "reserve_wait must be between 0 and 10 seconds, got {reserve_wait}"
            )));
        }
        let layout = KvLayout {
            kind: parse_kind(kind)?,
            order: parse_order(order)?,
            segment_bases,
            num_layers,
            num_blocks,
            block_tokens,
            block_stride,
            kv_stride,
            piece_bytes,
            dtype_size,
        };
        layout.validate().map_err(crate::errors::layout_err)?;
        let kind_b: CopyBackendKind = backend.parse().map_err(copy_err)?;
        let device = match device {
            None => None,
            Some(ord) => Some(
                py.detach(|| CudaDevice::open(ord))
                    .map_err(|e| TransferError::new_err(format!("CUDA device {ord}: {e}")))?,
            ),
        };
        let backend = make_backend(kind_b, device.as_ref()).map_err(copy_err)?;
        let transfer = KvTransfer::new(layout.clone(), backend.clone(), device.clone())
            .map_err(transfer_err)?;
        // An explicit namespace wins: the vLLM scheduler, which has no
        // tensors, computes it from the config and the workers must agree.
        let namespace = match namespace {
            Some(0) => {
                return Err(ConfigError::new_err(
                    "namespace 0 is reserved (no namespace)",
                ))
            }
            Some(ns) => ns,
            None => fingerprint(model, dtype, &layout, tp_size, tp_rank),
        };
        let mut cfg = EngineConfig::default();
        if let Some(n) = name {
            cfg.name = n;
        }
        if socket.is_some() {
            cfg.socket = socket;
        }
        cfg.label = label;
        cfg.namespace = namespace;
        cfg.slot_bytes = layout.slot_bytes() as u64;
        cfg.reserve_wait = std::time::Duration::from_secs_f64(reserve_wait);
        let core = py.detach(|| Engine::connect(cfg)).map_err(engine_err)?;
        let engine = Py::new(
            py,
            PyEngine {
                inner: core.clone(),
            },
        )?;
        let this = PyKvCache {
            engine,
            core,
            layout,
            backend,
            device,
            namespace,
            state: Mutex::new(State {
                transfer,
                binding: None,
                saves: BTreeMap::new(),
                loads: BTreeMap::new(),
                next_handle: 1,
                peers: Vec::new(),
                calibration: None,
            }),
            _keepalive: keepalive,
        };
        if this.device.is_some() {
            // Start the (slow) CUDA registration now, not at the first copy.
            let mut st = this.lock();
            let _ = this.ensure_pool(&mut st);
        }
        Ok(this)
    }

    #[getter]
    fn engine(&self, py: Python<'_>) -> Py<PyEngine> {
        self.engine.clone_ref(py)
    }

    #[getter]
    fn namespace(&self) -> u64 {
        self.namespace
    }

    #[getter]
    fn slot_bytes(&self) -> usize {
        self.layout.slot_bytes()
    }

    #[getter]
    fn num_segments(&self) -> usize {
        self.layout.num_segments()
    }

    #[getter]
    fn num_blocks(&self) -> usize {
        self.layout.num_blocks
    }

    #[getter]
    fn backend(&self) -> &'static str {
        self.backend.name()
    }

    /// See `pegaflow/_native.pyi`.
    #[getter]
    fn load_calibration<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(Some(c)) = self.lock().calibration else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item("piece_bytes", c.piece)?;
        d.set_item("bytes", c.bytes)?;
        d.set_item("dma_gbps", c.dma_gbps)?;
        d.set_item("kernel_gbps", c.kernel_gbps)?;
        d.set_item("chosen", c.chosen.to_string())?;
        Ok(Some(d))
    }

    /// Reserves slots for saving `gpu_blocks[i]` under `hashes[i]`. Returns
    /// `(handle, n)`: the first `n` blocks will be saved (fewer than asked
    /// under pool pressure, 0 while the owner is away or the pool is not
    /// registered yet: those are dropped). Waits at most the engine's
    /// `reserve_wait`, without the GIL, and only when its stash is short.
    fn begin_save(
        &self,
        py: Python<'_>,
        gpu_blocks: Vec<u32>,
        hashes: Vec<Vec<u8>>,
    ) -> PyResult<(u64, usize)> {
        let hashes = to_hashes(&hashes)?;
        py.detach(|| {
            let mut st = self.lock();
            let mut out = self.begin_saves_locked(&mut st, vec![(gpu_blocks, hashes)])?;
            Ok(out.pop().unwrap_or((0, 0)))
        })
    }

    /// Say that `blocks` blocks will be saved by this step (call it when
    /// the step starts): the owner fills this engine's stash meanwhile,
    /// evicting if the pool is full, so `begin_saves` at the end of the
    /// forward pass finds its slots instead of dropping what its short wait
    /// cannot cover. Never waits.
    fn prepare_saves(&self, blocks: usize) {
        self.core.prepare_reserve(blocks);
    }

    /// [`begin_save`] for several saves at once (one step's): one
    /// reservation, so one bounded wait at most for the whole step.
    /// Returns `[(handle, n)]` in order.
    fn begin_saves(
        &self,
        py: Python<'_>,
        saves: Vec<(Vec<u32>, Vec<Vec<u8>>)>,
    ) -> PyResult<Vec<(u64, usize)>> {
        let saves = saves
            .into_iter()
            .map(|(b, h)| Ok((b, to_hashes(&h)?)))
            .collect::<PyResult<Vec<_>>>()?;
        py.detach(|| {
            let mut st = self.lock();
            self.begin_saves_locked(&mut st, saves)
        })
    }

    /// Copies layers `start..end` of the blocks of save `handle` (queued on
    /// `stream` for GPU backends, done at once for the host backend).
    #[pyo3(signature = (handle, start=0, end=None, stream=0))]
    fn save_layers(
        &self,
        py: Python<'_>,
        handle: u64,
        start: usize,
        end: Option<usize>,
        stream: u64,
    ) -> PyResult<()> {
        let range = self.segments(start, end)?;
        py.detach(|| {
            let mut st = self.lock();
            let st = &mut *st;
            let Some(s) = st.saves.get(&handle) else {
                return Err(ConfigError::new_err(format!(
                    "unknown save handle {handle}"
                )));
            };
            if s.ended {
                return Err(ConfigError::new_err(format!("save {handle} already ended")));
            }
            // SAFETY: the slots come from this engine's reservation (ours to
            // write until commit/abort, which wait for save_done); the KV
            // tensors are kept alive by `keepalive` for our lifetime; block
            // ids were range-checked in begin_save.
            unsafe {
                st.transfer
                    .save(range, &s.gpu_blocks, &s.slots, StreamRef(stream))
            }
            .map_err(transfer_err)
        })
    }

    /// No more layers for `handle`; it commits at the next `poll_saves`
    /// after its copies completed.
    fn end_save(&self, handle: u64) -> PyResult<()> {
        let mut st = self.lock();
        match st.saves.get_mut(&handle) {
            Some(s) => {
                s.ended = true;
                Ok(())
            }
            None => Err(ConfigError::new_err(format!(
                "unknown save handle {handle}"
            ))),
        }
    }

    /// Commits ended saves whose copies completed (with `wait`, waits for
    /// them). Returns `[(handle, committed_blocks)]`.
    #[pyo3(signature = (wait=false))]
    fn poll_saves(&self, py: Python<'_>, wait: bool) -> PyResult<Vec<(u64, usize)>> {
        py.detach(|| {
            let mut st = self.lock();
            self.commit_done(&mut st, wait)
        })
    }

    /// Gives the slots of `handle` back uncommitted (after any copy into
    /// them completed).
    fn abort_save(&self, py: Python<'_>, handle: u64) -> PyResult<()> {
        py.detach(|| {
            let mut st = self.lock();
            let Some(s) = st.saves.remove(&handle) else {
                return Ok(());
            };
            // No copy may still write the slots we give back.
            let _ = st.transfer.save_done(true);
            for i in 0..s.keys.len() {
                self.core.abort(&s.reservation, s.first + i);
            }
            Ok(())
        })
    }

    /// Saves in flight (not yet committed or aborted).
    fn pending_saves(&self) -> usize {
        self.lock().saves.len()
    }

    /// One-shot save of every layer; returns the number of blocks committed.
    #[pyo3(signature = (gpu_blocks, hashes, stream=0))]
    fn save(
        &self,
        py: Python<'_>,
        gpu_blocks: Vec<u32>,
        hashes: Vec<Vec<u8>>,
        stream: u64,
    ) -> PyResult<usize> {
        let (h, n) = self.begin_save(py, gpu_blocks, hashes)?;
        if n == 0 {
            return Ok(0);
        }
        if let Err(e) = self.save_layers(py, h, 0, None, stream) {
            self.abort_save(py, h)?;
            return Err(e);
        }
        self.end_save(h)?;
        let done = self.poll_saves(py, true)?;
        Ok(done.iter().find(|(x, _)| *x == h).map_or(0, |d| d.1))
    }

    /// Copies layers `start..end` of the blocks pinned in segment
    /// `segment_id` (`blocks[i] = (slot, generation)`, as `Pins.blocks()`
    /// gives them) into `gpu_blocks[i]`. Returns a handle that
    /// `poll_loads` reports once the copies completed, with the blocks that
    /// failed the check after the copy. Raises OwnerUnavailable, having
    /// copied nothing, when a block cannot be loaded now: the owner is away
    /// or serves another segment, a block is no longer the one pinned, or
    /// the pool's CUDA registration is still running (report the blocks as
    /// failed; vLLM recomputes them).
    #[pyo3(signature = (segment_id, blocks, gpu_blocks, start=0, end=None, stream=0))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        &self,
        py: Python<'_>,
        segment_id: u64,
        blocks: Vec<(u32, u32)>,
        gpu_blocks: Vec<u32>,
        start: usize,
        end: Option<usize>,
        stream: u64,
    ) -> PyResult<u64> {
        let range = self.segments(start, end)?;
        if blocks.len() != gpu_blocks.len() {
            return Err(ConfigError::new_err(format!(
                "load: {} blocks but {} GPU blocks",
                blocks.len(),
                gpu_blocks.len()
            )));
        }
        py.detach(|| {
            let mut st = self.lock();
            if !self.ensure_pool(&mut st)? {
                return Err(OwnerUnavailable::new_err(
                    "the pool is not usable yet (owner away, or its CUDA registration is still \
                     running); nothing loaded",
                ));
            }
            let need = self.layout.slot_bytes();
            let mut addrs = Vec::with_capacity(blocks.len());
            for &(slot, gen) in &blocks {
                match self.core.pinned_block(segment_id, slot, gen) {
                    Some((p, len)) if len >= need => addrs.push(p as usize),
                    Some((_, len)) => {
                        return Err(TransferError::new_err(format!(
                            "slot {slot} holds {len} bytes but a block of this cache is {need}"
                        )))
                    }
                    None => {
                        return Err(OwnerUnavailable::new_err(format!(
                            "slot {slot} (generation {gen}) of segment {segment_id:#x} is not the \
                             block that was pinned any more (owner restarted or the pool changed); \
                             nothing loaded"
                        )))
                    }
                }
            }
            // SAFETY: every address is a committed block of the current pool
            // mapping (checked just above), pinned by the scheduler until
            // it releases it after this load is reported finished; the KV
            // tensors are kept alive by `keepalive`; block ids are
            // range-checked by the plan.
            unsafe {
                st.transfer
                    .load(range.clone(), &gpu_blocks, &addrs, StreamRef(stream))
            }
            .map_err(transfer_err)?;
            let h = st.next_handle;
            st.next_handle += 1;
            let bytes =
                (blocks.len() * need * range.len() / self.layout.num_segments().max(1)) as u64;
            st.loads.insert(
                h,
                PendingLoad {
                    segment_id,
                    blocks,
                    gpu_blocks,
                    bytes,
                    started: Instant::now(),
                },
            );
            Ok(h)
        })
    }

    /// This cache's GPU memory, exported for another engine of the node to
    /// copy blocks out of (`pull_peer` there): bytes to publish with
    /// `Engine.publish_ipc`. Fails on a host cache, and on memory CUDA
    /// cannot export (PyTorch's expandable segments).
    fn export_peer<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let Some(device) = &self.device else {
            return Err(TransferError::new_err(
                "export_peer: this KV cache is in host memory; only GPU caches can be exported",
            ));
        };
        let e = py
            .detach(|| PeerExport::new(device, &self.layout))
            .map_err(|e| {
                TransferError::new_err(format!("exporting the KV cache for peer copies: {e}"))
            })?;
        Ok(pyo3::types::PyBytes::new(py, &e.encode()))
    }

    /// Copies blocks of another engine's cache into this one's on `stream`:
    /// `pairs[i] = (local_block, peer_block)`, every layer. `export`: what
    /// that engine published (`export_peer`), mapped on first use and kept
    /// under `key`. Returns at once, with what copies: `"dma"` (the copy
    /// engines, for long runs of blocks) or `"kernel"` (the copy kernel,
    /// for blocks scattered on either side); record an event on `stream`
    /// to know when the copies are done.
    ///
    /// The caller guarantees the peer blocks are not rewritten until then
    /// (the P/D hold table) and that nothing else writes the local blocks.
    #[pyo3(signature = (key, export, pairs, stream=0))]
    fn pull_peer(
        &self,
        py: Python<'_>,
        key: &str,
        export: &[u8],
        pairs: Vec<(u32, u32)>,
        stream: u64,
    ) -> PyResult<&'static str> {
        let Some(device) = &self.device else {
            return Err(TransferError::new_err(
                "pull_peer: this KV cache is in host memory; peer copies need a GPU cache",
            ));
        };
        py.detach(|| {
            let mut st = self.lock();
            let i = match st.peers.iter().position(|(k, _)| k == key) {
                Some(i) => i,
                None => {
                    let pe = PeerExport::decode(export)
                        .map_err(|e| TransferError::new_err(format!("peer export {key:?}: {e}")))?;
                    if let Some(why) = pe.incompatible_with(&self.layout) {
                        return Err(LayoutError::new_err(format!(
                            "peer {key:?} has another KV layout ({why}); both instances must \
                             serve the same model with the same dtype, attention backend and TP"
                        )));
                    }
                    let imported = ImportedKv::open(device, &pe.kv, &pe.layout).map_err(|e| {
                        TransferError::new_err(format!(
                            "mapping peer {key:?}'s KV cache: {e} (another node, no peer access \
                             between the GPUs, or an instance that exited)"
                        ))
                    })?;
                    if st.peers.len() >= MAX_PEERS {
                        // The oldest mapping goes; no copy may still use it.
                        device
                            .synchronize()
                            .map_err(|e| TransferError::new_err(e.to_string()))?;
                        st.peers.remove(0);
                    }
                    st.peers.push((key.to_string(), imported));
                    st.peers.len() - 1
                }
            };
            let remote = st.peers[i].1.layout();
            // SAFETY: the local layout describes live tensors kept alive by
            // `keepalive`; the peer's is mapped by the ImportedKv kept in
            // `peers` (dropped only after a device synchronize); block ids
            // are range-checked by copy_peer_blocks; the caller guarantees
            // (docs above) nobody rewrites either side until the copies end.
            unsafe {
                copy_peer_blocks(
                    device,
                    &self.layout,
                    remote,
                    &pairs,
                    0..self.layout.num_segments(),
                    PeerDirection::Pull,
                    self.backend.kernel(),
                    StreamRef(stream),
                )
            }
            .map(|used| match used {
                CopyBackendKind::Kernel => "kernel",
                _ => "dma",
            })
            .map_err(|e| TransferError::new_err(format!("peer copy from {key:?}: {e}")))
        })
    }

    /// Peer caches mapped now (`pull_peer`).
    fn peers_mapped(&self) -> usize {
        self.lock().peers.len()
    }

    /// Loads whose copies completed (with `wait`, waits for all of them):
    /// `[(handle, failed_gpu_blocks)]`. A failed block was copied from a
    /// slot that changed under the copy: treat it as not loaded.
    #[pyo3(signature = (wait=false))]
    fn poll_loads(&self, py: Python<'_>, wait: bool) -> PyResult<Vec<(u64, Vec<u32>)>> {
        py.detach(|| {
            let mut st = self.lock();
            self.finished_loads(&mut st, wait)
        })
    }

    /// Loads in flight (not yet reported by `poll_loads`).
    fn pending_loads(&self) -> usize {
        self.lock().loads.len()
    }

    /// Makes `stream` (the forward pass's) wait on the GPU until the loads
    /// of `layer` arrived; the host does not block. Layer-wise loading:
    /// call it before the layer's attention reads its KV.
    #[pyo3(signature = (layer, stream=0))]
    fn stream_wait_layer(&self, layer: usize, stream: u64) -> PyResult<()> {
        self.lock()
            .transfer
            .stream_wait_layer(layer, StreamRef(stream))
            .map_err(transfer_err)
    }

    /// Makes `stream` wait on the GPU for every save queued so far (saves
    /// run on their own stream): call it before a step's compute, so no
    /// block is rewritten while a save still reads it.
    #[pyo3(signature = (stream=0))]
    fn fence_saves(&self, stream: u64) -> PyResult<()> {
        self.lock()
            .transfer
            .stream_wait_saves(StreamRef(stream))
            .map_err(transfer_err)
    }

    /// Blocks until the loads of `layer` arrived.
    fn wait_layer(&self, py: Python<'_>, layer: usize) -> PyResult<()> {
        py.detach(|| self.lock().transfer.wait_layer(layer).map_err(transfer_err))
    }

    /// True once the loads of `layer` arrived.
    fn layer_ready(&self, layer: usize) -> PyResult<bool> {
        self.lock()
            .transfer
            .layer_ready(layer)
            .map_err(transfer_err)
    }

    fn __repr__(&self) -> String {
        format!(
            "KvCache(kind={:?}, layers={}, blocks={}, slot_bytes={}, namespace={:#018x}, backend={})",
            self.layout.kind,
            self.layout.num_layers,
            self.layout.num_blocks,
            self.layout.slot_bytes(),
            self.namespace,
            self.backend.name()
        )
    }
}

impl Drop for PyKvCache {
    /// Copies into reserved slots or out of pinned ones may still run on the
    /// GPU: wait for them before the reservations are aborted and the
    /// registration goes.
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = st.transfer.save_done(true);
        let _ = st.transfer.loads_done(true);
        st.saves.clear();
        st.loads.clear();
    }
}
