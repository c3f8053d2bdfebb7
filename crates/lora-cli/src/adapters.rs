//! Reading adapters given on the command line, with the base model's help where a format needs it,
//! and rebuilding adapters module by module.

use std::path::Path;

use anyhow::{Context, Result};
use indexmap::IndexMap;
use lora_core::{Adapter, AdapterConfig, AdapterModule, DoraLayer, LoraLayer, ModuleKind, Scalar};
use lora_io::ReadOptions;

use crate::source::Model;

/// Read an adapter in any format. A base model, when given, resolves kohya names and gives GGUF
/// its head counts.
pub fn read(path: &Path, base: Option<&Model>) -> Result<Adapter<f32>> {
    lora_io::read_adapter_with(path, &read_options(base))
        .with_context(|| format!("cannot read the adapter {}", path.display()))
}

/// What reading an adapter takes from the base model: its module paths and config.json.
pub fn read_options(base: Option<&Model>) -> ReadOptions {
    ReadOptions { modules: base.map(Model::module_names), base_config: base.and_then(|b| b.config().cloned()) }
}

/// The same module with a new LoRA layer: kind and DoRA magnitude kept.
pub fn with_layer<T: Scalar>(module: &AdapterModule<T>, layer: LoraLayer<T>) -> Result<AdapterModule<T>> {
    Ok(match (module.kind(), module.magnitude()) {
        (ModuleKind::Embedding, _) => AdapterModule::embedding(layer),
        (ModuleKind::Linear, Some(m)) => AdapterModule::dora(DoraLayer::new(layer, m.clone())?),
        (ModuleKind::Linear, None) => AdapterModule::linear(layer),
    })
}

/// An adapter from modules under `template`'s config, with the most common rank and alpha as the
/// defaults (the rest become the rank and alpha patterns) and the template's saved tensors.
pub fn rebuild<T: Scalar>(template: &Adapter<T>, modules: IndexMap<String, AdapterModule<T>>) -> Result<Adapter<T>> {
    let mut counts: IndexMap<(usize, u64), usize> = IndexMap::new();
    for m in modules.values() {
        *counts.entry((m.layer().rank(), m.layer().alpha().to_bits())).or_default() += 1;
    }
    let ((rank, alpha_bits), _) =
        counts.iter().max_by_key(|(_, n)| **n).map(|(k, n)| (*k, *n)).unwrap_or(((1, 1.0f64.to_bits()), 0));
    let scaling = modules.values().next().map_or(template.config().scaling, |m| m.layer().scaling());
    let config = AdapterConfig { rank, alpha: f64::from_bits(alpha_bits), scaling, ..template.config().clone() };
    let mut out = Adapter::new(config);
    for (name, module) in modules {
        out.insert(name, module)?;
    }
    for (name, tensor) in template.saved_tensors() {
        out.insert_saved(name.clone(), tensor.clone())?;
    }
    Ok(out)
}
