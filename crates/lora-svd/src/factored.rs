//! Resize and combine adapters without building dW: the exact SVD of a product of thin factors
//! s B A through a QR of B and of Aᵀ and the SVD of the small core.

use std::time::Instant;

use indexmap::IndexMap;
use lora_core::{Adapter, AdapterConfig, AdapterModule, LoraLayer, ModuleKind, Scaling, TargetModules};
use ndarray::{concatenate, s, Array1, Array2, ArrayRef2, Axis};
use ndarray_linalg::{JobSvd, SVDDCInto};

use crate::error::{Error, Result};
use crate::extract::{split_factors, Report};
use crate::rank::RankRule;
use crate::svd::{thin_qr, MethodUsed, SvdScalar};

/// The SVD of s B A (B (d_out, R), A (R, d_in)) in f64: U (d_out, k), S, Vᵀ (k, d_in) with k
/// from `rule`, the whole spectrum, and ||s B A||_F^2. Never forms the (d_out, d_in) product.
pub(crate) struct FactoredSvd {
    pub u: Array2<f64>,
    pub s: Array1<f64>,
    pub vt: Array2<f64>,
    pub spectrum: Vec<f64>,
    pub total: f64,
}

impl FactoredSvd {
    pub(crate) fn compute<T: SvdScalar>(
        b: &ArrayRef2<T>,
        a: &ArrayRef2<T>,
        scale: f64,
        rule: &RankRule,
    ) -> Result<Self> {
        let min_dim = b.nrows().min(a.ncols());
        Self::compute_with(b, a, scale, |sigma, total| rule.decide(sigma, total, min_dim, None).rank)
    }

    /// As [`FactoredSvd::compute`], with the rank chosen by `choose(spectrum, total)`.
    pub(crate) fn compute_with<T: SvdScalar>(
        b: &ArrayRef2<T>,
        a: &ArrayRef2<T>,
        scale: f64,
        choose: impl FnOnce(&[f64], f64) -> usize,
    ) -> Result<Self> {
        let (qb, rb) = thin_qr(b.mapv(|v| v.as_f64()))?;
        let (qa, ra) = thin_qr(a.t().mapv(|v| v.as_f64()))?;
        let core = rb.dot(&ra.t()) * scale;
        let (k1, k2) = core.dim();
        let (uc, sigma, vct) = core
            .svddc_into(JobSvd::Some)
            .map_err(|source| Error::Lapack { routine: "gesdd", rows: k1, cols: k2, source })?;
        let (uc, vct) = (uc.expect("gesdd was asked for U"), vct.expect("gesdd was asked for Vt"));
        let spectrum = sigma.to_vec();
        if let Some(i) = spectrum.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite { what: "singular values of s B A".into(), index: vec![i] });
        }
        let total: f64 = spectrum.iter().map(|v| v * v).sum();
        let k = choose(&spectrum, total).clamp(1, spectrum.len());
        let u = qb.dot(&uc.slice(s![.., ..k]));
        let vt = vct.slice(s![..k, ..]).dot(&qa.t());
        Ok(FactoredSvd { u, s: sigma.slice(s![..k]).to_owned(), vt, spectrum, total })
    }

    pub(crate) fn rank(&self) -> usize {
        self.s.len()
    }

    /// A layer with scale `scale` under `scaling` at this rank, alpha derived from the scale,
    /// and a report.
    pub(crate) fn into_layer<T: SvdScalar>(
        self,
        scaling: Scaling,
        scale: f64,
        spectrum_len: usize,
        start: Instant,
    ) -> Result<(LoraLayer<T>, Report)> {
        let k = self.rank();
        let alpha = scaling.alpha_for_scale(scale, k);
        let kept: f64 = self.s.iter().map(|v| v * v).sum();
        let dropped: f64 = self.spectrum[k..].iter().map(|v| v * v).sum();
        let layer = split_factors(
            &self.u.mapv(<T as lora_core::Scalar>::from_f64),
            &self.s.mapv(<T as lora_core::Scalar>::from_f64),
            &self.vt.mapv(<T as lora_core::Scalar>::from_f64),
            alpha,
            scaling,
            scale,
        )?;
        let (relative_error, retained_energy) = if self.total > 0.0 {
            ((dropped / self.total).sqrt(), (kept / self.total).clamp(0.0, 1.0))
        } else {
            (0.0, 1.0)
        };
        let report = Report {
            rank: k,
            relative_error,
            retained_energy,
            singular_values: self.spectrum.iter().take(spectrum_len).copied().collect(),
            method: MethodUsed::Factored,
            elapsed: start.elapsed(),
        };
        Ok((layer, report))
    }
}

/// Change the rank of an adapter layer by `rule`, without building dW: QR of B and of Aᵀ, SVD of
/// the r x r core, truncation. Every rule is exact here (the core holds the whole spectrum).
///
/// The scale s is kept, with alpha following it: alpha_new = alpha / r_old * r_new with
/// [`Scaling::Standard`] (kohya's convention), alpha sqrt(r_new / r_old) with rsLoRA.
pub fn resize<T: SvdScalar>(layer: &LoraLayer<T>, rule: &RankRule) -> Result<(LoraLayer<T>, Report)> {
    let start = Instant::now();
    let svd = FactoredSvd::compute(layer.b(), layer.a(), layer.scale(), rule)?;
    svd.into_layer(layer.scaling(), layer.scale(), usize::MAX, start)
}

/// How [`combine`] joins layers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CombineMethod {
    /// The weighted sum by concatenation: A = [A_1; ...], B = [w_1 s_1 B_1 | ...], rank
    /// sum r_i. Exact; the input factors are kept as they are (scaled).
    Cat,
    /// The exact weighted sum sum w_i s_i B_i A_i at its numerical rank (singular values below
    /// sigma_max max(d_out, d_in) eps are dropped, as numpy's `matrix_rank`): combining a layer
    /// with itself keeps its rank instead of doubling it.
    Linear,
    /// The weighted sum truncated by a rank rule, through the same QR path as [`resize`].
    /// `None` keeps the largest input rank.
    Svd(Option<RankRule>),
}

/// Combine layers on the same module into one: the delta of the result is (exactly, or by
/// truncated SVD) sum w_i s_i B_i A_i, each layer with its own scale (rsLoRA included). The
/// result has scale 1 (alpha = r, [`Scaling::Standard`]). The report is exact: singular values
/// are those of the weighted sum (none for [`CombineMethod::Cat`], which computes none).
///
/// Errors: no layers, a weight count that differs from the layer count, non-finite weights,
/// layers of different shapes.
pub fn combine<T: SvdScalar>(
    layers: &[&LoraLayer<T>],
    weights: &[f64],
    method: &CombineMethod,
) -> Result<(LoraLayer<T>, Report)> {
    let start = Instant::now();
    let first = layers.first().ok_or_else(|| Error::param("layers", "at least one layer is needed, got none"))?;
    if weights.len() != layers.len() {
        return Err(Error::param("weights", format!("one per layer: {} layers, {} weights", layers.len(), weights.len())));
    }
    if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| !w.is_finite()) {
        return Err(Error::param("weights", format!("weight {i} is {w}, must be finite")));
    }
    let (d_out, d_in) = (first.d_out(), first.d_in());
    for (i, layer) in layers.iter().enumerate() {
        if (layer.d_out(), layer.d_in()) != (d_out, d_in) {
            return Err(Error::ShapeMismatch {
                what: format!("layer {i} (d_out, d_in)"),
                expected: vec![d_out, d_in],
                got: vec![layer.d_out(), layer.d_in()],
            });
        }
    }
    let bs: Vec<Array2<T>> =
        layers.iter().zip(weights).map(|(l, &w)| l.b() * <T as lora_core::Scalar>::from_f64(w * l.scale())).collect();
    let b = concatenate(Axis(1), &bs.iter().map(|b| b.view()).collect::<Vec<_>>()).expect("rows checked");
    let a = concatenate(Axis(0), &layers.iter().map(|l| l.a().view()).collect::<Vec<_>>()).expect("columns checked");
    let rule = match method {
        CombineMethod::Cat => {
            let rank = a.nrows();
            let layer = LoraLayer::new(a, b, rank as f64, Scaling::Standard)?;
            let report = Report {
                rank,
                relative_error: 0.0,
                retained_energy: 1.0,
                singular_values: Vec::new(),
                method: MethodUsed::Factored,
                elapsed: start.elapsed(),
            };
            return Ok((layer, report));
        }
        CombineMethod::Linear => {
            let tol = d_out.max(d_in) as f64 * T::EPS;
            let svd = FactoredSvd::compute_with(&b, &a, 1.0, |sigma, _| {
                let cut = sigma.first().copied().unwrap_or(0.0) * tol;
                sigma.iter().take_while(|&&v| v > cut).count()
            })?;
            return svd.into_layer(Scaling::Standard, 1.0, usize::MAX, start);
        }
        CombineMethod::Svd(Some(rule)) => *rule,
        CombineMethod::Svd(None) => RankRule::fixed(layers.iter().map(|l| l.rank()).max().unwrap_or(1))?,
    };
    let svd = FactoredSvd::compute(&b, &a, 1.0, &rule)?;
    svd.into_layer(Scaling::Standard, 1.0, usize::MAX, start)
}

/// Combine whole adapters module by module with [`combine`]. A module present in only some
/// adapters is combined from those (with their weights); each module keeps its own rank (with
/// `Svd(None)`, the largest input rank of that module). The result has scale 1 on every module
/// (alpha = r), so ranks that differ show up in its rank and alpha patterns.
///
/// Errors: as [`combine`], named by module; DoRA modules (their magnitudes do not add).
pub fn combine_adapters<T: SvdScalar>(
    adapters: &[&Adapter<T>],
    weights: &[f64],
    method: &CombineMethod,
) -> Result<(Adapter<T>, IndexMap<String, Report>)> {
    if adapters.is_empty() {
        return Err(Error::param("adapters", "at least one adapter is needed, got none"));
    }
    if weights.len() != adapters.len() {
        return Err(Error::param(
            "weights",
            format!("one per adapter: {} adapters, {} weights", adapters.len(), weights.len()),
        ));
    }
    let mut names: Vec<&str> = Vec::new();
    for adapter in adapters {
        for name in adapter.modules().keys() {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    let mut modules = IndexMap::new();
    let mut reports = IndexMap::new();
    for name in &names {
        let mut layers = Vec::new();
        let mut ws = Vec::new();
        let mut kind = ModuleKind::Linear;
        for (adapter, &w) in adapters.iter().zip(weights) {
            if let Some(module) = adapter.module(name) {
                if module.magnitude().is_some() {
                    return Err(lora_core::Error::Unsupported("dora modules cannot be combined".into())
                        .in_module(*name)
                        .into());
                }
                kind = module.kind();
                layers.push(module.layer());
                ws.push(w);
            }
        }
        let (layer, report) = combine(&layers, &ws, method).map_err(|e| e.in_tensor(*name))?;
        let module = match kind {
            ModuleKind::Embedding => AdapterModule::embedding(layer),
            _ => AdapterModule::linear(layer),
        };
        modules.insert(name.to_string(), module);
        reports.insert(name.to_string(), report);
    }
    let rank = most_common(modules.values().map(|m: &AdapterModule<T>| m.layer().rank())).unwrap_or(1);
    let mut config = AdapterConfig::new(rank, rank as f64, TargetModules::from_modules(names.iter().copied()));
    let base = adapters[0].config();
    config.base_model = base.base_model.clone();
    config.fan_in_fan_out = base.fan_in_fan_out;
    let mut adapter = Adapter::new(config);
    for (name, module) in modules {
        adapter.insert(name, module)?;
    }
    Ok((adapter, reports))
}

/// The most frequent value (the smallest among ties).
pub(crate) fn most_common(values: impl Iterator<Item = usize>) -> Option<usize> {
    let mut counts = std::collections::BTreeMap::new();
    for v in values {
        *counts.entry(v).or_insert(0usize) += 1;
    }
    counts.into_iter().max_by(|(va, ca), (vb, cb)| ca.cmp(cb).then(vb.cmp(va))).map(|(v, _)| v)
}
