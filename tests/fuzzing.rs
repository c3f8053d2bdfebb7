//! Fuzz harnesses: one function per file reader of the workspace, called by the cargo-fuzz
//! targets in `fuzz/` and by `tests/it/fuzz_corpus.rs`, which replays every committed corpus
//! file through them on every `cargo test`.
//!
//! Each harness takes raw bytes, lays them out as files in a fresh temporary folder (the readers
//! take paths and memory-map them, so the fuzzed code path is the production one), runs the
//! reader, and then exercises what a successful read promises (every listed tensor decodes, with
//! as many values as its shape says). A panic, a hang or an allocation beyond what the input can
//! hold is a finding; an `Err` is the expected outcome for hostile input, returned as its message
//! with the temporary folder written `<dir>` so that messages are stable.
//!
//! Inputs of the multi-file targets are split into parts by [`PART_SEPARATOR`]; an empty or
//! missing part means "no such file". [`join_parts`] builds such inputs.
//!
//! This lives in the `tests` package, not in lora-io, because one target (the model config)
//! reads through lora-train, which lora-io cannot depend on; and so that no published crate
//! grows a fuzzing API.

use std::fmt::Display;
use std::path::{Path, PathBuf};

use lora_core::TensorSource;
use lora_io::{GgufFile, ModelFolder, ModuleResolver, SafetensorsFile};
use lora_train::{Batch, Model};

/// Separates the files of one input of a multi-file target.
pub const PART_SEPARATOR: &[u8] = b"\n#lora-fuzz-part#\n";

/// One fuzz target: its name (the folder of its corpus under `fuzz/corpus/`) and its harness.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// The cargo-fuzz target name.
    pub name: &'static str,
    /// The harness: `Ok` when the reader accepted the input, else the error message.
    pub run: fn(&[u8]) -> Result<(), String>,
    /// True when every error must name a file of the input (lora-io's errors always do).
    pub errors_name_a_file: bool,
}

/// Every fuzz target.
pub static TARGETS: [Target; 6] = [
    Target { name: "safetensors", run: safetensors, errors_name_a_file: true },
    Target { name: "peft", run: peft, errors_name_a_file: true },
    Target { name: "kohya", run: kohya, errors_name_a_file: true },
    Target { name: "gguf", run: gguf, errors_name_a_file: true },
    Target { name: "model_folder", run: model_folder, errors_name_a_file: true },
    Target { name: "train_config", run: train_config, errors_name_a_file: false },
];

/// Split a multi-file input into its parts.
pub fn split_parts(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(i) = find(rest, PART_SEPARATOR) {
        parts.push(&rest[..i]);
        rest = &rest[i + PART_SEPARATOR.len()..];
    }
    parts.push(rest);
    parts
}

/// Join files into one input of a multi-file target (inverse of [`split_parts`]).
pub fn join_parts(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(PART_SEPARATOR)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A fresh temporary folder for one input.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        Scratch { dir: tempfile::Builder::new().prefix("lora-fuzz").tempdir().expect("a temporary folder") }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write `bytes` to `name` unless they are empty (an empty part means "no such file").
    fn put(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        if !bytes.is_empty() {
            std::fs::write(&path, bytes).expect("writable temporary folder");
        }
        path
    }

    /// The error's message with the temporary folder written `<dir>`.
    fn message(&self, e: impl Display) -> String {
        let text = e.to_string();
        let dir = self.dir.path().display().to_string();
        text.replace(&dir, "<dir>")
    }
}

/// Every tensor a [`SafetensorsFile`] lists must decode to as many values as its shape says,
/// once the file has opened: the header was validated then.
fn check_safetensors(file: &SafetensorsFile) {
    let names: Vec<String> = file.names().map(str::to_string).collect();
    assert_eq!(names.len(), file.len());
    for name in &names {
        let shape = file.shape(name).expect("listed tensor has a shape").to_vec();
        let raw = file.raw(name).expect("listed tensor has bytes");
        let elements: usize = shape.iter().product();
        assert!(file.dtype_name(name).is_some());
        if file.dtype(name).is_some() {
            let t = file.tensor_f32(name).unwrap_or_else(|e| panic!("opened file, tensor {name} does not decode: {e}"));
            assert_eq!((t.shape(), t.len()), (shape.as_slice(), elements));
            let t = file.tensor_f64(name).unwrap_or_else(|e| panic!("opened file, tensor {name} does not decode: {e}"));
            assert_eq!(t.len(), elements);
            let width = raw.len().checked_div(elements).unwrap_or(0);
            assert!(
                elements == 0 || raw.len() == width * elements,
                "{name}: {} bytes for {elements} values",
                raw.len()
            );
        } else {
            assert!(file.tensor_f32(name).is_err(), "{name}: a non-float dtype must not decode");
        }
    }
    for name in file.tensor_names() {
        assert!(file.tensor_info(&name).is_some());
    }
}

/// `model.safetensors`: open, then decode every tensor; also format detection.
pub fn safetensors(data: &[u8]) -> Result<(), String> {
    let s = Scratch::new();
    let path = s.put("model.safetensors", data);
    let _ = lora_io::detect_format(&path);
    let file = SafetensorsFile::open(&path).map_err(|e| s.message(e))?;
    check_safetensors(&file);
    Ok(())
}

/// A PEFT adapter folder: parts `adapter_config.json`, `adapter_model.safetensors`.
pub fn peft(data: &[u8]) -> Result<(), String> {
    let s = Scratch::new();
    let parts = split_parts(data);
    s.put(lora_io::CONFIG_FILE, parts.first().copied().unwrap_or_default());
    s.put(lora_io::WEIGHTS_FILE, parts.get(1).copied().unwrap_or_default());
    let direct = lora_io::read_peft::<f32>(s.path()).map_err(|e| s.message(e));
    // Through detection, as the CLI reads it; the outcome must be the same.
    let detected = lora_io::read_adapter(s.path()).map_err(|e| s.message(e));
    assert_eq!(direct.is_ok(), detected.is_ok(), "read_peft: {direct:?}, read_adapter: {detected:?}");
    direct.map(drop)
}

/// The module paths of a two-layer Llama model, to resolve kohya names against.
fn llama_modules() -> Vec<String> {
    let mut out = vec!["lm_head".to_string()];
    for l in 0..2 {
        for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"] {
            out.push(format!("model.layers.{l}.{m}"));
        }
        for m in ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] {
            out.push(format!("model.layers.{l}.{m}"));
        }
    }
    out
}

/// A kohya `.safetensors` file, resolved against a two-layer Llama's module paths (and the paths
/// the file records), and read again through detection with only the recorded paths.
pub fn kohya(data: &[u8]) -> Result<(), String> {
    let s = Scratch::new();
    let path = s.put("adapter.safetensors", data);
    let _ = lora_io::read_adapter(&path);
    lora_io::read_kohya::<f32>(&path, &ModuleResolver::Modules(llama_modules())).map_err(|e| s.message(e))?;
    Ok(())
}

/// A GGUF adapter: open and decode every tensor, then read it as a LoRA adapter (head counts
/// from the file, and again with a base config giving them).
pub fn gguf(data: &[u8]) -> Result<(), String> {
    let s = Scratch::new();
    let path = s.put("adapter.gguf", data);
    let file = GgufFile::open(&path).map_err(|e| s.message(e))?;
    for (name, info) in file.tensors() {
        let elements: u64 = info.dims.iter().product();
        match file.tensor_f32(name) {
            Ok(t) => assert_eq!(t.len() as u64, elements),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains(name.as_str()), "error does not name tensor {name}: {msg}");
            }
        }
    }
    let base = serde_json::json!({ "num_attention_heads": 2, "num_key_value_heads": 1 });
    let _ = lora_io::read_gguf::<f32>(&path, Some(&base));
    lora_io::read_gguf::<f32>(&path, None).map_err(|e| s.message(e))?;
    Ok(())
}

/// A Hugging Face model folder: parts `config.json`, `model.safetensors.index.json`, then the
/// weights: `model.safetensors` without an index, else shards `model-0000i-of-0000n.safetensors`.
/// Every tensor is decoded after a successful open.
pub fn model_folder(data: &[u8]) -> Result<(), String> {
    let s = Scratch::new();
    let parts = split_parts(data);
    s.put("config.json", parts.first().copied().unwrap_or_default());
    let index = parts.get(1).copied().unwrap_or_default();
    let weights = parts.get(2..).unwrap_or_default();
    if index.is_empty() {
        s.put(lora_io::SINGLE_FILE, weights.first().copied().unwrap_or_default());
    } else {
        s.put(lora_io::INDEX_FILE, index);
        for (i, w) in weights.iter().enumerate() {
            s.put(&format!("model-{:05}-of-{:05}.safetensors", i + 1, weights.len()), w);
        }
    }
    let folder = ModelFolder::open(s.path()).map_err(|e| s.message(e))?;
    let mut listed = 0;
    for (_, file) in folder.shards() {
        check_safetensors(file);
        listed += file.len();
    }
    assert_eq!(folder.names().count(), listed);
    for name in folder.tensor_names() {
        let info = folder.tensor_info(&name).expect("listed");
        let t = folder.read_f32(&name).unwrap_or_else(|e| panic!("opened folder, tensor {name} does not read: {e}"));
        assert_eq!(t.shape(), info.shape.as_slice());
    }
    Ok(())
}

/// lora-train's model loading: parts `config.json`, `model.safetensors`. A model that loads is
/// run on one two-token sequence.
pub fn train_config(data: &[u8]) -> Result<(), String> {
    let s = Scratch::new();
    let parts = split_parts(data);
    s.put("config.json", parts.first().copied().unwrap_or_default());
    s.put(lora_io::SINGLE_FILE, parts.get(1).copied().unwrap_or_default());
    let model = Model::<f32>::from_dir(s.path()).map_err(|e| s.message(e))?;
    let last = (model.config().vocab_size - 1).min(u32::MAX as usize) as u32;
    let batch = Batch::new(ndarray::array![[0, last]]).expect("a non-empty batch");
    let loss = model.loss(&batch).map_err(|e| s.message(e))?;
    let _ = loss.mean();
    Ok(())
}
