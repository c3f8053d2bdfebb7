//! GGUF LoRA adapters for llama.cpp: write, and read back.
//!
//! What llama.cpp's `convert_lora_to_gguf.py` writes and `llama-adapter.cpp` loads: GGUF v3,
//! `general.type = "adapter"`, `general.architecture`, `adapter.type = "lora"`,
//! `adapter.lora.alpha` (f32), and per adapted base tensor two tensors named after the base GGUF
//! tensor: `blk.0.attn_q.weight.lora_a` (numpy shape (r, d_in), GGUF dims [d_in, r]) and
//! `.lora_b` ((d_out, r), dims [r, d_out]); GGUF stores dims in reverse of numpy order.
//!
//! llama.cpp uses one alpha per file and scale = alpha / r per tensor, so per-module alphas,
//! rank patterns and rsLoRA are folded into lora_b. For the `llama` architecture (Llama and
//! Mistral checkpoints) the converter permutes the rows of q and k for its rotary layout; the
//! same permutation is applied to the rows of lora_b (lora_a is unchanged), and undone on
//! reading. DoRA, embeddings and `modules_to_save` have no GGUF adapter form and are refused.

use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use indexmap::IndexMap;
use lora_core::{Adapter, AdapterConfig, AdapterModule, DType, LoraLayer, ModuleKind, Scalar, Scaling, TargetModules};
use memmap2::Mmap;
use ndarray::{Array2, ArrayD, IxDyn};
use serde_json::Value;

use crate::atomic::AtomicFile;
use crate::error::{Error, Location, Result};
use crate::peft::{dtype_label, module_shapes, output_dtype, ModuleShape, META_DTYPE};

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
const ALIGNMENT: u64 = 32;
const GGML_F32: u32 = 0;
const GGML_F16: u32 = 1;
const GGML_BF16: u32 = 30;

/// Adapter metadata keys that record what a GGUF file needs, so that a GGUF read back can be
/// written again without the base model's config.
pub const META_ARCH: &str = "lora_io.gguf.architecture";
/// See [`META_ARCH`].
pub const META_HEADS: &str = "lora_io.gguf.head_count";
/// See [`META_ARCH`].
pub const META_HEADS_KV: &str = "lora_io.gguf.head_count_kv";

/// What the GGUF writer needs to know about the base model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufOptions {
    /// llama.cpp's architecture name (`llama` for Llama and Mistral, `qwen2`).
    pub architecture: String,
    /// Attention heads (`num_attention_heads`).
    pub head_count: usize,
    /// Key/value heads (`num_key_value_heads`).
    pub head_count_kv: usize,
    /// F32, F16 or BF16; `None` keeps the dtype the adapter was read in (F32 when unknown).
    pub dtype: Option<DType>,
}

impl GgufOptions {
    /// From a Hugging Face `config.json`: `model_type` llama, mistral or qwen2.
    pub fn from_hf_config(config: &Value) -> std::result::Result<Self, String> {
        let model_type = config.get("model_type").and_then(Value::as_str).unwrap_or("");
        let architecture = match model_type {
            "llama" | "mistral" => "llama",
            "qwen2" => "qwen2",
            other => {
                return Err(format!(
                    "model_type {other:?} has no GGUF adapter mapping here (supported: llama, mistral, qwen2)"
                ))
            }
        };
        let head_count =
            config.get("num_attention_heads").and_then(Value::as_u64).ok_or("config.json has no num_attention_heads")?
                as usize;
        let head_count_kv =
            config.get("num_key_value_heads").and_then(Value::as_u64).map_or(head_count, |v| v as usize);
        Ok(GgufOptions { architecture: architecture.into(), head_count, head_count_kv, dtype: None })
    }

    /// From the metadata a GGUF reader left in an adapter.
    pub fn from_adapter<T: Scalar>(adapter: &Adapter<T>) -> Option<Self> {
        Self::from_metadata(&adapter.config().metadata)
    }

    /// From an adapter's metadata (see [`GgufOptions::from_adapter`]).
    pub(crate) fn from_metadata(m: &std::collections::BTreeMap<String, String>) -> Option<Self> {
        Some(GgufOptions {
            architecture: m.get(META_ARCH)?.clone(),
            head_count: m.get(META_HEADS)?.parse().ok()?,
            head_count_kv: m.get(META_HEADS_KV)?.parse().ok()?,
            dtype: None,
        })
    }

    fn permutes_qk(&self) -> bool {
        self.architecture == "llama"
    }
}

/// (module path within a layer, llama.cpp name within a block) of the Llama-family linears.
const LAYER_NAMES: [(&str, &str); 7] = [
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// The llama.cpp tensor name (without `.weight`) of a Llama-family module path.
pub fn gguf_name(module: &str) -> Option<String> {
    if module == "lm_head" {
        return Some("output".into());
    }
    let (layer, sub) = module.strip_prefix("model.layers.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, name) = LAYER_NAMES.iter().find(|(path, _)| *path == sub)?;
    Some(format!("blk.{layer}.{name}"))
}

/// The module path of a llama.cpp tensor name (without `.weight`); inverse of [`gguf_name`].
pub fn module_name(gguf: &str) -> Option<String> {
    if gguf == "output" {
        return Some("lm_head".into());
    }
    let (layer, sub) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (path, _) = LAYER_NAMES.iter().find(|(_, name)| *name == sub)?;
    Some(format!("model.layers.{layer}.{path}"))
}

/// llama.cpp's rotary permutation of the output rows of q (heads = n_head) and k (heads =
/// n_head_kv): within each head, rows [first half; second half] become interleaved pairs.
pub(crate) fn permute_rows<T: Scalar>(b: &ndarray::ArrayRef2<T>, heads: usize, inverse: bool) -> Option<Array2<T>> {
    let rows = b.nrows();
    if heads == 0 || rows % heads != 0 || (rows / heads) % 2 != 0 {
        return None;
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = Array2::zeros(b.raw_dim());
    for h in 0..heads {
        for t in 0..2 {
            for j in 0..half {
                let old = h * head_dim + t * half + j;
                let new = h * head_dim + j * 2 + t;
                let (src, dst) = if inverse { (new, old) } else { (old, new) };
                out.row_mut(dst).assign(&b.row(src));
            }
        }
    }
    Some(out)
}

/// A metadata value of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Any unsigned integer type.
    Uint(u64),
    /// Any signed integer type.
    Int(i64),
    /// f32 or f64.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
    fn as_f64(&self) -> Option<f64> {
        match self {
            GgufValue::Float(f) => Some(*f),
            GgufValue::Uint(u) => Some(*u as f64),
            GgufValue::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
}

/// One tensor of a GGUF file: dims in GGUF order (reversed numpy order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// Dims as GGUF stores them (`ne`): the fastest-varying first.
    pub dims: Vec<u64>,
    /// The ggml type id (0 F32, 1 F16, 30 BF16).
    pub ggml_type: u32,
    offset: u64,
}

impl GgufTensorInfo {
    /// The shape in numpy (row-major) order.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A GGUF file opened for reading: header parsed with bounds checks, data memory-mapped.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    metadata: IndexMap<String, GgufValue>,
    tensors: IndexMap<String, GgufTensorInfo>,
    data_start: usize,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            Error::header(
                Location::file(self.path),
                format!("{what} at byte {} runs past the end of the file ({} bytes)", self.pos, self.buf.len()),
            )
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let n = usize::try_from(n).ok().filter(|&n| n <= self.buf.len()).ok_or_else(|| {
            Error::header(Location::file(self.path), format!("{what}: string length {n} is larger than the file"))
        })?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::header(Location::file(self.path), format!("{what} is not utf-8")))
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::Uint(u64::from(self.take(1, key)?[0])),
            1 => GgufValue::Int(i64::from(self.take(1, key)?[0] as i8)),
            2 => GgufValue::Uint(u64::from(u16::from_le_bytes(self.take(2, key)?.try_into().expect("2")))),
            3 => GgufValue::Int(i64::from(i16::from_le_bytes(self.take(2, key)?.try_into().expect("2")))),
            4 => GgufValue::Uint(u64::from(self.u32(key)?)),
            5 => GgufValue::Int(i64::from(self.u32(key)? as i32)),
            6 => GgufValue::Float(f64::from(f32::from_bits(self.u32(key)?))),
            7 => GgufValue::Bool(self.take(1, key)?[0] != 0),
            8 => GgufValue::String(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(Error::header(Location::tensor(self.path, key), "arrays nested too deep"));
                }
                let ety = self.u32(key)?;
                let n = self.u64(key)?;
                if n > (self.buf.len() - self.pos) as u64 {
                    return Err(Error::header(
                        Location::tensor(self.path, key),
                        format!("array of {n} items is longer than the rest of the file"),
                    ));
                }
                // Reserve no more items than the rest of the file can hold (each takes at least
                // one byte), so a hostile count cannot make this allocate beyond the input.
                let rest = (self.buf.len() - self.pos) as u64 / min_value_size(ety);
                let mut items = Vec::with_capacity(n.min(rest) as usize);
                for _ in 0..n {
                    items.push(self.value(ety, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::Uint(self.u64(key)?),
            11 => GgufValue::Int(self.u64(key)? as i64),
            12 => GgufValue::Float(f64::from_bits(self.u64(key)?)),
            other => {
                return Err(Error::header(
                    Location::tensor(self.path, key),
                    format!("unknown metadata value type {other}"),
                ))
            }
        })
    }
}

/// The fewest bytes a metadata value of type `ty` takes in the file.
fn min_value_size(ty: u32) -> u64 {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        // a string's length, an array's type and length
        8 => 8,
        9 => 12,
        _ => 8,
    }
}

impl GgufFile {
    /// Open and validate a GGUF v2 or v3 file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let map = map_file(&file).map_err(|e| Error::io(path, e))?;
        let mut c = Cursor { buf: &map, pos: 0, path };
        if c.take(4, "magic")? != MAGIC {
            return Err(Error::header(Location::file(path), "not a GGUF file (magic is not GGUF)"));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::header(
                Location::file(path),
                format!("GGUF version {version} is not supported (2 or 3)"),
            ));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        let limit = map.len() as u64 / 8;
        if n_tensors > limit || n_kv > limit {
            return Err(Error::header(
                Location::file(path),
                format!("{n_tensors} tensors and {n_kv} metadata entries cannot fit in {} bytes", map.len()),
            ));
        }
        let mut metadata = IndexMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            Some(GgufValue::Uint(a)) if *a > 0 && a.is_power_of_two() => *a,
            None => ALIGNMENT,
            Some(other) => {
                return Err(Error::header(
                    Location::tensor(path, "general.alignment"),
                    format!("invalid alignment {other:?}"),
                ))
            }
        };
        let mut tensors = IndexMap::new();
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32(&name)?;
            if n_dims > 4 {
                return Err(Error::header(Location::tensor(path, &name), format!("{n_dims} dims (at most 4)")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)?);
            }
            let ggml_type = c.u32(&name)?;
            let offset = c.u64(&name)?;
            if tensors.insert(name.clone(), GgufTensorInfo { dims, ggml_type, offset }).is_some() {
                return Err(Error::header(Location::tensor(path, &name), "tensor name appears twice"));
            }
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let data_len = (map.len() as u64).saturating_sub(data_start);
        for (name, t) in &tensors {
            let at = || Location::tensor(path, name);
            let elems = t.dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let size = match (elems, t.ggml_type) {
                (Some(n), GGML_F32) => n.checked_mul(4),
                (Some(n), GGML_F16 | GGML_BF16) => n.checked_mul(2),
                (Some(_), other) => {
                    return Err(Error::UnsupportedDType { at: at(), dtype: format!("ggml type {other}") });
                }
                (None, _) => None,
            }
            .ok_or_else(|| Error::header(at(), format!("dims {:?} overflow", t.dims)))?;
            // The padding after the header can run past the end of a file that holds only
            // tensors of no values; their data would start outside the map.
            if data_start > map.len() as u64 {
                return Err(Error::header(
                    at(),
                    format!(
                        "tensor data would start at byte {data_start}, past the end of the file ({} bytes)",
                        map.len()
                    ),
                ));
            }
            if t.offset % alignment != 0 {
                return Err(Error::header(at(), format!("data offset {} is not aligned to {alignment}", t.offset)));
            }
            if t.offset.checked_add(size).is_none_or(|end| end > data_len) {
                return Err(Error::header(
                    at(),
                    format!("data {}..+{size} runs past the end of the data ({data_len} bytes)", t.offset),
                ));
            }
        }
        Ok(GgufFile { path: path.to_path_buf(), map, metadata, tensors, data_start: data_start as usize })
    }

    /// The metadata, in file order.
    pub fn metadata(&self) -> &IndexMap<String, GgufValue> {
        &self.metadata
    }

    /// The tensors, in file order.
    pub fn tensors(&self) -> &IndexMap<String, GgufTensorInfo> {
        &self.tensors
    }

    /// Decode a tensor to f32, in numpy order (dims reversed).
    pub fn tensor_f32(&self, name: &str) -> Result<ArrayD<f32>> {
        let t =
            self.tensors.get(name).ok_or_else(|| Error::TensorNotFound { at: Location::tensor(&self.path, name) })?;
        let n: usize = t.dims.iter().map(|&d| d as usize).product();
        let width = if t.ggml_type == GGML_F32 { 4 } else { 2 };
        // `open` checked that the data lies in the file; `get` keeps a bad header an error here too.
        let start = self.data_start + t.offset as usize;
        let bytes = self.map.get(start..start + width * n).ok_or_else(|| {
            Error::header(Location::tensor(&self.path, name), "tensor data runs past the end of the file")
        })?;
        let values: Vec<f32> = match t.ggml_type {
            GGML_F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect(),
            GGML_F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            _ => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        };
        ArrayD::from_shape_vec(IxDyn(&t.shape()), values)
            .map_err(|_| Error::header(Location::tensor(&self.path, name), "bad shape"))
    }

    /// The stored bytes of a tensor (`open` checked that they lie in the file).
    pub(crate) fn raw(&self, name: &str) -> Option<&[u8]> {
        let t = self.tensors.get(name)?;
        let n = t.dims.iter().try_fold(1usize, |a, &d| a.checked_mul(usize::try_from(d).ok()?))?;
        let width = if t.ggml_type == GGML_F32 { 4 } else { 2 };
        let start = self.data_start.checked_add(usize::try_from(t.offset).ok()?)?;
        self.map.get(start..start.checked_add(width * n)?)
    }

    pub(crate) fn dtype(&self, name: &str) -> Option<DType> {
        match self.tensors.get(name)?.ggml_type {
            GGML_F32 => Some(DType::F32),
            GGML_F16 => Some(DType::F16),
            GGML_BF16 => Some(DType::BF16),
            _ => None,
        }
    }
}

#[allow(unsafe_code)]
fn map_file(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: read-only map; see the note in st.rs. Writers of this crate never modify files in
    // place.
    unsafe { Mmap::map(file) }
}

/// Read a GGUF LoRA adapter back. Module paths are the Hugging Face Llama-family paths; lora_b
/// rows are un-permuted for the `llama` architecture, with head counts from the file (this
/// crate's writer records them, as llama.cpp's converter does) or from `base_config`.
pub fn read_gguf<T: Scalar>(path: impl AsRef<Path>, base_config: Option<&Value>) -> Result<Adapter<T>> {
    let path = path.as_ref();
    let g = GgufFile::open(path)?;
    let meta = g.metadata();
    let get_str = |k: &str| meta.get(k).and_then(GgufValue::as_str);
    if get_str("general.type") != Some("adapter") || get_str("adapter.type") != Some("lora") {
        return Err(Error::unsupported(
            Location::file(path),
            "not a GGUF LoRA adapter (general.type must be adapter and adapter.type lora)",
        ));
    }
    let arch = get_str("general.architecture")
        .ok_or_else(|| Error::config(Location::tensor(path, "general.architecture"), "missing"))?
        .to_string();
    let alpha = meta
        .get("adapter.lora.alpha")
        .and_then(GgufValue::as_f64)
        .ok_or_else(|| Error::config(Location::tensor(path, "adapter.lora.alpha"), "missing or not a number"))?;
    let from_file = |k: &str| meta.get(&format!("{arch}.{k}")).and_then(GgufValue::as_f64).map(|v| v as usize);
    let from_cfg = |k: &str| base_config.and_then(|c| c.get(k)).and_then(Value::as_u64).map(|v| v as usize);
    let heads = from_file("attention.head_count").or_else(|| from_cfg("num_attention_heads"));
    let heads_kv = from_file("attention.head_count_kv").or_else(|| from_cfg("num_key_value_heads")).or(heads);

    let mut pairs: IndexMap<String, (Option<String>, Option<String>)> = IndexMap::new();
    for name in g.tensors().keys() {
        let (base, is_a) = if let Some(b) = name.strip_suffix(".weight.lora_a") {
            (b, true)
        } else if let Some(b) = name.strip_suffix(".weight.lora_b") {
            (b, false)
        } else {
            return Err(Error::UnknownTensor {
                at: Location::tensor(path, name),
                hint: "expected <base tensor>.weight.lora_a or .weight.lora_b".into(),
            });
        };
        let e = pairs.entry(base.to_string()).or_default();
        if is_a {
            e.0 = Some(name.clone());
        } else {
            e.1 = Some(name.clone());
        }
    }
    let mut modules = Vec::new();
    let mut stored = None;
    for (base, (a_key, b_key)) in &pairs {
        let (a_key, b_key) = match (a_key, b_key) {
            (Some(a), Some(b)) => (a, b),
            (Some(a), None) => {
                return Err(Error::MissingPair { at: Location::tensor(path, a), missing: "lora_b".into() })
            }
            (None, Some(b)) => {
                return Err(Error::MissingPair { at: Location::tensor(path, b), missing: "lora_a".into() })
            }
            (None, None) => unreachable!("an entry is made with one of them"),
        };
        let module = module_name(base).ok_or_else(|| Error::UnknownTensor {
            at: Location::tensor(path, a_key),
            hint: "not a Llama-family tensor name (blk.N.attn_q ... ffn_down, output)".into(),
        })?;
        stored = stored.or_else(|| g.dtype(a_key));
        let to2 = |k: &str| -> Result<Array2<T>> {
            g.tensor_f32(k)?.mapv(|v| T::from_f64(f64::from(v))).into_dimensionality().map_err(|_| Error::Shape {
                at: Location::tensor(path, k),
                expected: "[_, _]".into(),
                got: g.tensors()[k].shape(),
            })
        };
        let a = to2(a_key)?;
        let mut b = to2(b_key)?;
        // A factor with no values can claim any length for its other dimension; refuse it before
        // the row permutation below walks that length.
        for (key, what, t) in [(a_key, "lora_a", &a), (b_key, "lora_b", &b)] {
            if t.is_empty() {
                return Err(Error::core(
                    Location::tensor(path, key),
                    lora_core::Error::EmptyDimension { what: what.into(), shape: t.shape().to_vec() },
                ));
            }
        }
        if b.ncols() != a.nrows() {
            return Err(Error::RankMismatch {
                at: Location::tensor(path, b_key),
                got: b.ncols(),
                expected: a.nrows(),
                what: a_key.clone(),
            });
        }
        let qk_heads = if base.ends_with(".attn_q") {
            Some(heads)
        } else if base.ends_with(".attn_k") {
            Some(heads_kv)
        } else {
            None
        };
        if let (Some(h), "llama") = (qk_heads, arch.as_str()) {
            let h = h.ok_or_else(|| {
                Error::config(
                    Location::tensor(path, b_key),
                    format!("{arch}.attention.head_count is not in the file: pass the base model's config.json"),
                )
            })?;
            b = permute_rows(&b, h, true).ok_or_else(|| Error::Shape {
                at: Location::tensor(path, b_key),
                expected: format!("rows divisible by 2 x {h} heads"),
                got: b.shape().to_vec(),
            })?;
        }
        let layer = LoraLayer::new(a, b, alpha, Scaling::Standard)
            .map_err(|e| Error::core(Location::tensor(path, a_key), e))?;
        modules.push((module, layer));
    }
    let rank = modules.first().map_or(1, |(_, l): &(String, LoraLayer<T>)| l.rank());
    let names: Vec<String> = modules.iter().map(|(m, _)| m.clone()).collect();
    let mut adapter = Adapter::new(adapter_config(rank, alpha, names, arch, heads, heads_kv, stored));
    for (m, layer) in modules {
        adapter
            .insert(m.clone(), AdapterModule::linear(layer))
            .map_err(|e| Error::core(Location::tensor(path, &m), e))?;
    }
    Ok(adapter)
}

/// The adapter config `read_gguf` gives a file.
pub(crate) fn adapter_config(
    rank: usize,
    alpha: f64,
    modules: Vec<String>,
    arch: String,
    heads: Option<usize>,
    heads_kv: Option<usize>,
    stored: Option<DType>,
) -> AdapterConfig {
    let mut config = AdapterConfig::new(rank, alpha, TargetModules::List(modules));
    let metadata = &mut config.metadata;
    metadata.insert(META_ARCH.to_string(), arch);
    if let (Some(h), Some(hk)) = (heads, heads_kv) {
        metadata.insert(META_HEADS.to_string(), h.to_string());
        metadata.insert(META_HEADS_KV.to_string(), hk.to_string());
    }
    if let Some(d) = stored {
        metadata.insert(META_DTYPE.to_string(), dtype_label(d).to_string());
    }
    config
}

/// The source row of every row of [`permute_rows`]'s output (`None` where it refuses).
pub(crate) fn row_sources(rows: usize, heads: usize, inverse: bool) -> Option<Vec<usize>> {
    if heads == 0 || rows % heads != 0 || (rows / heads) % 2 != 0 {
        return None;
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0; rows];
    for h in 0..heads {
        for t in 0..2 {
            for j in 0..half {
                let old = h * head_dim + t * half + j;
                let new = h * head_dim + j * 2 + t;
                let (src, dst) = if inverse { (new, old) } else { (old, new) };
                out[dst] = src;
            }
        }
    }
    Some(out)
}

/// The head count whose rotary permutation the rows of this base tensor's lora_b get (q and k
/// of the `llama` architecture), if any.
pub(crate) fn permuted_heads(base: &str, options: &GgufOptions) -> Option<usize> {
    let heads = if base.ends_with(".attn_q") {
        Some(options.head_count)
    } else if base.ends_with(".attn_k") {
        Some(options.head_count_kv)
    } else {
        None
    };
    heads.filter(|_| options.permutes_qk())
}

/// The stored dtype of a GGUF file: F32, F16 or BF16 (F64 is written as F32), its ggml type
/// and its width.
pub(crate) fn stored_type(dtype: DType) -> (DType, u32, u64) {
    match dtype {
        DType::F16 => (DType::F16, GGML_F16, 2),
        DType::BF16 => (DType::BF16, GGML_BF16, 2),
        _ => (DType::F32, GGML_F32, 4),
    }
}

/// The one alpha of a GGUF file written for this config: the default module's scale in
/// alpha / r terms (the rank when that is not a positive number).
pub(crate) fn file_alpha(cfg: &AdapterConfig) -> f64 {
    let alpha = Scaling::Standard.alpha_for_scale(cfg.scaling.scale(cfg.alpha, cfg.rank), cfg.rank);
    if alpha.is_finite() && alpha > 0.0 {
        alpha
    } else {
        cfg.rank as f64
    }
}

/// The factor folded into a module's lora_b: s_module r / alpha_file.
pub(crate) fn b_factor(m: &ModuleShape<'_>, alpha: f64) -> f64 {
    m.scale() / Scaling::Standard.scale(alpha, m.rank)
}

/// The header of a GGUF adapter file, padded to the alignment: metadata and tensor infos for
/// tensors of (name, rows, cols), each padded to the alignment in the data.
pub(crate) fn header(options: &GgufOptions, alpha: f64, tensors: &[(String, usize, usize)], ggml_type: u32) -> Vec<u8> {
    let elem: u64 = if ggml_type == GGML_F32 { 4 } else { 2 };
    let arch = options.architecture.as_str();
    let mut header = Vec::new();
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    let kvs: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), GgufValue::String(arch.into())),
        ("general.type".into(), GgufValue::String("adapter".into())),
        ("adapter.type".into(), GgufValue::String("lora".into())),
        ("adapter.lora.alpha".into(), GgufValue::Float(alpha)),
        (format!("{arch}.attention.head_count"), GgufValue::Uint(options.head_count as u64)),
        (format!("{arch}.attention.head_count_kv"), GgufValue::Uint(options.head_count_kv as u64)),
    ];
    header.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, v) in &kvs {
        put_string(&mut header, k);
        match v {
            GgufValue::String(s) => {
                header.extend_from_slice(&8u32.to_le_bytes());
                put_string(&mut header, s);
            }
            GgufValue::Float(f) => {
                header.extend_from_slice(&6u32.to_le_bytes());
                header.extend_from_slice(&(*f as f32).to_le_bytes());
            }
            GgufValue::Uint(u) => {
                header.extend_from_slice(&4u32.to_le_bytes());
                header.extend_from_slice(&(*u as u32).to_le_bytes());
            }
            _ => unreachable!("only the kinds above are written"),
        }
    }
    let mut offset = 0u64;
    for (name, rows, cols) in tensors {
        put_string(&mut header, name);
        header.extend_from_slice(&2u32.to_le_bytes());
        // GGUF dims are numpy's reversed: (rows, cols) is stored as [cols, rows].
        header.extend_from_slice(&(*cols as u64).to_le_bytes());
        header.extend_from_slice(&(*rows as u64).to_le_bytes());
        header.extend_from_slice(&ggml_type.to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offset += ((rows * cols) as u64 * elem).div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    pad(&mut header);
    header
}

/// The zero bytes that follow `len` bytes of tensor data up to the alignment.
pub(crate) fn padding(len: usize) -> &'static [u8] {
    &[0u8; ALIGNMENT as usize][..len.next_multiple_of(ALIGNMENT as usize) - len]
}

struct OutTensor<'a, T> {
    name: String,
    data: ndarray::CowArray<'a, T, ndarray::Ix2>,
}

/// Write an adapter as a llama.cpp GGUF LoRA file, atomically.
///
/// Every module's scale is folded into lora_b against one file alpha (the default module's
/// alpha in alpha / r terms), so rank patterns, alpha patterns and rsLoRA give the same deltas
/// in llama.cpp. DoRA, embedding modules and `modules_to_save` are refused.
pub fn write_gguf<T: Scalar>(adapter: &Adapter<T>, path: impl AsRef<Path>, options: &GgufOptions) -> Result<()> {
    let path = path.as_ref();
    let cfg = adapter.config();
    if cfg.use_dora {
        let m = adapter.modules().keys().next().map(String::as_str).unwrap_or("");
        return Err(Error::unsupported(
            Location::tensor(path, m),
            "GGUF adapters cannot hold DoRA magnitude vectors (llama.cpp applies plain LoRA); merge the adapter instead",
        ));
    }
    if let Some(name) = adapter.saved_tensors().keys().next() {
        return Err(Error::unsupported(
            Location::tensor(path, name),
            "GGUF adapters cannot hold full tensors of modules_to_save",
        ));
    }
    if cfg.fan_in_fan_out {
        return Err(Error::unsupported(
            Location::file(path),
            "GGUF adapters are for Llama-family models; fan_in_fan_out is GPT-2's",
        ));
    }
    let (dtype, ggml_type, elem) = stored_type(output_dtype(adapter, options.dtype));
    let alpha = file_alpha(cfg);
    let mut out: Vec<OutTensor<'_, T>> = Vec::new();
    for ((name, m), shape) in adapter.modules().iter().zip(module_shapes(adapter)) {
        if m.kind() == ModuleKind::Embedding {
            return Err(Error::unsupported(Location::tensor(path, name), "GGUF adapters cannot hold embedding LoRA"));
        }
        let base = gguf_name(name).ok_or_else(|| Error::UnknownModule {
            at: Location::tensor(path, name),
            module: format!("{name} (no llama.cpp tensor name for it)"),
        })?;
        // llama.cpp's scale is alpha_file / r: fold s_module r / alpha_file into lora_b.
        let layer = m.layer();
        let factor = b_factor(&shape, alpha);
        if !factor.is_finite() {
            return Err(Error::core(Location::tensor(path, name), lora_core::Error::NonFiniteFactor { factor }));
        }
        let mut b = if factor == 1.0 {
            ndarray::CowArray::from(layer.b().view())
        } else {
            ndarray::CowArray::from(layer.b() * T::from_f64(factor))
        };
        if let Some(h) = permuted_heads(&base, options) {
            let permuted = permute_rows(&b, h, false).ok_or_else(|| Error::Shape {
                at: Location::tensor(path, name),
                expected: format!("lora_B rows divisible by 2 x {h} heads"),
                got: b.shape().to_vec(),
            })?;
            b = ndarray::CowArray::from(permuted);
        }
        out.push(OutTensor { name: format!("{base}.weight.lora_a"), data: ndarray::CowArray::from(layer.a().view()) });
        out.push(OutTensor { name: format!("{base}.weight.lora_b"), data: b });
    }

    let infos: Vec<(String, usize, usize)> =
        out.iter().map(|t| (t.name.clone(), t.data.nrows(), t.data.ncols())).collect();
    let header = header(options, alpha, &infos, ggml_type);
    let mut f = AtomicFile::create(path)?;
    f.write_all(&header)?;
    let (st_type, width) = (crate::st::st_dtype(dtype), elem as usize);
    for t in &out {
        let data = t.data.as_standard_layout();
        let values = data.as_slice().expect("standard layout is contiguous");
        f.fill(values.len() * width, width, |o, offset| {
            let start = offset / width;
            crate::st::encode_into(st_type, &values[start..start + o.len() / width], o).map_err(|e| {
                crate::st::encode_error(e, Location::tensor(path, &t.name), start, t.data.shape(), st_type)
            })
        })?;
        f.write_all(padding(values.len() * width))?;
    }
    f.commit()
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn pad(buf: &mut Vec<u8>) {
    while buf.len() as u64 % ALIGNMENT != 0 {
        buf.push(0);
    }
}
