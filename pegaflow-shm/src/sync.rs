//! Atomics used by every shared structure, switchable to loom's for model checking.
//!
//! The shm structs are `#[repr(C)]` and their size assertions hold only for
//! the std atomics; under `--cfg loom` those assertions are compiled out and
//! the structs are only ever built on the heap by the model tests.

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Spin hint that loom understands as a yield point.
#[inline]
pub fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}
