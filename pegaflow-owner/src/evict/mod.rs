//! Which committed block gives up its slot when the pool is full.
//!
//! Two pieces, kept apart because they track different things:
//!
//! - [`Lru`] orders *slots* by last use. The victim is the coldest slot that
//!   no engine has pinned; the owner walks [`Lru::iter_cold`] and skips the
//!   pinned ones.
//! - [`TinyLfu`] counts accesses per *key*, over far more keys than the pool
//!   holds, including keys it no longer holds (a slot id is reused for other
//!   keys; popularity belongs to the key). When a new block needs a slot and
//!   the pool is full, the owner asks [`TinyLfu::admit`] whether the new key
//!   is more popular than the victim's; if not, the save is dropped and the
//!   victim stays.
//!
//! Why not plain LRU: an LLM workload is a few hot prefixes (system prompts,
//! shared documents, multi-turn histories) under a stream of one-off prompts.
//! Under LRU every one-off block is admitted as the hottest entry, so a burst
//! of them scans the hot prefixes out of the pool, each costing a full
//! prefill when it returns. Admission by frequency makes the cache scan
//! resistant: a block seen once cannot displace one seen repeatedly. Recency
//! still decides *which* block is the victim, so a cache of only hot keys
//! keeps LRU behaviour among them.
//!
//! Feed [`TinyLfu::record`] every access the owner learns of, hits and misses
//! alike, with [`key_hash`] of the block key; a miss must count too, or a
//! key that is not cached could never become popular enough to get in.
//!
//! # Invariants
//!
//! - Both structures are fixed-size after `new`: no allocation, no
//!   shared memory, no locks. They are the owner's private state, rebuilt
//!   from the slot table after an owner restart (the order and counts are
//!   lost, which only costs hit rate).
//! - Every method is total: out-of-range slot ids are ignored, any `u64` is a
//!   valid key hash. Nothing here panics on input from an engine.
//! - [`Lru`]: each slot at most once; [`Lru::iter_cold`] yields members from
//!   least to most recently used. Details in [`lru`].
//! - [`TinyLfu`]: estimates never under-count between resets, are at most
//!   [`tinylfu::MAX_ESTIMATE`], and halve at each reset. Details in
//!   [`tinylfu`].

pub mod lru;
pub mod tinylfu;

pub use lru::Lru;
pub use tinylfu::TinyLfu;

use xxhash_rust::xxh3::xxh3_64;

/// The key hash the owner feeds TinyLFU: xxh3 64 of namespace (little endian
/// 8 bytes) ++ 32-byte block hash.
///
/// The namespace is part of the hash because one prefix hash under two
/// models (or two TP ranks) is two different blocks with separate
/// popularity.
pub fn key_hash(namespace: u64, hash: &[u8; 32]) -> u64 {
    let mut bytes = [0u8; 40];
    bytes[..8].copy_from_slice(&namespace.to_le_bytes());
    bytes[8..].copy_from_slice(hash);
    xxh3_64(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hash_is_xxh3_of_le_namespace_then_hash() {
        let hash: [u8; 32] = std::array::from_fn(|i| i as u8);
        let mut expected = 0x0102_0304_0506_0708u64.to_le_bytes().to_vec();
        expected.extend_from_slice(&hash);
        assert_eq!(key_hash(0x0102_0304_0506_0708, &hash), xxh3_64(&expected));
    }

    #[test]
    fn key_hash_separates_namespaces() {
        let hash = [0xab; 32];
        assert_ne!(key_hash(1, &hash), key_hash(2, &hash));
        assert_ne!(key_hash(1, &hash), key_hash(1, &[0xac; 32]));
    }
}
