//! TinyLFU admission: a frequency sketch that decides whether a new block is
//! worth an eviction (Einziger, Friedman, Manes, "TinyLFU: A Highly Efficient
//! Cache Admission Policy", ACM ToS 2017).
//!
//! Three parts, as in the paper:
//!
//! - A **count-min sketch** of [`DEPTH`] rows of `width` 4-bit counters, 16
//!   to a `u64`. A key has one counter per row, picked by a per-row hash; its
//!   frequency is the minimum of the four. Updates are *conservative* (the
//!   paper's "minimal increment"): only the counters equal to that minimum
//!   are incremented, which keeps the estimate tighter without ever making it
//!   lower than the true count.
//! - A **doorkeeper**, a Bloom filter in front of the sketch. A key's first
//!   access only sets its doorkeeper bits; later ones reach the sketch. Most
//!   keys of an LLM workload are one-off prompts, so this keeps them from
//!   polluting the counters of the keys that matter.
//! - **Reset** for freshness: every record is counted, and when the count
//!   reaches `sample_size` every counter and the count itself are halved and
//!   the doorkeeper is cleared. Yesterday's popular prefix thus fades instead
//!   of blocking today's forever. The first reset comes after `sample_size`
//!   records, later ones every `sample_size / 2`.
//!
//! # Invariants
//!
//! - [`TinyLfu::estimate`] never under-counts the records since the last
//!   reset: `estimate(k) >= min(those records of k, MAX_ESTIMATE)`
//!   (count-min property; collisions only ever add).
//! - Counters saturate at 15 instead of wrapping, so
//!   `estimate(k) <= MAX_ESTIMATE` (15 from the sketch plus 1 doorkeeper bit).
//! - A reset takes every estimate `e` to at most `e / 2`.
//! - The structure is fixed-size: nothing allocates after [`TinyLfu::new`].

use std::fmt;

/// Rows of the count-min sketch.
pub const DEPTH: usize = 4;

/// The largest value [`TinyLfu::estimate`] returns: a saturated 4-bit counter
/// plus the doorkeeper bit.
pub const MAX_ESTIMATE: u32 = COUNTER_MAX as u32 + 1;

const COUNTER_MAX: u64 = 15;

/// Bloom filter probes per key in the doorkeeper.
const DOOR_PROBES: usize = 2;

/// Records per expected item between resets; the paper's and Caffeine's
/// choice, long enough for a popular key to reach a clear count.
const SAMPLE_FACTOR: u64 = 10;

/// Slot ids are `u32`, so a pool never holds more items than this; clamping
/// keeps the size arithmetic far from overflow.
const MAX_EXPECTED_ITEMS: usize = 1 << 32;

/// Independent per-row (and per-probe) hashes are the same mixer over the key
/// xored with a different seed. Arbitrary odd 64-bit constants (the first
/// four are Caffeine's sketch seeds).
const ROW_SEEDS: [u64; DEPTH] = [
    0xc3a5_c85c_97cb_3127,
    0xb492_b66f_be98_f273,
    0x9ae1_6a3b_2f90_404f,
    0xcbf2_9ce4_8422_2325,
];
const DOOR_SEEDS: [u64; DOOR_PROBES] = [0x8ebc_6af0_9c88_c6e3, 0x5896_5d23_6d0a_1b45];
const TIE_SEED: u64 = 0xd6e8_feb8_6659_fd93;

/// A tie admits when these low bits of the coin are zero: 1 time in 128.
const TIE_ADMIT_MASK: u64 = 127;

/// TinyLFU admission (Einziger et al.): a count-min sketch of 4-bit counters
/// with a doorkeeper bloom filter, periodically halved ("reset") after
/// `sample_size` recorded events so old popularity fades.
///
/// Memory: `2 * width` bytes of sketch (`width` is `expected_items` rounded
/// up to a power of two; 4 rows of half-byte counters) plus `sample_size`
/// rounded up to a power of two bits of doorkeeper: 3.25 to 6.5 bytes per
/// expected item in all, e.g. 4 MiB for a million slots.
#[derive(Clone)]
pub struct TinyLfu {
    /// `DEPTH` rows of `width` nibbles, row-major, 16 nibbles per word.
    sketch: Box<[u64]>,
    words_per_row: usize,
    /// `width - 1`; `width` is a power of two so this picks a column.
    col_mask: u64,
    doorkeeper: Box<[u64]>,
    /// `doorkeeper bits - 1`, a power of two minus one.
    door_mask: u64,
    /// Records since the last reset (halved, not zeroed, by a reset).
    events: u64,
    sample_size: u64,
    resets: u64,
}

impl TinyLfu {
    /// `expected_items`: roughly the number of slots in the pool; sizes the
    /// sketch (width a power of two >= expected_items, depth 4) and
    /// sample_size = 10 * expected_items.
    ///
    /// `0` is treated as `1`; values above `2^32` as `2^32`.
    pub fn new(expected_items: usize) -> Self {
        let expected = expected_items.clamp(1, MAX_EXPECTED_ITEMS);
        // At least one whole word per row, so a row never shares a word.
        let width = expected.next_power_of_two().max(16);
        let words_per_row = width / 16;
        let sample_size = SAMPLE_FACTOR * expected as u64;
        // Sized for the distinct keys one sample period can hold, at most
        // `sample_size`; a false positive only costs a one-hit wonder an
        // estimate of 2 instead of 1.
        let door_bits = sample_size.next_power_of_two().max(64);
        Self {
            sketch: vec![0; DEPTH * words_per_row].into_boxed_slice(),
            words_per_row,
            col_mask: width as u64 - 1,
            doorkeeper: vec![0; (door_bits / 64) as usize].into_boxed_slice(),
            door_mask: door_bits - 1,
            events: 0,
            sample_size,
            resets: 0,
        }
    }

    /// One access of the key.
    pub fn record(&mut self, key_hash: u64) {
        if self.door_test_and_set(key_hash) {
            let cells = self.cells(key_hash);
            let min = self.min_counter(&cells);
            if min < COUNTER_MAX {
                for (word, shift) in cells {
                    if (self.sketch[word] >> shift) & 0xf == min {
                        self.sketch[word] += 1 << shift;
                    }
                }
            }
        }
        self.events += 1;
        if self.events >= self.sample_size {
            self.reset();
        }
    }

    /// Frequency estimate incl. doorkeeper bit, in `0..=MAX_ESTIMATE`.
    pub fn estimate(&self, key_hash: u64) -> u32 {
        let sketch = self.min_counter(&self.cells(key_hash)) as u32;
        sketch + u32::from(self.door_contains(key_hash))
    }

    /// Admit `candidate` into a full cache if it is estimated more frequent
    /// than `victim` (strictly greater; ties reject, as in Caffeine, but use a
    /// small random-ish tie break: admit on tie with probability ~1/128
    /// derived from the candidate hash so a new hot key can still get in).
    ///
    /// The tie break is salted with the number of records since the last
    /// reset, so one candidate is not forever on the same side of the coin:
    /// two keys that both saturated at [`MAX_ESTIMATE`] would otherwise only
    /// be told apart by the next reset.
    pub fn admit(&self, candidate: u64, victim: u64) -> bool {
        let (c, v) = (self.estimate(candidate), self.estimate(victim));
        if c != v {
            return c > v;
        }
        let coin = mix(candidate ^ TIE_SEED ^ self.events.rotate_left(32));
        coin & TIE_ADMIT_MASK == 0
    }

    /// How many times the sketch has been halved since `new`.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Records that trigger the first reset (`10 * expected_items`).
    pub fn sample_size(&self) -> u64 {
        self.sample_size
    }

    /// Halves every counter and the event count, clears the doorkeeper.
    ///
    /// O(size of the structure), amortised O(1) over the `sample_size / 2`
    /// records between resets.
    fn reset(&mut self) {
        for word in self.sketch.iter_mut() {
            // Shifting the whole word moves each nibble's low bit into the
            // top bit of the nibble below; the mask drops those bits.
            *word = (*word >> 1) & 0x7777_7777_7777_7777;
        }
        self.doorkeeper.fill(0);
        self.events /= 2;
        self.resets += 1;
    }

    /// `(word index, bit shift)` of the key's counter in each row.
    fn cells(&self, key_hash: u64) -> [(usize, u32); DEPTH] {
        std::array::from_fn(|row| {
            let col = (mix(key_hash ^ ROW_SEEDS[row]) & self.col_mask) as usize;
            (row * self.words_per_row + col / 16, (col % 16) as u32 * 4)
        })
    }

    fn min_counter(&self, cells: &[(usize, u32); DEPTH]) -> u64 {
        cells
            .iter()
            .map(|&(word, shift)| (self.sketch[word] >> shift) & 0xf)
            .min()
            .unwrap_or(0)
    }

    fn door_bits(&self, key_hash: u64) -> [(usize, u64); DOOR_PROBES] {
        std::array::from_fn(|probe| {
            let bit = mix(key_hash ^ DOOR_SEEDS[probe]) & self.door_mask;
            ((bit / 64) as usize, 1 << (bit % 64))
        })
    }

    fn door_contains(&self, key_hash: u64) -> bool {
        self.door_bits(key_hash)
            .iter()
            .all(|&(word, bit)| self.doorkeeper[word] & bit != 0)
    }

    /// Sets the key's doorkeeper bits; returns whether they were all set
    /// already, i.e. whether this access should reach the sketch.
    fn door_test_and_set(&mut self, key_hash: u64) -> bool {
        let mut seen = true;
        for (word, bit) in self.door_bits(key_hash) {
            seen &= self.doorkeeper[word] & bit != 0;
            self.doorkeeper[word] |= bit;
        }
        seen
    }
}

/// splitmix64's finaliser: a bijective mixer, so distinct seeded inputs give
/// well-spread, independent-looking columns. Needed even though the owner
/// feeds xxh3 output: the sketch must not depend on its callers' hashing.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl fmt::Debug for TinyLfu {
    /// Summary only: the tables are proportional to the pool.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TinyLfu")
            .field("width", &(self.col_mask + 1))
            .field("doorkeeper_bits", &(self.door_mask + 1))
            .field("events", &self.events)
            .field("sample_size", &self.sample_size)
            .field("resets", &self.resets)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct, unstructured-looking keys, as xxh3 would produce.
    fn key(i: u64) -> u64 {
        mix(i ^ 0x1234_5678)
    }

    #[test]
    fn sizing_follows_expected_items() {
        let lfu = TinyLfu::new(1000);
        assert_eq!(lfu.col_mask + 1, 1024);
        assert_eq!(lfu.sketch.len(), DEPTH * 1024 / 16);
        assert_eq!(lfu.sample_size(), 10_000);
        assert_eq!(lfu.door_mask + 1, 16_384);

        // Degenerate sizes still give a working sketch.
        for n in [0, 1, 3] {
            let mut lfu = TinyLfu::new(n);
            assert_eq!(lfu.col_mask + 1, 16);
            lfu.record(key(1));
            assert_eq!(lfu.estimate(key(1)), 1);
        }
    }

    #[test]
    fn first_access_only_reaches_the_doorkeeper() {
        let mut lfu = TinyLfu::new(1024);
        assert_eq!(lfu.estimate(key(7)), 0);
        lfu.record(key(7));
        assert!(lfu.door_contains(key(7)));
        assert_eq!(lfu.min_counter(&lfu.cells(key(7))), 0);
        assert_eq!(lfu.estimate(key(7)), 1);
    }

    #[test]
    fn counts_up_and_saturates() {
        let mut lfu = TinyLfu::new(1024);
        for n in 1..=40 {
            lfu.record(key(1));
            assert_eq!(lfu.estimate(key(1)), n.min(MAX_ESTIMATE));
        }
        assert_eq!(lfu.min_counter(&lfu.cells(key(1))), COUNTER_MAX);
        // Saturation must not carry into the neighbouring nibble.
        assert_eq!(lfu.estimate(key(2)), 0);
        assert_eq!(lfu.resets(), 0);
    }

    #[test]
    fn reset_halves_counters_and_clears_doorkeeper() {
        let mut lfu = TinyLfu::new(16); // sample_size 160
        for _ in 0..12 {
            lfu.record(key(1)); // estimate 12: 11 in the sketch + door
        }
        for _ in 0..5 {
            lfu.record(key(2)); // estimate 5
        }
        let before = lfu.resets();
        while lfu.resets() == before {
            lfu.record(key(3)); // saturates at 16
        }
        assert_eq!(lfu.resets(), 1);
        assert_eq!(lfu.estimate(key(1)), 11 / 2);
        assert_eq!(lfu.estimate(key(2)), 4 / 2);
        assert_eq!(lfu.estimate(key(3)), 15 / 2);
        assert!(!lfu.door_contains(key(1)));
        // The event count is halved, so the next reset comes half a sample later.
        assert_eq!(lfu.events, lfu.sample_size() / 2);
        for _ in 0..lfu.sample_size() / 2 {
            lfu.record(key(4));
        }
        assert_eq!(lfu.resets(), 2);
    }

    #[test]
    fn reset_does_not_leak_bits_between_nibbles() {
        let mut lfu = TinyLfu::new(64);
        // Every counter odd and maximal: a plain shift would carry each
        // nibble's low bit into its neighbour, turning 15 into 15, not 7.
        lfu.sketch.fill(u64::MAX);
        lfu.reset();
        assert!(lfu.sketch.iter().all(|&w| w == 0x7777_7777_7777_7777));
        lfu.sketch.fill(0x1111_1111_1111_1111);
        lfu.reset();
        assert!(lfu.sketch.iter().all(|&w| w == 0));
    }

    #[test]
    fn hot_candidate_is_admitted_over_cold_victim() {
        let mut lfu = TinyLfu::new(1024);
        let (hot, cold) = (key(1), key(2));
        lfu.record(cold);
        for _ in 0..5 {
            lfu.record(hot);
        }
        assert!(lfu.admit(hot, cold));
        assert!(lfu.admit(hot, key(3)), "never-seen victim");
    }

    #[test]
    fn one_hit_wonder_is_rejected_against_hot_victim() {
        let mut lfu = TinyLfu::new(1024);
        let hot = key(1);
        for _ in 0..5 {
            lfu.record(hot);
        }
        // A scan of one-off prompts: each key seen once, none may get in, and
        // the scan itself (record by record) must not change that.
        for i in 100..1100 {
            lfu.record(key(i));
            assert!(
                !lfu.admit(key(i), hot),
                "one-off key {i} displaced a hot one"
            );
        }
    }

    #[test]
    fn ties_are_admitted_rarely() {
        let lfu = TinyLfu::new(1024);
        let trials = 128 * 200;
        // Fresh sketch: every estimate is 0, so every pair is a tie.
        let admitted = (0..trials)
            .filter(|&i| lfu.admit(key(i), key(u64::MAX)))
            .count();
        assert!(
            (100..=300).contains(&admitted),
            "{admitted} of {trials} ties admitted"
        );
    }

    #[test]
    fn tie_break_changes_as_records_arrive() {
        // A candidate that loses a tie now can win it later: the coin is
        // salted with the event count.
        let mut lfu = TinyLfu::new(1 << 16);
        let (candidate, victim) = (key(1), key(2));
        let mut outcomes = [false, false];
        for i in 0..10_000 {
            outcomes[usize::from(lfu.admit(candidate, victim))] = true;
            lfu.record(key(1_000_000 + i));
        }
        assert_eq!(outcomes, [true, true]);
    }
}
