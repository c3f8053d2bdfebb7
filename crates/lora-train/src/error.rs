//! The error type of lora-train.

use std::path::PathBuf;

/// Everything that can go wrong in lora-train.
///
/// Messages are lowercase, without a final period, and name the file, tensor or module involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system reported.
        #[source]
        source: std::io::Error,
    },

    /// config.json is not valid JSON or lacks a field.
    #[error("{file}: {source}")]
    Json {
        /// The file (or `"<memory>"`).
        file: String,
        /// What serde_json reported.
        #[source]
        source: serde_json::Error,
    },

    /// config.json holds a value that is out of range or inconsistent.
    #[error("{file}: {message}")]
    Config {
        /// The file (or `"<memory>"`).
        file: String,
        /// What is wrong.
        message: String,
    },

    /// The model uses a feature that lora-train does not implement; refused rather than ignored.
    #[error("{file}: unsupported: {what}")]
    Unsupported {
        /// The file (or `"<memory>"`, or the module).
        file: String,
        /// The feature and its value.
        what: String,
    },

    /// A weight tensor has the wrong shape.
    #[error("tensor {tensor}: expected shape {expected:?}, got {got:?}")]
    WeightShape {
        /// The tensor name.
        tensor: String,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape found.
        got: Vec<usize>,
    },

    /// A batch or a token stream is not usable (token out of the vocabulary, shapes that disagree,
    /// no position to predict).
    #[error("input: {0}")]
    Input(String),

    /// An adapter does not fit the model.
    #[error("adapter module {module}: {message}")]
    Adapter {
        /// The module path (`model.layers.0.self_attn.q_proj`).
        module: String,
        /// What is wrong.
        message: String,
    },

    /// tokenizer.json could not be loaded or used.
    #[error("{file}: tokenizer: {message}")]
    Tokenizer {
        /// The tokenizer file.
        file: String,
        /// What the tokenizers crate reported.
        message: String,
    },

    /// The thread pool could not be built.
    #[error("thread pool: {0}")]
    ThreadPool(String),

    /// An error of lora-io (model folders, PEFT adapters, safetensors); it names the file.
    #[error(transparent)]
    Files(#[from] lora_io::Error),

    /// An error of the LoRA math or of a tensor source.
    #[error(transparent)]
    Core(#[from] lora_core::Error),
}

/// The result type of lora-train.
pub type Result<T, E = Error> = std::result::Result<T, E>;
