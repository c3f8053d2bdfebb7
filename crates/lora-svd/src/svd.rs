//! Truncated SVD of a matrix: exact (LAPACK's divide-and-conquer gesdd) or randomized
//! (Halko, Martinsson and Tropp 2011), with the rank picked by a [`RankRule`].

use std::time::{Duration, Instant};

use ndarray::{s, Array1, Array2, ArrayRef2, Axis};
use ndarray_linalg::{JobSvd, QRInto, SVDDCInto};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};
use crate::rank::RankRule;

/// The element types the SVD runs on: `f32` (the default everywhere) and `f64`.
///
/// Sealed: implemented for exactly the types both lora-core and LAPACK support.
pub trait SvdScalar:
    lora_core::Scalar + ndarray_linalg::Lapack + ndarray_linalg::Scalar<Real = Self> + private::Sealed
{
    /// The machine epsilon, as f64.
    const EPS: f64;
}

impl SvdScalar for f32 {
    const EPS: f64 = f32::EPSILON as f64;
}

impl SvdScalar for f64 {
    const EPS: f64 = f64::EPSILON;
}

mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// Parameters of the randomized SVD.
///
/// The sketch has `rank + oversample` columns and is refined by `power_iters` power iterations,
/// each re-orthonormalised. The random test matrix is drawn from a ChaCha8 generator seeded by
/// `seed`, so a run is reproducible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Randomized {
    /// Extra sketch columns beyond the rank wanted.
    pub oversample: usize,
    /// Power iterations (each is one product with dWᵀ and one with dW).
    pub power_iters: usize,
    /// Seed of the Gaussian test matrix.
    pub seed: u64,
}

impl Default for Randomized {
    /// `oversample = 32, power_iters = 2, seed = 0`: on this crate's benchmarks (a 1/i spectrum
    /// plus noise) within 0.2% of the optimal error at rank 64 (see docs/benchmarks.md).
    fn default() -> Self {
        Randomized { oversample: 32, power_iters: 2, seed: 0 }
    }
}

/// How to compute a truncated SVD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SvdMethod {
    /// Every singular value, by LAPACK's divide-and-conquer SVD (gesdd), then truncation.
    Exact,
    /// A randomized sketch of the leading singular subspace. For rules that do not fix the rank
    /// the sketch grows (doubling) until the rule is decided inside it or the cap is reached.
    Randomized(Randomized),
    /// Randomized while the sketch stays small against min(d_out, d_in) (at most a quarter of
    /// it), exact otherwise, and exact for rules that need the whole spectrum.
    Auto(Randomized),
}

impl Default for SvdMethod {
    fn default() -> Self {
        SvdMethod::Auto(Randomized::default())
    }
}

/// The method that was actually run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MethodUsed {
    /// The full SVD.
    Exact,
    /// A randomized sketch.
    Randomized {
        /// Columns of the last sketch.
        sketch: usize,
        /// Power iterations per sketch.
        power_iters: usize,
        /// Sketches computed (more than one when the sketch had to grow).
        rounds: usize,
    },
    /// The exact SVD of a product of thin factors (QR of each factor, SVD of the small core):
    /// resize and SVD combination.
    Factored,
}

/// A truncated SVD dW ≈ U diag(S) Vᵀ, with what is known about the part left out.
#[derive(Debug, Clone, PartialEq)]
pub struct TruncatedSvd<T> {
    u: Array2<T>,
    s: Array1<T>,
    vt: Array2<T>,
    spectrum: Vec<f64>,
    total_energy: f64,
    residual_energy: f64,
    method: MethodUsed,
    elapsed: Duration,
}

impl<T: SvdScalar> TruncatedSvd<T> {
    /// U, shape (d_out, k), orthonormal columns.
    pub fn u(&self) -> &Array2<T> {
        &self.u
    }

    /// The kept singular values, descending, length k.
    pub fn s(&self) -> &Array1<T> {
        &self.s
    }

    /// Vᵀ, shape (k, d_in), orthonormal rows.
    pub fn vt(&self) -> &Array2<T> {
        &self.vt
    }

    /// The rank k.
    pub fn rank(&self) -> usize {
        self.s.len()
    }

    /// Every singular value computed, descending (the whole spectrum with the exact method, the
    /// sketch's values with the randomized one: those are lower bounds of the true ones).
    pub fn spectrum(&self) -> &[f64] {
        &self.spectrum
    }

    /// ||dW||_F^2, computed from the matrix itself.
    pub fn total_energy(&self) -> f64 {
        self.total_energy
    }

    /// ||dW - U S Vᵀ||_F^2.
    pub fn residual_energy(&self) -> f64 {
        self.residual_energy
    }

    /// ||dW - U S Vᵀ||_F / ||dW||_F (0 for a zero matrix).
    pub fn relative_error(&self) -> f64 {
        if self.total_energy > 0.0 {
            (self.residual_energy / self.total_energy).sqrt()
        } else {
            0.0
        }
    }

    /// The fraction of ||dW||_F^2 kept (1 for a zero matrix).
    pub fn retained_energy(&self) -> f64 {
        if self.total_energy > 0.0 {
            (1.0 - self.residual_energy / self.total_energy).clamp(0.0, 1.0)
        } else {
            1.0
        }
    }

    /// The method run.
    pub fn method(&self) -> MethodUsed {
        self.method
    }

    /// Wall time of the decomposition.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// The factors (U, S, Vᵀ), consuming the result.
    pub fn into_parts(self) -> (Array2<T>, Array1<T>, Array2<T>) {
        (self.u, self.s, self.vt)
    }
}

/// The truncated SVD of `a` with the rank picked by `rule`.
///
/// The work runs on the calling thread and in the BLAS/LAPACK library (whose own threads the
/// binary sets, for example with `OPENBLAS_NUM_THREADS`); nothing else is parallel, and for a
/// given seed the result is the same on every run.
///
/// Errors: an empty or non-finite `a`, or a rule that needs the whole spectrum with
/// [`SvdMethod::Randomized`].
pub fn truncated_svd<T: SvdScalar>(a: &ArrayRef2<T>, rule: &RankRule, method: &SvdMethod) -> Result<TruncatedSvd<T>> {
    let start = Instant::now();
    check_matrix("matrix", a)?;
    let (m, n) = a.dim();
    let min_dim = m.min(n);
    let total = energy(a);
    let criterion = rule.criterion();
    let params = match *method {
        SvdMethod::Exact => None,
        SvdMethod::Randomized(p) => {
            if criterion.needs_whole_spectrum() {
                return Err(Error::NeedsExact { rule: criterion.name() });
            }
            Some((p, false))
        }
        SvdMethod::Auto(p) => (!criterion.needs_whole_spectrum()).then_some((p, true)),
    };
    let mut out = match params {
        None => exact(a, rule, total)?,
        Some((p, auto)) => {
            let first = first_guess(rule, min_dim);
            if auto && !worth_sketching(first + p.oversample, min_dim) {
                exact(a, rule, total)?
            } else {
                randomized(a, rule, total, p, auto)?
            }
        }
    };
    out.elapsed = start.elapsed();
    Ok(out)
}

/// The rank a sketch is first sized for.
fn first_guess(rule: &RankRule, min_dim: usize) -> usize {
    let cap = rule.cap(min_dim);
    match rule.criterion() {
        crate::Criterion::Fixed(r) => r.max(rule.min_rank()).min(cap),
        _ => 32.max(rule.min_rank()).min(cap),
    }
}

/// Auto's choice: a sketch of `l` columns pays off while it is at most a quarter of min_dim.
fn worth_sketching(l: usize, min_dim: usize) -> bool {
    4 * l <= min_dim
}

fn exact<T: SvdScalar>(a: &ArrayRef2<T>, rule: &RankRule, total: f64) -> Result<TruncatedSvd<T>> {
    let (m, n) = a.dim();
    let (u, s, vt) = a
        .to_owned()
        .svddc_into(JobSvd::Some)
        .map_err(|source| Error::Lapack { routine: "gesdd", rows: m, cols: n, source })?;
    let (u, vt) = (u.expect("gesdd was asked for U"), vt.expect("gesdd was asked for Vt"));
    let spectrum: Vec<f64> = s.iter().map(|v| v.as_f64()).collect();
    check_spectrum(&spectrum, m, n)?;
    let k = rule.decide(&spectrum, total, m.min(n), None).rank;
    let residual: f64 = spectrum[k..].iter().map(|v| v * v).sum();
    Ok(TruncatedSvd {
        u: u.slice(s![.., ..k]).to_owned(),
        s: s.slice(s![..k]).to_owned(),
        vt: vt.slice(s![..k, ..]).to_owned(),
        spectrum,
        total_energy: total,
        residual_energy: residual,
        method: MethodUsed::Exact,
        elapsed: Duration::ZERO,
    })
}

fn randomized<T: SvdScalar>(
    a: &ArrayRef2<T>,
    rule: &RankRule,
    total: f64,
    params: Randomized,
    auto: bool,
) -> Result<TruncatedSvd<T>> {
    let (m, n) = a.dim();
    let min_dim = m.min(n);
    let cap = rule.cap(min_dim);
    let mut want = first_guess(rule, min_dim);
    let mut rounds = 0;
    loop {
        rounds += 1;
        let l = (want + params.oversample).min(min_dim);
        let seed = params.seed.wrapping_add((rounds as u64 - 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let sketch = sketch(a, l, params.power_iters, seed)?;
        let complete = l == min_dim;
        let trusted = (!complete).then_some(want);
        let decision = rule.decide(&sketch.sigma, total, min_dim, trusted);
        if decision.decided || complete || want >= cap {
            return finish(a, sketch, decision.rank, total, MethodUsed::Randomized {
                sketch: l,
                power_iters: params.power_iters,
                rounds,
            });
        }
        want = (2 * want).min(cap);
        if auto && !worth_sketching(want + params.oversample, min_dim) {
            return exact(a, rule, total);
        }
    }
}

/// A sketch: orthonormal Q (m, l) and the SVD of B = Qᵀ A = Ub diag(sigma) Vtᵀ.
struct Sketch<T> {
    q: Array2<T>,
    ub: Array2<T>,
    sigma: Vec<f64>,
    vt: Array2<T>,
    b_energy: f64,
}

/// Randomized range finder with `power_iters` re-orthonormalised power iterations, then the SVD
/// of the small projection.
fn sketch<T: SvdScalar>(a: &ArrayRef2<T>, l: usize, power_iters: usize, seed: u64) -> Result<Sketch<T>> {
    let (m, n) = a.dim();
    let omega = gaussian::<T>(n, l, seed);
    let mut q = orthonormalize(a.dot(&omega))?;
    drop(omega);
    for _ in 0..power_iters {
        let z = orthonormalize(a.t().dot(&q))?;
        q = orthonormalize(a.dot(&z))?;
    }
    let b = q.t().dot(a);
    let b_energy = energy(&b);
    let (ub, sigma, vt) =
        b.svddc_into(JobSvd::Some).map_err(|source| Error::Lapack { routine: "gesdd", rows: l, cols: n, source })?;
    let sigma: Vec<f64> = sigma.iter().map(|v| v.as_f64()).collect();
    check_spectrum(&sigma, m, n)?;
    Ok(Sketch { q, ub: ub.expect("gesdd was asked for U"), sigma, vt: vt.expect("gesdd was asked for Vt"), b_energy })
}

fn finish<T: SvdScalar>(
    a: &ArrayRef2<T>,
    sk: Sketch<T>,
    k: usize,
    total: f64,
    method: MethodUsed,
) -> Result<TruncatedSvd<T>> {
    let k = k.min(sk.sigma.len());
    let u = sk.q.dot(&sk.ub.slice(s![.., ..k]));
    let s = Array1::from_iter(sk.sigma[..k].iter().map(|&v| <T as lora_core::Scalar>::from_f64(v)));
    let vt = sk.vt.slice(s![..k, ..]).to_owned();
    // ||A - U S Vᵀ||² = ||A - Q B||² + ||B - B_k||²; the first term by subtraction, unless
    // cancellation would make it meaningless, in which case it is measured directly.
    let dropped: f64 = sk.sigma[k..].iter().map(|v| v * v).sum();
    let mut outside = (total - sk.b_energy).max(0.0);
    if outside < 1e4 * T::EPS * total {
        outside = residual_outside(a, &sk.q);
    }
    Ok(TruncatedSvd {
        u,
        s,
        vt,
        spectrum: sk.sigma,
        total_energy: total,
        residual_energy: outside + dropped,
        method,
        elapsed: Duration::ZERO,
    })
}

/// ||A - Q Qᵀ A||_F^2, measured directly in blocks of rows of A.
fn residual_outside<T: SvdScalar>(a: &ArrayRef2<T>, q: &Array2<T>) -> f64 {
    let b = q.t().dot(a);
    let mut sum = 0.0;
    for start in (0..a.nrows()).step_by(256) {
        let end = (start + 256).min(a.nrows());
        let mut block = a.slice(s![start..end, ..]).to_owned();
        ndarray::linalg::general_mat_mul(-T::one(), &q.slice(s![start..end, ..]), &b, T::one(), &mut block);
        sum += energy(&block);
    }
    sum
}

/// A matrix of independent standard normal entries, reproducible from `seed`.
pub(crate) fn gaussian<T: SvdScalar>(rows: usize, cols: usize, seed: u64) -> Array2<T> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Array2::from_shape_simple_fn((rows, cols), || {
        let v: f64 = StandardNormal.sample(&mut rng);
        <T as lora_core::Scalar>::from_f64(v)
    })
}

/// An orthonormal basis of the columns of `y` (m, l) with m >= l: Cholesky QR twice when `y` is
/// well enough conditioned (all matrix products), Householder QR (LAPACK geqrf) otherwise.
pub(crate) fn orthonormalize<T: SvdScalar>(y: Array2<T>) -> Result<Array2<T>> {
    if y.ncols() <= 512 {
        if let Some((q, _)) = cholesky_qr(&y).and_then(|(q1, _)| cholesky_qr(&q1)) {
            return Ok(q);
        }
    }
    householder_q(y)
}

/// A thin QR of `y` (m, l): Q (m, k) with orthonormal columns and R (k, l) with Y = Q R,
/// k = min(m, l). R is upper triangular on the Cholesky path, and Qᵀ Y on the Householder one.
pub(crate) fn thin_qr(y: Array2<f64>) -> Result<(Array2<f64>, Array2<f64>)> {
    if y.ncols() <= 512 && y.nrows() >= y.ncols() {
        if let Some((q1, r1)) = cholesky_qr(&y) {
            if let Some((q, r2)) = cholesky_qr(&q1) {
                return Ok((q, r2.dot(&r1)));
            }
        }
    }
    let q = householder_q(y.clone())?;
    let r = q.t().dot(&y);
    Ok((q, r))
}

/// Q of the thin Householder QR of `y`.
pub(crate) fn householder_q<T: SvdScalar>(y: Array2<T>) -> Result<Array2<T>> {
    let (m, l) = y.dim();
    let (q, _r) = y.qr_into().map_err(|source| Error::Lapack { routine: "geqrf", rows: m, cols: l, source })?;
    Ok(q)
}

/// Q = Y R⁻¹ with Rᵀ R = Yᵀ Y, or `None` when Y is too ill-conditioned for this to be accurate
/// (one pass loses orthogonality like cond(Y)² eps; two passes recover it while that is < 1).
fn cholesky_qr<T: SvdScalar>(y: &Array2<T>) -> Option<(Array2<T>, Array2<f64>)> {
    let l = y.ncols();
    let g = y.t().dot(y);
    let mut r = vec![0.0f64; l * l];
    for j in 0..l {
        let mut d = g[[j, j]].as_f64();
        for k in 0..j {
            d -= r[k * l + j] * r[k * l + j];
        }
        if !(d > 0.0 && d.is_finite()) {
            return None;
        }
        let rjj = d.sqrt();
        r[j * l + j] = rjj;
        for i in j + 1..l {
            let mut v = g[[j, i]].as_f64();
            for k in 0..j {
                v -= r[k * l + j] * r[k * l + i];
            }
            r[j * l + i] = v / rjj;
        }
    }
    let diag = (0..l).map(|j| r[j * l + j]);
    let (lo, hi) = diag.fold((f64::INFINITY, 0.0f64), |(lo, hi), d| (lo.min(d), hi.max(d)));
    let cond = hi / lo;
    if !(cond * cond * T::EPS * 64.0 < 1.0) {
        return None;
    }
    // R⁻¹, upper triangular, by back substitution column by column.
    let mut rinv = Array2::<T>::zeros((l, l));
    let mut col = vec![0.0f64; l];
    for c in 0..l {
        col.iter_mut().for_each(|v| *v = 0.0);
        col[c] = 1.0 / r[c * l + c];
        for i in (0..c).rev() {
            let mut v = 0.0;
            for k in i + 1..=c {
                v -= r[i * l + k] * col[k];
            }
            col[i] = v / r[i * l + i];
        }
        for i in 0..=c {
            rinv[[i, c]] = <T as lora_core::Scalar>::from_f64(col[i]);
        }
    }
    let r = Array2::from_shape_vec((l, l), r).expect("l * l values");
    Some((y.dot(&rinv), r))
}

/// ||m||_F^2, accumulated in f64.
pub(crate) fn energy<T: SvdScalar>(m: &ArrayRef2<T>) -> f64 {
    m.axis_iter(Axis(0)).map(|row| row.iter().map(|v| v.as_f64() * v.as_f64()).sum::<f64>()).sum()
}

/// An error for an empty matrix or one holding NaN or an infinity.
pub(crate) fn check_matrix<T: SvdScalar>(what: &str, m: &ArrayRef2<T>) -> Result<()> {
    if m.is_empty() {
        return Err(Error::Empty { what: what.into(), shape: m.shape().to_vec() });
    }
    if let Some(flat) = m.iter().position(|v| !v.is_finite()) {
        let cols = m.ncols();
        return Err(Error::NonFinite { what: what.into(), index: vec![flat / cols, flat % cols] });
    }
    Ok(())
}

/// LAPACK returns NaN singular values when it overflows; say so instead of passing them on.
fn check_spectrum(sigma: &[f64], m: usize, n: usize) -> Result<()> {
    match sigma.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::NonFinite { what: format!("singular values of a {m} x {n} matrix"), index: vec![i] }),
    }
}
