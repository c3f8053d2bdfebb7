//! Unit tests for every error, and property tests of the algebra on small shapes.

use ndarray::{array, Array1, Array2, Axis};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::*;

fn random<T: Scalar>(rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Array2<T> {
    Array2::from_shape_simple_fn((rows, cols), || T::from_f64(rng.random_range(-1.0..1.0)))
}

fn layer<T: Scalar>(d_in: usize, d_out: usize, rank: usize, alpha: f64, scaling: Scaling, seed: u64) -> LoraLayer<T> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let a = random(rank, d_in, &mut rng);
    let b = random(d_out, rank, &mut rng);
    LoraLayer::new(a, b, alpha, scaling).unwrap()
}

fn frobenius<T: Scalar>(m: &Array2<T>) -> f64 {
    m.iter().map(|v| v.as_f64().powi(2)).sum::<f64>().sqrt()
}

fn rel_err<T: Scalar>(got: &Array2<T>, want: &Array2<T>) -> f64 {
    frobenius(&(got - want)) / frobenius(want).max(f64::MIN_POSITIVE)
}

/// Numerical rank by Gaussian elimination with full pivoting, in f64.
fn numeric_rank(m: &Array2<f64>, tol: f64) -> usize {
    let mut m = m.clone();
    let (rows, cols) = m.dim();
    let scale = m.iter().fold(0.0f64, |acc, v| acc.max(v.abs())).max(f64::MIN_POSITIVE);
    let mut rank = 0;
    for _ in 0..rows.min(cols) {
        let mut best = (rank, rank, 0.0);
        for i in rank..rows {
            for j in rank..cols {
                if m[[i, j]].abs() > best.2 {
                    best = (i, j, m[[i, j]].abs());
                }
            }
        }
        if best.2 <= tol * scale {
            break;
        }
        for j in 0..cols {
            m.swap([rank, j], [best.0, j]);
        }
        for i in 0..rows {
            m.swap([i, rank], [i, best.1]);
        }
        for i in rank + 1..rows {
            let f = m[[i, rank]] / m[[rank, rank]];
            for j in rank..cols {
                m[[i, j]] -= f * m[[rank, j]];
            }
        }
        rank += 1;
    }
    rank
}

// ---- errors: one test each ----

#[test]
fn zero_rank_is_an_error() {
    let err = LoraLayer::<f32>::new(Array2::zeros((0, 4)), Array2::zeros((3, 0)), 1.0, Scaling::Standard);
    assert!(matches!(err, Err(Error::ZeroRank)));
    let err = LoraLayer::<f32>::init(4, 3, 0, 1.0, Scaling::Standard, Init::default(), 0);
    assert!(matches!(err, Err(Error::ZeroRank)));
}

#[test]
fn ranks_that_disagree_are_an_error() {
    let err = LoraLayer::<f32>::new(Array2::zeros((2, 4)), Array2::zeros((3, 5)), 1.0, Scaling::Standard).unwrap_err();
    assert_eq!(err.to_string(), "lora_B: expected shape [_, 2], got [3, 5]");
}

#[test]
fn empty_dimensions_are_an_error() {
    let err = LoraLayer::<f32>::new(Array2::zeros((2, 0)), Array2::zeros((3, 2)), 1.0, Scaling::Standard);
    assert!(matches!(err, Err(Error::EmptyDimension { .. })));
    let err = LoraLayer::<f32>::new(Array2::zeros((2, 4)), Array2::zeros((0, 2)), 1.0, Scaling::Standard);
    assert!(matches!(err, Err(Error::EmptyDimension { .. })));
}

#[test]
fn non_finite_alpha_is_an_error() {
    for alpha in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let err = LoraLayer::<f32>::new(Array2::zeros((1, 2)), Array2::zeros((2, 1)), alpha, Scaling::Standard);
        assert!(matches!(err, Err(Error::NonFiniteAlpha { .. })), "{alpha}");
    }
    let l = layer::<f32>(3, 2, 1, 1.0, Scaling::Standard, 0);
    assert!(matches!(l.with_alpha(f64::NAN, Scaling::Standard), Err(Error::NonFiniteAlpha { .. })));
}

#[test]
fn non_finite_factors_are_an_error_naming_the_tensor_and_index() {
    let mut a = Array2::<f32>::zeros((2, 3));
    a[[1, 2]] = f32::NAN;
    let err = LoraLayer::new(a, Array2::zeros((4, 2)), 1.0, Scaling::Standard).unwrap_err();
    assert_eq!(err.to_string(), "lora_A holds a non-finite value at index [1, 2]");
    let mut b = Array2::<f32>::zeros((4, 2));
    b[[3, 0]] = f32::INFINITY;
    let err = LoraLayer::new(Array2::zeros((2, 3)), b, 1.0, Scaling::Standard).unwrap_err();
    assert_eq!(err.to_string(), "lora_B holds a non-finite value at index [3, 0]");
}

#[test]
fn non_finite_scale_factor_is_an_error() {
    let l = layer::<f32>(3, 2, 1, 1.0, Scaling::Standard, 0);
    assert!(matches!(l.scaled(f64::NAN), Err(Error::NonFiniteFactor { .. })));
}

#[test]
fn bad_b_std_is_an_error() {
    let err = LoraLayer::<f32>::init(3, 2, 1, 1.0, Scaling::Standard, Init::Random { b_std: -1.0 }, 0);
    assert_eq!(err.unwrap_err().to_string(), "b_std must be finite and non-negative, got -1");
}

#[test]
fn wrong_input_and_weight_shapes_are_errors() {
    let l = layer::<f64>(3, 2, 1, 1.0, Scaling::Standard, 0);
    let x = Array2::<f64>::zeros((5, 4));
    assert_eq!(l.lora_branch(&x).unwrap_err().to_string(), "x: expected shape [_, 3], got [5, 4]");
    let x = Array2::<f64>::zeros((5, 3));
    let w = Array2::<f64>::zeros((3, 2));
    assert_eq!(l.forward(&x, &w, WeightLayout::OutIn).unwrap_err().to_string(), "W: expected shape [2, 3], got [3, 2]");
    assert!(l.forward(&x, &w, WeightLayout::InOut).is_ok());
    let mut w = Array2::<f64>::zeros((3, 3));
    assert!(l.merge_into(&mut w, WeightLayout::OutIn).is_err());
    assert!(l.unmerge_from(&mut w, WeightLayout::InOut).is_err());
    assert_eq!(w, Array2::zeros((3, 3)), "a failed merge leaves W untouched");
}

#[test]
fn concat_of_different_shapes_is_an_error() {
    let l1 = layer::<f64>(3, 2, 1, 1.0, Scaling::Standard, 0);
    let l2 = layer::<f64>(4, 2, 1, 1.0, Scaling::Standard, 0);
    assert!(matches!(l1.concat(&l2), Err(Error::ShapeMismatch { .. })));
}

#[test]
fn dora_errors() {
    let l = layer::<f64>(3, 2, 1, 1.0, Scaling::Standard, 0);
    let err = DoraLayer::new(l.clone(), Array1::ones(3)).unwrap_err();
    assert_eq!(err.to_string(), "lora_magnitude_vector: expected shape [2], got [3]");
    let err = DoraLayer::new(l.clone(), array![1.0, f64::NAN]).unwrap_err();
    assert!(matches!(err, Error::NonFinite { .. }));

    // a zero row of W + s B A cannot be normalised; W is left as it was
    let zero_b = LoraLayer::new(l.a().clone(), Array2::zeros((2, 1)), 1.0, Scaling::Standard).unwrap();
    let dora = DoraLayer::new(zero_b, array![1.0, 1.0]).unwrap();
    let mut w = array![[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]];
    let before = w.clone();
    assert!(matches!(dora.merge_into(&mut w, WeightLayout::OutIn), Err(Error::ZeroNorm { row: 1 })));
    assert_eq!(w, before);
    let x = Array2::zeros((1, 3));
    assert!(matches!(dora.forward(&x, &before, WeightLayout::OutIn), Err(Error::ZeroNorm { row: 1 })));

    let dora = DoraLayer::new(l.clone(), array![1.0, 0.0]).unwrap();
    let mut w = array![[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]];
    assert!(matches!(
        dora.unmerge_from(&mut w, WeightLayout::OutIn, &array![1.0, 1.0]),
        Err(Error::ZeroNorm { row: 1 })
    ));
    assert!(matches!(dora.unmerge_from(&mut w, WeightLayout::OutIn, &array![1.0]), Err(Error::ShapeMismatch { .. })));
}

fn config(rank: usize, alpha: f64) -> AdapterConfig {
    AdapterConfig::new(rank, alpha, TargetModules::List(vec!["q_proj".into()]))
}

#[test]
fn adapter_refuses_modules_that_disagree_with_its_config() {
    let mut adapter = Adapter::new(config(1, 1.0));
    let err = adapter
        .insert("model.q_proj", AdapterModule::linear(layer::<f64>(3, 2, 1, 1.0, Scaling::RsLora, 0)))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "module model.q_proj: adapter config and layer disagree: layer scaling RsLora, adapter scaling Standard"
    );

    let dora = DoraLayer::new(layer::<f64>(3, 2, 1, 1.0, Scaling::Standard, 0), Array1::ones(2)).unwrap();
    let err = adapter.insert("m", AdapterModule::dora(dora.clone())).unwrap_err();
    assert!(err.to_string().contains("use_dora is not set"), "{err}");

    let mut dora_config = config(1, 1.0);
    dora_config.use_dora = true;
    let mut dora_adapter = Adapter::new(dora_config);
    let err =
        dora_adapter.insert("m", AdapterModule::linear(layer::<f64>(3, 2, 1, 1.0, Scaling::Standard, 0))).unwrap_err();
    assert!(err.to_string().contains("no magnitude vector"), "{err}");
    dora_adapter.insert("m", AdapterModule::dora(dora)).unwrap();

    let err = dora_adapter.concat(&dora_adapter).unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)));

    let mut nan = ndarray::ArrayD::<f64>::zeros(vec![2]);
    nan[[0]] = f64::NAN;
    assert!(adapter.insert_saved("lm_head.weight", nan).is_err());
}

#[test]
fn adapter_concat_refuses_clashes() {
    let mut a1 = Adapter::new(config(1, 1.0));
    a1.insert("m", AdapterModule::linear(layer::<f64>(3, 2, 1, 1.0, Scaling::Standard, 0))).unwrap();
    let mut a2 = Adapter::new(config(1, 1.0));
    a2.insert("m", AdapterModule::embedding(layer::<f64>(3, 2, 1, 1.0, Scaling::Standard, 1))).unwrap();
    assert!(matches!(a1.concat(&a2), Err(Error::Module { .. })));

    let mut a3 = Adapter::new(AdapterConfig { fan_in_fan_out: true, ..config(1, 1.0) });
    a3.insert("m", AdapterModule::linear(layer::<f64>(3, 2, 1, 1.0, Scaling::Standard, 1))).unwrap();
    assert!(matches!(a1.concat(&a3), Err(Error::ConfigMismatch(_))));

    let mut a4 = a1.clone();
    a1.insert_saved("lm_head.weight", ndarray::ArrayD::zeros(vec![2])).unwrap();
    a4.insert_saved("lm_head.weight", ndarray::ArrayD::ones(vec![2])).unwrap();
    assert!(matches!(a1.concat(&a4), Err(Error::ConfigMismatch(_))));

    let mut w = Array2::zeros((2, 3));
    assert!(matches!(a1.merge_module_into("absent", &mut w), Err(Error::TensorNotFound { .. })));
}

#[test]
fn memory_source_errors() {
    let mut src = MemorySource::new();
    src.insert("v", ndarray::ArrayD::<f32>::zeros(vec![3]), DType::F32);
    assert!(matches!(read_matrix::<f32, _>(&src, "absent"), Err(Error::TensorNotFound { .. })));
    assert_eq!(read_matrix::<f32, _>(&src, "v").unwrap_err().to_string(), "v: expected shape [_, _], got [3]");
}

// ---- behaviour on hand-made cases ----

#[test]
fn peft_default_init_changes_nothing_and_is_reproducible() {
    let l = LoraLayer::<f32>::init(16, 8, 4, 8.0, Scaling::Standard, Init::KaimingUniform, 3).unwrap();
    assert!(l.b().iter().all(|v| *v == 0.0));
    let bound = 1.0 / 4.0; // 1/sqrt(16)
    assert!(l.a().iter().all(|v| v.abs() <= bound));
    assert!(l.a().iter().any(|v| v.abs() > bound / 2.0));
    assert_eq!(l, LoraLayer::init(16, 8, 4, 8.0, Scaling::Standard, Init::KaimingUniform, 3).unwrap());
    assert_ne!(l, LoraLayer::init(16, 8, 4, 8.0, Scaling::Standard, Init::KaimingUniform, 4).unwrap());
    assert!(l.delta().iter().all(|v| *v == 0.0));

    let g = LoraLayer::<f64>::init(400, 2, 4, 8.0, Scaling::Standard, Init::Gaussian, 3).unwrap();
    let std = (g.a().iter().map(|v| v * v).sum::<f64>() / g.a().len() as f64).sqrt();
    assert!((std - 0.25).abs() < 0.02, "std of A is {std}, PEFT's gaussian init uses 1/r = 0.25");
}

#[test]
fn scales_follow_peft() {
    assert_eq!(Scaling::Standard.scale(16.0, 8), 2.0);
    assert_eq!(Scaling::RsLora.scale(16.0, 16), 4.0);
    assert_eq!(Scaling::RsLora.alpha_for_scale(4.0, 16), 16.0);
    assert_eq!(Scaling::Standard.alpha_for_scale(2.0, 8), 16.0);
}

#[test]
fn dora_merged_rows_have_the_magnitude_as_norm() {
    let l = layer::<f64>(5, 3, 2, 4.0, Scaling::Standard, 9);
    let m = array![0.5, 2.0, 3.0];
    let dora = DoraLayer::new(l, m.clone()).unwrap();
    let w = random::<f64>(3, 5, &mut ChaCha8Rng::seed_from_u64(1));
    let merged = dora.merged_weight(&w, WeightLayout::OutIn).unwrap();
    for (row, want) in merged.axis_iter(Axis(0)).zip(m.iter()) {
        assert!((row.dot(&row).sqrt() - want).abs() < 1e-12);
    }
}

#[test]
fn parameter_counts_match_the_design_card() {
    assert_eq!(ParamCount::lora(3, 3, 1), ParamCount { trainable: 6, full: 9 });
    let big = ParamCount::lora(4096, 4096, 16);
    assert_eq!(big.trainable, 131_072);
    assert_eq!(big.full, 16_777_216);
    assert_eq!(big.reduction(), 128.0);
    assert_eq!(ParamCount::default().ratio(), 0.0);
}

// ---- properties ----

fn dims() -> impl Strategy<Value = (usize, usize, usize, u64)> {
    (1usize..9, 1usize..9, 1usize..5, any::<u64>())
}

fn scaling() -> impl Strategy<Value = Scaling> {
    prop_oneof![Just(Scaling::Standard), Just(Scaling::RsLora)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn merge_then_unmerge_returns_w_f32((d_in, d_out, r, seed) in dims(), s in scaling(), alpha in 0.5f64..32.0) {
        let l = layer::<f32>(d_in, d_out, r, alpha, s, seed);
        let w = random::<f32>(d_out, d_in, &mut ChaCha8Rng::seed_from_u64(seed ^ 1));
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            let w0 = if layout == WeightLayout::OutIn { w.clone() } else { w.t().to_owned() };
            let mut w1 = w0.clone();
            l.merge_into(&mut w1, layout).unwrap();
            l.unmerge_from(&mut w1, layout).unwrap();
            prop_assert!(rel_err(&w1, &w0) <= 1e-5, "{}", rel_err(&w1, &w0));
        }
    }

    #[test]
    fn merge_then_unmerge_returns_w_f64((d_in, d_out, r, seed) in dims(), s in scaling(), alpha in 0.5f64..32.0) {
        let l = layer::<f64>(d_in, d_out, r, alpha, s, seed);
        let w = random::<f64>(d_out, d_in, &mut ChaCha8Rng::seed_from_u64(seed ^ 1));
        let mut w1 = w.clone();
        l.merge_into(&mut w1, WeightLayout::OutIn).unwrap();
        l.unmerge_from(&mut w1, WeightLayout::OutIn).unwrap();
        prop_assert!(rel_err(&w1, &w) <= 1e-12);
    }

    #[test]
    fn merge_adds_s_b_a_in_either_layout((d_in, d_out, r, seed) in dims(), s in scaling(), alpha in 0.5f64..32.0) {
        let l = layer::<f64>(d_in, d_out, r, alpha, s, seed);
        let scale = s.scale(alpha, r);
        let want = l.b().dot(l.a()) * scale;
        prop_assert!(rel_err(&l.delta(), &want) <= 1e-12);
        let w = random::<f64>(d_out, d_in, &mut ChaCha8Rng::seed_from_u64(seed ^ 1));
        let mut merged = w.clone();
        l.merge_into(&mut merged, WeightLayout::OutIn).unwrap();
        prop_assert!(rel_err(&merged, &(&w + &want)) <= 1e-12);
        let mut merged_t = w.t().to_owned();
        l.merge_into(&mut merged_t, WeightLayout::InOut).unwrap();
        prop_assert!(rel_err(&merged_t, &(&w + &want).t().to_owned()) <= 1e-12);
        prop_assert!(rel_err(&l.delta_in(WeightLayout::InOut), &want.t().to_owned()) <= 1e-12);
    }

    #[test]
    fn forward_equals_the_merged_product((d_in, d_out, r, seed) in dims(), n in 1usize..6, s in scaling()) {
        let l = layer::<f64>(d_in, d_out, r, 8.0, s, seed);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 2);
        let w = random::<f64>(d_out, d_in, &mut rng);
        let x = random::<f64>(n, d_in, &mut rng);
        let want = x.dot(&(&w + &l.delta()).t());
        prop_assert!(rel_err(&l.forward(&x, &w, WeightLayout::OutIn).unwrap(), &want) <= 1e-12);
        let wt = w.t().to_owned();
        prop_assert!(rel_err(&l.forward(&x, &wt, WeightLayout::InOut).unwrap(), &want) <= 1e-12);
        let branch = l.lora_branch(&x).unwrap();
        prop_assert!(rel_err(&branch, &x.dot(&l.delta().t())) <= 1e-12);

        let lf = layer::<f32>(d_in, d_out, r, 8.0, s, seed);
        let (xf, wf) = (x.mapv(|v| v as f32), w.mapv(|v| v as f32));
        let merged = &wf + &lf.delta();
        let wantf = xf.dot(&merged.t());
        // f32 against f32: rounding is relative to the terms summed, not to the result, which
        // cancellation can make arbitrarily small (a single output of 5 terms failed at 1e-5).
        let gotf = lf.forward(&xf, &wf, WeightLayout::OutIn).unwrap();
        prop_assert!(frobenius(&(&gotf - &wantf)) <= 1e-5 * frobenius(&xf) * frobenius(&merged));
    }

    #[test]
    fn delta_rank_is_at_most_r((d_in, d_out, r, seed) in dims()) {
        let l = layer::<f64>(d_in, d_out, r, 1.0, Scaling::Standard, seed);
        prop_assert!(numeric_rank(&l.delta(), 1e-10) <= r.min(d_in).min(d_out));
    }

    #[test]
    fn concat_equals_the_sum_of_deltas((d_in, d_out, r1, seed) in dims(), r2 in 1usize..5, s1 in scaling(), s2 in scaling()) {
        let l1 = layer::<f64>(d_in, d_out, r1, 3.0, s1, seed);
        let l2 = layer::<f64>(d_in, d_out, r2, 5.0, s2, seed ^ 7);
        let sum = l1.concat(&l2).unwrap();
        prop_assert_eq!(sum.rank(), r1 + r2);
        prop_assert_eq!(sum.scale(), 1.0);
        prop_assert!(rel_err(&sum.delta(), &(l1.delta() + l2.delta())) <= 1e-12);
    }

    #[test]
    fn rescaling_keeps_or_scales_the_delta((d_in, d_out, r, seed) in dims(), s in scaling(), alpha in 0.5f64..32.0, f in -3.0f64..3.0) {
        let l = layer::<f64>(d_in, d_out, r, alpha, s, seed);
        let unit = l.with_unit_scale().unwrap();
        prop_assert!(rel_err(&unit.delta(), &l.delta()) <= 1e-12);
        let rs = l.with_alpha(7.0, Scaling::RsLora).unwrap();
        prop_assert!(rel_err(&rs.delta(), &l.delta()) <= 1e-12);
        prop_assert!(rel_err(&l.scaled(f).unwrap().delta(), &(l.delta() * f)) <= 1e-12 + f64::EPSILON);
    }

    #[test]
    fn dora_merge_matches_the_definition_and_unmerges((d_in, d_out, r, seed) in dims(), fan_in_fan_out in any::<bool>()) {
        let l = layer::<f64>(d_in, d_out, r, 2.0, Scaling::Standard, seed);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 3);
        let w = random::<f64>(d_out, d_in, &mut rng);
        let m = Array1::from_shape_simple_fn(d_out, || rng.random_range(0.5..2.0));
        let dora = DoraLayer::new(l.clone(), m.clone()).unwrap();

        // the definition, written out: m * (W + s B A) / ||W + s B A|| per output row
        let v = &w + &l.delta();
        let norms = v.map_axis(Axis(1), |row| row.dot(&row).sqrt());
        let want = &v * &(&m / &norms).insert_axis(Axis(1));

        let layout = if fan_in_fan_out { WeightLayout::InOut } else { WeightLayout::OutIn };
        let stored = if fan_in_fan_out { w.t().to_owned() } else { w.clone() };
        let mut merged = stored.clone();
        let got_norms = dora.merge_into(&mut merged, layout).unwrap();
        let merged_out_in = if fan_in_fan_out { merged.t().to_owned() } else { merged.clone() };
        prop_assert!(rel_err(&merged_out_in, &want) <= 1e-12);

        let x = random::<f64>(3, d_in, &mut rng);
        prop_assert!(rel_err(&dora.forward(&x, &stored, layout).unwrap(), &x.dot(&want.t())) <= 1e-12);

        dora.unmerge_from(&mut merged, layout, &got_norms).unwrap();
        prop_assert!(rel_err(&merged, &stored) <= 1e-12);

        // PEFT's initialisation: m = ||W + s B A||, so the adapted weight is W + s B A
        let init = DoraLayer::init_from_weight(l, &w, WeightLayout::OutIn).unwrap();
        prop_assert!(rel_err(&init.merged_weight(&w, WeightLayout::OutIn).unwrap(), &v) <= 1e-12);
    }

    #[test]
    fn param_counts_add_up((d_in, d_out, r, seed) in dims(), dora in any::<bool>()) {
        let l = layer::<f32>(d_in, d_out, r, 1.0, Scaling::Standard, seed);
        let c = l.param_count();
        prop_assert_eq!(c.trainable, (r * (d_in + d_out)) as u64);
        prop_assert_eq!(c.full, (d_in * d_out) as u64);
        prop_assert!((c.ratio() - (r * (d_in + d_out)) as f64 / (d_in * d_out) as f64).abs() < 1e-15);

        let mut cfg = config(r, 1.0);
        cfg.use_dora = dora;
        let mut adapter = Adapter::new(cfg);
        for name in ["a", "b", "c"] {
            let module = if dora {
                AdapterModule::dora(DoraLayer::new(l.clone(), Array1::ones(d_out)).unwrap())
            } else {
                AdapterModule::linear(l.clone())
            };
            adapter.insert(name, module).unwrap();
        }
        adapter.insert_saved("lm_head.weight", ndarray::ArrayD::zeros(vec![4, 5])).unwrap();
        let total = adapter.param_count();
        let per_module = c.trainable + if dora { d_out as u64 } else { 0 };
        prop_assert_eq!(total.trainable, 3 * per_module + 20);
        prop_assert_eq!(total.full, 3 * c.full + 20);
    }

    #[test]
    fn adapter_composition_is_exact((d_in, d_out, r, seed) in dims(), f in -2.0f64..2.0, rs in any::<bool>()) {
        let s = if rs { Scaling::RsLora } else { Scaling::Standard };
        let mut cfg1 = config(r, 4.0);
        cfg1.scaling = s;
        let mut a1 = Adapter::new(cfg1);
        let mut a2 = Adapter::new(config(2, 3.0));
        a1.insert("shared", AdapterModule::linear(layer::<f64>(d_in, d_out, r, 4.0, s, seed))).unwrap();
        a1.insert("only_first", AdapterModule::linear(layer::<f64>(d_in, d_out, r, 6.0, s, seed ^ 1))).unwrap();
        a2.insert("shared", AdapterModule::linear(layer::<f64>(d_in, d_out, 2, 3.0, Scaling::Standard, seed ^ 2))).unwrap();
        a2.insert("only_second", AdapterModule::linear(layer::<f64>(d_in, d_out, 2, 3.0, Scaling::Standard, seed ^ 3))).unwrap();

        let sum = a1.concat(&a2).unwrap();
        let (d1, d2, ds) = (deltas(&a1), deltas(&a2), deltas(&sum));
        prop_assert_eq!(ds.len(), 3);
        prop_assert!(rel_err(&ds["shared"], &(&d1["shared"] + &d2["shared"])) <= 1e-12);
        prop_assert!(rel_err(&ds["only_first"], &d1["only_first"]) <= 1e-12);
        prop_assert!(rel_err(&ds["only_second"], &d2["only_second"]) <= 1e-12);
        prop_assert_eq!(sum.module("shared").unwrap().layer().rank(), r + 2);
        prop_assert_eq!(sum.config().rank, r + 2);
        // every module has s = 1; modules of another rank than the default are in the patterns
        prop_assert_eq!(sum.rank_pattern().len(), sum.alpha_pattern().len());

        let scaled = a1.scaled(f).unwrap();
        let dsc = deltas(&scaled);
        for (name, d) in &d1 {
            prop_assert!(rel_err(&dsc[name], &(d * f)) <= 1e-12 + f64::EPSILON);
        }

        let mut w = random::<f64>(d_out, d_in, &mut ChaCha8Rng::seed_from_u64(seed));
        let want = &w + &d1["shared"];
        a1.merge_module_into("shared", &mut w).unwrap();
        prop_assert!(rel_err(&w, &want) <= 1e-12);
    }
}

#[test]
fn stored_bytes_decode_like_the_readers() {
    let values = [1.0f64, -0.5, 3.25e-3, 65504.0, 1e-8, -7.0, f64::INFINITY, 0.1];
    type Rounding = fn(f64) -> f64;
    let cases: [(DType, Vec<u8>, Rounding); 4] = [
        (DType::F64, values.iter().flat_map(|v| v.to_le_bytes()).collect(), |v| v),
        (DType::F32, values.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect(), |v| f64::from(v as f32)),
        (DType::F16, values.iter().flat_map(|&v| half::f16::from_f64(v).to_le_bytes()).collect(), |v| {
            half::f16::from_f64(v).to_f64()
        }),
        (DType::BF16, values.iter().flat_map(|&v| half::bf16::from_f64(v).to_le_bytes()).collect(), |v| {
            half::bf16::from_f64(v).to_f64()
        }),
    ];
    for (dtype, bytes, round) in cases {
        let stored = Stored { dtype, bytes: &bytes };
        assert_eq!(stored.len(), values.len());
        let (mut wide, mut narrow) = ([0f64; 5], [0f32; 5]);
        stored.decode_into(3, &mut wide);
        stored.decode_into(3, &mut narrow);
        for (i, v) in values[3..].iter().enumerate() {
            assert_eq!(wide[i].to_bits(), round(*v).to_bits(), "{dtype:?} element {}", i + 3);
            assert_eq!(narrow[i].to_bits(), (round(*v) as f32).to_bits(), "{dtype:?} element {}", i + 3);
        }
    }
}

#[test]
fn the_vectorised_f32_exp_is_within_two_ulp_and_clamps_outside_its_range() {
    // every 97th f32 in [-87, 88] (about 11 million values) against the correctly rounded e^x
    let (lo, hi) = ((-87.0f32).to_bits(), 88.0f32.to_bits());
    let negatives = (0x8000_0000..=lo).rev().step_by(97).map(f32::from_bits); // -87 .. -0
    let positives = (0..=hi).step_by(97).map(f32::from_bits); // 0 .. 88
    let mut worst = 0.0f64;
    for x in negatives.chain(positives).chain([-87.0, 88.0, 0.5, -0.5, 1e-30]) {
        let want = f64::from(x).exp();
        let got = f64::from(x.exp_vectorised());
        // one ulp of a normal f32 near `want` is want x 2^-23 at most
        let ulps = (got - want).abs() / (want * f64::from(f32::EPSILON));
        worst = worst.max(ulps);
        assert!(ulps <= 2.0, "e^{x}: {got} against {want} ({ulps:.2} ulp)");
    }
    assert!(worst > 0.0, "the comparison saw no rounding at all");
    assert_eq!((-200.0f32).exp_vectorised(), (-87.0f32).exp_vectorised());
    assert_eq!(f32::NEG_INFINITY.exp_vectorised(), (-87.0f32).exp_vectorised());
    assert_eq!(1000.0f32.exp_vectorised(), 88.0f32.exp_vectorised());
    assert!(f32::NAN.exp_vectorised().is_nan());
    assert_eq!(0.0f32.exp_vectorised(), 1.0);
    assert_eq!(2.5f64.exp_vectorised(), 2.5f64.exp());
}
