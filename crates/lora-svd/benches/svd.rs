//! Criterion benchmarks of lora-svd: randomized extraction from 4096 x 4096 and 4096 x 11008
//! f32 deltas at rank 16 and 64, the exact full SVD of 4096 x 4096, and resize of a rank-64
//! adapter to rank 16 (factored, against rebuilding dW and a full SVD).
//!
//! Run with `cargo bench -p lora-svd --bench svd` (release profile); filter with a name, e.g.
//! `cargo bench -p lora-svd --bench svd -- resize`. The full-SVD baselines take 8-40 s per
//! sample here (criterion takes 10), so they run only with `LORA_SVD_BENCH_EXACT=1`; the
//! one-shot `svd_report full` example times them once. Figures are in docs/benchmarks.md.
//! `LORA_BENCH_SMALL=1` runs 512 x 512 and 512 x 1376 with short measurements (`cargo xtask
//! bench --small`), to check the bench cheaply.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lora_svd::{extract, resize, ExtractConfig, RankRule, SvdMethod};
use std::hint::black_box;
use std::time::Duration;

#[path = "support/data.rs"]
mod data;

/// True when the slow full-SVD baselines are asked for.
fn exact_baselines() -> bool {
    std::env::var_os("LORA_SVD_BENCH_EXACT").is_some()
}

/// True under `LORA_BENCH_SMALL=1`.
fn small() -> bool {
    std::env::var("LORA_BENCH_SMALL").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// (shapes of the extraction bench, side of the resize bench, measurement time).
fn sizes() -> (Vec<(usize, usize)>, usize, Duration) {
    if small() {
        (vec![(512, 512), (512, 1376)], 512, Duration::from_secs(1))
    } else {
        (vec![(4096, 4096), (4096, 11008)], 4096, Duration::from_secs(8))
    }
}

fn extraction(c: &mut Criterion) {
    let (shapes, _, time) = sizes();
    let mut group = c.benchmark_group("extract");
    group.sample_size(10).measurement_time(time);
    if small() {
        group.warm_up_time(Duration::from_millis(300));
    }
    for (m, n) in shapes {
        let delta = data::decaying(m, n, 1);
        group.throughput(Throughput::Elements((m * n) as u64));
        for rank in [16, 64] {
            let config = ExtractConfig::new(RankRule::fixed(rank).expect("rank > 0"), SvdMethod::default());
            group.bench_with_input(BenchmarkId::new(format!("randomized/{m}x{n}"), rank), &delta, |b, d| {
                b.iter(|| extract(black_box(d), &config).expect("extraction succeeds"))
            });
        }
        if m == n && exact_baselines() {
            // The full SVD does not depend on the rank kept.
            let config = ExtractConfig::new(RankRule::fixed(64).expect("rank > 0"), SvdMethod::Exact);
            group.sample_size(10).measurement_time(Duration::from_secs(60));
            group.bench_with_input(BenchmarkId::new(format!("exact/{m}x{n}"), 64), &delta, |b, d| {
                b.iter(|| extract(black_box(d), &config).expect("extraction succeeds"))
            });
            group.measurement_time(time);
        }
    }
    group.finish();
}

fn resizing(c: &mut Criterion) {
    let (_, d, time) = sizes();
    let mut group = c.benchmark_group("resize");
    if small() {
        group.warm_up_time(Duration::from_millis(300)).measurement_time(time);
    }
    let delta = data::decaying(d, d, 2);
    let rule64 = RankRule::fixed(64).expect("rank > 0");
    let (layer, _) = extract(&delta, &ExtractConfig::new(rule64, SvdMethod::default())).expect("extraction");
    let rule16 = RankRule::fixed(16).expect("rank > 0");
    group.throughput(Throughput::Elements((d * d) as u64));
    group.bench_function(format!("factored/{d}x{d}/64to16"), |b| b.iter(|| resize(black_box(&layer), &rule16)));
    if !exact_baselines() {
        group.finish();
        return;
    }
    group.sample_size(10).measurement_time(Duration::from_secs(60));
    group.bench_function(format!("rebuild+full-svd/{d}x{d}/64to16"), |b| {
        b.iter(|| extract(&black_box(&layer).delta(), &ExtractConfig::new(rule16, SvdMethod::Exact)))
    });
    group.finish();
}

criterion_group!(benches, extraction, resizing);
criterion_main!(benches);
