//! Touching every page of a fresh pool, in parallel, with progress in the log.
//!
//! The memory itself is reserved before this runs (`pegaflow_shm::segment`:
//! `fallocate` on tmpfs, the mapping's huge page reservation on hugetlbfs),
//! so a machine without that much room refuses to start with a clear
//! message instead of dying of SIGBUS here or in an engine later.
//! Prefaulting moves the remaining first-touch cost out of the first saves:
//! page tables on tmpfs; on hugetlbfs, allocating and zeroing the reserved
//! pages, on every core (much faster than `fallocate` would on one).
//! A re-adopted pool already has its pages and is not touched again
//! (restart in milliseconds).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::info;

use crate::size::human;

/// Write one byte per `page` bytes of `[base, base + len)` with `threads` threads.
pub fn prefault(base: *mut u8, len: usize, page: usize, threads: usize) -> Duration {
    const STEP: usize = 64 << 20;
    let start = Instant::now();
    let done = AtomicU64::new(0);
    let finished = AtomicU64::new(0);
    let threads = threads.max(1);
    let chunk = len.div_ceil(threads).div_ceil(page) * page;
    let base_addr = base as usize;
    std::thread::scope(|s| {
        for t in 0..threads {
            let lo = (t * chunk).min(len);
            let hi = ((t + 1) * chunk).min(len);
            let (done, finished) = (&done, &finished);
            s.spawn(move || {
                let mut off = lo;
                while off < hi {
                    let seg_start = off;
                    let end = (off + STEP).min(hi);
                    while off < end {
                        // SAFETY: off < len, so the byte is inside the caller's
                        // live, writable mapping; the pool is fresh, so no
                        // engine uses it yet, and writing zero over zero changes
                        // nothing observable. Volatile so it is not elided.
                        unsafe { std::ptr::write_volatile((base_addr + off) as *mut u8, 0) };
                        off += page;
                    }
                    done.fetch_add((end - seg_start) as u64, Ordering::Relaxed);
                }
                finished.fetch_add(1, Ordering::Release);
            });
        }
        let mut last = Instant::now();
        while finished.load(Ordering::Acquire) < threads as u64 {
            std::thread::sleep(Duration::from_millis(20));
            if last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                let d = done.load(Ordering::Relaxed).min(len as u64);
                info!(
                    "prefault: {} of {} ({:.0}%), {:.1} GB/s",
                    human(d),
                    human(len as u64),
                    100.0 * d as f64 / len as f64,
                    d as f64 / start.elapsed().as_secs_f64() / 1e9
                );
            }
        }
    });
    start.elapsed()
}
