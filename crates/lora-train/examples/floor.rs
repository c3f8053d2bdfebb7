//! The fastest a training step on the issue-6 bench config could be on this machine: the step's
//! matrix products counted in flops, and the rates this machine's cores reach for them.
//!
//!     OPENBLAS_NUM_THREADS=1 cargo run --release -p lora-train --example floor [-- THREADS [TORCH_STEP_S]]
//!
//! Prints
//! - the flops of one step's products by part (projections forward, their input gradients,
//!   the head, causal attention, the LoRA factors), counted from the config as lora-train
//!   computes them (no input gradient for the first layer's q/k/v, causal attention blocks);
//! - the cores' peak rate of fused multiply-adds (AVX2 + FMA, x86-64 only), every thread of
//!   the pool at once;
//! - the BLAS's rate on the step's own product shapes, each thread of the pool multiplying its
//!   piece of the rows at the same time, as the step does, the best and the median of seven
//!   repetitions; the operands stay in cache between repetitions, which the step's do not (on
//!   the Zen 3 host that made no difference);
//! - the step time these rates allow with nothing but the products in it, and, given
//!   PyTorch's step time in seconds, the largest ratio to PyTorch they allow.
use std::time::Instant;

use ndarray::linalg::general_mat_mul;
use ndarray::Array2;
use rayon::prelude::*;

/// Batch and sequence of the bench (benches/train_step.rs) and the LoRA rank.
const BATCH: usize = 8;
const SEQ: usize = 256;
const RANK: usize = 16;

/// Steps of the peak-rate loop: each advances 10 independent chains of 8-lane fused
/// multiply-adds (160 flops).
const ROUNDS: u64 = 100_000_000;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(unsafe_code)] // SIMD intrinsics, called after the CPU check
fn fma_chains(rounds: u64) -> f32 {
    use std::arch::x86_64::*;
    let (b, c) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(0.5); 10];
    for _ in 0..rounds / 1000 {
        for _ in 0..1000 {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, b, c);
            }
        }
        // keeps the compiler from reasoning about the chains across the outer loop
        acc = std::hint::black_box(acc);
    }
    let mut sum = 0.0;
    for a in acc {
        sum += _mm256_cvtss_f32(a);
    }
    sum
}

/// Peak GFLOP/s of one core while every thread of the pool runs fused multiply-adds, or None
/// where the CPU has no AVX2 + FMA.
fn fma_peak(threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        let rates: Vec<f64> = (0..threads)
            .into_par_iter()
            .map(|_| {
                (0..3)
                    .map(|_| {
                        let t = Instant::now();
                        #[allow(unsafe_code)]
                        // SAFETY: AVX2 and FMA were detected on this CPU just above.
                        std::hint::black_box(unsafe { fma_chains(ROUNDS) });
                        (ROUNDS * 10 * 16) as f64 / t.elapsed().as_secs_f64() / 1e9
                    })
                    .fold(0.0, f64::max)
            })
            .collect();
        return Some(rates.iter().sum::<f64>() / threads as f64);
    }
    None
}

/// One kind of product in the step: `rows x inner` times `inner x cols`, `count` of them, in
/// calls of at most `block` rows (the head's, a block of logits at a time).
struct Product {
    name: &'static str,
    block: usize,
    inner: usize,
    cols: usize,
    /// transposed right operand (x Wᵀ, the forward) or not (dy W, an input gradient)
    forward: bool,
    count: usize,
}

/// GFLOP/s of one core on `p` while every thread multiplies its own piece of the rows at once,
/// adding into zeros as the step does: the best and the median of seven repetitions per thread,
/// each averaged over threads. A step meets each product once, so on a busy host the median is
/// its nearer measure.
fn blas_rate(p: &Product, rows: usize, threads: usize) -> (f64, f64) {
    let piece = (rows / threads).min(p.block);
    let rates: Vec<(f64, f64)> = (0..threads)
        .into_par_iter()
        .map(|i| {
            let x = Array2::from_shape_fn((piece, p.inner), |(r, c)| ((r * 7 + c * 3 + i) % 13) as f32 * 0.01);
            let w = Array2::from_shape_fn(if p.forward { (p.cols, p.inner) } else { (p.inner, p.cols) }, |(r, c)| {
                ((r * 5 + c) % 11) as f32 * 0.01
            });
            let mut y = Array2::<f32>::zeros((piece, p.cols));
            let mut rates: Vec<f64> = (0..7)
                .map(|_| {
                    let t = Instant::now();
                    if p.forward {
                        general_mat_mul(1.0, &x, &w.t(), 1.0, &mut y);
                    } else {
                        general_mat_mul(1.0, &x, &w, 1.0, &mut y);
                    }
                    std::hint::black_box(&y);
                    2.0 * (piece * p.inner * p.cols) as f64 / t.elapsed().as_secs_f64() / 1e9
                })
                .collect();
            rates.sort_by(f64::total_cmp);
            (rates[6], rates[3])
        })
        .collect();
    let mean = |f: fn(&(f64, f64)) -> f64| rates.iter().map(f).sum::<f64>() / threads as f64;
    (mean(|r| r.0), mean(|r| r.1))
}

fn main() {
    let arg = |i: usize| std::env::args().nth(i);
    let threads: usize = arg(1).and_then(|v| v.parse().ok()).unwrap_or(2);
    let torch_step: Option<f64> = arg(2).and_then(|v| v.parse().ok());
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().expect("one global pool");
    let cfg = r#"{"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
            "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8192}"#;
    let c = lora_train::ModelConfig::from_json(cfg, "bench").expect("the bench config");
    let (h, i, layers, vocab) = (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size);
    let (q, kv) = (c.q_dim(), c.kv_dim());
    let tokens = BATCH * SEQ;
    // the head's logits go a block of rows at a time (lora-train's `chunk_rows`)
    let head = tokens.div_ceil(4).next_multiple_of(64).clamp(128, 1024);

    // (inner, cols) of every adapted projection in a layer, forward orientation
    let projections = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)];
    let gflop = |macs: usize| 2.0 * macs as f64 / 1e9;
    let per_token: usize = projections.iter().map(|(a, b)| a * b).sum();
    let qkv_input = h * (q + 2 * kv);
    // causal attention: (S + 1) S / 2 score pairs per head, head_dim MACs each, in two forward
    // products (scores, weighted values) and four backward ones
    let pairs = SEQ * (SEQ + 1) / 2;
    let lora_dims: usize = projections.iter().map(|(a, b)| a + b).sum();
    let parts = [
        ("projections, forward", gflop(tokens * layers * per_token)),
        ("projections, input gradients", gflop(tokens * (layers * per_token - qkv_input))),
        ("head, forward and input gradient", gflop(2 * tokens * h * vocab)),
        (
            "causal attention, forward and backward",
            gflop(6 * BATCH * c.num_attention_heads * layers * pairs * c.head_dim),
        ),
        // x Aᵀ and the merged weight W + s B A forward (the input gradient goes through the
        // merged weight); dy B, dA and dB backward
        ("LoRA factors", gflop(layers * (2 * tokens * RANK * lora_dims + RANK * per_token))),
    ];
    let total: f64 = parts.iter().map(|p| p.1).sum();
    println!("products of one step (batch {BATCH} x {SEQ}, r = {RANK}, all linear layers):");
    for (name, g) in parts {
        println!("  {name:<40} {g:7.1} GFLOP");
    }
    println!("  {:<40} {total:7.1} GFLOP", "total");

    let products = [
        Product { name: "q, o (x Wt)", block: tokens, inner: h, cols: q, forward: true, count: 2 },
        Product { name: "k, v (x Wt)", block: tokens, inner: h, cols: kv, forward: true, count: 2 },
        Product { name: "gate, up (x Wt)", block: tokens, inner: h, cols: i, forward: true, count: 2 },
        Product { name: "down (x Wt)", block: tokens, inner: i, cols: h, forward: true, count: 1 },
        Product { name: "head (x Wt)", block: head, inner: h, cols: vocab, forward: true, count: 1 },
        Product { name: "q, o (dy W)", block: tokens, inner: q, cols: h, forward: false, count: 2 },
        Product { name: "k, v (dy W)", block: tokens, inner: kv, cols: h, forward: false, count: 2 },
        Product { name: "gate, up (dy W)", block: tokens, inner: i, cols: h, forward: false, count: 2 },
        Product { name: "down (dy W)", block: tokens, inner: h, cols: i, forward: false, count: 1 },
        Product { name: "head (dy W)", block: head, inner: vocab, cols: h, forward: false, count: 1 },
    ];
    println!(
        "BLAS rate per core, {threads} threads each on {} rows at once (operands in cache), best and median of 7:",
        tokens / threads
    );
    let (mut flops, mut best_s, mut median_s) = (0.0, 0.0, 0.0);
    for p in &products {
        let (best, median) = blas_rate(p, tokens, threads);
        let g = gflop(tokens * p.inner * p.cols * p.count);
        flops += g;
        best_s += g / best;
        median_s += g / median;
        println!("  {:<18} {best:6.1} {median:6.1} GFLOP/s", p.name);
    }
    // every product at the weighted mean rate of the base products
    let (best, median) = (flops / best_s, flops / median_s);
    println!("  {:<18} {best:6.1} {median:6.1} GFLOP/s", "weighted mean");
    let mut floors = vec![("BLAS on these shapes (best)", best), ("BLAS on these shapes (median)", median)];
    match fma_peak(threads) {
        Some(peak) => {
            println!("fused multiply-add peak per core, {threads} threads at once: {peak:.1} GFLOP/s");
            floors.push(("fused multiply-add peak", peak));
        }
        None => println!("fused multiply-add peak: not measured (needs x86-64 with AVX2 + FMA)"),
    }
    for (name, rate) in floors {
        let step = total / (rate * threads as f64);
        let ratio =
            torch_step.map(|t| format!(", at most {:.2}x a PyTorch step of {t} s", t / step)).unwrap_or_default();
        println!("step with nothing but products, every product at the {name}: {step:.3} s{ratio}");
    }
}
