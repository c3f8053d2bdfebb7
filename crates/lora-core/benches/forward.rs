//! Forward pass at n = 512, d_in = d_out = 4096, r = 16: the unmerged LoRA forward
//! x Wᵀ + s (x Aᵀ) Bᵀ against the plain product x Wᵀ it adds to.
//!
//! `cargo bench -p lora-core --features openblas-system --bench forward` (OpenBLAS) and
//! `cargo bench -p lora-core --bench forward` (ndarray's matrixmultiply); docs/benchmarks.md holds
//! the figures. `LORA_BENCH_SMALL=1` uses d = 512 and short measurements (`cargo xtask bench
//! --small`), to check the bench cheaply.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lora_core::{Init, LoraLayer, Scaling, WeightLayout};
use ndarray::Array2;

use std::time::Duration;

const N: usize = 512;
const R: usize = 16;

fn random(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    LoraLayer::<f32>::init(cols, rows, 1, 1.0, Scaling::Standard, Init::Random { b_std: 1.0 }, seed)
        .expect("valid layer")
        .delta()
}

fn forward(c: &mut Criterion) {
    let backend = if cfg!(feature = "blas") { "openblas" } else { "matrixmultiply" };
    let small = std::env::var("LORA_BENCH_SMALL").is_ok_and(|v| !v.is_empty() && v != "0");
    let d = if small { 512 } else { 4096 };
    let w = random(d, d, 1) * 0.01;
    let x = random(N, d, 2);
    let lora =
        LoraLayer::<f32>::init(d, d, R, 32.0, Scaling::Standard, Init::Random { b_std: 0.02 }, 3).expect("valid layer");

    let mut group = c.benchmark_group(format!("forward_{backend}"));
    group.sample_size(20);
    if small {
        group.warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    }
    group.throughput(Throughput::Elements((2 * N * d * d) as u64)); // flops of x Wᵀ
    group.bench_function("base_x_wt", |bench| bench.iter(|| x.dot(&w.t())));
    group.bench_function("lora_unmerged", |bench| {
        bench.iter(|| lora.forward(&x, &w, WeightLayout::OutIn).expect("shapes match"))
    });
    group.bench_function("lora_branch_only", |bench| bench.iter(|| lora.lora_branch(&x).expect("shapes match")));
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
