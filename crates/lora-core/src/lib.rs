//! Low-rank adaptation (LoRA) math: the layer, its forward pass, merging, DoRA, rsLoRA,
//! composition of adapters and parameter counts.
//!
//! A frozen weight W (d_out x d_in) is adapted by dW = s B A with B (d_out x r) and A (r x d_in),
//! so r (d_in + d_out) numbers are tuned instead of d_in d_out. Conventions are PEFT's, so that
//! tensors move between tools unchanged: W is stored (d_out, d_in) like `torch.nn.Linear`, A is
//! `lora_A.weight` (r, d_in), B is `lora_B.weight` (d_out, r), s = alpha / r, or alpha / sqrt(r)
//! with rsLoRA, and y = x Wᵀ + s (x Aᵀ) Bᵀ.
//!
//! # Design
//! - No IO and no LAPACK: formats live in `lora-io`, factorisations in `lora-svd`. Model-level
//!   code reads weights through the [`TensorSource`] trait, which is how `lora-svd` extracts from
//!   models without depending on `lora-io`.
//! - Generic over `f32` and `f64` through [`Scalar`].
//! - Constructors validate (shapes, rank, alpha, finiteness) and return [`Error`]; nothing panics
//!   on bad input, and a [`LoraLayer`] in hand is always consistent.
//! - The forward pass never builds dW: (x Aᵀ) is (n, r), so the LoRA branch costs 2r/d of the
//!   base product.
//!
//! # Example
//! ```
//! use lora_core::{Init, LoraLayer, Scaling, WeightLayout};
//! use ndarray::Array2;
//!
//! // A rank-2 adapter on a 4 -> 3 linear layer, with a non-zero B so that it does something.
//! let layer = LoraLayer::<f64>::init(4, 3, 2, 8.0, Scaling::Standard, Init::Random { b_std: 0.1 }, 7)?;
//! assert_eq!(layer.scale(), 4.0); // alpha / r
//! assert_eq!(layer.param_count().trainable, 2 * (4 + 3));
//!
//! let mut w = Array2::<f64>::eye(4).slice_move(ndarray::s![..3, ..]);
//! let x = Array2::from_shape_fn((5, 4), |(i, j)| (i + j) as f64);
//! let y = layer.forward(&x, &w, WeightLayout::OutIn)?;
//!
//! layer.merge_into(&mut w, WeightLayout::OutIn)?; // W + s B A
//! let y_merged = x.dot(&w.t());
//! assert!((&y - &y_merged).iter().all(|d| d.abs() < 1e-12));
//! # Ok::<(), lora_core::Error>(())
//! ```
//!
//! # Features
//! - `blas`: large products through a CBLAS (ndarray's `blas` feature); the final binary must
//!   link one.
//! - `openblas-system`: `blas`, linked against the system OpenBLAS (Debian: `libopenblas-dev`).
#![deny(missing_docs)]

#[cfg(feature = "openblas-system")]
extern crate openblas_src as _;

mod adapter;
mod count;
mod dora;
mod error;
mod layer;
mod scalar;
mod source;

pub use adapter::{deltas, Adapter, AdapterConfig, AdapterModule, ModuleKind, TargetModules};
pub use count::ParamCount;
pub use dora::DoraLayer;
pub use error::{Error, Result, ShapePattern};
pub use layer::{Init, LoraLayer, Scaling, WeightLayout};
pub use scalar::Scalar;
pub use source::{read_matrix, DType, MemorySource, Stored, TensorInfo, TensorSource};

#[cfg(test)]
mod tests;
