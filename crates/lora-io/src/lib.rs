//! LoRA adapter and model IO: safetensors, Hugging Face model folders, and PEFT, kohya and GGUF
//! adapters that the real tools accept.
//!
//! Every reader produces lora-core's format-neutral [`Adapter`](lora_core::Adapter) and every
//! writer takes one, so converting is reading in one format and writing in another.
//! [`convert_adapter`] gives the same bytes without decoding the whole adapter: it validates the
//! headers, then copies each tensor's stored bytes from the memory-mapped input when no value
//! changes, and falls back to reading and writing for anything else.
//!
//! # Design
//! - Zero-copy until decode: safetensors and GGUF files are memory-mapped, headers validated on
//!   open, and a tensor is decoded (to f32 or f64, from F32, F16, BF16 or F64) only when read.
//! - Writes are atomic: a temporary file in the target folder, fsync, rename. A failure or a kill
//!   never leaves a half-written file at the target path. [`rename_into_place`] publishes a
//!   finished file or folder in one step (replacing an old one only when asked).
//! - Bad input never panics: truncated files, hostile headers, unknown dtypes, ranks that
//!   disagree and unknown keys give an [`Error`] that names the file and the tensor.
//! - What a format cannot hold (DoRA in GGUF or kohya, embeddings in GGUF) is refused with an
//!   error, never silently dropped. PEFT's scale rules (rank_pattern, alpha_pattern, rsLoRA) are
//!   resolved per module on reading and folded into the factors where a format has one alpha.
//!
//! # Example
//! ```
//! use lora_core::{Adapter, AdapterConfig, AdapterModule, Init, LoraLayer, Scaling, TargetModules};
//! use lora_io::{detect_format, read_adapter, write_adapter, Format};
//!
//! let mut adapter = Adapter::<f32>::new(AdapterConfig::new(2, 4.0, TargetModules::List(vec!["q_proj".into()])));
//! let layer = LoraLayer::init(8, 8, 2, 4.0, Scaling::Standard, Init::Random { b_std: 0.1 }, 1)?;
//! adapter.insert("model.layers.0.self_attn.q_proj", AdapterModule::linear(layer))?;
//!
//! let dir = tempfile::tempdir()?;
//! let peft = dir.path().join("my-adapter");
//! write_adapter(&adapter, &peft, Format::Peft)?;
//! assert_eq!(detect_format(&peft)?, Format::Peft);
//!
//! let kohya = dir.path().join("my-adapter.safetensors");
//! write_adapter(&read_adapter(&peft)?, &kohya, Format::Kohya)?;
//! let back = read_adapter(&kohya)?;
//! let (d0, d1) = (lora_core::deltas(&adapter), lora_core::deltas(&back));
//! let diff = (&d0["model.layers.0.self_attn.q_proj"] - &d1["model.layers.0.self_attn.q_proj"]).mapv(f32::abs);
//! assert!(diff.iter().all(|d| *d < 1e-6));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Modules
//! - safetensors: [`SafetensorsFile`] (mmap, lazy decode, a [`TensorSource`](lora_core::TensorSource)),
//!   [`SafetensorsWriter`] (streaming, atomic), [`write_safetensors`].
//! - model folders: [`ModelFolder`] (single or sharded, a `TensorSource`), [`write_model`].
//! - adapters: [`read_peft`] / [`write_peft`] with [`PeftConfig`], [`read_kohya`] /
//!   [`write_kohya`], [`read_gguf`] / [`write_gguf`] with [`GgufFile`]; [`detect_format`],
//!   [`read_adapter`], [`write_adapter`]; [`convert_adapter`] (streamed where it can be).
#![deny(missing_docs)]

mod atomic;
mod convert;
mod error;
mod format;
mod gguf;
mod kohya;
mod model;
mod peft;
mod st;

pub use atomic::{rename_into_place, Existing};
pub use convert::{convert_adapter, convert_streaming, ConvertOptions, Converted};
pub use error::{Error, Location, Result};
pub use format::{
    detect_format, read_adapter, read_adapter_with, write_adapter, write_adapter_with, Format, ReadOptions,
    WriteOptions,
};
pub use gguf::{
    gguf_name, module_name, read_gguf, write_gguf, GgufFile, GgufOptions, GgufTensorInfo, GgufValue, META_ARCH,
    META_HEADS, META_HEADS_KV,
};
pub use kohya::{flatten, read_kohya, write_kohya, KohyaOptions, ModuleResolver, KNOWN_PREFIXES, META_MODULE_PATHS};
pub use model::{check_adapter_against_model, write_model, ModelFolder, ModelWriteOptions, INDEX_FILE, SINGLE_FILE};
pub use peft::{
    peft_config_for, read_peft, write_peft, PeftConfig, PeftWriteOptions, TargetModulesJson, CONFIG_FILE, META_DTYPE,
    META_PEFT_CONFIG, PEFT_PREFIX, WEIGHTS_FILE,
};
pub use st::{first_nonfinite_raw, unravel, write_safetensors, PlannedTensor, SafetensorsFile, SafetensorsWriter};

#[cfg(test)]
mod bounds_tests;
#[cfg(test)]
mod convert_tests;
#[cfg(test)]
mod golden_tests;
#[cfg(test)]
mod tests;
