//! Tests of lora-svd: recovery, optimality (Eckart-Young), randomized accuracy, rank rules,
//! resize, combine, model-level extraction, errors, and property tests on small shapes.

use lora_core::{DType, Init, LoraLayer, MemorySource, Scaling};
use ndarray::{Array1, Array2, ArrayRef2, Axis};
use ndarray_linalg::{JobSvd, SVDDC};
use proptest::prelude::*;

use crate::svd::{gaussian, householder_q, orthonormalize};
use crate::*;

/// A (m, k) matrix with orthonormal columns.
fn orthonormal(m: usize, k: usize, seed: u64) -> Array2<f64> {
    householder_q(gaussian::<f64>(m, k, seed)).unwrap()
}

/// U diag(sigma) Vᵀ with random orthonormal U (m, k) and V (n, k).
fn with_spectrum(m: usize, n: usize, sigma: &[f64], seed: u64) -> Array2<f64> {
    let k = sigma.len();
    let u = orthonormal(m, k, seed) * &Array1::from(sigma.to_vec()).insert_axis(Axis(0));
    u.dot(&orthonormal(n, k, seed + 1).t())
}

fn frob<T: SvdScalar>(a: &ArrayRef2<T>) -> f64 {
    a.iter().map(|v| v.as_f64() * v.as_f64()).sum::<f64>().sqrt()
}

fn spectrum(a: &Array2<f64>) -> Vec<f64> {
    a.svddc(JobSvd::None).unwrap().1.to_vec()
}

/// sqrt(sum of discarded sigma^2) / ||A||: the Eckart-Young optimum at rank k.
fn optimum(sigma: &[f64], k: usize) -> f64 {
    let total: f64 = sigma.iter().map(|s| s * s).sum();
    (sigma[k..].iter().map(|s| s * s).sum::<f64>() / total).sqrt()
}

/// ||dW - s B A|| / ||dW||, measured.
fn measured_error<T: SvdScalar>(delta: &Array2<T>, layer: &LoraLayer<T>) -> f64 {
    frob(&(delta - &layer.delta())) / frob(delta)
}

/// sigma_i ~ 1/i times (1 + 0.1 noise), plus a dense noise floor: the kind of spectrum
/// fine-tunes produce.
fn decaying(m: usize, n: usize, seed: u64) -> Array2<f64> {
    let k = m.min(n);
    let jitter = gaussian::<f64>(k, 1, seed + 7);
    let sigma: Vec<f64> = (0..k).map(|i| (1.0 + 0.1 * jitter[[i, 0]]) / (i + 1) as f64).collect();
    let mut sigma = sigma;
    sigma.sort_by(|a, b| b.total_cmp(a));
    with_spectrum(m, n, &sigma, seed) + gaussian::<f64>(m, n, seed + 9) * (0.02 / (m as f64).sqrt())
}

fn randomized(oversample: usize, power_iters: usize, seed: u64) -> SvdMethod {
    SvdMethod::Randomized(Randomized { oversample, power_iters, seed })
}

fn fixed(k: usize) -> RankRule {
    RankRule::fixed(k).unwrap()
}

#[test]
fn an_exactly_low_rank_difference_is_recovered() {
    let delta = with_spectrum(60, 45, &[5.0, 3.0, 2.0, 1.0, 0.5], 1);
    let delta32 = delta.mapv(|v| v as f32);
    for method in [SvdMethod::Exact, randomized(10, 1, 3), SvdMethod::default()] {
        let (layer, report) = extract(&delta, &ExtractConfig::new(fixed(5), method)).unwrap();
        assert_eq!(layer.rank(), 5);
        assert!(measured_error(&delta, &layer) <= 1e-5, "{method:?}");
        assert!(report.relative_error <= 1e-5, "{method:?}: {}", report.relative_error);
        let (layer, report) = extract(&delta32, &ExtractConfig::new(fixed(5), method)).unwrap();
        assert!(measured_error(&delta32, &layer) <= 1e-5, "{method:?} f32");
        assert!(report.relative_error <= 1e-5, "{method:?} f32: {}", report.relative_error);
        // The energy rule finds the rank by itself.
        let rule = RankRule::energy(0.999_999).unwrap();
        let (layer, _) = extract(&delta, &ExtractConfig::new(rule, method)).unwrap();
        assert_eq!(layer.rank(), 5, "{method:?}");
    }
}

#[test]
fn factors_split_the_singular_values_evenly_and_alpha_is_the_rank() {
    let delta = with_spectrum(20, 16, &[9.0, 4.0], 2);
    let (layer, _) = extract(&delta, &ExtractConfig::new(fixed(2), SvdMethod::Exact)).unwrap();
    assert_eq!((layer.alpha(), layer.scale()), (2.0, 1.0));
    let b_norms: Vec<f64> = layer.b().axis_iter(Axis(1)).map(|c| frob(&c.insert_axis(Axis(1)))).collect();
    let a_norms: Vec<f64> = layer.a().axis_iter(Axis(0)).map(|r| frob(&r.insert_axis(Axis(0)))).collect();
    for (got, want) in b_norms.iter().chain(&a_norms).zip([3.0, 2.0, 3.0, 2.0]) {
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }
    // A requested alpha: the factors absorb 1/s, the delta is unchanged.
    let mut config = ExtractConfig::new(fixed(2), SvdMethod::Exact);
    config.alpha = Some(16.0);
    let (scaled, _) = extract(&delta, &config).unwrap();
    assert_eq!((scaled.alpha(), scaled.scale()), (16.0, 8.0));
    assert!(frob(&(scaled.delta() - layer.delta())) < 1e-12);
    config.scaling = Scaling::RsLora;
    config.alpha = Some(-3.0);
    let (rs, _) = extract(&delta, &config).unwrap();
    assert!(frob(&(rs.delta() - layer.delta())) < 1e-12);
    config.alpha = Some(0.0);
    assert!(matches!(extract(&delta, &config), Err(Error::InvalidParameter { name: "alpha", .. })));
}

#[test]
fn the_exact_error_is_the_eckart_young_optimum() {
    let delta = gaussian::<f64>(50, 40, 4);
    let sigma = spectrum(&delta);
    for k in [1, 5, 17, 39, 40] {
        let (layer, report) = extract(&delta, &ExtractConfig::new(fixed(k), SvdMethod::Exact)).unwrap();
        let opt = optimum(&sigma, k);
        assert!((measured_error(&delta, &layer) - opt).abs() <= 1e-4, "k = {k}");
        assert!((report.relative_error - opt).abs() <= 1e-4, "k = {k}");
        assert!((report.retained_energy - (1.0 - opt * opt)).abs() <= 1e-4);
        assert_eq!(report.singular_values.len(), 40);
        assert_eq!(report.method, MethodUsed::Exact);
    }
}

#[test]
fn the_randomized_error_is_within_one_percent_on_a_decaying_spectrum() {
    let delta = decaying(300, 200, 5);
    let sigma = spectrum(&delta);
    for (k, seed) in [(10, 1), (20, 2), (30, 3)] {
        let (layer, report) = extract(&delta, &ExtractConfig::new(fixed(k), randomized(32, 2, seed))).unwrap();
        let opt = optimum(&sigma, k);
        let err = measured_error(&delta, &layer);
        assert!(err <= 1.01 * opt, "k = {k}: {err} vs optimum {opt}");
        assert!((report.relative_error - err).abs() <= 1e-6 * err.max(1.0), "the report measures the error");
        // k + max(32, k) columns, rounded up to a multiple of 16.
        let columns = [48, 64, 64][k / 10 - 1];
        assert!(matches!(report.method, MethodUsed::Randomized { sketch, .. } if sketch == columns), "{report:?}");
    }
}

#[test]
fn the_randomized_error_is_within_the_halko_martinsson_tropp_bound_on_a_flat_spectrum() {
    // Flat spectrum: sigma_j = 1 for j <= 60, zero after. HMT Theorem 10.5 with q = 0:
    // E ||A - Q Qᵀ A||_F <= sqrt(1 + k / (p - 1)) sqrt(sum_{j > k} sigma_j^2); the rank-k
    // truncation of Q Qᵀ A obeys the same bound on the squared error (Halko et al. section 9.4;
    // Tropp et al. 2017, Theorem 5.1), checked here on the mean over seeds.
    let delta = with_spectrum(120, 100, &[1.0; 60], 6);
    let (k, p) = (10, 6);
    let bound_sq = (1.0 + k as f64 / (p as f64 - 1.0)) * (60 - k) as f64;
    let runs = 8;
    let mut mean_sq = 0.0;
    for seed in 0..runs {
        let (layer, _) = extract(&delta, &ExtractConfig::new(fixed(k), randomized(p, 0, seed))).unwrap();
        let err = frob(&(&delta - &layer.delta()));
        assert!(err * err >= (60 - k) as f64 * (1.0 - 1e-9), "never better than the optimum");
        mean_sq += err * err / runs as f64;
    }
    assert!(mean_sq <= bound_sq, "{mean_sq} > {bound_sq}");
}

#[test]
fn every_rank_rule_on_hand_made_spectra() {
    let sigma = [4.0, 3.0, 2.0, 1.0, 0.5, 0.0];
    let total: f64 = sigma.iter().map(|s| s * s).sum(); // 30.25
    let choose = |rule: RankRule| rule.choose(&sigma, total);
    assert_eq!(choose(fixed(3)), 3);
    assert_eq!(choose(fixed(10)), 6, "capped by the spectrum");
    // Energy: 16, 25, 29, 30, 30.25.
    assert_eq!(choose(RankRule::energy(16.0 / 30.25).unwrap()), 1, "met exactly");
    assert_eq!(choose(RankRule::energy(16.5 / 30.25).unwrap()), 2);
    assert_eq!(choose(RankRule::energy(29.0 / 30.25).unwrap()), 3);
    assert_eq!(choose(RankRule::energy(0.999).unwrap()), 5);
    assert_eq!(choose(RankRule::energy(1.0).unwrap()), 5, "zero singular values are not needed");
    // Ratio: sigma_i >= 4 / x.
    assert_eq!(choose(RankRule::ratio(1.0).unwrap()), 1);
    assert_eq!(choose(RankRule::ratio(2.0).unwrap()), 3, "sigma = 2 is kept (>=)");
    assert_eq!(choose(RankRule::ratio(1e9).unwrap()), 5, "zeros never");
    // Threshold: sigma_i > eps.
    assert_eq!(choose(RankRule::threshold(1.0).unwrap()), 3, "sigma = 1 is dropped (>)");
    assert_eq!(choose(RankRule::threshold(0.0).unwrap()), 5);
    assert_eq!(choose(RankRule::threshold(10.0).unwrap()), 1, "floored by min_rank = 1");
    // Cumulative: 4, 7, 9, 10, 10.5 of 10.5.
    assert_eq!(choose(RankRule::cumulative(7.0 / 10.5).unwrap()), 2);
    assert_eq!(choose(RankRule::cumulative(0.9).unwrap()), 4);
    // Bounds.
    assert_eq!(choose(RankRule::threshold(0.0).unwrap().with_bounds(1, Some(2)).unwrap()), 2);
    assert_eq!(choose(RankRule::threshold(3.5).unwrap().with_bounds(4, None).unwrap()), 4);
    assert_eq!(choose(RankRule::energy(0.1).unwrap().with_bounds(2, Some(3)).unwrap()), 2);
    // Validation.
    assert!(RankRule::fixed(0).is_err());
    assert!(RankRule::energy(0.0).is_err() && RankRule::energy(1.5).is_err() && RankRule::energy(f64::NAN).is_err());
    assert!(RankRule::ratio(0.5).is_err() && RankRule::threshold(-1.0).is_err() && RankRule::cumulative(0.0).is_err());
    assert!(fixed(2).with_bounds(0, None).is_err() && fixed(2).with_bounds(3, Some(2)).is_err());
}

#[test]
fn rules_that_need_more_than_the_first_sketch_grow_it_and_agree_with_exact() {
    // 80 significant singular values (the first sketch resolves 32), then a cliff.
    let mut sigma: Vec<f64> = (0..80).map(|i| 1.0 / (1.0 + i as f64 / 20.0)).collect();
    sigma.extend((0..40).map(|i| 1e-4 / (1 + i) as f64));
    let delta = with_spectrum(400, 300, &sigma, 8);
    let rules = [
        RankRule::energy(0.95).unwrap(),
        RankRule::energy(0.999_999).unwrap(),
        RankRule::ratio(100.0).unwrap(),
        RankRule::threshold(1e-3).unwrap(),
    ];
    for rule in rules {
        let exact = extract(&delta, &ExtractConfig::new(rule, SvdMethod::Exact)).unwrap().1;
        let (layer, report) = extract(&delta, &ExtractConfig::new(rule, randomized(16, 2, 1))).unwrap();
        assert_eq!(report.rank, exact.rank, "{rule:?}");
        assert!(matches!(report.method, MethodUsed::Randomized { rounds, .. } if rounds > 1), "{rule:?}");
        if let Criterion::Energy(f) = rule.criterion() {
            // The guarantee holds on the measured error.
            let err = measured_error(&delta, &layer);
            assert!(1.0 - err * err >= f - 1e-9, "{rule:?}");
        }
    }
    // A cap stops the growth.
    let capped = RankRule::energy(0.999_999).unwrap().with_bounds(1, Some(40)).unwrap();
    let (_, report) = extract(&delta, &ExtractConfig::new(capped, randomized(16, 2, 1))).unwrap();
    assert_eq!(report.rank, 40);
}

#[test]
fn the_cumulative_rule_needs_the_exact_method() {
    let delta = with_spectrum(30, 20, &[3.0, 2.0, 1.0], 9);
    let rule = RankRule::cumulative(0.8).unwrap();
    let err = extract(&delta, &ExtractConfig::new(rule, randomized(5, 1, 0))).unwrap_err();
    assert!(matches!(err, Error::NeedsExact { rule: "cumulative" }));
    assert!(err.to_string().contains("cumulative"));
    let (layer, report) = extract(&delta, &ExtractConfig::new(rule, SvdMethod::default())).unwrap();
    assert_eq!((layer.rank(), report.method), (2, MethodUsed::Exact), "auto goes exact");
}

#[test]
fn auto_picks_randomized_only_for_small_ranks() {
    let delta = decaying(400, 300, 10);
    let (_, small) = extract(&delta, &ExtractConfig::new(fixed(8), SvdMethod::default())).unwrap();
    assert!(matches!(small.method, MethodUsed::Randomized { .. }));
    let (_, large) = extract(&delta, &ExtractConfig::new(fixed(100), SvdMethod::default())).unwrap();
    assert_eq!(large.method, MethodUsed::Exact);
}

#[test]
fn the_randomized_method_is_reproducible_from_its_seed() {
    let delta = decaying(120, 90, 11).mapv(|v| v as f32);
    let run = |seed| extract(&delta, &ExtractConfig::new(fixed(6), randomized(8, 1, seed))).unwrap().0;
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

#[test]
fn bad_input_gives_errors_naming_what_is_wrong() {
    let mut delta = gaussian::<f32>(10, 8, 12);
    delta[[3, 5]] = f32::NAN;
    let err = extract(&delta, &ExtractConfig::new(fixed(2), SvdMethod::Exact)).unwrap_err();
    assert!(matches!(&err, Error::NonFinite { what, index } if what == "delta" && index == &vec![3, 5]));
    assert_eq!(err.to_string(), "delta holds a non-finite value at index [3, 5]");
    delta[[3, 5]] = f32::INFINITY;
    assert!(truncated_svd(&delta, &fixed(2), &SvdMethod::default()).is_err());
    let empty = Array2::<f64>::zeros((0, 4));
    assert!(matches!(extract(&empty, &ExtractConfig::new(fixed(1), SvdMethod::Exact)), Err(Error::Empty { .. })));
}

#[test]
fn a_zero_difference_gives_a_zero_layer_without_dividing_by_zero() {
    let zero = Array2::<f32>::zeros((12, 9));
    for method in [SvdMethod::Exact, randomized(4, 1, 0)] {
        let (layer, report) = extract(&zero, &ExtractConfig::new(RankRule::energy(0.9).unwrap(), method)).unwrap();
        assert_eq!(layer.rank(), 1);
        assert!(layer.delta().iter().all(|v| *v == 0.0));
        assert_eq!((report.relative_error, report.retained_energy), (0.0, 1.0));
    }
}

#[test]
fn orthonormalisation_is_orthonormal_on_good_and_on_rank_deficient_input() {
    let good = gaussian::<f32>(200, 20, 13);
    let mut deficient = gaussian::<f32>(200, 20, 14);
    let col = deficient.column(0).to_owned();
    deficient.column_mut(7).assign(&col);
    deficient.column_mut(9).fill(0.0);
    for y in [good, deficient] {
        let q = orthonormalize(y).unwrap();
        let gram = q.t().dot(&q) - Array2::<f32>::eye(20);
        assert!(gram.iter().all(|v| v.abs() < 1e-5), "max {}", gram.iter().fold(0.0f32, |m, v| m.max(v.abs())));
    }
}

/// A random layer with a non-trivial B.
fn random_layer(d_in: usize, d_out: usize, rank: usize, alpha: f64, scaling: Scaling, seed: u64) -> LoraLayer<f64> {
    LoraLayer::init(d_in, d_out, rank, alpha, scaling, Init::Random { b_std: 0.5 }, seed).unwrap()
}

#[test]
fn resize_equals_truncating_the_svd_of_the_rebuilt_delta() {
    for scaling in [Scaling::Standard, Scaling::RsLora] {
        let layer = random_layer(40, 50, 12, 24.0, scaling, 15);
        for k in [1, 5, 12] {
            let (small, report) = resize(&layer, &fixed(k)).unwrap();
            let (want, want_report) = extract(&layer.delta(), &ExtractConfig::new(fixed(k), SvdMethod::Exact)).unwrap();
            let scale = frob(&layer.delta());
            assert!(frob(&(small.delta() - want.delta())) <= 1e-4 * scale, "{scaling:?} k = {k}");
            assert!((report.relative_error - want_report.relative_error).abs() <= 1e-6);
            assert_eq!(report.method, MethodUsed::Factored);
            // The scale is kept: kohya's new_alpha = alpha / old_rank * new_rank.
            assert!((small.scale() - layer.scale()).abs() < 1e-12);
            assert_eq!(small.scaling(), scaling);
            if scaling == Scaling::Standard {
                assert!((small.alpha() - 24.0 / 12.0 * k as f64).abs() < 1e-12);
            }
        }
        // Every rule, including cumulative, is exact here.
        let rule = RankRule::cumulative(0.5).unwrap();
        let (small, _) = resize(&layer, &rule).unwrap();
        let sigma = spectrum(&layer.delta());
        assert_eq!(small.rank(), rule.choose(&sigma[..12], sigma.iter().map(|s| s * s).sum()));
    }
}

#[test]
fn resize_of_an_f32_layer_matches_in_f32() {
    let layer64 = random_layer(64, 48, 16, 16.0, Scaling::Standard, 16);
    let layer = LoraLayer::new(layer64.a().mapv(|v| v as f32), layer64.b().mapv(|v| v as f32), 16.0, Scaling::Standard)
        .unwrap();
    let (small, _) = resize(&layer, &fixed(6)).unwrap();
    let (want, _) = extract(&layer64.delta(), &ExtractConfig::new(fixed(6), SvdMethod::Exact)).unwrap();
    let diff = small.delta().mapv(f64::from) - want.delta();
    assert!(frob(&diff) <= 1e-4 * frob(&layer64.delta()));
}

#[test]
fn combine_svd_equals_the_truncated_svd_of_the_weighted_sum() {
    let l1 = random_layer(30, 40, 6, 12.0, Scaling::Standard, 17);
    let l2 = random_layer(30, 40, 4, 8.0, Scaling::RsLora, 18);
    let l3 = random_layer(30, 40, 8, 3.0, Scaling::Standard, 19);
    let weights = [0.7, -1.3, 0.25];
    let sum = l1.delta() * 0.7 + l2.delta() * -1.3 + l3.delta() * 0.25;
    for k in [3, 9] {
        let (c, _) = combine(&[&l1, &l2, &l3], &weights, &CombineMethod::Svd(Some(fixed(k)))).unwrap();
        let (want, _) = extract(&sum, &ExtractConfig::new(fixed(k), SvdMethod::Exact)).unwrap();
        assert!(frob(&(c.delta() - want.delta())) <= 1e-4 * frob(&sum), "k = {k}");
    }
    let (keep, _) = combine(&[&l1, &l2, &l3], &weights, &CombineMethod::Svd(None)).unwrap();
    assert_eq!(keep.rank(), 8, "the largest input rank");
}

#[test]
fn linear_and_cat_are_exact_weighted_sums_without_cross_terms() {
    let l1 = random_layer(20, 25, 4, 8.0, Scaling::Standard, 20);
    let l2 = random_layer(20, 25, 4, 2.0, Scaling::RsLora, 21);
    let sum = l1.delta() * 0.5 + l2.delta() * 2.0;
    for method in [CombineMethod::Cat, CombineMethod::Linear] {
        let (c, report) = combine(&[&l1, &l2], &[0.5, 2.0], &method).unwrap();
        assert!(frob(&(c.delta() - &sum)) <= 1e-12 * frob(&sum), "{method:?}");
        assert_eq!((c.rank(), c.scale()), (8, 1.0));
        assert!(report.relative_error < 1e-12);
    }
    // PEFT's old linear combination, (sum w A)(sum w B), would have cross terms; ours has none
    // and combining a layer with itself keeps its rank.
    let (same, _) = combine(&[&l1, &l1], &[0.5, 0.5], &CombineMethod::Linear).unwrap();
    assert_eq!(same.rank(), 4);
    assert!(frob(&(same.delta() - l1.delta())) <= 1e-12 * frob(&l1.delta()));
    let (cat, _) = combine(&[&l1, &l1], &[0.5, 0.5], &CombineMethod::Cat).unwrap();
    assert_eq!(cat.rank(), 8);
}

#[test]
fn combine_rejects_bad_input() {
    let l1 = random_layer(20, 25, 4, 8.0, Scaling::Standard, 22);
    let other = random_layer(21, 25, 4, 8.0, Scaling::Standard, 23);
    assert!(combine::<f64>(&[], &[], &CombineMethod::Cat).is_err());
    assert!(combine(&[&l1], &[1.0, 2.0], &CombineMethod::Cat).is_err());
    assert!(combine(&[&l1], &[f64::NAN], &CombineMethod::Linear).is_err());
    let err = combine(&[&l1, &other], &[1.0, 1.0], &CombineMethod::Linear).unwrap_err();
    assert!(err.to_string().contains("layer 1"), "{err}");
}

#[test]
fn combine_adapters_keeps_per_module_ranks() {
    use lora_core::{Adapter, AdapterConfig, AdapterModule, TargetModules};
    let adapter = |ranks: &[(&str, usize)], seed: u64| {
        let mut ad = Adapter::new(AdapterConfig::new(4, 8.0, TargetModules::AllLinear));
        for (i, (name, r)) in ranks.iter().enumerate() {
            let layer = random_layer(16, 12, *r, 8.0, Scaling::Standard, seed + i as u64);
            ad.insert(*name, AdapterModule::linear(layer)).unwrap();
        }
        ad
    };
    let x = adapter(&[("q", 4), ("v", 8)], 30);
    let y = adapter(&[("q", 2), ("o", 3)], 40);
    let (c, reports) = combine_adapters(&[&x, &y], &[1.0, 0.5], &CombineMethod::Svd(None)).unwrap();
    let ranks: Vec<(String, usize)> = c.modules().iter().map(|(n, m)| (n.clone(), m.layer().rank())).collect();
    assert_eq!(ranks, [("q".to_string(), 4), ("v".to_string(), 8), ("o".to_string(), 3)]);
    assert_eq!(reports.len(), 3);
    let v = c.module("v").unwrap().layer().delta();
    assert!(frob(&(v - x.module("v").unwrap().layer().delta())) < 1e-9, "a module of one adapter passes through");
    assert_eq!(c.config().rank, 3, "the most common rank; on ties the smallest");
}

/// A base and a tuned model in memory: q_proj has a rank-3 change, k_proj none, the embedding
/// and a norm change, one tensor exists only in the tuned model.
fn models() -> (MemorySource, MemorySource) {
    let mut base = MemorySource::new();
    let mut tuned = MemorySource::new();
    let w = gaussian::<f64>(24, 16, 50);
    let change = with_spectrum(24, 16, &[3.0, 2.0, 1.0], 51);
    for layer in 0..2 {
        let q = format!("model.layers.{layer}.self_attn.q_proj.weight");
        base.insert(&q, w.clone().into_dyn(), DType::F32);
        tuned.insert(&q, (&w + &change * (layer + 1) as f64).into_dyn(), DType::F32);
        let k = format!("model.layers.{layer}.self_attn.k_proj.weight");
        base.insert(&k, w.clone().into_dyn(), DType::F32);
        tuned.insert(&k, w.clone().into_dyn(), DType::F32);
    }
    let emb = gaussian::<f64>(50, 16, 52);
    base.insert("model.embed_tokens.weight", emb.clone().into_dyn(), DType::F32);
    tuned.insert("model.embed_tokens.weight", (&emb + 1.0).into_dyn(), DType::F32);
    base.insert("model.norm.weight", Array1::<f64>::ones(16).into_dyn(), DType::F32);
    tuned.insert("model.norm.weight", Array1::<f64>::from_elem(16, 1.5).into_dyn(), DType::F32);
    tuned.insert("score.weight", gaussian::<f64>(2, 16, 53).into_dyn(), DType::F32);
    (base, tuned)
}

fn model_config(parallelism: Parallelism) -> ModelConfig {
    ModelConfig {
        extract: ExtractConfig::new(RankRule::energy(0.9999).unwrap(), SvdMethod::default()),
        selection: Selection::default(),
        parallelism,
    }
}

#[test]
fn model_extraction_pairs_tensors_and_reports_what_it_left_out() {
    let (base, tuned) = models();
    let calls = std::sync::Mutex::new(Vec::new());
    let progress = |p: &Progress<'_>| calls.lock().unwrap().push((p.done, p.total, p.tensor.to_string()));
    let out: ModelExtraction<f32> =
        extract_model(&base, &tuned, &model_config(Parallelism::Sequential), &progress).unwrap();
    let names: Vec<&str> = out.modules.keys().map(String::as_str).collect();
    assert_eq!(names, ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]);
    for m in out.modules.values() {
        assert_eq!(m.layer.rank(), 3);
        assert!(m.report.relative_error < 1e-5);
    }
    assert_eq!(out.unchanged, ["model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.k_proj.weight"]);
    let left: Vec<(&str, SkipReason)> = out.not_extracted.iter().map(|n| (n.name.as_str(), n.reason)).collect();
    assert_eq!(
        left,
        [
            ("score.weight", SkipReason::OnlyInTuned),
            ("model.embed_tokens.weight", SkipReason::NotSelected),
            ("model.norm.weight", SkipReason::NotMatrix),
        ]
    );
    let calls = calls.into_inner().unwrap();
    assert_eq!(calls.len(), 6);
    assert_eq!(calls.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6], "sequential order");
    let adapter = out.to_adapter(Some("base".into())).unwrap();
    assert_eq!((adapter.len(), adapter.config().rank, adapter.config().alpha), (2, 3, 3.0));
}

#[test]
fn parallel_model_extraction_gives_the_sequential_result() {
    let (base, tuned) = models();
    let seq: ModelExtraction<f64> =
        extract_model(&base, &tuned, &model_config(Parallelism::Sequential), &|_: &Progress<'_>| {}).unwrap();
    let count = std::sync::atomic::AtomicUsize::new(0);
    let par: ModelExtraction<f64> = extract_model(&base, &tuned, &model_config(Parallelism::Layers(2)), &|_| {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    })
    .unwrap();
    assert_eq!(count.into_inner(), 6);
    assert_eq!(seq.modules.len(), par.modules.len());
    for (a, b) in seq.modules.values().zip(par.modules.values()) {
        assert_eq!(a.layer, b.layer);
    }
    assert_eq!((seq.unchanged, seq.not_extracted), (par.unchanged, par.not_extracted));
}

#[test]
fn selection_patterns_change_what_is_extracted() {
    let (base, tuned) = models();
    let mut config = model_config(Parallelism::Sequential);
    config.selection = Selection::new(r"embed_tokens|layers\.1\.", None).unwrap();
    let out: ModelExtraction<f32> = extract_model(&base, &tuned, &config, &|_: &Progress<'_>| {}).unwrap();
    let names: Vec<&str> = out.modules.keys().map(String::as_str).collect();
    assert_eq!(names, ["model.layers.1.self_attn.q_proj", "model.embed_tokens"]);
    assert!(out.not_extracted.iter().any(|n| n.name == "model.layers.0.self_attn.q_proj.weight"));
    let err = Selection::new("(", None).unwrap_err();
    assert!(matches!(err, Error::Regex { which: "include", .. }), "{err}");
    assert!(Selection::new(".", Some("[")).is_err());
    let default = Selection::default();
    assert!(default.selects("model.layers.0.mlp.down_proj.weight", &[4, 4]));
    for name in ["lm_head.weight", "model.embed_tokens.weight", "transformer.wte.weight", "output.weight"] {
        assert!(!default.selects(name, &[4, 4]), "{name}");
    }
    assert!(!default.selects("model.layers.0.mlp.down_proj.bias", &[4]));
}

#[test]
fn model_extraction_errors_name_the_tensor() {
    let (base, mut tuned) = models();
    tuned.insert("model.layers.1.self_attn.k_proj.weight", gaussian::<f64>(24, 17, 1).into_dyn(), DType::F32);
    let err = extract_model::<f32, _, _>(&base, &tuned, &model_config(Parallelism::Sequential), &|_| {}).unwrap_err();
    assert_eq!(
        err.to_string(),
        "tensor model.layers.1.self_attn.k_proj.weight: base shape [24, 16] and tuned shape [24, 17] differ"
    );
    let (base, mut tuned) = models();
    let mut bad = gaussian::<f64>(24, 16, 2);
    bad[[1, 2]] = f64::NAN;
    tuned.insert("model.layers.0.self_attn.q_proj.weight", bad.into_dyn(), DType::F32);
    for parallelism in [Parallelism::Sequential, Parallelism::Layers(2)] {
        let err = extract_model::<f32, _, _>(&base, &tuned, &model_config(parallelism), &|_| {}).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor model.layers.0.self_attn.q_proj.weight: delta holds a non-finite value at index [1, 2]"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The exact method's report matches the measured error, which is the optimum.
    #[test]
    fn exact_extraction_reports_the_optimal_error(m in 1usize..9, n in 1usize..9, k in 1usize..9, seed in 0u64..1000) {
        let delta = gaussian::<f64>(m, n, seed);
        let (layer, report) = extract(&delta, &ExtractConfig::new(fixed(k), SvdMethod::Exact)).unwrap();
        let sigma = spectrum(&delta);
        let k = k.min(m.min(n));
        prop_assert_eq!(layer.rank(), k);
        let opt = optimum(&sigma, k);
        prop_assert!((measured_error(&delta, &layer) - opt).abs() < 1e-9);
        prop_assert!((report.relative_error - opt).abs() < 1e-9);
    }

    /// A randomized sketch as wide as the matrix is exact.
    #[test]
    fn a_full_sketch_is_exact(m in 2usize..10, n in 2usize..10, k in 1usize..4, q in 0usize..3, seed in 0u64..1000) {
        let delta = gaussian::<f64>(m, n, seed);
        let k = k.min(m.min(n));
        let (layer, _) = extract(&delta, &ExtractConfig::new(fixed(k), randomized(10, q, seed))).unwrap();
        prop_assert!((measured_error(&delta, &layer) - optimum(&spectrum(&delta), k)).abs() < 1e-9);
    }

    /// Resizing to the same rank reproduces the delta; the scale is kept.
    #[test]
    fn resize_to_the_same_rank_is_the_identity(d_in in 1usize..9, d_out in 1usize..9, r in 1usize..6, alpha in 0.5f64..32.0, seed in 0u64..1000) {
        let layer = random_layer(d_in, d_out, r, alpha, Scaling::Standard, seed);
        let (same, _) = resize(&layer, &fixed(r)).unwrap();
        prop_assert!(frob(&(same.delta() - layer.delta())) <= 1e-9 * frob(&layer.delta()).max(1.0));
        prop_assert!((same.scale() - layer.scale()).abs() < 1e-12);
    }

    /// Linear combination is the weighted sum of the deltas.
    #[test]
    fn linear_combination_is_the_weighted_sum(d_in in 1usize..8, d_out in 1usize..8, r1 in 1usize..4, r2 in 1usize..4, w1 in -2.0f64..2.0, w2 in -2.0f64..2.0, seed in 0u64..1000) {
        let l1 = random_layer(d_in, d_out, r1, 4.0, Scaling::Standard, seed);
        let l2 = random_layer(d_in, d_out, r2, 2.0, Scaling::RsLora, seed + 1);
        let sum = l1.delta() * w1 + l2.delta() * w2;
        let (c, _) = combine(&[&l1, &l2], &[w1, w2], &CombineMethod::Linear).unwrap();
        prop_assert!(frob(&(c.delta() - &sum)) <= 1e-9 * frob(&sum).max(1.0));
    }

    /// Every rule stays within its bounds and the dimensions.
    #[test]
    fn rules_respect_their_bounds(sigma in proptest::collection::vec(0.0f64..10.0, 1..12), f in 0.01f64..1.0, lo in 1usize..5, extra in 0usize..5) {
        let mut sigma = sigma;
        sigma.sort_by(|a, b| b.total_cmp(a));
        let total: f64 = sigma.iter().map(|s| s * s).sum();
        let criteria = [Criterion::Fixed(lo + 1), Criterion::Energy(f), Criterion::Ratio(1.0 / f), Criterion::Threshold(f), Criterion::Cumulative(f)];
        for c in criteria {
            let rule = RankRule::new(c, lo, Some(lo + extra)).unwrap();
            let k = rule.choose(&sigma, total);
            prop_assert!(k >= 1 && k <= lo + extra && k <= sigma.len());
            prop_assert!(k >= lo.min(sigma.len()));
        }
    }
}

/// A tensor source that records how many tensors are being worked on at once: a tensor counts
/// from its first read until the progress callback reports it done.
struct CountingSource {
    inner: MemorySource,
    started: std::sync::Mutex<std::collections::HashSet<String>>,
    done: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
}

impl lora_core::TensorSource for CountingSource {
    fn tensor_names(&self) -> Vec<String> {
        self.inner.tensor_names()
    }
    fn tensor_info(&self, name: &str) -> Option<lora_core::TensorInfo> {
        self.inner.tensor_info(name)
    }
    fn read_f32(&self, name: &str) -> lora_core::Result<ndarray::ArrayD<f32>> {
        let mut started = self.started.lock().unwrap();
        started.insert(name.to_string());
        let in_flight = started.len() - self.done.load(std::sync::atomic::Ordering::SeqCst);
        self.peak.fetch_max(in_flight, std::sync::atomic::Ordering::SeqCst);
        drop(started);
        // Slow reads make the workers overlap, so that a pool larger than asked would show.
        std::thread::sleep(std::time::Duration::from_millis(10));
        self.inner.read_f32(name)
    }
}

#[test]
fn parallel_extraction_holds_at_most_as_many_tensors_as_threads() {
    let (mut base, mut tuned) = models();
    for i in 2..8 {
        let name = format!("model.layers.{i}.self_attn.q_proj.weight");
        tuned.insert(&name, gaussian::<f64>(24, 16, 60 + i).into_dyn(), DType::F32);
        base.insert(&name, Array2::<f64>::zeros((24, 16)).into_dyn(), DType::F32);
    }
    for threads in [1, 2, 3] {
        let source = CountingSource {
            inner: tuned.clone(),
            started: Default::default(),
            done: Default::default(),
            peak: Default::default(),
        };
        let progress = |_: &Progress<'_>| {
            source.done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        };
        let out: ModelExtraction<f32> =
            extract_model(&base, &source, &model_config(Parallelism::Layers(threads)), &progress).unwrap();
        assert_eq!(out.modules.len(), 8);
        let peak = source.peak.load(std::sync::atomic::Ordering::SeqCst);
        assert!(peak >= 1 && peak <= threads, "{peak} tensors at once with {threads} threads");
    }
}

#[test]
fn dora_modules_are_not_combined() {
    use lora_core::{Adapter, AdapterConfig, AdapterModule, DoraLayer, TargetModules};
    let layer = random_layer(8, 6, 2, 4.0, Scaling::Standard, 70);
    let mut config = AdapterConfig::new(2, 4.0, TargetModules::AllLinear);
    config.use_dora = true;
    let mut adapter = Adapter::new(config);
    let dora = DoraLayer::new(layer, Array1::ones(6)).unwrap();
    adapter.insert("q", AdapterModule::dora(dora)).unwrap();
    let err = combine_adapters(&[&adapter, &adapter], &[1.0, 1.0], &CombineMethod::Linear).unwrap_err();
    assert!(err.to_string().contains("module q") && err.to_string().contains("dora"), "{err}");
}

/// A source that also hands out its tensors as stored bytes, rounded to each tensor's dtype:
/// extraction then decodes and subtracts in one pass instead of reading arrays. With `strict`,
/// reads refuse NaN and infinities as the CLI's checked sources do.
struct BytesSource {
    values: MemorySource,
    bytes: std::collections::HashMap<String, (DType, Vec<u8>)>,
    strict: bool,
}

impl BytesSource {
    fn new(from: &MemorySource, dtype: DType, strict: bool) -> Self {
        use lora_core::TensorSource;
        let mut values = MemorySource::new();
        let mut bytes = std::collections::HashMap::new();
        for name in from.tensor_names() {
            let t = from.read_f64(&name).unwrap();
            let raw: Vec<u8> = match dtype {
                DType::F64 => t.iter().flat_map(|v| v.to_le_bytes()).collect(),
                DType::F32 => t.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect(),
                DType::F16 => t.iter().flat_map(|&v| half::f16::from_f64(v).to_le_bytes()).collect(),
                DType::BF16 => t.iter().flat_map(|&v| half::bf16::from_f64(v).to_le_bytes()).collect(),
            };
            let mut rounded = vec![0f64; t.len()];
            lora_core::Stored { dtype, bytes: &raw }.decode_into(0, &mut rounded);
            values.insert(&name, ndarray::ArrayD::from_shape_vec(t.shape(), rounded).unwrap(), dtype);
            bytes.insert(name, (dtype, raw));
        }
        BytesSource { values, bytes, strict }
    }
}

impl lora_core::TensorSource for BytesSource {
    fn tensor_names(&self) -> Vec<String> {
        self.values.tensor_names()
    }
    fn tensor_info(&self, name: &str) -> Option<lora_core::TensorInfo> {
        self.values.tensor_info(name)
    }
    fn read_f32(&self, name: &str) -> lora_core::Result<ndarray::ArrayD<f32>> {
        let t = self.values.read_f32(name)?;
        if self.strict && t.iter().any(|v| !v.is_finite()) {
            return Err(lora_core::Error::Source { name: name.into(), source: "not finite in the file".into() });
        }
        Ok(t)
    }
    fn read_f64(&self, name: &str) -> lora_core::Result<ndarray::ArrayD<f64>> {
        self.read_f32(name)?; // the strict check
        self.values.read_f64(name)
    }
    fn stored(&self, name: &str) -> Option<lora_core::Stored<'_>> {
        self.bytes.get(name).map(|(dtype, bytes)| lora_core::Stored { dtype: *dtype, bytes })
    }
}

fn same_extraction<T: SvdScalar>(a: &ModelExtraction<T>, b: &ModelExtraction<T>) {
    assert_eq!(a.modules.keys().collect::<Vec<_>>(), b.modules.keys().collect::<Vec<_>>());
    for (x, y) in a.modules.values().zip(b.modules.values()) {
        assert_eq!(x.layer, y.layer, "{}", x.tensor);
        assert_eq!(x.report.rank, y.report.rank);
        assert!((x.report.relative_error - y.report.relative_error).abs() < 1e-12, "{}", x.tensor);
    }
    assert_eq!((&a.unchanged, &a.not_extracted), (&b.unchanged, &b.not_extracted));
}

#[test]
fn extraction_from_stored_bytes_equals_extraction_from_arrays() {
    let (base, tuned) = models();
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
        let (base, tuned) = (BytesSource::new(&base, dtype, true), BytesSource::new(&tuned, dtype, true));
        for parallelism in [Parallelism::Sequential, Parallelism::Layers(2)] {
            let config = model_config(parallelism);
            let none = |_: &Progress<'_>| {};
            let fused: ModelExtraction<f32> = extract_model(&base, &tuned, &config, &none).unwrap();
            let read: ModelExtraction<f32> = extract_model(&base.values, &tuned.values, &config, &none).unwrap();
            same_extraction(&fused, &read);
            assert_eq!(fused.modules.len(), 2, "{dtype:?}");
            assert_eq!(fused.unchanged.len(), 2, "zero differences found from the bytes too");
            let fused: ModelExtraction<f64> = extract_model(&base, &tuned, &config, &none).unwrap();
            let read: ModelExtraction<f64> = extract_model(&base.values, &tuned.values, &config, &none).unwrap();
            same_extraction(&fused, &read);
        }
    }
}

#[test]
fn a_non_finite_stored_value_is_reported_by_the_source_that_holds_it() {
    use lora_core::TensorSource;
    let (base, mut tuned) = models();
    let name = "model.layers.1.self_attn.q_proj.weight";
    let mut t = tuned.read_f64(name).unwrap();
    t[[3, 4]] = f64::NAN;
    tuned.insert(name, t, DType::F32);
    let base = BytesSource::new(&base, DType::F32, true);
    let config = model_config(Parallelism::Sequential);
    // The source's own check on read names the file's problem...
    let err = extract_model::<f32, _, _>(&base, &BytesSource::new(&tuned, DType::F32, true), &config, &|_| {});
    let msg = err.unwrap_err().to_string();
    assert!(msg.contains(name) && msg.contains("not finite in the file"), "{msg}");
    // ...and a source without one gets the error of the difference.
    let err = extract_model::<f32, _, _>(&base, &BytesSource::new(&tuned, DType::F32, false), &config, &|_| {});
    let msg = err.unwrap_err().to_string();
    assert!(msg.contains(name) && msg.contains("[3, 4]"), "{msg}");
}

#[test]
fn a_difference_whose_squares_underflow_is_still_extracted() {
    let mut base = MemorySource::new();
    let mut tuned = MemorySource::new();
    let name = "model.layers.0.mlp.up_proj.weight";
    base.insert(name, Array2::<f64>::zeros((4, 3)).into_dyn(), DType::F64);
    let mut t = Array2::<f64>::zeros((4, 3));
    t[[1, 2]] = 1e-200;
    tuned.insert(name, t.into_dyn(), DType::F64);
    let (base, tuned) = (BytesSource::new(&base, DType::F64, true), BytesSource::new(&tuned, DType::F64, true));
    let out: ModelExtraction<f64> =
        extract_model(&base, &tuned, &model_config(Parallelism::Sequential), &|_: &Progress<'_>| {}).unwrap();
    assert!(out.unchanged.is_empty(), "a non-zero difference is not 'unchanged'");
    assert_eq!(out.modules.len(), 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The f32 kernels for products with thin matrices agree with BLAS on every width they take
    /// (16 to 64 columns) and on row counts that are not multiples of their blocks; other
    /// widths fall back to BLAS (`None`).
    #[test]
    fn thin_products_equal_blas(m in 1usize..40, n in 1usize..1100, w in 1usize..6, seed in 0u64..1000) {
        let a = gaussian::<f32>(m, n, seed);
        let (x, xt) = (gaussian::<f32>(n, 16 * w, seed + 1), gaussian::<f32>(m, 16 * w, seed + 2));
        let supported = w <= 4 && std::arch::is_x86_feature_detected!("avx512f");
        for (got, want, terms) in [
            (crate::thin::mul(&a, &x), a.dot(&x), n),
            (crate::thin::mul_t(&a, &xt), a.t().dot(&xt), m),
        ] {
            prop_assert_eq!(got.is_some(), supported);
            if let Some(got) = got {
                prop_assert_eq!(got.dim(), want.dim());
                // Each element sums `terms` products of standard normals: rounding is relative
                // to sqrt(terms), not to the element.
                let worst = (&got - &want).iter().fold(0f32, |m, v| m.max(v.abs()));
                prop_assert!(worst <= 1e-5 * terms as f32, "worst difference {worst}");
            }
        }
        prop_assert!(crate::thin::mul(&a, &x.slice(ndarray::s![.., ..15]).to_owned()).is_none(), "15 columns");
    }
}
