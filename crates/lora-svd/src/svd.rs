//! Truncated SVD of a matrix: exact (LAPACK's divide-and-conquer gesdd) or randomized
//! (Halko, Martinsson and Tropp 2011), with the rank picked by a [`RankRule`].

use std::time::{Duration, Instant};

use ndarray::{s, Array1, Array2, ArrayRef2, Axis};
use ndarray_linalg::{Eigh, JobSvd, QRInto, SVDDCInto, UPLO};
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
    use ndarray::{Array2, ArrayRef2};

    /// Seals [`super::SvdScalar`], and carries the products with thin matrices, which have a
    /// kernel of their own in f32 ([`crate::thin`]); `None` means: use BLAS.
    pub trait Sealed: Sized {
        fn thin_mul(_a: &ArrayRef2<Self>, _x: &ArrayRef2<Self>) -> Option<Array2<Self>> {
            None
        }
        fn thin_mul_t(_a: &ArrayRef2<Self>, _x: &ArrayRef2<Self>) -> Option<Array2<Self>> {
            None
        }
    }
    impl Sealed for f32 {
        fn thin_mul(a: &ArrayRef2<f32>, x: &ArrayRef2<f32>) -> Option<Array2<f32>> {
            crate::thin::mul(a, x)
        }
        fn thin_mul_t(a: &ArrayRef2<f32>, x: &ArrayRef2<f32>) -> Option<Array2<f32>> {
            crate::thin::mul_t(a, x)
        }
    }
    impl Sealed for f64 {}
}

/// A X for a thin X.
fn times<T: SvdScalar>(a: &ArrayRef2<T>, x: &Array2<T>) -> Array2<T> {
    T::thin_mul(a, x).unwrap_or_else(|| a.dot(x))
}

/// Aᵀ X for a thin X.
fn times_t<T: SvdScalar>(a: &ArrayRef2<T>, x: &Array2<T>) -> Array2<T> {
    T::thin_mul_t(a, x).unwrap_or_else(|| a.t().dot(x))
}

/// Parameters of the randomized SVD.
///
/// A sketch for rank k has `k + max(oversample, k)` columns (at least twice the rank: the
/// extra columns matter more as k grows), rounded up to a multiple of 16, and is refined by `power_iters` power iterations, each
/// re-orthonormalised. The random test matrix is drawn from a ChaCha8 generator seeded by
/// `seed`, so a run is reproducible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Randomized {
    /// Extra sketch columns beyond the rank wanted, at least (the rank itself when larger).
    pub oversample: usize,
    /// Power iterations (each is one product with dWᵀ and one with dW).
    pub power_iters: usize,
    /// Seed of the Gaussian test matrix.
    pub seed: u64,
}

impl Randomized {
    /// Columns of a sketch for rank `k`: `k + max(oversample, k)`, rounded up to a multiple of
    /// 16 (the width of the f32 kernels; a wider sketch is only more accurate).
    pub fn columns(&self, k: usize) -> usize {
        (k + self.oversample.max(k)).next_multiple_of(16)
    }
}

impl Default for Randomized {
    /// `oversample = 32, power_iters = 1, seed = 0`: sketches of 48 columns for rank 16 and 128
    /// for rank 64. The products with dW are compute-bound here, so their cost grows with the
    /// columns; one power iteration over a sketch of 2-3 k columns (4 passes over dW) lands
    /// closer to the optimal error than torch's `svd_lowrank(q = k + 10, niter = 2)` (6 passes)
    /// for less work: on the extract bench's eight 4096 x 4096 deltas (1/i spectrum plus noise)
    /// 1.00019 of the optimal error at rank 16 against torch's 1.00034, and on lora-svd's bench
    /// matrix 1.00145 at rank 64 against 1.00412 (docs/benchmarks.md).
    fn default() -> Self {
        Randomized { oversample: 32, power_iters: 1, seed: 0 }
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
    truncated_svd_of("matrix", a, rule, method)
}

/// [`truncated_svd`], with errors about the input naming it `what`.
pub(crate) fn truncated_svd_of<T: SvdScalar>(
    what: &str,
    a: &ArrayRef2<T>,
    rule: &RankRule,
    method: &SvdMethod,
) -> Result<TruncatedSvd<T>> {
    let start = Instant::now();
    let total = checked_energy(what, a)?;
    let mut out = truncated_svd_with_energy(a, total, rule, method)?;
    out.elapsed = start.elapsed();
    Ok(out)
}

/// [`truncated_svd`] of a matrix whose squared Frobenius norm `total` the caller has computed
/// (in f64, finite) while it made the matrix, saving a pass over it. The elapsed time is the
/// decomposition's.
pub(crate) fn truncated_svd_with_energy<T: SvdScalar>(
    a: &ArrayRef2<T>,
    total: f64,
    rule: &RankRule,
    method: &SvdMethod,
) -> Result<TruncatedSvd<T>> {
    let start = Instant::now();
    let (m, n) = a.dim();
    let min_dim = m.min(n);
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
            if auto && !worth_sketching(p.columns(first), min_dim) {
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
    let (u, s, vt) = a.to_owned().svddc_into(JobSvd::Some).map_err(|source| Error::Lapack {
        routine: "gesdd",
        rows: m,
        cols: n,
        source,
    })?;
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
        let l = params.columns(want).min(min_dim);
        let seed = params.seed.wrapping_add((rounds as u64 - 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let sketch = sketch(a, l, params.power_iters, seed)?;
        let complete = l == min_dim;
        let trusted = (!complete).then_some(want);
        let decision = rule.decide(&sketch.sigma, total, min_dim, trusted);
        if decision.decided || complete || want >= cap {
            return finish(
                a,
                sketch,
                decision.rank,
                total,
                MethodUsed::Randomized { sketch: l, power_iters: params.power_iters, rounds },
            );
        }
        want = (2 * want).min(cap);
        if auto && !worth_sketching(params.columns(want), min_dim) {
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
    let n = a.ncols();
    let omega = gaussian::<T>(n, l, seed);
    let mut q = orthonormalize(times(a, &omega))?;
    drop(omega);
    for _ in 0..power_iters {
        let z = orthonormalize(times_t(a, &q))?;
        q = orthonormalize(times(a, &z))?;
    }
    let b = times_t(a, &q).reversed_axes();
    let b_energy = energy(&b);
    let (ub, sigma, vt) = small_svd(b)?;
    Ok(Sketch { q, ub, sigma, vt, b_energy })
}

/// The SVD of the short, wide B (l, n), l <= n: Ub (l, l), sigma, Vᵀ (l, n).
///
/// Through the eigendecomposition of B Bᵀ in f64 (a product and an l x l eigensolver, several
/// times faster than gesdd on B) when the spectrum is well enough conditioned for it: the
/// eigenvalues carry absolute errors of about eps_f64 l sigma_1^2, negligible for singular values
/// above sigma_1 1e-4. Otherwise gesdd on B.
fn small_svd<T: SvdScalar>(b: Array2<T>) -> Result<(Array2<T>, Vec<f64>, Array2<T>)> {
    let (l, n) = b.dim();
    let b64 = b.mapv(|v| v.as_f64());
    let gram = b64.dot(&b64.t());
    if let Ok((lambda, vectors)) = gram.eigh(UPLO::Upper) {
        let sigma: Vec<f64> = lambda.iter().rev().map(|&v| v.max(0.0).sqrt()).collect();
        let top = sigma.first().copied().unwrap_or(0.0);
        if sigma.iter().all(|v| v.is_finite()) && top > 0.0 && sigma[l - 1] >= 1e-4 * top {
            let ub = vectors.slice(s![.., ..;-1]).to_owned();
            let inv = Array1::from_iter(sigma.iter().map(|v| 1.0 / v));
            let vt = ub.t().dot(&b64) * &inv.insert_axis(Axis(1));
            return Ok((
                ub.mapv(<T as lora_core::Scalar>::from_f64),
                sigma,
                vt.mapv(<T as lora_core::Scalar>::from_f64),
            ));
        }
    }
    let (ub, sigma, vt) =
        b.svddc_into(JobSvd::Some).map_err(|source| Error::Lapack { routine: "gesdd", rows: l, cols: n, source })?;
    let sigma: Vec<f64> = sigma.iter().map(|v| v.as_f64()).collect();
    check_spectrum(&sigma, l, n)?;
    Ok((ub.expect("gesdd was asked for U"), sigma, vt.expect("gesdd was asked for Vt")))
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

/// The Cholesky factor R (upper, f64) of the Gram matrix Yᵀ Y of an f64 matrix, or `None` when
/// Y is too ill-conditioned for R to be accurate to `max_loss` (estimated as cond(R)^2 eps).
pub(crate) fn cholesky_r(y: &Array2<f64>, max_loss: f64) -> Option<Array2<f64>> {
    let l = y.ncols();
    let r = cholesky_upper(&y.t().dot(y))?;
    let (lo, hi) = (0..l).map(|j| r[j * l + j]).fold((f64::INFINITY, 0.0f64), |(lo, hi), d| (lo.min(d), hi.max(d)));
    let loss = (hi / lo).powi(2) * f64::EPSILON * 64.0;
    (loss < max_loss).then(|| Array2::from_shape_vec((l, l), r).expect("l * l values"))
}

/// The upper Cholesky factor (row-major, l * l) of a symmetric positive definite l x l matrix,
/// or `None` when a pivot is not positive.
fn cholesky_upper<T: SvdScalar>(g: &Array2<T>) -> Option<Vec<f64>> {
    let l = g.nrows();
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
    Some(r)
}

/// Q = Y R⁻¹ with Rᵀ R = Yᵀ Y, or `None` when Y is too ill-conditioned for this to be accurate
/// (one pass loses orthogonality like cond(Y)² eps; two passes recover it while that is < 1).
fn cholesky_qr<T: SvdScalar>(y: &Array2<T>) -> Option<(Array2<T>, Array2<f64>)> {
    let l = y.ncols();
    let r = cholesky_upper(&y.t().dot(y))?;
    let diag = (0..l).map(|j| r[j * l + j]);
    let (lo, hi) = diag.fold((f64::INFINITY, 0.0f64), |(lo, hi), d| (lo.min(d), hi.max(d)));
    let cond = hi / lo;
    let well_conditioned = cond * cond * T::EPS * 64.0 < 1.0;
    if !well_conditioned {
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

/// ||m||_F^2 in f64 in one pass, or an error for an empty matrix or one holding NaN or an
/// infinity (found through the sum: squares of finite f32 cannot overflow an f64 sum).
pub(crate) fn checked_energy<T: SvdScalar>(what: &str, m: &ArrayRef2<T>) -> Result<f64> {
    if m.is_empty() {
        return Err(Error::Empty { what: what.into(), shape: m.shape().to_vec() });
    }
    let mut total = 0.0;
    for row in m.rows() {
        // Eight independent accumulators let the compiler vectorise the sum.
        let mut acc = [0.0f64; 8];
        let mut chunks = row.exact_chunks(8).into_iter();
        for chunk in &mut chunks {
            for (s, v) in acc.iter_mut().zip(chunk.iter()) {
                let v = v.as_f64();
                *s += v * v;
            }
        }
        let rest = row.len() - row.len() % 8;
        let tail: f64 = row.iter().skip(rest).map(|v| v.as_f64() * v.as_f64()).sum();
        total += acc.iter().sum::<f64>() + tail;
    }
    if total.is_finite() {
        return Ok(total);
    }
    match m.iter().position(|v| !v.is_finite()) {
        Some(flat) => {
            let cols = m.ncols();
            Err(Error::NonFinite { what: what.into(), index: vec![flat / cols, flat % cols] })
        }
        None => Err(Error::param("matrix", format!("the sum of squares of {what} overflows f64"))),
    }
}

/// LAPACK returns NaN singular values when it overflows; say so instead of passing them on.
fn check_spectrum(sigma: &[f64], m: usize, n: usize) -> Result<()> {
    match sigma.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::NonFinite { what: format!("singular values of a {m} x {n} matrix"), index: vec![i] }),
    }
}
