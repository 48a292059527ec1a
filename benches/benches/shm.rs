//! Micro-benchmarks of the shared-memory protocol, against a real
//! `pegaflow-owner` process (build it first: `cargo build --release --bins`).
//!
//! - `lookup_625`: prefix lookup of a 625-block chain (one 10K-token vLLM
//!   request), all hits: count only, the pinned lookup the API returns, and
//!   lookup + pin + release. Target <= 10 us median.
//! - `commit`: commits per second through one owner, from push to visible
//!   in the index (target >= 1 M/s); and the latency of one commit to an
//!   idle owner until it is visible to other engines (target <= 1 ms).
//! - `ring`: SPSC ring push+pop in one thread, and a ping-pong round trip
//!   between two threads.

use std::sync::atomic::{AtomicBool, Ordering as StdOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pegaflow_core::{BlockKey, Engine};
use pegaflow_shm::ring::{Ring, RingHeader};
use pegaflow_shm::sync::AtomicU64;
use pegaflow_tests::{eventually, fill_block, keys, OwnerProc};

const NS: u64 = 0xbe9c_0001;

fn lookup(c: &mut Criterion) {
    let slot = 64u64 << 10;
    let owner = OwnerProc::start_with(
        "bench-lookup",
        &[
            "--pool-size",
            "128mb",
            "--slab-size",
            "2mb",
            "--min-slot-size",
            "64kb",
        ],
    );
    let mut cfg = owner.engine_config(NS, slot);
    cfg.reserve_wait = Duration::from_secs(1);
    let e = Engine::connect(cfg).expect("connect");
    assert!(e.wait_connected(Duration::from_secs(5)));
    let ks = keys(NS, 1, 0, 625);
    let mut saved = 0;
    for chunk in ks.chunks(64) {
        saved += e.save_with(chunk, |i, b| {
            fill_block(&chunk[i], &mut b[..64]);
            64
        });
    }
    assert_eq!(saved, 625, "could not populate the chain");
    let hashes: Vec<[u8; 32]> = ks.iter().map(|k| k.hash).collect();
    assert!(eventually(Duration::from_secs(5), || e
        .count_hits(NS, &hashes)
        == 625));

    let mut g = c.benchmark_group("lookup_625");
    g.throughput(Throughput::Elements(625));
    g.bench_function("count_hits", |b| {
        b.iter(|| assert_eq!(e.count_hits(NS, &hashes), 625))
    });
    g.bench_function("lookup_pinned", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let p = e.lookup(NS, &hashes);
                total += t.elapsed();
                assert_eq!(p.len(), 625);
                e.release(&p);
            }
            total
        })
    });
    g.bench_function("lookup_pin_release", |b| {
        b.iter(|| {
            let p = e.lookup(NS, &hashes);
            assert_eq!(p.len(), 625);
            e.release(&p);
        })
    });
    g.finish();
}

fn commit(c: &mut Criterion) {
    const BATCH: usize = 4096;
    let slot = 4096u64;
    let owner = OwnerProc::start_with(
        "bench-commit",
        &[
            "--pool-size",
            "256mb",
            "--slab-size",
            "2mb",
            "--min-slot-size",
            "4kb",
            "--disable-lfu-admission",
        ],
    );
    let mut cfg = owner.engine_config(NS, slot);
    cfg.reserve_wait = Duration::from_secs(2);
    let e = Engine::connect(cfg).expect("connect");
    assert!(e.wait_connected(Duration::from_secs(5)));
    let mut g = c.benchmark_group("commit");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20);
    let mut seed = 100;
    g.bench_function(BenchmarkId::new("push_to_visible", BATCH), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                seed += 1;
                let ks: Vec<BlockKey> = keys(NS, seed, 0, BATCH as u64);
                // Reserving (and the evictions it causes) is not timed.
                let r = e.reserve(BATCH);
                assert_eq!(
                    r.len(),
                    BATCH,
                    "stash could not supply a batch: got {} ({:?})",
                    r.len(),
                    e.stats()
                );
                let last = ks[BATCH - 1].hash;
                let t = Instant::now();
                for (i, k) in ks.iter().enumerate() {
                    while !e.commit(&r, i, *k, 0) {
                        std::hint::spin_loop(); // ring full: the owner is behind
                    }
                }
                while e.count_hits(NS, &[last]) == 0 {
                    std::hint::spin_loop();
                }
                total += t.elapsed();
            }
            total
        })
    });
    // Latency of one save: commit pushed -> visible in the index, with the
    // owner idle (asleep on its futex) as it is between a real engine's steps.
    g.throughput(Throughput::Elements(1));
    g.bench_function("one_visible_after_idle", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                seed += 1;
                let k = keys(NS, seed, 0, 1)[0];
                let r = e.reserve(1);
                assert_eq!(r.len(), 1);
                // Let the owner fall asleep (it spins 50 us, then sleeps).
                std::thread::sleep(Duration::from_millis(1));
                let t = Instant::now();
                assert!(e.commit(&r, 0, k, 0));
                while e.count_hits(NS, &[k.hash]) == 0 {
                    std::hint::spin_loop();
                }
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

fn ring(c: &mut Criterion) {
    let hdr = RingHeader::default();
    let words: Vec<AtomicU64> = (0..4096 * 8).map(|_| AtomicU64::new(0)).collect();
    let r: Ring<'_, 8> = Ring::new(&hdr, &words);
    let mut g = c.benchmark_group("ring");
    g.bench_function("push_pop_same_thread", |b| {
        b.iter(|| {
            assert!(r.push(&[1, 2, 3, 4, 5, 6, 7, 8]));
            r.pop().unwrap().unwrap()
        })
    });
    // Ping-pong: a request ring one way, a reply ring back, two threads.
    let there = Arc::new((
        RingHeader::default(),
        (0..64).map(|_| AtomicU64::new(0)).collect::<Vec<_>>(),
    ));
    let back = Arc::new((
        RingHeader::default(),
        (0..64).map(|_| AtomicU64::new(0)).collect::<Vec<_>>(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let (there, back, stop) = (there.clone(), back.clone(), stop.clone());
        std::thread::spawn(move || {
            let rx: Ring<'_, 8> = Ring::new(&there.0, &there.1);
            let tx: Ring<'_, 8> = Ring::new(&back.0, &back.1);
            while !stop.load(StdOrdering::Relaxed) {
                if let Ok(Some(m)) = rx.pop() {
                    while !tx.push(&m) {}
                }
            }
        })
    };
    let tx: Ring<'_, 8> = Ring::new(&there.0, &there.1);
    let rx: Ring<'_, 8> = Ring::new(&back.0, &back.1);
    g.bench_function("round_trip_two_threads", |b| {
        b.iter(|| {
            assert!(tx.push(&[7; 8]));
            loop {
                if let Ok(Some(m)) = rx.pop() {
                    break m;
                }
            }
        })
    });
    stop.store(true, StdOrdering::Relaxed);
    echo.join().unwrap();
    g.finish();
}

criterion_group!(benches, lookup, commit, ring);
criterion_main!(benches);
