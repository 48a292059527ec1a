//! `HoldTable`: the P/D hold table (`pegaflow_shm::handover`) for the
//! connector. A prefill's scheduler creates one and lends finished
//! prompts' GPU blocks through it; a decode instance's scheduler peeks at
//! a hold, its workers take their rank's part, copy and mark it done.
//! See docs/pd.md and the module docs of `pegaflow_shm::handover`.

use std::path::PathBuf;

use pegaflow_shm::handover::{HoldError, HoldSpec, HoldTable, KEY_BYTES, SHM_DIR};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::{ConfigError, PegaflowError};

fn hold_err(e: HoldError) -> PyErr {
    match e {
        HoldError::SlotRange { .. }
        | HoldError::RankRange { .. }
        | HoldError::TooManyBlocks { .. }
        | HoldError::Geometry(_)
        | HoldError::BadName(_) => ConfigError::new_err(e.to_string()),
        _ => PegaflowError::new_err(e.to_string()),
    }
}

fn key32(key: &[u8]) -> PyResult<[u8; KEY_BYTES]> {
    key.try_into().map_err(|_| {
        ConfigError::new_err(format!(
            "a block key is {KEY_BYTES} bytes, got {}",
            key.len()
        ))
    })
}

#[pyclass(name = "HoldTable", module = "pegaflow._native", frozen)]
pub struct PyHoldTable {
    inner: HoldTable,
}

#[pymethods]
impl PyHoldTable {
    /// Creates the table `name` (`pegaflow-pd-<hex>`) in `dir` (default
    /// /dev/shm): up to `capacity` holds (as many as fit the table's size
    /// limit; `.capacity` says) of at most `max_blocks` blocks, one
    /// namespace and peer key per TP rank.
    #[staticmethod]
    #[pyo3(signature = (name, *, capacity, max_blocks, namespaces, peer_keys, dir=None))]
    fn create(
        name: &str,
        capacity: u32,
        max_blocks: u32,
        namespaces: Vec<u64>,
        peer_keys: Vec<String>,
        dir: Option<PathBuf>,
    ) -> PyResult<Self> {
        let dir = dir.unwrap_or_else(|| PathBuf::from(SHM_DIR));
        let spec = HoldSpec {
            capacity,
            max_blocks,
            namespaces,
            peer_keys,
        };
        Ok(PyHoldTable {
            inner: HoldTable::create(&dir, name, &spec).map_err(hold_err)?,
        })
    }

    /// Maps the table `name` another process created.
    #[staticmethod]
    #[pyo3(signature = (name, *, dir=None))]
    fn open(name: &str, dir: Option<PathBuf>) -> PyResult<Self> {
        let dir = dir.unwrap_or_else(|| PathBuf::from(SHM_DIR));
        Ok(PyHoldTable {
            inner: HoldTable::open(&dir, name).map_err(hold_err)?,
        })
    }

    #[getter]
    fn name(&self) -> &str {
        self.inner.name()
    }
    #[getter]
    fn nonce(&self) -> u64 {
        self.inner.nonce()
    }
    #[getter]
    fn ranks(&self) -> u32 {
        self.inner.ranks()
    }
    #[getter]
    fn capacity(&self) -> u32 {
        self.inner.capacity()
    }
    #[getter]
    fn max_blocks(&self) -> u32 {
        self.inner.max_blocks()
    }
    #[getter]
    fn namespaces(&self) -> Vec<u64> {
        self.inner.namespaces()
    }
    #[getter]
    fn peer_keys(&self) -> Vec<String> {
        self.inner.peer_keys()
    }
    #[getter]
    fn creator_pid(&self) -> u32 {
        self.inner.creator_pid()
    }
    fn creator_alive(&self) -> bool {
        self.inner.creator_alive()
    }

    /// `(state, ticket, pid)` of a rank's word; state is one of free, held,
    /// taken, done, expired, or "garbage".
    fn word(&self, slot: u32, rank: u32) -> PyResult<(&'static str, u32, u32)> {
        Ok(match self.inner.word(slot, rank).map_err(hold_err)? {
            Some(w) => (w.state.name(), w.ticket, w.pid),
            None => ("garbage", 0, 0),
        })
    }

    /// Producer: lends `blocks` under `ticket`; `key` is the last block's key.
    fn hold(&self, slot: u32, ticket: u32, key: &[u8], blocks: Vec<u32>) -> PyResult<()> {
        self.inner
            .hold(slot, ticket, &key32(key)?, &blocks)
            .map_err(hold_err)
    }

    /// Producer: every rank is done or expired.
    fn over(&self, slot: u32, ticket: u32) -> PyResult<bool> {
        self.inner.over(slot, ticket).map_err(hold_err)
    }

    /// Producer: the hold timed out (ranks still held expire, and ranks
    /// taken by a process that is gone). Returns `over`.
    fn expire(&self, slot: u32, ticket: u32) -> PyResult<bool> {
        self.inner.expire(slot, ticket).map_err(hold_err)
    }

    /// Producer: back to free (only once the hold is over).
    fn free(&self, slot: u32, ticket: u32) -> PyResult<()> {
        self.inner.free(slot, ticket).map_err(hold_err)
    }

    /// Consumer: `(blocks, key)` while every rank still offers the hold.
    fn peek<'py>(
        &self,
        py: Python<'py>,
        slot: u32,
        ticket: u32,
    ) -> PyResult<Option<(usize, Bound<'py, PyBytes>)>> {
        Ok(self
            .inner
            .peek(slot, ticket)
            .map_err(hold_err)?
            .map(|(n, k)| (n, PyBytes::new(py, &k))))
    }

    /// Consumer (a worker): takes its rank's part; `(key, producer block
    /// ids)`, or None when the hold is gone.
    fn take<'py>(
        &self,
        py: Python<'py>,
        slot: u32,
        ticket: u32,
        rank: u32,
    ) -> PyResult<Option<(Bound<'py, PyBytes>, Vec<u32>)>> {
        Ok(self
            .inner
            .take(slot, ticket, rank)
            .map_err(hold_err)?
            .map(|(k, b)| (PyBytes::new(py, &k), b)))
    }

    /// Consumer: its copies of a taken rank are done (or were never issued).
    fn done(&self, slot: u32, ticket: u32, rank: u32) -> PyResult<bool> {
        self.inner.done(slot, ticket, rank).map_err(hold_err)
    }

    /// Producer at shutdown: removes the file (mappings stay valid).
    fn unlink(&self) -> PyResult<()> {
        self.inner.unlink().map_err(hold_err)
    }

    fn __repr__(&self) -> String {
        format!(
            "HoldTable(name={:?}, ranks={}, capacity={}, max_blocks={}, creator_pid={})",
            self.inner.name(),
            self.inner.ranks(),
            self.inner.capacity(),
            self.inner.max_blocks(),
            self.inner.creator_pid()
        )
    }
}
