//! Byte-identity of every writer: deterministic inputs are written through each path (model
//! rewrites raw, to F16 / BF16 / F32, with replaced tensors; PEFT, kohya and GGUF adapters in each
//! dtype; PEFT -> PEFT / kohya / GGUF conversions) and every output file's length and FNV-1a hash
//! are compared with those of the sequential writer of commit a3bb955 (before the parallel
//! writer), recorded in [`EXPECTED`]. The tensors are larger than the encoder's chunk and hold
//! values that overflow, underflow and round in F16 and BF16, signed zeros, infinities and a NaN.

use std::collections::BTreeMap;
use std::path::Path;

use lora_core::{Adapter, AdapterConfig, AdapterModule, DType, Init, LoraLayer, Scaling, TargetModules, TensorSource};
use ndarray::{Array2, ArrayD};

use crate::*;

/// `name length fnv1a64` of every output file, from the sequential writer of commit a3bb955.
const EXPECTED: &str = "\
f64-to-BF16.safetensors 150080 47504dfcda5818a8
f64-to-F16.safetensors 150080 96bdf74e0a30cc55
f64-to-F32.safetensors 300080 f66dc56cacc61186
f64-to-F64.safetensors 600080 de37fcbba86de160
gguf-bf16.gguf 983840 dff12d91fc16b8c8
gguf-f16.gguf 983840 6c284321fa54c034
gguf-f32.gguf 1966880 a96ca7b10c60e3e2
kohya-bf16.safetensors 984728 d847e48f1ae36991
kohya-f16.safetensors 984720 762cf911ad95ef5e
kohya-f32.safetensors 1967776 0e17d46f97230ed9
model-bf16/config.json 56 61804be1169ae1f2
model-bf16/model-00001-of-00002.safetensors 584594 53f076d3035b1cce
model-bf16/model-00002-of-00002.safetensors 17364 1419943d758a0e60
model-bf16/model.safetensors.index.json 591 4c6d85362c4c08e7
model-bf16/tokenizer.json 2 08f44b07b5901a25
model-f16/config.json 55 a243fd99003d0bc0
model-f16/model-00001-of-00002.safetensors 584594 4783d1b0d049218c
model-f16/model-00002-of-00002.safetensors 17364 deb0072be954daad
model-f16/model.safetensors.index.json 591 4c6d85362c4c08e7
model-f16/tokenizer.json 2 08f44b07b5901a25
model-f32/config.json 55 3c7329f53f60279a
model-f32/model-00001-of-00002.safetensors 1168732 152e0423366e1b6d
model-f32/model-00002-of-00002.safetensors 34136 c66de14a8f947f31
model-f32/model.safetensors.index.json 592 a6c342a3d3c4f5f3
model-f32/tokenizer.json 2 08f44b07b5901a25
model-raw/config.json 49 c0a3a5b4a6038936
model-raw/model-00001-of-00002.safetensors 857062 4e84fa4276bb5df6
model-raw/model-00002-of-00002.safetensors 67676 dbe28888a4cf5c9c
model-raw/model.safetensors.index.json 591 1a01580f090f4a61
model-raw/tokenizer.json 2 08f44b07b5901a25
model-replaced/config.json 49 c0a3a5b4a6038936
model-replaced/model-00001-of-00002.safetensors 857062 00acd75e8a4e1803
model-replaced/model-00002-of-00002.safetensors 67676 6dd1537e3207fe4d
model-replaced/model.safetensors.index.json 591 1a01580f090f4a61
model-replaced/tokenizer.json 2 08f44b07b5901a25
model-replaced-bf16/config.json 56 61804be1169ae1f2
model-replaced-bf16/model-00001-of-00002.safetensors 584594 53f076d3035b1cce
model-replaced-bf16/model-00002-of-00002.safetensors 17364 1419943d758a0e60
model-replaced-bf16/model.safetensors.index.json 591 4c6d85362c4c08e7
model-replaced-bf16/tokenizer.json 2 08f44b07b5901a25
peft-bf16/adapter_config.json 843 246d624b0d455c0d
peft-bf16/adapter_model.safetensors 984112 8451a86bed001b48
peft-bf16-to-gguf.gguf 983840 3eac0b61dc2072bb
peft-bf16-to-kohya.safetensors 984728 d847e48f1ae36991
peft-bf16-to-peft/adapter_config.json 843 246d624b0d455c0d
peft-bf16-to-peft/adapter_model.safetensors 984112 8451a86bed001b48
peft-f16/adapter_config.json 843 246d624b0d455c0d
peft-f16/adapter_model.safetensors 984104 796d49a8c94d315d
peft-f16-to-gguf.gguf 983840 b68b608f1510e740
peft-f16-to-kohya.safetensors 984720 762cf911ad95ef5e
peft-f16-to-peft/adapter_config.json 843 246d624b0d455c0d
peft-f16-to-peft/adapter_model.safetensors 984104 796d49a8c94d315d
peft-f32/adapter_config.json 843 246d624b0d455c0d
peft-f32/adapter_model.safetensors 1967152 c47b95c7a69fbdc8
peft-f32-to-gguf.gguf 1966880 a96ca7b10c60e3e2
peft-f32-to-kohya.safetensors 1967776 0e17d46f97230ed9
peft-f32-to-peft/adapter_config.json 843 246d624b0d455c0d
peft-f32-to-peft/adapter_model.safetensors 1967152 c47b95c7a69fbdc8
";

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Every file under `dir` (recursively), as `relative/name length hash` lines, sorted.
fn listing(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        let name = format!("{prefix}{}", p.file_name().unwrap().to_string_lossy());
        if p.is_dir() {
            listing(&p, &format!("{name}/"), out);
        } else {
            let bytes = std::fs::read(&p).unwrap();
            out.push(format!("{name} {} {:016x}", bytes.len(), fnv1a(&bytes)));
        }
    }
}

/// Values over many binades, with rounding ties and special values sprinkled in.
fn values(rows: usize, cols: usize, salt: usize) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |(i, j)| {
        let k = i * cols + j + salt;
        match k % 997 {
            0 => f32::INFINITY,
            1 => f32::NEG_INFINITY,
            2 => -0.0,
            3 => 65280.0, // near f16s largest value, exact in f16 and bf16 (70000 is now an error)
            4 => 1e-9,    // under f16's subnormals
            5 => 1.0 + 1.0 / 256.0, // a bf16 rounding tie
            6 if salt == 0 => f32::NAN,
            _ => {
                let m = ((k * 7919 + 104_729) % 2003) as f32 / 1000.0 - 1.0;
                m * 10f32.powi((k % 11) as i32 - 6) // up to about 1e4: f16 holds every value
            }
        }
    })
}

fn st_raw(path: &Path, header: serde_json::Value, data: &[u8]) {
    let mut json = serde_json::to_vec(&header).unwrap();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

/// A sharded model folder: F32, F16, BF16 and F64 tensors, an I64 buffer, a scalar and a vector.
fn make_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let big = values(517, 263, 0).into_dyn(); // 135,971 elements: over two encoder chunks
    let f16t = values(300, 301, 11).into_dyn();
    let bf16t = values(257, 255, 23).into_dyn();
    let f64t = values(129, 65, 37).mapv(f64::from).into_dyn();
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let plan = vec![
        PlannedTensor::new("model.layers.0.mlp.up_proj.weight", big.shape(), DType::F32),
        PlannedTensor::new("model.layers.0.self_attn.q_proj.weight", f16t.shape(), DType::F16),
        PlannedTensor::new("model.layers.0.self_attn.k_proj.weight", bf16t.shape(), DType::BF16),
        PlannedTensor::new("model.layers.0.input_layernorm.weight", &[263], DType::F32),
    ];
    let mut w = SafetensorsWriter::create(dir.join("model-00001-of-00002.safetensors"), plan, &meta).unwrap();
    w.write("model.layers.0.mlp.up_proj.weight", &big).unwrap();
    w.write("model.layers.0.self_attn.q_proj.weight", &f16t).unwrap();
    w.write("model.layers.0.self_attn.k_proj.weight", &bf16t).unwrap();
    w.write("model.layers.0.input_layernorm.weight", &values(1, 263, 5).into_shape_with_order(263).unwrap()).unwrap();
    w.finish().unwrap();

    // Shard 2 by hand: an F64 tensor, an I64 buffer (copied raw) and an F32 scalar.
    let mut data = Vec::new();
    f64t.iter().for_each(|v| data.extend_from_slice(&v.to_le_bytes()));
    let f64_end = data.len();
    (0..37i64).for_each(|v| data.extend_from_slice(&(v * 3 - 50).to_le_bytes()));
    let ids_end = data.len();
    data.extend_from_slice(&0.123_456_79f32.to_le_bytes());
    let header = serde_json::json!({
        "__metadata__": {"format": "pt"},
        "model.layers.0.self_attn.v_proj.weight": {"dtype": "F64", "shape": [129, 65], "data_offsets": [0, f64_end]},
        "model.position_ids": {"dtype": "I64", "shape": [1, 37], "data_offsets": [f64_end, ids_end]},
        "model.scale": {"dtype": "F32", "shape": [], "data_offsets": [ids_end, ids_end + 4]},
    });
    st_raw(&dir.join("model-00002-of-00002.safetensors"), header, &data);
    let mut weight_map = serde_json::Map::new();
    for n in ["up_proj", "q_proj", "k_proj", "input_layernorm"] {
        let name = match n {
            "up_proj" => "model.layers.0.mlp.up_proj.weight".to_string(),
            "input_layernorm" => "model.layers.0.input_layernorm.weight".to_string(),
            p => format!("model.layers.0.self_attn.{p}.weight"),
        };
        weight_map.insert(name, "model-00001-of-00002.safetensors".into());
    }
    for n in ["model.layers.0.self_attn.v_proj.weight", "model.position_ids", "model.scale"] {
        weight_map.insert(n.into(), "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {"total_size": 1}, "weight_map": weight_map});
    std::fs::write(dir.join(INDEX_FILE), serde_json::to_string_pretty(&index).unwrap()).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "llama", "torch_dtype": "float32"}"#).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
}

/// An adapter with modules larger than an encoder chunk, a rank and an alpha pattern, rsLoRA,
/// q and k projections (permuted by GGUF) and a factor folded into lora_b.
fn make_adapter() -> Adapter<f32> {
    let mut config = AdapterConfig::new(64, 32.0, TargetModules::List(vec!["q_proj".into(), "k_proj".into()]));
    config.scaling = Scaling::RsLora;
    let mut a = Adapter::new(config);
    for (i, (module, d_out, rank, alpha)) in [
        ("model.layers.0.self_attn.q_proj", 1024, 64, 32.0),
        ("model.layers.0.self_attn.k_proj", 512, 64, 32.0),
        ("model.layers.1.self_attn.q_proj", 1024, 48, 20.0),
        ("model.layers.1.mlp.up_proj", 1536, 64, 32.0),
    ]
    .into_iter()
    .enumerate()
    {
        let mut layer =
            LoraLayer::init(1024, d_out, rank, alpha, Scaling::RsLora, Init::Random { b_std: 0.02 }, i as u64).unwrap();
        if i == 3 {
            // special values in one module (finite only: lora-core refuses the others)
            let b = values(d_out, rank, 40).mapv(|v| if v.is_finite() && v.abs() < 1e4 { v } else { 0.5 });
            layer = LoraLayer::new(layer.a().clone(), b, alpha, Scaling::RsLora).unwrap();
        }
        a.insert(module, AdapterModule::linear(layer)).unwrap();
    }
    a
}

fn outputs(root: &Path) -> Vec<String> {
    let model_dir = root.join("in-model");
    make_model(&model_dir);
    let model = ModelFolder::open(&model_dir).unwrap();
    let out = root.join("out");
    let opts = |dtype| ModelWriteOptions { dtype };
    write_model(&model, out.join("model-raw"), &opts(None), |_| Ok(None)).unwrap();
    for (name, d) in [("model-f16", DType::F16), ("model-bf16", DType::BF16), ("model-f32", DType::F32)] {
        write_model(&model, out.join(name), &opts(Some(d)), |_| Ok(None)).unwrap();
    }
    write_model(&model, out.join("model-replaced"), &opts(None), |n| {
        Ok(Some(model.read_f32(n).unwrap().mapv(|v| v * 0.5 + 0.25)))
    })
    .unwrap();
    write_model(&model, out.join("model-replaced-bf16"), &opts(Some(DType::BF16)), |n| {
        Ok(n.contains("up_proj").then(|| model.read_f32(n).unwrap()))
    })
    .unwrap();
    let f64s: Vec<(String, ArrayD<f64>)> =
        vec![("x".into(), values(300, 250, 3).mapv(|v| f64::from(v) * (1.0 + 1e-12)).into_dyn())];
    for d in [DType::F16, DType::BF16, DType::F32, DType::F64] {
        write_safetensors(out.join(format!("f64-to-{d:?}.safetensors")), &f64s, d, &BTreeMap::new()).unwrap();
    }

    let adapter = make_adapter();
    let gguf = GgufOptions { architecture: "llama".into(), head_count: 16, head_count_kv: 8, dtype: None };
    for d in [DType::F32, DType::F16, DType::BF16] {
        let tag = format!("{d:?}").to_lowercase();
        write_peft(&adapter, out.join(format!("peft-{tag}")), &PeftWriteOptions { dtype: Some(d) }).unwrap();
        write_kohya(
            &adapter,
            out.join(format!("kohya-{tag}.safetensors")),
            &KohyaOptions { dtype: Some(d), ..KohyaOptions::default() },
        )
        .unwrap();
        write_gguf(&adapter, out.join(format!("gguf-{tag}.gguf")), &GgufOptions { dtype: Some(d), ..gguf.clone() })
            .unwrap();
        // conversions from a file read back (dtype kept from the input)
        let read: Adapter<f32> = read_peft(out.join(format!("peft-{tag}"))).unwrap();
        write_peft(&read, out.join(format!("peft-{tag}-to-peft")), &PeftWriteOptions::default()).unwrap();
        write_kohya(&read, out.join(format!("peft-{tag}-to-kohya.safetensors")), &KohyaOptions::default()).unwrap();
        write_gguf(&read, out.join(format!("peft-{tag}-to-gguf.gguf")), &gguf).unwrap();
    }
    let mut lines = Vec::new();
    listing(&out, "", &mut lines);
    lines
}

#[test]
fn writers_give_the_same_bytes_as_the_sequential_writer() {
    let dir = tempfile::tempdir().unwrap();
    let got = outputs(dir.path()).join("\n");
    assert_eq!(got, EXPECTED.trim(), "actual listing:\n{got}");
}
