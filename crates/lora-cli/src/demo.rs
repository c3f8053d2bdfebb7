//! `lora demo`: the toolkit's main job on a small seeded model, with no input files.
//!
//! It builds a seeded Llama-shaped base model (lora-train's `TinyModelSpec`) and a "fine-tuned"
//! variant whose weight differences have the decaying spectrum real fine-tunes show, then runs the
//! real commands on them: extract a rank-16 adapter, resize it to rank 8, merge it back into the
//! base, convert it to kohya and GGUF and read those back. Each step is checked (the merge must
//! reproduce the tuned weights to the extraction's error, the conversions must keep every delta)
//! and timed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use clap::Args;
use lora_core::{deltas, DType, TensorSource};
use lora_train::synthetic::{write_tiny_model, TinyModelSpec};
use ndarray::{Array1, Array2, ArrayD, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::common::{write_output, AdapterOutputArgs, FormatArg, OutputArgs, RankArgs};

/// Options of `lora demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Folder for the files the demo writes (default: lora-demo in the system's temp folder).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Hidden size of the demo model.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Decoder layers of the demo model.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Rank of the extracted adapter.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Seed of every random draw.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training steps of the LoRA trained on 2-digit addition (0 skips training).
    #[arg(long, default_value_t = 300)]
    train_steps: usize,
}

/// The demo's base model: a seeded Llama of `hidden` and `layers`, Llama's MLP width (8/3 of the
/// hidden size, rounded up to a multiple of 16), heads of 64 and a 1024-token vocabulary.
fn model_spec(hidden: usize, layers: usize, seed: u64) -> TinyModelSpec {
    let heads = (hidden / 64).max(1);
    let intermediate = (8 * hidden / 3).div_ceil(16) * 16;
    TinyModelSpec { hidden, intermediate, layers, heads, kv_heads: heads, vocab: 1024, seed }
}

fn gaussian(rows: usize, cols: usize, std: f64, rng: &mut ChaCha8Rng) -> Array2<f32> {
    Array2::from_shape_simple_fn((rows, cols), || {
        let z: f64 = StandardNormal.sample(rng);
        (std * z) as f32
    })
}

/// A fine-tune-like difference: sigma_i = 0.5 / i on random directions, plus a little noise.
fn finetune_delta(d_out: usize, d_in: usize, rng: &mut ChaCha8Rng) -> Array2<f32> {
    let k = 48.min(d_out).min(d_in);
    let u = gaussian(d_out, k, 1.0 / (d_out as f64).sqrt(), rng);
    let v = gaussian(k, d_in, 1.0 / (d_in as f64).sqrt(), rng);
    let sigma = Array1::from_shape_fn(k, |i| 0.5 / (i + 1) as f32);
    let mut delta = (&u * &sigma.insert_axis(Axis(0))).dot(&v);
    delta += &gaussian(d_out, d_in, 2e-5, rng);
    delta
}

/// Named tensors in file order.
type Tensors = Vec<(String, ArrayD<f32>)>;

/// The "fine-tuned" variant of `base`: every projection plus a [`finetune_delta`].
fn tuned_tensors(base: &[(String, ArrayD<f32>)], seed: u64) -> Tensors {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7475_6e65);
    base.iter()
        .map(|(name, w)| match w.shape() {
            &[d_out, d_in] if name.ends_with("_proj.weight") => {
                (name.clone(), w + &finetune_delta(d_out, d_in, &mut rng).into_dyn())
            }
            _ => (name.clone(), w.clone()),
        })
        .collect()
}

fn write_model_folder(dir: &Path, config: &str, tensors: &[(String, ArrayD<f32>)]) -> Result<()> {
    write_output(dir, true, |staged| {
        std::fs::create_dir_all(staged)?;
        std::fs::write(staged.join("config.json"), config)?;
        let metadata = [("format".to_string(), "pt".to_string())].into();
        lora_io::write_safetensors(staged.join(lora_io::SINGLE_FILE), tensors, DType::F32, &metadata)?;
        Ok(())
    })
}

fn rank_args(rank: usize) -> RankArgs {
    RankArgs {
        rank: Some(rank),
        energy: None,
        sv_ratio: None,
        sv_epsilon: None,
        sv_cumulative: None,
        max_rank: None,
        min_rank: 1,
    }
}

/// ||a - b||_F / ||b||_F over the tensors both name, in f64.
fn relative_difference(a: &dyn TensorSource, b: &dyn TensorSource, names: &[String]) -> Result<f64> {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for name in names {
        let (x, y) = (a.read_f32(name)?, b.read_f32(name)?);
        for (p, q) in x.iter().zip(y.iter()) {
            num += f64::from(p - q).powi(2);
            den += f64::from(*q).powi(2);
        }
    }
    Ok((num / den.max(f64::MIN_POSITIVE)).sqrt())
}

/// Largest |delta_a - delta_b| over every module of two adapters that must hold the same deltas.
fn max_delta_difference(a: &Path, b: &Path, base: &crate::source::Model) -> Result<f32> {
    let (da, db) = (deltas(&crate::adapters::read(a, Some(base))?), deltas(&crate::adapters::read(b, Some(base))?));
    ensure!(da.len() == db.len(), "{} has {} modules, {} has {}", a.display(), da.len(), b.display(), db.len());
    let mut worst = 0.0f32;
    for (name, d) in &da {
        let other = db.get(name).with_context(|| format!("{} lacks module {name}", b.display()))?;
        worst = d.iter().zip(other.iter()).fold(worst, |m, (x, y)| m.max((x - y).abs()));
    }
    Ok(worst)
}

/// A tiny seeded Llama learns 2-digit addition (`12+34=` -> `46`) with a rank-4 LoRA; the loss
/// and the held-out answer accuracy are measured before and after.
fn train_step(out: &Path, args: &DemoArgs, quiet: bool) -> Result<Row> {
    use lora_train::data::TextTokenizer;
    use lora_train::synthetic::{answer_accuracy, generate, to_jsonl, Task};

    let t = Instant::now();
    let spec = TinyModelSpec {
        hidden: 32,
        intermediate: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        vocab: 256,
        seed: args.seed + 1,
    };
    let base = out.join("tiny-llama");
    write_output(&base, true, |staged| Ok(write_tiny_model(staged, &spec)?))?;
    let examples = generate(Task::Addition { digits: 2 }, 600, args.seed);
    let (train_set, held_out) = examples.split_at(500);
    let data = out.join("addition.jsonl");
    write_output(&data, true, |p| Ok(std::fs::write(p, to_jsonl(train_set))?))?;
    let bytes = TextTokenizer::bytes();
    let before = answer_accuracy(&lora_train::load_model(&base)?, &bytes, held_out)?;

    let trained = out.join("addition-lora");
    if trained.exists() {
        std::fs::remove_dir_all(&trained).with_context(|| format!("cannot replace {}", trained.display()))?;
    }
    let train = crate::train::TrainArgs {
        base: base.clone(),
        data: data.clone(),
        out: trained.clone(),
        rank: 4,
        alpha: 8.0,
        rslora: false,
        targets: "all-linear".into(),
        gaussian_init: false,
        lr: 1e-2,
        steps: Some(args.train_steps),
        epochs: None,
        batch: 4,
        seq_len: 32,
        grad_accum: 1,
        warmup: 0,
        schedule: "constant".into(),
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        dropout: 0.0,
        seed: args.seed,
        threads: None,
        checkpointing: false,
        save_every: None,
        eval_every: None,
        val_fraction: 0.0,
        resume: false,
        resume_from: None,
        plot: Some(out.join("training-loss.svg")),
        force: true,
        json: true,
    };
    let summary = crate::train::execute(&train, quiet)?;
    let first_loss = std::fs::read_to_string(trained.join("metrics.jsonl"))?
        .lines()
        .next()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["loss"].as_f64())
        .unwrap_or(f64::NAN);
    let mut model = lora_train::load_model(&base)?;
    model.load_adapter(&lora_io::read_peft::<f32>(&trained)?)?;
    let after = answer_accuracy(&model, &bytes, held_out)?;
    Ok(Row {
        step: format!("train rank-4 LoRA, {} steps", args.train_steps),
        seconds: t.elapsed().as_secs_f64(),
        figure: format!(
            "2-digit addition: loss {first_loss:.2} -> {:.2}, held-out answer accuracy {:.0}% -> {:.0}%",
            summary["last_loss"].as_f64().unwrap_or(f64::NAN),
            100.0 * before.token_accuracy,
            100.0 * after.token_accuracy
        ),
        output: "tiny-llama/, addition.jsonl, addition-lora/, training-loss.svg".into(),
    })
}

struct Row {
    step: String,
    seconds: f64,
    figure: String,
    output: String,
}

/// Run the demo and print its table on stdout.
pub fn run(args: &DemoArgs, quiet: bool) -> Result<()> {
    let out = args.out.clone().unwrap_or_else(|| std::env::temp_dir().join("lora-demo"));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let spec = model_spec(args.hidden, args.layers, args.seed);
    let mut rows: Vec<Row> = Vec::new();
    let path = |name: &str| out.join(name);
    let show = |p: &Path| p.strip_prefix(&out).unwrap_or(p).display().to_string();

    let t = Instant::now();
    let base_tensors = spec.tensors();
    write_output(&path("base"), true, |staged| Ok(write_tiny_model(staged, &spec)?))?;
    write_model_folder(&path("tuned"), &spec.config_json(), &tuned_tensors(&base_tensors, args.seed))?;
    let params: usize = base_tensors.iter().map(|(_, t)| t.len()).sum();
    rows.push(Row {
        step: "build base + tuned".into(),
        seconds: t.elapsed().as_secs_f64(),
        figure: format!("{params} parameters, {} layers, hidden {}", spec.layers, spec.hidden),
        output: "base/, tuned/".into(),
    });

    let t = Instant::now();
    let extract = crate::extract::ExtractArgs {
        base: path("base"),
        tuned: path("tuned"),
        rank: rank_args(args.rank),
        method: crate::extract::MethodArg::Randomized,
        seed: args.seed,
        alpha: None,
        include: None,
        exclude: None,
        save_untouched: false,
        allow_nonfinite: false,
        format: FormatArg::Peft,
        threads: None,
        report: Some(path("extract-report.json")),
        plot: Some(path("spectra.svg")),
        output: OutputArgs::replacing(path("adapter")),
    };
    let s = crate::extract::execute(&extract, quiet)?;
    let extract_error = s["max_relative_error"].as_f64().unwrap_or(f64::NAN);
    rows.push(Row {
        step: format!("extract rank {} (randomized SVD)", args.rank),
        seconds: t.elapsed().as_secs_f64(),
        figure: format!(
            "{} modules, {} of {} numbers ({:.2}%), worst error {:.2e}",
            s["modules"],
            s["trainable_parameters"],
            s["full_parameters"],
            100.0 * s["trainable_parameters"].as_f64().unwrap_or(0.0) / s["full_parameters"].as_f64().unwrap_or(1.0),
            extract_error
        ),
        output: "adapter/ (PEFT), extract-report.json, spectra.svg".into(),
    });

    let t = Instant::now();
    let resize = crate::resize::ResizeArgs {
        adapter: path("adapter"),
        rank: rank_args((args.rank / 2).max(1)),
        target: AdapterOutputArgs { format: None, base: None },
        output: OutputArgs::replacing(path("adapter-r8")),
    };
    let s = crate::resize::execute(&resize)?;
    rows.push(Row {
        step: format!("resize to rank {}", (args.rank / 2).max(1)),
        seconds: t.elapsed().as_secs_f64(),
        figure: format!(
            "{} -> {} numbers, worst error vs rank {} {:.2e}",
            s["parameters_before"],
            s["parameters_after"],
            args.rank,
            s["max_relative_error"].as_f64().unwrap_or(f64::NAN)
        ),
        output: "adapter-r8/".into(),
    });

    let t = Instant::now();
    let merge = crate::merge::MergeArgs {
        base: path("base"),
        adapter: path("adapter"),
        scale: 1.0,
        unmerge: false,
        allow_nonfinite: false,
        threads: None,
        output: OutputArgs::replacing(path("merged")),
    };
    crate::merge::execute(&merge, quiet)?;
    let seconds = t.elapsed().as_secs_f64();
    let (merged, tuned, base) = (
        crate::source::open_model(&path("merged"), "merged")?,
        crate::source::open_model(&path("tuned"), "tuned")?,
        crate::source::open_model(&path("base"), "base")?,
    );
    let linear: Vec<String> = tuned.source().tensor_names().into_iter().filter(|n| n.contains("_proj.")).collect();
    let merge_error = relative_difference(merged.source(), tuned.source(), &linear)?;
    let delta_norm = relative_difference(base.source(), tuned.source(), &linear)?;
    ensure!(
        merge_error <= delta_norm * extract_error * 1.01 + 1e-6,
        "merged weights are further from the tuned ones ({merge_error:.3e}) than the extraction error allows"
    );
    rows.push(Row {
        step: "merge adapter into base".into(),
        seconds,
        figure: format!("|merged - tuned| / |tuned| = {merge_error:.2e} (base was {delta_norm:.2e} away)"),
        output: "merged/".into(),
    });

    for (to, name) in [(FormatArg::Kohya, "adapter-kohya.safetensors"), (FormatArg::Gguf, "adapter.gguf")] {
        let t = Instant::now();
        let convert = crate::convert::ConvertArgs {
            input: path("adapter"),
            to,
            base: Some(path("base")),
            output: OutputArgs::replacing(path(name)),
        };
        crate::convert::execute(&convert)?;
        let seconds = t.elapsed().as_secs_f64();
        let diff = max_delta_difference(&path("adapter"), &path(name), &base)?;
        ensure!(diff <= 1e-6, "{name} does not hold the adapter's deltas (max difference {diff:.3e})");
        rows.push(Row {
            step: format!("convert to {}", lora_io::Format::from(to)),
            seconds,
            figure: format!("read back: max |delta difference| = {diff:.1e}"),
            output: show(&path(name)),
        });
    }

    if args.train_steps > 0 {
        rows.push(train_step(&out, args, quiet)?);
    }

    println!(
        "lora demo: a {}-layer Llama-shaped model (hidden {}), files in {}",
        spec.layers,
        spec.hidden,
        out.display()
    );
    println!();
    println!("{:<34} {:>8}  {:<64} written", "step", "seconds", "result");
    for r in &rows {
        println!("{:<34} {:>8.3}  {:<64} {}", r.step, r.seconds, r.figure, r.output);
    }
    Ok(())
}
