//! Fixed-size single-producer single-consumer rings in shared memory.
//!
//! ## Invariants
//!
//! - `head` is written only by the consumer, `tail` only by the producer;
//!   both count entries ever moved (they never wrap in practice: 2^64).
//! - `head <= tail <= head + cap` whenever both sides follow the protocol.
//!   The consumer checks it on every pop, since the producer is another
//!   process and may be buggy: a violation is reported as [`RingError`],
//!   never trusted.
//! - The producer writes an entry's words, then publishes it with a
//!   `Release` store of `tail`; the consumer `Acquire`-loads `tail` before
//!   reading words, and `Release`-stores `head` after, so the producer
//!   never overwrites an entry still being read.
//! - Entries are stored as `AtomicU64` words accessed `Relaxed`: no data
//!   race even if a peer misbehaves, and loom can model the whole ring.
//! - Zeroed memory is an empty ring.

use crate::sync::{AtomicU64, Ordering};

/// A counter on its own cache-line pair, so producer and consumer do not
/// false-share (x86 prefetches lines in pairs).
#[repr(C, align(128))]
#[derive(Default)]
pub struct Padded {
    pub value: AtomicU64,
}

#[repr(C)]
#[derive(Default)]
pub struct RingHeader {
    pub head: Padded,
    pub tail: Padded,
}

#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<RingHeader>() == 256);

/// The producer published more entries than the ring holds, or moved
/// `tail` backwards: the peer is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("ring corrupt: head {head}, tail {tail}, capacity {cap}")]
pub struct RingError {
    pub head: u64,
    pub tail: u64,
    pub cap: u64,
}

/// A ring of `cap` entries of `N` words each.
pub struct Ring<'a, const N: usize> {
    hdr: &'a RingHeader,
    words: &'a [AtomicU64],
    cap: u64,
}

impl<'a, const N: usize> Ring<'a, N> {
    /// `words.len()` must be `cap * N` with `cap` a power of two.
    pub fn new(hdr: &'a RingHeader, words: &'a [AtomicU64]) -> Self {
        let cap = (words.len() / N) as u64;
        assert!(
            cap.is_power_of_two() && words.len() == cap as usize * N,
            "ring size"
        );
        Ring { hdr, words, cap }
    }

    pub fn capacity(&self) -> u64 {
        self.cap
    }

    fn entry(&self, pos: u64) -> &[AtomicU64] {
        let i = (pos & (self.cap - 1)) as usize * N;
        &self.words[i..i + N]
    }

    /// Producer: append `e`; `false` if the ring is full (or corrupt).
    pub fn push(&self, e: &[u64; N]) -> bool {
        let tail = self.hdr.tail.value.load(Ordering::Relaxed);
        let head = self.hdr.head.value.load(Ordering::Acquire);
        if tail.wrapping_sub(head) >= self.cap {
            return false;
        }
        for (dst, w) in self.entry(tail).iter().zip(e) {
            dst.store(*w, Ordering::Relaxed);
        }
        self.hdr
            .tail
            .value
            .store(tail.wrapping_add(1), Ordering::Release);
        true
    }

    /// Producer: append as many of `entries` as fit, loading `head` and
    /// storing `tail` once for the whole batch. Returns how many were queued.
    pub fn push_many(&self, entries: &[[u64; N]]) -> usize {
        let tail = self.hdr.tail.value.load(Ordering::Relaxed);
        let head = self.hdr.head.value.load(Ordering::Acquire);
        let free = self.cap.saturating_sub(tail.wrapping_sub(head)) as usize;
        let n = entries.len().min(free);
        for (k, e) in entries[..n].iter().enumerate() {
            for (dst, w) in self.entry(tail.wrapping_add(k as u64)).iter().zip(e) {
                dst.store(*w, Ordering::Relaxed);
            }
        }
        if n > 0 {
            self.hdr
                .tail
                .value
                .store(tail.wrapping_add(n as u64), Ordering::Release);
        }
        n
    }

    /// Consumer: the oldest entry, if any.
    pub fn pop(&self) -> Result<Option<[u64; N]>, RingError> {
        let mut out = None;
        self.consume(1, |e| out = Some(*e))?;
        Ok(out)
    }

    /// Consumer: hand up to `max` queued entries to `f`, oldest first,
    /// loading `tail` and storing `head` once for the whole batch (one cache
    /// line transfer each way instead of one per entry). Returns how many.
    pub fn consume(&self, max: usize, mut f: impl FnMut(&[u64; N])) -> Result<usize, RingError> {
        let head = self.hdr.head.value.load(Ordering::Relaxed);
        let tail = self.hdr.tail.value.load(Ordering::Acquire);
        let len = tail.wrapping_sub(head);
        if len > self.cap {
            return Err(RingError {
                head,
                tail,
                cap: self.cap,
            });
        }
        let n = len.min(max as u64);
        let mut e = [0u64; N];
        for pos in head..head.wrapping_add(n) {
            for (o, w) in e.iter_mut().zip(self.entry(pos)) {
                *o = w.load(Ordering::Relaxed);
            }
            f(&e);
        }
        if n > 0 {
            self.hdr
                .head
                .value
                .store(head.wrapping_add(n), Ordering::Release);
        }
        Ok(n as usize)
    }

    /// Entries queued, as the caller last saw them (saturates on corruption).
    pub fn len(&self) -> u64 {
        let tail = self.hdr.tail.value.load(Ordering::Acquire);
        let head = self.hdr.head.value.load(Ordering::Acquire);
        tail.wrapping_sub(head).min(self.cap)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Raw positions, for inspection.
    pub fn positions(&self) -> (u64, u64) {
        (
            self.hdr.head.value.load(Ordering::Acquire),
            self.hdr.tail.value.load(Ordering::Acquire),
        )
    }

    /// The producer's position word, for tests that corrupt it on purpose.
    #[doc(hidden)]
    pub fn tail_cell(&self) -> &AtomicU64 {
        &self.hdr.tail.value
    }

    /// Owner only, when no producer or consumer of this ring is alive:
    /// forget everything queued.
    pub fn reset(&self) {
        self.hdr.head.value.store(0, Ordering::SeqCst);
        self.hdr.tail.value.store(0, Ordering::SeqCst);
    }

    /// Owner only, with the engine alive but disconnected: make the ring
    /// empty by moving `head` to `tail` (the consumer side of a stash ring
    /// belongs to the engine, so this is only for rings the owner consumes).
    pub fn discard(&self) -> u64 {
        let tail = self.hdr.tail.value.load(Ordering::Acquire);
        let head = self.hdr.head.value.swap(tail, Ordering::AcqRel);
        tail.wrapping_sub(head)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn words(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn fifo_full_and_empty() {
        let hdr = RingHeader::default();
        let w = words(4 * 2);
        let r: Ring<'_, 2> = Ring::new(&hdr, &w);
        assert_eq!(r.pop(), Ok(None));
        for i in 0..4 {
            assert!(r.push(&[i, i * 10]));
        }
        assert!(!r.push(&[9, 9]), "full ring must refuse");
        for i in 0..4 {
            assert_eq!(r.pop(), Ok(Some([i, i * 10])));
        }
        assert_eq!(r.pop(), Ok(None));
        assert!(r.push(&[5, 50]));
        assert_eq!(r.pop(), Ok(Some([5, 50])));
    }

    #[test]
    fn consume_takes_a_bounded_batch_in_order() {
        let hdr = RingHeader::default();
        let w = words(8);
        let r: Ring<'_, 1> = Ring::new(&hdr, &w);
        for i in 0..6 {
            assert!(r.push(&[i]));
        }
        let mut seen = Vec::new();
        assert_eq!(r.consume(4, |e| seen.push(e[0])), Ok(4));
        assert_eq!(r.consume(10, |e| seen.push(e[0])), Ok(2));
        assert_eq!(seen, [0, 1, 2, 3, 4, 5]);
        assert_eq!(r.consume(10, |_| panic!("empty")), Ok(0));
        for i in 0..8 {
            assert!(r.push(&[i]), "space must be free again");
        }
    }

    #[test]
    fn push_many_fills_what_fits_in_order() {
        let hdr = RingHeader::default();
        let w = words(4);
        let r: Ring<'_, 1> = Ring::new(&hdr, &w);
        assert!(r.push(&[100]));
        assert_eq!(r.push_many(&[[1], [2], [3], [4], [5]]), 3, "only three fit");
        assert_eq!(r.push_many(&[[6]]), 0);
        let mut seen = Vec::new();
        r.consume(10, |e| seen.push(e[0])).unwrap();
        assert_eq!(seen, [100, 1, 2, 3]);
        assert_eq!(r.push_many(&[]), 0);
    }

    #[test]
    fn corrupt_tail_is_reported_not_trusted() {
        let hdr = RingHeader::default();
        let w = words(4);
        let r: Ring<'_, 1> = Ring::new(&hdr, &w);
        hdr.tail.value.store(1000, Ordering::SeqCst);
        assert!(r.pop().is_err());
        hdr.tail.value.store(u64::MAX, Ordering::SeqCst);
        assert!(r.pop().is_err(), "tail behind head");
        assert_eq!(r.len(), 4);
    }
}
