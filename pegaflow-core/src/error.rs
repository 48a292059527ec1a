//! Errors an engine can see. Only configuration problems surface as errors;
//! an absent or restarting owner never does (lookups miss, saves are
//! skipped, the client reconnects by itself).

use std::path::PathBuf;

use pegaflow_shm::proto::RejectReason;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the owner refused this engine ({reason:?}): {message}")]
    Rejected {
        reason: RejectReason,
        message: String,
    },

    #[error(
        "cannot connect to the owner socket {path}: permission denied; run the engine as the \
         owner's user, or start pegaflow-owner with --group and add this user to that group"
    )]
    SocketPermission { path: PathBuf },

    #[error("the owner's segments could not be mapped: {0}")]
    Segment(#[from] pegaflow_shm::SegmentError),

    #[error("socket protocol: {0}")]
    Proto(#[from] pegaflow_shm::ProtoError),

    #[error("owner is not connected")]
    OwnerGone,

    #[error("no reply from the owner within {0:?}")]
    Timeout(std::time::Duration),

    #[error("invalid engine configuration: {0}")]
    Config(String),
}
