//! `lora convert`: an adapter from one format to another, every delta kept.

use std::path::PathBuf;

use anyhow::{bail, Result};
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
///
/// The tensors are streamed from the input when lora-io can ([`lora_io::convert_streaming`]:
/// stored bytes copied where no value changes); otherwise, and for every input it refuses, the
/// adapter is read whole, checked and written, which reports what is wrong with the input before
/// anything is written. Both write the same bytes.
pub fn execute(args: &ConvertArgs) -> Result<serde_json::Value> {
    let base = args.base.as_deref().map(|p| open_model(p, "base")).transpose()?;
    let to = lora_io::Format::from(args.to);
    let options = lora_io::ConvertOptions {
        read: crate::adapters::read_options(base.as_ref()),
        write: args.output.write_options(base.as_ref()),
        base: base.as_ref().map(|b| b.source()),
    };
    // `ran`: the output was staged; `declined`: lora-io left this input to the decoding path
    let (mut ran, mut declined, mut streamed) = (false, false, None);
    let attempt = args.output.write(|path| {
        ran = true;
        streamed = lora_io::convert_streaming(&args.input, path, to, &options)?;
        declined = streamed.is_none();
        if declined {
            bail!("left to the decoding path");
        }
        Ok(())
    });
    let (from, modules) = match (attempt, streamed) {
        (Ok(()), Some(c)) => (c.from, c.modules),
        // writing failed (not the input): nothing to fall back on
        (Err(e), _) if ran && !declined => return Err(e),
        _ => {
            let adapter = crate::adapters::read(&args.input, base.as_ref())?;
            if let Some(base) = &base {
                lora_io::check_adapter_against_model(&adapter, base.source(), &args.input)?;
            }
            let from = lora_io::detect_format(&args.input)?;
            args.output.write(|path| Ok(lora_io::write_adapter_with(&adapter, path, to, &options.write)?))?;
            (from, adapter.len())
        }
    };
    Ok(json!({"input": args.input, "from": from.name(), "to": to.name(), "out": args.output.out, "modules": modules}))
}
