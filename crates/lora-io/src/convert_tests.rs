//! The streaming conversion against the decoding path: every committed PEFT fixture (and the
//! kohya and GGUF files made from it), and a synthetic adapter with rank and alpha patterns,
//! rsLoRA and F64 factors, converted to every format in every dtype both ways; the output bytes
//! must be identical, the streaming path must take every input the decoding path takes, and
//! where the decoding path fails the streaming path must step aside and leave nothing behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lora_core::{Adapter, AdapterConfig, AdapterModule, DType, Init, LoraLayer, Scaling, TargetModules};

use crate::*;

/// Every file under `path` (or the file itself), with its bytes, by relative name.
fn files(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    if path.is_file() {
        out.insert(String::new(), std::fs::read(path).unwrap());
        return out;
    }
    for e in std::fs::read_dir(path).unwrap() {
        let p = e.unwrap().path();
        for (k, v) in files(&p) {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            out.insert(if k.is_empty() { name } else { format!("{name}/{k}") }, v);
        }
    }
    out
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/peft")
}

struct Case {
    input: PathBuf,
    read: ReadOptions,
    base_config: Option<serde_json::Value>,
}

#[derive(Default)]
struct Tally {
    streamed: usize,
    refused: usize,
}

/// Convert `case` to `to` in `dtype` through the decoding path and the streaming path (into
/// `out`), and compare.
fn compare(case: &Case, to: Format, dtype: Option<DType>, out: &Path, tally: &mut Tally) {
    let write = WriteOptions { dtype, base_config: case.base_config.clone() };
    let ext = if to == Format::Peft { String::new() } else { format!(".{to}") };
    let tag = format!("{}-{to}-{dtype:?}{ext}", tally.streamed + tally.refused);
    let (decoded, streamed) = (out.join(format!("decoded-{tag}")), out.join(format!("streamed-{tag}")));
    let what = format!("{} -> {to} in {dtype:?}", case.input.display());
    let options = ConvertOptions { read: case.read.clone(), write: write.clone(), base: None };
    let by_decoding =
        read_adapter_with::<f32>(&case.input, &case.read).and_then(|a| write_adapter_with(&a, &decoded, to, &write));
    match by_decoding {
        Ok(()) => {
            let done = convert_streaming(&case.input, &streamed, to, &options).unwrap();
            assert!(done.is_some_and(|c| c.streamed && c.to == to), "{what}: not streamed");
            let (d, s) = (files(&decoded), files(&streamed));
            assert_eq!(d.keys().collect::<Vec<_>>(), s.keys().collect::<Vec<_>>(), "{what}: files differ");
            for (name, bytes) in &d {
                assert!(bytes == &s[name], "{what}: {name} differs between the decoding and the streaming path");
            }
            tally.streamed += 1;
        }
        Err(e) => {
            assert!(!decoded.exists(), "{what}: the decoding path left {}", decoded.display());
            let done = convert_streaming(&case.input, &decoded, to, &options).unwrap();
            assert!(done.is_none(), "{what}: streamed an input the decoding path refuses ({e})");
            assert!(!decoded.exists(), "{what}: the streaming path left {}", decoded.display());
            let again = convert_adapter(&case.input, &decoded, to, &options).unwrap_err();
            assert_eq!(again.to_string(), e.to_string(), "{what}: another error");
            tally.refused += 1;
        }
    }
}

fn compare_all(case: &Case, out: &Path, tally: &mut Tally) {
    for to in [Format::Peft, Format::Kohya, Format::Gguf] {
        for dtype in [None, Some(DType::F32), Some(DType::F16), Some(DType::BF16), Some(DType::F64)] {
            compare(case, to, dtype, out, tally);
        }
    }
}

#[test]
fn streaming_gives_the_bytes_of_the_decoding_path_for_every_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let mut tally = Tally::default();
    let mut cases: Vec<_> = std::fs::read_dir(fixtures()).unwrap().map(|e| e.unwrap().path()).collect();
    cases.retain(|p| p.join("adapter").is_dir());
    cases.sort();
    assert!(cases.len() >= 10, "fixtures missing: {cases:?}");
    for case in cases {
        let base = ModelFolder::open(case.join("base")).unwrap();
        let read = ReadOptions {
            modules: Some(base.names().filter_map(|n| n.strip_suffix(".weight")).map(str::to_string).collect()),
            base_config: base.config().cloned(),
        };
        let out = dir.path().join(case.file_name().unwrap());
        std::fs::create_dir_all(&out).unwrap();
        let peft = Case { input: case.join("adapter"), read: read.clone(), base_config: base.config().cloned() };
        compare_all(&peft, &out, &mut tally);
        // kohya and GGUF inputs made from the fixture, where those formats can hold it
        let adapter: Adapter<f32> = read_peft(case.join("adapter")).unwrap();
        for (to, name) in [(Format::Kohya, "in.safetensors"), (Format::Gguf, "in.gguf")] {
            let write = WriteOptions { dtype: None, base_config: base.config().cloned() };
            if write_adapter_with(&adapter, out.join(name), to, &write).is_ok() {
                let case = Case { input: out.join(name), read: read.clone(), base_config: base.config().cloned() };
                compare_all(&case, &out, &mut tally);
            }
        }
    }
    // every fixture streams to PEFT at least; DoRA, embeddings and GPT-2 are refused by kohya / GGUF
    assert!(tally.streamed >= 150 && tally.refused > 0, "{} streamed, {} refused", tally.streamed, tally.refused);
}

/// rank and alpha patterns, rsLoRA (so GGUF scales lora_b), q and k (permuted by GGUF); in f64
/// its values are not all f32 values, so an F64 file of it is rounded by the decoding path.
fn synthetic<T: lora_core::Scalar>() -> Adapter<T> {
    let mut config = AdapterConfig::new(8, 16.0, TargetModules::List(vec!["q_proj".into(), "k_proj".into()]));
    config.scaling = Scaling::RsLora;
    let mut a = Adapter::new(config);
    for (i, (module, d_out, rank, alpha)) in [
        ("model.layers.0.self_attn.q_proj", 64, 8, 16.0),
        ("model.layers.0.self_attn.k_proj", 32, 8, 16.0),
        ("model.layers.1.self_attn.q_proj", 64, 4, 6.0),
        ("model.layers.1.mlp.up_proj", 96, 8, 16.0),
    ]
    .into_iter()
    .enumerate()
    {
        let layer =
            LoraLayer::<T>::init(64, d_out, rank, alpha, Scaling::RsLora, Init::Random { b_std: 0.3 }, i as u64)
                .unwrap();
        a.insert(module, AdapterModule::linear(layer)).unwrap();
    }
    a
}

#[test]
fn streaming_gives_the_bytes_of_the_decoding_path_for_patterns_rslora_and_every_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2});
    let mut tally = Tally::default();
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
        let peft = dir.path().join(format!("in-{dtype:?}"));
        let wide = dtype == DType::F64;
        let options = PeftWriteOptions { dtype: Some(dtype) };
        if wide {
            write_peft(&synthetic::<f64>(), &peft, &options)
        } else {
            write_peft(&synthetic::<f32>(), &peft, &options)
        }
        .unwrap();
        let case = Case { input: peft, read: ReadOptions::default(), base_config: Some(config.clone()) };
        compare_all(&case, dir.path(), &mut tally);
        let kohya = dir.path().join(format!("in-{dtype:?}.safetensors"));
        let options = KohyaOptions { dtype: Some(dtype), ..KohyaOptions::default() };
        if wide {
            write_kohya(&synthetic::<f64>(), &kohya, &options)
        } else {
            write_kohya(&synthetic::<f32>(), &kohya, &options)
        }
        .unwrap();
        compare_all(
            &Case { input: kohya, read: ReadOptions::default(), base_config: Some(config.clone()) },
            dir.path(),
            &mut tally,
        );
        let gguf = dir.path().join(format!("in-{dtype:?}.gguf"));
        let opts = GgufOptions { architecture: "llama".into(), head_count: 4, head_count_kv: 2, dtype: Some(dtype) };
        write_gguf(&synthetic::<f32>(), &gguf, &opts).unwrap();
        // without a base config: the GGUF output takes its options from the file read
        compare_all(&Case { input: gguf, read: ReadOptions::default(), base_config: None }, dir.path(), &mut tally);
    }
    assert_eq!(tally.refused, 0, "every conversion of this adapter is possible");
}

#[test]
fn a_nan_found_while_streaming_leaves_nothing_and_gives_the_readers_error() {
    let dir = tempfile::tempdir().unwrap();
    let peft = dir.path().join("nan");
    write_peft(&synthetic::<f32>(), &peft, &PeftWriteOptions { dtype: Some(DType::F32) }).unwrap();
    // a NaN in the last lora_B: the first modules are streamed before it is found
    let weights = peft.join(WEIGHTS_FILE);
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&weights, bytes).unwrap();
    let case = Case { input: peft, read: ReadOptions::default(), base_config: None };
    let mut tally = Tally::default();
    for to in [Format::Peft, Format::Kohya] {
        compare(&case, to, None, dir.path(), &mut tally);
    }
    assert_eq!(tally.refused, 2);
    let err =
        convert_adapter(&case.input, dir.path().join("out"), Format::Peft, &ConvertOptions::default()).unwrap_err();
    assert!(err.to_string().contains("model.layers.1.mlp.up_proj.lora_B.weight"), "{err}");
    assert!(!dir.path().join("out").exists());
}

#[test]
fn a_base_model_that_does_not_fit_gives_the_check_error() {
    let case = fixtures().join("plain");
    let base = ModelFolder::open(case.join("base")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = ConvertOptions { base: Some(&base), ..ConvertOptions::default() };
    let done = convert_adapter(case.join("adapter"), dir.path().join("a"), Format::Peft, &options).unwrap();
    assert!(done.streamed && done.from == Format::Peft && done.modules > 0);
    // another fixture's base has other shapes
    let other = ModelFolder::open(fixtures().join("gpt2_fifo/base")).unwrap();
    let options = ConvertOptions { base: Some(&other), ..ConvertOptions::default() };
    assert_eq!(convert_streaming(case.join("adapter"), dir.path().join("b"), Format::Peft, &options).unwrap(), None);
    let err = convert_adapter(case.join("adapter"), dir.path().join("b"), Format::Peft, &options).unwrap_err();
    let adapter: Adapter<f32> = read_peft(case.join("adapter")).unwrap();
    let expected = check_adapter_against_model(&adapter, &other, case.join("adapter")).unwrap_err();
    assert_eq!(err.to_string(), expected.to_string());
    assert!(!dir.path().join("b").exists());
}
