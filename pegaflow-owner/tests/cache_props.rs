//! Property tests of the owner's allocator over a real (tmpfs) control
//! segment: random interleavings of stash refills, commits, aborts,
//! touches, pins, evictions and client deaths, with the invariants checked
//! after every step, and a re-adoption that must see the same cache.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use pegaflow_owner::cache::Cache;
use pegaflow_shm::client::client_state;
use pegaflow_shm::request::Request;
use pegaflow_shm::segment::{create_published, ControlSegment, Perms};
use pegaflow_shm::slot_table::{BlockKey, SlotKind};
use pegaflow_shm::sync::Ordering;
use pegaflow_shm::Geometry;
use proptest::prelude::*;

const CLIENTS: u32 = 3;
const SLOT: u64 = 256 << 10;

#[derive(Clone, Debug)]
enum Op {
    /// Client wants `n` slots (sets demand, as `Engine::reserve` does).
    Want(u32, u32),
    Refill(u32),
    /// Take one slot from the stash and commit it under key `k`.
    Commit(u32, u8),
    /// Take one slot from the stash and abort it.
    Abort(u32),
    Touch(u32, u8),
    /// Pin / unpin key `k` (if committed) in client `c`.
    Pin(u32, u8),
    Unpin(u32, u8),
    Die(u32),
}

fn op() -> impl Strategy<Value = Op> {
    let c = 0..CLIENTS;
    // Weighted so the 16-slot pool fills up and eviction is exercised.
    prop_oneof![
        2 => (c.clone(), 1..12u32).prop_map(|(c, n)| Op::Want(c, n)),
        3 => c.clone().prop_map(Op::Refill),
        6 => (c.clone(), any::<u8>()).prop_map(|(c, k)| Op::Commit(c, k % 40)),
        1 => c.clone().prop_map(Op::Abort),
        2 => (c.clone(), any::<u8>()).prop_map(|(c, k)| Op::Touch(c, k % 40)),
        3 => (c.clone(), any::<u8>()).prop_map(|(c, k)| Op::Pin(c, k % 40)),
        2 => (c.clone(), any::<u8>()).prop_map(|(c, k)| Op::Unpin(c, k % 40)),
        1 => c.prop_map(Op::Die),
    ]
}

fn key(k: u8) -> BlockKey {
    BlockKey::new(0xabc, [k; 32])
}

struct World {
    _dir: tempfile::TempDir,
    seg: Arc<ControlSegment>,
    cache: Cache,
    class: usize,
    /// Pins the test holds: (client, slot) -> count.
    pins: BTreeMap<(u32, u32), u32>,
}

impl World {
    fn new(admission: bool) -> World {
        let dir = tempfile::tempdir().unwrap();
        // Segment paths read this; every case of this test binary uses it.
        std::env::set_var("PEGAFLOW_SHM_DIR", dir.path());
        let g = Geometry::for_pool(4 << 20, 2 << 20, 64 << 10, u64::from(CLIENTS)).unwrap();
        let name = format!("props-{}", std::process::id());
        let (seg, _pool) = create_published(&name, g, Perms::PRIVATE).unwrap();
        let seg = Arc::new(seg);
        let mut cache = Cache::new(seg.clone(), admission);
        let class = cache.class_for(SLOT).unwrap();
        for i in 0..CLIENTS {
            let c = seg.client(i).unwrap();
            c.entry.state.store(client_state::LIVE, Ordering::SeqCst);
            c.entry.stash_target.store(2, Ordering::Relaxed);
            c.entry.pid.store(std::process::id(), Ordering::Relaxed);
        }
        World {
            _dir: dir,
            seg,
            cache,
            class,
            pins: BTreeMap::new(),
        }
    }

    fn apply(&mut self, op: &Op) {
        let seg = self.seg.clone();
        match *op {
            Op::Want(c, n) => {
                let v = seg.client(c).unwrap();
                v.entry.stash_want.store(n, Ordering::Relaxed);
                v.entry.refill_asked.fetch_add(1, Ordering::SeqCst);
            }
            Op::Refill(c) => {
                self.cache.refill(&seg.client(c).unwrap(), self.class);
            }
            Op::Commit(c, k) => {
                let v = seg.client(c).unwrap();
                if let Ok(Some([w])) = v.stash.pop() {
                    let req = Request::Commit {
                        slot: w as u32,
                        gen: (w >> 32) as u32,
                        len: SLOT,
                        key: key(k),
                    };
                    assert!(v.requests.push(&req.encode()));
                    self.cache.drain(&v).unwrap();
                }
            }
            Op::Abort(c) => {
                let v = seg.client(c).unwrap();
                if let Ok(Some([w])) = v.stash.pop() {
                    assert!(v.requests.push(
                        &Request::Abort {
                            slot: w as u32,
                            gen: (w >> 32) as u32,
                        }
                        .encode()
                    ));
                    self.cache.drain(&v).unwrap();
                }
            }
            Op::Touch(c, k) => {
                if let Some(slot) = seg.index().get(&key(k)) {
                    let v = seg.client(c).unwrap();
                    let mut slots = [0u32; 14];
                    slots[0] = slot;
                    assert!(v
                        .requests
                        .push(&Request::Touch { count: 1, slots }.encode()));
                    self.cache.drain(&v).unwrap();
                }
            }
            Op::Pin(c, k) => {
                if let Some(slot) = seg.index().get(&key(k)) {
                    let v = seg.client(c).unwrap();
                    if seg.slots()[slot as usize]
                        .try_pin(&v.pins[slot as usize], &key(k))
                        .is_some()
                    {
                        *self.pins.entry((c, slot)).or_default() += 1;
                    }
                }
            }
            Op::Unpin(c, k) => {
                if let Some(slot) = seg.index().get(&key(k)) {
                    if let Some(n) = self.pins.get_mut(&(c, slot)) {
                        seg.client(c).unwrap().pins[slot as usize].fetch_sub(1, Ordering::SeqCst);
                        *n -= 1;
                        if *n == 0 {
                            self.pins.remove(&(c, slot));
                        }
                    }
                }
            }
            Op::Die(c) => {
                let v = seg.client(c).unwrap();
                self.cache.reclaim(&v);
                self.pins.retain(|&(pc, _), _| pc != c);
                // The entry comes back as a fresh engine.
                v.entry.state.store(client_state::LIVE, Ordering::SeqCst);
                v.entry.stash_target.store(2, Ordering::Relaxed);
                v.entry.pid.store(std::process::id(), Ordering::Relaxed);
            }
        }
    }

    /// Every invariant the owner relies on.
    fn check(&self) -> Result<(), TestCaseError> {
        self.cache.verify().map_err(TestCaseError::fail)?;
        let seg = &self.seg;
        let g = seg.geometry();
        let (mut free, mut committed, mut writing) = (0u64, 0u64, BTreeMap::<u16, u64>::new());
        for slab in 0..g.num_slabs() as u32 {
            let n = seg.slabs()[slab as usize].nslots.load(Ordering::Relaxed);
            for slot in slab * g.slots_per_slab() as u32..slab * g.slots_per_slab() as u32 + n {
                let st = seg.slots()[slot as usize].load_state().unwrap();
                match st.kind {
                    SlotKind::Free => free += 1,
                    SlotKind::Committed => committed += 1,
                    SlotKind::Writing => *writing.entry(st.client).or_default() += 1,
                    SlotKind::Evicting => prop_assert!(false, "slot {slot} left Evicting"),
                }
            }
        }
        // Writing slots are exactly those in stashes (the test never holds
        // a popped slot across operations).
        for c in 0..CLIENTS {
            let stash = seg.client(c).unwrap().stash.len();
            prop_assert_eq!(
                writing.get(&(c as u16)).copied().unwrap_or(0),
                stash,
                "client {}",
                c
            );
        }
        prop_assert_eq!(committed, seg.index().entries().count() as u64);
        let occ = self.cache.occupancy();
        prop_assert_eq!(occ.committed_slots, committed);
        prop_assert_eq!(occ.free_slots, free);
        // A pinned block is never evicted.
        for &(c, slot) in self.pins.keys() {
            let e = &seg.slots()[slot as usize];
            prop_assert_eq!(
                e.load_state().unwrap().kind,
                SlotKind::Committed,
                "pinned slot {} (client {})",
                slot,
                c
            );
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn allocator_invariants_hold_under_random_traffic(ops in proptest::collection::vec(op(), 1..200), admission in any::<bool>()) {
        let mut w = World::new(admission);
        for op in &ops {
            w.apply(op);
            w.check()?;
        }
        // A restarted owner rebuilds the same committed set from shm alone.
        let before: BTreeSet<(BlockKey, u32)> = w.seg.index().entries().map(|(_, k, s)| (k, s)).collect();
        let (adopted, _) = Cache::adopt(w.seg.clone(), admission);
        adopted.verify().map_err(TestCaseError::fail)?;
        let after: BTreeSet<(BlockKey, u32)> = w.seg.index().entries().map(|(_, k, s)| (k, s)).collect();
        prop_assert_eq!(before, after);
    }
}
