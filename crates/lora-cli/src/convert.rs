//! `lora convert`: an adapter from one format to another, every delta kept.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use lora_core::DType;
use lora_io::WriteOptions;
use serde_json::json;

use crate::common::{print_json, write_output, DTypeArg, FormatArg};
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
    /// Where to write (a folder for PEFT, a file for kohya and GGUF).
    #[arg(long)]
    pub out: PathBuf,
    /// The base model: resolves kohya module names and gives GGUF its architecture.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Stored dtype (default: the input's).
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Run `lora convert` and print its summary.
pub fn run(args: &ConvertArgs) -> Result<()> {
    let s = execute(args)?;
    if args.json {
        print_json(&s);
    } else {
        println!(
            "converted {} modules from {} to {}: wrote {}",
            s["modules"],
            s["from"].as_str().unwrap_or(""),
            s["to"].as_str().unwrap_or(""),
            args.out.display()
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
    let options = WriteOptions {
        dtype: args.dtype.map(DType::from),
        base_config: base.as_ref().and_then(|b| b.config().cloned()),
    };
    write_output(&args.out, args.force, |path| {
        Ok(lora_io::write_adapter_with(&adapter, path, args.to.into(), &options)?)
    })?;
    let to = lora_io::Format::from(args.to);
    Ok(json!({"input": args.input, "from": from.name(), "to": to.name(), "out": args.out, "modules": adapter.len()}))
}
