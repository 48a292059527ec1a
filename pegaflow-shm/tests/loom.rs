//! Loom models of the lock-free algorithms of `pegaflow-shm`, over heap
//! copies of the shm structs (under `--cfg loom` the crate's atomics are
//! loom's, see `src/sync.rs`).
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=/work/target-loom \
//!     cargo test -p pegaflow-shm --test loom --release
//! ```
//!
//! `LOOM_MAX_PREEMPTIONS` overrides the per-model preemption bound below.
//!
//! ## Modelling notes
//!
//! - loom 0.7 treats `SeqCst` loads and stores as `AcqRel`, except that a
//!   `SeqCst` load never returns a `SeqCst` store older than another `SeqCst`
//!   store already executed. An atomic's initial value counts as a
//!   non-`SeqCst` store, so every atomic a Dekker handshake reads is given
//!   its starting value with an explicit `SeqCst` store before the threads
//!   start ([`seq_cst_zero`]). Without that, loom reports store-buffering
//!   outcomes that real `SeqCst` forbids (false alarms).
//! - loom does not model load buffering, and entry words are atomics, so a
//!   missing `Release` on the consumer's `head` store is not caught here.
//! - loom's DPOR keeps one "last access" per atomic, so a thread that loads
//!   then stores a location hides another thread's earlier load of it, and a
//!   freshly spawned thread that starts with a load is never run before its
//!   parent's next access ([tokio-rs/loom#392]). Every model therefore
//!   runs twice, with and without a yield of the parent after each
//!   [`spawn`], and puts a yield between API calls, so each interleaving of
//!   whole operations is a branch loom must try. Each model was checked to catch a seeded bug (see the report
//!   in `docs/fuzzing.md`).
//! - The doorbell's futex is a yield under loom, so its model keeps a
//!   sleeper that found no work asleep (flag raised) until the ringer is
//!   done, as FUTEX_WAIT would.
//!
//! [tokio-rs/loom#392]: https://github.com/tokio-rs/loom/issues/392

#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;

use pegaflow_shm::index::{home, Bucket, Index};
use pegaflow_shm::ring::{Ring, RingHeader};
use pegaflow_shm::slot_table::{
    any_pinned, withdraw_pin, BlockKey, SlotEntry, SlotKind, SlotState,
};
use pegaflow_shm::sync::{AtomicU32, AtomicU64, Ordering};

std::thread_local! {
    /// Whether [`spawn`] yields in the parent; [`model`] explores both.
    static YIELD_AFTER_SPAWN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Check `f` under loom, twice: once as written and once with the parent
/// yielding right after each spawn (loom's DPOR misses some interleavings
/// of each, see the module notes). `bound` is the default preemption bound
/// (env `LOOM_MAX_PREEMPTIONS` wins when set).
fn model(bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let f = std::sync::Arc::new(f);
    for yield_after_spawn in [false, true] {
        YIELD_AFTER_SPAWN.with(|y| y.set(yield_after_spawn));
        let mut b = loom::model::Builder::new();
        if b.preemption_bound.is_none() {
            b.preemption_bound = Some(bound);
        }
        // Count the executions explored, so a model that silently shrank shows.
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (r, f) = (runs.clone(), f.clone());
        b.check(move || {
            r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            f()
        });
        eprintln!(
            "loom: {} executions (preemption bound {:?}, yield after spawn: {})",
            runs.load(std::sync::atomic::Ordering::Relaxed),
            b.preemption_bound,
            yield_after_spawn
        );
    }
}

/// `thread::spawn`, with two work-arounds for loom's exploration (see the
/// module notes): the child's first access is a store to a private cell,
/// and in the second pass of [`model`] the parent yields after spawning.
fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
    let warm = Arc::new(AtomicU64::new(0));
    let h = thread::spawn(move || {
        warm.store(1, Ordering::Relaxed);
        f()
    });
    if YIELD_AFTER_SPAWN.with(|y| y.get()) {
        thread::yield_now();
    }
    h
}

/// Give `a` the value 0 with a `SeqCst` store (see the module notes).
fn seq_cst_zero(a: &AtomicU32) {
    a.store(0, Ordering::SeqCst);
}

// ---------------------------------------------------------------------------
// SPSC ring
// ---------------------------------------------------------------------------

struct RingMem {
    hdr: RingHeader,
    words: Vec<AtomicU64>,
}

impl RingMem {
    fn new(cap: usize, n: usize) -> Arc<RingMem> {
        Arc::new(RingMem {
            hdr: RingHeader::default(),
            words: (0..cap * n).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn ring<const N: usize>(&self) -> Ring<'_, N> {
        Ring::new(&self.hdr, &self.words)
    }
}

/// Entry `i` of the stream: every word differs, and none is zero, so a torn
/// or stale read (zeroed memory, a word of the previous lap) shows.
fn entry<const N: usize>(i: u64) -> [u64; N] {
    std::array::from_fn(|w| (i + 1) * 1000 + w as u64 + 1)
}

/// One producer pushes `items` entries through a ring of `cap` entries of `N`
/// words while one consumer pops them: in order, none lost, none duplicated,
/// never torn; `push` refuses only a full ring. Both sides yield only when
/// they must wait (a yield makes loom stop offering stale values of what the
/// thread read before it).
fn ring_spsc<const N: usize>(cap: usize, items: u64) {
    let mem = RingMem::new(cap, N);
    let m = mem.clone();
    let producer = spawn(move || {
        let r = m.ring::<N>();
        for i in 0..items {
            while !r.push(&entry::<N>(i)) {
                // Full: only possible once `cap` entries were pushed and the
                // consumer has not freed the oldest yet.
                assert!(i >= cap as u64, "push refused a ring that cannot be full");
                thread::yield_now();
            }
        }
    });
    let m = mem.clone();
    let consumer = spawn(move || {
        let r = m.ring::<N>();
        let mut got = 0;
        while got < items {
            match r.pop().expect("ring reported corrupt") {
                Some(e) => {
                    assert_eq!(e, entry::<N>(got), "out of order, lost or torn");
                    got += 1;
                }
                None => thread::yield_now(),
            }
        }
    });
    producer.join().unwrap();
    consumer.join().unwrap();
    let r = mem.ring::<N>();
    assert_eq!(r.pop(), Ok(None), "duplicate entry");
    assert!(r.is_empty());
    assert_eq!(r.positions(), (items, items));
}

#[test]
fn ring_one_word_entries_wrap() {
    model(3, || ring_spsc::<1>(2, 4));
}

#[test]
fn ring_multi_word_entries_never_torn() {
    model(4, || ring_spsc::<3>(2, 3));
}

#[test]
fn ring_capacity_one() {
    model(4, || ring_spsc::<2>(1, 3));
}

/// Both ends busy: the consumer pops concurrently with a producer that keeps
/// the ring full, and `len` never exceeds the capacity.
#[test]
fn ring_len_is_bounded() {
    model(4, || {
        let mem = RingMem::new(2, 1);
        let m = mem.clone();
        let producer = spawn(move || {
            let r = m.ring::<1>();
            let mut pushed = 0;
            for i in 0..3 {
                if r.push(&entry::<1>(i)) {
                    pushed += 1;
                }
                assert!(r.len() <= r.capacity());
            }
            pushed
        });
        let m = mem.clone();
        let consumer = spawn(move || {
            let r = m.ring::<1>();
            let mut got = 0;
            for _ in 0..2 {
                if let Some(e) = r.pop().unwrap() {
                    assert_eq!(e, entry::<1>(got), "out of order, lost or torn");
                    got += 1;
                }
                assert!(r.len() <= r.capacity());
            }
            got
        });
        let pushed = producer.join().unwrap();
        let mut got = consumer.join().unwrap();
        assert!(pushed >= 2, "an empty 2-entry ring refused a push");
        let r = mem.ring::<1>();
        while let Some(e) = r.pop().unwrap() {
            assert_eq!(e, entry::<1>(got));
            got += 1;
        }
        assert_eq!(got, pushed);
    });
}

// ---------------------------------------------------------------------------
// Pin / evict handshake
// ---------------------------------------------------------------------------

const NS: u64 = 7;

fn key(n: u8) -> BlockKey {
    BlockKey::new(NS, [n; 32])
}

/// What the owner writes into a slot's pool bytes before committing `key`
/// at generation `gen`.
fn data_for(k: u8, gen: u32) -> u64 {
    (u64::from(k) << 32) | u64::from(gen)
}

/// How the model's pool bytes are held.
trait Data: Send + Sync + 'static {
    fn new(v: u64) -> Self;
    /// Engine, under a pin.
    fn read(&self) -> u64;
    /// Owner, only after the slot is free.
    fn write(&self, v: u64);
}

/// Atomic words, as the brief asks: a stale or early read shows as a wrong
/// value.
struct AtomicData(AtomicU64);

impl Data for AtomicData {
    fn new(v: u64) -> Self {
        AtomicData(AtomicU64::new(v))
    }
    fn read(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    fn write(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed)
    }
}

/// Plain (non-atomic) bytes, as the pool really is: loom's causality checker
/// fails on any read and write of it that are not ordered by happens-before,
/// i.e. a data race between a DMA under a pin and the owner's reuse.
struct PlainData(UnsafeCell<u64>);

// SAFETY: every access goes through loom's checked `with`/`with_mut`, which
// fail the model on any unsynchronised pair; that is the point of the type.
unsafe impl Sync for PlainData {}

impl Data for PlainData {
    fn new(v: u64) -> Self {
        PlainData(UnsafeCell::new(v))
    }
    fn read(&self) -> u64 {
        // SAFETY: loom checks the access; a race panics the model.
        self.0.with(|p| unsafe { *p })
    }
    fn write(&self, v: u64) {
        // SAFETY: as above.
        self.0.with_mut(|p| unsafe { *p = v })
    }
}

struct PinWorld<D> {
    slot: SlotEntry,
    /// One pin counter per engine for this slot.
    pins: Vec<AtomicU32>,
    data: D,
}

/// A slot committed with `key(1)` at generation 0, and `engines` zero pins.
fn pin_world<D: Data>(engines: usize) -> Arc<PinWorld<D>> {
    let w = PinWorld {
        slot: SlotEntry::default(),
        pins: (0..engines).map(|_| AtomicU32::new(0)).collect(),
        data: D::new(data_for(1, 0)),
    };
    for p in &w.pins {
        seq_cst_zero(p);
    }
    w.slot.start_writing(SlotState::FREE, 0);
    w.slot.commit(w.slot.load_state().unwrap(), &key(1), 1, 0);
    Arc::new(w)
}

/// Engine `e`: pin the slot for `key(k)`; while pinned, the slot must be the
/// life it validated and its bytes must be that life's.
fn engine<D: Data>(w: &PinWorld<D>, e: usize, k: u8) -> bool {
    let pin = &w.pins[e];
    let Some(gen) = w.slot.try_pin(pin, &key(k)) else {
        assert_eq!(pin.load(Ordering::SeqCst), 0, "failed pin leaked a count");
        return false;
    };
    assert_eq!(
        w.data.read(),
        data_for(k, gen),
        "pinned slot's bytes reused"
    );
    let st = w.slot.load_state().expect("valid state");
    assert_eq!(st.gen, gen, "slot freed while pinned");
    assert!(
        matches!(st.kind, SlotKind::Committed | SlotKind::Evicting),
        "slot {st:?} while pinned"
    );
    assert_eq!(
        w.data.read(),
        data_for(k, gen),
        "pinned slot's bytes reused"
    );
    withdraw_pin(pin);
    true
}

/// The owner: try to evict up to `attempts` times; once it succeeds, free
/// the slot, overwrite its bytes and commit `key(reuse_as)` in it.
fn owner<D: Data>(w: &PinWorld<D>, attempts: usize, reuse_as: u8) -> bool {
    for _ in 0..attempts {
        let Some(st) = w.slot.begin_evict() else {
            return false;
        };
        if any_pinned(w.pins.iter()) {
            w.slot.abort_evict(st);
            continue;
        }
        w.slot.free(st);
        let free = w.slot.load_state().unwrap();
        assert_eq!((free.kind, free.gen), (SlotKind::Free, st.gen + 1));
        // The slot is the owner's now: a new block lands in it.
        w.data.write(data_for(reuse_as, free.gen));
        w.slot.start_writing(free, 0);
        w.slot
            .commit(w.slot.load_state().unwrap(), &key(reuse_as), 1, 1);
        return true;
    }
    false
}

/// One engine looks up `lookup` while the owner evicts the slot and reuses
/// it for `reuse_as`.
fn pin_vs_evict<D: Data>(lookup: u8, reuse_as: u8) {
    let w = pin_world::<D>(1);
    let w2 = w.clone();
    let e = spawn(move || engine(&w2, 0, lookup));
    let w2 = w.clone();
    let o = spawn(move || owner(&w2, 2, reuse_as));
    e.join().unwrap();
    let evicted = o.join().unwrap();
    assert_eq!(w.pins[0].load(Ordering::SeqCst), 0, "pin leaked");
    // The owner backs off from any announced pin, even one that then fails
    // validation; either way the slot is whole.
    let st = w.slot.load_state().unwrap();
    let (k, gen) = if evicted { (reuse_as, 1) } else { (1, 0) };
    assert_eq!((st.kind, st.gen), (SlotKind::Committed, gen));
    assert_eq!(w.slot.key(), key(k));
    assert_eq!(w.data.read(), data_for(k, gen));
}

#[test]
fn pin_vs_evict_reuse_other_key() {
    model(6, || pin_vs_evict::<AtomicData>(1, 2));
}

#[test]
fn pin_vs_evict_reuse_same_key_aba() {
    // The slot comes back with the same key: only the generation tells the
    // two lives apart.
    model(6, || pin_vs_evict::<AtomicData>(1, 1));
}

#[test]
fn pin_of_the_new_key_vs_reuse() {
    // A stale index hit: the engine looks the slot up for the key the owner
    // is about to put in it.
    model(6, || pin_vs_evict::<AtomicData>(2, 2));
}

#[test]
fn pin_vs_evict_plain_bytes_no_data_race() {
    model(6, || pin_vs_evict::<PlainData>(1, 2));
    model(6, || pin_vs_evict::<PlainData>(1, 1));
}

#[test]
fn two_engines_pin_vs_evict() {
    model(3, || {
        let w = pin_world::<AtomicData>(2);
        let engines: Vec<_> = (0..2)
            .map(|e| {
                let w = w.clone();
                spawn(move || engine(&w, e, 1))
            })
            .collect();
        let w2 = w.clone();
        spawn(move || owner(&w2, 2, 1)).join().unwrap();
        for e in engines {
            e.join().unwrap();
        }
        assert!(w.pins.iter().all(|p| p.load(Ordering::SeqCst) == 0));
    });
}

#[test]
fn two_engines_plain_bytes_no_data_race() {
    model(4, || {
        let w = pin_world::<PlainData>(2);
        let engines: Vec<_> = (0..2)
            .map(|e| {
                let w = w.clone();
                spawn(move || engine(&w, e, 1 + e as u8))
            })
            .collect();
        let w2 = w.clone();
        spawn(move || owner(&w2, 1, 2)).join().unwrap();
        for e in engines {
            e.join().unwrap();
        }
    });
}

// ---------------------------------------------------------------------------
// Index seqlock
// ---------------------------------------------------------------------------

/// Keys of namespace 1, the first three words `w`, then `rest`.
fn ikey(w: u64, rest: u64) -> BlockKey {
    BlockKey::from_words(1, [w, w, w, rest])
}

/// The first three keys (searching `rest` upwards) whose home is bucket 0 of
/// a table of `mask + 1` buckets. They differ only in their last word, so a
/// reader that mixed the words of two lives of a bucket would match.
fn homed_at_zero(mask: u64) -> [BlockKey; 3] {
    let mut found = (0u64..)
        .map(|r| ikey(0x1234_5678, r))
        .filter(|k| home(k, mask) == 0);
    [(); 3].map(|_| found.next().expect("some key hashes there"))
}

fn buckets(n: usize) -> Arc<Vec<Bucket>> {
    let v: Vec<Bucket> = (0..n).map(|_| Bucket::default()).collect();
    for b in &v {
        b.seq.store(0, Ordering::SeqCst);
    }
    Arc::new(v)
}

/// Keys `a` and `b` share a home bucket and differ only in their last word,
/// so a reader that mixed the words of the two buckets' lives would match
/// the wrong one.
struct Colliding {
    a: BlockKey,
    b: BlockKey,
    /// Never inserted; same home, so its probe crosses both.
    absent: BlockKey,
}

fn colliding(mask: u64) -> Colliding {
    let [a, b, absent] = homed_at_zero(mask);
    Colliding { a, b, absent }
}

const SLOT_A: u32 = 10;
const SLOT_B: u32 = 20;

/// An index of four buckets set up by `setup`, a writer thread running
/// `write` and a reader thread running `read` concurrently, then `check`
/// single-threaded.
fn index_race(
    setup: fn(&Index<'_>, &Colliding),
    write: fn(&Index<'_>, &Colliding),
    read: fn(&Index<'_>, &Colliding),
    check: fn(&Index<'_>, &Colliding),
) {
    let mem = buckets(4);
    let k = Arc::new(colliding(3));
    setup(&Index::new(&mem), &k);
    let (m, k2) = (mem.clone(), k.clone());
    let writer = spawn(move || write(&Index::new(&m), &k2));
    let (m, k2) = (mem.clone(), k.clone());
    let reader = spawn(move || read(&Index::new(&m), &k2));
    writer.join().unwrap();
    reader.join().unwrap();
    check(&Index::new(&mem), &k);
}

/// A lookup of `key` is a miss or `slot`.
fn get_is(idx: &Index<'_>, key: &BlockKey, slot: Option<u32>) {
    let got = idx.get(key);
    assert!(
        got.is_none() || got == slot,
        "{key:?} -> {got:?}, want {slot:?} or a miss"
    );
}

/// Setups and writes of the index models. `a` and `b` share their home
/// (bucket 0), so `b` sits in bucket 1 behind `a`.
fn insert_a(idx: &Index<'_>, k: &Colliding) {
    idx.insert(&k.a, SLOT_A).unwrap();
}

fn insert_a_b(idx: &Index<'_>, k: &Colliding) {
    insert_a(idx, k);
    idx.insert(&k.b, SLOT_B).unwrap();
}

/// Removing `a` backward-shifts `b` from bucket 1 into bucket 0.
fn remove_a(idx: &Index<'_>, k: &Colliding) {
    assert!(idx.remove(&k.a, SLOT_A));
}

/// Bucket 0 goes from `a` to empty to `b`.
fn replace_a_by_b(idx: &Index<'_>, k: &Colliding) {
    remove_a(idx, k);
    idx.insert(&k.b, SLOT_B).unwrap();
}

fn insert_b(idx: &Index<'_>, k: &Colliding) {
    idx.insert(&k.b, SLOT_B).unwrap();
}

fn nothing(_: &Index<'_>, _: &Colliding) {}

/// One lookup per reader: a thread that read a cell before may not be
/// offered its older values again after a spin's yield, so a second lookup
/// in the same thread explores less, not more.
fn get_a(idx: &Index<'_>, k: &Colliding) {
    get_is(idx, &k.a, Some(SLOT_A));
}

fn get_b(idx: &Index<'_>, k: &Colliding) {
    get_is(idx, &k.b, Some(SLOT_B));
}

fn get_absent(idx: &Index<'_>, k: &Colliding) {
    get_is(idx, &k.absent, None);
}

/// While `b` is shifted over `a`, a reader of `a` never gets `b`'s slot...
#[test]
fn index_get_a_vs_backward_shift() {
    model(1, || index_race(insert_a_b, remove_a, get_a, nothing));
}

/// ... and a reader of `b` never gets `a`'s (it may miss `b`).
#[test]
fn index_get_b_vs_backward_shift() {
    model(2, || {
        index_race(insert_a_b, remove_a, get_b, |idx, k| {
            assert_eq!(idx.get(&k.a), None);
            assert_eq!(idx.get(&k.b), Some(SLOT_B));
        })
    });
}

/// Bucket 0 is rewritten from `a` to `b`: no lookup matches across lives.
#[test]
fn index_get_vs_rewrite_of_a_bucket() {
    model(1, || index_race(insert_a, replace_a_by_b, get_b, nothing));
    model(1, || index_race(insert_a, replace_a_by_b, get_a, nothing));
}

/// A key absent throughout, sharing the run an insert extends, is never
/// found.
#[test]
fn index_get_absent_vs_insert() {
    model(3, || {
        index_race(insert_a, insert_b, get_absent, |idx, k| {
            assert_eq!(idx.get(&k.a), Some(SLOT_A));
            assert_eq!(idx.get(&k.b), Some(SLOT_B));
        })
    });
}

// ---------------------------------------------------------------------------
// Doorbell
// ---------------------------------------------------------------------------

/// The shared cells of one doorbell and the work it announces.
struct Bell {
    word: AtomicU32,
    sleeping: AtomicU32,
    /// Stands for a request ring's `tail`.
    work: AtomicU32,
    /// The ringer has returned from `ring` (model bookkeeping).
    rung: AtomicU32,
}

/// A sleeper (the real `Doorbell::wait`) against one ringer (a `Release`
/// publication of work, then the real `Doorbell::ring`).
///
/// Under loom the futex is a yield, so the sleep is modelled inside
/// `has_work`: a sleeper that finds no work stays asleep, with `sleeping`
/// raised, until the ringer is done, as the real one would stay in
/// FUTEX_WAIT until woken or timed out. Then either the sleeper saw the work
/// or the ringer saw it sleeping and bumped the word (which also makes a
/// FUTEX_WAIT that has not started yet return at once).
#[test]
fn doorbell_no_lost_wakeup() {
    use pegaflow_shm::doorbell::Doorbell;
    use std::time::Duration;
    model(8, || {
        let b = Arc::new(Bell {
            word: AtomicU32::new(0),
            sleeping: AtomicU32::new(0),
            work: AtomicU32::new(0),
            rung: AtomicU32::new(0),
        });
        for a in [&b.word, &b.sleeping, &b.work] {
            seq_cst_zero(a);
        }
        let b2 = b.clone();
        let ringer = spawn(move || {
            // An engine's push: Release store of the ring's tail.
            b2.work.store(1, Ordering::Release);
            Doorbell {
                word: &b2.word,
                sleeping: &b2.sleeping,
            }
            .ring();
            b2.rung.store(1, Ordering::Release);
        });
        let b2 = b.clone();
        let sleeper = spawn(move || {
            let b = b2;
            let seen = b.word.load(Ordering::SeqCst);
            let mut saw_work = false;
            Doorbell {
                word: &b.word,
                sleeping: &b.sleeping,
            }
            .wait(Duration::ZERO, || {
                // The owner's has_work(): Acquire loads of ring tails.
                saw_work = b.work.load(Ordering::Acquire) != 0;
                if !saw_work {
                    while b.rung.load(Ordering::Acquire) == 0 {
                        thread::yield_now();
                    }
                }
                saw_work
            });
            (seen, saw_work)
        });
        ringer.join().unwrap();
        let (seen, saw_work) = sleeper.join().unwrap();
        let woken = b.word.load(Ordering::SeqCst) != seen;
        assert!(saw_work || woken, "lost wake-up");
        assert_eq!(b.sleeping.load(Ordering::SeqCst), 0, "flag left up");
    });
}
