//! Streaming adapter conversion: [`convert_adapter`] copies each tensor's stored bytes from the
//! memory-mapped input to the output writer when no value changes, and decodes only the tensors
//! that must change.
//!
//! The conversion first builds a plan from the headers alone (tensor names, dtypes, shapes, the
//! PEFT config, kohya names, GGUF metadata) with every structural check of the readers; then it
//! writes the output tensor by tensor, checking each tensor's values for NaN and infinities on the
//! stored bytes before they are copied. A tensor is copied as it is when its dtype is kept (F32,
//! F16, BF16), converted element by element through f32 when the dtype changes, copied row by row
//! when only llama.cpp's q/k row permutation applies, and decoded to f32 and encoded again only
//! when its values change (GGUF's one alpha folded into lora_b). Each of these gives the bytes the
//! decoding path gives (`read_*` into lora-core's `Adapter`, then `write_*`), which stays the
//! fallback: whatever the plan does not handle, and any input the readers would refuse (bad
//! headers, ranks that disagree, a NaN found while streaming), goes through it, so errors are the
//! readers' and writers' own. An output abandoned on the way is a temporary file, deleted.

use std::fmt;
use std::path::Path;

use indexmap::IndexMap;
use lora_core::{Adapter, AdapterConfig, DType, ModuleKind, Scalar, Scaling, TensorSource, WeightLayout};
use ndarray::{ArrayD, Ix2, IxDyn};
use rayon::prelude::*;

use crate::atomic::{self, AtomicFile};
use crate::error::{Error, Location, Result};
use crate::format::{detect_format, read_adapter_with, write_adapter_with, Format, ReadOptions, WriteOptions};
use crate::gguf::{self, gguf_name, module_name, GgufFile, GgufOptions, GgufValue};
use crate::kohya::{self, module_alpha, ModuleResolver};
use crate::model::check_adapter_against_model;
use crate::peft::{
    self, output_dtype_of, peft_config_from, peft_file_metadata, ModuleShape, PeftConfig, CONFIG_FILE, PEFT_PREFIX,
    WEIGHTS_FILE,
};
use crate::st::{self, first_nonfinite_raw, PlannedTensor, SafetensorsFile, SafetensorsWriter};

/// Options of [`convert_adapter`].
#[derive(Default)]
pub struct ConvertOptions<'a> {
    /// What reading needs: module paths for kohya names, the base config for GGUF head counts.
    pub read: ReadOptions,
    /// The stored dtype and the base config (GGUF architecture and head counts).
    pub write: WriteOptions,
    /// A base model every module is checked against (its `<module>.weight` exists, with the
    /// shape the module adapts), as [`check_adapter_against_model`] does.
    pub base: Option<&'a dyn TensorSource>,
}

impl fmt::Debug for ConvertOptions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConvertOptions")
            .field("read", &self.read)
            .field("write", &self.write)
            .field("base", &self.base.map(|_| "TensorSource"))
            .finish()
    }
}

/// What [`convert_adapter`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Converted {
    /// The input's format.
    pub from: Format,
    /// The output's format.
    pub to: Format,
    /// Modules written.
    pub modules: usize,
    /// True when the tensors were streamed from the input; false when the adapter was decoded
    /// whole and written again.
    pub streamed: bool,
}

/// Convert an adapter file or folder to `to` at `output` (a folder for PEFT, else a file):
/// streamed when it can be ([`convert_streaming`]), else read whole with [`read_adapter_with`],
/// checked against `options.base`, and written with [`write_adapter_with`]. Both give the same
/// bytes and the same errors.
pub fn convert_adapter(
    input: impl AsRef<Path>,
    output: impl AsRef<Path>,
    to: Format,
    options: &ConvertOptions<'_>,
) -> Result<Converted> {
    let (input, output) = (input.as_ref(), output.as_ref());
    if let Some(done) = convert_streaming(input, output, to, options)? {
        return Ok(done);
    }
    let adapter: Adapter<f32> = read_adapter_with(input, &options.read)?;
    if let Some(base) = options.base {
        check_adapter_against_model(&adapter, base, input)?;
    }
    let from = detect_format(input)?;
    write_adapter_with(&adapter, output, to, &options.write)?;
    Ok(Converted { from, to, modules: adapter.len(), streamed: false })
}

/// The streaming half of [`convert_adapter`]: `Ok(None)` when the input needs the decoding path
/// (a layout this path does not handle, or anything the readers or writers would refuse), and
/// then nothing is left at `output`; an error only when writing the output failed.
pub fn convert_streaming(
    input: impl AsRef<Path>,
    output: impl AsRef<Path>,
    to: Format,
    options: &ConvertOptions<'_>,
) -> Result<Option<Converted>> {
    let (input, output) = (input.as_ref(), output.as_ref());
    let Ok(from) = detect_format(input) else { return Ok(None) };
    let planned = match from {
        Format::Peft => plan_peft(input),
        Format::Kohya => plan_kohya(input, &options.read),
        Format::Gguf => plan_gguf(input, &options.read),
    };
    let Some((source, plan)) = planned else { return Ok(None) };
    if options.base.is_some_and(|base| !plan.fits(base)) {
        return Ok(None);
    }
    let written = match to {
        Format::Peft => write_peft(&plan, &source, output, options.write.dtype),
        Format::Kohya => write_kohya(&plan, &source, output, options.write.dtype),
        Format::Gguf => write_gguf(&plan, &source, output, &options.write),
    };
    match written {
        Ok(()) => Ok(Some(Converted { from, to, modules: plan.modules.len(), streamed: true })),
        Err(Stop::Decode) => Ok(None),
        Err(Stop::Failed(e)) => Err(e),
    }
}

/// Why a streamed conversion stopped.
enum Stop {
    /// The input needs the decoding path (which gives the error, if there is one).
    Decode,
    /// Writing failed.
    Failed(Error),
}

impl From<Error> for Stop {
    /// IO errors are real; any other error (an overflow on encoding, names that collide in the
    /// output) is left to the decoding path to report as it always has.
    fn from(e: Error) -> Self {
        match e {
            Error::Io { .. } => Stop::Failed(e),
            _ => Stop::Decode,
        }
    }
}

type Streamed = std::result::Result<(), Stop>;

/// The memory-mapped input.
enum Source {
    St(SafetensorsFile),
    Gguf(GgufFile),
}

impl Source {
    fn raw(&self, key: &str) -> Option<&[u8]> {
        match self {
            Source::St(f) => f.raw(key),
            Source::Gguf(g) => g.raw(key),
        }
    }

    fn release(&self, key: &str) {
        if let Source::St(f) = self {
            f.release(key);
        }
    }
}

/// A stored tensor of the input.
#[derive(Debug, Clone)]
struct Tensor {
    key: String,
    dtype: DType,
    shape: Vec<usize>,
    /// llama.cpp's q/k row permutation (with this many heads) to undo on reading.
    unpermute: Option<usize>,
}

#[derive(Debug)]
struct Module {
    name: String,
    kind: ModuleKind,
    alpha: f64,
    scaling: Scaling,
    a: Tensor,
    b: Tensor,
    magnitude: Option<Tensor>,
}

impl Module {
    fn shape(&self) -> ModuleShape<'_> {
        ModuleShape {
            name: &self.name,
            kind: self.kind,
            rank: self.a.shape[0],
            alpha: self.alpha,
            scaling: self.scaling,
            d_in: self.a.shape[1],
            d_out: self.b.shape[0],
        }
    }
}

/// An adapter as its headers describe it: the config the reader would build, and where each
/// tensor is.
#[derive(Debug)]
struct Plan {
    config: AdapterConfig,
    modules: Vec<Module>,
    /// Full tensors of modules_to_save: (name without the PEFT prefix, tensor).
    saved: Vec<(String, Tensor)>,
}

impl Plan {
    fn new(config: AdapterConfig, modules: Vec<Module>, saved: Vec<(String, Tensor)>) -> Option<Self> {
        // A module or saved tensor named twice would be replaced in the adapter: not streamed.
        let mut names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
        names.sort_unstable();
        let mut saved_names: Vec<&str> = saved.iter().map(|(n, _)| n.as_str()).collect();
        saved_names.sort_unstable();
        let unique = |v: &[&str]| v.windows(2).all(|w| w[0] != w[1]);
        (unique(&names) && unique(&saved_names)).then_some(Plan { config, modules, saved })
    }

    fn shapes(&self) -> Vec<ModuleShape<'_>> {
        self.modules.iter().map(Module::shape).collect()
    }

    /// [`check_adapter_against_model`]'s test.
    fn fits(&self, base: &dyn TensorSource) -> bool {
        self.modules.iter().all(|m| {
            let layout = match (m.kind, self.config.fan_in_fan_out) {
                (ModuleKind::Embedding, _) | (ModuleKind::Linear, true) => WeightLayout::InOut,
                (ModuleKind::Linear, false) => WeightLayout::OutIn,
            };
            let s = m.shape();
            base.tensor_info(&format!("{}.weight", m.name))
                .is_some_and(|info| info.shape == layout.shape(s.d_out, s.d_in))
        })
    }
}

/// A float tensor of a safetensors file with `dims` dimensions (any when `None`).
fn st_tensor(file: &SafetensorsFile, key: &str, dims: Option<usize>) -> Option<Tensor> {
    let dtype = file.dtype(key)?;
    let shape = file.shape(key)?.to_vec();
    dims.is_none_or(|d| shape.len() == d).then(|| Tensor { key: key.into(), dtype, shape, unpermute: None })
}

/// The LoRA factors' own checks (`LoraLayer::new`): rank and dimensions not zero, B's columns
/// the rank, alpha finite.
fn factors_ok(a: &Tensor, b: &Tensor, alpha: f64) -> bool {
    a.shape[0] > 0 && a.shape[1] > 0 && b.shape[0] > 0 && b.shape[1] == a.shape[0] && alpha.is_finite()
}

/// `read_peft`'s plan: the same grouping, rank and DoRA checks, without reading a value.
fn plan_peft(path: &Path) -> Option<(Source, Plan)> {
    let dir = peft::adapter_dir(path);
    let (config_path, weights_path) = (dir.join(CONFIG_FILE), dir.join(WEIGHTS_FILE));
    let config_text = std::fs::read_to_string(&config_path).ok()?;
    let pc = PeftConfig::parse(&config_path, &config_text).ok()?;
    if pc.peft_type != "LORA" || pc.r == 0 {
        return None;
    }
    let file = SafetensorsFile::open(&weights_path).ok()?;
    let peft::Grouped { modules: parts, saved: saved_keys } = peft::group_keys(&file, &weights_path, &pc).ok()?;
    let scaling = if pc.use_rslora { Scaling::RsLora } else { Scaling::Standard };
    let stored_dtype = parts.values().find_map(|p| p.a.as_ref().or(p.ea.as_ref())).and_then(|k| file.dtype(k));
    let config = peft::adapter_config(&pc, &file, &config_text, parts.keys(), stored_dtype);
    let mut modules = Vec::with_capacity(parts.len());
    for (name, p) in &parts {
        let (a_key, b_key, kind) = match (&p.a, &p.b, &p.ea, &p.eb) {
            (Some(a), Some(b), None, None) => (a, b, ModuleKind::Linear),
            (None, None, Some(a), Some(b)) => (a, b, ModuleKind::Embedding),
            _ => return None,
        };
        let a = st_tensor(&file, a_key, Some(2))?;
        let b = st_tensor(&file, b_key, Some(2))?;
        let alpha = pc.alpha_for(name).ok()?;
        if !factors_ok(&a, &b, alpha) || pc.rank_for(name).ok()? != a.shape[0] {
            return None;
        }
        let magnitude = match (kind, &p.m, pc.use_dora) {
            (ModuleKind::Embedding, None, _) | (ModuleKind::Linear, None, false) => None,
            (ModuleKind::Linear, Some(m_key), true) => {
                let m = st_tensor(&file, m_key, Some(1))?;
                if m.shape[0] != b.shape[0] {
                    return None;
                }
                Some(m)
            }
            _ => return None,
        };
        modules.push(Module { name: name.clone(), kind, alpha, scaling, a, b, magnitude });
    }
    let mut saved = Vec::with_capacity(saved_keys.len());
    for (key, name) in saved_keys {
        saved.push((name, st_tensor(&file, &key, None)?));
    }
    let plan = Plan::new(config, modules, saved)?;
    Some((Source::St(file), plan))
}

/// `read_kohya`'s plan: names resolved the same way, alphas read from their scalar tensors.
fn plan_kohya(path: &Path, options: &ReadOptions) -> Option<(Source, Plan)> {
    let resolver = match &options.modules {
        Some(m) => ModuleResolver::Modules(m.clone()),
        None => ModuleResolver::Embedded,
    };
    let file = SafetensorsFile::open(path).ok()?;
    let candidates = kohya::module_candidates(&file, &resolver).ok()?;
    let by_flat = kohya::by_flat(&candidates);
    let groups = kohya::groups(&file).ok()?;
    let mut modules = Vec::with_capacity(groups.len());
    let mut stored_dtype = None;
    for (base, g) in &groups {
        let (Some(down), Some(up)) = (&g.down, &g.up) else { return None };
        let name = kohya::resolve(path, down, base, &by_flat, &resolver).ok()?;
        if stored_dtype.is_none() {
            stored_dtype = file.dtype(down);
        }
        let a = st_tensor(&file, down, Some(2))?;
        let b = st_tensor(&file, up, Some(2))?;
        let alpha = match &g.alpha {
            None => a.shape[0] as f64,
            Some(k) => {
                let t = file.tensor_f64(k).ok()?;
                if t.len() != 1 {
                    return None;
                }
                t.iter().next().copied()?
            }
        };
        if !factors_ok(&a, &b, alpha) {
            return None;
        }
        modules.push(Module {
            name,
            kind: ModuleKind::Linear,
            alpha,
            scaling: Scaling::Standard,
            a,
            b,
            magnitude: None,
        });
    }
    let summary: Vec<(&str, usize, f64)> = modules.iter().map(|m| (m.name.as_str(), m.a.shape[0], m.alpha)).collect();
    let config = kohya::adapter_config(file.metadata(), &summary, stored_dtype);
    let plan = Plan::new(config, modules, Vec::new())?;
    Some((Source::St(file), plan))
}

/// `read_gguf`'s plan: lora_b's q/k rows un-permuted for the `llama` architecture.
fn plan_gguf(path: &Path, options: &ReadOptions) -> Option<(Source, Plan)> {
    let g = GgufFile::open(path).ok()?;
    let meta = g.metadata();
    let get_str = |k: &str| match meta.get(k) {
        Some(GgufValue::String(s)) => Some(s.as_str()),
        _ => None,
    };
    let number = |k: &str| match meta.get(k)? {
        GgufValue::Float(f) => Some(*f),
        GgufValue::Uint(u) => Some(*u as f64),
        GgufValue::Int(i) => Some(*i as f64),
        _ => None,
    };
    if get_str("general.type") != Some("adapter") || get_str("adapter.type") != Some("lora") {
        return None;
    }
    let arch = get_str("general.architecture")?.to_string();
    let alpha = number("adapter.lora.alpha")?;
    let from_file = |k: &str| number(&format!("{arch}.{k}")).map(|v| v as usize);
    let base_config = options.base_config.as_ref();
    let from_cfg = |k: &str| base_config.and_then(|c| c.get(k)).and_then(serde_json::Value::as_u64).map(|v| v as usize);
    let heads = from_file("attention.head_count").or_else(|| from_cfg("num_attention_heads"));
    let heads_kv = from_file("attention.head_count_kv").or_else(|| from_cfg("num_key_value_heads")).or(heads);

    let mut pairs: IndexMap<&str, (Option<&str>, Option<&str>)> = IndexMap::new();
    for name in g.tensors().keys() {
        if let Some(b) = name.strip_suffix(".weight.lora_a") {
            pairs.entry(b).or_default().0 = Some(name);
        } else if let Some(b) = name.strip_suffix(".weight.lora_b") {
            pairs.entry(b).or_default().1 = Some(name);
        } else {
            return None;
        }
    }
    let tensor = |key: &str| -> Option<Tensor> {
        let info = g.tensors().get(key)?;
        let dtype = g.dtype(key)?;
        (info.dims.len() == 2).then(|| Tensor { key: key.into(), dtype, shape: info.shape(), unpermute: None })
    };
    let mut modules = Vec::with_capacity(pairs.len());
    let mut stored = None;
    for (base, (a_key, b_key)) in &pairs {
        let (Some(a_key), Some(b_key)) = (a_key, b_key) else { return None };
        let name = module_name(base)?;
        stored = stored.or_else(|| g.dtype(a_key));
        let a = tensor(a_key)?;
        let mut b = tensor(b_key)?;
        if a.shape.contains(&0) || b.shape.contains(&0) || !factors_ok(&a, &b, alpha) {
            return None;
        }
        let qk_heads = if base.ends_with(".attn_q") {
            Some(heads)
        } else if base.ends_with(".attn_k") {
            Some(heads_kv)
        } else {
            None
        };
        if let (Some(h), "llama") = (qk_heads, arch.as_str()) {
            let h = h?;
            gguf::row_sources(b.shape[0], h, true)?;
            b.unpermute = Some(h);
        }
        modules.push(Module {
            name,
            kind: ModuleKind::Linear,
            alpha,
            scaling: Scaling::Standard,
            a,
            b,
            magnitude: None,
        });
    }
    let rank = modules.first().map_or(1, |m| m.a.shape[0]);
    let names = modules.iter().map(|m| m.name.clone()).collect();
    let config = gguf::adapter_config(rank, alpha, names, arch, heads, heads_kv, stored);
    let plan = Plan::new(config, modules, Vec::new())?;
    Some((Source::Gguf(g), plan))
}

/// True when no value of these stored bytes is NaN or infinite once decoded to f32 (the check
/// lora-core's constructors make on the decoded factors): the stored-bytes scan of
/// [`first_nonfinite_raw`], and for F64 also no finite value beyond f32's range.
fn all_finite(dtype: DType, bytes: &[u8]) -> bool {
    if dtype != DType::F64 {
        return first_nonfinite_raw(dtype, bytes).is_none();
    }
    bytes.par_chunks(1 << 18).all(|piece| {
        piece
            .chunks_exact(8)
            .fold(true, |ok, c| ok & (f64::from_le_bytes(c.try_into().unwrap_or_default()) as f32).is_finite())
    })
}

/// Where streamed tensors go: a safetensors writer, or a GGUF file.
trait Sink {
    /// The stored bytes as they are.
    fn raw(&mut self, name: &str, bytes: &[u8]) -> Result<()>;
    /// The stored rows in this order (`order[i]` is the stored row written i-th).
    fn rows(&mut self, name: &str, bytes: &[u8], order: &[usize]) -> Result<()>;
    /// The stored bytes of dtype `from`, converted element by element through f32.
    fn converted(&mut self, name: &str, from: DType, bytes: &[u8]) -> Result<()>;
    /// Values, encoded.
    fn values(&mut self, name: &str, values: &ArrayD<f32>) -> Result<()>;
}

impl Sink for SafetensorsWriter {
    fn raw(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.write_raw(name, bytes)
    }
    fn rows(&mut self, name: &str, bytes: &[u8], order: &[usize]) -> Result<()> {
        self.write_raw_rows(name, bytes, order)
    }
    fn converted(&mut self, name: &str, from: DType, bytes: &[u8]) -> Result<()> {
        self.write_converted(name, from, bytes)
    }
    fn values(&mut self, name: &str, values: &ArrayD<f32>) -> Result<()> {
        self.write(name, values)
    }
}

/// A GGUF file being written: tensors in the order of its header, each padded to the alignment.
struct GgufSink {
    file: AtomicFile,
    dtype: DType,
}

impl Sink for GgufSink {
    fn raw(&mut self, _name: &str, bytes: &[u8]) -> Result<()> {
        self.file.write_all(bytes)?;
        self.file.write_all(gguf::padding(bytes.len()))
    }
    fn rows(&mut self, _name: &str, bytes: &[u8], order: &[usize]) -> Result<()> {
        let row = bytes.len() / order.len().max(1);
        for &r in order {
            self.file.write_all(&bytes[r * row..(r + 1) * row])?;
        }
        self.file.write_all(gguf::padding(bytes.len()))
    }
    fn converted(&mut self, name: &str, from: DType, bytes: &[u8]) -> Result<()> {
        let (in_w, out_w) = (from.size(), self.dtype.size());
        let n = bytes.len() / in_w;
        let path = self.file.path().to_path_buf();
        let to = st::st_dtype(self.dtype);
        self.file.fill(n * out_w, out_w, |o, offset| {
            let start = offset / out_w * in_w;
            st::convert_bytes(from, &bytes[start..start + o.len() / out_w * in_w], self.dtype, o)
                .map_err(|e| st::encode_error(e, Location::tensor(&path, name), offset / out_w, &[n], to))
        })?;
        self.file.write_all(gguf::padding(n * out_w))
    }
    fn values(&mut self, name: &str, values: &ArrayD<f32>) -> Result<()> {
        let data = values.as_standard_layout();
        let values = data.as_slice().unwrap_or_default();
        let (to, width) = (st::st_dtype(self.dtype), self.dtype.size());
        let path = self.file.path().to_path_buf();
        self.file.fill(values.len() * width, width, |o, offset| {
            let start = offset / width;
            st::encode_into(to, &values[start..start + o.len() / width], o)
                .map_err(|e| st::encode_error(e, Location::tensor(&path, name), start, data.shape(), to))
        })?;
        self.file.write_all(gguf::padding(values.len() * width))
    }
}

/// Write one stored tensor to `sink` as `to`, as the decoding path would: copied when the dtype
/// is kept and no value changes, reordered by rows when only the q/k permutation applies,
/// converted when only the dtype changes, else decoded to f32, un-permuted, scaled by `scale`
/// (lora_b of GGUF), permuted for llama.cpp (`permute` heads) and encoded. A tensor with a NaN or
/// an infinity stops the stream: the decoding path reports it.
fn put(
    sink: &mut impl Sink,
    source: &Source,
    name: &str,
    t: &Tensor,
    to: DType,
    scale: Option<f64>,
    permute: Option<usize>,
) -> Streamed {
    let bytes = source.raw(&t.key).ok_or(Stop::Decode)?;
    if !all_finite(t.dtype, bytes) {
        return Err(Stop::Decode);
    }
    let rows = t.shape.first().copied().unwrap_or(1);
    let order_in = t.unpermute.map(|h| gguf::row_sources(rows, h, true).ok_or(Stop::Decode)).transpose()?;
    let order_out = permute.map(|h| gguf::row_sources(rows, h, false).ok_or(Stop::Decode)).transpose()?;
    let order = match (order_in, order_out) {
        (None, None) => None,
        (Some(o), None) | (None, Some(o)) => Some(o),
        // output row i is logical row out[i], stored at row in[out[i]]
        (Some(i), Some(o)) => Some(o.iter().map(|&r| i[r]).collect()),
    };
    let keep = t.dtype == to && to != DType::F64;
    match (keep, scale, order) {
        (true, None, None) => sink.raw(name, bytes)?,
        (true, None, Some(order)) => sink.rows(name, bytes, &order)?,
        (false, None, None) => sink.converted(name, t.dtype, bytes)?,
        _ => {
            let values = st::decode_to_f32(t.dtype, bytes);
            let mut v = ArrayD::from_shape_vec(IxDyn(&t.shape), values).map_err(|_| Stop::Decode)?;
            if t.unpermute.is_some() || scale.is_some() || permute.is_some() {
                let mut b = v.into_dimensionality::<Ix2>().map_err(|_| Stop::Decode)?;
                if let Some(h) = t.unpermute {
                    b = gguf::permute_rows(&b, h, true).ok_or(Stop::Decode)?;
                }
                if let Some(f) = scale {
                    b = &b * <f32 as Scalar>::from_f64(f);
                }
                if let Some(h) = permute {
                    b = gguf::permute_rows(&b, h, false).ok_or(Stop::Decode)?;
                }
                v = b.into_dyn();
            }
            sink.values(name, &v)?;
        }
    }
    source.release(&t.key);
    Ok(())
}

/// `write_peft`'s output for a plan.
fn write_peft(plan: &Plan, source: &Source, dir: &Path, asked: Option<DType>) -> Streamed {
    let cfg = &plan.config;
    let dtype = output_dtype_of(cfg, asked);
    let mut tensors: Vec<(String, &Tensor)> = Vec::new();
    for m in &plan.modules {
        let (a, b) = match m.kind {
            ModuleKind::Linear => ("lora_A.weight", "lora_B.weight"),
            ModuleKind::Embedding => ("lora_embedding_A", "lora_embedding_B"),
        };
        tensors.push((format!("{PEFT_PREFIX}{}.{a}", m.name), &m.a));
        tensors.push((format!("{PEFT_PREFIX}{}.{b}", m.name), &m.b));
        if let Some(mag) = &m.magnitude {
            tensors.push((format!("{PEFT_PREFIX}{}.lora_magnitude_vector", m.name), mag));
        }
    }
    for (name, t) in &plan.saved {
        tensors.push((format!("{PEFT_PREFIX}{name}"), t));
    }
    let created = !dir.exists();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let written = (|| -> Streamed {
        let planned = tensors.iter().map(|(n, t)| PlannedTensor::new(n.clone(), &t.shape, dtype)).collect();
        let mut w = SafetensorsWriter::create(dir.join(WEIGHTS_FILE), planned, &peft_file_metadata(cfg))?;
        for (n, t) in &tensors {
            put(&mut w, source, n, t, dtype, None, None)?;
        }
        w.finish()?;
        let config = peft_config_from(cfg, &plan.shapes()).to_json();
        Ok(atomic::write_file(&dir.join(CONFIG_FILE), config.as_bytes())?)
    })();
    if matches!(written, Err(Stop::Decode)) && created {
        // nothing was written in it; the decoding path makes it again
        let _ = std::fs::remove_dir(dir);
    }
    written
}

/// `write_kohya`'s output for a plan (default options but the dtype).
fn write_kohya(plan: &Plan, source: &Source, path: &Path, asked: Option<DType>) -> Streamed {
    let cfg = &plan.config;
    // What kohya cannot hold is refused by the decoding path's writer.
    if cfg.use_dora || cfg.fan_in_fan_out || !plan.saved.is_empty() {
        return Err(Stop::Decode);
    }
    if plan.modules.iter().any(|m| m.kind == ModuleKind::Embedding) {
        return Err(Stop::Decode);
    }
    let dtype = output_dtype_of(cfg, asked);
    let shapes = plan.shapes();
    let prefix = kohya::KohyaOptions::default().prefix;
    let (keys, mut w) = kohya::kohya_writer(path, cfg, &shapes, &prefix, dtype)?;
    for ((key, m), shape) in keys.iter().zip(&plan.modules).zip(&shapes) {
        put(&mut w, source, &format!("{key}.lora_down.weight"), &m.a, dtype, None, None)?;
        put(&mut w, source, &format!("{key}.lora_up.weight"), &m.b, dtype, None, None)?;
        w.write(&format!("{key}.alpha"), &ndarray::arr0(module_alpha(shape)))?;
    }
    Ok(w.finish()?)
}

/// `write_gguf`'s output for a plan, with [`write_adapter_with`]'s choice of options.
fn write_gguf(plan: &Plan, source: &Source, path: &Path, options: &WriteOptions) -> Streamed {
    let cfg = &plan.config;
    if cfg.use_dora || cfg.fan_in_fan_out || !plan.saved.is_empty() {
        return Err(Stop::Decode);
    }
    let gguf = match &options.base_config {
        Some(c) => GgufOptions::from_hf_config(c).ok(),
        None => GgufOptions::from_metadata(&cfg.metadata),
    }
    .ok_or(Stop::Decode)?;
    let (dtype, ggml_type, _) = gguf::stored_type(output_dtype_of(cfg, options.dtype));
    let alpha = gguf::file_alpha(cfg);
    let shapes = plan.shapes();
    let mut out = Vec::with_capacity(plan.modules.len());
    let mut infos = Vec::with_capacity(2 * plan.modules.len());
    for (m, shape) in plan.modules.iter().zip(&shapes) {
        if m.kind == ModuleKind::Embedding {
            return Err(Stop::Decode);
        }
        let base = gguf_name(&m.name).ok_or(Stop::Decode)?;
        let factor = gguf::b_factor(shape, alpha);
        if !factor.is_finite() {
            return Err(Stop::Decode);
        }
        let permute = gguf::permuted_heads(&base, &gguf);
        if permute.is_some_and(|h| gguf::row_sources(shape.d_out, h, false).is_none()) {
            return Err(Stop::Decode);
        }
        infos.push((format!("{base}.weight.lora_a"), shape.rank, shape.d_in));
        infos.push((format!("{base}.weight.lora_b"), shape.d_out, shape.rank));
        out.push((factor, permute));
    }
    let header = gguf::header(&gguf, alpha, &infos, ggml_type);
    let mut sink = GgufSink { file: AtomicFile::create(path)?, dtype };
    sink.file.write_all(&header)?;
    for ((m, (factor, permute)), names) in plan.modules.iter().zip(out).zip(infos.chunks(2)) {
        let scale = (factor != 1.0).then_some(factor);
        put(&mut sink, source, &names[0].0, &m.a, dtype, None, None)?;
        put(&mut sink, source, &names[1].0, &m.b, dtype, scale, permute)?;
    }
    Ok(sink.file.commit()?)
}
