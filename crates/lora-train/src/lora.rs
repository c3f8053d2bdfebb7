//! LoRA on the model: which modules, fresh initialisation, adapters in and out (lora-core's
//! [`Adapter`], with PEFT's module paths), merging and access to the trainable factors.

use lora_core::{Adapter, AdapterConfig, AdapterModule, Init, LoraLayer, ModuleKind, Scalar, Scaling, TargetModules};
use ndarray::ArrayViewMut2;

use crate::error::{Error, Result};
use crate::linear::LoraParams;
use crate::model::{mix, Model, Proj};

/// How to put fresh LoRA branches on a model (PEFT's `LoraConfig` for a causal LM).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// The rank r.
    pub rank: usize,
    /// alpha (`lora_alpha`).
    pub alpha: f64,
    /// s = alpha / r or, with rsLoRA, alpha / sqrt(r).
    pub scaling: Scaling,
    /// Dropout probability on the LoRA branch's input during training (`lora_dropout`).
    pub dropout: f64,
    /// The modules adapted: names (`q_proj`, or full paths), a regular expression matched
    /// against the whole module path, or `all-linear` (the seven projections; never lm_head).
    pub targets: TargetModules,
    /// How A and B start (PEFT's default: A kaiming-uniform, B zero).
    pub init: Init,
    /// Seed of the initialisation; every module draws from its own stream.
    pub seed: u64,
}

impl LoraConfig {
    /// PEFT's defaults (standard scaling, no dropout, kaiming-uniform A, B = 0, seed 0) for this
    /// rank, alpha and targets.
    pub fn new(rank: usize, alpha: f64, targets: TargetModules) -> Self {
        LoraConfig {
            rank,
            alpha,
            scaling: Scaling::Standard,
            dropout: 0.0,
            targets,
            init: Init::KaimingUniform,
            seed: 0,
        }
    }

    fn matches(&self, path: &str, proj: Proj, regex: Option<&regex::Regex>) -> bool {
        match &self.targets {
            TargetModules::AllLinear => true,
            TargetModules::List(names) => {
                names.iter().any(|n| n == path || n == proj.name() || path.ends_with(&format!(".{n}")))
            }
            TargetModules::Regex(_) => regex.is_some_and(|r| r.is_match(path)),
        }
    }
}

/// Mutable access to one module's trainable factors (for an optimizer, or a finite-difference
/// check). Shapes cannot change through a view.
#[derive(Debug)]
pub struct LoraParamsMut<'a, T> {
    /// The module path.
    pub module: String,
    /// A, (r, d_in).
    pub a: ArrayViewMut2<'a, T>,
    /// B, (d_out, r).
    pub b: ArrayViewMut2<'a, T>,
}

impl<T: Scalar> Model<T> {
    /// Put fresh LoRA branches on every module `config` targets, replacing any there; returns
    /// how many modules were adapted (none is an error).
    pub fn add_lora(&mut self, config: &LoraConfig) -> Result<usize> {
        if !(0.0..1.0).contains(&config.dropout) {
            return Err(Error::Input(format!("lora dropout must be in [0, 1), got {}", config.dropout)));
        }
        let regex = match &config.targets {
            TargetModules::Regex(r) => Some(
                regex::Regex::new(&format!("^(?:{r})$"))
                    .map_err(|e| Error::Input(format!("target_modules regex {r:?}: {e}")))?,
            ),
            _ => None,
        };
        let mut count = 0;
        for (l, block) in self.blocks.iter_mut().enumerate() {
            for p in Proj::ALL {
                let path = p.module_path(l);
                if !config.matches(&path, p, regex.as_ref()) {
                    continue;
                }
                let lin = &mut block.linears[p as usize];
                let layer = LoraLayer::init(
                    lin.d_in(),
                    lin.d_out(),
                    config.rank,
                    config.alpha,
                    config.scaling,
                    config.init,
                    mix(config.seed, l, p),
                )
                .map_err(|e| e.in_module(&path))?;
                lin.lora = Some(LoraParams::from_layer(&layer, config.dropout));
                count += 1;
            }
        }
        if count == 0 {
            return Err(Error::Input(format!(
                "target modules {:?} match no linear layer of the model",
                config.targets
            )));
        }
        Ok(count)
    }

    /// Replace the model's LoRA branches by the modules of `adapter` (as read from a PEFT
    /// folder: module paths `model.layers.N.self_attn.q_proj`, ...). Everything is checked
    /// before anything changes: unknown modules, shapes, DoRA, embeddings, fan_in_fan_out and
    /// modules_to_save are errors naming the module. Dropout is 0 (set it with
    /// [`Model::set_lora_dropout`]).
    pub fn load_adapter(&mut self, adapter: &Adapter<T>) -> Result<()> {
        let err = |module: &str, message: &str| Error::Adapter { module: module.into(), message: message.into() };
        if adapter.config().fan_in_fan_out {
            return Err(err("*", "fan_in_fan_out is set, but Llama-family linear weights are (d_out, d_in)"));
        }
        if let Some(name) = adapter.saved_tensors().keys().next() {
            return Err(Error::Unsupported {
                file: "adapter".into(),
                what: format!("modules_to_save (tensor {name}): only LoRA modules are supported"),
            });
        }
        let mut plan = Vec::with_capacity(adapter.len());
        for (name, module) in adapter.modules() {
            let (l, p) = Proj::parse_path(name)
                .filter(|(l, _)| *l < self.blocks.len())
                .ok_or_else(|| err(name, "not a linear layer of this model"))?;
            if module.kind() != ModuleKind::Linear {
                return Err(err(name, "embedding adapters are not supported"));
            }
            if module.magnitude().is_some() {
                return Err(err(name, "DoRA is not supported by lora-train"));
            }
            let lin = &self.blocks[l].linears[p as usize];
            let layer = module.layer();
            if (layer.d_out(), layer.d_in()) != (lin.d_out(), lin.d_in()) {
                return Err(err(
                    name,
                    &format!(
                        "(d_out, d_in) = ({}, {}) but the weight is ({}, {})",
                        layer.d_out(),
                        layer.d_in(),
                        lin.d_out(),
                        lin.d_in()
                    ),
                ));
            }
            plan.push((l, p, LoraParams::from_layer(layer, 0.0)));
        }
        self.remove_lora();
        for (l, p, params) in plan {
            self.blocks[l].linears[p as usize].lora = Some(params);
        }
        Ok(())
    }

    /// Set the dropout probability of every LoRA branch.
    pub fn set_lora_dropout(&mut self, dropout: f64) -> Result<()> {
        if !(0.0..1.0).contains(&dropout) {
            return Err(Error::Input(format!("lora dropout must be in [0, 1), got {dropout}")));
        }
        for lin in self.blocks.iter_mut().flat_map(|b| b.linears.iter_mut()) {
            if let Some(lora) = &mut lin.lora {
                lora.dropout = dropout;
            }
        }
        Ok(())
    }

    /// Remove every LoRA branch.
    pub fn remove_lora(&mut self) {
        for lin in self.blocks.iter_mut().flat_map(|b| b.linears.iter_mut()) {
            lin.lora = None;
        }
    }

    /// Paths of the modules with a LoRA branch, in layer and forward order.
    pub fn lora_modules(&self) -> Vec<String> {
        self.lora_iter().map(|(path, _)| path).collect()
    }

    fn lora_iter(&self) -> impl Iterator<Item = (String, &LoraParams<T>)> {
        self.blocks.iter().enumerate().flat_map(|(l, b)| {
            Proj::ALL
                .into_iter()
                .filter_map(move |p| b.linears[p as usize].lora.as_ref().map(|lora| (p.module_path(l), lora)))
        })
    }

    /// The LoRA branches as a lora-core [`Adapter`] with PEFT's module paths, ready for a PEFT
    /// writer. The config's rank and alpha are the first module's (others form the rank and
    /// alpha patterns); target_modules lists the adapted module names.
    pub fn adapter(&self) -> Result<Adapter<T>> {
        let modules: Vec<(String, &LoraParams<T>)> = self.lora_iter().collect();
        let first = modules.first().ok_or_else(|| Error::Input("the model has no LoRA branch".into()))?.1;
        let mut config = AdapterConfig::new(
            first.a.nrows(),
            first.alpha,
            TargetModules::from_modules(modules.iter().map(|(p, _)| p.as_str())),
        );
        config.scaling = first.scaling;
        let mut adapter = Adapter::new(config);
        for (path, lora) in modules {
            let layer = lora.to_layer().map_err(|e| e.in_module(&path))?;
            adapter.insert(path, AdapterModule::linear(layer))?;
        }
        Ok(adapter)
    }

    /// The model with every LoRA branch merged into its weight (W + s B A) and removed.
    pub fn merged(&self) -> Self {
        let mut m = self.clone();
        for block in &mut m.blocks {
            for lin in &mut block.linears {
                *lin = lin.merged();
            }
        }
        m
    }

    /// The trainable factors of every LoRA module, in [`Model::lora_modules`] order.
    pub fn lora_params_mut(&mut self) -> Vec<LoraParamsMut<'_, T>> {
        let mut out = Vec::new();
        for (l, block) in self.blocks.iter_mut().enumerate() {
            for (p, lin) in Proj::ALL.into_iter().zip(block.linears.iter_mut()) {
                if let Some(lora) = &mut lin.lora {
                    out.push(LoraParamsMut { module: p.module_path(l), a: lora.a.view_mut(), b: lora.b.view_mut() });
                }
            }
        }
        out
    }
}
