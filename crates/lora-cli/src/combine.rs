//! `lora combine`: several adapters on the same base joined into one.

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use lora_svd::{CombineMethod, RankRule};
use serde_json::json;

use crate::common::{print_json, split_weight, AdapterOutputArgs, OutputArgs};

/// Options of `lora combine`.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  lora combine ./style:0.7 ./subject:0.3 --method svd --rank 16 --out ./blend\n  \
lora combine a.safetensors b.safetensors --method cat --base ./model --out ./both")]
pub struct CombineArgs {
    /// Adapters, each with an optional weight: PATH or PATH:WEIGHT (default weight 1).
    #[arg(required = true, num_args = 1..)]
    pub adapters: Vec<String>,
    /// linear: the exact weighted sum at its numerical rank; cat: the exact sum by concatenation
    /// (ranks add); svd: the weighted sum truncated to --rank.
    #[arg(long, value_enum, default_value_t = MethodArg::Linear)]
    pub method: MethodArg,
    /// Target rank of --method svd (default: the largest input rank per module).
    #[arg(long)]
    pub rank: Option<usize>,
    #[command(flatten)]
    pub target: AdapterOutputArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `--method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// Exact weighted sum, re-factored at its numerical rank.
    Linear,
    /// Exact weighted sum by concatenation.
    Cat,
    /// Weighted sum truncated by SVD.
    Svd,
}

/// Run `lora combine`.
pub fn run(args: &CombineArgs) -> Result<()> {
    let base = args.target.open_base()?;
    let method = match (args.method, args.rank) {
        (MethodArg::Linear, None) => CombineMethod::Linear,
        (MethodArg::Cat, None) => CombineMethod::Cat,
        (MethodArg::Svd, rank) => CombineMethod::Svd(rank.map(RankRule::fixed).transpose()?),
        (_, Some(_)) => bail!("--rank goes with --method svd"),
    };
    let mut adapters = Vec::new();
    let mut weights = Vec::new();
    for arg in &args.adapters {
        let (path, weight) = split_weight(arg);
        adapters.push(crate::adapters::read(&path, base.as_ref())?);
        weights.push(weight);
    }
    let refs: Vec<_> = adapters.iter().collect();
    let (combined, reports) = lora_svd::combine_adapters(&refs, &weights, &method)?;
    let first = split_weight(&args.adapters[0]).0;
    let format = args.target.format_or_that_of(&first)?;
    let options = args.output.write_options(base.as_ref());
    args.output.write(|path| Ok(lora_io::write_adapter_with(&combined, path, format, &options)?))?;
    if args.output.json {
        print_json(&json!({
            "out": args.output.out,
            "modules": reports.iter().map(|(n, r)| json!({"module": n, "rank": r.rank, "relative_error": r.relative_error})).collect::<Vec<_>>(),
        }));
    } else {
        let worst = reports.values().map(|r| r.relative_error).fold(0.0, f64::max);
        println!(
            "combined {} adapters into {} modules (worst relative error {worst:.3e}); wrote {}",
            adapters.len(),
            combined.len(),
            args.output.out.display()
        );
    }
    Ok(())
}
