//! Regression tests of the resource bounds (issue 9): inputs that claim more than the file holds
//! fail with a clear error before anything of the claimed size is allocated or walked. The fuzz
//! targets in `fuzz/` found or motivated each case; docs/reliability.md lists them.

use std::path::Path;

use crate::*;

/// A GGUF llama LoRA adapter with head counts and the given tensor infos (name, GGUF dims),
/// padded to the data section, no data.
fn gguf_adapter(tensors: &[(&str, [u64; 2])]) -> Vec<u8> {
    let mut b = gguf_header(tensors);
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b
}

/// [`gguf_adapter`] without the padding after the header.
fn gguf_header(tensors: &[(&str, [u64; 2])]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    let put_u32 = |b: &mut Vec<u8>, v: u32| b.extend_from_slice(&v.to_le_bytes());
    let put_u64 = |b: &mut Vec<u8>, v: u64| b.extend_from_slice(&v.to_le_bytes());
    let put_str = |b: &mut Vec<u8>, s: &str| {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    put_u32(&mut b, 3);
    put_u64(&mut b, tensors.len() as u64);
    put_u64(&mut b, 6);
    for (k, v) in [("general.architecture", "llama"), ("general.type", "adapter"), ("adapter.type", "lora")] {
        put_str(&mut b, k);
        put_u32(&mut b, 8);
        put_str(&mut b, v);
    }
    put_str(&mut b, "adapter.lora.alpha");
    put_u32(&mut b, 6);
    put_u32(&mut b, 4f32.to_bits());
    for k in ["llama.attention.head_count", "llama.attention.head_count_kv"] {
        put_str(&mut b, k);
        put_u32(&mut b, 4);
        put_u32(&mut b, 2);
    }
    for (name, dims) in tensors {
        put_str(&mut b, name);
        put_u32(&mut b, 2);
        put_u64(&mut b, dims[0]);
        put_u64(&mut b, dims[1]);
        put_u32(&mut b, 0);
        put_u64(&mut b, 0);
    }
    b
}

#[test]
fn gguf_factors_with_no_values_and_2e40_rows_are_refused_before_the_rotary_permutation() {
    // lora_b of q claims 2^40 rows of zero columns: 0 bytes of data, so the header checks pass.
    // Un-permuting its rows walked all 2^40 of them (a hang); now the empty factor is refused.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("zero.gguf");
    let bytes = gguf_adapter(&[("blk.0.attn_q.weight.lora_a", [8, 0]), ("blk.0.attn_q.weight.lora_b", [0, 1 << 40])]);
    std::fs::write(&p, bytes).unwrap();
    let e = read_gguf::<f32>(&p, None).unwrap_err().to_string();
    assert!(e.contains("zero.gguf, tensor blk.0.attn_q.weight.lora_a") && e.contains("empty dimension"), "{e}");
}

fn shard(dir: &Path, name: &str, tensor: &str) {
    let t = ndarray::ArrayD::<f32>::zeros(vec![2]);
    write_safetensors(dir.join(name), &[(tensor.to_string(), t)], lora_core::DType::F32, &Default::default()).unwrap();
}

fn index(dir: &Path, n: usize) {
    let map: serde_json::Map<String, serde_json::Value> =
        (1..=n).map(|i| (format!("t{i}"), format!("model-{i:05}-of-{n:05}.safetensors").into())).collect();
    let text = serde_json::json!({ "weight_map": map }).to_string();
    std::fs::write(dir.join(INDEX_FILE), text).unwrap();
}

#[test]
fn an_index_listing_1000_absent_shards_fails_before_mapping_any() {
    let dir = tempfile::tempdir().unwrap();
    index(dir.path(), 1000);
    // Only the last shard is there: no shard is mapped, and the error counts the missing ones.
    shard(dir.path(), "model-01000-of-01000.safetensors", "t1000");
    let e = ModelFolder::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("model.safetensors.index.json"), "{e}");
    assert!(e.contains("lists 1000 shards and 999 of them are not in the folder"), "{e}");
    assert!(e.contains("(first: model-00001-of-01000.safetensors)"), "{e}");
    // 100,000 distinct shard names: collecting them was quadratic (10^10 comparisons).
    index(dir.path(), 100_000);
    let e = ModelFolder::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("lists 100000 shards and 100000 of them are not in the folder"), "{e}");
}

#[test]
fn an_index_of_1000_present_shards_opens() {
    let dir = tempfile::tempdir().unwrap();
    index(dir.path(), 1000);
    for i in 1..=1000 {
        shard(dir.path(), &format!("model-{i:05}-of-01000.safetensors"), &format!("t{i}"));
    }
    let m = ModelFolder::open(dir.path()).unwrap();
    assert_eq!((m.shards().count(), m.names().count()), (1000, 1000));
}

#[test]
fn a_kohya_network_dim_no_module_has_is_not_the_default_rank() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k.safetensors");
    let key = "lora_te_model_layers_0_self_attn_q_proj";
    let t = |shape: &[usize]| ndarray::ArrayD::<f32>::from_elem(shape.to_vec(), 0.5);
    let tensors = vec![(format!("{key}.lora_down.weight"), t(&[2, 4])), (format!("{key}.lora_up.weight"), t(&[4, 2]))];
    for (dim, rank) in [("1e300", 2), ("3", 2), ("2", 2)] {
        let meta = [("ss_network_dim".to_string(), dim.to_string())].into();
        write_safetensors(&p, &tensors, lora_core::DType::F32, &meta).unwrap();
        let modules = vec!["model.layers.0.self_attn.q_proj".to_string()];
        let a = read_kohya::<f32>(&p, &ModuleResolver::Modules(modules)).unwrap();
        assert_eq!(a.config().rank, rank, "ss_network_dim {dim}");
    }
}

#[test]
fn safetensors_offsets_summing_past_2e64_are_refused_naming_a_tensor() {
    // Eight U8 tensors of 2^61 - 1 bytes, contiguous: the last ends at 2^64 - 8, and the
    // safetensors crate's end-of-file check (end + 8 + header length) overflowed.
    let size: u64 = (1 << 61) - 1;
    let entries: Vec<String> = (0..8u64)
        .map(|i| {
            format!(r#""t{i}":{{"dtype":"U8","shape":[{size}],"data_offsets":[{},{}]}}"#, i * size, (i + 1) * size)
        })
        .collect();
    let header = format!("{{{}}}", entries.join(","));
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0; 16]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sum.safetensors");
    std::fs::write(&p, bytes).unwrap();
    let e = SafetensorsFile::open(&p).unwrap_err().to_string();
    assert!(e.contains("sum.safetensors, tensor t") && e.contains("run past the end of the data (16 bytes)"), "{e}");
}

#[test]
fn gguf_tensors_of_no_values_whose_data_would_start_past_the_end_are_refused() {
    // Found by the gguf fuzz target: the file ends with the header, short of the next multiple of 32,
    // both tensors have no values at offset 0, so the size checks passed and decoding sliced the
    // map from past its end (a panic).
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("short.gguf");
    let bytes = gguf_header(&[("blk.0.attn_q.weight.lora_a", [8, 0]), ("blk.0.attn_q.weight.lora_b", [0, 8])]);
    assert_ne!(bytes.len() % 32, 0, "the header must end short of the data section");
    std::fs::write(&p, &bytes).unwrap();
    let e = GgufFile::open(&p).unwrap_err().to_string();
    assert!(
        e.contains("short.gguf, tensor blk.0.attn_q.weight.lora_a") && e.contains("past the end of the file"),
        "{e}"
    );
}
