//! `lora resize`: an adapter at another rank, without rebuilding any d_out x d_in matrix.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use indexmap::IndexMap;
use serde_json::json;

use crate::common::{print_json, AdapterOutputArgs, OutputArgs, RankArgs};

/// Options of `lora resize`.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  lora resize ./adapter-r64 --rank 16 --out ./adapter-r16\n  \
lora resize ./adapter --energy 0.95 --max-rank 32 --out ./adapter-small")]
pub struct ResizeArgs {
    /// The adapter to resize.
    pub adapter: PathBuf,
    #[command(flatten)]
    pub rank: RankArgs,
    #[command(flatten)]
    pub target: AdapterOutputArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Run `lora resize` and print its summary.
pub fn run(args: &ResizeArgs) -> Result<()> {
    let s = execute(args)?;
    if args.output.json {
        print_json(&s);
    } else {
        println!(
            "resized {} modules: {} -> {} parameters, worst relative error {:.3e}, {:.3} s; wrote {}",
            s["modules"].as_array().map_or(0, Vec::len),
            s["parameters_before"],
            s["parameters_after"],
            s["max_relative_error"].as_f64().unwrap_or(0.0),
            s["seconds"].as_f64().unwrap_or(0.0),
            args.output.out.display()
        );
    }
    Ok(())
}

/// Do the resize; the summary is what `--json` prints.
pub fn execute(args: &ResizeArgs) -> Result<serde_json::Value> {
    let start = std::time::Instant::now();
    let base = args.target.open_base()?;
    let adapter = crate::adapters::read(&args.adapter, base.as_ref())?;
    let rule = args.rank.rule()?;
    let mut modules = IndexMap::new();
    let mut reports = Vec::new();
    for (name, module) in adapter.modules() {
        let (layer, report) = lora_svd::resize(module.layer(), &rule).with_context(|| format!("module {name}"))?;
        reports.push(json!({
            "module": name,
            "old_rank": module.layer().rank(),
            "rank": report.rank,
            "alpha": layer.alpha(),
            "relative_error": report.relative_error,
            "retained_energy": report.retained_energy,
        }));
        modules.insert(name.clone(), crate::adapters::with_layer(module, layer)?);
    }
    let resized = crate::adapters::rebuild(&adapter, modules)?;
    let format = args.target.format_or_that_of(&args.adapter)?;
    let options = args.output.write_options(base.as_ref());
    args.output.write(|path| Ok(lora_io::write_adapter_with(&resized, path, format, &options)?))?;
    let before = adapter.param_count();
    let after = resized.param_count();
    let worst = reports.iter().filter_map(|r| r["relative_error"].as_f64()).fold(0.0, f64::max);
    Ok(json!({
        "out": args.output.out,
        "modules": reports,
        "parameters_before": before.trainable,
        "parameters_after": after.trainable,
        "max_relative_error": worst,
        "seconds": start.elapsed().as_secs_f64(),
    }))
}
