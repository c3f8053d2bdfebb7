//! `lora convert`: an adapter from one format to another, every delta kept.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use crate::common::{print_json, FormatArg, OutputArgs};
use crate::source::open_model;

/// Options of `lora convert`.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  lora convert ./adapter --to gguf --base ./llama --out adapter.gguf\n  \
lora convert lora.safetensors --to peft --base ./llama --out ./adapter")]
pub struct ConvertArgs {
    /// The adapter to convert (PEFT folder, kohya file or GGUF).
    pub input: PathBuf,
    /// The format to write.
    #[arg(long, value_enum)]
    pub to: FormatArg,
    /// The base model: resolves kohya module names and gives GGUF its architecture.
    #[arg(long)]
    pub base: Option<PathBuf>,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Run `lora convert` and print its summary.
pub fn run(args: &ConvertArgs) -> Result<()> {
    let s = execute(args)?;
    if args.output.json {
        print_json(&s);
    } else {
        println!(
            "converted {} modules from {} to {}: wrote {}",
            s["modules"],
            s["from"].as_str().unwrap_or(""),
            s["to"].as_str().unwrap_or(""),
            args.output.out.display()
        );
    }
    Ok(())
}

/// Do the conversion; the summary is what `--json` prints.
pub fn execute(args: &ConvertArgs) -> Result<serde_json::Value> {
    let base = args.base.as_deref().map(|p| open_model(p, "base")).transpose()?;
    let adapter = crate::adapters::read(&args.input, base.as_ref())?;
    if let Some(base) = &base {
        lora_io::check_adapter_against_model(&adapter, base.source(), &args.input)?;
    }
    let from = lora_io::detect_format(&args.input)?;
    let options = args.output.write_options(base.as_ref());
    args.output.write(|path| Ok(lora_io::write_adapter_with(&adapter, path, args.to.into(), &options)?))?;
    let to = lora_io::Format::from(args.to);
    Ok(
        json!({"input": args.input, "from": from.name(), "to": to.name(), "out": args.output.out, "modules": adapter.len()}),
    )
}
