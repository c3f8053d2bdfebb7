//! PEFT adapter folders: `adapter_config.json` and `adapter_model.safetensors`.
//!
//! Keys are `base_model.model.<module>.lora_A.weight` (r, d_in), `.lora_B.weight` (d_out, r),
//! `.lora_embedding_A` (r, num_embeddings) / `.lora_embedding_B` (embedding_dim, r) for
//! embeddings, DoRA's `.lora_magnitude_vector` (d_out), and whole tensors of `modules_to_save`
//! (`base_model.model.lm_head.weight`). PEFT silently drops keys it does not recognise, so the
//! writer always uses these canonical keys and the reader refuses keys it cannot place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use lora_core::{
    Adapter, AdapterConfig, AdapterModule, DType, DoraLayer, LoraLayer, ModuleKind, Scalar, Scaling, TargetModules,
};
use ndarray::{Array1, Array2, Ix1, Ix2};
use rayon::prelude::*;
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::atomic;
use crate::error::{Error, Location, Result};
use crate::st::{PlannedTensor, SafetensorsFile, SafetensorsWriter};

/// The key prefix PEFT puts before every module path.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// The config file of a PEFT adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file of a PEFT adapter folder.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Adapter metadata key under which the reader keeps the original `adapter_config.json`, so that
/// fields this crate does not interpret survive a round trip.
pub const META_PEFT_CONFIG: &str = "lora_io.peft_config";
/// Adapter metadata key under which readers record the stored dtype of the factors, which
/// writers use when no dtype is asked for.
pub const META_DTYPE: &str = "lora_io.dtype";

/// `target_modules` as it appears in JSON: a list of names or one regular expression (or
/// `"all-linear"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModulesJson {
    /// Names matched against the end of each module path.
    List(Vec<String>),
    /// A regular expression matched against the whole path, or `"all-linear"`.
    Regex(String),
}

/// `adapter_config.json` of a LoRA adapter, as PEFT 0.21 writes it.
///
/// The fields that decide what the tensors mean are typed; every other field PEFT writes
/// (`loftq_config`, `eva_config`, `megatron_config`, ...) and any field a future PEFT adds is
/// kept in `extra` and written back unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftConfig {
    /// `"LORA"`; other PEFT methods are refused.
    pub peft_type: String,
    /// `"CAUSAL_LM"`, ... or null.
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model's id or path.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// The base model's revision.
    #[serde(default)]
    pub revision: Option<String>,
    /// The PEFT version that wrote the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peft_version: Option<String>,
    /// Whether the adapter was saved for inference.
    #[serde(default = "yes")]
    pub inference_mode: bool,
    /// The default rank.
    pub r: usize,
    /// The default alpha.
    pub lora_alpha: f64,
    /// Which modules are adapted.
    #[serde(default)]
    pub target_modules: Option<TargetModulesJson>,
    /// Modules excluded from `target_modules`.
    #[serde(default)]
    pub exclude_modules: Option<TargetModulesJson>,
    /// Dropout on the LoRA branch (training only).
    #[serde(default)]
    pub lora_dropout: f64,
    /// Base weights stored (d_in, d_out), as GPT-2's Conv1D.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// `"none"`, `"all"` or `"lora_only"`: which biases were trained.
    #[serde(default = "bias_none")]
    pub bias: String,
    /// s = alpha / sqrt(r) instead of alpha / r.
    #[serde(default)]
    pub use_rslora: bool,
    /// Modules trained in full and saved whole.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// How the adapter was initialised (`true`, `"gaussian"`, `"pissa"`, ...).
    #[serde(default = "json_true")]
    pub init_lora_weights: Value,
    /// Layer indices the adapter is restricted to.
    #[serde(default)]
    pub layers_to_transform: Option<Value>,
    /// The layer-list name used with `layers_to_transform`.
    #[serde(default)]
    pub layers_pattern: Option<Value>,
    /// Per-module ranks: regex keys matched as PEFT's `get_pattern_key` does.
    #[serde(default)]
    pub rank_pattern: Map<String, Value>,
    /// Per-module alphas, matched like `rank_pattern`.
    #[serde(default)]
    pub alpha_pattern: Map<String, Value>,
    /// DoRA: `lora_magnitude_vector` per module.
    #[serde(default)]
    pub use_dora: bool,
    /// A bias on lora_B (`lora_B.bias`); not supported by lora-core.
    #[serde(default)]
    pub lora_bias: bool,
    /// Layer replication (duplicated layers sharing weights).
    #[serde(default)]
    pub layer_replication: Option<Value>,
    /// Adapted parameters (MoE experts) rather than modules.
    #[serde(default)]
    pub target_parameters: Option<Value>,
    /// Trainable token indices of embeddings.
    #[serde(default)]
    pub trainable_token_indices: Option<Value>,
    /// Every other field, kept for the round trip.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn yes() -> bool {
    true
}
fn bias_none() -> String {
    "none".into()
}
fn json_true() -> Value {
    Value::Bool(true)
}

impl PeftConfig {
    /// A minimal LoRA config with PEFT's defaults.
    pub fn new(r: usize, lora_alpha: f64) -> Self {
        PeftConfig {
            peft_type: "LORA".into(),
            task_type: None,
            base_model_name_or_path: None,
            revision: None,
            peft_version: None,
            inference_mode: true,
            r,
            lora_alpha,
            target_modules: None,
            exclude_modules: None,
            lora_dropout: 0.0,
            fan_in_fan_out: false,
            bias: "none".into(),
            use_rslora: false,
            modules_to_save: None,
            init_lora_weights: Value::Bool(true),
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Map::new(),
            alpha_pattern: Map::new(),
            use_dora: false,
            lora_bias: false,
            layer_replication: None,
            target_parameters: None,
            trainable_token_indices: None,
            extra: Map::new(),
        }
    }

    /// Parse `adapter_config.json` text; `path` is used in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|source| Error::Json { at: Location::file(path), source })
    }

    /// Read `adapter_config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, &text)
    }

    /// The JSON text PEFT would write: keys sorted, integral numbers as integers.
    pub fn to_json(&self) -> String {
        let mut v = serde_json::to_value(self).expect("config serialises");
        if let Some(obj) = v.as_object_mut() {
            integral(obj.get_mut("lora_alpha"));
            if let Some(Value::Object(p)) = obj.get_mut("alpha_pattern") {
                p.values_mut().for_each(|v| integral(Some(v)));
            }
            let mut sorted: Vec<(String, Value)> = std::mem::take(obj).into_iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(&b.0));
            obj.extend(sorted);
        }
        serde_json::to_string_pretty(&v).expect("config serialises")
    }

    /// The rank PEFT gives `module`: the first `rank_pattern` key that matches, else `r`.
    pub fn rank_for(&self, module: &str) -> Result<usize> {
        match pattern_value(&self.rank_pattern, module).map_err(|r| self.field_error("rank_pattern", r))? {
            None => Ok(self.r),
            Some(v) => v
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| self.field_error("rank_pattern", format!("value {v} is not a rank"))),
        }
    }

    /// The alpha PEFT gives `module`: the first `alpha_pattern` key that matches, else
    /// `lora_alpha`.
    pub fn alpha_for(&self, module: &str) -> Result<f64> {
        match pattern_value(&self.alpha_pattern, module).map_err(|r| self.field_error("alpha_pattern", r))? {
            None => Ok(self.lora_alpha),
            Some(v) => {
                v.as_f64().ok_or_else(|| self.field_error("alpha_pattern", format!("value {v} is not a number")))
            }
        }
    }

    /// Whether PEFT would adapt `module` given `target_modules` (and `exclude_modules`).
    pub fn targets(&self, module: &str) -> Result<bool> {
        let hit = |t: &TargetModulesJson, field: &str| -> Result<bool> {
            match t {
                TargetModulesJson::List(names) => Ok(names.iter().any(|n| list_matches(n, module))),
                TargetModulesJson::Regex(s) if s == "all-linear" => Ok(true),
                TargetModulesJson::Regex(s) => {
                    Ok(full_regex(s).map_err(|r| self.field_error(field, r))?.is_match(module))
                }
            }
        };
        let included = match &self.target_modules {
            None => false,
            Some(t) => hit(t, "target_modules")?,
        };
        let excluded = match &self.exclude_modules {
            None => false,
            Some(t) => hit(t, "exclude_modules")?,
        };
        Ok(included && !excluded)
    }

    fn field_error(&self, field: &str, reason: String) -> Error {
        Error::config(Location::tensor(CONFIG_FILE, field), reason)
    }
}

fn integral(v: Option<&mut Value>) {
    if let Some(v) = v {
        if let Some(f) = v.as_f64() {
            if f.fract() == 0.0 && f.abs() < 9.0e15 {
                *v = Value::from(f as i64);
            }
        }
    }
}

/// PEFT's list rule: a name matches a module path equal to it or ending in `.name`.
pub(crate) fn list_matches(name: &str, module: &str) -> bool {
    module == name || module.ends_with(&format!(".{name}"))
}

fn full_regex(pattern: &str) -> std::result::Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| format!("invalid regular expression {pattern:?}: {e}"))
}

/// PEFT's `get_pattern_key`: the first key k with `re.match(rf"(.*\.)?({k})$", module)`.
fn pattern_value<'a>(pattern: &'a Map<String, Value>, module: &str) -> std::result::Result<Option<&'a Value>, String> {
    for (key, value) in pattern {
        let re = Regex::new(&format!(r"^(.*\.)?({key})$")).map_err(|e| format!("invalid pattern key {key:?}: {e}"))?;
        if re.is_match(module) {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

/// What a tensor key of a PEFT file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    A,
    B,
    EmbA,
    EmbB,
    Magnitude,
}

const SUFFIXES: [(&str, Part); 8] = [
    (".lora_A.weight", Part::A),
    (".lora_A.default.weight", Part::A),
    (".lora_B.weight", Part::B),
    (".lora_B.default.weight", Part::B),
    (".lora_embedding_A", Part::EmbA),
    (".lora_embedding_B", Part::EmbB),
    (".lora_magnitude_vector", Part::Magnitude),
    (".lora_magnitude_vector.weight", Part::Magnitude),
];

pub(crate) fn split_key(key: &str) -> Option<(&str, Part)> {
    SUFFIXES.iter().find_map(|(suffix, part)| key.strip_suffix(suffix).map(|m| (m, *part)))
}

/// The folder of a PEFT adapter given the folder or a file in it.
pub(crate) fn adapter_dir(path: &Path) -> PathBuf {
    if path.is_file() {
        path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
    } else {
        path.to_path_buf()
    }
}

/// The tensor keys of one PEFT adapter file's modules, by part.
#[derive(Default)]
pub(crate) struct Parts {
    pub(crate) a: Option<String>,
    pub(crate) b: Option<String>,
    pub(crate) ea: Option<String>,
    pub(crate) eb: Option<String>,
    pub(crate) m: Option<String>,
}

/// The keys of a PEFT adapter file, by module.
pub(crate) struct Grouped {
    /// The factors' keys of each module, in file order.
    pub(crate) modules: IndexMap<String, Parts>,
    /// (key, name) of each tensor saved whole (`modules_to_save`).
    pub(crate) saved: Vec<(String, String)>,
}

/// The keys of a PEFT adapter file grouped by module. Errors name the file and the key: a bias
/// on lora_B, a part that appears twice, a key that is neither.
pub(crate) fn group_keys(file: &SafetensorsFile, weights_path: &Path, pc: &PeftConfig) -> Result<Grouped> {
    let mut modules: IndexMap<String, Parts> = IndexMap::new();
    let mut saved: Vec<(String, String)> = Vec::new();
    let mts = pc.modules_to_save.clone().unwrap_or_default();
    for key in file.names() {
        let stripped = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
        if key.ends_with(".lora_B.bias") {
            return Err(Error::unsupported(
                Location::tensor(weights_path, key),
                "lora_bias (a bias on lora_B) is not supported",
            ));
        }
        match split_key(stripped) {
            Some((module, part)) => {
                let p = modules.entry(module.to_string()).or_default();
                let slot = match part {
                    Part::A => &mut p.a,
                    Part::B => &mut p.b,
                    Part::EmbA => &mut p.ea,
                    Part::EmbB => &mut p.eb,
                    Part::Magnitude => &mut p.m,
                };
                if slot.replace(key.to_string()).is_some() {
                    return Err(Error::config(
                        Location::tensor(weights_path, key),
                        "the same LoRA tensor appears twice (with and without the adapter name)",
                    ));
                }
            }
            None => {
                let module = stripped.rsplit_once('.').map_or(stripped, |(m, _)| m);
                let is_saved = mts.iter().any(|m| list_matches(m, module)) || module.ends_with(".base_layer");
                if !is_saved {
                    return Err(Error::UnknownTensor {
                        at: Location::tensor(weights_path, key),
                        hint: "expected <module>.lora_A.weight, .lora_B.weight, .lora_embedding_A/B, \
                               .lora_magnitude_vector or a tensor of modules_to_save"
                            .into(),
                    });
                }
                saved.push((key.to_string(), stripped.to_string()));
            }
        }
    }
    Ok(Grouped { modules, saved })
}

/// Read a PEFT adapter folder (or its `adapter_model.safetensors` / `adapter_config.json`).
///
/// Ranks are checked three ways: lora_A against lora_B, and both against the rank PEFT would
/// create from `r` and `rank_pattern`; alphas come from `lora_alpha` and `alpha_pattern`
/// resolved per module as PEFT resolves them. The original config is kept in the adapter's
/// metadata under [`META_PEFT_CONFIG`], the file's `__metadata__` as plain entries.
pub fn read_peft<T: Scalar>(path: impl AsRef<Path>) -> Result<Adapter<T>> {
    let dir = adapter_dir(path.as_ref());
    let config_path = dir.join(CONFIG_FILE);
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.exists() && dir.join("adapter_model.bin").exists() {
        return Err(Error::unsupported(
            Location::file(dir.join("adapter_model.bin")),
            "legacy pickle adapter (adapter_model.bin) is not read: unpickling can run code. Convert it once with \
             python: `import torch; from safetensors.torch import save_file; \
             save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')`, \
             or load it in PEFT and save_pretrained (safetensors is the default)",
        ));
    }
    let config_text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let pc = PeftConfig::parse(&config_path, &config_text)?;
    let at_cfg = |field: &str| Location::tensor(&config_path, field);
    if pc.peft_type != "LORA" {
        return Err(Error::unsupported(at_cfg("peft_type"), format!("peft_type {:?} is not LORA", pc.peft_type)));
    }
    if pc.r == 0 {
        return Err(Error::config(at_cfg("r"), "r must be at least 1"));
    }
    let resolve_err = |e: Error| match e {
        Error::Config { at, reason } => {
            Error::Config { at: Location { path: config_path.clone(), tensor: at.tensor }, reason }
        }
        other => other,
    };
    let file = SafetensorsFile::open(&weights_path)?;

    let Grouped { modules, saved } = group_keys(&file, &weights_path, &pc)?;

    let scaling = if pc.use_rslora { Scaling::RsLora } else { Scaling::Standard };
    // The stored dtype of the factors, recorded so that writers keep it.
    let stored_dtype = modules.values().find_map(|p| p.a.as_ref().or(p.ea.as_ref())).and_then(|k| file.dtype(k));
    let config = adapter_config(&pc, &file, &config_text, modules.keys(), stored_dtype);
    let mut adapter = Adapter::<T>::new(config);

    // Modules are decoded and validated in parallel (rayon's pool), then inserted in file order;
    // the first error in that order is the one reported.
    let list: Vec<(&String, &Parts)> = modules.iter().collect();
    let built: Vec<Result<(String, AdapterModule<T>, Location)>> = list
        .par_iter()
        .map(|&(module, p)| -> Result<(String, AdapterModule<T>, Location)> {
            let (a_key, b_key, embedding) = match (&p.a, &p.b, &p.ea, &p.eb) {
                (Some(a), Some(b), None, None) => (a, b, false),
                (None, None, Some(a), Some(b)) => (a, b, true),
                (Some(a), None, _, _) => return Err(missing(&weights_path, a, "lora_B.weight")),
                (None, Some(b), _, _) => return Err(missing(&weights_path, b, "lora_A.weight")),
                (None, None, Some(a), None) => return Err(missing(&weights_path, a, "lora_embedding_B")),
                (None, None, None, Some(b)) => return Err(missing(&weights_path, b, "lora_embedding_A")),
                (None, None, None, None) => {
                    let m = p.m.as_deref().unwrap_or(module);
                    return Err(missing(&weights_path, m, "lora_A.weight and lora_B.weight"));
                }
                (Some(a), Some(_), _, _) => {
                    return Err(Error::config(
                        Location::tensor(&weights_path, a),
                        "module has both linear (lora_A/B) and embedding (lora_embedding_A/B) factors",
                    ))
                }
            };
            let a: Array2<T> = read_2d(&file, a_key)?;
            let b: Array2<T> = read_2d(&file, b_key)?;
            let rank = a.nrows();
            if b.ncols() != rank {
                return Err(Error::RankMismatch {
                    at: Location::tensor(&weights_path, b_key),
                    got: b.ncols(),
                    expected: rank,
                    what: a_key.clone(),
                });
            }
            let expected = pc.rank_for(module).map_err(resolve_err)?;
            if expected != rank {
                let what = if pc.rank_pattern.is_empty() {
                    "adapter_config.json r"
                } else {
                    "adapter_config.json r / rank_pattern"
                };
                return Err(Error::RankMismatch {
                    at: Location::tensor(&weights_path, a_key),
                    got: rank,
                    expected,
                    what: what.into(),
                });
            }
            let alpha = pc.alpha_for(module).map_err(resolve_err)?;
            let layer = LoraLayer::new(a, b, alpha, scaling).map_err(|e| {
                // name the factor at fault
                let key = if matches!(&e, lora_core::Error::NonFinite { what, .. } if what == "lora_B") {
                    b_key
                } else {
                    a_key
                };
                Error::core(Location::tensor(&weights_path, key), e)
            })?;
            let at_a = Location::tensor(&weights_path, a_key);
            let module_value = match (embedding, &p.m, pc.use_dora) {
                (true, None, _) => AdapterModule::embedding(layer),
                (false, None, false) => AdapterModule::linear(layer),
                (false, Some(m_key), true) => {
                    let m: Array1<T> = file
                        .tensor::<T>(m_key)?
                        .into_dimensionality::<Ix1>()
                        .map_err(|_| shape_err(&weights_path, m_key, "[d_out]", file.shape(m_key)))?;
                    let dora =
                        DoraLayer::new(layer, m).map_err(|e| Error::core(Location::tensor(&weights_path, m_key), e))?;
                    AdapterModule::dora(dora)
                }
                (false, None, true) => {
                    return Err(missing(&weights_path, a_key, "lora_magnitude_vector (use_dora is set)"))
                }
                (_, Some(m_key), false) => {
                    return Err(Error::config(
                        Location::tensor(&weights_path, m_key),
                        "a DoRA magnitude vector is present but adapter_config.json has use_dora = false",
                    ))
                }
                (true, Some(m_key), true) => {
                    return Err(Error::unsupported(
                        Location::tensor(&weights_path, m_key),
                        "DoRA on an embedding is not supported",
                    ))
                }
            };
            Ok((module.clone(), module_value, at_a))
        })
        .collect();
    for r in built {
        let (module, module_value, at_a) = r?;
        adapter.insert(module, module_value).map_err(|e| Error::core(at_a, e))?;
    }
    for (key, name) in saved {
        let t = file.tensor::<T>(&key)?;
        adapter.insert_saved(name, t).map_err(|e| Error::core(Location::tensor(&weights_path, &key), e))?;
    }
    Ok(adapter)
}

/// The adapter config `read_peft` gives a PEFT file: `pc`'s fields, the file's `__metadata__`,
/// the config text under [`META_PEFT_CONFIG`] and the stored dtype under [`META_DTYPE`].
pub(crate) fn adapter_config<'a>(
    pc: &PeftConfig,
    file: &SafetensorsFile,
    config_text: &str,
    modules: impl Iterator<Item = &'a String>,
    stored_dtype: Option<DType>,
) -> AdapterConfig {
    let mut metadata: BTreeMap<String, String> = file.metadata().clone();
    metadata.insert(META_PEFT_CONFIG.into(), config_text.to_string());
    if let Some(d) = stored_dtype {
        metadata.insert(META_DTYPE.into(), dtype_label(d).into());
    }
    AdapterConfig {
        base_model: pc.base_model_name_or_path.clone(),
        target_modules: match &pc.target_modules {
            Some(TargetModulesJson::List(l)) => TargetModules::List(l.clone()),
            Some(TargetModulesJson::Regex(s)) if s == "all-linear" => TargetModules::AllLinear,
            Some(TargetModulesJson::Regex(s)) => TargetModules::Regex(s.clone()),
            None => TargetModules::List(modules.cloned().collect()),
        },
        rank: pc.r,
        alpha: pc.lora_alpha,
        scaling: if pc.use_rslora { Scaling::RsLora } else { Scaling::Standard },
        use_dora: pc.use_dora,
        fan_in_fan_out: pc.fan_in_fan_out,
        modules_to_save: pc.modules_to_save.clone().unwrap_or_default(),
        metadata,
    }
}

pub(crate) fn dtype_label(d: DType) -> &'static str {
    match d {
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F32 => "F32",
        DType::F64 => "F64",
    }
}

pub(crate) fn parse_dtype_label(s: &str) -> Option<DType> {
    match s {
        "F16" => Some(DType::F16),
        "BF16" => Some(DType::BF16),
        "F32" => Some(DType::F32),
        "F64" => Some(DType::F64),
        _ => None,
    }
}

/// The dtype to write: the one asked for, else the one the reader recorded, else F32.
pub(crate) fn output_dtype<T: Scalar>(adapter: &Adapter<T>, asked: Option<DType>) -> DType {
    output_dtype_of(adapter.config(), asked)
}

/// [`output_dtype`] from the config alone.
pub(crate) fn output_dtype_of(config: &AdapterConfig, asked: Option<DType>) -> DType {
    asked.or_else(|| config.metadata.get(META_DTYPE).and_then(|s| parse_dtype_label(s))).unwrap_or(DType::F32)
}

/// The `__metadata__` a writer puts in a file: the adapter's metadata without lora-io's own keys.
pub(crate) fn file_metadata(config: &AdapterConfig) -> BTreeMap<String, String> {
    config.metadata.iter().filter(|(k, _)| !k.starts_with("lora_io.")).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The `__metadata__` of a PEFT weights file: [`file_metadata`] without kohya's `ss_` keys,
/// with `format = pt`.
pub(crate) fn peft_file_metadata(config: &AdapterConfig) -> BTreeMap<String, String> {
    let mut metadata = file_metadata(config);
    metadata.retain(|k, _| !k.starts_with("ss_"));
    metadata.insert("format".into(), "pt".into());
    metadata
}

/// What the writers need to know of a module besides its tensors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ModuleShape<'a> {
    pub name: &'a str,
    pub kind: ModuleKind,
    pub rank: usize,
    pub alpha: f64,
    pub scaling: Scaling,
    /// lora_A's columns.
    pub d_in: usize,
    /// lora_B's rows.
    pub d_out: usize,
}

impl ModuleShape<'_> {
    /// The module's scale (alpha / r, or alpha / sqrt(r)), as `LoraLayer::scale` computes it.
    pub fn scale(&self) -> f64 {
        self.scaling.scale(self.alpha, self.rank)
    }
}

/// The [`ModuleShape`] of every module of an adapter, in order.
pub(crate) fn module_shapes<T: Scalar>(adapter: &Adapter<T>) -> Vec<ModuleShape<'_>> {
    adapter
        .modules()
        .iter()
        .map(|(name, m)| {
            let l = m.layer();
            ModuleShape {
                name,
                kind: m.kind(),
                rank: l.rank(),
                alpha: l.alpha(),
                scaling: l.scaling(),
                d_in: l.d_in(),
                d_out: l.d_out(),
            }
        })
        .collect()
}

fn missing(path: &Path, present: &str, missing: &str) -> Error {
    Error::MissingPair { at: Location::tensor(path, present), missing: missing.into() }
}

fn shape_err(path: &Path, key: &str, expected: &str, got: Option<&[usize]>) -> Error {
    Error::Shape { at: Location::tensor(path, key), expected: expected.into(), got: got.unwrap_or_default().to_vec() }
}

pub(crate) fn read_2d<T: Scalar>(file: &SafetensorsFile, key: &str) -> Result<Array2<T>> {
    file.tensor::<T>(key)?
        .into_dimensionality::<Ix2>()
        .map_err(|_| shape_err(file.path(), key, "[_, _]", file.shape(key)))
}

/// Options of [`write_peft`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeftWriteOptions {
    /// The stored dtype; `None` keeps the dtype the adapter was read in (F32 when unknown).
    pub dtype: Option<DType>,
}

/// The `adapter_config.json` PEFT needs to rebuild exactly this adapter: the original config
/// (from [`META_PEFT_CONFIG`]) when there is one, with every field that decides the tensors'
/// meaning set from the adapter. Patterns are kept when they still resolve to every module's
/// rank and alpha, and otherwise rewritten with one full module path per deviating module.
pub fn peft_config_for<T: Scalar>(adapter: &Adapter<T>) -> PeftConfig {
    peft_config_from(adapter.config(), &module_shapes(adapter))
}

/// [`peft_config_for`] from the config and the modules' shapes.
pub(crate) fn peft_config_from(cfg: &AdapterConfig, modules: &[ModuleShape<'_>]) -> PeftConfig {
    let original = cfg.metadata.get(META_PEFT_CONFIG).and_then(|t| PeftConfig::parse(Path::new(CONFIG_FILE), t).ok());
    let mut pc = original.clone().unwrap_or_else(|| {
        let mut pc = PeftConfig::new(cfg.rank, cfg.alpha);
        pc.task_type = Some("CAUSAL_LM".into());
        pc
    });
    pc.peft_type = "LORA".into();
    pc.r = cfg.rank;
    pc.lora_alpha = cfg.alpha;
    pc.use_rslora = cfg.scaling == Scaling::RsLora;
    pc.use_dora = cfg.use_dora;
    pc.fan_in_fan_out = cfg.fan_in_fan_out;
    pc.base_model_name_or_path = cfg.base_model.clone();
    pc.modules_to_save = if cfg.modules_to_save.is_empty() { None } else { Some(cfg.modules_to_save.clone()) };
    pc.lora_bias = false;
    pc.target_modules = Some(match &cfg.target_modules {
        TargetModules::List(l) => TargetModulesJson::List(l.clone()),
        TargetModules::Regex(r) => TargetModulesJson::Regex(r.clone()),
        TargetModules::AllLinear => TargetModulesJson::Regex("all-linear".into()),
    });
    // Every module must be targeted, or PEFT would not create it and would drop its tensors.
    let all_targeted = modules.iter().all(|m| pc.targets(m.name).unwrap_or(false));
    let has_embedding = modules.iter().any(|m| m.kind == ModuleKind::Embedding);
    if !all_targeted || matches!(cfg.target_modules, TargetModules::AllLinear) && has_embedding {
        pc.target_modules = Some(TargetModulesJson::List(modules.iter().map(|m| m.name.to_string()).collect()));
        pc.exclude_modules = None;
    }
    let ranks_ok = modules.iter().all(|m| pc.rank_for(m.name).ok() == Some(m.rank));
    if !ranks_ok {
        // Adapter::rank_pattern: the modules whose rank differs from the default
        pc.rank_pattern =
            modules.iter().filter(|m| m.rank != cfg.rank).map(|m| (m.name.to_string(), Value::from(m.rank))).collect();
    }
    let alphas_ok = modules.iter().all(|m| pc.alpha_for(m.name).ok() == Some(m.alpha));
    if !alphas_ok {
        pc.alpha_pattern = modules
            .iter()
            .filter(|m| m.alpha != cfg.alpha)
            .map(|m| (m.name.to_string(), Value::from(m.alpha)))
            .collect();
    }
    pc
}

/// The tensor keys (in file order) and values of an adapter in PEFT's layout, borrowed.
pub(crate) fn peft_tensors<T: Scalar>(adapter: &Adapter<T>) -> Vec<(String, ndarray::ArrayViewD<'_, T>)> {
    let mut out = Vec::new();
    for (name, m) in adapter.modules() {
        let (a, b) = match m.kind() {
            lora_core::ModuleKind::Linear => ("lora_A.weight", "lora_B.weight"),
            lora_core::ModuleKind::Embedding => ("lora_embedding_A", "lora_embedding_B"),
        };
        out.push((format!("{PEFT_PREFIX}{name}.{a}"), m.layer().a().view().into_dyn()));
        out.push((format!("{PEFT_PREFIX}{name}.{b}"), m.layer().b().view().into_dyn()));
        if let Some(mag) = m.magnitude() {
            out.push((format!("{PEFT_PREFIX}{name}.lora_magnitude_vector"), mag.view().into_dyn()));
        }
    }
    for (name, t) in adapter.saved_tensors() {
        out.push((format!("{PEFT_PREFIX}{name}"), t.view()));
    }
    out
}

/// Write a PEFT adapter folder: `adapter_config.json` ([`peft_config_for`]) and
/// `adapter_model.safetensors` with canonical keys, both written atomically. The folder is
/// created when missing.
pub fn write_peft<T: Scalar>(adapter: &Adapter<T>, dir: impl AsRef<Path>, options: &PeftWriteOptions) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let dtype = output_dtype(adapter, options.dtype);
    let tensors = peft_tensors(adapter);
    let metadata = peft_file_metadata(adapter.config());
    let weights = dir.join(WEIGHTS_FILE);
    let plan = tensors.iter().map(|(n, t)| PlannedTensor::new(n.clone(), t.shape(), dtype)).collect();
    let mut w = SafetensorsWriter::create(&weights, plan, &metadata)?;
    for (n, t) in &tensors {
        w.write(n, t)?;
    }
    w.finish()?;
    let config = peft_config_for(adapter).to_json();
    atomic::write_file(&dir.join(CONFIG_FILE), config.as_bytes())
}
