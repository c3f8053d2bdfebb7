//! Unit tests of lora-io: the hostile-input table (every case gives an error naming the file and
//! the tensor, none panics), atomic writes, dtype conversions, and proptest round trips of random
//! adapters through every format.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lora_core::{
    deltas, Adapter, AdapterConfig, AdapterModule, DType, DoraLayer, Init, LoraLayer, Scaling, TargetModules,
    TensorSource,
};
use ndarray::{Array1, ArrayD, IxDyn};
use proptest::prelude::*;

use crate::*;

fn st_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("temp dir is writable");
    p
}

/// The error must name the file and, when given, the tensor.
fn assert_names(err: &Error, file: &Path, tensor: Option<&str>) {
    let msg = err.to_string();
    let fname = file.file_name().expect("file name").to_string_lossy();
    assert!(msg.contains(fname.as_ref()), "{msg:?} does not name the file {fname}");
    if let Some(t) = tensor {
        assert!(msg.contains(t), "{msg:?} does not name the tensor {t}");
    }
    assert_eq!(msg, msg.trim_end_matches('.'), "messages end without a period");
}

fn valid_st() -> Vec<u8> {
    let data: Vec<u8> = (0..4).flat_map(|i| (i as f32).to_le_bytes()).collect();
    st_bytes(r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#, &data)
}

#[test]
fn hostile_safetensors_inputs_give_errors_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f32s = |n: usize| vec![0u8; 4 * n];
    let mut too_large = 200_000_000u64.to_le_bytes().to_vec();
    too_large.extend_from_slice(b"{}");
    let mut past_end = 1000u64.to_le_bytes().to_vec();
    past_end.extend_from_slice(br#"{"w":{}}"#);
    let valid = valid_st();
    let cases: Vec<(&str, Vec<u8>, Option<&str>, &str)> = vec![
        ("empty.safetensors", vec![], None, "fewer than the 8-byte"),
        ("short.safetensors", vec![1, 2, 3], None, "fewer than the 8-byte"),
        ("truncated_data.safetensors", valid[..valid.len() - 3].to_vec(), Some("w"), "past the end"),
        ("truncated_header.safetensors", valid[..20].to_vec(), None, "runs past the end of the file"),
        ("header_past_end.safetensors", past_end, None, "runs past the end of the file"),
        ("header_too_large.safetensors", too_large, None, "100000000-byte limit"),
        (
            "overlap.safetensors",
            st_bytes(
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
                &f32s(6),
            ),
            Some("b"),
            "overlap",
        ),
        (
            "out_of_range.safetensors",
            st_bytes(r#"{"w":{"dtype":"F32","shape":[250],"data_offsets":[0,1000]}}"#, &f32s(4)),
            Some("w"),
            "past the end",
        ),
        (
            "byte_count.safetensors",
            st_bytes(r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}"#, &f32s(3)),
            Some("w"),
            "disagrees with shape [2, 2] and dtype F32",
        ),
        (
            "overflow.safetensors",
            st_bytes(r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}}"#, &f32s(4)),
            Some("w"),
            "overflow",
        ),
        ("bad_json.safetensors", st_bytes(r#"{"w":{"dtype":"F32",,}"#, &[]), None, "json"),
        ("not_utf8.safetensors", [&1u64.to_le_bytes()[..], &[0xff]].concat(), None, "utf-8"),
        (
            "unknown_dtype.safetensors",
            st_bytes(r#"{"w":{"dtype":"Q4","shape":[4],"data_offsets":[0,2]}}"#, &[0, 0]),
            None,
            "json",
        ),
    ];
    for (name, bytes, tensor, needle) in cases {
        let p = write(d, name, &bytes);
        let err = SafetensorsFile::open(&p).expect_err(name);
        assert_names(&err, &p, tensor);
        assert!(err.to_string().contains(needle), "{name}: {err}");
    }
}

#[test]
fn undecodable_dtypes_are_listed_but_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = st_bytes(r#"{"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}"#, &[0u8; 16]);
    let p = write(dir.path(), "ints.safetensors", &bytes);
    let f = SafetensorsFile::open(&p).unwrap();
    assert_eq!(f.names().collect::<Vec<_>>(), ["ids"]);
    assert!(f.tensor_names().is_empty(), "a TensorSource lists float tensors only");
    let err = f.tensor_f32("ids").unwrap_err();
    assert!(matches!(err, Error::UnsupportedDType { .. }));
    assert_names(&err, &p, Some("ids"));
    assert!(err.to_string().contains("I64"));
    let err = f.tensor_f32("nope").unwrap_err();
    assert_names(&err, &p, Some("nope"));
}

/// A PEFT folder with the given config and tensors (f32).
fn peft_dir(root: &Path, name: &str, config: &str, tensors: &[(&str, &[usize], f32)]) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    let ts: Vec<(String, ArrayD<f32>)> =
        tensors.iter().map(|(n, s, v)| (n.to_string(), ArrayD::from_elem(IxDyn(s), *v))).collect();
    write_safetensors(dir.join("adapter_model.safetensors"), &ts, DType::F32, &BTreeMap::new()).unwrap();
    dir
}

const CFG: &str = r#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q_proj"]}"#;
const A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

#[test]
fn hostile_peft_inputs_give_errors_naming_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let st = |d: &Path| d.join("adapter_model.safetensors");
    let cfg = |d: &Path| d.join("adapter_config.json");

    let d = peft_dir(root, "bad_json", "{ not json", &[(A, &[2, 4], 0.1), (B, &[4, 2], 0.1)]);
    let e = read_peft::<f32>(&d).unwrap_err();
    assert!(matches!(e, Error::Json { .. }));
    assert_names(&e, &cfg(&d), None);

    let d = peft_dir(root, "a_without_b", CFG, &[(A, &[2, 4], 0.1)]);
    let e = read_peft::<f32>(&d).unwrap_err();
    assert!(matches!(e, Error::MissingPair { .. }) && e.to_string().contains("lora_B"));
    assert_names(&e, &st(&d), Some(A));

    let d = peft_dir(root, "b_without_a", CFG, &[(B, &[4, 2], 0.1)]);
    assert_names(&read_peft::<f32>(&d).unwrap_err(), &st(&d), Some(B));

    let d = peft_dir(root, "ab_ranks", CFG, &[(A, &[2, 4], 0.1), (B, &[4, 3], 0.1)]);
    let e = read_peft::<f32>(&d).unwrap_err();
    assert!(matches!(e, Error::RankMismatch { got: 3, expected: 2, .. }), "{e}");
    assert_names(&e, &st(&d), Some(B));

    let d = peft_dir(root, "config_rank", CFG, &[(A, &[3, 4], 0.1), (B, &[4, 3], 0.1)]);
    let e = read_peft::<f32>(&d).unwrap_err();
    assert!(
        matches!(e, Error::RankMismatch { got: 3, expected: 2, .. }) && e.to_string().contains("adapter_config.json"),
        "{e}"
    );
    assert_names(&e, &st(&d), Some(A));

    let pattern =
        r#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q_proj"],"rank_pattern":{"q_proj":3}}"#;
    let d = peft_dir(root, "pattern_rank", pattern, &[(A, &[2, 4], 0.1), (B, &[4, 2], 0.1)]);
    let e = read_peft::<f32>(&d).unwrap_err();
    assert!(e.to_string().contains("rank_pattern"), "{e}");

    let bad_re =
        r#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q_proj"],"alpha_pattern":{"q_proj(":3}}"#;
    let d = peft_dir(root, "bad_regex", bad_re, &[(A, &[2, 4], 0.1), (B, &[4, 2], 0.1)]);
    let e = read_peft::<f32>(&d).unwrap_err();
    assert!(matches!(e, Error::Config { .. }) && e.to_string().contains("alpha_pattern"), "{e}");
    assert_names(&e, &cfg(&d), None);

    let d = peft_dir(
        root,
        "unknown_key",
        CFG,
        &[(A, &[2, 4], 0.1), (B, &[4, 2], 0.1), ("base_model.model.x.weight", &[2], 0.0)],
    );
    let e = read_peft::<f32>(&d).unwrap_err();
    assert!(matches!(e, Error::UnknownTensor { .. }));
    assert_names(&e, &st(&d), Some("base_model.model.x.weight"));

    let bias = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias";
    let d = peft_dir(root, "lora_bias", CFG, &[(A, &[2, 4], 0.1), (B, &[4, 2], 0.1), (bias, &[4], 0.0)]);
    let e = read_peft::<f32>(&d).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }) && e.to_string().contains("lora_bias"), "{e}");
    assert_names(&e, &st(&d), Some(bias));

    // the same factor with and without PEFT's adapter name ("default")
    let named = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight";
    let d = peft_dir(root, "twice", CFG, &[(A, &[2, 4], 0.1), (B, &[4, 2], 0.1), (named, &[2, 4], 0.1)]);
    let e = read_peft::<f32>(&d).unwrap_err();
    assert!(matches!(e, Error::Config { .. }) && e.to_string().contains("twice"), "{e}");
    assert_names(&e, &st(&d), Some(named));

    let d = peft_dir(root, "nan", CFG, &[(A, &[2, 4], f32::NAN), (B, &[4, 2], 0.1)]);
    let e = read_peft::<f32>(&d).unwrap_err();
    assert!(e.to_string().contains("non-finite"), "{e}");
    assert_names(&e, &st(&d), Some(A));

    let mag = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector";
    let d = peft_dir(root, "magnitude_no_dora", CFG, &[(A, &[2, 4], 0.1), (B, &[4, 2], 0.1), (mag, &[4], 1.0)]);
    assert_names(&read_peft::<f32>(&d).unwrap_err(), &st(&d), Some(mag));

    let d = peft_dir(root, "not_lora", &CFG.replace("LORA", "IA3"), &[(A, &[2, 4], 0.1), (B, &[4, 2], 0.1)]);
    assert!(read_peft::<f32>(&d).unwrap_err().to_string().contains("IA3"));

    let d = root.join("legacy");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("adapter_config.json"), CFG).unwrap();
    std::fs::write(d.join("adapter_model.bin"), b"\x80\x02pickle").unwrap();
    let e = read_adapter(&d).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }) && e.to_string().contains("adapter_model.safetensors"), "{e}");
    assert_names(&e, &d.join("adapter_model.bin"), None);

    let d = root.join("missing");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("adapter_config.json"), CFG).unwrap();
    assert_names(&read_peft::<f32>(&d).unwrap_err(), &st(&d), None);
}

#[test]
fn hostile_kohya_inputs_give_errors_naming_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let mk = |name: &str, tensors: &[(&str, &[usize])]| {
        let ts: Vec<(String, ArrayD<f32>)> =
            tensors.iter().map(|(n, s)| (n.to_string(), ArrayD::from_elem(IxDyn(s), 0.5))).collect();
        let p = tmp.path().join(name);
        write_safetensors(&p, &ts, DType::F32, &BTreeMap::new()).unwrap();
        p
    };
    let down = "lora_te_a_b_c.lora_down.weight";
    let modules = ModuleResolver::Modules(vec!["a.b_c".into(), "a_b.c".into()]);
    let p = mk("down_only.safetensors", &[(down, &[2, 4])]);
    let e = read_kohya::<f32>(&p, &modules).unwrap_err();
    assert!(matches!(e, Error::MissingPair { .. }));
    assert_names(&e, &p, Some(down));

    let p = mk("ambiguous.safetensors", &[(down, &[2, 4]), ("lora_te_a_b_c.lora_up.weight", &[4, 2])]);
    let e = read_kohya::<f32>(&p, &modules).unwrap_err();
    assert!(
        matches!(e, Error::Ambiguous { .. }) && e.to_string().contains("a.b_c") && e.to_string().contains("a_b.c"),
        "{e}"
    );
    assert_names(&e, &p, Some(down));
    let e = read_kohya::<f32>(&p, &ModuleResolver::Modules(vec!["x.y".into()])).unwrap_err();
    assert!(e.to_string().contains("matches no module path"), "{e}");
    assert_names(&e, &p, Some(down));
    let one = read_kohya::<f32>(&p, &ModuleResolver::Modules(vec!["a.b_c".into()])).unwrap();
    assert_eq!(one.module("a.b_c").map(|m| m.layer().alpha()), Some(2.0), "missing alpha means alpha = r");

    let p = mk(
        "alpha_vector.safetensors",
        &[
            ("lora_te_x_y.lora_down.weight", &[2, 4]),
            ("lora_te_x_y.lora_up.weight", &[4, 2]),
            ("lora_te_x_y.alpha", &[3]),
        ],
    );
    let e = read_kohya::<f32>(&p, &ModuleResolver::Modules(vec!["x.y".into()])).unwrap_err();
    assert_names(&e, &p, Some("lora_te_x_y.alpha"));

    let p = mk("lycoris.safetensors", &[("lora_te_x_y.hada_w1_a", &[2, 4])]);
    assert_names(&read_kohya::<f32>(&p, &ModuleResolver::Embedded).unwrap_err(), &p, Some("hada_w1_a"));
}

fn gguf_file(dir: &Path) -> PathBuf {
    let adapter = random_adapter(&[("model.layers.0.self_attn.q_proj", 8, 8, 2)], 2.0, Scaling::Standard, 3);
    let p = dir.join("ok.gguf");
    let opts = GgufOptions { architecture: "llama".into(), head_count: 2, head_count_kv: 2, dtype: None };
    write_gguf(&adapter, &p, &opts).unwrap();
    p
}

#[test]
fn hostile_gguf_inputs_give_errors_naming_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let ok = std::fs::read(gguf_file(tmp.path())).unwrap();
    let header_end = ok.len() - 2 * 4 * 16; // two 8x2 f32 tensors
    for cut in [0, 3, 10, 30, 100, header_end - 5, ok.len() - 1] {
        let p = write(tmp.path(), &format!("cut{cut}.gguf"), &ok[..cut]);
        let e = read_gguf::<f32>(&p, None).expect_err("truncated");
        assert_names(&e, &p, None);
    }
    // A tensor count the file cannot hold.
    let mut many = ok.clone();
    many[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let p = write(tmp.path(), "many.gguf", &many);
    assert!(read_gguf::<f32>(&p, None).unwrap_err().to_string().contains("cannot fit"));
    // A data offset past the end names the tensor.
    let g = GgufFile::open(gguf_file(tmp.path())).unwrap();
    let name = g.tensors().keys().last().unwrap().clone();
    let pos = find(&ok, name.as_bytes()).unwrap() + name.len() + 4 + 16 + 4;
    let mut far = ok.clone();
    far[pos..pos + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let p = write(tmp.path(), "far.gguf", &far);
    assert_names(&read_gguf::<f32>(&p, None).unwrap_err(), &p, Some(&name));
    // Not an adapter.
    let mut model = ok.clone();
    let pos = find(&model, b"adapter").unwrap();
    model[pos..pos + 7].copy_from_slice(b"xdapter");
    let p = write(tmp.path(), "model.gguf", &model);
    assert!(read_gguf::<f32>(&p, None).unwrap_err().to_string().contains("not a GGUF LoRA adapter"));
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn a_failed_or_abandoned_write_leaves_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("out.safetensors");
    let plan = vec![PlannedTensor::new("a", &[2], DType::F32), PlannedTensor::new("b", &[2], DType::F32)];
    let mut w = SafetensorsWriter::create(&p, plan.clone(), &BTreeMap::new()).unwrap();
    w.write("a", &Array1::<f32>::zeros(2)).unwrap();
    assert!(w.write("a", &Array1::<f32>::zeros(2)).is_err(), "out of order");
    let e = w.finish().unwrap_err();
    assert_names(&e, &p, Some("b"));
    let mut w = SafetensorsWriter::create(&p, plan, &BTreeMap::new()).unwrap();
    assert!(w.write("a", &Array1::<f32>::zeros(3)).is_err(), "wrong shape");
    drop(w);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "nothing left behind");

    // An existing file is replaced only by a complete one.
    std::fs::write(&p, b"old").unwrap();
    let w = SafetensorsWriter::create(&p, vec![PlannedTensor::new("a", &[1], DType::F32)], &BTreeMap::new()).unwrap();
    drop(w);
    assert_eq!(std::fs::read(&p).unwrap(), b"old");
}

#[test]
fn metadata_and_every_dtype_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let values = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0f32, -0.5, 3.25e-3, 65504.0, 1e-8, -7.0]).unwrap();
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
        let p = tmp.path().join(format!("{dtype:?}.safetensors"));
        write_safetensors(&p, &[("t".into(), values.clone())], dtype, &meta).unwrap();
        let f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.metadata(), &meta);
        assert_eq!(f.dtype("t"), Some(dtype));
        assert_eq!(f.tensor_info("t").unwrap().shape, vec![2, 3]);
        let back = f.tensor_f32("t").unwrap();
        for (v, b) in values.iter().zip(back.iter()) {
            let want = match dtype {
                DType::F16 => half::f16::from_f32(*v).to_f32(),
                DType::BF16 => half::bf16::from_f32(*v).to_f32(),
                _ => *v,
            };
            assert_eq!(b.to_bits(), want.to_bits(), "{dtype:?}");
        }
        // The stored bytes decode to the same values, in f32 and in f64, from any offset.
        let stored = f.stored("t").expect("a mapped file holds its bytes");
        assert_eq!((stored.dtype, stored.len()), (dtype, 6));
        let (mut narrow, mut wide) = ([0f32; 4], [0f64; 4]);
        stored.decode_into(2, &mut narrow);
        stored.decode_into(2, &mut wide);
        let back64 = f.tensor_f64("t").unwrap();
        assert_eq!(narrow.map(f32::to_bits)[..], back.iter().skip(2).map(|v| v.to_bits()).collect::<Vec<_>>()[..]);
        assert_eq!(wide.map(f64::to_bits)[..], back64.iter().skip(2).map(|v| v.to_bits()).collect::<Vec<_>>()[..]);
        // The crate's own parser agrees.
        let bytes = std::fs::read(&p).unwrap();
        assert!(safetensors::SafeTensors::deserialize(&bytes).is_ok());
    }
    let p = tmp.path().join("f64.safetensors");
    let precise = ArrayD::from_elem(IxDyn(&[1]), 0.1f64);
    write_safetensors(&p, &[("t".into(), precise.clone())], DType::F64, &BTreeMap::new()).unwrap();
    assert_eq!(SafetensorsFile::open(&p).unwrap().tensor_f64("t").unwrap(), precise, "f64 is read without loss");
}

fn random_adapter(modules: &[(&str, usize, usize, usize)], alpha: f64, scaling: Scaling, seed: u64) -> Adapter<f32> {
    let rank = modules.first().map_or(1, |m| m.3);
    let mut a = Adapter::new(AdapterConfig { scaling, ..AdapterConfig::new(rank, alpha, TargetModules::List(vec![])) });
    let names: Vec<String> = modules.iter().map(|m| m.0.to_string()).collect();
    let mut config = a.config().clone();
    config.target_modules = TargetModules::List(names);
    a = Adapter::new(config);
    for (i, (name, d_in, d_out, r)) in modules.iter().enumerate() {
        let layer =
            LoraLayer::init(*d_in, *d_out, *r, alpha + i as f64, scaling, Init::Random { b_std: 0.3 }, seed + i as u64)
                .unwrap();
        a.insert(*name, AdapterModule::linear(layer)).unwrap();
    }
    a
}

const LLAMA_MODULES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

fn max_rel_delta_diff(a: &Adapter<f32>, b: &Adapter<f32>) -> f32 {
    let (da, db) = (deltas(a), deltas(b));
    assert_eq!(da.len(), db.len());
    da.iter()
        .map(|(n, d)| {
            let e = &db[n];
            let scale = d.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
            d.iter().zip(e.iter()).fold(0.0f32, |m, (x, y)| m.max((x - y).abs() / scale))
        })
        .fold(0.0, f32::max)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random adapters (ranks and alphas per module, both scalings) through PEFT, kohya and GGUF.
    #[test]
    fn random_adapters_round_trip_through_every_format(
        specs in proptest::collection::vec((0usize..7, 0usize..3, 1usize..5, 1usize..4), 1..6),
        alpha in 0.5f64..64.0,
        rs in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let scaling = if rs { Scaling::RsLora } else { Scaling::Standard };
        let mut seen = std::collections::BTreeSet::new();
        let mut modules = Vec::new();
        for (kind, layer, in_q, out_q) in specs {
            let name = format!("model.layers.{layer}.{}", LLAMA_MODULES[kind]);
            if seen.insert(name.clone()) {
                // q/k rows must split into 2 x heads for llama.cpp's rotary permutation.
                modules.push((name, 4 * in_q, 4 * out_q, 1 + (seed as usize + kind) % 4));
            }
        }
        let specs: Vec<(&str, usize, usize, usize)> = modules.iter().map(|(n, i, o, r)| (n.as_str(), *i, *o, *r)).collect();
        let adapter = random_adapter(&specs, alpha, scaling, seed);
        let tmp = tempfile::tempdir().unwrap();

        let peft = tmp.path().join("peft");
        write_adapter(&adapter, &peft, Format::Peft).unwrap();
        let back = read_adapter(&peft).unwrap();
        prop_assert_eq!(back.modules(), adapter.modules());

        let kohya = tmp.path().join("k.safetensors");
        write_adapter(&adapter, &kohya, Format::Kohya).unwrap();
        prop_assert!(max_rel_delta_diff(&adapter, &read_adapter(&kohya).unwrap()) < 1e-5);

        let gguf = tmp.path().join("a.gguf");
        let opts = WriteOptions { dtype: None, base_config: Some(serde_json::json!({"model_type": "llama", "num_attention_heads": 2})) };
        write_adapter_with(&adapter, &gguf, Format::Gguf, &opts).unwrap();
        let g = read_adapter(&gguf).unwrap();
        prop_assert!(max_rel_delta_diff(&adapter, &g) < 1e-5);
        // Through PEFT again from GGUF: the rewritten config (patterns, targets) keeps every delta.
        let peft2 = tmp.path().join("peft2");
        write_adapter(&g, &peft2, Format::Peft).unwrap();
        prop_assert!(max_rel_delta_diff(&adapter, &read_adapter(&peft2).unwrap()) < 1e-5);
    }

    /// Arbitrary corruption of a valid file never panics: every outcome is Ok or an Err.
    #[test]
    fn corrupted_files_never_panic(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), cut in any::<prop::sample::Index>()) {
        let tmp = tempfile::tempdir().unwrap();
        let st = valid_st();
        let gg = std::fs::read(gguf_file(tmp.path())).unwrap();
        for (name, mut bytes) in [("x.safetensors", st), ("x.gguf", gg)] {
            for (i, b) in &flips {
                let i = i.index(bytes.len());
                bytes[i] ^= b;
            }
            let n = cut.index(bytes.len() + 1);
            bytes.truncate(n.max(bytes.len() / 2));
            let p = write(tmp.path(), name, &bytes);
            if name.ends_with("gguf") {
                if let Ok(g) = GgufFile::open(&p) {
                    for t in g.tensors().keys() {
                        let _ = g.tensor_f32(t);
                    }
                }
                let _ = read_gguf::<f32>(&p, None);
            } else if let Ok(f) = SafetensorsFile::open(&p) {
                for t in f.names().map(str::to_string).collect::<Vec<_>>() {
                    let _ = f.tensor_f64(&t);
                }
            }
        }
    }
}

#[test]
fn dora_and_f64_adapters_round_trip_through_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = AdapterConfig::new(2, 4.0, TargetModules::List(vec!["q_proj".into()]));
    config.use_dora = true;
    let mut a = Adapter::<f64>::new(config);
    let layer = LoraLayer::init(6, 4, 2, 4.0, Scaling::Standard, Init::Random { b_std: 0.1 }, 9).unwrap();
    let dora = DoraLayer::new(layer, Array1::from_vec(vec![1.0, 0.5, 2.0, 0.25])).unwrap();
    a.insert("model.layers.0.self_attn.q_proj", AdapterModule::dora(dora)).unwrap();
    write_peft(&a, tmp.path().join("p"), &PeftWriteOptions { dtype: Some(DType::F64) }).unwrap();
    let b: Adapter<f64> = read_peft(tmp.path().join("p")).unwrap();
    assert_eq!(a.modules(), b.modules());
    assert!(write_gguf(
        &a,
        tmp.path().join("x.gguf"),
        &GgufOptions::from_hf_config(&serde_json::json!({"model_type":"llama","num_attention_heads":2})).unwrap()
    )
    .is_err());
}

#[test]
fn encode_refuses_finite_values_the_dtype_cannot_hold() {
    use crate::st::{encode, Encode};
    use safetensors::Dtype;
    let mut buf = Vec::new();
    // f16: 65504 is the largest; 65519 rounds down to it, 65520 rounds up to an infinity
    assert_eq!(encode(Dtype::F16, &[65504.0f32, -65519.0, 1.0], &mut buf), Ok(()));
    assert_eq!(
        encode(Dtype::F16, &[1.0f32, 2.0, -65520.0], &mut buf),
        Err(Encode::Overflow { position: 2, value: -65520.0 })
    );
    // values that are already NaN or infinite are stored as they are
    assert_eq!(encode(Dtype::F16, &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY], &mut buf), Ok(()));
    assert_eq!(encode(Dtype::F16, &[1.0e5f64], &mut buf), Err(Encode::Overflow { position: 0, value: 1.0e5 }));
    // bf16 holds less than f32::MAX; f32 holds less than 1e39
    assert_eq!(
        encode(Dtype::BF16, &[f32::MAX], &mut buf),
        Err(Encode::Overflow { position: 0, value: f64::from(f32::MAX) })
    );
    assert_eq!(encode(Dtype::BF16, &[3.0e38f32], &mut buf), Ok(()));
    assert_eq!(encode(Dtype::F32, &[0.5f64, 1.0e39], &mut buf), Err(Encode::Overflow { position: 1, value: 1.0e39 }));
    assert_eq!(encode(Dtype::F32, &[f32::MAX], &mut buf), Ok(()));
    assert_eq!(encode(Dtype::I32, &[1.0f32], &mut buf), Err(Encode::Unsupported));

    // through the writers: an error naming the file, the tensor and the index; no file left
    let dir = tempfile::tempdir().unwrap();
    let mut t = ArrayD::<f32>::zeros(IxDyn(&[3, 4]));
    t[[2, 1]] = 7.0e4;
    let path = dir.path().join("big.safetensors");
    let err = write_safetensors(&path, &[("w".to_string(), t.clone())], DType::F16, &BTreeMap::new()).unwrap_err();
    assert!(matches!(&err, Error::Overflow { index, .. } if index == &vec![2, 1]), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "{}, tensor w: value 70000 at index [2, 1] is too large for F16 (it would be stored as an infinity); \
             store it in a wider dtype",
            path.display()
        )
    );
    write_safetensors(&path, &[("w".to_string(), t)], DType::BF16, &BTreeMap::new()).unwrap();
    let mut adapter = random_adapter(&[("model.layers.0.self_attn.q_proj", 8, 8, 2)], 2.0, Scaling::Standard, 1);
    let layer = adapter.module("model.layers.0.self_attn.q_proj").unwrap().layer().clone();
    let mut a = layer.a().clone();
    a[[1, 3]] = 1.0e6;
    let big = LoraLayer::new(a, layer.b().clone(), layer.alpha(), layer.scaling()).unwrap();
    adapter.insert("model.layers.0.self_attn.q_proj", AdapterModule::linear(big)).unwrap();
    let gguf = dir.path().join("a.gguf");
    let options =
        GgufOptions { architecture: "llama".into(), head_count: 2, head_count_kv: 2, dtype: Some(DType::F16) };
    let err = write_gguf(&adapter, &gguf, &options).unwrap_err();
    assert!(matches!(err, Error::Overflow { .. }), "{err}");
    assert!(err.to_string().contains("blk.0.attn_q.weight.lora_a"), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("big.safetensors")]);
}

/// Every NaN and infinity is found, at its own position and whichever piece of the scan holds
/// it, and no finite value is taken for one: the largest finite values (the exponent one short
/// of all ones), subnormals, negative zero.
#[test]
fn the_nonfinite_scan_finds_every_nan_and_infinity_and_nothing_else() {
    fn bytes(dtype: DType, values: &[f64]) -> Vec<u8> {
        values
            .iter()
            .flat_map(|&v| match dtype {
                DType::F32 => (v as f32).to_le_bytes().to_vec(),
                DType::F16 => half::f16::from_f64(v).to_le_bytes().to_vec(),
                DType::BF16 => half::bf16::from_f64(v).to_le_bytes().to_vec(),
                DType::F64 => v.to_le_bytes().to_vec(),
            })
            .collect()
    }
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
        let (largest, tiny) = match dtype {
            DType::F32 => (f64::from(f32::MAX), f64::from(f32::from_bits(1))),
            DType::F16 => (f64::from(half::f16::MAX), f64::from(half::f16::from_bits(1))),
            DType::BF16 => (f64::from(half::bf16::MAX), f64::from(half::bf16::from_bits(1))),
            DType::F64 => (f64::MAX, f64::from_bits(1)),
        };
        // several 1 MiB pieces, with a partial one at the end
        let n = (5 << 20) / dtype.size() / 2 + 3;
        let finite: Vec<f64> = (0..n).map(|i| [largest, -largest, tiny, -0.0, 1.5][i % 5]).collect();
        assert_eq!(first_nonfinite_raw(dtype, &bytes(dtype, &finite)), None, "{dtype:?}");
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            for at in [0, 1, 17, (1 << 20) / dtype.size() - 1, (1 << 20) / dtype.size(), n / 2, n - 1] {
                let mut values = finite.clone();
                values[at] = bad;
                let found = first_nonfinite_raw(dtype, &bytes(dtype, &values));
                let (i, v) = found.unwrap_or_else(|| panic!("{dtype:?}: {bad} at {at} not found"));
                assert_eq!(i, at, "{dtype:?}: {bad}");
                assert!(v.is_nan() == bad.is_nan() && (bad.is_nan() || v == bad), "{dtype:?}: {v} for {bad}");
            }
        }
        // a NaN with a payload, and a signalling one, in the stored bits directly
        let payloads: Vec<u64> = match dtype {
            DType::F32 => vec![0x7f80_0001, 0xffc0_1234],
            DType::F16 => vec![0x7c01, 0xfe00],
            DType::BF16 => vec![0x7f81, 0xffc0],
            DType::F64 => vec![0x7ff0_0000_0000_0001, 0xfff8_0000_0000_1234],
        };
        for bits in payloads {
            let mut raw = bytes(dtype, &finite);
            let at = n - 2;
            raw[at * dtype.size()..(at + 1) * dtype.size()].copy_from_slice(&bits.to_le_bytes()[..dtype.size()]);
            assert_eq!(first_nonfinite_raw(dtype, &raw).map(|(i, _)| i), Some(at), "{dtype:?}: {bits:#x}");
        }
    }
}

#[test]
fn llama_cpp_names_map_both_ways() {
    // the names llama.cpp's GGUF tensor map gives the Llama-family linears
    let expected = [
        ("model.layers.0.self_attn.q_proj", "blk.0.attn_q"),
        ("model.layers.1.self_attn.k_proj", "blk.1.attn_k"),
        ("model.layers.2.self_attn.v_proj", "blk.2.attn_v"),
        ("model.layers.3.self_attn.o_proj", "blk.3.attn_output"),
        ("model.layers.10.mlp.gate_proj", "blk.10.ffn_gate"),
        ("model.layers.11.mlp.up_proj", "blk.11.ffn_up"),
        ("model.layers.12.mlp.down_proj", "blk.12.ffn_down"),
        ("lm_head", "output"),
    ];
    for (module, gguf) in expected {
        assert_eq!(crate::gguf::gguf_name(module).as_deref(), Some(gguf), "{module}");
        assert_eq!(crate::gguf::module_name(gguf).as_deref(), Some(module), "{gguf}");
    }
    for module in
        ["model.layers.x.self_attn.q_proj", "model.layers.0.mlp.fc1", "model.embed_tokens", "layers.0.mlp.up_proj"]
    {
        assert_eq!(crate::gguf::gguf_name(module), None, "{module}");
    }
    for gguf in ["blk.0.attn_qkv", "blk.x.attn_q", "token_embd", "blk.0"] {
        assert_eq!(crate::gguf::module_name(gguf), None, "{gguf}");
    }
}
