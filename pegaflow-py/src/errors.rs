//! Python exception classes and the mapping from core errors to them.
//!
//! ```text
//! PegaflowError
//!  +-- ConfigError        bad argument or configuration (fix the call)
//!  +-- OwnerUnavailable   the owner is not connected (transient)
//!  +-- OwnerRejected      the owner refused this engine (ABI, permissions)
//!  +-- LayoutError        the KV cache cannot be described / is unsupported
//!  +-- TransferError      a copy failed (CUDA error, slot outside the pool)
//! ```

use pegaflow_core::copy::CopyError;
use pegaflow_core::layout::{LayoutError as CoreLayoutError, PlanError};
use pegaflow_core::transfer::TransferError as CoreTransferError;
use pegaflow_core::EngineError;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    _native,
    PegaflowError,
    PyException,
    "Base class of every PegaFlow error."
);
create_exception!(
    _native,
    ConfigError,
    PegaflowError,
    "Invalid argument or configuration."
);
create_exception!(
    _native,
    OwnerUnavailable,
    PegaflowError,
    "The pegaflow-owner is not connected right now (it is down or restarting)."
);
create_exception!(
    _native,
    OwnerRejected,
    PegaflowError,
    "The pegaflow-owner refused this engine (ABI mismatch, permissions, block too large)."
);
create_exception!(
    _native,
    LayoutError,
    PegaflowError,
    "The KV cache layout is invalid or not supported."
);
create_exception!(_native, TransferError, PegaflowError, "A KV copy failed.");

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("PegaflowError", py.get_type::<PegaflowError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("OwnerUnavailable", py.get_type::<OwnerUnavailable>())?;
    m.add("OwnerRejected", py.get_type::<OwnerRejected>())?;
    m.add("LayoutError", py.get_type::<LayoutError>())?;
    m.add("TransferError", py.get_type::<TransferError>())?;
    Ok(())
}

pub(crate) fn engine_err(e: EngineError) -> PyErr {
    let msg = e.to_string();
    match e {
        EngineError::Rejected { .. } | EngineError::SocketPermission { .. } => {
            OwnerRejected::new_err(msg)
        }
        EngineError::OwnerGone | EngineError::Timeout(_) => OwnerUnavailable::new_err(msg),
        EngineError::Config(_) => ConfigError::new_err(msg),
        _ => PegaflowError::new_err(msg),
    }
}

pub(crate) fn layout_err(e: CoreLayoutError) -> PyErr {
    LayoutError::new_err(e.to_string())
}

pub(crate) fn copy_err(e: CopyError) -> PyErr {
    match e {
        CopyError::UnknownBackend(_) | CopyError::NeedsDevice(_) => {
            ConfigError::new_err(e.to_string())
        }
        _ => TransferError::new_err(e.to_string()),
    }
}

pub(crate) fn transfer_err(e: CoreTransferError) -> PyErr {
    match e {
        CoreTransferError::Layout(l) => layout_err(l),
        CoreTransferError::Plan(PlanError::BlockOutOfRange { .. })
        | CoreTransferError::Plan(PlanError::LengthMismatch { .. })
        | CoreTransferError::LayerOutOfRange { .. } => ConfigError::new_err(e.to_string()),
        CoreTransferError::NeedsDevice(_) => ConfigError::new_err(e.to_string()),
        _ => TransferError::new_err(e.to_string()),
    }
}
