//! LoRA adapters from weight differences by truncated SVD, and rank changes and combinations of
//! adapters, fast on a CPU.
//!
//! A full fine-tune changes a weight W by dW = W_tuned - W_base. [`extract`] factors dW into a
//! LoRA layer s B A of small rank (B = U sqrt(S), A = sqrt(S) Vᵀ, alpha = r so s = 1, as
//! kohya's sd-scripts and mergekit do), with the rank picked by a [`RankRule`]: fixed, energy
//! (kohya's `sv_fro`), ratio to the largest (`sv_ratio`), absolute threshold (mergekit's
//! `sv_epsilon`) or cumulative sum (`sv_cumulative`). [`resize`] changes an adapter's rank and
//! [`combine`] joins adapters without ever building dW; [`extract_model`] walks two models.
//!
//! # Design
//! - Two SVD methods behind [`SvdMethod`]: exact (LAPACK's divide-and-conquer `gesdd`, never
//!   the 40-70x slower `gesvd`) and randomized (Halko, Martinsson and Tropp 2011: Gaussian
//!   sketch, oversampling, power iterations re-orthonormalised by Cholesky QR, SVD of the small
//!   projection), with [`SvdMethod::Auto`] choosing. The randomized method is seeded and
//!   reproducible. Rules that need more singular values than the sketch resolved grow the
//!   sketch; since ||dW||_F^2 is computed from dW itself, the energy rule's guarantee (the
//!   retained fraction) holds exactly, and reports measure errors rather than estimate them.
//! - [`resize`] and [`combine`] take the QR of B and of Aᵀ and the SVD of the small core: the
//!   exact spectrum of s B A at the cost of a few thin products.
//! - No backend is chosen here: LAPACK comes through ndarray-linalg, and the binary (or the
//!   tests) picks the library with one of the features below. Parallelism is explicit
//!   ([`Parallelism`]); the sequential path is deterministic.
//! - Generic over `f32` and `f64` ([`SvdScalar`]); factors and reports carry the input's type.
//!
//! # Example
//! ```
//! use lora_svd::{extract, resize, ExtractConfig, RankRule, SvdMethod};
//! use ndarray::Array2;
//!
//! // A 40 x 30 difference of rank 3.
//! let b = Array2::from_shape_fn((40, 3), |(i, j)| ((i * 7 + j * 3) % 11) as f64 - 5.0);
//! let a = Array2::from_shape_fn((3, 30), |(i, j)| ((i * 5 + j * 2) % 13) as f64 - 6.0);
//! let delta = b.dot(&a);
//!
//! let config = ExtractConfig::new(RankRule::energy(0.999_999)?, SvdMethod::Exact);
//! let (layer, report) = extract(&delta, &config)?;
//! assert_eq!(layer.rank(), 3);
//! assert!(report.relative_error < 1e-10);
//! assert_eq!(layer.scale(), 1.0); // alpha = r
//!
//! // Down to rank 2 without building dW; the scale is kept.
//! let (small, report) = resize(&layer, &RankRule::fixed(2)?)?;
//! assert_eq!((small.rank(), small.alpha()), (2, 2.0));
//! assert!(report.retained_energy > 0.5);
//! # Ok::<(), lora_svd::Error>(())
//! ```
//!
//! # Features
//! LAPACK backends, passed through to ndarray-linalg; choose one in the final binary:
//! `openblas-system` (Debian: libopenblas-dev), `openblas-static`, `netlib-system`,
//! `intel-mkl-system`.
#![deny(missing_docs)]

mod error;
mod extract;
mod factored;
mod model;
mod rank;
mod svd;
mod thin;

pub use error::{Error, Result};
pub use extract::{extract, ExtractConfig, Report, DEFAULT_SPECTRUM_LEN};
pub use factored::{combine, combine_adapters, resize, CombineMethod};
pub use model::{
    extract_model, ExtractedModule, ModelConfig, ModelExtraction, NotExtracted, Parallelism, Progress, Selection,
    SkipReason,
};
pub use rank::{Criterion, RankRule};
pub use svd::{truncated_svd, MethodUsed, Randomized, SvdMethod, SvdScalar, TruncatedSvd};

#[cfg(test)]
mod tests;
