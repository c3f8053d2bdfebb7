//! Format detection and the format-neutral entry points [`read_adapter`] and [`write_adapter`].

use std::io::Read;
use std::path::{Path, PathBuf};

use lora_core::{Adapter, DType, Scalar};
use serde_json::Value;

use crate::error::{Error, Location, Result};
use crate::gguf::{read_gguf, write_gguf, GgufOptions};
use crate::kohya::{read_kohya, write_kohya, KohyaOptions, ModuleResolver};
use crate::peft::{read_peft, write_peft, PeftWriteOptions, CONFIG_FILE};
use crate::st::SafetensorsFile;

/// An adapter file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// A PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`).
    Peft,
    /// A kohya / sd-scripts single `.safetensors` file (`lora_down` / `lora_up` / `alpha`).
    Kohya,
    /// A llama.cpp GGUF adapter (`general.type = adapter`).
    Gguf,
}

impl Format {
    /// The lowercase name (`peft`, `kohya`, `gguf`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Peft => "peft",
            Format::Kohya => "kohya",
            Format::Gguf => "gguf",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "peft" => Ok(Format::Peft),
            "kohya" | "sd-scripts" => Ok(Format::Kohya),
            "gguf" | "llama.cpp" => Ok(Format::Gguf),
            other => Err(format!("unknown adapter format {other:?}, expected peft, kohya or gguf")),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Detect the adapter format of a path from its contents (not only its name):
/// a folder with `adapter_config.json` (or a legacy `adapter_model.bin`) is PEFT, a file that
/// starts with `GGUF` is GGUF, a safetensors file with `lora_down` keys is kohya, and a
/// safetensors file with PEFT keys beside an `adapter_config.json` is PEFT.
pub fn detect_format(path: impl AsRef<Path>) -> Result<Format> {
    let path = path.as_ref();
    let unknown = |reason: &str| Error::UnknownFormat { at: Location::file(path), reason: reason.into() };
    if path.is_dir() {
        if path.join(CONFIG_FILE).exists() || path.join("adapter_model.bin").exists() {
            return Ok(Format::Peft);
        }
        return Err(unknown("the folder has no adapter_config.json"));
    }
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
    if n == 4 && &magic == b"GGUF" {
        return Ok(Format::Gguf);
    }
    if path.file_name().is_some_and(|n| n == CONFIG_FILE) {
        return Ok(Format::Peft);
    }
    let file = SafetensorsFile::open(path)?;
    if file.names().any(|k| k.contains(".lora_down.") || k.contains(".lora_up.")) {
        return Ok(Format::Kohya);
    }
    let peft_keys = file.names().any(|k| k.contains(".lora_A.") || k.contains(".lora_embedding_A"));
    let beside = path.parent().map(|p| p.join(CONFIG_FILE));
    match (peft_keys, beside) {
        (true, Some(c)) if c.exists() => Ok(Format::Peft),
        (true, _) => Err(unknown("PEFT tensors but no adapter_config.json beside the file")),
        _ => Err(unknown("no lora_A / lora_down tensors")),
    }
}

/// Options of [`read_adapter_with`].
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    /// Module paths to resolve kohya names against (a base model's tensor names without
    /// `.weight`, or an adapter's modules); see [`ModuleResolver`].
    pub modules: Option<Vec<String>>,
    /// The base model's `config.json`, for GGUF files that do not record their head counts.
    pub base_config: Option<Value>,
}

/// Read an adapter in any format, detected with [`detect_format`].
pub fn read_adapter(path: impl AsRef<Path>) -> Result<Adapter<f32>> {
    read_adapter_with(path, &ReadOptions::default())
}

/// Read an adapter in any format, with the base-model information some formats need.
pub fn read_adapter_with<T: Scalar>(path: impl AsRef<Path>, options: &ReadOptions) -> Result<Adapter<T>> {
    let path = path.as_ref();
    match detect_format(path)? {
        Format::Peft => read_peft(path),
        Format::Kohya => {
            let resolver = match &options.modules {
                Some(m) => ModuleResolver::Modules(m.clone()),
                None => ModuleResolver::Embedded,
            };
            read_kohya(path, &resolver)
        }
        Format::Gguf => read_gguf(path, options.base_config.as_ref()),
    }
}

/// Options of [`write_adapter_with`].
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// The stored dtype; `None` keeps the dtype the adapter was read in (F32 when unknown).
    pub dtype: Option<DType>,
    /// The base model's `config.json`: GGUF needs its architecture and head counts.
    pub base_config: Option<Value>,
}

/// Write an adapter in a format with default options. PEFT writes a folder at `path`; kohya and
/// GGUF write one file.
pub fn write_adapter<T: Scalar>(adapter: &Adapter<T>, path: impl AsRef<Path>, format: Format) -> Result<()> {
    write_adapter_with(adapter, path, format, &WriteOptions::default())
}

/// Write an adapter in a format.
pub fn write_adapter_with<T: Scalar>(
    adapter: &Adapter<T>,
    path: impl AsRef<Path>,
    format: Format,
    options: &WriteOptions,
) -> Result<()> {
    let path: PathBuf = path.as_ref().to_path_buf();
    match format {
        Format::Peft => write_peft(adapter, &path, &PeftWriteOptions { dtype: options.dtype }),
        Format::Kohya => write_kohya(adapter, &path, &KohyaOptions { dtype: options.dtype, ..KohyaOptions::default() }),
        Format::Gguf => {
            let gguf = match &options.base_config {
                Some(c) => {
                    GgufOptions::from_hf_config(c).map_err(|reason| Error::config(Location::file(&path), reason))?
                }
                None => GgufOptions::from_adapter(adapter).ok_or_else(|| {
                    Error::config(
                        Location::file(&path),
                        "gguf needs the base model's architecture and head counts: pass its config.json",
                    )
                })?,
            };
            let gguf = GgufOptions { dtype: options.dtype.or(gguf.dtype), ..gguf };
            write_gguf(adapter, &path, &gguf)
        }
    }
}
