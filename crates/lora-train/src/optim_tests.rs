//! Unit tests of AdamW, the schedules and gradient clipping against numbers made by the real
//! torch.optim.AdamW, clip_grad_norm_ and transformers' schedules
//! (`reference/optim_reference.py` wrote `reference/optim_reference.json`).

use indexmap::IndexMap;
use ndarray::Array2;
use serde_json::Value;

use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, Schedule};
use crate::{LoraGrad, LoraParamsMut};

fn reference() -> Value {
    serde_json::from_str(include_str!("../reference/optim_reference.json")).unwrap()
}

fn mat(v: &Value) -> Array2<f64> {
    let rows: Vec<Vec<f64>> = serde_json::from_value(v.clone()).unwrap();
    let (r, c) = (rows.len(), rows[0].len());
    Array2::from_shape_vec((r, c), rows.into_iter().flatten().collect()).unwrap()
}

fn max_diff(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
    assert_eq!(a.dim(), b.dim());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn grads(v: &Value) -> IndexMap<String, LoraGrad<f64>> {
    let mut g = IndexMap::new();
    g.insert("m".to_string(), LoraGrad { a: mat(&v["a"]), b: mat(&v["b"]) });
    g
}

#[test]
fn adamw_matches_torch() {
    let r = &reference()["adamw"];
    let (mut a, mut b) = (mat(&r["a0"]), mat(&r["b0"]));
    let config = AdamWConfig {
        beta1: r["betas"][0].as_f64().unwrap(),
        beta2: r["betas"][1].as_f64().unwrap(),
        eps: r["eps"].as_f64().unwrap(),
        weight_decay: r["weight_decay"].as_f64().unwrap(),
    };
    let mut opt = AdamW::<f64>::new(config).unwrap();
    for (lr, g) in r["lrs"].as_array().unwrap().iter().zip(r["grads"].as_array().unwrap()) {
        let mut params = [LoraParamsMut { module: "m".into(), a: a.view_mut(), b: b.view_mut() }];
        opt.step(&mut params, &grads(g), lr.as_f64().unwrap()).unwrap();
    }
    assert_eq!(opt.steps(), 6);
    // f64 on both sides: equal to rounding
    assert!(max_diff(&a, &mat(&r["a"])) < 1e-14, "A differs from torch by {}", max_diff(&a, &mat(&r["a"])));
    assert!(max_diff(&b, &mat(&r["b"])) < 1e-14, "B differs from torch by {}", max_diff(&b, &mat(&r["b"])));
    let m = &opt.moments()["m"];
    assert!(max_diff(&m.m_a, &mat(&r["exp_avg_a"])) < 1e-15);
    assert!(max_diff(&m.v_a, &mat(&r["exp_avg_sq_a"])) < 1e-15);
}

#[test]
fn adamw_hand_computed_first_step() {
    // step 1, no decay: m = 0.1 g, v = 0.001 g², bias-corrected m/sqrt(v) = sign(g), so
    // p <- p - lr * g / (|g| + eps) ~ p - lr sign(g); with decay 0.5 and lr 0.1: p (1 - 0.05) first.
    let mut a = ndarray::array![[1.0f64, -2.0]];
    let mut b = ndarray::array![[0.5f64]];
    let mut g = IndexMap::new();
    g.insert("m".to_string(), LoraGrad { a: ndarray::array![[4.0, -0.25]], b: ndarray::array![[2.0]] });
    let mut opt = AdamW::<f64>::new(AdamWConfig { weight_decay: 0.5, eps: 0.0, ..AdamWConfig::default() }).unwrap();
    let mut params = [LoraParamsMut { module: "m".into(), a: a.view_mut(), b: b.view_mut() }];
    opt.step(&mut params, &g, 0.1).unwrap();
    assert!((a[[0, 0]] - (0.95 - 0.1)).abs() < 1e-12, "{}", a[[0, 0]]);
    assert!((a[[0, 1]] - (-1.9 + 0.1)).abs() < 1e-12, "{}", a[[0, 1]]);
    assert!((b[[0, 0]] - (0.475 - 0.1)).abs() < 1e-12, "{}", b[[0, 0]]);
}

#[test]
fn adamw_refuses_missing_or_misshapen_gradients() {
    let mut a = Array2::<f32>::zeros((2, 3));
    let mut b = Array2::<f32>::zeros((3, 2));
    let mut opt = AdamW::<f32>::new(AdamWConfig::default()).unwrap();
    let mut params = [LoraParamsMut { module: "x".into(), a: a.view_mut(), b: b.view_mut() }];
    let err = opt.step(&mut params, &IndexMap::new(), 0.1).unwrap_err().to_string();
    assert!(err.contains("x") && err.contains("no gradient"), "{err}");
    let mut g = IndexMap::new();
    g.insert("x".to_string(), LoraGrad { a: Array2::zeros((3, 2)), b: Array2::zeros((3, 2)) });
    let err = opt.step(&mut params, &g, 0.1).unwrap_err().to_string();
    assert!(err.contains("shapes"), "{err}");
    assert_eq!(opt.steps(), 0, "a refused step changes nothing");
    assert!(opt.step(&mut params, &IndexMap::new(), f64::NAN).is_err());
    assert!(AdamW::<f32>::new(AdamWConfig { beta1: 1.0, ..AdamWConfig::default() }).is_err());
}

#[test]
fn clipping_matches_torch() {
    for case in reference()["clip"].as_array().unwrap() {
        let mut g = grads(&case["grads"]);
        let norm = clip_grad_norm(&mut g, case["max_norm"].as_f64().unwrap()).unwrap();
        assert!((norm - case["norm"].as_f64().unwrap()).abs() < 1e-12, "norm {norm} vs {}", case["norm"]);
        assert!(max_diff(&g["m"].a, &mat(&case["a"])) < 1e-14);
        assert!(max_diff(&g["m"].b, &mat(&case["b"])) < 1e-14);
    }
    let mut g = grads(&reference()["clip"][0]["grads"]);
    g["m"].a[[0, 0]] = f64::NAN;
    assert!(clip_grad_norm(&mut g, 1.0).unwrap_err().to_string().contains("diverged"));
}

#[test]
fn schedules_match_transformers() {
    let r = &reference()["schedules"];
    let (warmup, total) = (r["warmup"].as_u64().unwrap() as usize, r["total"].as_u64().unwrap() as usize);
    for s in [Schedule::Constant, Schedule::Linear, Schedule::Cosine] {
        let expected: Vec<f64> = serde_json::from_value(r[s.name()].clone()).unwrap();
        for (step, e) in expected.iter().enumerate() {
            let got = s.factor(step, warmup, total);
            assert!((got - e).abs() < 1e-15, "{} step {step}: {got} vs {e}", s.name());
        }
        assert_eq!(Schedule::parse(s.name()).unwrap(), s);
    }
    assert!(Schedule::parse("step").is_err());
    // hand-computed: no warmup, linear from 1 down, cosine half-way is 0.5
    assert_eq!(Schedule::Linear.factor(0, 0, 4), 1.0);
    assert_eq!(Schedule::Linear.factor(3, 0, 4), 0.25);
    assert!((Schedule::Cosine.factor(2, 0, 4) - 0.5).abs() < 1e-15);
}
