//! `lora extract`: a LoRA adapter from the difference of a fine-tuned model and its base.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use lora_core::{Adapter, AdapterModule, DType, LoraLayer};
use lora_io::WriteOptions;
use lora_svd::{
    extract_model, ExtractConfig, ModelConfig, ModelExtraction, Parallelism, Randomized, Selection, SvdMethod,
};
use serde_json::json;

use crate::common::{print_json, progress_bar, set_threads, write_output, FormatArg, OutputArgs, RankArgs};
use crate::finite::{Checked, Checker};
use crate::source::open_model;

/// Options of `lora extract`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  lora extract --base ./llama --tuned ./llama-finetuned --rank 16 --out ./adapter\n  \
lora extract --base ./llama --tuned ./tuned --energy 0.9 --max-rank 64 --format gguf --out adapter.gguf"
)]
pub struct ExtractArgs {
    /// The base model (Hugging Face folder or .safetensors file).
    #[arg(long)]
    pub base: PathBuf,
    /// The fine-tuned model, same architecture.
    #[arg(long)]
    pub tuned: PathBuf,
    #[command(flatten)]
    pub rank: RankArgs,
    /// How to compute the SVD: randomized when the rank is small against the matrix, or always
    /// exact (LAPACK gesdd), or always randomized.
    #[arg(long, value_enum, default_value_t = MethodArg::Auto)]
    pub method: MethodArg,
    /// Seed of the randomized SVD.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// alpha of the adapter (the factors absorb the scale); default: alpha = rank (scale 1).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Extract only tensors whose name matches this regex (default: `\.weight$`).
    #[arg(long, value_name = "REGEX")]
    pub include: Option<String>,
    /// Leave out tensors whose name matches this regex (default: embeddings, output heads, norms).
    #[arg(long, value_name = "REGEX")]
    pub exclude: Option<String>,
    /// Save tensors that differ but are not extracted whole, as PEFT's modules_to_save.
    #[arg(long)]
    pub save_untouched: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = FormatArg::Peft)]
    pub format: FormatArg,
    /// Go on with a warning when a tensor holds NaN or an infinity (default: an error naming the
    /// file and the tensor). A tensor that is factored still fails if its difference is not
    /// finite; leave it out with --exclude.
    #[arg(long)]
    pub allow_nonfinite: bool,
    /// Threads (default: all cores). Layers are factored in parallel, one BLAS thread each.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Write per-layer figures (rank, error, energy, time, singular values) to this JSON file.
    #[arg(long, value_name = "FILE.json")]
    pub report: Option<PathBuf>,
    /// Plot the singular-value spectra with the chosen ranks to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `--method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// Randomized when the rank is small against min(d_out, d_in), exact otherwise.
    Auto,
    /// LAPACK's divide-and-conquer SVD of the whole matrix.
    Exact,
    /// A randomized sketch (Halko, Martinsson, Tropp), grown until the rule is decided.
    Randomized,
}

impl MethodArg {
    pub fn method(self, seed: u64) -> SvdMethod {
        let randomized = Randomized { seed, ..Randomized::default() };
        match self {
            MethodArg::Auto => SvdMethod::Auto(randomized),
            MethodArg::Exact => SvdMethod::Exact,
            MethodArg::Randomized => SvdMethod::Randomized(randomized),
        }
    }
}

/// Run `lora extract` and print its summary.
pub fn run(args: &ExtractArgs, quiet: bool) -> Result<()> {
    let summary = execute(args, quiet)?;
    if args.output.json {
        print_json(&summary);
    } else {
        print_summary(&summary);
    }
    Ok(())
}

/// Do the extraction; the summary is what `--json` prints.
pub fn execute(args: &ExtractArgs, quiet: bool) -> Result<serde_json::Value> {
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Layers in parallel, each SVD on one BLAS thread: no oversubscription.
    set_threads(Some(threads), Some(1))?;
    let base = open_model(&args.base, "base")?;
    let tuned = open_model(&args.tuned, "tuned")?;
    let selection = Selection::new(
        args.include.as_deref().unwrap_or(Selection::DEFAULT_INCLUDE),
        Some(args.exclude.as_deref().unwrap_or(Selection::DEFAULT_EXCLUDE)),
    )?;
    let mut extract = ExtractConfig::new(args.rank.rule()?, args.method.method(args.seed));
    extract.alpha = args.alpha;
    let config = ModelConfig {
        extract,
        selection,
        parallelism: if threads > 1 { Parallelism::Layers(threads) } else { Parallelism::Sequential },
    };

    let total = tuned.source().tensor_names().len() as u64;
    let bar = progress_bar(total, quiet, "extract");
    let checker = Checker::with_flag(args.allow_nonfinite);
    let (base_checked, tuned_checked) = (Checked::new(&base, &checker), Checked::new(&tuned, &checker));
    let extraction: ModelExtraction<f32> = extract_model(&base_checked, &tuned_checked, &config, &|p| {
        bar.set_position(p.done as u64);
        if let Some(r) = p.report {
            bar.set_message(format!("{} rank {} err {:.2e}", p.tensor, r.rank, r.relative_error));
        }
    })
    .context("extraction failed")?;
    bar.finish_and_clear();

    let fan_in_fan_out = tuned.fan_in_fan_out();
    let mut adapter = extraction.to_adapter(Some(base.id(&args.base)))?;
    if fan_in_fan_out {
        adapter = transpose_for_conv1d(&adapter)?;
    }
    let mut skipped = Vec::new();
    if args.save_untouched {
        adapter = with_saved_tensors(adapter, &extraction, tuned.source(), &mut skipped)?;
    } else {
        skipped.extend(extraction.not_extracted.iter().map(|n| (n.name.clone(), format!("{:?}", n.reason))));
    }

    let dtype: DType = args.output.dtype().unwrap_or_else(|| tuned.main_dtype());
    let options = WriteOptions { dtype: Some(dtype), base_config: base.config().cloned() };
    args.output.write(|path| Ok(lora_io::write_adapter_with(&adapter, path, args.format.into(), &options)?))?;

    if let Some(path) = &args.report {
        let report = report_json(&extraction, tuned.source());
        write_output(path, true, |p| Ok(std::fs::write(p, serde_json::to_vec_pretty(&report)?)?))?;
    }
    if let Some(path) = &args.plot {
        let spectra: Vec<(String, Vec<f64>, usize)> = extraction
            .modules
            .iter()
            .map(|(name, m)| (name.clone(), m.report.singular_values.clone(), m.report.rank))
            .collect();
        write_output(path, true, |p| crate::plot::spectra_svg(p, &spectra))?;
    }

    let count = adapter.param_count();
    let worst = extraction.modules.values().map(|m| m.report.relative_error).fold(0.0, f64::max);
    let summary = json!({
        "out": args.output.out,
        "format": lora_io::Format::from(args.format).name(),
        "modules": adapter.len(),
        "ranks": extraction.modules.iter().map(|(n, m)| (n.clone(), m.report.rank)).collect::<indexmap::IndexMap<_, _>>(),
        "unchanged": extraction.unchanged.len(),
        // selected tensors whose delta is zero: rank 0, nothing in the adapter
        "zero_rank": extraction.unchanged,
        "not_extracted": skipped.iter().map(|(n, r)| json!({"tensor": n, "reason": r})).collect::<Vec<_>>(),
        "saved_tensors": adapter.saved_tensors().keys().collect::<Vec<_>>(),
        "trainable_parameters": count.trainable,
        "full_parameters": count.full,
        "max_relative_error": worst,
        "fan_in_fan_out": fan_in_fan_out,
        "seconds": extraction.elapsed.as_secs_f64(),
    });
    Ok(summary)
}

fn print_summary(s: &serde_json::Value) {
    println!(
        "extracted {} modules ({} unchanged: rank 0) in {:.2} s: {} parameters against {} ({:.3}%), worst relative error {:.3e}",
        s["modules"],
        s["unchanged"],
        s["seconds"].as_f64().unwrap_or(0.0),
        s["trainable_parameters"],
        s["full_parameters"],
        100.0 * s["trainable_parameters"].as_f64().unwrap_or(0.0) / s["full_parameters"].as_f64().unwrap_or(1.0).max(1.0),
        s["max_relative_error"].as_f64().unwrap_or(0.0)
    );
    for n in s["not_extracted"].as_array().into_iter().flatten() {
        println!(
            "not extracted: {} ({}); --save-untouched keeps it as modules_to_save",
            n["tensor"].as_str().unwrap_or(""),
            n["reason"].as_str().unwrap_or("")
        );
    }
    println!("wrote {} ({})", s["out"].as_str().unwrap_or(""), s["format"].as_str().unwrap_or(""));
}

/// GPT-2's Conv1D stores W as (d_in, d_out), so the extracted delta D = s B A is (d_in, d_out).
/// PEFT's fan_in_fan_out keeps lora_A (r, d_in) and lora_B (d_out, r) and adds (s B A)ᵀ: the
/// layer for Dᵀ = s Aᵀ Bᵀ has A' = Bᵀ and B' = Aᵀ.
fn transpose_for_conv1d(adapter: &Adapter<f32>) -> Result<Adapter<f32>> {
    let mut config = adapter.config().clone();
    config.fan_in_fan_out = true;
    let mut out = Adapter::new(config);
    for (name, module) in adapter.modules() {
        let l = module.layer();
        let layer = LoraLayer::new(l.b().t().to_owned(), l.a().t().to_owned(), l.alpha(), l.scaling())?;
        out.insert(name.clone(), AdapterModule::linear(layer))?;
    }
    Ok(out)
}

/// Add the tensors that differ but were not extracted as modules_to_save (whole tensors).
fn with_saved_tensors(
    mut adapter: Adapter<f32>,
    extraction: &ModelExtraction<f32>,
    tuned: &dyn lora_core::TensorSource,
    skipped: &mut Vec<(String, String)>,
) -> Result<Adapter<f32>> {
    let mut config = adapter.config().clone();
    let mut saved = Vec::new();
    for n in &extraction.not_extracted {
        let module = n.name.rsplit_once('.').map_or(n.name.as_str(), |(m, _)| m);
        let in_tuned_only = tuned.tensor_info(&n.name).is_none();
        if in_tuned_only || adapter.module(module).is_some() {
            skipped.push((n.name.clone(), format!("{:?}", n.reason)));
            continue;
        }
        saved.push((n.name.clone(), tuned.read_f32(&n.name)?));
        if !config.modules_to_save.iter().any(|m| m == module) {
            config.modules_to_save.push(module.to_string());
        }
    }
    let mut out = Adapter::new(config);
    for (name, module) in adapter.modules() {
        out.insert(name.clone(), module.clone())?;
    }
    for (name, tensor) in saved {
        out.insert_saved(name, tensor)?;
    }
    adapter = out;
    Ok(adapter)
}

/// The --report JSON: one entry per selected tensor, those with a zero delta at rank 0 (error 0,
/// all of nothing retained).
fn report_json(extraction: &ModelExtraction<f32>, tuned: &dyn lora_core::TensorSource) -> serde_json::Value {
    let zero = extraction.unchanged.iter().map(|tensor| {
        let shape = tuned.tensor_info(tensor).map(|i| i.shape).unwrap_or_default();
        json!({
            "module": tensor.strip_suffix(".weight").unwrap_or(tensor),
            "tensor": tensor,
            "d_out": shape.first(),
            "d_in": shape.get(1),
            "rank": 0,
            "relative_error": 0.0,
            "retained_energy": 1.0,
            "method": "none (zero delta)",
            "seconds": 0.0,
            "singular_values": [],
        })
    });
    json!({
        "seconds": extraction.elapsed.as_secs_f64(),
        "layers": extraction.modules.iter().map(|(name, m)| json!({
            "module": name,
            "tensor": m.tensor,
            "d_out": m.layer.d_out(),
            "d_in": m.layer.d_in(),
            "rank": m.report.rank,
            "relative_error": m.report.relative_error,
            "retained_energy": m.report.retained_energy,
            "method": format!("{:?}", m.report.method),
            "seconds": m.report.elapsed.as_secs_f64(),
            "singular_values": m.report.singular_values,
        })).chain(zero).collect::<Vec<_>>(),
        "unchanged": extraction.unchanged,
        "not_extracted": extraction.not_extracted.iter().map(|n| json!({"tensor": n.name, "reason": format!("{:?}", n.reason)})).collect::<Vec<_>>(),
    })
}
