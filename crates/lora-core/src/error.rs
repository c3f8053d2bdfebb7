//! The error type of lora-core.

use std::fmt;

/// Everything that can go wrong in lora-core.
///
/// Messages are lowercase, without a final period, and name what was being checked so that a
/// caller one level up can prefix the file or module (see [`Error::in_module`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A LoRA rank of zero was asked for or found.
    #[error("rank must be at least 1, got 0")]
    ZeroRank,

    /// A matrix has a dimension of length zero where one is needed.
    #[error("{what} has an empty dimension: shape {shape:?}")]
    EmptyDimension {
        /// What was checked (`"lora_A"`, `"x"`, ...).
        what: String,
        /// The shape found.
        shape: Vec<usize>,
    },

    /// A matrix does not have the shape the operation needs.
    #[error("{what}: expected shape {expected}, got {got:?}")]
    ShapeMismatch {
        /// What was checked (`"lora_B"`, `"W"`, ...).
        what: String,
        /// The expected shape, `_` where any length is accepted.
        expected: ShapePattern,
        /// The shape found.
        got: Vec<usize>,
    },

    /// alpha is NaN or infinite.
    #[error("alpha must be finite, got {alpha}")]
    NonFiniteAlpha {
        /// The alpha given.
        alpha: f64,
    },

    /// A scale factor is NaN or infinite.
    #[error("scale factor must be finite, got {factor}")]
    NonFiniteFactor {
        /// The factor given.
        factor: f64,
    },

    /// A tensor holds NaN or an infinity.
    #[error("{what} holds a non-finite value at index {index:?}")]
    NonFinite {
        /// Which tensor.
        what: String,
        /// The index of the first non-finite value.
        index: Vec<usize>,
    },

    /// A numeric parameter is out of its range.
    #[error("{name} must be finite and non-negative, got {value}")]
    InvalidParameter {
        /// The parameter.
        name: &'static str,
        /// The value given.
        value: f64,
    },

    /// DoRA divides by the norm of each output row of W + s B A; one of them is zero.
    #[error("dora: row {row} of W + s B A has norm zero, the magnitude cannot be applied")]
    ZeroNorm {
        /// The output row.
        row: usize,
    },

    /// The operation is not defined for this input (for example, concatenating DoRA adapters).
    #[error("{0}")]
    Unsupported(String),

    /// An adapter's layers and its config disagree.
    #[error("adapter config and layer disagree: {0}")]
    ConfigMismatch(String),

    /// A named tensor was asked for and is absent.
    #[error("tensor {name} not found")]
    TensorNotFound {
        /// The name asked for.
        name: String,
    },

    /// A tensor source failed to read a tensor.
    #[error("tensor {name}: {source}")]
    Source {
        /// The tensor being read.
        name: String,
        /// What the source reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// An error inside one module of an adapter.
    #[error("module {module}: {source}")]
    Module {
        /// The module path (`model.layers.0.self_attn.q_proj`).
        module: String,
        /// The error.
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// Wrap this error with the module it happened in.
    pub fn in_module(self, module: impl Into<String>) -> Self {
        Error::Module { module: module.into(), source: Box::new(self) }
    }

    pub(crate) fn shape(what: impl Into<String>, expected: ShapePattern, got: &[usize]) -> Self {
        Error::ShapeMismatch { what: what.into(), expected, got: got.to_vec() }
    }
}

/// An expected shape in an error message: fixed lengths and `_` for any length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapePattern(pub Vec<Option<usize>>);

impl ShapePattern {
    /// A pattern from fixed lengths.
    pub fn exact(dims: &[usize]) -> Self {
        ShapePattern(dims.iter().copied().map(Some).collect())
    }
}

impl fmt::Display for ShapePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match d {
                Some(n) => write!(f, "{n}")?,
                None => f.write_str("_")?,
            }
        }
        f.write_str("]")
    }
}

/// The result type of lora-core.
pub type Result<T, E = Error> = std::result::Result<T, E>;
