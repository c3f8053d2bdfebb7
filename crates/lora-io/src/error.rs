//! The error type of lora-io: every variant says where (file, and tensor or module when there is
//! one) and what was wrong.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where an error happened: a file, and within it a tensor or module when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file (or folder) being read or written.
    pub path: PathBuf,
    /// The tensor (or module) within it, when the error concerns one.
    pub tensor: Option<String>,
}

impl Location {
    /// A location naming only a file.
    pub fn file(path: impl AsRef<Path>) -> Self {
        Location { path: path.as_ref().to_path_buf(), tensor: None }
    }

    /// A location naming a tensor in a file.
    pub fn tensor(path: impl AsRef<Path>, tensor: impl Into<String>) -> Self {
        Location { path: path.as_ref().to_path_buf(), tensor: Some(tensor.into()) }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(t) = &self.tensor {
            write!(f, ", tensor {t}")?;
        }
        Ok(())
    }
}

/// Everything that can go wrong in lora-io.
///
/// Messages are lowercase, without a final period, and start with the [`Location`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{at}: {source}")]
    Io {
        /// Where.
        at: Location,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (config, index, header) is not valid JSON or lacks a required field.
    #[error("{at}: invalid json: {source}")]
    Json {
        /// Where.
        at: Location,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },

    /// A safetensors or GGUF header is malformed: truncated, too large, bad offsets, sizes that
    /// disagree with shape and dtype.
    #[error("{at}: invalid header: {reason}")]
    Header {
        /// Where.
        at: Location,
        /// What is wrong.
        reason: String,
    },

    /// A tensor is stored in a dtype that cannot be decoded to floats.
    #[error("{at}: unsupported dtype {dtype}, expected one of F32, F16, BF16, F64")]
    UnsupportedDType {
        /// Where.
        at: Location,
        /// The dtype found.
        dtype: String,
    },

    /// A finite value would become an infinity in the stored dtype (f16 holds at most 65504).
    #[error("{at}: value {value} at index {index:?} is too large for {dtype} (it would be stored as an infinity); store it in a wider dtype")]
    Overflow {
        /// Where (the tensor being written).
        at: Location,
        /// The element's index.
        index: Vec<usize>,
        /// The value.
        value: f64,
        /// The stored dtype (`"F16"`).
        dtype: String,
    },

    /// A tensor was asked for and is absent.
    #[error("{at}: tensor not found")]
    TensorNotFound {
        /// Where (the tensor asked for).
        at: Location,
    },

    /// A tensor does not have the shape it must have.
    #[error("{at}: expected shape {expected}, got {got:?}")]
    Shape {
        /// Where.
        at: Location,
        /// The expected shape, `_` for any length.
        expected: String,
        /// The shape found.
        got: Vec<usize>,
    },

    /// A LoRA rank read from a tensor disagrees with another tensor or with the config.
    #[error("{at}: rank {got} disagrees with {what}, which says {expected}")]
    RankMismatch {
        /// Where (the tensor whose rank is off).
        at: Location,
        /// The rank the tensor has.
        got: usize,
        /// The rank expected.
        expected: usize,
        /// What the expectation comes from (`"lora_A"`, `"adapter_config.json (rank_pattern)"`).
        what: String,
    },

    /// One half of a pair of tensors is missing (lora_A without lora_B).
    #[error("{at}: has no matching {missing}")]
    MissingPair {
        /// Where (the tensor that is present).
        at: Location,
        /// The tensor that is missing.
        missing: String,
    },

    /// A tensor name matches nothing the format knows.
    #[error("{at}: unrecognised tensor name ({hint})")]
    UnknownTensor {
        /// Where.
        at: Location,
        /// What names are expected.
        hint: String,
    },

    /// A module of the adapter does not exist in the base model.
    #[error("{at}: module {module} is not in the base model")]
    UnknownModule {
        /// Where (the adapter file and tensor).
        at: Location,
        /// The module path.
        module: String,
    },

    /// A name maps to more than one module, or to none, and nothing resolves it.
    #[error("{at}: cannot map to a module path: {reason}")]
    Ambiguous {
        /// Where (the adapter file and tensor).
        at: Location,
        /// Candidates or the reason.
        reason: String,
    },

    /// A config file has a value this crate cannot use.
    #[error("{at}: {reason}")]
    Config {
        /// Where (the config file, and field in `tensor`).
        at: Location,
        /// What is wrong.
        reason: String,
    },

    /// The input is valid but cannot be represented (DoRA in GGUF, a legacy `.bin` adapter).
    #[error("{at}: {reason}")]
    Unsupported {
        /// Where.
        at: Location,
        /// What cannot be done, and what to do instead.
        reason: String,
    },

    /// The format of a path could not be detected.
    #[error("{at}: cannot detect the adapter format: {reason}")]
    UnknownFormat {
        /// The path.
        at: Location,
        /// What was looked for.
        reason: String,
    },

    /// lora-core refused the tensors (shapes, finiteness, config consistency).
    #[error("{at}: {source}")]
    Core {
        /// Where.
        at: Location,
        /// lora-core's error.
        #[source]
        source: lora_core::Error,
    },
}

impl Error {
    /// The location the error names.
    pub fn location(&self) -> &Location {
        match self {
            Error::Io { at, .. }
            | Error::Json { at, .. }
            | Error::Header { at, .. }
            | Error::UnsupportedDType { at, .. }
            | Error::Overflow { at, .. }
            | Error::TensorNotFound { at }
            | Error::Shape { at, .. }
            | Error::RankMismatch { at, .. }
            | Error::MissingPair { at, .. }
            | Error::UnknownTensor { at, .. }
            | Error::UnknownModule { at, .. }
            | Error::Ambiguous { at, .. }
            | Error::Config { at, .. }
            | Error::Unsupported { at, .. }
            | Error::UnknownFormat { at, .. }
            | Error::Core { at, .. } => at,
        }
    }

    pub(crate) fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { at: Location::file(path), source }
    }

    pub(crate) fn header(at: Location, reason: impl Into<String>) -> Self {
        Error::Header { at, reason: reason.into() }
    }

    pub(crate) fn config(at: Location, reason: impl Into<String>) -> Self {
        Error::Config { at, reason: reason.into() }
    }

    pub(crate) fn unsupported(at: Location, reason: impl Into<String>) -> Self {
        Error::Unsupported { at, reason: reason.into() }
    }

    pub(crate) fn core(at: Location, source: lora_core::Error) -> Self {
        Error::Core { at, source }
    }
}

impl From<Error> for lora_core::Error {
    fn from(e: Error) -> Self {
        let name = e.location().tensor.clone().unwrap_or_default();
        lora_core::Error::Source { name, source: Box::new(e) }
    }
}

/// The result type of lora-io.
pub type Result<T, E = Error> = std::result::Result<T, E>;
