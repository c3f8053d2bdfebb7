//! Models given on the command line: a Hugging Face folder or a single .safetensors file.

use std::path::Path;

use anyhow::{Context, Result};
use lora_core::{DType, TensorSource};
use lora_io::{ModelFolder, SafetensorsFile};
use serde_json::Value;

/// A model read through lora-io, memory-mapped.
#[derive(Debug)]
pub enum Model {
    /// A Hugging Face folder (config.json, one or several safetensors files).
    Folder(ModelFolder),
    /// One .safetensors file.
    File(SafetensorsFile),
}

/// Architectures whose linear weights are stored (d_in, d_out), as GPT-2's Conv1D.
const CONV1D_MODEL_TYPES: &[&str] = &["gpt2", "openai-gpt", "imagegpt"];

impl Model {
    /// Open a folder or a file.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Ok(Model::Folder(ModelFolder::open(path)?))
        } else if path.exists() {
            Ok(Model::File(SafetensorsFile::open(path)?))
        } else {
            anyhow::bail!("{}: no such file or folder", path.display())
        }
    }

    /// The file holding a tensor.
    pub fn file_of(&self, name: &str) -> Option<&SafetensorsFile> {
        match self {
            Model::Folder(f) => f.file_of(name),
            Model::File(f) => f.contains(name).then_some(f),
        }
    }

    /// Every stored tensor (of any dtype) with its file, in file order.
    pub fn stored_tensors(&self) -> Vec<(&SafetensorsFile, String)> {
        let files: Vec<&SafetensorsFile> = match self {
            Model::Folder(f) => f.shards().map(|(_, s)| s).collect(),
            Model::File(f) => vec![f],
        };
        files.into_iter().flat_map(|f| f.names().map(move |n| (f, n.to_string()))).collect()
    }

    /// The tensors.
    pub fn source(&self) -> &dyn TensorSource {
        match self {
            Model::Folder(f) => f,
            Model::File(f) => f,
        }
    }

    /// config.json, when the model is a folder that has one.
    pub fn config(&self) -> Option<&Value> {
        match self {
            Model::Folder(f) => f.config(),
            Model::File(_) => None,
        }
    }

    /// `model_type` from config.json.
    pub fn model_type(&self) -> Option<&str> {
        self.config().and_then(|c| c.get("model_type")).and_then(Value::as_str)
    }

    /// True when linear weights are stored transposed (GPT-2's Conv1D): PEFT's fan_in_fan_out.
    pub fn fan_in_fan_out(&self) -> bool {
        self.model_type().is_some_and(|t| CONV1D_MODEL_TYPES.contains(&t))
    }

    /// The dtype most tensors are stored in (F32 for an empty model).
    pub fn main_dtype(&self) -> DType {
        let source = self.source();
        let mut counts: Vec<(DType, usize)> = Vec::new();
        for name in source.tensor_names() {
            if let Some(info) = source.tensor_info(&name) {
                match counts.iter_mut().find(|(d, _)| *d == info.dtype) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((info.dtype, 1)),
                }
            }
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map_or(DType::F32, |(d, _)| d)
    }

    /// `name_or_path`-like identification of the model for adapter configs.
    pub fn id(&self, path: &Path) -> String {
        self.config()
            .and_then(|c| c.get("_name_or_path"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map_or_else(|| path.display().to_string(), str::to_string)
    }

    /// Module paths of the model's 2-D weights (tensor names without `.weight`).
    pub fn module_names(&self) -> Vec<String> {
        let source = self.source();
        source
            .tensor_names()
            .into_iter()
            .filter_map(|n| n.strip_suffix(".weight").map(str::to_string))
            .filter(|m| source.tensor_info(&format!("{m}.weight")).is_some_and(|i| i.shape.len() == 2))
            .collect()
    }
}

/// The path with context for error messages.
pub fn open_model(path: &Path, what: &str) -> Result<Model> {
    Model::open(path).with_context(|| format!("cannot open the {what} model"))
}
