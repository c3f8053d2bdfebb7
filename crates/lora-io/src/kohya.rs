//! kohya / sd-scripts single-file adapters.
//!
//! Keys are `<prefix>_<module path with . replaced by _>.lora_down.weight` (r, d_in),
//! `.lora_up.weight` (d_out, r) and `.alpha` (a scalar; missing means alpha = r), with metadata
//! `ss_network_dim` and `ss_network_alpha`. The scale is alpha / r (kohya has no rsLoRA, so an
//! rsLoRA module is written with the alpha that gives the same scale; the factors are unchanged).
//!
//! Underscores make the mapping back to module paths ambiguous (`self_attn` holds one), so the
//! reader resolves each name against known module paths ([`ModuleResolver`]) and fails with the
//! candidates when it stays ambiguous. The writer also records the module paths in the metadata
//! key `lora_io.module_paths`, which other tools ignore and this reader uses.

use std::collections::BTreeMap;
use std::path::Path;

use indexmap::IndexMap;
use lora_core::{
    Adapter, AdapterConfig, AdapterModule, DType, LoraLayer, ModuleKind, Scalar, Scaling, TargetModules, TensorSource,
};
use ndarray::Array2;

use crate::error::{Error, Location, Result};
use crate::peft::{dtype_label, file_metadata, module_shapes, output_dtype, read_2d, ModuleShape, META_DTYPE};
use crate::st::{PlannedTensor, SafetensorsFile, SafetensorsWriter};

/// Metadata key holding the JSON list of module paths, in key order.
pub const META_MODULE_PATHS: &str = "lora_io.module_paths";

/// Key prefixes recognised on reading (sd-scripts' U-Net and text-encoder prefixes, and a bare
/// `lora`).
pub const KNOWN_PREFIXES: [&str; 7] =
    ["lora_te", "lora_unet", "lora_te1", "lora_te2", "lora_te3", "lora_transformer", "lora"];

/// Where the reader finds the module paths that underscore names map back to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleResolver {
    /// Only the paths this crate's writer recorded in the file (`lora_io.module_paths`).
    Embedded,
    /// These module paths (a base model's tensor names without `.weight`, or the modules of an
    /// adapter); paths recorded in the file are used as well.
    Modules(Vec<String>),
}

impl ModuleResolver {
    /// The module paths of a base model: its 2-D tensor names with `.weight` removed.
    pub fn from_model<S: TensorSource + ?Sized>(source: &S) -> Self {
        ModuleResolver::Modules(
            source.tensor_names().into_iter().filter_map(|n| n.strip_suffix(".weight").map(str::to_string)).collect(),
        )
    }
}

/// Options of [`write_kohya`].
#[derive(Debug, Clone, PartialEq)]
pub struct KohyaOptions {
    /// The key prefix (default `lora_te`, sd-scripts' text-encoder prefix, since these are
    /// transformer language models).
    pub prefix: String,
    /// The dtype of the factors; `None` keeps the dtype the adapter was read in (F32 when
    /// unknown). `alpha` scalars are always F32 so that folded alphas stay exact.
    pub dtype: Option<DType>,
}

impl Default for KohyaOptions {
    fn default() -> Self {
        KohyaOptions { prefix: "lora_te".into(), dtype: None }
    }
}

/// A module path in kohya's flat form.
pub fn flatten(module: &str) -> String {
    module.replace('.', "_")
}

/// Write an adapter as one kohya `.safetensors` file, atomically.
///
/// DoRA, embedding modules, `modules_to_save` and `fan_in_fan_out` have no kohya form for
/// language models and are refused (never silently dropped).
pub fn write_kohya<T: Scalar>(adapter: &Adapter<T>, path: impl AsRef<Path>, options: &KohyaOptions) -> Result<()> {
    let path = path.as_ref();
    let cfg = adapter.config();
    let refuse = |what: Option<&str>, reason: &str| {
        let at = match what {
            Some(m) => Location::tensor(path, m),
            None => Location::file(path),
        };
        Err(Error::unsupported(at, format!("kohya files cannot hold {reason}")))
    };
    if cfg.use_dora {
        return refuse(None, "DoRA magnitude vectors");
    }
    if cfg.fan_in_fan_out {
        return refuse(None, "fan_in_fan_out (Conv1D) modules");
    }
    if let Some(name) = adapter.saved_tensors().keys().next() {
        return refuse(Some(name), "full tensors of modules_to_save");
    }
    if let Some((name, _)) = adapter.modules().iter().find(|(_, m)| m.kind() == ModuleKind::Embedding) {
        return refuse(Some(name), "embedding LoRA (lora_embedding_A/B)");
    }
    let dtype = output_dtype(adapter, options.dtype);
    let shapes = module_shapes(adapter);
    let (keys, mut w) = kohya_writer(path, cfg, &shapes, &options.prefix, dtype)?;
    for ((key, m), shape) in keys.iter().zip(adapter.modules().values()).zip(&shapes) {
        let layer = m.layer();
        w.write(&format!("{key}.lora_down.weight"), layer.a())?;
        w.write(&format!("{key}.lora_up.weight"), layer.b())?;
        w.write(&format!("{key}.alpha"), &ndarray::arr0(module_alpha(shape)))?;
    }
    w.finish()
}

/// kohya's scale is alpha / r: the alpha that keeps a module's scale.
pub(crate) fn module_alpha(m: &ModuleShape<'_>) -> f64 {
    Scaling::Standard.alpha_for_scale(m.scale(), m.rank)
}

/// The module keys (`<prefix>_<flat path>`) and a writer of a kohya file for these modules, with
/// its header and metadata; the tensors follow, per module: lora_down, lora_up, alpha (F32).
pub(crate) fn kohya_writer(
    path: &Path,
    cfg: &AdapterConfig,
    modules: &[ModuleShape<'_>],
    prefix: &str,
    dtype: DType,
) -> Result<(Vec<String>, SafetensorsWriter)> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    let mut plan = Vec::new();
    let mut keys = Vec::new();
    for m in modules {
        let name = m.name;
        let key = format!("{prefix}_{}", flatten(name));
        if let Some(other) = seen.insert(key.clone(), name) {
            return Err(Error::Ambiguous {
                at: Location::tensor(path, name),
                reason: format!("modules {other} and {name} have the same kohya name {key}"),
            });
        }
        plan.push(PlannedTensor::new(format!("{key}.lora_down.weight"), &[m.rank, m.d_in], dtype));
        plan.push(PlannedTensor::new(format!("{key}.lora_up.weight"), &[m.d_out, m.rank], dtype));
        plan.push(PlannedTensor::new(format!("{key}.alpha"), &[], DType::F32));
        keys.push(key);
    }
    let mut metadata = file_metadata(cfg);
    metadata.remove("format");
    let network_alpha = Scaling::Standard.alpha_for_scale(cfg.scaling.scale(cfg.alpha, cfg.rank), cfg.rank);
    metadata.insert("ss_network_module".into(), "networks.lora".into());
    metadata.insert("ss_network_dim".into(), cfg.rank.to_string());
    metadata.insert("ss_network_alpha".into(), format_number(network_alpha));
    let paths: Vec<&str> = modules.iter().map(|m| m.name).collect();
    metadata.insert(META_MODULE_PATHS.into(), serde_json::to_string(&paths).expect("strings serialise"));
    Ok((keys, SafetensorsWriter::create(path, plan, &metadata)?))
}

fn format_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[derive(Default)]
pub(crate) struct Group {
    pub down: Option<String>,
    pub up: Option<String>,
    pub alpha: Option<String>,
}

/// The module paths kohya names may stand for: those recorded in the file and the resolver's,
/// sorted, without duplicates.
pub(crate) fn module_candidates(file: &SafetensorsFile, resolver: &ModuleResolver) -> Result<Vec<String>> {
    let path = file.path();
    let mut candidates: Vec<String> = Vec::new();
    if let Some(text) = file.metadata().get(META_MODULE_PATHS) {
        let listed: Vec<String> = serde_json::from_str(text).map_err(|e| {
            Error::config(
                Location::tensor(path, META_MODULE_PATHS),
                format!("metadata is not a json list of strings: {e}"),
            )
        })?;
        candidates.extend(listed);
    }
    if let ModuleResolver::Modules(m) = resolver {
        candidates.extend(m.iter().cloned());
    }
    candidates.sort();
    candidates.dedup();
    Ok(candidates)
}

/// The candidates by their flat (kohya) form.
pub(crate) fn by_flat(candidates: &[String]) -> BTreeMap<String, Vec<&str>> {
    let mut by_flat: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for c in candidates {
        by_flat.entry(flatten(c)).or_default().push(c);
    }
    by_flat
}

/// The file's keys grouped by module name (`<prefix>_<flat path>`), in file order.
pub(crate) fn groups(file: &SafetensorsFile) -> Result<IndexMap<String, Group>> {
    let path = file.path();
    let mut groups: IndexMap<String, Group> = IndexMap::new();
    for key in file.names() {
        let (base, slot) = if let Some(b) = key.strip_suffix(".lora_down.weight") {
            (b, 0)
        } else if let Some(b) = key.strip_suffix(".lora_up.weight") {
            (b, 1)
        } else if let Some(b) = key.strip_suffix(".alpha") {
            (b, 2)
        } else {
            return Err(Error::UnknownTensor {
                at: Location::tensor(path, key),
                hint: "expected <name>.lora_down.weight, .lora_up.weight or .alpha (LyCORIS, DoRA and conv \
                       variants are not supported)"
                    .into(),
            });
        };
        let g = groups.entry(base.to_string()).or_default();
        let s = match slot {
            0 => &mut g.down,
            1 => &mut g.up,
            _ => &mut g.alpha,
        };
        *s = Some(key.to_string());
    }
    Ok(groups)
}

/// Read a kohya file. Every module name is mapped back to a module path with `resolver` (and
/// the paths recorded by this crate's writer); a name that matches no path, or more than one,
/// is an error naming the tensor and the candidates.
pub fn read_kohya<T: Scalar>(path: impl AsRef<Path>, resolver: &ModuleResolver) -> Result<Adapter<T>> {
    let path = path.as_ref();
    let file = SafetensorsFile::open(path)?;
    let candidates = module_candidates(&file, resolver)?;
    let by_flat = by_flat(&candidates);
    let groups = groups(&file)?;

    let mut modules: Vec<(String, LoraLayer<T>)> = Vec::new();
    let mut stored_dtype = None;
    for (base, g) in &groups {
        let (down, up) = match (&g.down, &g.up) {
            (Some(d), Some(u)) => (d, u),
            (Some(d), None) => {
                return Err(Error::MissingPair { at: Location::tensor(path, d), missing: "lora_up.weight".into() })
            }
            (None, Some(u)) => {
                return Err(Error::MissingPair { at: Location::tensor(path, u), missing: "lora_down.weight".into() })
            }
            (None, None) => {
                let a = g.alpha.as_deref().unwrap_or(base);
                return Err(Error::MissingPair {
                    at: Location::tensor(path, a),
                    missing: "lora_down.weight and lora_up.weight".into(),
                });
            }
        };
        let module = resolve(path, down, base, &by_flat, resolver)?;
        if stored_dtype.is_none() {
            stored_dtype = file.dtype(down);
        }
        let a: Array2<T> = read_2d(&file, down)?;
        let b: Array2<T> = read_2d(&file, up)?;
        if b.ncols() != a.nrows() {
            return Err(Error::RankMismatch {
                at: Location::tensor(path, up),
                got: b.ncols(),
                expected: a.nrows(),
                what: down.clone(),
            });
        }
        let alpha = match &g.alpha {
            None => a.nrows() as f64,
            Some(k) => {
                let t = file.tensor_f64(k)?;
                if t.len() != 1 {
                    return Err(Error::Shape {
                        at: Location::tensor(path, k),
                        expected: "[] (a scalar)".into(),
                        got: t.shape().to_vec(),
                    });
                }
                t.iter().next().copied().expect("one element")
            }
        };
        let layer = LoraLayer::new(a, b, alpha, Scaling::Standard).map_err(|e| {
            // name the factor at fault
            let key =
                if matches!(&e, lora_core::Error::NonFinite { what, .. } if what == "lora_B") { up } else { down };
            Error::core(Location::tensor(path, key), e)
        })?;
        modules.push((module, layer));
    }

    let summary: Vec<(&str, usize, f64)> = modules.iter().map(|(m, l)| (m.as_str(), l.rank(), l.alpha())).collect();
    let mut adapter = Adapter::new(adapter_config(file.metadata(), &summary, stored_dtype));
    for (m, layer) in modules {
        adapter
            .insert(m.clone(), AdapterModule::linear(layer))
            .map_err(|e| Error::core(Location::tensor(path, &m), e))?;
    }
    Ok(adapter)
}

/// The adapter config `read_kohya` gives a file with this `__metadata__` and these modules
/// (path, rank, alpha), whose first lora_down is stored in `stored_dtype`.
pub(crate) fn adapter_config(
    meta: &BTreeMap<String, String>,
    modules: &[(&str, usize, f64)],
    stored_dtype: Option<DType>,
) -> AdapterConfig {
    let parse = |k: &str| meta.get(k).and_then(|v| v.trim().parse::<f64>().ok()).filter(|v| v.is_finite());
    // ss_network_dim is the default rank only when some module has it: a claim that no tensor
    // backs (ss_network_dim = 1e300) is ignored.
    let rank = parse("ss_network_dim")
        .map(|v| v as usize)
        .filter(|&r| modules.iter().any(|m| m.1 == r))
        .or_else(|| most_common(modules.iter().map(|m| m.1)))
        .unwrap_or(1);
    let alpha = parse("ss_network_alpha").or_else(|| modules.first().map(|m| m.2)).unwrap_or(rank as f64);
    let mut config =
        AdapterConfig::new(rank, alpha, TargetModules::List(modules.iter().map(|m| m.0.to_string()).collect()));
    config.metadata = meta.clone();
    if let Some(d) = stored_dtype {
        config.metadata.insert(META_DTYPE.into(), dtype_label(d).into());
    }
    config
}

fn most_common(it: impl Iterator<Item = usize>) -> Option<usize> {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for r in it {
        *counts.entry(r).or_default() += 1;
    }
    counts.into_iter().max_by_key(|&(r, c)| (c, std::cmp::Reverse(r))).map(|(r, _)| r)
}

pub(crate) fn resolve(
    path: &Path,
    tensor: &str,
    base: &str,
    by_flat: &BTreeMap<String, Vec<&str>>,
    resolver: &ModuleResolver,
) -> Result<String> {
    let mut found: Vec<&str> = Vec::new();
    for prefix in KNOWN_PREFIXES {
        if let Some(flat) = base.strip_prefix(prefix).and_then(|r| r.strip_prefix('_')) {
            if let Some(paths) = by_flat.get(flat) {
                found.extend(paths.iter().copied());
            }
        }
    }
    found.sort();
    found.dedup();
    match found.as_slice() {
        [one] => Ok(one.to_string()),
        [] => {
            let reason = match resolver {
                ModuleResolver::Embedded if by_flat.is_empty() => format!(
                    "{base} could stand for several module paths (underscores are ambiguous) and the file \
                     records none: give the base model (its tensor names) to resolve it"
                ),
                _ => format!(
                    "{base} matches no module path of the base model (prefixes tried: {})",
                    KNOWN_PREFIXES.join(", ")
                ),
            };
            Err(Error::Ambiguous { at: Location::tensor(path, tensor), reason })
        }
        many => Err(Error::Ambiguous {
            at: Location::tensor(path, tensor),
            reason: format!("{base} matches several module paths: {}", many.join(", ")),
        }),
    }
}
