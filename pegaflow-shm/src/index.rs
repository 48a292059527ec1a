//! The lookup index: an open-addressing hash table from [`BlockKey`] to slot
//! id that engines read without locks and only the owner writes.
//!
//! ## Invariants
//!
//! - Single writer (the owner). Readers never write.
//! - Each bucket is a seqlock: the writer makes `seq` odd, rewrites the
//!   bucket, makes `seq` even again. A reader retries a bucket whose `seq`
//!   was odd or changed while it read, so it never sees a torn key.
//! - A reader retries at most [`READ_RETRIES`] times (tens of microseconds)
//!   and then reports a miss. An owner killed between the two `seq` stores
//!   leaves the bucket odd for good, and a live owner can be descheduled
//!   mid-write: neither may stall an engine's lookup.
//! - The writer never reads through the seqlock (it is the only writer, so
//!   its own plain loads are stable), and it derives the odd and even values
//!   from the old one as `odd = s | 1`, `even = odd + 1`: a bucket left odd
//!   by a dead owner becomes even again on its next write, with a larger
//!   `seq` than any value a reader may still hold.
//! - [`Index::reset`] (re-adoption) rewrites every bucket that is not
//!   plainly empty that way, without reading through the seqlock.
//! - Linear probing with backward-shift deletion (no tombstones). A reader
//!   racing a deletion can miss a key that is present (a false miss: the
//!   engine recomputes the block). It can never return a slot for the
//!   wrong key, and callers validate the slot table after pinning anyway.
//! - `slot_plus_one == 0` marks an empty bucket, so zeroed memory is an
//!   empty index.

use crate::slot_table::BlockKey;
use crate::sync::{fence, spin_hint, AtomicU32, AtomicU64, Ordering};

pub const BUCKET_BYTES: u64 = 64;
/// Probes after which a reader gives up (a miss). The table is at most half
/// full, so real probe chains are far shorter.
pub const MAX_PROBES: usize = 128;
/// Times a reader re-reads one bucket that is being written (odd or changed
/// `seq`) before it gives up and reports a miss: about 20-50 µs of spinning.
#[cfg(not(loom))]
pub const READ_RETRIES: u32 = 1024;
/// Under loom each retry is a yield the model explores; a few suffice.
#[cfg(loom)]
pub const READ_RETRIES: u32 = 4;

#[repr(C, align(64))]
#[derive(Default)]
pub struct Bucket {
    pub seq: AtomicU32,
    /// Slot id + 1; 0 = empty.
    pub slot_plus_one: AtomicU32,
    pub namespace: AtomicU64,
    pub hash: [AtomicU64; 4],
    pub _reserved: [u64; 2],
}

#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<Bucket>() as u64 == BUCKET_BYTES);

/// A bucket's contents as read consistently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Snapshot {
    slot_plus_one: u32,
    namespace: u64,
    hash: [u64; 4],
}

impl Bucket {
    /// Reader: a consistent snapshot, or `None` after [`READ_RETRIES`]
    /// attempts that found the bucket being written (or left torn by a dead
    /// owner).
    fn read(&self) -> Option<Snapshot> {
        for _ in 0..READ_RETRIES {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                spin_hint();
                continue;
            }
            let snap = self.load_fields();
            // Order the data loads before the re-check of seq.
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == s1 {
                return Some(snap);
            }
            spin_hint();
        }
        None
    }

    /// The fields, with no consistency check: for the single writer (whose
    /// own earlier stores are all it can see change) or raw inspection.
    fn load_fields(&self) -> Snapshot {
        Snapshot {
            slot_plus_one: self.slot_plus_one.load(Ordering::Relaxed),
            namespace: self.namespace.load(Ordering::Relaxed),
            hash: [
                self.hash[0].load(Ordering::Relaxed),
                self.hash[1].load(Ordering::Relaxed),
                self.hash[2].load(Ordering::Relaxed),
                self.hash[3].load(Ordering::Relaxed),
            ],
        }
    }

    /// Writer only. `odd = s | 1` rather than `s + 1`: a bucket a dead owner
    /// left odd keeps its parity meaning (odd = being written) instead of
    /// inverting it for good.
    fn write(&self, snap: Snapshot) {
        let s = self.seq.load(Ordering::Relaxed);
        let odd = s | 1;
        self.seq.store(odd, Ordering::Relaxed);
        // Readers that see any of the new data also see the odd seq.
        fence(Ordering::Release);
        self.slot_plus_one
            .store(snap.slot_plus_one, Ordering::Relaxed);
        self.namespace.store(snap.namespace, Ordering::Relaxed);
        for (dst, w) in self.hash.iter().zip(snap.hash) {
            dst.store(w, Ordering::Relaxed);
        }
        self.seq.store(odd.wrapping_add(1), Ordering::Release);
    }
}

const EMPTY: Snapshot = Snapshot {
    slot_plus_one: 0,
    namespace: 0,
    hash: [0; 4],
};

/// The bucket a key starts probing at: a mix of all 32 hash bytes and the
/// namespace. Engines' hashes are usually uniform already, but an engine may
/// hand in structured ones (short or zero-padded hashes, text): those must
/// not pile up on one bucket.
#[inline]
pub fn home(key: &BlockKey, mask: u64) -> u64 {
    let w = key.words();
    let mut h = key.namespace.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for (i, x) in w.iter().enumerate() {
        h = (h ^ x.wrapping_mul(MIX[i])).rotate_left(29);
    }
    // fmix64 (MurmurHash3's finaliser): every input bit reaches every output bit.
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^= h >> 33;
    h & mask
}

const MIX: [u64; 4] = [
    0xA076_1D64_78BD_642F,
    0xE703_7ED1_A0B4_28DB,
    0x8EBC_6AF0_9C88_C6E3,
    0x5899_65CC_7537_4CC3,
];

/// A view of the index over `buckets` (length a power of two).
pub struct Index<'a> {
    buckets: &'a [Bucket],
    mask: u64,
}

/// Why the owner could not insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertError {
    /// The key is already present, mapped to this slot.
    Duplicate(u32),
    /// No empty bucket within `MAX_PROBES` (cannot happen while the table is
    /// sized at two buckets per slot).
    Full,
}

impl<'a> Index<'a> {
    pub fn new(buckets: &'a [Bucket]) -> Self {
        assert!(
            buckets.len().is_power_of_two(),
            "index size must be a power of two"
        );
        Index {
            buckets,
            mask: buckets.len() as u64 - 1,
        }
    }

    pub fn capacity(&self) -> usize {
        self.buckets.len()
    }

    fn bucket(&self, i: u64) -> &Bucket {
        &self.buckets[(i & self.mask) as usize]
    }

    /// Reader: the slot holding `key`, if the index has it.
    pub fn get(&self, key: &BlockKey) -> Option<u32> {
        let words = key.words();
        let start = home(key, self.mask);
        for i in start..start + MAX_PROBES as u64 {
            // A bucket that stays mid-write is a miss: never wait on it.
            let b = self.bucket(i).read()?;
            if b.slot_plus_one == 0 {
                return None;
            }
            if b.namespace == key.namespace && b.hash == words {
                return Some(b.slot_plus_one - 1);
            }
        }
        None
    }

    /// Owner: map `key` to `slot`.
    pub fn insert(&self, key: &BlockKey, slot: u32) -> Result<(), InsertError> {
        let words = key.words();
        let start = home(key, self.mask);
        for i in start..start + MAX_PROBES.min(self.buckets.len()) as u64 {
            let bucket = self.bucket(i);
            let b = bucket.load_fields();
            if b.slot_plus_one == 0 {
                bucket.write(Snapshot {
                    slot_plus_one: slot + 1,
                    namespace: key.namespace,
                    hash: words,
                });
                return Ok(());
            }
            if b.namespace == key.namespace && b.hash == words {
                return Err(InsertError::Duplicate(b.slot_plus_one - 1));
            }
        }
        Err(InsertError::Full)
    }

    /// Owner: unmap `key` if it maps to `slot`. Returns whether it did.
    pub fn remove(&self, key: &BlockKey, slot: u32) -> bool {
        let words = key.words();
        let start = home(key, self.mask);
        let mut found = None;
        for i in start..start + MAX_PROBES.min(self.buckets.len()) as u64 {
            let b = self.bucket(i).load_fields();
            if b.slot_plus_one == 0 {
                break;
            }
            if b.namespace == key.namespace && b.hash == words && b.slot_plus_one == slot + 1 {
                found = Some(i);
                break;
            }
        }
        let Some(mut hole) = found else { return false };
        // Backward-shift: pull later members of the probe run into the hole
        // as long as that does not move them before their home bucket.
        // At most one lap: a completely full table has no empty bucket to
        // stop at (the owner keeps it at most half full, but never trust it).
        let mut j = hole;
        for _ in 1..self.buckets.len() {
            j += 1;
            let b = self.bucket(j).load_fields();
            if b.slot_plus_one == 0 {
                break;
            }
            let k = BlockKey::from_words(b.namespace, b.hash);
            let h = home(&k, self.mask);
            // Distance from home, modulo table size.
            let dist_j = (j.wrapping_sub(h)) & self.mask;
            let dist_hole = (hole.wrapping_sub(h)) & self.mask;
            if dist_hole <= dist_j {
                self.bucket(hole).write(b);
                hole = j;
            }
        }
        self.bucket(hole).write(EMPTY);
        true
    }

    /// Owner, re-adopting a segment: empty every bucket, whatever state a
    /// dead owner left it in. Never reads through the seqlock (a torn bucket
    /// would make it spin); every bucket that is not plainly empty and even
    /// is rewritten, which leaves its `seq` even and larger than before.
    /// Engines still reading (orphans of the dead owner) see misses.
    pub fn reset(&self) {
        for b in self.buckets {
            let s = b.seq.load(Ordering::Relaxed);
            if s & 1 == 0 && b.slot_plus_one.load(Ordering::Relaxed) == 0 {
                continue;
            }
            b.write(EMPTY);
        }
    }

    /// Every (key, slot) present; for verification and inspection. A bucket
    /// that stays mid-write is skipped.
    pub fn entries(&self) -> impl Iterator<Item = (usize, BlockKey, u32)> + '_ {
        self.buckets.iter().enumerate().filter_map(|(i, b)| {
            let s = b.read()?;
            (s.slot_plus_one != 0).then(|| {
                (
                    i,
                    BlockKey::from_words(s.namespace, s.hash),
                    s.slot_plus_one - 1,
                )
            })
        })
    }

    /// Whether `key`, found in bucket `at`, is reachable by a reader (no
    /// empty bucket between its home and `at`, and none a reader gives up on).
    pub fn reachable(&self, key: &BlockKey, at: usize) -> bool {
        let start = home(key, self.mask);
        for i in start..start + MAX_PROBES as u64 {
            if (i & self.mask) as usize == at {
                return true;
            }
            match self.bucket(i).read() {
                Some(b) if b.slot_plus_one != 0 => {}
                _ => return false,
            }
        }
        false
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn buckets(n: usize) -> Vec<Bucket> {
        (0..n).map(|_| Bucket::default()).collect()
    }

    #[test]
    fn insert_get_remove() {
        let b = buckets(64);
        let idx = Index::new(&b);
        let k = BlockKey::new(1, [9; 32]);
        assert_eq!(idx.get(&k), None);
        idx.insert(&k, 5).unwrap();
        assert_eq!(idx.get(&k), Some(5));
        assert_eq!(idx.insert(&k, 6), Err(InsertError::Duplicate(5)));
        assert!(!idx.remove(&k, 6), "wrong slot must not remove");
        assert!(idx.remove(&k, 5));
        assert_eq!(idx.get(&k), None);
    }

    #[test]
    fn structured_hashes_spread_over_the_table() {
        // Text keys sharing their first 8 bytes, zero-padded: these used to
        // share one home bucket.
        let b = buckets(2048);
        let idx = Index::new(&b);
        let keys: Vec<_> = (0..1024)
            .map(|i| {
                let mut h = [0u8; 32];
                let t = format!("v025-0-{i}");
                h[..t.len()].copy_from_slice(t.as_bytes());
                BlockKey::new(5, h)
            })
            .collect();
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(idx.insert(k, i as u32), Ok(()), "key {i}");
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(idx.get(k), Some(i as u32));
        }
    }

    #[test]
    fn remove_from_a_completely_full_table_terminates() {
        let b = buckets(8);
        let idx = Index::new(&b);
        let keys: Vec<_> = (0..8u8).map(|i| BlockKey::new(1, [i; 32])).collect();
        for (i, k) in keys.iter().enumerate() {
            idx.insert(k, i as u32).unwrap();
        }
        for (i, k) in keys.iter().enumerate() {
            assert!(idx.remove(k, i as u32));
            for (j, other) in keys.iter().enumerate().skip(i + 1) {
                assert_eq!(idx.get(other), Some(j as u32), "after removing {i}");
            }
        }
        assert_eq!(idx.entries().count(), 0);
    }

    #[test]
    fn collisions_survive_deletion_of_run_members() {
        // A tiny table forces long runs and wrap-around.
        let b = buckets(16);
        let idx = Index::new(&b);
        let keys: Vec<_> = (0..8u8).map(|i| BlockKey::new(3, [i; 32])).collect();
        for (i, k) in keys.iter().enumerate() {
            idx.insert(k, i as u32).unwrap();
        }
        for (i, k) in keys.iter().enumerate().step_by(2) {
            assert!(idx.remove(k, i as u32));
        }
        for (i, k) in keys.iter().enumerate() {
            let want = (i % 2 == 1).then_some(i as u32);
            assert_eq!(idx.get(k), want, "key {i}");
        }
        for (i, k, _) in idx.entries() {
            assert!(idx.reachable(&k, i));
        }
    }

    /// A bucket as an owner killed between its two `seq` stores leaves it.
    fn tear(b: &Bucket) {
        let s = b.seq.load(Ordering::Relaxed);
        b.seq.store(s | 1, Ordering::Relaxed);
    }

    /// Run `f` on another thread; `None` if it has not returned in 10 s
    /// (the old reader spun forever on a torn bucket).
    fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10)).ok()
    }

    #[test]
    fn a_torn_bucket_is_a_miss_not_a_hang() {
        let b: &'static [Bucket] = Box::leak(buckets(64).into_boxed_slice());
        let idx = Index::new(b);
        let k = BlockKey::new(1, [9; 32]);
        idx.insert(&k, 5).unwrap();
        let at = home(&k, 63) as usize;
        tear(&b[at]);
        let got = within_10s(move || {
            let idx = Index::new(b);
            // Anything past the torn bucket is unreachable to a reader.
            (
                idx.get(&k),
                idx.entries().count(),
                idx.reachable(&k, (at + 1) % 64),
            )
        });
        assert_eq!(
            got,
            Some((None, 0, false)),
            "a reader must give up on a torn bucket"
        );
    }

    #[test]
    fn reset_repairs_torn_buckets_without_reading_them() {
        let b: &'static [Bucket] = Box::leak(buckets(16).into_boxed_slice());
        let idx = Index::new(b);
        let keys: Vec<_> = (0..6u8).map(|i| BlockKey::new(2, [i; 32])).collect();
        for (i, k) in keys.iter().enumerate() {
            idx.insert(k, i as u32).unwrap();
        }
        let before: Vec<u32> = b.iter().map(|x| x.seq.load(Ordering::Relaxed)).collect();
        for x in b.iter().step_by(3) {
            tear(x);
        }
        let done = within_10s(move || Index::new(b).reset());
        assert!(done.is_some(), "reset must not read through the seqlock");
        for (i, x) in b.iter().enumerate() {
            let s = x.seq.load(Ordering::Relaxed);
            assert_eq!(s & 1, 0, "bucket {i} left odd");
            assert!(
                s >= before[i],
                "bucket {i}: seq went back from {} to {s}",
                before[i]
            );
            assert_eq!(x.slot_plus_one.load(Ordering::Relaxed), 0);
        }
        // Every torn bucket moved past its odd value, so a reader holding
        // the even value from before the tear cannot validate against it.
        for x in b.iter().step_by(3) {
            assert!(x.seq.load(Ordering::Relaxed) > 0);
        }
        // And the index works again, parity intact.
        for (i, k) in keys.iter().enumerate() {
            idx.insert(k, i as u32).unwrap();
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(idx.get(k), Some(i as u32));
        }
        assert!(b.iter().all(|x| x.seq.load(Ordering::Relaxed) & 1 == 0));
    }

    #[test]
    fn a_write_over_a_torn_bucket_keeps_parity() {
        let b = buckets(8);
        let idx = Index::new(&b);
        let k = BlockKey::new(3, [1; 32]);
        let at = home(&k, 7) as usize;
        b[at].seq.store(7, Ordering::Relaxed); // torn: odd
        idx.insert(&k, 1).unwrap();
        assert_eq!(b[at].seq.load(Ordering::Relaxed), 8);
        assert_eq!(idx.get(&k), Some(1));
    }
}
