//! Convert an adapter between formats: `convert IN OUT FORMAT [--base MODEL_DIR] [--dtype F16]`.
//!
//! Used to make the files that the real PEFT and the `gguf` package check (see
//! tests/fixtures/README.md); the `lora convert` command of lora-cli does the same for users.

use std::process::ExitCode;

use lora_core::DType;
use lora_io::{convert_adapter, ConvertOptions, Format, ModelFolder, ReadOptions, WriteOptions};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        return Err("usage: convert IN OUT FORMAT [--base MODEL_DIR] [--dtype F32|F16|BF16]".into());
    }
    let format: Format = args[2].parse()?;
    let mut read = ReadOptions::default();
    let mut write = WriteOptions::default();
    let mut rest = args[3..].iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().ok_or("flag without value")?;
        match flag.as_str() {
            "--base" => {
                let model = ModelFolder::open(value)?;
                read.modules =
                    Some(model.names().filter_map(|n| n.strip_suffix(".weight")).map(str::to_string).collect());
                read.base_config = model.config().cloned();
                write.base_config = model.config().cloned();
            }
            "--dtype" => {
                write.dtype = Some(match value.as_str() {
                    "F32" => DType::F32,
                    "F16" => DType::F16,
                    "BF16" => DType::BF16,
                    other => return Err(format!("unknown dtype {other}").into()),
                })
            }
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let done = convert_adapter(&args[0], &args[1], format, &ConvertOptions { read, write, base: None })?;
    let how = if done.streamed { "streamed" } else { "decoded" };
    eprintln!("wrote {} modules to {} ({format}, {how})", done.modules, args[1]);
    Ok(())
}
