//! Property tests of the single-threaded invariants of the index, the ring
//! and the request codec, each against a trivially correct model.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-verify cargo test -p pegaflow-shm --test index_props
//! ```
//!
//! `PROPTEST_CASES` scales every property (default 256 sequences each).

#![cfg(not(loom))]

use std::collections::{HashMap, HashSet, VecDeque};

use proptest::prelude::*;

use pegaflow_shm::index::{home, Bucket, Index, InsertError};
use pegaflow_shm::request::{Request, TOUCH_MAX, WORDS};
use pegaflow_shm::ring::{Ring, RingHeader};
use pegaflow_shm::slot_table::BlockKey;
use pegaflow_shm::sync::AtomicU64;

// ---------------------------------------------------------------------------
// Index
// ---------------------------------------------------------------------------

/// A universe of 48 keys for a table of `nbuckets`: 16 each homed at the
/// first, second and last bucket, so probe runs are long, collide and wrap
/// around the end of the table. Keys come in pairs that differ only in
/// their last hash word, and span two namespaces.
fn universe(nbuckets: usize) -> Vec<BlockKey> {
    let mask = nbuckets as u64 - 1;
    let mut u = Vec::new();
    for want in [0, 1.min(mask), mask] {
        let mut n = 0;
        for i in 0u64.. {
            let k = BlockKey::from_words(1 + (i & 1), [i >> 1, 7, 7, 0]);
            if home(&k, mask) == want && !u.contains(&k) {
                u.push(k);
                n += 1;
                if n == 16 {
                    break;
                }
            }
        }
    }
    u
}

fn arb_key(nbuckets: usize) -> impl Strategy<Value = BlockKey> {
    proptest::sample::select(universe(nbuckets))
}

#[derive(Clone, Debug)]
enum IndexOp {
    Insert(BlockKey, u32),
    Remove(BlockKey),
    /// Remove with a slot the key does not map to: must be refused.
    RemoveWrongSlot(BlockKey),
    Get(BlockKey),
}

fn arb_index_op(nbuckets: usize) -> impl Strategy<Value = IndexOp> {
    prop_oneof![
        4 => (arb_key(nbuckets), 0u32..1000).prop_map(|(k, s)| IndexOp::Insert(k, s)),
        2 => arb_key(nbuckets).prop_map(IndexOp::Remove),
        1 => arb_key(nbuckets).prop_map(IndexOp::RemoveWrongSlot),
        1 => arb_key(nbuckets).prop_map(IndexOp::Get),
    ]
}

/// Everything that must hold between operations.
fn check_index(idx: &Index<'_>, model: &HashMap<BlockKey, u32>, universe: &[BlockKey]) {
    for (k, s) in model {
        assert_eq!(idx.get(k), Some(*s), "present key {k:?} not found");
    }
    for k in universe {
        if !model.contains_key(k) {
            assert_eq!(idx.get(k), None, "absent key {k:?} found");
        }
    }
    let mut seen = HashSet::new();
    let mut n = 0;
    for (at, k, s) in idx.entries() {
        n += 1;
        assert!(seen.insert(k), "key {k:?} stored twice");
        assert_eq!(
            model.get(&k),
            Some(&s),
            "entry {k:?} -> {s} not in the model"
        );
        assert!(
            idx.reachable(&k, at),
            "{k:?} at {at} unreachable from its home"
        );
    }
    assert_eq!(n, model.len(), "entry count");
}

fn run_index_model(nbuckets: usize, ops: &[IndexOp]) {
    let mem: Vec<Bucket> = (0..nbuckets).map(|_| Bucket::default()).collect();
    let idx = Index::new(&mem);
    let universe = universe(nbuckets);
    let mut model: HashMap<BlockKey, u32> = HashMap::new();
    for op in ops {
        match *op {
            IndexOp::Insert(k, s) => {
                let r = idx.insert(&k, s);
                match model.get(&k) {
                    Some(&old) => assert_eq!(r, Err(InsertError::Duplicate(old))),
                    None if model.len() == nbuckets => assert_eq!(r, Err(InsertError::Full)),
                    None => {
                        assert_eq!(r, Ok(()), "insert {k:?}");
                        model.insert(k, s);
                    }
                }
            }
            IndexOp::Remove(k) => {
                let s = model.get(&k).copied().unwrap_or(7);
                assert_eq!(idx.remove(&k, s), model.remove(&k).is_some());
            }
            IndexOp::RemoveWrongSlot(k) => {
                let wrong = model.get(&k).map_or(3, |s| s + 1);
                assert!(!idx.remove(&k, wrong), "removed with a wrong slot");
            }
            IndexOp::Get(k) => assert_eq!(idx.get(&k), model.get(&k).copied()),
        }
        check_index(&idx, &model, &universe);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A 16-bucket table with heavy collisions, probe runs that wrap around
    /// the end, up to a full table.
    #[test]
    fn index_matches_a_hashmap(ops in proptest::collection::vec(arb_index_op(16), 1..120)) {
        run_index_model(16, &ops);
    }

    /// The smallest legal table.
    #[test]
    fn index_tiny_table(ops in proptest::collection::vec(arb_index_op(2), 1..40)) {
        run_index_model(2, &ops);
    }

    /// A larger table, still with few homes.
    #[test]
    fn index_wide_table(ops in proptest::collection::vec(arb_index_op(64), 1..200)) {
        run_index_model(64, &ops);
    }
}

/// The universes do collide on their homes (so the properties above
/// exercise probing, wrap-around and backward shifts).
#[test]
fn the_key_universes_collide() {
    for n in [2usize, 16, 64] {
        let u = universe(n);
        let homes: HashSet<u64> = u.iter().map(|k| home(k, n as u64 - 1)).collect();
        assert_eq!(u.len(), 48);
        assert!(
            homes.len() <= 3,
            "{} homes for {} keys",
            homes.len(),
            u.len()
        );
    }
}

/// `remove` from a completely full table (`Geometry::validate` accepts
/// `index_buckets == num_slots`, so with every slot committed the index can
/// be full) terminates: the backward shift has no empty bucket to stop at.
#[test]
fn remove_from_a_full_table_terminates() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mem: Vec<Bucket> = (0..4).map(|_| Bucket::default()).collect();
        let idx = Index::new(&mem);
        let keys: Vec<_> = (0..4u8).map(|i| BlockKey::new(1, [i; 32])).collect();
        for (i, k) in keys.iter().enumerate() {
            idx.insert(k, i as u32).unwrap();
        }
        let removed = idx.remove(&keys[0], 0);
        let _ = tx.send(removed);
    });
    let r = rx.recv_timeout(std::time::Duration::from_secs(5));
    assert_eq!(r, Ok(true), "remove from a full table did not return");
}

// ---------------------------------------------------------------------------
// Ring
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum RingOp {
    Push(u64),
    Pop,
}

fn arb_ring_ops() -> impl Strategy<Value = Vec<RingOp>> {
    proptest::collection::vec(
        prop_oneof![any::<u64>().prop_map(RingOp::Push), Just(RingOp::Pop)],
        0..300,
    )
}

const RING_WORDS: usize = 3;

fn ring_entry(v: u64) -> [u64; RING_WORDS] {
    [v, !v, v.rotate_left(17)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any push/pop sequence on one thread behaves like a bounded VecDeque.
    #[test]
    fn ring_matches_a_vecdeque(cap_log in 0u32..4, ops in arb_ring_ops()) {
        let cap = 1usize << cap_log;
        let hdr = RingHeader::default();
        let words: Vec<AtomicU64> = (0..cap * RING_WORDS).map(|_| AtomicU64::new(0)).collect();
        let ring: Ring<'_, RING_WORDS> = Ring::new(&hdr, &words);
        let mut model = VecDeque::new();
        let mut moved = 0u64;
        for op in ops {
            match op {
                RingOp::Push(v) => {
                    let ok = ring.push(&ring_entry(v));
                    prop_assert_eq!(ok, model.len() < cap, "push on len {}", model.len());
                    if ok {
                        model.push_back(v);
                    }
                }
                RingOp::Pop => {
                    let got = ring.pop().expect("a ring used by the book is never corrupt");
                    prop_assert_eq!(got, model.pop_front().map(ring_entry));
                    if got.is_some() {
                        moved += 1;
                    }
                }
            }
            prop_assert_eq!(ring.len(), model.len() as u64);
            prop_assert_eq!(ring.is_empty(), model.is_empty());
            let (head, tail) = ring.positions();
            prop_assert_eq!(head, moved);
            prop_assert_eq!(tail - head, model.len() as u64);
        }
    }

    /// Whatever a broken producer writes to `tail`, `pop` reports corruption
    /// or returns an entry; it never panics, and never claims more than the
    /// capacity is queued.
    #[test]
    fn ring_survives_a_garbage_tail(tail in any::<u64>(), head in any::<u64>()) {
        let hdr = RingHeader::default();
        let words: Vec<AtomicU64> = (0..4).map(|_| AtomicU64::new(0)).collect();
        let ring: Ring<'_, 1> = Ring::new(&hdr, &words);
        hdr.head.value.store(head, std::sync::atomic::Ordering::SeqCst);
        hdr.tail.value.store(tail, std::sync::atomic::Ordering::SeqCst);
        let len = tail.wrapping_sub(head);
        match ring.pop() {
            Err(e) => prop_assert!(len > 4, "error {e} on a valid ring"),
            Ok(None) => prop_assert_eq!(len, 0),
            Ok(Some(_)) => prop_assert!((1..=4).contains(&len)),
        }
        prop_assert!(ring.len() <= 4);
    }
}

// ---------------------------------------------------------------------------
// Request codec
// ---------------------------------------------------------------------------

fn arb_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<[u8; 32]>()
        )
            .prop_map(|(slot, gen, len, ns, hash)| Request::Commit {
                slot,
                gen,
                len,
                key: BlockKey::new(ns, hash),
            }),
        (any::<u32>(), any::<u32>()).prop_map(|(slot, gen)| Request::Abort { slot, gen }),
        (any::<u64>(), any::<[u8; 32]>()).prop_map(|(ns, hash)| Request::Stage {
            key: BlockKey::new(ns, hash),
        }),
        (0..=TOUCH_MAX as u32, any::<[u32; TOUCH_MAX]>()).prop_map(|(count, mut slots)| {
            // Unused slots are zero on the wire.
            slots[count as usize..].iter_mut().for_each(|s| *s = 0);
            Request::Touch { count, slots }
        }),
    ]
}

/// Words that are often almost valid: a real tag with random payload.
fn arb_words() -> impl Strategy<Value = [u64; WORDS]> {
    (any::<[u64; WORDS]>(), 0u64..6, any::<u32>(), any::<u8>()).prop_map(
        |(mut w, tag, arg, zeros)| {
            if tag < 5 {
                w[0] = tag | u64::from(arg % 20) << 32;
            }
            for (i, x) in w.iter_mut().enumerate().skip(1) {
                if zeros & (1 << i) != 0 {
                    *x = 0;
                }
            }
            w
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn request_round_trips(r in arb_request()) {
        prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
    }

    /// `decode` never panics, and what it accepts it would have encoded the
    /// same way (the encoding is canonical: no two inputs mean one request).
    #[test]
    fn request_decode_total_and_canonical(w in arb_words()) {
        if let Ok(r) = Request::decode(&w) {
            prop_assert_eq!(r.encode(), w);
            if let Request::Touch { count, .. } = r {
                prop_assert!(count as usize <= TOUCH_MAX);
            }
        }
    }

    #[test]
    fn request_decode_never_panics_on_any_words(w in any::<[u64; WORDS]>()) {
        let _ = Request::decode(&w);
    }
}
