//! lora-io against files made by the real PEFT and transformers (tests/fixtures/peft, generated
//! by make_all.sh): reading, writing back, merging to PEFT's merged weights, model folders, and
//! the PEFT -> kohya -> PEFT and PEFT -> GGUF -> PEFT round trips.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use lora_core::{deltas, read_matrix, Adapter, DType, ModuleKind, TensorSource};
use lora_io::{
    check_adapter_against_model, detect_format, read_adapter, read_gguf, read_kohya, read_peft, write_gguf,
    write_kohya, write_model, write_peft, Error, Format, GgufFile, GgufOptions, KohyaOptions, ModelFolder,
    ModelWriteOptions, ModuleResolver, PeftWriteOptions, PlannedTensor, SafetensorsFile, SafetensorsWriter,
    META_MODULE_PATHS,
};
use ndarray::ArrayD;

const CASES: [&str; 10] =
    ["plain", "rslora", "patterns", "dora", "f16", "bf16", "gpt2_fifo", "embed_save", "mistral_gqa", "qwen2_gqa"];
/// Cases kohya and GGUF can hold (no DoRA, embeddings, modules_to_save or Conv1D).
const PLAIN_LORA: [&str; 7] = ["plain", "rslora", "patterns", "f16", "bf16", "mistral_gqa", "qwen2_gqa"];

fn case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/peft").join(name)
}

fn adapter(name: &str) -> Result<Adapter<f32>> {
    read_peft(case(name).join("adapter")).with_context(|| format!("reading fixture {name}"))
}

/// Largest |a - b| over every module's delta, relative to the largest |delta|.
fn max_delta_diff(a: &Adapter<f32>, b: &Adapter<f32>) -> Result<f64> {
    let (da, db) = (deltas(a), deltas(b));
    ensure!(da.len() == db.len(), "module counts {} and {} differ", da.len(), db.len());
    let mut worst = 0.0f64;
    for (name, d) in &da {
        let e = db.get(name).with_context(|| format!("module {name} is missing after the round trip"))?;
        ensure!(d.shape() == e.shape(), "{name}: shapes {:?} and {:?}", d.shape(), e.shape());
        let scale = d.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
        for (x, y) in d.iter().zip(e.iter()) {
            worst = worst.max(f64::from((x - y).abs() / scale));
        }
    }
    Ok(worst)
}

#[test]
fn every_fixture_reads_writes_and_reads_back_exactly() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for name in CASES {
        let a = adapter(name)?;
        let expected_modules = match name {
            "gpt2_fifo" => 8,
            "embed_save" => 15,
            _ => 14,
        };
        ensure!(a.len() == expected_modules, "{name}: {} modules", a.len());
        let out = tmp.path().join(name);
        write_peft(&a, &out, &PeftWriteOptions::default())?;
        let b: Adapter<f32> = read_peft(&out)?;
        ensure!(a.modules() == b.modules(), "{name}: modules differ after a write and a read");
        ensure!(a.saved_tensors() == b.saved_tensors(), "{name}: saved tensors differ");
        let (ca, cb) = (a.config(), b.config());
        ensure!(
            (ca.rank, ca.alpha, ca.scaling, ca.use_dora, ca.fan_in_fan_out, &ca.modules_to_save, &ca.target_modules)
                == (
                    cb.rank,
                    cb.alpha,
                    cb.scaling,
                    cb.use_dora,
                    cb.fan_in_fan_out,
                    &cb.modules_to_save,
                    &cb.target_modules
                ),
            "{name}: configs differ"
        );
        // Byte for byte: same keys, dtypes and data as the file PEFT wrote.
        let orig = SafetensorsFile::open(case(name).join("adapter/adapter_model.safetensors"))?;
        let mine = SafetensorsFile::open(out.join("adapter_model.safetensors"))?;
        let mut keys: Vec<&str> = orig.names().collect();
        let mut mine_keys: Vec<&str> = mine.names().collect();
        keys.sort();
        mine_keys.sort();
        ensure!(keys == mine_keys, "{name}: key sets differ");
        for k in keys {
            ensure!(orig.dtype_name(k) == mine.dtype_name(k), "{name}: {k} dtype");
            ensure!(orig.raw(k) == mine.raw(k), "{name}: {k} bytes differ");
        }
        // Unknown config fields survive.
        let text = std::fs::read_to_string(out.join("adapter_config.json"))?;
        let cfg: serde_json::Value = serde_json::from_str(&text)?;
        ensure!(cfg.get("loftq_config").is_some() && cfg["peft_version"] == "0.21.2", "{name}: config fields lost");
    }
    Ok(())
}

#[test]
fn fixture_configs_resolve_patterns_the_way_peft_does() -> Result<()> {
    let a = adapter("patterns")?;
    let rank = |m: &str| a.module(m).map(|m| m.layer().rank());
    let alpha = |m: &str| a.module(m).map(|m| m.layer().alpha());
    ensure!(rank("model.layers.0.self_attn.q_proj") == Some(4) && rank("model.layers.1.self_attn.q_proj") == Some(4));
    ensure!(rank("model.layers.1.mlp.down_proj") == Some(2) && rank("model.layers.0.mlp.down_proj") == Some(8));
    ensure!(alpha("model.layers.0.self_attn.v_proj") == Some(8.0) && alpha("model.layers.0.mlp.up_proj") == Some(32.0));
    ensure!(alpha("model.layers.1.mlp.up_proj") == Some(16.0));
    let r = adapter("rslora")?;
    ensure!(
        r.config().scaling == lora_core::Scaling::RsLora
            && r.module("model.layers.0.self_attn.q_proj").map(|m| m.layer().scale()) == Some(4.0)
    );
    let e = adapter("embed_save")?;
    ensure!(e.module("model.embed_tokens").map(|m| m.kind()) == Some(ModuleKind::Embedding));
    ensure!(e.saved_tensors().contains_key("lm_head.weight"));
    let d = adapter("dora")?;
    ensure!(d.modules().values().all(|m| m.magnitude().is_some()));
    ensure!(adapter("gpt2_fifo")?.config().fan_in_fan_out);
    Ok(())
}

/// f32: `|ours - theirs| <= atol`. f16 / bf16: within 3 units in the last place at the largest of
/// |W|, |W'| (`scale`), because PEFT merges in the half type (the delta W' - W, which can be as
/// large as |W| + |W'|, is rounded to the half type before the sum is rounded again) while
/// lora-core merges in f32 and rounds once.
fn close(ours: f32, theirs: f32, scale: f32, dtype: DType, atol: f32) -> bool {
    let d = (ours - theirs).abs();
    let mbits = match dtype {
        DType::F16 => 10,
        DType::BF16 => 7,
        _ => return d <= atol,
    };
    let ulp = 2f32.powi(ours.abs().max(theirs.abs()).max(scale).max(1e-30).log2().floor() as i32 - mbits);
    d <= 3.0 * ulp
}

/// Merge a fixture's adapter into its base with lora-core, write the model with `write_model`, and
/// compare every tensor with the model PEFT merged (`merge_and_unload`).
#[test]
fn merging_a_peft_fixture_gives_peft_merged_weights() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for name in CASES {
        let a = adapter(name)?;
        let base = ModelFolder::open(case(name).join("base"))?;
        check_adapter_against_model(&a, &base, case(name).join("adapter"))?;
        let out = tmp.path().join(name);
        write_model(&base, &out, &ModelWriteOptions::default(), |tensor| {
            if let Some(module) = tensor.strip_suffix(".weight").filter(|m| a.module(m).is_some()) {
                let core = |e| lora_io::Error::Core { at: lora_io::Location::tensor(base.dir(), tensor), source: e };
                let mut w = read_matrix::<f32, _>(&base, tensor).map_err(core)?;
                a.merge_module_into(module, &mut w).map_err(core)?;
                return Ok(Some(w.into_dyn()));
            }
            Ok(a.saved_tensors().get(tensor).cloned())
        })?;
        let ours = ModelFolder::open(&out)?;
        let peft = ModelFolder::open(case(name).join("merged"))?;
        let mut compared = 0;
        let mut case_worst = 0.0f32;
        for tensor in peft.tensor_names() {
            let dtype = peft.tensor_info(&tensor).context("info")?.dtype;
            ensure!(ours.tensor_info(&tensor).map(|i| i.dtype) == Some(dtype), "{name}: {tensor} dtype");
            let (x, y, w) = (ours.read_f32(&tensor)?, peft.read_f32(&tensor)?, base.read_f32(&tensor)?);
            ensure!(x.shape() == y.shape(), "{name}: {tensor} shape");
            let bad = x
                .iter()
                .zip(y.iter())
                .zip(w.iter())
                .filter(|((o, t), w)| !close(**o, **t, w.abs(), dtype, 1e-5))
                .count();
            let worst = x.iter().zip(y.iter()).map(|(o, t)| (o - t).abs()).fold(0.0f32, f32::max);
            ensure!(bad == 0, "{name}: {tensor}: {bad} elements off (max abs diff {worst:e})");
            case_worst = case_worst.max(worst);
            compared += 1;
        }
        println!("{name}: {compared} tensors, max |lora-core merge - PEFT merge| = {case_worst:e}");
        ensure!(compared >= 21, "{name}: only {compared} tensors compared");
    }
    Ok(())
}

#[test]
fn sharded_model_folder_keeps_its_sharding_index_and_files() -> Result<()> {
    let base = ModelFolder::open(case("plain").join("base"))?;
    ensure!(base.is_sharded() && base.shards().count() == 3, "plain/base is saved in 3 shards");
    ensure!(base.tensor_names().len() == 21);
    let single = ModelFolder::open(case("rslora").join("base"))?;
    ensure!(!single.is_sharded() && single.shards().count() == 1);

    let tmp = tempfile::tempdir()?;
    write_model(&base, tmp.path(), &ModelWriteOptions::default(), |_| Ok(None))?;
    let copy = ModelFolder::open(tmp.path())?;
    let names: Vec<&str> = base.shards().map(|(n, _)| n).collect();
    ensure!(copy.shards().map(|(n, _)| n).collect::<Vec<_>>() == names);
    for t in base.names() {
        ensure!(base.file_of(t).and_then(|f| f.raw(t)) == copy.file_of(t).and_then(|f| f.raw(t)), "{t} differs");
    }
    let index = |dir: &Path| -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json"))?)?)
    };
    let (i0, i1) = (index(base.dir())?, index(tmp.path())?);
    ensure!(i0["weight_map"] == i1["weight_map"]);
    ensure!(i1["metadata"]["total_size"] == serde_json::json!(copy.data_len()));
    for f in ["config.json", "generation_config.json"] {
        ensure!(std::fs::read(base.dir().join(f))? == std::fs::read(tmp.path().join(f))?, "{f} not copied");
    }

    // Converting to bf16 keeps the sharding and records the dtype in config.json.
    let tmp16 = tempfile::tempdir()?;
    write_model(&base, tmp16.path(), &ModelWriteOptions { dtype: Some(DType::BF16) }, |_| Ok(None))?;
    let m16 = ModelFolder::open(tmp16.path())?;
    ensure!(m16.tensor_names().iter().all(|n| m16.tensor_info(n).map(|i| i.dtype) == Some(DType::BF16)));
    let w = "model.layers.0.self_attn.q_proj.weight";
    let (x, y) = (base.read_f32(w)?, m16.read_f32(w)?);
    ensure!(x.iter().zip(y.iter()).all(|(a, b)| (a - b).abs() <= a.abs() / 128.0));
    ensure!(index(tmp16.path())?["metadata"]["total_size"] == serde_json::json!(m16.data_len()));
    ensure!(m16.config().map(|c| c["dtype"] == "bfloat16") == Some(true));
    // Writing a folder over itself is refused.
    ensure!(write_model(&base, base.dir(), &ModelWriteOptions::default(), |_| Ok(None)).is_err());
    Ok(())
}

/// A copy of a kohya file without lora-io's module-path metadata, as another tool would write it.
fn strip_module_paths(from: &Path, to: &Path) -> Result<()> {
    let f = SafetensorsFile::open(from)?;
    let mut meta: BTreeMap<String, String> = f.metadata().clone();
    meta.remove(META_MODULE_PATHS);
    let plan = f.names().map(|n| PlannedTensor::like(&f, n).expect("listed")).collect();
    let mut w = SafetensorsWriter::create(to, plan, &meta)?;
    for n in f.names() {
        w.write_raw(n, f.raw(n).expect("listed"))?;
    }
    Ok(w.finish()?)
}

#[test]
fn peft_to_kohya_to_peft_keeps_every_delta() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for name in PLAIN_LORA {
        let a = adapter(name)?;
        let kohya = tmp.path().join(format!("{name}.safetensors"));
        write_kohya(&a, &kohya, &KohyaOptions::default())?;
        ensure!(detect_format(&kohya)? == Format::Kohya);
        let f = SafetensorsFile::open(&kohya)?;
        ensure!(f.contains("lora_te_model_layers_0_self_attn_q_proj.lora_down.weight"));
        ensure!(f.metadata().get("ss_network_dim") == Some(&a.config().rank.to_string()));
        let k: Adapter<f32> = read_kohya(&kohya, &ModuleResolver::Embedded)?;
        let d = max_delta_diff(&a, &k)?;
        ensure!(d < 1e-6, "{name}: kohya delta differs by {d:e}");

        // A file without recorded paths needs the base model to map names back.
        let foreign = tmp.path().join(format!("{name}-foreign.safetensors"));
        strip_module_paths(&kohya, &foreign)?;
        let err = read_kohya::<f32>(&foreign, &ModuleResolver::Embedded).expect_err("ambiguous without a base model");
        ensure!(matches!(err, Error::Ambiguous { .. }) && err.to_string().contains("lora_down.weight"), "{err}");
        let base = ModelFolder::open(case(name).join("base"))?;
        let k2: Adapter<f32> = read_kohya(&foreign, &ModuleResolver::from_model(&base))?;
        ensure!(max_delta_diff(&a, &k2)? < 1e-6);

        let back = tmp.path().join(format!("{name}-peft"));
        write_peft(&k2, &back, &PeftWriteOptions::default())?;
        let p: Adapter<f32> = read_peft(&back)?;
        ensure!(max_delta_diff(&a, &p)? < 1e-6, "{name}: PEFT -> kohya -> PEFT changed a delta");
    }
    Ok(())
}

#[test]
fn peft_to_gguf_and_back_keeps_every_delta() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for name in PLAIN_LORA {
        let a = adapter(name)?;
        let base = ModelFolder::open(case(name).join("base"))?;
        let opts = GgufOptions::from_hf_config(base.config().context("config.json")?).map_err(anyhow::Error::msg)?;
        let path = tmp.path().join(format!("{name}.gguf"));
        write_gguf(&a, &path, &opts)?;
        ensure!(detect_format(&path)? == Format::Gguf);

        let g = GgufFile::open(&path)?;
        ensure!(g.metadata()["general.type"] == lora_io::GgufValue::String("adapter".into()));
        let qa = &g.tensors()["blk.0.attn_q.weight.lora_a"];
        let qb = &g.tensors()["blk.1.ffn_down.weight.lora_b"];
        let module = a.module("model.layers.0.self_attn.q_proj").context("q_proj")?.layer();
        ensure!(qa.dims == vec![module.d_in() as u64, module.rank() as u64], "lora_a dims {:?}", qa.dims);
        let down = a.module("model.layers.1.mlp.down_proj").context("down_proj")?.layer();
        ensure!(qb.dims == vec![down.rank() as u64, down.d_out() as u64], "lora_b dims {:?}", qb.dims);
        ensure!(g.tensors().len() == 2 * a.len());

        let back: Adapter<f32> = read_gguf(&path, None)?;
        let d = max_delta_diff(&a, &back)?;
        let tol = if name == "f16" || name == "bf16" { 1e-2 } else { 1e-6 };
        ensure!(d < tol, "{name}: GGUF delta differs by {d:e}");
        // And on to PEFT, which needs no base config any more.
        let p = tmp.path().join(format!("{name}-peft"));
        write_peft(&back, &p, &PeftWriteOptions::default())?;
        ensure!(max_delta_diff(&a, &read_adapter(&p)?)? < tol);
        let again = tmp.path().join(format!("{name}-2.gguf"));
        lora_io::write_adapter(&back, &again, Format::Gguf)?;
        ensure!(std::fs::read(&again)? == std::fs::read(&path)?, "{name}: GGUF -> GGUF is not byte-identical");
    }
    Ok(())
}

#[test]
fn formats_that_cannot_hold_a_feature_refuse_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let llama = GgufOptions { architecture: "llama".into(), head_count: 4, head_count_kv: 4, dtype: None };
    for (name, needle) in [("dora", "DoRA"), ("embed_save", "modules_to_save"), ("gpt2_fifo", "fan_in_fan_out")] {
        let a = adapter(name)?;
        let g = write_gguf(&a, tmp.path().join("x.gguf"), &llama).expect_err("gguf must refuse");
        ensure!(g.to_string().contains(needle), "{name}: {g}");
        let k =
            write_kohya(&a, tmp.path().join("x.safetensors"), &KohyaOptions::default()).expect_err("kohya must refuse");
        ensure!(k.to_string().contains(needle), "{name}: {k}");
    }
    ensure!(std::fs::read_dir(tmp.path())?.count() == 0, "a refused write left a file behind");
    Ok(())
}

#[test]
fn format_detection_reads_contents() -> Result<()> {
    ensure!(detect_format(case("plain").join("adapter"))? == Format::Peft);
    ensure!(detect_format(case("plain").join("adapter/adapter_model.safetensors"))? == Format::Peft);
    let err = detect_format(case("plain").join("base")).expect_err("a model folder is no adapter");
    ensure!(err.to_string().contains("adapter_config.json"), "{err}");
    let err = detect_format(case("rslora").join("base/model.safetensors")).expect_err("model weights");
    ensure!(matches!(err, Error::UnknownFormat { .. }), "{err}");
    Ok(())
}

#[test]
fn an_adapter_module_missing_from_the_base_model_is_named() -> Result<()> {
    let a = adapter("plain")?;
    let other = ModelFolder::open(case("gpt2_fifo").join("base"))?;
    let err = check_adapter_against_model(&a, &other, "adapter").expect_err("gpt2 has no q_proj");
    ensure!(matches!(err, Error::UnknownModule { .. }) && err.to_string().contains("model.layers.0"), "{err}");
    // Same names, other shapes: a GQA base has a smaller k_proj.
    let gqa = ModelFolder::open(case("mistral_gqa").join("base"))?;
    let err = check_adapter_against_model(&a, &gqa, "adapter").expect_err("k_proj is smaller");
    ensure!(err.to_string().contains("k_proj"), "{err}");
    Ok(())
}

#[test]
fn reading_decodes_f16_and_bf16_exactly() -> Result<()> {
    for (name, dtype) in [("f16", "F16"), ("bf16", "BF16")] {
        let f = SafetensorsFile::open(case(name).join("adapter/adapter_model.safetensors"))?;
        let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
        ensure!(f.dtype_name(key).as_deref() == Some(dtype));
        let raw = f.raw(key).context("raw")?;
        let x: ArrayD<f32> = f.tensor_f32(key)?;
        for (i, v) in x.iter().enumerate() {
            let bits = [raw[2 * i], raw[2 * i + 1]];
            let want = if dtype == "F16" {
                half::f16::from_le_bytes(bits).to_f32()
            } else {
                half::bf16::from_le_bytes(bits).to_f32()
            };
            ensure!(v.to_bits() == want.to_bits());
        }
    }
    Ok(())
}
