//! The SSD membership set: which blocks the owner's SSD tier holds, as
//! 64-bit key fingerprints in an open-addressing table engines read without
//! locks and only the owner writes.
//!
//! An engine whose lookup stops at a pool miss asks this set whether the
//! SSD has the following blocks, to decide whether staging them (a `Stage`
//! request) is worth waiting for. It never decides what bytes are loaded:
//! the owner reads the block from disk, checks its key and checksum, and
//! commits it into the pool, where the engine's ordinary lookup and pin
//! find it. So the set may be wrong in both directions without harm:
//!
//! - **False positives** (two keys with one fingerprint, 2^-64 per pair, or
//!   a block the owner drops from disk while the engine reads): the stage
//!   finds nothing, the engine's next lookup misses, the block is
//!   recomputed.
//! - **False negatives**, only while the owner moves an entry (backward
//!   shift on delete) under a reader, or for blocks that did not fit the
//!   table (counted by the owner): the block is recomputed.
//!
//! ## Invariants
//!
//! - Single writer (the owner). Readers never write.
//! - Each bucket is one `AtomicU64`: a reader sees either the old or the
//!   new fingerprint, never a torn one, so no seqlock is needed (unlike the
//!   index, whose buckets are five words).
//! - `0` marks an empty bucket (fingerprints are never 0), so zeroed memory
//!   is an empty set.
//! - Linear probing from [`home`], at most [`MAX_PROBES`] buckets, and
//!   backward-shift deletion (no tombstones).

use crate::slot_table::BlockKey;
use crate::sync::{AtomicU64, Ordering};

/// Longest probe run; an insert that finds no empty bucket within it fails.
pub const MAX_PROBES: usize = 64;

/// The fingerprint of a key: 64 bits of a mix of the namespace and all 32
/// hash bytes, never 0.
#[inline]
pub fn fingerprint(key: &BlockKey) -> u64 {
    let w = key.words();
    let mut h = key.namespace ^ 0x243F_6A88_85A3_08D3;
    for x in w {
        h = (h ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^= h >> 29;
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^= h >> 33;
    h.max(1)
}

/// The bucket a fingerprint starts probing at.
#[inline]
fn home(fp: u64, mask: u64) -> u64 {
    // The high bits: the low ones are what distinguishes keys in a bucket.
    fp.rotate_left(32) & mask
}

/// A view of the membership set over `buckets` (length a power of two).
pub struct SsdSet<'a> {
    buckets: &'a [AtomicU64],
    mask: u64,
}

impl<'a> SsdSet<'a> {
    pub fn new(buckets: &'a [AtomicU64]) -> Self {
        assert!(
            buckets.len().is_power_of_two(),
            "membership set size must be a power of two"
        );
        SsdSet {
            buckets,
            mask: buckets.len() as u64 - 1,
        }
    }

    pub fn capacity(&self) -> usize {
        self.buckets.len()
    }

    fn bucket(&self, i: u64) -> &AtomicU64 {
        &self.buckets[(i & self.mask) as usize]
    }

    fn probes(&self) -> u64 {
        MAX_PROBES.min(self.buckets.len()) as u64
    }

    /// Reader: whether the SSD tier (probably) holds `key`.
    pub fn contains(&self, key: &BlockKey) -> bool {
        let fp = fingerprint(key);
        let start = home(fp, self.mask);
        for i in start..start + self.probes() {
            match self.bucket(i).load(Ordering::Acquire) {
                0 => return false,
                x if x == fp => return true,
                _ => {}
            }
        }
        false
    }

    /// Owner: add `key`. `false` when no bucket within [`MAX_PROBES`] is
    /// free (the table is too full). Adding a present key is a no-op.
    pub fn insert(&self, key: &BlockKey) -> bool {
        let fp = fingerprint(key);
        let start = home(fp, self.mask);
        for i in start..start + self.probes() {
            let b = self.bucket(i);
            match b.load(Ordering::Relaxed) {
                0 => {
                    b.store(fp, Ordering::Release);
                    return true;
                }
                x if x == fp => return true,
                _ => {}
            }
        }
        false
    }

    /// Owner: remove `key`'s fingerprint. Returns whether it was there.
    /// (Two keys sharing a fingerprint share the entry: removing one makes
    /// the other a false negative, which is allowed.)
    pub fn remove(&self, key: &BlockKey) -> bool {
        let fp = fingerprint(key);
        let start = home(fp, self.mask);
        let mut hole = None;
        for i in start..start + self.probes() {
            match self.bucket(i).load(Ordering::Relaxed) {
                0 => break,
                x if x == fp => {
                    hole = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let Some(mut hole) = hole else { return false };
        let mut j = hole;
        for _ in 1..self.buckets.len() {
            j += 1;
            let x = self.bucket(j).load(Ordering::Relaxed);
            if x == 0 {
                break;
            }
            let h = home(x, self.mask);
            let dist_j = j.wrapping_sub(h) & self.mask;
            let dist_hole = hole.wrapping_sub(h) & self.mask;
            if dist_hole <= dist_j {
                self.bucket(hole).store(x, Ordering::Release);
                hole = j;
            }
        }
        self.bucket(hole).store(0, Ordering::Release);
        true
    }

    /// Owner: empty the set (a starting owner rebuilds it from disk).
    pub fn clear(&self) {
        for b in self.buckets {
            if b.load(Ordering::Relaxed) != 0 {
                b.store(0, Ordering::Release);
            }
        }
    }

    /// Entries present (a full scan: inspection and tests).
    pub fn len(&self) -> usize {
        self.buckets
            .iter()
            .filter(|b| b.load(Ordering::Relaxed) != 0)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn table(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    fn key(i: u32) -> BlockKey {
        let mut h = [0u8; 32];
        h[..4].copy_from_slice(&i.to_le_bytes());
        BlockKey::new(7, h)
    }

    #[test]
    fn insert_contains_remove_with_collisions_and_wrap() {
        let t = table(64);
        let s = SsdSet::new(&t);
        for i in 0..40 {
            assert!(s.insert(&key(i)), "insert {i}");
        }
        assert_eq!(s.len(), 40);
        for i in 0..40 {
            assert!(s.contains(&key(i)));
        }
        assert!(!s.contains(&key(1000)));
        for i in (0..40).step_by(3) {
            assert!(s.remove(&key(i)));
            assert!(!s.remove(&key(i)));
        }
        for i in 0..40 {
            assert_eq!(s.contains(&key(i)), i % 3 != 0, "key {i}");
        }
        s.clear();
        assert!(s.is_empty());
    }

    #[test]
    fn a_full_table_refuses_and_never_loops() {
        let t = table(8);
        let s = SsdSet::new(&t);
        let inserted = (0..20).filter(|&i| s.insert(&key(i))).count();
        assert_eq!(inserted, 8);
        assert!(s.remove(&key(0)) || !s.contains(&key(0)));
    }
}
