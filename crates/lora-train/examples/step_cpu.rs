//! CPU seconds and wall seconds per training step on the issue-6 bench config (the model and
//! batch of benches/train_step.rs), for a shared machine: when other processes take the cores,
//! wall time swings by 2-3x between runs but the CPU time a step consumes moves much less, so
//! two builds compared by CPU time back to back are still told apart.
//!
//!     OPENBLAS_NUM_THREADS=1 cargo run --release -p lora-train --example step_cpu [-- STEPS [THREADS]]
//!
//! Prints the loss, the median and fastest wall time of STEPS steps (default 6) after one
//! warm-up step, and the process's user + system CPU time per step (from /proc/self/stat, so
//! Linux only) on a rayon pool of THREADS threads (default 2).
//!
//! Two builds can also run at the same moment, one thread each, each on its own core
//! (`taskset -c 0 ./a 4 1 & taskset -c 1 ./b 4 1`): both then see the same host, which a
//! noisy machine gives no two runs in a row. Swap the cores between rounds.
use std::time::Instant;

use lora_train::{Batch, ModelConfig, StepOptions};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[path = "../benches/support/model.rs"]
mod support;
use support::random_model;

/// User + system CPU seconds of this process so far (fields 14 and 15 of /proc/self/stat, in
/// clock ticks of 1/100 s).
fn cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("Linux /proc/self/stat");
    // the command name (field 2) is in parentheses and may hold spaces: count from after it
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

fn main() {
    lora_train::retain_freed_memory();
    lora_train::prefer_huge_pages();
    let cfg = r#"{"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
            "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8192}"#;
    let config = ModelConfig::from_json(cfg, "bench").unwrap();
    let arg = |i: usize, default: usize| std::env::args().nth(i).and_then(|v| v.parse().ok()).unwrap_or(default);
    let (steps, threads) = (arg(1, 6), arg(2, 2));
    let model = random_model(&config, threads);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let ids = Array2::from_shape_simple_fn((8, 256), || rng.random_range(0..config.vocab_size as u32));
    let batch = Batch::new(ids).unwrap();
    let (l, _) = model.loss_and_grads(&batch, StepOptions::default()).unwrap();
    let mut walls = vec![];
    let c0 = cpu();
    for _ in 0..steps {
        let t = Instant::now();
        std::hint::black_box(model.loss_and_grads(&batch, StepOptions::default()).unwrap());
        walls.push(t.elapsed().as_secs_f64());
    }
    let c = (cpu() - c0) / steps as f64;
    walls.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "loss {:.6}, wall median {:.3} s, fastest {:.3} s, CPU {:.3} s per step",
        l.mean(),
        walls[steps / 2],
        walls[0],
        c
    );
}
