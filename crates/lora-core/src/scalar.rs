//! The element types the math runs on.

use std::fmt::{Debug, Display};
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

use ndarray::{ArrayD, LinalgScalar, ScalarOperand};
use num_traits::Float;

use half::{bf16, f16};

use crate::{DType, Result, TensorSource};

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
    /// Convert little-endian `dtype` values into `out` (`out.len()` elements of `bytes`).
    fn decode_le(dtype: DType, bytes: &[u8], out: &mut [Self]);
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
    fn decode_le(dtype: DType, bytes: &[u8], out: &mut [Self]) {
        match dtype {
            DType::F32 => each::<4, _>(bytes, out, f32::from_le_bytes),
            DType::F16 => each::<2, _>(bytes, out, |b| f16::from_le_bytes(b).to_f32()),
            DType::BF16 => each::<2, _>(bytes, out, |b| bf16::from_le_bytes(b).to_f32()),
            DType::F64 => each::<8, _>(bytes, out, |b| f64::from_le_bytes(b) as f32),
        }
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
    fn decode_le(dtype: DType, bytes: &[u8], out: &mut [Self]) {
        match dtype {
            DType::F32 => each::<4, _>(bytes, out, |b| f64::from(f32::from_le_bytes(b))),
            DType::F16 => each::<2, _>(bytes, out, |b| f16::from_le_bytes(b).to_f64()),
            DType::BF16 => each::<2, _>(bytes, out, |b| bf16::from_le_bytes(b).to_f64()),
            DType::F64 => each::<8, _>(bytes, out, f64::from_le_bytes),
        }
    }
}

/// `out[i] = convert(bytes of element i)` for elements of `W` bytes.
fn each<const W: usize, T>(bytes: &[u8], out: &mut [T], convert: impl Fn([u8; W]) -> T) {
    assert_eq!(bytes.len(), out.len() * W, "{} elements need {} bytes", out.len(), out.len() * W);
    for (c, o) in bytes.chunks_exact(W).zip(out) {
        *o = convert(c.try_into().expect("chunks of W bytes"));
    }
}
