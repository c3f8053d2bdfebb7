//! A LoRA layer from a weight difference: dW ≈ s B A by truncated SVD.

use std::time::{Duration, Instant};

use lora_core::{LoraLayer, Scaling};
use ndarray::{Array1, Array2, ArrayRef2, Axis};

use crate::error::{Error, Result};
use crate::rank::RankRule;
use crate::svd::{truncated_svd_of, truncated_svd_with_energy, MethodUsed, SvdMethod, SvdScalar, TruncatedSvd};

/// How many leading singular values a [`Report`] keeps by default.
pub const DEFAULT_SPECTRUM_LEN: usize = 64;

/// Settings of [`extract`].
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractConfig {
    /// How many singular values to keep.
    pub rule: RankRule,
    /// Exact, randomized or automatic.
    pub method: SvdMethod,
    /// alpha of the new layer: `None` for scale 1 (alpha = r with [`Scaling::Standard`]);
    /// otherwise the factors absorb 1/s so that s B A is unchanged.
    pub alpha: Option<f64>,
    /// The scaling rule of the new layer.
    pub scaling: Scaling,
    /// How many leading singular values the report keeps (for a spectrum plot).
    pub spectrum_len: usize,
}

impl ExtractConfig {
    /// A config with this rule and method, scale 1, and the default spectrum length.
    pub fn new(rule: RankRule, method: SvdMethod) -> Self {
        ExtractConfig { rule, method, alpha: None, scaling: Scaling::Standard, spectrum_len: DEFAULT_SPECTRUM_LEN }
    }
}

/// What an extraction, resize or SVD combination did, and how close it came.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Report {
    /// The rank chosen.
    pub rank: usize,
    /// ||dW - s B A||_F / ||dW||_F (0 when dW = 0).
    pub relative_error: f64,
    /// The fraction of ||dW||_F^2 retained: 1 - relative_error^2.
    pub retained_energy: f64,
    /// The leading singular values of dW, descending (sketch estimates with the randomized
    /// method: lower bounds of the true values).
    pub singular_values: Vec<f64>,
    /// The method run.
    pub method: MethodUsed,
    /// Wall time.
    pub elapsed: Duration,
}

impl Report {
    pub(crate) fn from_svd<T: SvdScalar>(svd: &TruncatedSvd<T>, spectrum_len: usize, elapsed: Duration) -> Self {
        Report {
            rank: svd.rank(),
            relative_error: svd.relative_error(),
            retained_energy: svd.retained_energy(),
            singular_values: svd.spectrum().iter().take(spectrum_len).copied().collect(),
            method: svd.method(),
            elapsed,
        }
    }
}

/// Factor `delta` (d_out, d_in) into a LoRA layer: B = U sqrt(S / s), A = sqrt(S / s) Vᵀ, so
/// that s B A is the truncated SVD of `delta`.
///
/// Errors: an empty or non-finite `delta` (named `"delta"`), invalid alpha, a rule the method
/// cannot decide.
pub fn extract<T: SvdScalar>(delta: &ArrayRef2<T>, config: &ExtractConfig) -> Result<(LoraLayer<T>, Report)> {
    let start = Instant::now();
    let svd = truncated_svd_of("delta", delta, &config.rule, &config.method)?;
    finish(&svd, config, start)
}

/// [`extract`] of a non-empty, finite `delta` whose squared Frobenius norm (f64) the caller has
/// computed while making it.
pub(crate) fn extract_with_energy<T: SvdScalar>(
    delta: &ArrayRef2<T>,
    energy: f64,
    config: &ExtractConfig,
) -> Result<(LoraLayer<T>, Report)> {
    let start = Instant::now();
    let svd = truncated_svd_with_energy(delta, energy, &config.rule, &config.method)?;
    finish(&svd, config, start)
}

fn finish<T: SvdScalar>(
    svd: &TruncatedSvd<T>,
    config: &ExtractConfig,
    start: Instant,
) -> Result<(LoraLayer<T>, Report)> {
    let layer = layer_from_svd(svd, config.alpha, config.scaling)?;
    let report = Report::from_svd(svd, config.spectrum_len, start.elapsed());
    Ok((layer, report))
}

/// A layer with s B A = U diag(S) Vᵀ, the singular values split evenly between the factors.
/// `alpha = None` means scale 1.
pub(crate) fn layer_from_svd<T: SvdScalar>(
    svd: &TruncatedSvd<T>,
    alpha: Option<f64>,
    scaling: Scaling,
) -> Result<LoraLayer<T>> {
    let k = svd.rank();
    let alpha = alpha.unwrap_or_else(|| scaling.alpha_for_scale(1.0, k));
    let scale = scaling.scale(alpha, k);
    if !(scale.is_finite() && scale != 0.0) {
        return Err(Error::param(
            "alpha",
            format!("gives scale {scale} at rank {k}, which must be finite and non-zero"),
        ));
    }
    split_factors(svd.u(), svd.s(), svd.vt(), alpha, scaling, scale)
}

/// B = U diag(sqrt(S / |s|)) sign(s), A = diag(sqrt(S / |s|)) Vᵀ.
pub(crate) fn split_factors<T: SvdScalar>(
    u: &Array2<T>,
    s: &Array1<T>,
    vt: &Array2<T>,
    alpha: f64,
    scaling: Scaling,
    scale: f64,
) -> Result<LoraLayer<T>> {
    let root: Array1<T> = s.mapv(|v| <T as lora_core::Scalar>::from_f64((v.as_f64().max(0.0) / scale.abs()).sqrt()));
    let sign = <T as lora_core::Scalar>::from_f64(scale.signum());
    let b = u * &(&root * sign).insert_axis(Axis(0));
    let a = vt * &root.insert_axis(Axis(1));
    Ok(LoraLayer::new(a, b, alpha, scaling)?)
}
