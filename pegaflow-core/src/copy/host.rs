//! `memcpy` backend: copies on the calling thread before returning.
//!
//! "Device" addresses are host addresses here: it serves CPU KV caches
//! (e.g. vLLM on CPU) and lets the planner, the transfer layer and the
//! conformance suite run on machines without a GPU.

use crate::cuda::StreamRef;
use crate::layout::Piece;

use super::{CopyBackend, CopyBackendKind, CopyError, Direction};

/// See the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostBackend;

impl CopyBackend for HostBackend {
    fn kind(&self) -> CopyBackendKind {
        CopyBackendKind::Host
    }
    fn name(&self) -> &'static str {
        "host"
    }
    fn is_synchronous(&self) -> bool {
        true
    }
    unsafe fn copy(
        &self,
        pieces: &[Piece],
        dir: Direction,
        _stream: StreamRef,
    ) -> Result<(), CopyError> {
        for p in pieces {
            let (src, dst) = match dir {
                Direction::HostToDevice => (p.host as *const u8, p.device as usize as *mut u8),
                Direction::DeviceToHost => (p.device as usize as *const u8, p.host as *mut u8),
            };
            // SAFETY: the caller guarantees both ranges are live, readable
            // resp. writable and (pieces never overlap, and a piece's two
            // sides are distinct memory) non-overlapping.
            unsafe { std::ptr::copy_nonoverlapping(src, dst, p.len) };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::conformance::{self, HostMemory};
    use super::*;

    #[test]
    fn host_backend_passes_the_conformance_suite() {
        let mut mem = HostMemory::default();
        conformance::run_all(&HostBackend, &mut mem);
    }
}
