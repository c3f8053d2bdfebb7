//! Training-step throughput (forward + backward to every LoRA factor, and forward alone) in
//! tokens per second, on the configs of issue 6: the bench config (hidden 512, intermediate 1376,
//! 8 layers, 8 heads, 4 kv heads, vocab 8192, sequence 256, batch 8, LoRA r = 16 on all linear
//! layers) and a tiny one (hidden 128, 2 layers, sequence 64). The PyTorch + PEFT counterpart is
//! `train_step_torch.py` beside this file; figures live in docs/benchmarks.md.
//!
//! `LORA_BENCH_THREADS` sets the rayon pool (default 2; 0 for the sequential path); OpenBLAS
//! threads are set by `OPENBLAS_NUM_THREADS` (use 1 with a rayon pool: both at once oversubscribe).
//! `LORA_BENCH_ONLY=tiny|bench` runs one config; `LORA_BENCH_SMALL=1` runs the tiny one with
//! short measurements (`cargo xtask bench --small`), to check the bench cheaply.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lora_train::{Batch, ModelConfig, StepOptions};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[path = "support/model.rs"]
mod support;
use support::random_model;

struct Case {
    name: &'static str,
    config: &'static str,
    batch: usize,
    seq: usize,
}

const CASES: [Case; 2] = [
    Case {
        name: "bench",
        config: r#"{"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
            "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8192}"#,
        batch: 8,
        seq: 256,
    },
    Case {
        name: "tiny",
        config: r#"{"model_type": "llama", "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8192}"#,
        batch: 8,
        seq: 64,
    },
];

fn bench(c: &mut Criterion) {
    lora_train::retain_freed_memory();
    lora_train::prefer_huge_pages();
    let threads = std::env::var("LORA_BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let small = std::env::var("LORA_BENCH_SMALL").is_ok_and(|v| !v.is_empty() && v != "0");
    let only = if small { Some("tiny".to_string()) } else { std::env::var("LORA_BENCH_ONLY").ok() };
    for case in CASES.iter().filter(|c| only.as_deref().is_none_or(|o| o == c.name)) {
        let config = ModelConfig::from_json(case.config, case.name).expect("valid config");
        let model = random_model(&config, threads);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let ids =
            Array2::from_shape_simple_fn((case.batch, case.seq), || rng.random_range(0..config.vocab_size as u32));
        let batch = Batch::new(ids).expect("non-empty");
        let mut group = c.benchmark_group(format!("train_step/{}", case.name));
        group.throughput(Throughput::Elements((case.batch * case.seq) as u64));
        group.sample_size(10).warm_up_time(Duration::from_secs(3)).measurement_time(Duration::from_secs(20));
        if small {
            group.warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
        }
        group.bench_function("forward_backward", |b| {
            b.iter(|| model.loss_and_grads(&batch, StepOptions::default()).expect("step"))
        });
        group.bench_function("forward_backward_checkpointing", |b| {
            b.iter(|| model.loss_and_grads(&batch, StepOptions { checkpointing: true, dropout_seed: 0 }).expect("step"))
        });
        group.bench_function("forward", |b| b.iter(|| model.loss(&batch).expect("forward")));
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
