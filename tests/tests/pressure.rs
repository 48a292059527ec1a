//! A full pool degrades instead of blocking: with every slot pinned, saves
//! are dropped and counted and return at once; once pins are released the
//! LRU makes room again.

use std::time::{Duration, Instant};

use pegaflow_tests::{fill_block, keys, Audit, OwnerProc};

const NS: u64 = 0xf011_0001;
/// 1 MiB slots in a 16 MiB pool: 16 slots.
const SLOT: u64 = 1 << 20;

#[test]
fn full_pool_drops_and_counts_saves_without_blocking() {
    let owner = OwnerProc::start_with(
        "full",
        &[
            "--pool-size",
            "16mb",
            "--slab-size",
            "2mb",
            "--min-slot-size",
            "64kb",
            "--disable-lfu-admission",
        ],
    );
    let mut cfg = owner.engine_config(NS, SLOT);
    cfg.reserve_wait = Duration::from_millis(50);
    let w = pegaflow_core::Engine::connect(cfg).unwrap();
    assert!(w.wait_connected(Duration::from_secs(5)));
    let save = |seed: u64, n: u64| {
        let ks = keys(NS, seed, 0, n);
        w.save_with(&ks, |i, buf| {
            fill_block(&ks[i], &mut buf[..SLOT as usize]);
            SLOT as usize
        })
    };
    // Fill the pool and pin everything that got committed.
    let first = save(1, 16);
    assert!(first >= 8, "only {first} of 16 saved into an empty pool");
    let hashes: Vec<[u8; 32]> = keys(NS, 1, 0, 16).iter().map(|k| k.hash).collect();
    assert!(pegaflow_tests::eventually(Duration::from_secs(2), || w
        .count_hits(NS, &hashes)
        == first));
    let pinned = w.lookup(NS, &hashes);
    assert_eq!(pinned.len(), first);

    // Take (and hold) every slot the owner can still hand out: the rest of
    // the pool is pinned, so further saves must be dropped.
    let held = w.reserve(64);
    assert!(first + held.len() <= 16, "more slots than the pool has");
    let dropped_before = w.stats().save_dropped_blocks;
    let t = Instant::now();
    let saved = save(3, 32);
    let took = t.elapsed();
    assert_eq!(
        saved, 0,
        "a save succeeded although every slot is pinned or reserved"
    );
    assert!(w.stats().save_dropped_blocks >= dropped_before + 32);
    // Bounded by reserve_wait (50 ms here), never an indefinite wait.
    assert!(
        took < Duration::from_secs(2),
        "a save into a full pool took {took:?}"
    );
    let a = Audit::read(&owner.control());
    assert_eq!(a.committed as usize, first, "{a:?}");

    // Release: the pool makes room by evicting the coldest blocks.
    for i in 0..held.len() {
        assert!(w.abort(&held, i));
    }
    w.release(&pinned);
    assert!(
        pegaflow_tests::eventually(Duration::from_secs(3), || save(4, 4) == 4),
        "saves did not recover after the pins were released"
    );
    let a = Audit::read(&owner.control());
    assert!(a.pins.is_empty() && a.bad_index_entries == 0, "{a:?}");
}

#[test]
fn pinned_blocks_at_the_cold_end_do_not_hide_evictable_ones() {
    // 512 slots of 64 KiB. The 300 oldest blocks are pinned (a long load,
    // or a request waiting with its hits pinned): more than one eviction
    // scan looks at. The next 200 are free to evict, yet every eviction
    // used to scan only the pinned cold end and give up, so saves into the
    // full pool were dropped although the pool held evictable blocks.
    const SMALL: u64 = 64 << 10;
    let owner = OwnerProc::start_with(
        "coldpins",
        &[
            "--pool-size",
            "32mb",
            "--slab-size",
            "2mb",
            "--min-slot-size",
            "64kb",
            "--disable-lfu-admission",
        ],
    );
    let w = pegaflow_core::Engine::connect(owner.engine_config(NS, SMALL)).unwrap();
    assert!(w.wait_connected(Duration::from_secs(5)));
    let save = |seed: u64, n: u64| {
        let ks = keys(NS, seed, 0, n);
        ks.chunks(50)
            .map(|c| {
                w.save_with(c, |i, buf| {
                    fill_block(&c[i], &mut buf[..SMALL as usize]);
                    SMALL as usize
                })
            })
            .sum::<usize>()
    };
    assert_eq!(save(10, 300), 300);
    let old: Vec<[u8; 32]> = keys(NS, 10, 0, 300).iter().map(|k| k.hash).collect();
    assert!(pegaflow_tests::eventually(Duration::from_secs(3), || w
        .count_hits(NS, &old)
        == 300));
    let pinned = w.lookup(NS, &old);
    assert_eq!(pinned.len(), 300);
    // Fill the rest of the pool, then keep saving: every save must evict.
    save(11, 400);
    let dropped_before = w.stats().save_dropped_blocks;
    let saved = save(12, 100);
    assert_eq!(
        saved,
        100,
        "{} of 100 saves dropped with 200 evictable blocks in the pool",
        w.stats().save_dropped_blocks - dropped_before
    );
    w.release(&pinned);
}
