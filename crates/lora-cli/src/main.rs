//! The `lora` command.
//!
//! Subcommands grow with the crates under them; `lora demo` runs the main job on an embedded
//! default so that a newcomer sees the toolkit work without a model at hand.

mod demo;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// LoRA adapters without Python: inspect, extract, merge, convert, resize, combine, train.
#[derive(Debug, Parser)]
#[command(name = "lora", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the toolkit end to end on a small seeded model (no files needed).
    ///
    /// Example: `lora demo`
    Demo(demo::DemoArgs),
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Demo(args) => demo::run(&args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
