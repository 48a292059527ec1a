//! `pegaflow._native`: the PyO3 layer over pegaflow-core.
//!
//! Deliberately thin: two classes mirror the core API one to one.
//!
//! * [`PyEngine`] (`Engine`): the owner client (lookups, pins, releases,
//!   stats). Never raises because the owner is away: lookups miss.
//! * [`PyPins`] (`Pins`): the blocks one lookup pinned, in the segment it
//!   pinned them in; released through it (or when it is collected), never
//!   by bare slot ids.
//! * [`PyKvCache`] (`KvCache`): an engine's KV cache described as a
//!   [`KvLayout`] plus a copy backend; layer-wise saves (reserve, copy,
//!   commit after the copy completed) and loads from pinned slots.
//!
//! Everything that can wait (connecting, waiting for a copy or a layer,
//! CUDA registration) runs with the GIL released (`Python::detach`).
//! Errors become the exception classes of `pegaflow.exceptions`.

mod errors;
mod handover;
mod kv_cache;

use std::path::PathBuf;
use std::time::Duration;

use pegaflow_core::{Engine, EngineConfig, Pinned, StageTicket};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use errors::{engine_err, ConfigError};

/// A block hash as the owner keys it: up to 32 bytes, zero-padded.
pub(crate) fn to_hash(b: &[u8]) -> PyResult<[u8; 32]> {
    if b.len() > 32 {
        return Err(ConfigError::new_err(format!(
            "block hash of {} bytes; at most 32 are supported (vLLM's sha256 block hashes are 32)",
            b.len()
        )));
    }
    let mut h = [0u8; 32];
    h[..b.len()].copy_from_slice(b);
    Ok(h)
}

pub(crate) fn to_hashes(v: &[Vec<u8>]) -> PyResult<Vec<[u8; 32]>> {
    v.iter().map(|b| to_hash(b)).collect()
}

/// Connection to a `pegaflow-owner` (see `pegaflow._native.pyi`).
#[pyclass(name = "Engine", module = "pegaflow._native", frozen, weakref)]
pub struct PyEngine {
    pub(crate) inner: Engine,
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (name=None, socket=None, namespace=0, slot_bytes=0, label=String::new(), reconnect_interval=0.2))]
    fn new(
        py: Python<'_>,
        name: Option<String>,
        socket: Option<PathBuf>,
        namespace: u64,
        slot_bytes: u64,
        label: String,
        reconnect_interval: f64,
    ) -> PyResult<Self> {
        init_logging();
        let mut cfg = EngineConfig::default();
        if let Some(n) = name {
            cfg.name = n;
        }
        if socket.is_some() {
            cfg.socket = socket;
        }
        cfg.namespace = namespace;
        cfg.slot_bytes = slot_bytes;
        cfg.label = label;
        if !(reconnect_interval.is_finite() && reconnect_interval > 0.0) {
            return Err(ConfigError::new_err(format!(
                "reconnect_interval must be a positive number of seconds, got {reconnect_interval}"
            )));
        }
        cfg.reconnect_interval = Duration::from_secs_f64(reconnect_interval);
        let inner = py.detach(|| Engine::connect(cfg)).map_err(engine_err)?;
        Ok(PyEngine { inner })
    }

    /// True while a live session with the owner exists.
    fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }

    /// Waits up to `timeout` seconds for a session; returns whether one exists.
    fn wait_connected(&self, py: Python<'_>, timeout: f64) -> bool {
        let t = Duration::from_secs_f64(timeout.max(0.0));
        let e = self.inner.clone();
        py.detach(move || e.wait_connected(t))
    }

    #[getter]
    fn name(&self) -> String {
        self.inner.config().name.clone()
    }

    #[getter]
    fn socket(&self) -> PathBuf {
        self.inner.config().socket_path()
    }

    #[getter]
    fn namespace(&self) -> u64 {
        self.inner.config().namespace
    }

    /// Version of the owner connected to (`pegaflow-owner --version`);
    /// `None` while disconnected.
    #[getter]
    fn owner_version(&self) -> Option<String> {
        self.inner.owner_version()
    }

    #[getter]
    fn slot_bytes(&self) -> u64 {
        self.inner.config().slot_bytes
    }

    /// Leading hits of `hashes` in `namespace`, without pinning.
    fn count_hits(&self, namespace: u64, hashes: Vec<Vec<u8>>) -> PyResult<usize> {
        Ok(self.inner.count_hits(namespace, &to_hashes(&hashes)?))
    }

    /// Leading blocks of `hashes` the owner's SSD tier holds (read from
    /// shared memory; no round trip). Pass the hashes after the pool hits.
    fn ssd_hits(&self, namespace: u64, hashes: Vec<Vec<u8>>) -> PyResult<usize> {
        Ok(self.inner.ssd_hits(namespace, &to_hashes(&hashes)?))
    }

    /// Asks the owner to stage these blocks from its SSD tier into the
    /// pool. Never waits; returns a `StageTicket` (`stage_settled`).
    fn stage(&self, namespace: u64, hashes: Vec<Vec<u8>>) -> PyResult<PyStageTicket> {
        Ok(PyStageTicket {
            inner: self.inner.stage(namespace, &to_hashes(&hashes)?),
        })
    }

    /// Whether the owner finished every stage request up to `ticket`.
    fn stage_settled(&self, ticket: &PyStageTicket) -> bool {
        self.inner.stage_settled(&ticket.inner)
    }

    /// Leading hits, pinned. The pins hold until released through the
    /// returned `Pins` (or until it is collected).
    fn lookup(&self, namespace: u64, hashes: Vec<Vec<u8>>) -> PyResult<PyPins> {
        let hashes = to_hashes(&hashes)?;
        Ok(PyPins {
            inner: self.inner.lookup(namespace, &hashes),
        })
    }

    /// Drops every pin `pins` still holds (same as `pins.release()`).
    fn release(&self, pins: &PyPins) {
        pins.inner.release_all();
    }

    /// Hands `handle` (bytes: a CUDA IPC export) to the owner under `key`
    /// for other engines of the node; published again after a reconnect.
    /// Raises `OwnerUnavailable` while the owner is away (the handle is
    /// kept and published when it comes back).
    fn publish_ipc(&self, py: Python<'_>, key: &str, handle: &[u8]) -> PyResult<()> {
        py.detach(|| self.inner.publish_ipc(key, handle))
            .map_err(engine_err)
    }

    /// What another engine published under `key` (None: nothing).
    #[pyo3(signature = (key, timeout=2.0))]
    fn fetch_ipc<'py>(
        &self,
        py: Python<'py>,
        key: &str,
        timeout: f64,
    ) -> PyResult<Option<Bound<'py, pyo3::types::PyBytes>>> {
        let t = std::time::Duration::from_secs_f64(timeout.clamp(0.0, 60.0));
        let got = py
            .detach(|| self.inner.fetch_ipc(key, t))
            .map_err(engine_err)?;
        Ok(got.map(|b| pyo3::types::PyBytes::new(py, &b)))
    }

    /// Bytes of a slot (tests and tools): `None` when the owner is away or
    /// the id is out of range.
    fn read_slot<'py>(
        &self,
        py: Python<'py>,
        slot: u32,
        length: usize,
    ) -> Option<Bound<'py, pyo3::types::PyBytes>> {
        let (ptr, cap) = self.inner.slot_ptr(slot)?;
        let n = length.min(cap);
        // SAFETY: ptr..ptr+cap lies in the pool mapping of the live session
        // (slot_ptr bounds-checked it); the bytes are copied out at once.
        // A concurrent writer can only make the copy stale, not unsound.
        let s = unsafe { std::slice::from_raw_parts(ptr as *const u8, n) };
        Some(pyo3::types::PyBytes::new(py, s))
    }

    /// Counters this process keeps (also while disconnected).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("connected", s.connected)?;
        d.set_item("epoch", s.epoch)?;
        d.set_item("reconnects", s.reconnects)?;
        d.set_item("lookups", s.lookups)?;
        d.set_item("hit_blocks", s.hit_blocks)?;
        d.set_item("miss_blocks", s.miss_blocks)?;
        d.set_item("saved_blocks", s.saved_blocks)?;
        d.set_item("save_dropped_blocks", s.save_dropped_blocks)?;
        d.set_item("save_skipped_blocks", s.save_skipped_blocks)?;
        d.set_item("loaded_blocks", s.loaded_blocks)?;
        d.set_item("last_error", s.last_error)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "Engine(name={:?}, socket={:?}, connected={})",
            self.inner.config().name,
            self.inner.config().socket_path(),
            self.inner.is_connected()
        )
    }
}

/// What one `Engine.stage` queued (see `pegaflow/_native.pyi`).
#[pyclass(name = "StageTicket", module = "pegaflow._native", frozen)]
pub struct PyStageTicket {
    inner: StageTicket,
}

#[pymethods]
impl PyStageTicket {
    /// Stage requests queued (0: nothing was, e.g. owner away).
    #[getter]
    fn queued(&self) -> usize {
        self.inner.queued
    }

    fn __repr__(&self) -> String {
        format!("StageTicket(queued={})", self.inner.queued)
    }
}

/// The blocks one `Engine.lookup` pinned (see `pegaflow/_native.pyi`).
#[pyclass(name = "Pins", module = "pegaflow._native", frozen)]
pub struct PyPins {
    inner: Pinned,
}

impl PyPins {
    fn range(&self, start: usize, end: Option<usize>) -> PyResult<std::ops::Range<usize>> {
        let n = self.inner.len();
        let end = end.unwrap_or(n);
        if start > end || end > n {
            return Err(ConfigError::new_err(format!(
                "pin range {start}..{end} out of range (this lookup pinned {n} blocks)"
            )));
        }
        Ok(start..end)
    }
}

#[pymethods]
impl PyPins {
    /// The segment the blocks were pinned in (0 when nothing was pinned).
    #[getter]
    fn segment_id(&self) -> u64 {
        self.inner.segment_id()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// `(slot, generation)` of blocks `start..end`, for a worker's
    /// `KvCache.load(pins.segment_id, ...)`.
    #[pyo3(signature = (start=0, end=None))]
    fn blocks(&self, start: usize, end: Option<usize>) -> PyResult<Vec<(u32, u32)>> {
        let r = self.range(start, end)?;
        Ok(self.inner.blocks[r]
            .iter()
            .map(|b| (b.slot, b.gen))
            .collect())
    }

    /// Releases the pins of blocks `start..end` still held (idempotent).
    #[pyo3(signature = (start=0, end=None))]
    fn release(&self, start: usize, end: Option<usize>) -> PyResult<()> {
        let r = self.range(start, end)?;
        self.inner.release_range(r);
        Ok(())
    }

    /// Pins still held.
    fn held(&self) -> usize {
        self.inner.held()
    }

    fn __repr__(&self) -> String {
        format!(
            "Pins(blocks={}, held={}, segment={:#x})",
            self.inner.len(),
            self.inner.held(),
            self.inner.segment_id()
        )
    }
}

fn init_logging() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // PEGAFLOW_LOG (or RUST_LOG) picks the level; warnings by default so
        // the engine's log is not flooded. The connection's ups and downs
        // are logged by the Python side (pegaflow._log, in the host's log
        // format), so the engine client's own lines about them are not
        // repeated here. A host that installed its own subscriber keeps it.
        let filter = tracing_subscriber::EnvFilter::try_from_env("PEGAFLOW_LOG")
            .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
            .unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,pegaflow_core::engine=error")
            });
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(colour())
            .with_writer(std::io::stderr)
            .try_init();
    });
}

/// Colours only on a terminal, and never with `NO_COLOR` set
/// (<https://no-color.org>): a log file gets plain text.
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Block keys of `token_ids` (see `pegaflow_core::keys` for the byte
/// format): one 32-byte key per full block, chained from `parent`.
#[pyfunction]
#[pyo3(signature = (parent, token_ids, block_size, extra=None))]
fn chain_keys<'py>(
    py: Python<'py>,
    parent: Option<Bound<'py, PyBytes>>,
    token_ids: Vec<u32>,
    block_size: usize,
    extra: Option<Vec<Option<Bound<'py, PyBytes>>>>,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let parent: Option<[u8; 32]> = match &parent {
        None => None,
        Some(p) => Some(p.as_bytes().try_into().map_err(|_| {
            pyo3::exceptions::PyValueError::new_err(format!(
                "parent key has {} bytes; block keys are 32",
                p.as_bytes().len()
            ))
        })?),
    };
    let extra: Vec<Option<&[u8]>> = extra
        .iter()
        .flatten()
        .map(|e| e.as_ref().map(|b| b.as_bytes()))
        .collect();
    let keys = pegaflow_core::keys::chain_keys(parent.as_ref(), &token_ids, block_size, &extra)
        .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
    Ok(keys.iter().map(|k| PyBytes::new(py, k)).collect())
}

/// Whether process `pid` runs (a zombie does not) and, with `start_time`,
/// is the one that started then rather than a later one reusing the pid.
#[pyfunction]
#[pyo3(signature = (pid, start_time=None))]
fn process_alive(pid: u32, start_time: Option<u64>) -> bool {
    use pegaflow_shm::segment::{pid_alive, process_start_time};
    pid_alive(pid) && start_time.is_none_or(|s| process_start_time(pid) == Some(s))
}

/// When process `pid` started (clock ticks since boot; None: no such
/// process): what [`process_alive`] compares.
#[pyfunction]
fn process_start_time(pid: u32) -> Option<u64> {
    pegaflow_shm::segment::process_start_time(pid)
}

/// Whether a CUDA driver can be loaded in this process.
#[pyfunction]
fn cuda_driver_present() -> bool {
    pegaflow_core::cuda::driver_present()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyEngine>()?;
    m.add_class::<PyPins>()?;
    m.add_class::<PyStageTicket>()?;
    m.add_class::<kv_cache::PyKvCache>()?;
    m.add_class::<handover::PyHoldTable>()?;
    m.add_function(wrap_pyfunction!(kv_cache::namespace_fingerprint, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_driver_present, m)?)?;
    m.add_function(wrap_pyfunction!(chain_keys, m)?)?;
    m.add_function(wrap_pyfunction!(process_alive, m)?)?;
    m.add_function(wrap_pyfunction!(process_start_time, m)?)?;
    errors::register(m)?;
    Ok(())
}
