//! `lora eval`: loss and perplexity of a model (with an adapter or not) on a text file.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use lora_train::eval::{evaluate, tokenize_file, Tokenization};
use lora_train::{Model, Parallelism};
use serde_json::json;

use crate::common::{print_json, set_threads};

/// Options of `lora eval`.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  lora eval --base ./llama --data valid.txt --seq-len 256\n  \
lora eval --base ./llama --adapter ./adapter --data valid.txt --json\n\n\
Convention (as transformers' model(input_ids=block, labels=block)): the tokens are cut into \
consecutive blocks of exactly --seq-len, the final partial block dropped; position t predicts \
token t+1; loss is the mean cross-entropy over every prediction; perplexity = exp(loss).")]
pub struct EvalArgs {
    /// The base model folder (Llama, Mistral or Qwen2).
    #[arg(long)]
    pub base: PathBuf,
    /// An adapter to apply (PEFT folder, kohya file or GGUF).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The text to evaluate on: tokenized with the model's tokenizer.json, or as raw bytes.
    #[arg(long)]
    pub data: PathBuf,
    /// Block length in tokens.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Blocks per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object (loss, perplexity, tokens, blocks, seq_len, tokenization).
    #[arg(long)]
    pub json: bool,
}

/// Run `lora eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // The model's own pool splits the work; OpenBLAS under it runs single-threaded.
    set_threads(None, Some(1))?;
    let mut model = Model::<f32>::from_dir(&args.base)
        .with_context(|| format!("cannot load the model {}", args.base.display()))?
        .with_parallelism(Parallelism::Threads(threads))?;
    if let Some(path) = &args.adapter {
        let base = crate::source::open_model(&args.base, "base")?;
        let adapter = crate::adapters::read(path, Some(&base))?;
        model.load_adapter(&adapter).with_context(|| format!("cannot apply {}", path.display()))?;
    }
    let tokens = tokenize_file(&args.base, &args.data, model.config().vocab_size)?;
    let report = evaluate(&model, &tokens.ids, args.seq_len, args.batch)?;
    let tokenization = match &tokens.tokenization {
        Tokenization::Tokenizer(p) => p.display().to_string(),
        Tokenization::Bytes => "bytes".to_string(),
    };
    if args.json {
        let mut value = report.to_json();
        value["tokenization"] = json!(tokenization);
        print_json(&value);
    } else {
        println!(
            "loss {:.6}  perplexity {:.4}  over {} predictions ({} blocks of {} tokens, tokens from {tokenization})",
            report.loss, report.perplexity, report.tokens, report.blocks, report.seq_len
        );
    }
    Ok(())
}
