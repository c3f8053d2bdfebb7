//! A whole adapter: named LoRA modules with the config that ties them together.
//!
//! This is the format-neutral adapter: every reader in lora-io produces one and every writer
//! takes one. Module names are the base model's module paths without PEFT's `base_model.model.`
//! prefix (`model.layers.0.self_attn.q_proj`).

use std::collections::BTreeMap;

use indexmap::IndexMap;
use ndarray::{Array1, Array2, ArrayD, ArrayRef2};

use crate::count::ParamCount;
use crate::dora::DoraLayer;
use crate::error::{Error, Result, ShapePattern};
use crate::layer::{check_finite, LoraLayer, Scaling, WeightLayout};
use crate::Scalar;

/// Which modules an adapter targets, as PEFT's `target_modules` says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    /// Module names matched against the end of each module path (`["q_proj", "v_proj"]`).
    List(Vec<String>),
    /// A regular expression matched against the whole module path.
    Regex(String),
    /// PEFT's `"all-linear"`: every linear layer but the output head.
    AllLinear,
}

impl TargetModules {
    /// The distinct last path components of `modules`, sorted: the list PEFT would need to match
    /// exactly these modules' kinds.
    pub fn from_modules<'a>(modules: impl IntoIterator<Item = &'a str>) -> Self {
        let mut names: Vec<String> =
            modules.into_iter().map(|m| m.rsplit('.').next().unwrap_or(m).to_string()).collect();
        names.sort();
        names.dedup();
        TargetModules::List(names)
    }
}

/// Settings shared by every module of an adapter (PEFT's `LoraConfig`, format-neutral).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// The base model's id or path (`base_model_name_or_path`), when known.
    pub base_model: Option<String>,
    /// The targeted modules.
    pub target_modules: TargetModules,
    /// The default rank r; modules of another rank form the rank pattern.
    pub rank: usize,
    /// The default alpha; modules with another alpha form the alpha pattern.
    pub alpha: f64,
    /// The scaling rule of every module (PEFT has one `use_rslora` per adapter).
    pub scaling: Scaling,
    /// DoRA: every linear module carries a magnitude vector.
    pub use_dora: bool,
    /// Linear weights are stored (d_in, d_out), as GPT-2's Conv1D.
    pub fan_in_fan_out: bool,
    /// Modules trained in full and saved whole (`modules_to_save`).
    pub modules_to_save: Vec<String>,
    /// Free-form string metadata that a format wants kept on a round trip.
    pub metadata: BTreeMap<String, String>,
}

impl AdapterConfig {
    /// A config with PEFT's defaults for everything but rank, alpha and targets.
    pub fn new(rank: usize, alpha: f64, target_modules: TargetModules) -> Self {
        AdapterConfig {
            base_model: None,
            target_modules,
            rank,
            alpha,
            scaling: Scaling::Standard,
            use_dora: false,
            fan_in_fan_out: false,
            modules_to_save: Vec::new(),
            metadata: BTreeMap::new(),
        }
    }
}

/// What kind of base layer a module adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModuleKind {
    /// A linear (or Conv1D) layer: `lora_A` / `lora_B`.
    Linear,
    /// An embedding table: PEFT's `lora_embedding_A` (r, num_embeddings) and `lora_embedding_B`
    /// (embedding_dim, r); the delta (B A)ᵀ has the table's (num_embeddings, embedding_dim) shape.
    Embedding,
}

/// One adapted module: a LoRA layer, its kind and, with DoRA, its magnitude vector.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterModule<T> {
    layer: LoraLayer<T>,
    kind: ModuleKind,
    magnitude: Option<Array1<T>>,
}

impl<T: Scalar> AdapterModule<T> {
    /// A LoRA module on a linear layer.
    pub fn linear(layer: LoraLayer<T>) -> Self {
        AdapterModule { layer, kind: ModuleKind::Linear, magnitude: None }
    }

    /// A DoRA module on a linear layer; `magnitude` has d_out entries.
    pub fn dora(layer: DoraLayer<T>) -> Self {
        let magnitude = layer.magnitude().clone();
        AdapterModule { layer: layer.lora().clone(), kind: ModuleKind::Linear, magnitude: Some(magnitude) }
    }

    /// A LoRA module on an embedding table.
    pub fn embedding(layer: LoraLayer<T>) -> Self {
        AdapterModule { layer, kind: ModuleKind::Embedding, magnitude: None }
    }

    /// The LoRA layer.
    pub fn layer(&self) -> &LoraLayer<T> {
        &self.layer
    }

    /// The module kind.
    pub fn kind(&self) -> ModuleKind {
        self.kind
    }

    /// DoRA's magnitude vector, when the module has one.
    pub fn magnitude(&self) -> Option<&Array1<T>> {
        self.magnitude.as_ref()
    }

    /// The module as a DoRA layer, when it is one.
    pub fn as_dora(&self) -> Option<Result<DoraLayer<T>>> {
        self.magnitude.as_ref().map(|m| DoraLayer::new(self.layer.clone(), m.clone()))
    }

    /// How the base weight is stored, given the adapter's `fan_in_fan_out`.
    pub fn layout(&self, fan_in_fan_out: bool) -> WeightLayout {
        match (self.kind, fan_in_fan_out) {
            (ModuleKind::Embedding, _) | (ModuleKind::Linear, true) => WeightLayout::InOut,
            (ModuleKind::Linear, false) => WeightLayout::OutIn,
        }
    }

    /// Trainable parameters (factors, plus the magnitude with DoRA) against the full layer's.
    pub fn param_count(&self) -> ParamCount {
        let mut count = self.layer.param_count();
        count.trainable += self.magnitude.as_ref().map_or(0, |m| m.len() as u64);
        count
    }

    fn with_layer(&self, layer: LoraLayer<T>) -> Self {
        AdapterModule { layer, kind: self.kind, magnitude: self.magnitude.clone() }
    }
}

/// An adapter: an ordered map from module path to [`AdapterModule`], its [`AdapterConfig`], and
/// the tensors of `modules_to_save` (full weights, by tensor name).
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter<T> {
    config: AdapterConfig,
    modules: IndexMap<String, AdapterModule<T>>,
    saved: IndexMap<String, ArrayD<T>>,
}

impl<T: Scalar> Adapter<T> {
    /// An adapter with no modules yet.
    pub fn new(config: AdapterConfig) -> Self {
        Adapter { config, modules: IndexMap::new(), saved: IndexMap::new() }
    }

    /// Add a module, checked against the config: same scaling rule, a magnitude vector exactly
    /// when the config says DoRA (for linear modules). A module of the same name is replaced.
    pub fn insert(&mut self, name: impl Into<String>, module: AdapterModule<T>) -> Result<()> {
        let name = name.into();
        self.check_module(&module).map_err(|e| e.in_module(&name))?;
        self.modules.insert(name, module);
        Ok(())
    }

    /// Add a full tensor of a module in `modules_to_save` (`lm_head.weight`).
    pub fn insert_saved(&mut self, tensor_name: impl Into<String>, tensor: ArrayD<T>) -> Result<()> {
        let tensor_name = tensor_name.into();
        check_finite(&tensor_name, &tensor)?;
        self.saved.insert(tensor_name, tensor);
        Ok(())
    }

    /// The config.
    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    /// The modules in order.
    pub fn modules(&self) -> &IndexMap<String, AdapterModule<T>> {
        &self.modules
    }

    /// One module by path.
    pub fn module(&self, name: &str) -> Option<&AdapterModule<T>> {
        self.modules.get(name)
    }

    /// Full tensors of `modules_to_save`, by tensor name.
    pub fn saved_tensors(&self) -> &IndexMap<String, ArrayD<T>> {
        &self.saved
    }

    /// Number of modules.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// True when there are no modules.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// Modules whose rank differs from the config's default (PEFT's `rank_pattern`).
    pub fn rank_pattern(&self) -> IndexMap<String, usize> {
        self.modules
            .iter()
            .filter(|(_, m)| m.layer.rank() != self.config.rank)
            .map(|(n, m)| (n.clone(), m.layer.rank()))
            .collect()
    }

    /// Modules whose alpha differs from the config's default (PEFT's `alpha_pattern`).
    pub fn alpha_pattern(&self) -> IndexMap<String, f64> {
        self.modules
            .iter()
            .filter(|(_, m)| m.layer.alpha() != self.config.alpha)
            .map(|(n, m)| (n.clone(), m.layer.alpha()))
            .collect()
    }

    /// Trainable parameters of all modules against the full layers', plus the saved tensors
    /// (trained in full, so they count on both sides).
    pub fn param_count(&self) -> ParamCount {
        let saved: u64 = self.saved.values().map(|t| t.len() as u64).sum();
        let modules: ParamCount = self.modules.values().map(AdapterModule::param_count).sum();
        modules + ParamCount { trainable: saved, full: saved }
    }

    /// Apply one module to its base weight in place: W += s B A, or the DoRA merge.
    pub fn merge_module_into(&self, name: &str, w: &mut ArrayRef2<T>) -> Result<()> {
        let module = self.modules.get(name).ok_or_else(|| Error::TensorNotFound { name: name.into() })?;
        let layout = module.layout(self.config.fan_in_fan_out);
        let merged = match module.as_dora() {
            None => module.layer.merge_into(w, layout),
            Some(dora) => dora.and_then(|d| d.merge_into(w, layout).map(drop)),
        };
        merged.map_err(|e| e.in_module(name))
    }

    /// Every module's delta multiplied by `factor` (B scaled; alpha, ranks and DoRA magnitudes
    /// kept). Saved tensors are full weights, not deltas, and are kept as they are.
    pub fn scaled(&self, factor: f64) -> Result<Self> {
        let mut out = Adapter::new(self.config.clone());
        out.saved = self.saved.clone();
        for (name, module) in &self.modules {
            let layer = module.layer.scaled(factor).map_err(|e| e.in_module(name))?;
            out.modules.insert(name.clone(), module.with_layer(layer));
        }
        Ok(out)
    }

    /// The exact sum of two adapters by concatenation: on a module both adapt,
    /// A = [A1; A2] and B = [s1 B1 | s2 B2] (ranks add, s = 1); a module only one adapts is
    /// kept with its scale folded into B. Every module of the result has alpha = r and standard
    /// scaling, so the result's per-module ranks are its rank and alpha patterns.
    ///
    /// DoRA adapters have no exact sum (the norm is not linear) and are refused, as are adapters
    /// whose `fan_in_fan_out` or module kinds differ, or whose saved tensors clash.
    pub fn concat(&self, other: &Adapter<T>) -> Result<Self> {
        if self.config.use_dora || other.config.use_dora {
            return Err(Error::Unsupported("DoRA adapters cannot be summed exactly by concatenation".into()));
        }
        if self.config.fan_in_fan_out != other.config.fan_in_fan_out {
            return Err(Error::ConfigMismatch("fan_in_fan_out differs between the two adapters".into()));
        }
        let mut modules = IndexMap::new();
        for (name, m1) in &self.modules {
            let layer = match other.modules.get(name) {
                Some(m2) if m2.kind != m1.kind => {
                    return Err(Error::ConfigMismatch(format!("module kinds {:?} and {:?} differ", m1.kind, m2.kind))
                        .in_module(name))
                }
                Some(m2) => m1.layer.concat(&m2.layer),
                None => m1.layer.with_unit_scale(),
            };
            modules.insert(name.clone(), m1.with_layer(layer.map_err(|e| e.in_module(name))?));
        }
        for (name, m2) in other.modules.iter().filter(|(n, _)| !self.modules.contains_key(*n)) {
            let layer = m2.layer.with_unit_scale().map_err(|e| e.in_module(name))?;
            modules.insert(name.clone(), m2.with_layer(layer));
        }

        let mut saved = self.saved.clone();
        for (name, t) in &other.saved {
            match saved.get(name) {
                Some(mine) if mine != t => {
                    return Err(Error::ConfigMismatch(format!("saved tensor {name} differs between the two adapters")))
                }
                _ => {
                    saved.insert(name.clone(), t.clone());
                }
            }
        }

        let rank = self.config.rank + other.config.rank;
        let mut config = AdapterConfig {
            target_modules: TargetModules::from_modules(modules.keys().map(String::as_str)),
            rank,
            alpha: rank as f64,
            scaling: Scaling::Standard,
            use_dora: false,
            ..self.config.clone()
        };
        for m in &other.config.modules_to_save {
            if !config.modules_to_save.contains(m) {
                config.modules_to_save.push(m.clone());
            }
        }
        Ok(Adapter { config, modules, saved })
    }

    fn check_module(&self, module: &AdapterModule<T>) -> Result<()> {
        let layer = &module.layer;
        if layer.scaling() != self.config.scaling {
            return Err(Error::ConfigMismatch(format!(
                "layer scaling {:?}, adapter scaling {:?}",
                layer.scaling(),
                self.config.scaling
            )));
        }
        match (&module.magnitude, self.config.use_dora, module.kind) {
            (Some(m), true, ModuleKind::Linear) if m.len() != layer.d_out() => {
                Err(Error::shape("lora_magnitude_vector", ShapePattern::exact(&[layer.d_out()]), m.shape()))
            }
            (Some(_), true, ModuleKind::Linear) | (None, false, _) | (None, true, ModuleKind::Embedding) => Ok(()),
            (None, true, ModuleKind::Linear) => {
                Err(Error::ConfigMismatch("use_dora is set but the module has no magnitude vector".into()))
            }
            (Some(_), _, _) => {
                Err(Error::ConfigMismatch("the module has a magnitude vector but use_dora is not set".into()))
            }
        }
    }
}

/// The delta of every module in its base weight's stored layout (for tests and small models).
pub fn deltas<T: Scalar>(adapter: &Adapter<T>) -> IndexMap<String, Array2<T>> {
    adapter
        .modules()
        .iter()
        .map(|(n, m)| (n.clone(), m.layer().delta_in(m.layout(adapter.config().fan_in_fan_out))))
        .collect()
}
