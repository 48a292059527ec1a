//! The lookup index: an open-addressing hash table from [`BlockKey`] to slot
//! id that engines read without locks and only the owner writes.
//!
//! ## Invariants
//!
//! - Single writer (the owner). Readers never write.
//! - Each bucket is a seqlock: the writer makes `seq` odd, rewrites the
//!   bucket, makes `seq` even again. A reader retries a bucket whose `seq`
//!   was odd or changed while it read, so it never sees a torn key.
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
    fn read(&self) -> Snapshot {
        loop {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                spin_hint();
                continue;
            }
            let snap = Snapshot {
                slot_plus_one: self.slot_plus_one.load(Ordering::Relaxed),
                namespace: self.namespace.load(Ordering::Relaxed),
                hash: [
                    self.hash[0].load(Ordering::Relaxed),
                    self.hash[1].load(Ordering::Relaxed),
                    self.hash[2].load(Ordering::Relaxed),
                    self.hash[3].load(Ordering::Relaxed),
                ],
            };
            // Order the data loads before the re-check of seq.
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == s1 {
                return snap;
            }
            spin_hint();
        }
    }

    fn write(&self, snap: Snapshot) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        // Readers that see any of the new data also see the odd seq.
        fence(Ordering::Release);
        self.slot_plus_one
            .store(snap.slot_plus_one, Ordering::Relaxed);
        self.namespace.store(snap.namespace, Ordering::Relaxed);
        for (dst, w) in self.hash.iter().zip(snap.hash) {
            dst.store(w, Ordering::Relaxed);
        }
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }
}

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
            let b = self.bucket(i).read();
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
            let b = bucket.read();
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
            let b = self.bucket(i).read();
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
            let b = self.bucket(j).read();
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
        self.bucket(hole).write(Snapshot {
            slot_plus_one: 0,
            namespace: 0,
            hash: [0; 4],
        });
        true
    }

    /// Owner: empty every bucket (used when rebuilding after a crash).
    pub fn clear(&self) {
        for b in self.buckets {
            if b.read().slot_plus_one != 0 {
                b.write(Snapshot {
                    slot_plus_one: 0,
                    namespace: 0,
                    hash: [0; 4],
                });
            }
        }
    }

    /// Every (key, slot) present; for verification and inspection.
    pub fn entries(&self) -> impl Iterator<Item = (usize, BlockKey, u32)> + '_ {
        self.buckets.iter().enumerate().filter_map(|(i, b)| {
            let s = b.read();
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
    /// empty bucket between its home and `at`).
    pub fn reachable(&self, key: &BlockKey, at: usize) -> bool {
        let start = home(key, self.mask);
        for i in start..start + MAX_PROBES as u64 {
            if (i & self.mask) as usize == at {
                return true;
            }
            if self.bucket(i).read().slot_plus_one == 0 {
                return false;
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
}
