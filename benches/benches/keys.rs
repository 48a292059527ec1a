//! Block keys of one 10,000-token vLLM request (625 blocks of 16 tokens):
//! `pegaflow_core::keys::chain_keys`, which the vLLM connector's scheduler
//! runs once per request (each block hashed once, as it fills). Target: well
//! under 1 ms. The Python call around it (`pegaflow._native.chain_keys`)
//! adds the conversion of the token list; docs/benchmarks.md has both.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pegaflow_core::keys::chain_keys;

fn keys(c: &mut Criterion) {
    let tokens: Vec<u32> = (0..10_000u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 128_000)
        .collect();
    let mut g = c.benchmark_group("keys");
    g.throughput(Throughput::Elements(tokens.len() as u64));
    g.bench_function("chain_10k_tokens_bs16", |b| {
        b.iter(|| chain_keys(None, std::hint::black_box(&tokens), 16, &[]).expect("keys"))
    });
    // A request with a cache salt: an extra input on block 0 only (what
    // the connector passes for a salted request without LoRA or images).
    let mut extra: Vec<Option<&[u8]>> = vec![None; 625];
    extra[0] = Some(b"stenant-42");
    g.bench_function("chain_10k_tokens_bs16_salted", |b| {
        b.iter(|| chain_keys(None, std::hint::black_box(&tokens), 16, &extra).expect("keys"))
    });
    g.finish();
}

criterion_group!(benches, keys);
criterion_main!(benches);
