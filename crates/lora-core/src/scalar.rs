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
    /// e^self written without branches or library calls, so that loops over slices vectorise
    /// (softmax, SiLU). `f64` uses [`Float::exp`]; `f32` a Cephes-style polynomial within 2 ulp
    /// of it on [-87, 88], and arguments outside that range clamped to it (e^-87 ≈ 1.6e-38 and
    /// e^88 ≈ 1.7e38 stand for every smaller and larger result); NaN stays NaN.
    #[inline]
    fn exp_vectorised(self) -> Self {
        self.exp()
    }
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
    #[inline(always)]
    fn exp_vectorised(self) -> f32 {
        // e^x = 2^n e^r with n = round(x log2 e) and |r| <= ln 2 / 2; adding 1.5 x 2^23 rounds
        // x log2 e to an integer held in the low bits of the sum (round to nearest even)
        const SHIFTER: f32 = 12_582_912.0;
        let x = self.clamp(-87.0, 88.0);
        let t = x * std::f32::consts::LOG2_E + SHIFTER;
        let n = t - SHIFTER;
        // Cody-Waite: ln 2 in two parts, the first exact in few bits so n times it is exact
        let r = (x - n * 0.693_359_4) - n * -2.121_944_4e-4;
        let mut p = 1.987_569_1e-4_f32;
        p = p * r + 1.398_199_9e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 1.666_666_5e-1;
        p = p * r + 0.5;
        let y = p * r * r + r + 1.0;
        // 2^n from n's bits: n in [-126, 127] for x in [-87, 88], a normal exponent
        let n_bits = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
        y * f32::from_bits((n_bits.wrapping_add(127) as u32) << 23)
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
