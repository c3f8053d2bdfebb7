//! lora-train against transformers and PEFT on the committed fixtures of
//! `tests/fixtures/train/` (made by `make_train_fixtures.py` there; no Python at test time).
//!
//! Errors are measured as max |ours - theirs| / max |theirs| over a tensor ("relative").

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lora_core::{Adapter, AdapterConfig, AdapterModule, LoraLayer, Scaling, TargetModules, TensorInfo, TensorSource};
use lora_train::eval::{evaluate, tokenize_file, Tokenization};
use lora_train::{Batch, LoraConfig, Model, ModelConfig, Parallelism, StepOptions, IGNORE_INDEX};
use ndarray::{Array2, ArrayD, Axis, Ix2, Ix3};

// ---- test-only safetensors reader: replace with lora-io's reader once it lands ----------------
struct Safetensors {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl Safetensors {
    fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
        safetensors::SafeTensors::deserialize(&bytes).with_context(|| path.display().to_string())?;
        Ok(Safetensors { path: path.to_path_buf(), bytes })
    }
    fn view(&self, name: &str) -> lora_core::Result<safetensors::tensor::TensorView<'_>> {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).expect("checked in open");
        st.tensor(name).map_err(|e| lora_core::Error::Source {
            name: format!("{} in {}", name, self.path.display()),
            source: Box::new(e),
        })
    }
    fn i64(&self, name: &str) -> Result<ArrayD<i64>> {
        let v = self.view(name)?;
        anyhow::ensure!(v.dtype() == safetensors::Dtype::I64, "{name}: not I64");
        let data = v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
        Ok(ArrayD::from_shape_vec(v.shape().to_vec(), data)?)
    }
}

impl TensorSource for Safetensors {
    fn tensor_names(&self) -> Vec<String> {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).expect("checked in open");
        st.names().into_iter().map(String::from).collect()
    }
    fn tensor_info(&self, name: &str) -> Option<TensorInfo> {
        let v = self.view(name).ok()?;
        Some(TensorInfo { shape: v.shape().to_vec(), dtype: lora_core::DType::F32 })
    }
    fn read_f32(&self, name: &str) -> lora_core::Result<ArrayD<f32>> {
        let v = self.view(name)?;
        if v.dtype() != safetensors::Dtype::F32 {
            return Err(lora_core::Error::Unsupported(format!(
                "{name}: dtype {:?} (test reader: F32 only)",
                v.dtype()
            )));
        }
        let data = v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        Ok(ArrayD::from_shape_vec(v.shape().to_vec(), data).expect("safetensors checked the length"))
    }
}
// -------------------------------------------------------------------------------------------------

fn case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/train").join(name)
}

fn load(name: &str) -> Result<(Model<f32>, Safetensors)> {
    let dir = case(name);
    let config = ModelConfig::from_file(&dir.join("model/config.json"))?;
    let weights = Safetensors::open(&dir.join("model/model.safetensors"))?;
    let model = Model::from_source(config, &weights)?;
    Ok((model, Safetensors::open(&dir.join("reference.safetensors"))?))
}

/// PEFT adapter folder -> lora-core Adapter (lora-io's PEFT reader will replace this).
fn read_peft_adapter(dir: &Path) -> Result<Adapter<f32>> {
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json"))?)?;
    let r = cfg["r"].as_u64().context("r")? as usize;
    let alpha = cfg["lora_alpha"].as_f64().context("lora_alpha")?;
    let scaling = if cfg["use_rslora"].as_bool() == Some(true) { Scaling::RsLora } else { Scaling::Standard };
    let targets = cfg["target_modules"].as_array().context("target_modules")?;
    let mut config = AdapterConfig::new(
        r,
        alpha,
        TargetModules::List(targets.iter().filter_map(|t| t.as_str().map(String::from)).collect()),
    );
    config.scaling = scaling;
    let file = Safetensors::open(&dir.join("adapter_model.safetensors"))?;
    let mut adapter = Adapter::new(config);
    for name in file.tensor_names().iter().filter(|n| n.ends_with(".lora_A.weight")) {
        let module = name.trim_start_matches("base_model.model.").trim_end_matches(".lora_A.weight");
        let a = file.read_f32(name)?.into_dimensionality::<Ix2>()?;
        let b = file.read_f32(&name.replace("lora_A", "lora_B"))?.into_dimensionality::<Ix2>()?;
        adapter.insert(module, AdapterModule::linear(LoraLayer::new(a, b, alpha, scaling)?))?;
    }
    Ok(adapter)
}

fn rel_err<D: ndarray::Dimension>(ours: &ndarray::ArrayRef<f32, D>, theirs: &ndarray::ArrayRef<f32, D>) -> f64 {
    assert_eq!(ours.shape(), theirs.shape());
    let max_diff = ours.iter().zip(theirs.iter()).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
    let max_ref = theirs.iter().map(|v| v.abs() as f64).fold(0.0, f64::max);
    max_diff / max_ref
}

fn batch(reference: &Safetensors) -> Result<Batch> {
    let ids = reference.i64("input_ids")?.into_dimensionality::<Ix2>()?.mapv(|v| v as u32);
    Ok(Batch::new(ids)?)
}

fn scalar(reference: &Safetensors, name: &str) -> Result<f64> {
    Ok(f64::from(reference.read_f32(name)?[[0]]))
}

#[test]
fn logits_and_loss_equal_transformers() -> Result<()> {
    for name in ["llama", "llama_tied", "mistral", "qwen2"] {
        let (model, reference) = load(name)?;
        let batch = batch(&reference)?;
        let logits = model.logits(&batch)?;
        let err = rel_err(&logits, &reference.read_f32("logits")?.into_dimensionality::<Ix3>()?);
        let loss = model.loss(&batch)?.mean();
        let loss_err = (loss - scalar(&reference, "loss")?).abs() / scalar(&reference, "loss")?;
        eprintln!("{name}: logits relative error {err:.2e}, loss relative error {loss_err:.2e}");
        assert!(err < 1e-4 && loss_err < 1e-4, "{name}: logits {err:e}, loss {loss_err:e}");
    }
    Ok(())
}

#[test]
fn padding_mask_equals_transformers_on_real_tokens() -> Result<()> {
    let (model, reference) = load("llama")?;
    let mask = reference.i64("attention_mask")?.into_dimensionality::<Ix2>()?.mapv(|m| m != 0);
    let plain = batch(&reference)?;
    let labels = Array2::from_shape_fn(mask.dim(), |(b, t)| {
        if mask[[b, t]] {
            i64::from(plain.input_ids()[[b, t]])
        } else {
            IGNORE_INDEX
        }
    });
    let batch = plain.with_attention_mask(mask.clone())?.with_labels(labels)?;
    let logits = model.logits(&batch)?;
    let theirs = reference.read_f32("logits_masked")?.into_dimensionality::<Ix3>()?;
    let mut worst: f64 = 0.0;
    for ((b, t), _) in mask.indexed_iter().filter(|(_, &m)| m) {
        let (ours, theirs) = (logits.index_axis(Axis(0), b), theirs.index_axis(Axis(0), b));
        worst = worst.max(rel_err(&ours.index_axis(Axis(0), t), &theirs.index_axis(Axis(0), t)));
    }
    let loss = model.loss(&batch)?;
    let loss_err = (loss.mean() - scalar(&reference, "loss_masked")?).abs() / scalar(&reference, "loss_masked")?;
    eprintln!("padding mask: logits relative error {worst:.2e}, loss relative error {loss_err:.2e}");
    assert!(worst < 1e-4 && loss_err < 1e-4, "logits {worst:e}, loss {loss_err:e}");
    assert_eq!(loss.count, 2 * 11 - 3 - 1); // right padding drops 3 labels, left padding the one counted of 2
    Ok(())
}

#[test]
fn peft_adapter_gives_peft_logits_loss_and_gradients() -> Result<()> {
    for name in ["llama", "qwen2"] {
        let (mut model, reference) = load(name)?;
        let adapter = read_peft_adapter(&case(name).join("adapter"))?;
        model.load_adapter(&adapter)?;
        let batch = batch(&reference)?;
        let err = rel_err(&model.logits(&batch)?, &reference.read_f32("logits_adapted")?.into_dimensionality::<Ix3>()?);
        let (loss, grads) = model.loss_and_grads(&batch, StepOptions::default())?;
        let want = scalar(&reference, "loss_adapted")?;
        let loss_err = (loss.mean() - want).abs() / want;
        let peft_grads = Safetensors::open(&case(name).join("grads.safetensors"))?;
        assert_eq!(grads.len() * 2, peft_grads.tensor_names().len());
        let mut grad_err: f64 = 0.0;
        for (module, g) in &grads {
            let key = |f: &str| format!("base_model.model.{module}.lora_{f}.weight");
            grad_err = grad_err.max(rel_err(&g.a, &peft_grads.read_f32(&key("A"))?.into_dimensionality::<Ix2>()?));
            grad_err = grad_err.max(rel_err(&g.b, &peft_grads.read_f32(&key("B"))?.into_dimensionality::<Ix2>()?));
        }
        eprintln!("{name} + PEFT adapter: logits {err:.2e}, loss {loss_err:.2e}, LoRA gradients {grad_err:.2e}");
        assert!(err < 1e-4 && loss_err < 1e-4 && grad_err < 1e-4, "{name}: {err:e} {loss_err:e} {grad_err:e}");
    }
    Ok(())
}

#[test]
fn zero_b_gives_the_base_logits_exactly_and_merged_equals_unmerged() -> Result<()> {
    let (mut model, reference) = load("qwen2")?;
    let batch = batch(&reference)?;
    let base = model.logits(&batch)?;
    assert_eq!(model.add_lora(&LoraConfig::new(4, 8.0, TargetModules::AllLinear))?, 14);
    assert_eq!(model.logits(&batch)?, base, "B = 0 must change nothing, bit for bit");

    model.load_adapter(&read_peft_adapter(&case("qwen2").join("adapter"))?)?;
    let unmerged = model.logits(&batch)?;
    let merged = model.merged();
    assert!(merged.lora_modules().is_empty());
    let err = rel_err(&merged.logits(&batch)?, &unmerged);
    eprintln!("merged vs unmerged: relative error {err:.2e}");
    assert!(err < 1e-5, "{err:e}");
    Ok(())
}

#[test]
fn adapter_round_trips_through_the_model_with_peft_names() -> Result<()> {
    let (mut model, _) = load("llama")?;
    let adapter = read_peft_adapter(&case("llama").join("adapter"))?;
    model.load_adapter(&adapter)?;
    let out = model.adapter()?;
    assert_eq!(out.config().scaling, Scaling::RsLora);
    assert_eq!(out.modules().keys().collect::<Vec<_>>().len(), 6);
    for (name, module) in adapter.modules() {
        assert_eq!(out.module(name).map(|m| m.layer()), Some(module.layer()), "{name}");
    }
    // a module that is not in the model is refused, naming it, and nothing changes
    let mut bad = Adapter::new(adapter.config().clone());
    bad.insert("model.layers.7.self_attn.q_proj", adapter.modules()[0].clone())?;
    let err = model.load_adapter(&bad).unwrap_err().to_string();
    assert!(err.contains("model.layers.7.self_attn.q_proj"), "{err}");
    assert_eq!(model.lora_modules().len(), 6);
    Ok(())
}

#[test]
fn threads_give_the_same_numbers_as_the_sequential_path() -> Result<()> {
    let (mut model, reference) = load("mistral")?;
    let mut lora = LoraConfig::new(4, 8.0, TargetModules::AllLinear);
    lora.init = lora_core::Init::Random { b_std: 0.1 };
    model.add_lora(&lora)?;
    let batch = batch(&reference)?;
    let (l1, g1) = model.loss_and_grads(&batch, StepOptions::default())?;
    let model = model.with_parallelism(Parallelism::Threads(2))?;
    let (l2, g2) = model.loss_and_grads(&batch, StepOptions::default())?;
    assert_eq!((l1, g1), (l2, g2));
    Ok(())
}

#[test]
fn eval_equals_transformers_on_blocks() -> Result<()> {
    let data = case("eval.txt");
    // raw bytes (the llama folder has no tokenizer.json)
    let (model, reference) = load("llama")?;
    let tokens = tokenize_file(&case("llama/model"), &data, 256)?;
    assert_eq!(tokens.tokenization, Tokenization::Bytes);
    let report = evaluate(&model, &tokens.ids, 16, 5)?;
    let want = scalar(&reference, "eval_bytes_loss")?;
    let blocks = reference.i64("eval_bytes_blocks")?;
    assert_eq!((report.blocks, report.tokens), (blocks.shape()[0], blocks.shape()[0] * 15));
    let err_bytes = (report.loss - want).abs() / want;
    assert!((report.perplexity - report.loss.exp()).abs() < 1e-12);
    // tokenizer.json
    let (model, reference) = load("llama_tied")?;
    let tokens = tokenize_file(&case("llama_tied/model"), &data, 256)?;
    assert!(matches!(tokens.tokenization, Tokenization::Tokenizer(_)));
    let want_ids: Vec<u32> = reference.i64("eval_tokens")?.iter().map(|&v| v as u32).collect();
    assert_eq!(tokens.ids, want_ids);
    let report = evaluate(&model, &tokens.ids, 16, 64)?;
    let want = scalar(&reference, "eval_tok_loss")?;
    let err_tok = (report.loss - want).abs() / want;
    eprintln!("eval: raw bytes loss relative error {err_bytes:.2e}, tokenizer.json {err_tok:.2e}");
    assert!(err_bytes < 1e-4 && err_tok < 1e-4, "{err_bytes:e} {err_tok:e}");
    assert_eq!(report.to_json()["tokens"], report.tokens);
    Ok(())
}

#[test]
fn a_sliding_window_shorter_than_the_sequence_is_refused() -> Result<()> {
    let dir = case("mistral/model");
    let text =
        std::fs::read_to_string(dir.join("config.json"))?.replace("\"sliding_window\": 4096", "\"sliding_window\": 4");
    let config = ModelConfig::from_json(&text, "mistral/config.json")?;
    let model = Model::<f32>::from_source(config, &Safetensors::open(&dir.join("model.safetensors"))?)?;
    let (_, reference) = load("mistral")?;
    let err = model.logits(&batch(&reference)?).unwrap_err().to_string();
    assert!(err.contains("sliding_window 4") && err.contains("12"), "{err}");
    Ok(())
}

#[test]
fn missing_and_misshapen_weights_are_named() -> Result<()> {
    let dir = case("qwen2/model");
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let weights = Safetensors::open(&dir.join("model.safetensors"))?;
    let mut wrong = config.clone();
    wrong.intermediate_size = 100;
    let err = Model::<f32>::from_source(wrong, &weights).unwrap_err().to_string();
    assert!(err.contains("model.layers.0.mlp.gate_proj.weight") && err.contains("[100, 64]"), "{err}");
    let mut tied_but_untied = config;
    tied_but_untied.tie_word_embeddings = false;
    tied_but_untied.qkv_bias = false;
    assert!(Model::<f32>::from_source(tied_but_untied, &weights).is_ok());
    let (_, tied_ref) = load("llama_tied")?;
    let llama_config = ModelConfig::from_file(&case("llama_tied/model/config.json"))?;
    let mut untied = llama_config;
    untied.tie_word_embeddings = false;
    let err = Model::<f32>::from_source(untied, &Safetensors::open(&case("llama_tied/model/model.safetensors"))?)
        .unwrap_err()
        .to_string();
    assert!(err.contains("lm_head.weight"), "{err}");
    drop(tied_ref);
    Ok(())
}
