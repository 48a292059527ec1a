//! Property tests of the eviction structures (`pegaflow_owner::evict`).
//!
//! `Lru` is checked against an obviously correct model; `TinyLfu` against the
//! invariants its module docs promise.

use std::collections::{HashMap, VecDeque};

use pegaflow_owner::evict::tinylfu::MAX_ESTIMATE;
use pegaflow_owner::evict::{Lru, TinyLfu};
use proptest::prelude::*;
use proptest::sample::Index;

#[derive(Debug, Clone)]
enum LruOp {
    InsertHot(u32),
    Touch(u32),
    Remove(u32),
}

/// Ops over ids slightly past `capacity`, so out-of-range ids are exercised.
fn lru_op(capacity: u32) -> impl Strategy<Value = LruOp> {
    let id = 0..capacity + 4;
    prop_oneof![
        3 => id.clone().prop_map(LruOp::InsertHot),
        2 => id.clone().prop_map(LruOp::Touch),
        2 => id.prop_map(LruOp::Remove),
    ]
}

fn lru_case() -> impl Strategy<Value = (u32, Vec<LruOp>)> {
    (0u32..40).prop_flat_map(|cap| (Just(cap), prop::collection::vec(lru_op(cap), 0..300)))
}

/// The model: front is the coldest, back the hottest; O(n), obviously right.
struct Model {
    capacity: u32,
    order: VecDeque<u32>,
}

impl Model {
    fn remove(&mut self, slot: u32) -> bool {
        match self.order.iter().position(|&s| s == slot) {
            Some(i) => {
                self.order.remove(i);
                true
            }
            None => false,
        }
    }

    fn insert_hot(&mut self, slot: u32) {
        if slot < self.capacity {
            self.remove(slot);
            self.order.push_back(slot);
        }
    }

    fn touch(&mut self, slot: u32) {
        if self.remove(slot) {
            self.order.push_back(slot);
        }
    }
}

/// Random key universes: a few arbitrary `u64` hashes, accesses index into it.
fn lfu_case(
    expected: std::ops::Range<usize>,
    accesses: std::ops::Range<usize>,
) -> impl Strategy<Value = (usize, Vec<u64>, Vec<u64>)> {
    (
        expected,
        prop::collection::vec(any::<u64>(), 1..40),
        prop::collection::vec(any::<Index>(), accesses),
    )
        .prop_map(|(expected, keys, picks)| {
            let seq = picks.iter().map(|i| keys[i.index(keys.len())]).collect();
            (expected, keys, seq)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn lru_matches_model((capacity, ops) in lru_case()) {
        let mut lru = Lru::new(capacity);
        let mut model = Model { capacity, order: VecDeque::new() };
        for op in ops {
            match op {
                LruOp::InsertHot(s) => {
                    lru.insert_hot(s);
                    model.insert_hot(s);
                }
                LruOp::Touch(s) => {
                    lru.touch(s);
                    model.touch(s);
                }
                LruOp::Remove(s) => prop_assert_eq!(lru.remove(s), model.remove(s)),
            }
            let order: Vec<u32> = lru.iter_cold().collect();
            prop_assert!(order.iter().eq(model.order.iter()), "{:?} vs {:?}", order, model.order);
            prop_assert_eq!(lru.len(), model.order.len());
            prop_assert_eq!(lru.is_empty(), model.order.is_empty());
            prop_assert_eq!(lru.coldest(), model.order.front().copied());
            for s in 0..capacity + 4 {
                prop_assert_eq!(lru.contains(s), model.order.contains(&s));
            }
        }
    }

    /// Count-min property: before the first reset, an estimate is never
    /// below the true count (up to saturation), and never above the cap.
    #[test]
    fn tinylfu_never_undercounts_before_reset(
        (expected, keys, seq) in lfu_case(64..512, 0..600),
    ) {
        let mut lfu = TinyLfu::new(expected);
        prop_assert!(lfu.sample_size() > seq.len() as u64);
        let mut truth: HashMap<u64, u32> = HashMap::new();
        for k in seq {
            lfu.record(k);
            let n = truth.entry(k).or_default();
            *n += 1;
            prop_assert!(lfu.estimate(k) >= (*n).min(MAX_ESTIMATE));
        }
        prop_assert_eq!(lfu.resets(), 0);
        for k in keys {
            let n = truth.get(&k).copied().unwrap_or(0);
            let e = lfu.estimate(k);
            prop_assert!(e >= n.min(MAX_ESTIMATE), "key {:#x}: estimate {} < count {}", k, e, n);
            prop_assert!(e <= MAX_ESTIMATE);
        }
    }

    /// Counters saturate at 15 (plus the doorkeeper bit) instead of wrapping,
    /// however long the run and however many resets happen.
    #[test]
    fn tinylfu_saturates(
        (expected, keys, seq) in lfu_case(1..256, 0..3000),
        hot in any::<u64>(),
    ) {
        let mut lfu = TinyLfu::new(expected);
        for k in seq {
            lfu.record(k);
            prop_assert!(lfu.estimate(k) <= MAX_ESTIMATE);
        }
        for k in &keys {
            prop_assert!(lfu.estimate(*k) <= MAX_ESTIMATE);
        }
        // Hammer one key within a single sample period: it reaches the cap
        // exactly, and stays there.
        let mut fresh = TinyLfu::new(expected.max(8));
        for _ in 0..2 * MAX_ESTIMATE {
            fresh.record(hot);
        }
        prop_assert_eq!(fresh.resets(), 0);
        prop_assert_eq!(fresh.estimate(hot), MAX_ESTIMATE);
    }

    /// A reset at most halves every estimate (+1 for the record that
    /// triggered it), for the recorded keys and the bystanders alike.
    #[test]
    fn tinylfu_reset_halves((expected, keys, seq) in lfu_case(1..32, 0..2000)) {
        let mut lfu = TinyLfu::new(expected);
        for k in seq {
            let before: Vec<u32> = keys.iter().map(|&p| lfu.estimate(p)).collect();
            let resets = lfu.resets();
            lfu.record(k);
            if lfu.resets() != resets {
                for (&p, &b) in keys.iter().zip(&before) {
                    let after = lfu.estimate(p);
                    prop_assert!(after <= b / 2 + 1, "key {:#x}: {} -> {}", p, b, after);
                }
            }
        }
    }
}
