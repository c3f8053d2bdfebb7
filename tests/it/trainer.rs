//! lora-train's trainer end to end through files: a tiny base model folder and JSONL data on
//! disk, `train` writing checkpoints and a PEFT folder, read back through lora-io and checked
//! against the keys, shapes and config fields of the adapter the real PEFT made for a model of
//! the same shape (tests/fixtures/peft/plain).

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use lora_io::{check_adapter_against_model, read_peft, ModelFolder, SafetensorsFile};
use lora_train::synthetic::{generate, to_jsonl, write_tiny_model, Task, TinyModelSpec};
use lora_train::{eval, latest_checkpoint, load_model, train, TrainConfig, TrainLength};
use serde_json::Value;

/// The shape of the `plain` fixture's base (hidden 32, intermediate 64, 2 layers, 4 heads), with
/// a byte vocabulary.
fn spec() -> TinyModelSpec {
    TinyModelSpec { hidden: 32, intermediate: 64, layers: 2, heads: 4, kv_heads: 4, vocab: 256, seed: 3 }
}

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/peft/plain/adapter")
}

fn shapes(path: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    let f = SafetensorsFile::open(path)?;
    Ok(f.names().map(|n| (n.to_string(), f.shape(n).unwrap_or_default().to_vec())).collect())
}

#[test]
fn train_writes_a_peft_adapter_like_peft_does() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (base, data, out) = (tmp.path().join("base"), tmp.path().join("add.jsonl"), tmp.path().join("out"));
    write_tiny_model(&base, &spec())?;
    std::fs::write(&data, to_jsonl(&generate(Task::Addition { digits: 2 }, 200, 1)))?;
    let config = TrainConfig {
        rank: 8,
        alpha: 16.0,
        lr: 1e-2,
        length: TrainLength::Steps(6),
        batch: 2,
        seq_len: 32,
        save_every: Some(4),
        eval_every: Some(3),
        val_fraction: 0.1,
        ..TrainConfig::default()
    };
    let mut lines = Vec::new();
    let summary = train(&base, &data, &out, &config, |r| {
        lines.push(r.to_json());
        ControlFlow::Continue(())
    })?;
    ensure!(summary.steps == 6 && !summary.stopped, "{summary:?}");
    ensure!(
        lines.len() == 6 && lines[2].get("eval_loss").is_some() && lines[3].get("checkpoint").is_some(),
        "{lines:?}"
    );
    for key in ["step", "loss", "lr", "tokens_per_second", "grad_norm"] {
        ensure!(lines[0].get(key).is_some(), "metrics line lacks {key}: {}", lines[0]);
    }

    // same tensor names and shapes as the adapter PEFT wrote for this model shape
    let ours = shapes(&out.join("adapter_model.safetensors"))?;
    let peft = shapes(&fixture().join("adapter_model.safetensors"))?;
    ensure!(ours == peft, "keys / shapes differ from PEFT's:\n{ours:?}\n{peft:?}");
    // the config fields PEFT reads
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json"))?)?;
    let fix: Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("adapter_config.json"))?)?;
    for key in ["peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "bias", "task_type"] {
        ensure!(cfg[key] == fix[key], "{key}: {} vs PEFT's {}", cfg[key], fix[key]);
    }
    let mut targets: Vec<String> = serde_json::from_value(cfg["target_modules"].clone())?;
    let mut expected: Vec<String> = serde_json::from_value(fix["target_modules"].clone())?;
    targets.sort();
    expected.sort();
    ensure!(targets == expected, "{targets:?} vs {expected:?}");
    ensure!(cfg["base_model_name_or_path"] == Value::from(base.display().to_string()));

    // it reads back through lora-io, fits the base, and evaluates as the trainer's model did
    let adapter = read_peft::<f32>(&out)?;
    check_adapter_against_model(&adapter, &ModelFolder::open(&base)?, &out)?;
    let mut model = load_model(&base)?;
    model.load_adapter(&adapter)?;
    let tokens: Vec<u32> = std::fs::read(&data)?.into_iter().map(u32::from).collect();
    let with = eval::evaluate(&model, &tokens, 32, 8)?;
    let merged = eval::evaluate(&model.merged(), &tokens, 32, 8)?;
    ensure!((with.loss - merged.loss).abs() <= 1e-5 * with.loss, "{} vs {}", with.loss, merged.loss);

    // the checkpoint is a PEFT folder too, plus the trainer state; resuming from it finishes
    let ckpt = latest_checkpoint(&out)?.context("no checkpoint written")?;
    ensure!(ckpt.ends_with("checkpoint-4"), "{}", ckpt.display());
    ensure!(shapes(&ckpt.join("adapter_model.safetensors"))? == peft);
    let state: Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json"))?)?;
    ensure!(state["step"] == 4 && state["rng"]["seed"] == 0, "{state}");
    let out2 = tmp.path().join("out2");
    let resumed = TrainConfig { resume: Some(ckpt), ..config.clone() };
    let s2 = train(&base, &data, &out2, &resumed, |_| ControlFlow::Continue(()))?;
    ensure!(s2.steps == 6, "{s2:?}");
    let a = read_peft::<f32>(&out)?;
    let b = read_peft::<f32>(&out2)?;
    for (name, m) in a.modules() {
        let n = &b.modules()[name];
        let diff = (m.layer().b() - n.layer().b()).mapv(f32::abs).fold(0.0f32, |x, &y| x.max(y));
        ensure!(diff <= 1e-6, "{name}: resumed B differs by {diff}");
    }
    Ok(())
}

#[test]
fn train_errors_name_the_file() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let base = tmp.path().join("base");
    write_tiny_model(&base, &spec())?;
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"prompt\": 1}\n")?;
    let config = TrainConfig { seq_len: 8, length: TrainLength::Steps(1), ..TrainConfig::default() };
    let err =
        train(&base, &bad, &tmp.path().join("o"), &config, |_| ControlFlow::Continue(())).unwrap_err().to_string();
    ensure!(err.contains("bad.jsonl:2"), "{err}");
    let err = train(&tmp.path().join("nobase"), &bad, &tmp.path().join("o"), &config, |_| ControlFlow::Continue(()))
        .unwrap_err()
        .to_string();
    ensure!(err.contains("nobase"), "{err}");
    Ok(())
}
