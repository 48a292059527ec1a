//! A futex doorbell: producers ring it after queueing work; the owner sleeps
//! on it when idle, so an idle owner burns no CPU.
//!
//! The sleeper announces itself in `sleeping` (SeqCst), re-checks for work,
//! then waits on the word's value read *before* that check. A ringer, after
//! publishing its work, issues a SeqCst fence and looks at `sleeping`; only
//! if it is set does it bump the word and wake. The fence and the sleeper's
//! SeqCst store/load make this a Dekker pair: either the ringer sees the
//! flag, or the sleeper's re-check sees the work. No lost wake-up, and an
//! awake owner costs a ringer one fence, not a contended cache line.

use std::time::Duration;

use crate::sync::{fence, AtomicU32, Ordering};

pub struct Doorbell<'a> {
    pub word: &'a AtomicU32,
    pub sleeping: &'a AtomicU32,
}

impl Doorbell<'_> {
    /// Producer side, after publishing work. Touches the shared word and
    /// makes a syscall only when the consumer sleeps.
    pub fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) != 0 {
            self.word.fetch_add(1, Ordering::SeqCst);
            futex_wake(self.word);
        }
    }

    /// Consumer side: sleep until rung or `timeout`, unless `has_work`
    /// reports work after the sleep was announced.
    pub fn wait(&self, timeout: Duration, has_work: impl FnOnce() -> bool) {
        let seen = self.word.load(Ordering::SeqCst);
        self.sleeping.store(1, Ordering::SeqCst);
        // Pairs with the ringer's fence: the work check below cannot be
        // ordered before the flag store.
        fence(Ordering::SeqCst);
        if !has_work() {
            futex_wait(self.word, seen, timeout);
        }
        self.sleeping.store(0, Ordering::SeqCst);
    }
}

#[cfg(not(loom))]
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live AtomicU32 (4-byte aligned) for the duration
    // of the call; FUTEX_WAIT only reads it. Not FUTEX_PRIVATE: the word is
    // in a MAP_SHARED mapping and other processes wake it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

#[cfg(not(loom))]
fn futex_wake(word: &AtomicU32) {
    // SAFETY: as in futex_wait; FUTEX_WAKE does not access the word's value.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

#[cfg(loom)]
fn futex_wait(_: &AtomicU32, _: u32, _: Duration) {
    loom::thread::yield_now();
}

#[cfg(loom)]
fn futex_wake(_: &AtomicU32) {}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn ring_wakes_a_sleeper_promptly() {
        let cells = Arc::new((AtomicU32::new(0), AtomicU32::new(0)));
        let c2 = cells.clone();
        let t = std::thread::spawn(move || {
            let bell = Doorbell {
                word: &c2.0,
                sleeping: &c2.1,
            };
            let start = Instant::now();
            bell.wait(Duration::from_secs(10), || false);
            start.elapsed()
        });
        while cells.1.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        Doorbell {
            word: &cells.0,
            sleeping: &cells.1,
        }
        .ring();
        assert!(
            t.join().unwrap() < Duration::from_secs(5),
            "sleeper was not woken"
        );
    }

    #[test]
    fn pending_work_skips_the_sleep() {
        let (w, s) = (AtomicU32::new(0), AtomicU32::new(0));
        let bell = Doorbell {
            word: &w,
            sleeping: &s,
        };
        let start = Instant::now();
        bell.wait(Duration::from_secs(10), || true);
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(s.load(Ordering::SeqCst), 0);
    }
}
