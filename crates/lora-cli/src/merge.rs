//! `lora merge`: a full model folder with an adapter merged into its weights (or taken out).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use lora_io::{Location, ModelFolder, ModelWriteOptions};
use ndarray::Ix2;
use serde_json::json;

use crate::common::{print_json, progress_bar, set_threads, OutputArgs};
use crate::finite::{check_stored, Checker};
use crate::source::Model;

/// Options of `lora merge`.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  lora merge --base ./llama --adapter ./adapter --out ./llama-merged\n  \
lora merge --base ./llama-merged --adapter ./adapter --unmerge --out ./llama-again")]
pub struct MergeArgs {
    /// The base model folder.
    #[arg(long)]
    pub base: PathBuf,
    /// The adapter (PEFT folder, kohya file or GGUF).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Multiply the adapter's delta by S before merging.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Subtract the adapter instead (W - s B A): takes a merge back out.
    #[arg(long)]
    pub unmerge: bool,
    /// Go on with a warning when a base tensor holds NaN or an infinity (default: an error
    /// naming the file and the tensor).
    #[arg(long)]
    pub allow_nonfinite: bool,
    /// Threads for reading, checking and converting tensors (default: all cores). The products
    /// run on one BLAS thread each: at rank r they are thin, and OpenBLAS's idle threads
    /// spin between them, taking a core from the thread that writes the output.
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Run `lora merge` and print its summary.
pub fn run(args: &MergeArgs, quiet: bool) -> Result<()> {
    let s = execute(args, quiet)?;
    if args.output.json {
        print_json(&s);
    } else {
        println!(
            "{} {} modules{} in {:.2} s; wrote {}",
            if args.unmerge { "unmerged" } else { "merged" },
            s["merged_modules"],
            match s["replaced_tensors"].as_u64() {
                Some(n) if n > 0 => format!(" and replaced {n} saved tensors"),
                _ => String::new(),
            },
            s["seconds"].as_f64().unwrap_or(0.0),
            args.output.out.display()
        );
    }
    Ok(())
}

/// Do the merge; the summary is what `--json` prints.
pub fn execute(args: &MergeArgs, quiet: bool) -> Result<serde_json::Value> {
    // One BLAS thread: with OpenBLAS's default of one per core, its waiting threads called
    // sched_yield for a quarter of the samples of a merge of the issue-5 bench model, on the
    // cores the output's writer thread and the kernel's writeback need (docs/benchmarks.md,
    // "Session 10").
    set_threads(args.threads, Some(1))?;
    let start = std::time::Instant::now();
    if !args.base.is_dir() {
        bail!("{}: --base must be a model folder (config.json and safetensors)", args.base.display());
    }
    let folder = ModelFolder::open(&args.base).context("cannot open the base model")?;
    let base = Model::Folder(folder);
    let adapter = crate::adapters::read(&args.adapter, Some(&base))?;
    lora_io::check_adapter_against_model(&adapter, base.source(), &args.adapter)?;
    if args.unmerge && adapter.config().use_dora {
        bail!(
            "{}: a DoRA merge cannot be taken out from the merged weights alone (the norms of W + s B A are lost)",
            args.adapter.display()
        );
    }
    if args.unmerge && !adapter.saved_tensors().is_empty() {
        bail!(
            "{}: the adapter replaces whole tensors (modules_to_save); they cannot be taken out",
            args.adapter.display()
        );
    }
    let adapter = if args.scale == 1.0 { adapter } else { adapter.scaled(args.scale)? };
    let by_weight: HashMap<String, &str> =
        adapter.modules().keys().map(|m| (format!("{m}.weight"), m.as_str())).collect();
    let fan_in_fan_out = adapter.config().fan_in_fan_out;
    let Model::Folder(folder) = &base else { unreachable!("opened as a folder above") };

    // Saved tensors by the base tensor they replace. PEFT also saves the base weight of a LoRA'd
    // embedding as `<module>.base_layer.weight`; it stands for `<module>.weight`.
    let saved: HashMap<String, &ndarray::ArrayD<f32>> =
        adapter.saved_tensors().iter().map(|(n, t)| (n.replace(".base_layer.", "."), t)).collect();
    let missing: Vec<&String> = saved.keys().filter(|n| folder.file_of(n).is_none()).collect();
    if !missing.is_empty() {
        bail!("{}: saved tensors {missing:?} of the adapter are not in the base model", args.adapter.display());
    }
    let bar = progress_bar(folder.names().count() as u64, quiet, if args.unmerge { "unmerge" } else { "merge" });
    let mut merged = 0usize;
    let mut replaced = 0usize;
    let checker = Checker::with_flag(args.allow_nonfinite);
    let options = ModelWriteOptions { dtype: args.output.dtype() };
    args.output.write(|staged| {
        lora_io::write_model(folder, staged, &options, |name| {
            bar.inc(1);
            let file = folder
                .file_of(name)
                .ok_or_else(|| lora_io::Error::TensorNotFound { at: Location::tensor(folder.dir(), name) })?;
            checker
                .judge(check_stored(file, name))
                .map_err(|f| lora_io::Error::Config { at: Location::tensor(&f.path, &f.tensor), reason: f.reason() })?;
            if let Some(module) = by_weight.get(name) {
                let w = file.tensor_f32(name)?;
                let shape = w.shape().to_vec();
                let mut w = w.into_dimensionality::<Ix2>().map_err(|_| lora_io::Error::Shape {
                    at: Location::tensor(file.path(), name),
                    expected: "a matrix".into(),
                    got: shape,
                })?;
                let result = if args.unmerge {
                    let m = &adapter.modules()[*module];
                    m.layer().unmerge_from(&mut w, m.layout(fan_in_fan_out))
                } else {
                    adapter.merge_module_into(module, &mut w)
                };
                result
                    .map_err(|source| lora_io::Error::Core { at: Location::tensor(&args.adapter, *module), source })?;
                merged += 1;
                return Ok(Some(w.into_dyn()));
            }
            if let Some(t) = saved.get(name) {
                replaced += 1;
                return Ok(Some((*t).clone()));
            }
            Ok(None)
        })?;
        Ok(())
    })?;
    bar.finish_and_clear();

    let summary = json!({
        "out": args.output.out,
        "merged_modules": merged,
        "replaced_tensors": replaced,
        "unmerge": args.unmerge,
        "scale": args.scale,
        "seconds": start.elapsed().as_secs_f64(),
    });
    Ok(summary)
}
