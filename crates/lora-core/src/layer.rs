//! One LoRA layer: the factors A and B, alpha and the scaling rule.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayRef2, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::count::ParamCount;
use crate::error::{Error, Result, ShapePattern};
use crate::Scalar;

/// How the scale s is derived from alpha and the rank r.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Scaling {
    /// s = alpha / r, the LoRA paper's rule and PEFT's default.
    #[default]
    Standard,
    /// s = alpha / sqrt(r), rank-stabilised LoRA (PEFT's `use_rslora = true`).
    RsLora,
}

impl Scaling {
    /// The scale for this alpha and rank.
    pub fn scale(self, alpha: f64, rank: usize) -> f64 {
        match self {
            Scaling::Standard => alpha / rank as f64,
            Scaling::RsLora => alpha / (rank as f64).sqrt(),
        }
    }

    /// The alpha that gives scale `scale` at rank `rank` (inverse of [`Scaling::scale`]).
    pub fn alpha_for_scale(self, scale: f64, rank: usize) -> f64 {
        match self {
            Scaling::Standard => scale * rank as f64,
            Scaling::RsLora => scale * (rank as f64).sqrt(),
        }
    }
}

/// How a frozen weight W is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WeightLayout {
    /// (d_out, d_in), as `torch.nn.Linear`: the PEFT default.
    #[default]
    OutIn,
    /// (d_in, d_out), as GPT-2's `Conv1D` (PEFT's `fan_in_fan_out = true`) and as embedding tables
    /// (num_embeddings, embedding_dim) seen from the LoRA factors.
    InOut,
}

impl WeightLayout {
    /// The stored shape of a weight mapping d_in to d_out.
    pub fn shape(self, d_out: usize, d_in: usize) -> [usize; 2] {
        match self {
            WeightLayout::OutIn => [d_out, d_in],
            WeightLayout::InOut => [d_in, d_out],
        }
    }
}

/// How a new layer's factors are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Init {
    /// PEFT's default (`init_lora_weights = True`): A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), which is
    /// `kaiming_uniform_(a = sqrt(5))`; B = 0, so the new adapter changes nothing.
    #[default]
    KaimingUniform,
    /// PEFT's `init_lora_weights = "gaussian"`: A ~ N(0, (1/r)^2); B = 0.
    Gaussian,
    /// Both factors random (A as `KaimingUniform`, B ~ N(0, std^2)): for tests and benchmarks
    /// that need a non-zero delta.
    Random {
        /// Standard deviation of B's entries.
        b_std: f64,
    },
}

/// A LoRA layer: dW = s B A with A (r x d_in), B (d_out x r) and s from alpha, r and [`Scaling`].
///
/// The constructor validates shapes, rank, alpha and finiteness; a value of this type is always
/// usable. Fields are read through getters; build a new layer to change one.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraLayer<T> {
    a: Array2<T>,
    b: Array2<T>,
    alpha: f64,
    scaling: Scaling,
}

impl<T: Scalar> LoraLayer<T> {
    /// A layer from given factors. `a` is (r, d_in) and `b` is (d_out, r), as PEFT stores
    /// `lora_A.weight` and `lora_B.weight`.
    pub fn new(a: Array2<T>, b: Array2<T>, alpha: f64, scaling: Scaling) -> Result<Self> {
        let rank = a.nrows();
        if rank == 0 {
            return Err(Error::ZeroRank);
        }
        if a.ncols() == 0 {
            return Err(Error::EmptyDimension { what: "lora_A".into(), shape: a.shape().to_vec() });
        }
        if b.ncols() != rank {
            return Err(Error::shape("lora_B", ShapePattern(vec![None, Some(rank)]), b.shape()));
        }
        if b.nrows() == 0 {
            return Err(Error::EmptyDimension { what: "lora_B".into(), shape: b.shape().to_vec() });
        }
        if !alpha.is_finite() {
            return Err(Error::NonFiniteAlpha { alpha });
        }
        check_finite("lora_A", &a)?;
        check_finite("lora_B", &b)?;
        Ok(LoraLayer { a, b, alpha, scaling })
    }

    /// A new layer initialised as PEFT does, reproducible from `seed`.
    pub fn init(
        d_in: usize,
        d_out: usize,
        rank: usize,
        alpha: f64,
        scaling: Scaling,
        init: Init,
        seed: u64,
    ) -> Result<Self> {
        if rank == 0 {
            return Err(Error::ZeroRank);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bound = 1.0 / (d_in.max(1) as f64).sqrt();
        let uniform = Uniform::new_inclusive(-bound, bound).expect("bound is finite and positive");
        let a = match init {
            Init::Gaussian => {
                let normal = Normal::new(0.0, 1.0 / rank as f64).expect("std is finite");
                random_matrix(rank, d_in, &mut rng, normal)
            }
            Init::KaimingUniform | Init::Random { .. } => random_matrix(rank, d_in, &mut rng, uniform),
        };
        let b = match init {
            Init::Random { b_std } => {
                if !(b_std.is_finite() && b_std >= 0.0) {
                    return Err(Error::InvalidParameter { name: "b_std", value: b_std });
                }
                let normal = Normal::new(0.0, b_std).expect("std checked above");
                random_matrix(d_out, rank, &mut rng, normal)
            }
            _ => Array2::zeros((d_out, rank)),
        };
        Self::new(a, b, alpha, scaling)
    }

    /// A, shape (r, d_in).
    pub fn a(&self) -> &Array2<T> {
        &self.a
    }

    /// B, shape (d_out, r).
    pub fn b(&self) -> &Array2<T> {
        &self.b
    }

    /// alpha as stored (PEFT's `lora_alpha`).
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The scaling rule.
    pub fn scaling(&self) -> Scaling {
        self.scaling
    }

    /// The rank r.
    pub fn rank(&self) -> usize {
        self.a.nrows()
    }

    /// Input features d_in.
    pub fn d_in(&self) -> usize {
        self.a.ncols()
    }

    /// Output features d_out.
    pub fn d_out(&self) -> usize {
        self.b.nrows()
    }

    /// The scale s (alpha / r or alpha / sqrt(r)).
    pub fn scale(&self) -> f64 {
        self.scaling.scale(self.alpha, self.rank())
    }

    /// The factors, consuming the layer.
    pub fn into_factors(self) -> (Array2<T>, Array2<T>) {
        (self.a, self.b)
    }

    /// The same delta expressed with another alpha and scaling rule: the factors absorb the
    /// change of scale (B is multiplied by s_old / s_new).
    pub fn with_alpha(&self, alpha: f64, scaling: Scaling) -> Result<Self> {
        if !alpha.is_finite() {
            return Err(Error::NonFiniteAlpha { alpha });
        }
        let s_new = scaling.scale(alpha, self.rank());
        if s_new == 0.0 {
            return Err(Error::NonFiniteFactor { factor: f64::INFINITY });
        }
        let factor = T::from_f64(self.scale() / s_new);
        Self::new(self.a.clone(), &self.b * factor, alpha, scaling)
    }

    /// The layer with its delta multiplied by `factor` (B scaled, alpha kept).
    pub fn scaled(&self, factor: f64) -> Result<Self> {
        if !factor.is_finite() {
            return Err(Error::NonFiniteFactor { factor });
        }
        Self::new(self.a.clone(), &self.b * T::from_f64(factor), self.alpha, self.scaling)
    }

    /// dW = s B A, shape (d_out, d_in).
    pub fn delta(&self) -> Array2<T> {
        let mut d = Array2::zeros((self.d_out(), self.d_in()));
        general_mat_mul(T::from_f64(self.scale()), &self.b, &self.a, T::zero(), &mut d);
        d
    }

    /// dW in the stored layout of the weight: (d_out, d_in) or, for [`WeightLayout::InOut`],
    /// its transpose.
    pub fn delta_in(&self, layout: WeightLayout) -> Array2<T> {
        match layout {
            WeightLayout::OutIn => self.delta(),
            WeightLayout::InOut => {
                let mut d = Array2::zeros((self.d_in(), self.d_out()));
                let s = T::from_f64(self.scale());
                general_mat_mul(s, &self.a.t(), &self.b.t(), T::zero(), &mut d);
                d
            }
        }
    }

    /// The LoRA branch alone: s (x Aᵀ) Bᵀ for x of shape (n, d_in); shape (n, d_out).
    pub fn lora_branch(&self, x: &ArrayRef2<T>) -> Result<Array2<T>> {
        self.check_input(x)?;
        let mut y = Array2::zeros((x.nrows(), self.d_out()));
        self.add_branch(x, &mut y);
        Ok(y)
    }

    /// The adapted layer's output x Wᵀ + s (x Aᵀ) Bᵀ, without building dW. `w` is stored in
    /// `layout`; x is (n, d_in); the result is (n, d_out).
    pub fn forward(&self, x: &ArrayRef2<T>, w: &ArrayRef2<T>, layout: WeightLayout) -> Result<Array2<T>> {
        self.check_input(x)?;
        self.check_weight(w, layout)?;
        // The small LoRA product first, then the base product accumulates into it (beta = 1):
        // y is written once by the k = r product and updated in place by the large GEMM, instead
        // of a second pass over y after it.
        let mut y = Array2::zeros((x.nrows(), self.d_out()));
        self.add_branch(x, &mut y);
        match layout {
            WeightLayout::OutIn => general_mat_mul(T::one(), x, &w.t(), T::one(), &mut y),
            WeightLayout::InOut => general_mat_mul(T::one(), x, w, T::one(), &mut y),
        }
        Ok(y)
    }

    /// W += s B A, in the weight's stored layout.
    pub fn merge_into(&self, w: &mut ArrayRef2<T>, layout: WeightLayout) -> Result<()> {
        self.add_delta(w, layout, T::one())
    }

    /// W -= s B A, the inverse of [`LoraLayer::merge_into`] (up to rounding).
    pub fn unmerge_from(&self, w: &mut ArrayRef2<T>, layout: WeightLayout) -> Result<()> {
        self.add_delta(w, layout, -T::one())
    }

    /// Trainable parameters r (d_in + d_out) against the full layer's d_in d_out.
    pub fn param_count(&self) -> ParamCount {
        ParamCount::lora(self.d_in(), self.d_out(), self.rank())
    }

    fn add_delta(&self, w: &mut ArrayRef2<T>, layout: WeightLayout, sign: T) -> Result<()> {
        self.check_weight(w, layout)?;
        let s = sign * T::from_f64(self.scale());
        match layout {
            WeightLayout::OutIn => general_mat_mul(s, &self.b, &self.a, T::one(), w),
            WeightLayout::InOut => general_mat_mul(s, &self.a.t(), &self.b.t(), T::one(), w),
        }
        Ok(())
    }

    /// y += s (x Aᵀ) Bᵀ; the scale is applied to the small (n, r) product.
    fn add_branch(&self, x: &ArrayRef2<T>, y: &mut ArrayRef2<T>) {
        let mut xa = x.dot(&self.a.t());
        xa *= T::from_f64(self.scale());
        general_mat_mul(T::one(), &xa, &self.b.t(), T::one(), y);
    }

    fn check_input(&self, x: &ArrayRef2<T>) -> Result<()> {
        if x.ncols() != self.d_in() {
            return Err(Error::shape("x", ShapePattern(vec![None, Some(self.d_in())]), x.shape()));
        }
        Ok(())
    }

    pub(crate) fn check_weight(&self, w: &ArrayRef2<T>, layout: WeightLayout) -> Result<()> {
        let expected = layout.shape(self.d_out(), self.d_in());
        if w.shape() != expected {
            return Err(Error::shape("W", ShapePattern::exact(&expected), w.shape()));
        }
        Ok(())
    }
}

/// The first non-finite entry of a tensor, as an error naming `what`.
pub(crate) fn check_finite<T: Scalar, D: ndarray::Dimension>(what: &str, m: &ndarray::ArrayRef<T, D>) -> Result<()> {
    match m.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(flat) => Err(Error::NonFinite { what: what.into(), index: unravel(flat, m.shape()) }),
    }
}

/// The multi-index of the `flat`-th element in logical (row-major) order.
fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (i, &len) in shape.iter().enumerate().rev() {
        index[i] = flat % len;
        flat /= len;
    }
    index
}

fn random_matrix<T: Scalar, D: Distribution<f64>>(rows: usize, cols: usize, rng: &mut impl Rng, dist: D) -> Array2<T> {
    let mut m = Array2::zeros((rows, cols));
    for v in m.iter_mut() {
        *v = T::from_f64(dist.sample(rng));
    }
    m
}

/// The Euclidean norm of every row of `m`, accumulated in f64.
pub(crate) fn row_norms<T: Scalar>(m: &ArrayRef2<T>) -> Vec<f64> {
    m.axis_iter(Axis(0)).map(|row| row.iter().map(|v| v.as_f64() * v.as_f64()).sum::<f64>().sqrt()).collect()
}

impl<T: Scalar> LoraLayer<T> {
    /// The same delta with the scale folded into B: alpha = r, [`Scaling::Standard`], s = 1.
    pub fn with_unit_scale(&self) -> Result<Self> {
        self.with_alpha(self.rank() as f64, Scaling::Standard)
    }

    /// Exact sum of two layers on the same module by concatenation: A = [A1; A2],
    /// B = [s1 B1 | s2 B2], alpha = r1 + r2 with [`Scaling::Standard`] (s = 1), so the delta is
    /// dW1 + dW2 to rounding and the rank is r1 + r2.
    pub fn concat(&self, other: &LoraLayer<T>) -> Result<Self> {
        if other.d_in() != self.d_in() || other.d_out() != self.d_out() {
            return Err(Error::shape(
                "second layer (d_out, d_in)",
                ShapePattern::exact(&[self.d_out(), self.d_in()]),
                &[other.d_out(), other.d_in()],
            ));
        }
        let a = ndarray::concatenate(Axis(0), &[self.a.view(), other.a.view()]).expect("column counts checked above");
        let b1 = &self.b * T::from_f64(self.scale());
        let b2 = &other.b * T::from_f64(other.scale());
        let b = ndarray::concatenate(Axis(1), &[b1.view(), b2.view()]).expect("row counts checked above");
        let rank = a.nrows();
        Self::new(a, b, rank as f64, Scaling::Standard)
    }
}
