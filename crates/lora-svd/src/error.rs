//! The error type of lora-svd.

/// Everything that can go wrong in lora-svd.
///
/// Messages are lowercase, without a final period, and name the tensor, layer or parameter
/// concerned. Errors of one tensor in a model-level run come wrapped in [`Error::Tensor`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A matrix holds NaN or an infinity.
    #[error("{what} holds a non-finite value at index {index:?}")]
    NonFinite {
        /// Which matrix (`"delta"`, `"lora_B of layer 2"`, ...).
        what: String,
        /// The index of the first non-finite value.
        index: Vec<usize>,
    },

    /// A matrix has a dimension of length zero.
    #[error("{what} has an empty dimension: shape {shape:?}")]
    Empty {
        /// Which matrix.
        what: String,
        /// Its shape.
        shape: Vec<usize>,
    },

    /// A parameter of a rank rule, a method or a combination is out of its range.
    #[error("invalid {name}: {reason}")]
    InvalidParameter {
        /// The parameter (`"energy fraction"`, `"max_rank"`, ...).
        name: &'static str,
        /// What is wrong with it, with the value given.
        reason: String,
    },

    /// The rank rule needs every singular value, which only the exact method computes.
    #[error("rank rule {rule} needs the whole spectrum: use SvdMethod::Exact or SvdMethod::Auto")]
    NeedsExact {
        /// The rule (`"cumulative"`).
        rule: &'static str,
    },

    /// Matrices that must agree in shape do not.
    #[error("{what}: expected shape {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// What was compared (`"layer 1"`, ...).
        what: String,
        /// The shape needed.
        expected: Vec<usize>,
        /// The shape found.
        got: Vec<usize>,
    },

    /// The base and the tuned model hold a tensor of the same name with different shapes.
    #[error("tensor {name}: base shape {base:?} and tuned shape {tuned:?} differ")]
    TensorShapes {
        /// The tensor.
        name: String,
        /// Its shape in the base model.
        base: Vec<usize>,
        /// Its shape in the tuned model.
        tuned: Vec<usize>,
    },

    /// A LAPACK routine failed (it did not converge, or was given bad input).
    #[error("lapack {routine} failed on a {rows} x {cols} matrix: {source}")]
    Lapack {
        /// The routine (`"gesdd"`, `"geqrf"`).
        routine: &'static str,
        /// Rows of its input.
        rows: usize,
        /// Columns of its input.
        cols: usize,
        /// What ndarray-linalg reported.
        #[source]
        source: ndarray_linalg::error::LinalgError,
    },

    /// A tensor selection pattern is not a valid regular expression.
    #[error("invalid {which} pattern {pattern:?}: {source}")]
    Regex {
        /// `"include"` or `"exclude"`.
        which: &'static str,
        /// The pattern given.
        pattern: String,
        /// What the regex crate reported.
        #[source]
        source: regex::Error,
    },

    /// An error while extracting one tensor of a model.
    #[error("tensor {name}: {source}")]
    Tensor {
        /// The tensor.
        name: String,
        /// The error.
        #[source]
        source: Box<Error>,
    },

    /// An error from lora-core (building a layer, reading a tensor source).
    #[error(transparent)]
    Core(#[from] lora_core::Error),
}

impl Error {
    /// Wrap this error with the tensor it happened in.
    pub fn in_tensor(self, name: impl Into<String>) -> Self {
        Error::Tensor { name: name.into(), source: Box::new(self) }
    }

    pub(crate) fn param(name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidParameter { name, reason: reason.into() }
    }
}

/// The result type of lora-svd.
pub type Result<T, E = Error> = std::result::Result<T, E>;
