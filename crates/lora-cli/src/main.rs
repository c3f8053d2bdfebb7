//! The `lora` command: inspect, extract, merge, convert, resize, combine, train, eval and demo.
//!
//! Results go to stdout (`--json` for machines), progress bars and errors to stderr. Every output
//! appears complete or not at all; an error is one line naming the file and tensor, exit code 1.

mod adapters;
mod combine;
mod common;
mod convert;
mod demo;
mod eval;
mod extract;
mod finite;
mod inspect;
mod merge;
mod plot;
mod resize;
mod source;
mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// LoRA adapters without Python: inspect, extract, merge, convert, resize, combine.
#[derive(Debug, Parser)]
#[command(name = "lora", version, about, long_about = None)]
struct Cli {
    /// Hide progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show what an adapter or a model holds: modules, ranks, scales, parameters, problems.
    Inspect(inspect::InspectArgs),
    /// Extract a LoRA adapter from a fine-tuned model and its base by truncated SVD.
    Extract(extract::ExtractArgs),
    /// Merge an adapter into a model folder (or take it out with --unmerge).
    Merge(merge::MergeArgs),
    /// Convert an adapter between PEFT, kohya and GGUF.
    Convert(convert::ConvertArgs),
    /// Change an adapter's rank without rebuilding the full matrices.
    Resize(resize::ResizeArgs),
    /// Combine adapters: weighted sum, concatenation or SVD to a rank.
    Combine(combine::CombineArgs),
    /// Fine-tune a LoRA on a Llama-family model on the CPU; writes a PEFT adapter folder.
    Train(train::TrainArgs),
    /// Loss and perplexity of a model, with an adapter or without, on a text file.
    Eval(eval::EvalArgs),
    /// Run the toolkit end to end on a small seeded model (no files needed).
    #[command(after_help = "Example:\n  lora demo\n  lora demo --out ./demo")]
    Demo(demo::DemoArgs),
}

fn main() {
    let cli = Cli::parse();
    // training and merging free and re-take blocks of many MiB; keep them (see the function)
    lora_train::retain_freed_memory();
    if matches!(cli.command, Command::Train(_) | Command::Eval(_)) {
        // long runs that reuse their memory; a short command would pay for whole huge pages
        lora_train::prefer_huge_pages();
    }
    let result: Result<()> = match &cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Extract(args) => extract::run(args, cli.quiet),
        Command::Merge(args) => merge::run(args, cli.quiet),
        Command::Convert(args) => convert::run(args),
        Command::Resize(args) => resize::run(args),
        Command::Combine(args) => combine::run(args),
        Command::Train(args) => train::run(args, cli.quiet),
        Command::Eval(args) => eval::run(args),
        Command::Demo(args) => demo::run(args, cli.quiet),
    };
    if let Err(err) = result {
        eprintln!("error: {}", one_line(&err));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, each cause once: the libraries' errors print their
/// source in their own message, so a cause already in the text is not repeated.
fn one_line(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}
