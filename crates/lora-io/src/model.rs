//! Hugging Face model folders: `config.json` and `model.safetensors`, or sharded
//! `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use lora_core::{DType, Stored, TensorInfo, TensorSource};
use ndarray::ArrayD;
use serde_json::Value;

use crate::atomic;
use crate::error::{Error, Location, Result};
use crate::st::{PlannedTensor, SafetensorsFile, SafetensorsWriter};

/// The single-file weights of a model folder.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded model folder.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// A model folder opened for reading: every shard memory-mapped, nothing decoded until read.
#[derive(Debug)]
pub struct ModelFolder {
    dir: PathBuf,
    config: Option<Value>,
    index: Option<Value>,
    shards: Vec<(String, SafetensorsFile)>,
    tensors: IndexMap<String, usize>,
}

impl ModelFolder {
    /// Open a model folder. `config.json` is read when present; the weights are
    /// `model.safetensors.index.json` and its shards, else `model.safetensors`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("config.json");
        let config = if config_path.exists() { Some(read_json(&config_path)?) } else { None };
        let index_path = dir.join(INDEX_FILE);
        let (index, shard_names, weight_map) = if index_path.exists() {
            let index = read_json(&index_path)?;
            let map = index.get("weight_map").and_then(Value::as_object).ok_or_else(|| {
                Error::config(Location::tensor(&index_path, "weight_map"), "missing or not an object")
            })?;
            let mut names: BTreeSet<String> = BTreeSet::new();
            let mut weight_map = BTreeMap::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::config(Location::tensor(&index_path, tensor), "weight_map value is not a file name")
                })?;
                if file.contains('/') || file.contains('\\') || file == ".." {
                    return Err(Error::config(
                        Location::tensor(&index_path, tensor),
                        format!("shard name {file:?} points outside the folder"),
                    ));
                }
                names.insert(file.to_string());
                weight_map.insert(tensor.clone(), file.to_string());
            }
            let names: Vec<String> = names.into_iter().collect();
            // Check that every shard is there before mapping any, so that an index listing
            // thousands of absent shards fails at once, naming how many are missing.
            let missing: Vec<&String> = names.iter().filter(|n| !dir.join(n).is_file()).collect();
            if let Some(first) = missing.first() {
                return Err(Error::config(
                    Location::file(&index_path),
                    format!(
                        "the index lists {} shards and {} of them are not in the folder (first: {first})",
                        names.len(),
                        missing.len()
                    ),
                ));
            }
            (Some(index), names, Some(weight_map))
        } else if dir.join(SINGLE_FILE).exists() {
            (None, vec![SINGLE_FILE.to_string()], None)
        } else {
            return Err(Error::io(
                &dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("neither {SINGLE_FILE} nor {INDEX_FILE} is in the folder"),
                ),
            ));
        };
        let mut shards = Vec::with_capacity(shard_names.len());
        let mut tensors = IndexMap::new();
        for (i, name) in shard_names.into_iter().enumerate() {
            let file = SafetensorsFile::open(dir.join(&name))?;
            for t in file.names() {
                if tensors.insert(t.to_string(), i).is_some() {
                    return Err(Error::config(
                        Location::tensor(dir.join(&name), t),
                        "tensor appears in more than one shard",
                    ));
                }
            }
            shards.push((name, file));
        }
        if let Some(map) = weight_map {
            for (tensor, file) in map {
                let found = tensors.get(&tensor).map(|&i| shards[i].0.as_str());
                if found != Some(file.as_str()) {
                    return Err(Error::TensorNotFound { at: Location::tensor(dir.join(&file), tensor) });
                }
            }
        }
        Ok(ModelFolder { dir, config, index, shards, tensors })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `config.json`, when the folder has one.
    pub fn config(&self) -> Option<&Value> {
        self.config.as_ref()
    }

    /// True when the weights are sharded with an index.
    pub fn is_sharded(&self) -> bool {
        self.index.is_some()
    }

    /// The weight files, by file name, in order.
    pub fn shards(&self) -> impl Iterator<Item = (&str, &SafetensorsFile)> {
        self.shards.iter().map(|(n, f)| (n.as_str(), f))
    }

    /// The file holding a tensor.
    pub fn file_of(&self, tensor: &str) -> Option<&SafetensorsFile> {
        self.tensors.get(tensor).map(|&i| &self.shards[i].1)
    }

    /// Every tensor name (of any dtype), shard by shard.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Total bytes of tensor data over all shards.
    pub fn data_len(&self) -> usize {
        self.shards.iter().map(|(_, f)| f.data_len()).sum()
    }

    fn file(&self, name: &str) -> Result<&SafetensorsFile> {
        self.file_of(name).ok_or_else(|| Error::TensorNotFound { at: Location::tensor(&self.dir, name) })
    }
}

impl TensorSource for ModelFolder {
    fn tensor_names(&self) -> Vec<String> {
        self.shards.iter().flat_map(|(_, f)| f.tensor_names()).collect()
    }

    fn tensor_info(&self, name: &str) -> Option<TensorInfo> {
        self.file_of(name)?.tensor_info(name)
    }

    fn read_f32(&self, name: &str) -> lora_core::Result<ArrayD<f32>> {
        Ok(self.file(name)?.tensor_f32(name)?)
    }

    fn read_f64(&self, name: &str) -> lora_core::Result<ArrayD<f64>> {
        Ok(self.file(name)?.tensor_f64(name)?)
    }

    fn stored(&self, name: &str) -> Option<Stored<'_>> {
        self.file_of(name)?.stored(name)
    }

    fn release(&self, name: &str) {
        if let Some(file) = self.file_of(name) {
            file.release(name);
        }
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&text).map_err(|source| Error::Json { at: Location::file(path), source })
}

/// Options of [`write_model`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelWriteOptions {
    /// Store every float tensor in this dtype; `None` keeps each tensor's dtype.
    pub dtype: Option<DType>,
}

/// Write a model folder shaped like `template`: the same shard files, tensor order, index (with
/// `total_size` updated) and every other file of the folder (config, tokenizer, generation
/// config) copied. `replace` is asked once per float tensor, in file order: `Some(t)` writes `t`
/// (same shape) instead of the template's tensor, `None` copies it (raw, without decoding, when
/// the dtype is kept). Every file is written atomically; the output folder must differ from the
/// template's.
pub fn write_model(
    template: &ModelFolder,
    out_dir: impl AsRef<Path>,
    options: &ModelWriteOptions,
    mut replace: impl FnMut(&str) -> Result<Option<ArrayD<f32>>>,
) -> Result<()> {
    let out = out_dir.as_ref();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let same = match (out.canonicalize(), template.dir.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(Error::unsupported(Location::file(out), "the output folder is the input folder"));
    }
    let mut total = 0usize;
    for (file_name, file) in &template.shards {
        let path = out.join(file_name);
        let plan: Vec<PlannedTensor> = file
            .names()
            .map(|n| match (file.dtype(n), options.dtype) {
                (Some(_), Some(d)) => PlannedTensor::new(n, file.shape(n).expect("listed"), d),
                _ => PlannedTensor::like(file, n).expect("listed"),
            })
            .collect();
        let mut w = SafetensorsWriter::create(&path, plan, file.metadata())?;
        for name in file.names() {
            let stored = file.dtype(name);
            let replacement = if stored.is_some() { replace(name)? } else { None };
            match replacement {
                Some(t) => {
                    if t.shape() != file.shape(name).expect("listed") {
                        return Err(Error::Shape {
                            at: Location::tensor(&path, name),
                            expected: format!("{:?}", file.shape(name).expect("listed")),
                            got: t.shape().to_vec(),
                        });
                    }
                    w.write(name, &t)?;
                }
                None if stored.is_none() || options.dtype.is_none() || options.dtype == stored => {
                    w.write_raw(name, file.raw(name).expect("listed"))?;
                    file.release(name);
                }
                None => {
                    let from = stored.expect("this arm has a stored float dtype");
                    w.write_converted(name, from, file.raw(name).expect("listed"))?;
                    file.release(name);
                }
            }
            total += match (stored, options.dtype) {
                (Some(_), Some(d)) => file.shape(name).expect("listed").iter().product::<usize>() * d.size(),
                _ => file.raw(name).expect("listed").len(),
            };
        }
        w.finish()?;
    }
    if let Some(index) = &template.index {
        let mut index = index.clone();
        if let Some(obj) = index.as_object_mut() {
            let meta = obj.entry("metadata").or_insert_with(|| Value::Object(Default::default()));
            if let Some(m) = meta.as_object_mut() {
                m.insert("total_size".into(), Value::from(total));
            }
        }
        let text = serde_json::to_string_pretty(&index).expect("json serialises");
        atomic::write_file(&out.join(INDEX_FILE), text.as_bytes())?;
    }
    // Every other file of the folder: config, tokenizer, generation config, ...
    let entries = std::fs::read_dir(&template.dir).map_err(|e| Error::io(&template.dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(&template.dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        let is_weights = template.shards.iter().any(|(n, _)| *n == name) || name == INDEX_FILE;
        if !is_file || is_weights || name.starts_with('.') {
            continue;
        }
        if let (true, Some(dtype), Some(mut config)) = (name == "config.json", options.dtype, template.config.clone()) {
            {
                let label = match dtype {
                    DType::F16 => "float16",
                    DType::BF16 => "bfloat16",
                    DType::F32 => "float32",
                    DType::F64 => "float64",
                };
                if let Some(obj) = config.as_object_mut() {
                    for key in ["torch_dtype", "dtype"] {
                        if obj.contains_key(key) {
                            obj.insert(key.into(), Value::from(label));
                        }
                    }
                }
                let text = serde_json::to_string_pretty(&config).expect("json serialises");
                atomic::write_file(&out.join(&name), text.as_bytes())?;
                continue;
            }
        }
        atomic::copy_file(&entry.path(), &out.join(&name))?;
    }
    Ok(())
}

/// Check an adapter against its base model: every module must be a `<module>.weight` of the
/// model with the shape the adapter implies (in the layout `fan_in_fan_out` and the module kind
/// give). `adapter_path` is only used in errors.
pub fn check_adapter_against_model<T: lora_core::Scalar, S: TensorSource + ?Sized>(
    adapter: &lora_core::Adapter<T>,
    model: &S,
    adapter_path: impl AsRef<Path>,
) -> Result<()> {
    let path = adapter_path.as_ref();
    for (name, m) in adapter.modules() {
        let weight = format!("{name}.weight");
        let info = model
            .tensor_info(&weight)
            .ok_or_else(|| Error::UnknownModule { at: Location::tensor(path, name), module: name.clone() })?;
        let layout = m.layout(adapter.config().fan_in_fan_out);
        let expected = layout.shape(m.layer().d_out(), m.layer().d_in());
        if info.shape != expected {
            return Err(Error::Shape {
                at: Location::tensor(path, name),
                expected: format!("{expected:?} (the base model's {weight})"),
                got: info.shape,
            });
        }
    }
    Ok(())
}
