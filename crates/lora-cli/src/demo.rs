//! `lora demo`: the toolkit's main job on a small seeded model, with no input files.
//!
//! For now it exercises lora-core: a seeded stack of Llama-shaped projections gets a LoRA, the
//! unmerged forward is checked against the merged weight, the merge is undone, and the parameter
//! savings are printed. Later issues add extraction, resizing, conversion and training.

use std::time::Instant;

use anyhow::{ensure, Result};
use clap::Args;
use lora_core::{Init, LoraLayer, ParamCount, Scaling, WeightLayout};
use ndarray::Array2;

/// Options of `lora demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Hidden size of the demo model.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Seed of every random draw.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The projections of one Llama decoder layer: name, d_in, d_out as multiples of the hidden size
/// (the MLP is 8/3 wider, rounded as Llama rounds it).
fn llama_projections(hidden: usize) -> Vec<(&'static str, usize, usize)> {
    let inter = (8 * hidden / 3).div_ceil(64) * 64;
    vec![
        ("self_attn.q_proj", hidden, hidden),
        ("self_attn.k_proj", hidden, hidden),
        ("self_attn.v_proj", hidden, hidden),
        ("self_attn.o_proj", hidden, hidden),
        ("mlp.gate_proj", hidden, inter),
        ("mlp.up_proj", hidden, inter),
        ("mlp.down_proj", inter, hidden),
    ]
}

fn max_abs_diff(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

/// Run the demo and print its table on stdout.
pub fn run(args: &DemoArgs) -> Result<()> {
    println!("lora demo: one Llama-shaped decoder layer, hidden {}, LoRA rank {}", args.hidden, args.rank);
    println!(
        "{:<18} {:>6} {:>6} {:>10} {:>10} {:>8} {:>12} {:>12}",
        "module", "d_in", "d_out", "trainable", "full", "ratio", "fwd err", "unmerge err"
    );
    let mut total = ParamCount::default();
    let start = Instant::now();
    for (i, (name, d_in, d_out)) in llama_projections(args.hidden).into_iter().enumerate() {
        let seed = args.seed.wrapping_add(i as u64);
        let base = LoraLayer::<f32>::init(
            d_in,
            d_out,
            d_in.min(d_out),
            1.0,
            Scaling::Standard,
            Init::Random { b_std: 0.05 },
            seed,
        )?;
        let w0 = base.delta();
        let lora = LoraLayer::<f32>::init(
            d_in,
            d_out,
            args.rank,
            2.0 * args.rank as f64,
            Scaling::Standard,
            Init::Random { b_std: 0.02 },
            seed ^ 0x5eed,
        )?;
        let x =
            LoraLayer::<f32>::init(d_in, 16, 1, 1.0, Scaling::Standard, Init::Random { b_std: 1.0 }, seed ^ 0xda7a)?
                .delta();

        let y = lora.forward(&x, &w0, WeightLayout::OutIn)?;
        let mut w = w0.clone();
        lora.merge_into(&mut w, WeightLayout::OutIn)?;
        let fwd_err = max_abs_diff(&y, &x.dot(&w.t()));
        lora.unmerge_from(&mut w, WeightLayout::OutIn)?;
        let unmerge_err = max_abs_diff(&w, &w0);
        ensure!(fwd_err < 1e-3 && unmerge_err < 1e-5, "{name}: forward or unmerge disagrees with the merged weight");

        let count = lora.param_count();
        total += count;
        println!(
            "{name:<18} {d_in:>6} {d_out:>6} {:>10} {:>10} {:>7.2}% {fwd_err:>12.2e} {unmerge_err:>12.2e}",
            count.trainable,
            count.full,
            100.0 * count.ratio()
        );
    }
    println!(
        "{:<18} {:>6} {:>6} {:>10} {:>10} {:>7.2}%   ({:.0}x fewer numbers to tune, {:.2} s)",
        "total",
        "",
        "",
        total.trainable,
        total.full,
        100.0 * total.ratio(),
        total.reduction(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
