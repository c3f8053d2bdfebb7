//! `lora inspect`: what an adapter or a model folder holds, and the problems found in it.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use lora_core::{Adapter, ModuleKind, TargetModules};
use serde_json::{json, Value};

use crate::common::print_json;
use crate::source::{open_model, Model};

/// Options of `lora inspect`.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  lora inspect ./adapter\n  lora inspect adapter.gguf --json\n  \
lora inspect lora.safetensors --base ./llama")]
pub struct InspectArgs {
    /// An adapter (PEFT folder, kohya file, GGUF) or a model (folder or .safetensors file).
    pub path: PathBuf,
    /// The base model: resolves kohya names, and the adapter is checked against it.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Run `lora inspect`.
pub fn run(args: &InspectArgs) -> Result<()> {
    let report = match lora_io::detect_format(&args.path) {
        Ok(format) => inspect_adapter(args, format)?,
        Err(adapter_err) => match Model::open(&args.path) {
            Ok(model) => inspect_model(&args.path, &model),
            Err(_) => return Err(anyhow::Error::new(adapter_err).context("neither an adapter nor a model")),
        },
    };
    if args.json {
        print_json(&report);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn inspect_adapter(args: &InspectArgs, format: lora_io::Format) -> Result<Value> {
    let base = args.base.as_deref().map(|p| open_model(p, "base")).transpose()?;
    let adapter = crate::adapters::read(&args.path, base.as_ref())?;
    let mut problems = problems_of(&adapter);
    if let Some(base) = &base {
        if let Err(e) = lora_io::check_adapter_against_model(&adapter, base.source(), &args.path) {
            problems.push(format!("does not fit the base model: {e}"));
        }
    }
    let config = adapter.config();
    let count = adapter.param_count();
    let modules: Vec<Value> = adapter
        .modules()
        .iter()
        .map(|(name, m)| {
            let l = m.layer();
            let c = m.param_count();
            json!({
                "module": name,
                "kind": match m.kind() { ModuleKind::Linear => "linear", ModuleKind::Embedding => "embedding" },
                "rank": l.rank(),
                "alpha": l.alpha(),
                "scale": l.scale(),
                "d_in": l.d_in(),
                "d_out": l.d_out(),
                "dora": m.magnitude().is_some(),
                "trainable": c.trainable,
                "full": c.full,
            })
        })
        .collect();
    Ok(json!({
        "path": args.path,
        "kind": "adapter",
        "format": format.name(),
        "dtype": config.metadata.get(lora_io::META_DTYPE),
        "base_model": config.base_model,
        "target_modules": match &config.target_modules {
            TargetModules::List(l) => json!(l),
            TargetModules::Regex(r) => json!(r),
            TargetModules::AllLinear => json!("all-linear"),
        },
        "rank": config.rank,
        "alpha": config.alpha,
        "rslora": config.scaling == lora_core::Scaling::RsLora,
        "dora": config.use_dora,
        "fan_in_fan_out": config.fan_in_fan_out,
        "modules_to_save": config.modules_to_save,
        "rank_pattern": adapter.rank_pattern(),
        "alpha_pattern": adapter.alpha_pattern(),
        "trainable_parameters": count.trainable,
        "full_parameters": count.full,
        "ratio": count.ratio(),
        "modules": modules,
        "problems": problems,
    }))
}

/// What looks wrong in an adapter that still reads.
fn problems_of(adapter: &Adapter<f32>) -> Vec<String> {
    let mut problems = Vec::new();
    let zero: Vec<&str> = adapter
        .modules()
        .iter()
        .filter(|(_, m)| m.layer().b().iter().all(|v| *v == 0.0))
        .map(|(n, _)| n.as_str())
        .collect();
    if !zero.is_empty() {
        problems.push(format!(
            "{} of {} modules have B = 0 and change nothing (an untrained adapter?): {}",
            zero.len(),
            adapter.len(),
            preview(&zero)
        ));
    }
    let wasteful: Vec<&str> = adapter
        .modules()
        .iter()
        .filter(|(_, m)| m.layer().rank() >= m.layer().d_in().min(m.layer().d_out()))
        .map(|(n, _)| n.as_str())
        .collect();
    if !wasteful.is_empty() {
        problems.push(format!(
            "{} modules have a rank at least min(d_in, d_out), more numbers than the full layer: {}",
            wasteful.len(),
            preview(&wasteful)
        ));
    }
    if adapter.is_empty() && adapter.saved_tensors().is_empty() {
        problems.push("the adapter has no modules".into());
    }
    problems
}

fn preview(names: &[&str]) -> String {
    let mut s = names.iter().take(3).copied().collect::<Vec<_>>().join(", ");
    if names.len() > 3 {
        s.push_str(&format!(", ... ({} more)", names.len() - 3));
    }
    s
}

fn inspect_model(path: &Path, model: &Model) -> Value {
    let source = model.source();
    let mut params = 0u64;
    let mut dtypes = std::collections::BTreeMap::<String, usize>::new();
    let names = source.tensor_names();
    for name in &names {
        if let Some(info) = source.tensor_info(name) {
            params += info.shape.iter().product::<usize>() as u64;
            *dtypes.entry(format!("{:?}", info.dtype)).or_default() += 1;
        }
    }
    let linear = model.module_names();
    json!({
        "path": path,
        "kind": "model",
        "model_type": model.model_type(),
        "sharded": matches!(model, Model::Folder(f) if f.is_sharded()),
        "tensors": names.len(),
        "parameters": params,
        "dtypes": dtypes,
        "matrices": linear.len(),
        "fan_in_fan_out": model.fan_in_fan_out(),
        "problems": Vec::<String>::new(),
    })
}

fn print_table(report: &Value) {
    let get = |k: &str| report.get(k).cloned().unwrap_or(Value::Null);
    if get("kind") == "model" {
        println!("model {}", report["path"].as_str().unwrap_or(""));
        for key in ["model_type", "sharded", "tensors", "parameters", "dtypes", "matrices", "fan_in_fan_out"] {
            println!("  {key:<16} {}", get(key));
        }
        return;
    }
    println!("{} adapter {}", report["format"].as_str().unwrap_or("?"), report["path"].as_str().unwrap_or(""));
    for key in [
        "dtype",
        "base_model",
        "target_modules",
        "rank",
        "alpha",
        "rslora",
        "dora",
        "fan_in_fan_out",
        "modules_to_save",
    ] {
        println!("  {key:<16} {}", get(key));
    }
    println!(
        "  {:<16} {} of {} ({:.3}%)",
        "parameters",
        get("trainable_parameters"),
        get("full_parameters"),
        100.0 * report["ratio"].as_f64().unwrap_or(0.0)
    );
    println!(
        "\n  {:<56} {:>9} {:>5} {:>8} {:>8} {:>6} {:>6} {:>5}",
        "module", "kind", "rank", "alpha", "scale", "d_in", "d_out", "dora"
    );
    for m in report["modules"].as_array().into_iter().flatten() {
        let text = |k: &str| match &m[k] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!(
            "  {:<56} {:>9} {:>5} {:>8} {:>8.4} {:>6} {:>6} {:>5}",
            text("module"),
            text("kind"),
            text("rank"),
            text("alpha"),
            m["scale"].as_f64().unwrap_or(0.0),
            text("d_in"),
            text("d_out"),
            text("dora")
        );
    }
    let problems = report["problems"].as_array().cloned().unwrap_or_default();
    if problems.is_empty() {
        println!("\n  no problems found");
    } else {
        for p in problems {
            println!("\n  problem: {}", p.as_str().unwrap_or(""));
        }
    }
}
