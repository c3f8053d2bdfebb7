//! The forward overhead of an unmerged LoRA, measured robustly on a shared machine: the base
//! product x Wᵀ and the LoRA forward x Wᵀ + s (x Aᵀ) Bᵀ are timed in alternation (A B A B ...), so
//! that load which drifts over seconds hits both alike; the figure is the median of the per-pair
//! ratios. n = 512, d_in = d_out = 4096, r = 16, f32 (the criterion bench `forward` times the same
//! calls one after the other).
//!
//! `cargo run --release -p lora-core --features openblas-system --example forward_overhead [PAIRS]`

use std::time::Instant;

use lora_core::{Init, LoraLayer, Scaling, WeightLayout};
use ndarray::Array2;

fn random(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    LoraLayer::<f32>::init(cols, rows, 1, 1.0, Scaling::Standard, Init::Random { b_std: 1.0 }, seed)
        .expect("valid layer")
        .delta()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let pairs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(30);
    let (n, d, r) = (512, 4096, 16);
    let w = random(d, d, 1) * 0.01;
    let x = random(n, d, 2);
    let lora =
        LoraLayer::<f32>::init(d, d, r, 32.0, Scaling::Standard, Init::Random { b_std: 0.02 }, 3).expect("layer");
    let (mut base, mut adapted, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..pairs + 2 {
        let t = Instant::now();
        std::hint::black_box(x.dot(&w.t()));
        let tb = t.elapsed().as_secs_f64();
        let t = Instant::now();
        std::hint::black_box(lora.forward(&x, &w, WeightLayout::OutIn).expect("shapes match"));
        let tl = t.elapsed().as_secs_f64();
        if i >= 2 {
            // the first pairs warm caches and thread pools
            base.push(tb);
            adapted.push(tl);
            ratios.push(tl / tb);
        }
    }
    let backend = if cfg!(feature = "blas") { "OpenBLAS" } else { "matrixmultiply" };
    println!("backend {backend}, n {n}, d_in = d_out = {d}, r {r}, {pairs} alternating pairs");
    println!("x Wᵀ                     median {:8.2} ms", 1e3 * median(&mut base));
    println!("x Wᵀ + s (x Aᵀ) Bᵀ       median {:8.2} ms", 1e3 * median(&mut adapted));
    println!("overhead (median of pair ratios) {:+.2}%", 100.0 * (median(&mut ratios) - 1.0));
}
