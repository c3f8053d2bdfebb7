//! Forward pass at n = 512, d_in = d_out = 4096, r = 16: the unmerged LoRA forward
//! x Wᵀ + s (x Aᵀ) Bᵀ against the plain product x Wᵀ it adds to.
//!
//! `cargo bench -p lora-core --features openblas-system --bench forward` (OpenBLAS) and
//! `cargo bench -p lora-core --bench forward` (ndarray's matrixmultiply); docs/benchmarks.md holds
//! the figures.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lora_core::{Init, LoraLayer, Scaling, WeightLayout};
use ndarray::Array2;

const N: usize = 512;
const D: usize = 4096;
const R: usize = 16;

fn random(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    LoraLayer::<f32>::init(cols, rows, 1, 1.0, Scaling::Standard, Init::Random { b_std: 1.0 }, seed)
        .expect("valid layer")
        .delta()
}

fn forward(c: &mut Criterion) {
    let backend = if cfg!(feature = "blas") { "openblas" } else { "matrixmultiply" };
    let w = random(D, D, 1) * 0.01;
    let x = random(N, D, 2);
    let lora =
        LoraLayer::<f32>::init(D, D, R, 32.0, Scaling::Standard, Init::Random { b_std: 0.02 }, 3).expect("valid layer");

    let mut group = c.benchmark_group(format!("forward_{backend}"));
    group.sample_size(20);
    group.throughput(Throughput::Elements((2 * N * D * D) as u64)); // flops of x Wᵀ
    group.bench_function("base_x_wt", |bench| bench.iter(|| x.dot(&w.t())));
    group.bench_function("lora_unmerged", |bench| {
        bench.iter(|| lora.forward(&x, &w, WeightLayout::OutIn).expect("shapes match"))
    });
    group.bench_function("lora_branch_only", |bench| bench.iter(|| lora.lora_branch(&x).expect("shapes match")));
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
