//! The element types the math runs on.

use std::fmt::{Debug, Display};
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

use ndarray::{ArrayD, LinalgScalar, ScalarOperand};
use num_traits::Float;

use crate::{Result, TensorSource};

/// A floating-point element type: `f32` (the default everywhere) or `f64` (for tests that need
/// the precision).
pub trait Scalar:
    LinalgScalar
    + Float
    + ScalarOperand
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
    + Debug
    + Display
    + Default
    + Send
    + Sync
    + 'static
{
    /// Convert from f64, rounding to nearest.
    fn from_f64(v: f64) -> Self;
    /// Convert to f64 (exact).
    fn as_f64(self) -> f64;
    /// Read a tensor from a source in this type.
    fn read_from<S: TensorSource + ?Sized>(source: &S, name: &str) -> Result<ArrayD<Self>>;
}

impl Scalar for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn as_f64(self) -> f64 {
        f64::from(self)
    }
    fn read_from<S: TensorSource + ?Sized>(source: &S, name: &str) -> Result<ArrayD<Self>> {
        source.read_f32(name)
    }
}

impl Scalar for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
    fn as_f64(self) -> f64 {
        self
    }
    fn read_from<S: TensorSource + ?Sized>(source: &S, name: &str) -> Result<ArrayD<Self>> {
        source.read_f64(name)
    }
}
