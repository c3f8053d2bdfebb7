//! `lora train`: fine-tune a LoRA on a Llama-family model folder, on the CPU.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use lora_core::{Init, TargetModules};
use lora_train::optim::Schedule;
use lora_train::{latest_checkpoint, train, TrainConfig, TrainLength};
use serde_json::json;

use crate::common::{print_json, progress_bar, remove_path, set_threads};
use crate::finite::{Checker, NonFinite};

/// Options of `lora train`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  lora train --base ./tinyllama --data train.jsonl --out ./adapter --rank 8 --steps 500 --lr 2e-4\n  \
lora train --base ./tinyllama --data notes.txt --out ./adapter --epochs 2 --save-every 100 --resume\n\n\
Data: a plain text file, or .jsonl with {\"text\": ...} or {\"prompt\": ..., \"completion\": ...} per line \
(loss on the completion only); tokenized with the model's tokenizer.json, else as bytes."
)]
pub struct TrainArgs {
    /// The base model folder (Llama, Mistral or Qwen2).
    #[arg(long)]
    pub base: PathBuf,
    /// Training data: .txt or .jsonl.
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder: the final PEFT adapter, checkpoint-N/ folders and metrics.jsonl.
    #[arg(long)]
    pub out: PathBuf,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// Scale alpha / sqrt(r) instead of alpha / r.
    #[arg(long)]
    pub rslora: bool,
    /// Projections to adapt: a comma-separated list (q_proj,v_proj) or all-linear.
    #[arg(long, default_value = "all-linear")]
    pub targets: String,
    /// Initialise A with PEFT's gaussian init instead of kaiming-uniform.
    #[arg(long)]
    pub gaussian_init: bool,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Optimizer steps (default 100 unless --epochs).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<usize>,
    /// Passes over the training blocks instead of --steps.
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Warmup steps (linear from 0).
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Learning-rate schedule after warmup: constant, linear or cosine.
    #[arg(long, default_value = "linear")]
    pub schedule: String,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip gradients to this global norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Seed of the initialisation, the data order and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Threads (default: all cores; 1 is the deterministic sequential path).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Recompute each layer's activations in the backward pass (less memory).
    #[arg(long)]
    pub checkpointing: bool,
    /// Write a checkpoint every N steps.
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Evaluate the validation split every N steps.
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Fraction of the blocks held out for validation.
    #[arg(long, default_value_t = 0.0)]
    pub val_fraction: f64,
    /// Continue from the latest checkpoint-N folder in --out.
    #[arg(long, conflicts_with = "resume_from")]
    pub resume: bool,
    /// Continue from this checkpoint folder.
    #[arg(long, value_name = "DIR")]
    pub resume_from: Option<PathBuf>,
    /// Plot the training (and validation) loss to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Start over in a folder that holds an earlier run (without --resume): its checkpoints,
    /// adapter and metrics are removed first.
    #[arg(long, conflicts_with_all = ["resume", "resume_from"])]
    pub force: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

impl TrainArgs {
    fn config(&self) -> Result<TrainConfig> {
        let targets = match self.targets.as_str() {
            "all-linear" => TargetModules::AllLinear,
            list => {
                TargetModules::List(list.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect())
            }
        };
        let resume = match (&self.resume_from, self.resume) {
            (Some(p), _) => Some(p.clone()),
            (None, true) => Some(
                latest_checkpoint(&self.out)?
                    .with_context(|| format!("--resume: {} holds no checkpoint-N folder", self.out.display()))?,
            ),
            (None, false) => None,
        };
        Ok(TrainConfig {
            rank: self.rank,
            alpha: self.alpha,
            rslora: self.rslora,
            targets,
            init: if self.gaussian_init { Init::Gaussian } else { Init::KaimingUniform },
            lr: self.lr,
            length: match self.epochs {
                Some(e) => TrainLength::Epochs(e),
                None => TrainLength::Steps(self.steps.unwrap_or(100)),
            },
            batch: self.batch,
            seq_len: self.seq_len,
            grad_accum: self.grad_accum,
            warmup: self.warmup,
            schedule: Schedule::parse(&self.schedule)?,
            weight_decay: self.weight_decay,
            max_grad_norm: if self.max_grad_norm > 0.0 { Some(self.max_grad_norm) } else { None },
            dropout: self.dropout,
            seed: self.seed,
            threads: self.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            checkpointing: self.checkpointing,
            save_every: self.save_every,
            eval_every: self.eval_every,
            val_fraction: self.val_fraction,
            resume,
            ..TrainConfig::default()
        })
    }
}

/// Run `lora train` and print its summary.
pub fn run(args: &TrainArgs, quiet: bool) -> Result<()> {
    let s = execute(args, quiet)?;
    if args.json {
        print_json(&s);
    } else {
        println!(
            "trained {} steps: last loss {:.4}{}; adapter in {}",
            s["steps"],
            s["last_loss"].as_f64().unwrap_or(f64::NAN),
            match s["eval_loss"].as_f64() {
                Some(l) => format!(", validation loss {l:.4} (perplexity {:.3})", l.exp()),
                None => String::new(),
            },
            args.out.display()
        );
    }
    Ok(())
}

/// Without --resume, a run starts in a folder that holds no earlier run; with --force the earlier
/// run's checkpoints, adapter and metrics are removed first.
fn start_over(out: &Path, force: bool) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(out) else { return Ok(()) };
    let mut earlier: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("checkpoint-")
                || name.starts_with(".checkpoint-")
                || [lora_io::CONFIG_FILE, lora_io::WEIGHTS_FILE, "metrics.jsonl"].contains(&name)
        })
        .collect();
    if earlier.is_empty() {
        return Ok(());
    }
    earlier.sort();
    if !force {
        let names: Vec<String> =
            earlier.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
        bail!(
            "{} holds an earlier run ({}); pass --resume to continue it or --force to start over",
            out.display(),
            names.join(", ")
        );
    }
    for p in &earlier {
        remove_path(p)?;
    }
    Ok(())
}

/// Train; the summary is what `--json` prints.
pub fn execute(args: &TrainArgs, quiet: bool) -> Result<serde_json::Value> {
    let config = args.config()?;
    if config.resume.is_none() {
        start_over(&args.out, args.force)?;
    }
    // NaN or an infinity in the base would only show later as a non-finite loss.
    Checker::new(NonFinite::Refuse, None).check_model(&crate::source::open_model(&args.base, "base")?)?;
    // The trainer's own pool splits the work; OpenBLAS under it runs single-threaded.
    set_threads(None, Some(1))?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let metrics_path = args.out.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(config.resume.is_some())
        .write(true)
        .truncate(config.resume.is_none())
        .open(&metrics_path)
        .with_context(|| format!("cannot write {}", metrics_path.display()))?;
    let bar = progress_bar(0, quiet, "train");
    let mut train_curve = Vec::new();
    let mut eval_curve = Vec::new();
    let mut write_error = None;
    let summary = train(&args.base, &args.data, &args.out, &config, |r| {
        bar.set_length(r.total_steps as u64);
        bar.set_position(r.step as u64);
        bar.set_message(format!("loss {:.4} lr {:.2e} {:.0} tok/s", r.loss, r.lr, r.tokens_per_second));
        train_curve.push((r.step as f64, r.loss));
        if let Some(e) = &r.eval {
            eval_curve.push((r.step as f64, e.loss));
        }
        if let Err(e) = writeln!(metrics, "{}", r.to_json()) {
            write_error = Some(e);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    })?;
    bar.finish_and_clear();
    if let Some(e) = write_error {
        bail!("{}: {e}", metrics_path.display());
    }
    if let Some(path) = &args.plot {
        let mut series = vec![("training loss".to_string(), train_curve)];
        if !eval_curve.is_empty() {
            series.push(("validation loss".to_string(), eval_curve));
        }
        crate::common::write_output(path, true, |p| crate::plot::curves_svg(p, "LoRA training", &series))?;
    }
    Ok(json!({
        "out": args.out,
        "steps": summary.steps,
        "total_steps": summary.total_steps,
        "last_loss": summary.last_loss,
        "eval_loss": summary.eval.map(|e| e.loss),
        "adapter": summary.adapter_dir,
        "metrics": metrics_path,
    }))
}
