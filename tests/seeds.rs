//! Seed inputs of the fuzz targets: files made by lora-io's writers, the PEFT fixtures, and
//! hostile hand-made cases, each with the outcome it must have.
//!
//! `cargo run -p tests --example fuzz_seeds` writes them into `fuzz/corpus/<target>/`;
//! `tests/it/fuzz_corpus.rs` checks every hostile case's outcome and that docs/reliability.md
//! has a row for it.

use std::collections::BTreeMap;
use std::path::Path;

use lora_core::{Adapter, AdapterConfig, AdapterModule, DType, Init, LoraLayer, Scaling, TargetModules};
use ndarray::ArrayD;

use crate::fuzzing::join_parts;

/// What a seed must give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The reader accepts it.
    Ok,
    /// An error whose message contains this text.
    Error(&'static str),
}

/// One seed input of one fuzz target.
#[derive(Debug, Clone)]
pub struct Seed {
    /// The fuzz target (see [`crate::fuzzing::TARGETS`]).
    pub target: &'static str,
    /// A short name, unique within the target (`header-longer-than-file`).
    pub name: String,
    /// The input.
    pub bytes: Vec<u8>,
    /// The outcome it must have.
    pub expect: Expect,
}

fn seed(target: &'static str, name: &str, bytes: Vec<u8>, expect: Expect) -> Seed {
    Seed { target, name: name.to_string(), bytes, expect }
}

fn err(text: &'static str) -> Expect {
    Expect::Error(text)
}

/// A safetensors file from a JSON header and data bytes.
pub fn st(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// JSON nested `depth` arrays deep.
pub fn deep_json(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// A GGUF file built field by field.
#[derive(Debug, Default)]
pub struct GgufBytes(pub Vec<u8>);

impl GgufBytes {
    /// Magic, version 3, tensor and metadata counts.
    pub fn header(n_tensors: u64, n_kv: u64) -> Self {
        let mut g = GgufBytes(b"GGUF".to_vec());
        g.u32(3).u64(n_tensors).u64(n_kv);
        g
    }
    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A GGUF string (u64 length, bytes).
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    /// A string metadata entry.
    pub fn kv_str(&mut self, key: &str, value: &str) -> &mut Self {
        self.str(key).u32(8).str(value)
    }
    /// A u32 metadata entry.
    pub fn kv_u32(&mut self, key: &str, value: u32) -> &mut Self {
        self.str(key).u32(4).u32(value)
    }
    /// An f32 metadata entry.
    pub fn kv_f32(&mut self, key: &str, value: f32) -> &mut Self {
        self.str(key).u32(6).u32(value.to_bits())
    }
    /// A tensor info: name, dims (GGUF order), ggml type, offset.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ggml_type: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ggml_type).u64(offset)
    }
    /// Zero bytes up to a multiple of 32, then `data`.
    pub fn data(&mut self, data: &[u8]) -> &mut Self {
        while !self.0.len().is_multiple_of(32) {
            self.0.push(0);
        }
        self.0.extend_from_slice(data);
        self
    }
    /// The bytes.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.clone()
    }
}

/// The metadata of a llama LoRA adapter, as the GGUF writer puts it.
fn gguf_adapter(n_tensors: u64) -> GgufBytes {
    let mut g = GgufBytes::header(n_tensors, 4);
    g.kv_str("general.architecture", "qwen2")
        .kv_str("general.type", "adapter")
        .kv_str("adapter.type", "lora")
        .kv_f32("adapter.lora.alpha", 4.0);
    g
}

/// A small config.json lora-train accepts, with `extra` fields set (replacing any of the same
/// name).
pub fn llama_config(extra: &[(&str, serde_json::Value)]) -> String {
    let mut v = serde_json::json!({
        "model_type": "llama", "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 8, "hidden_act": "silu",
        "tie_word_embeddings": true
    });
    for (k, x) in extra {
        v[*k] = x.clone();
    }
    v.to_string()
}

/// The hostile hand-made inputs, each with its outcome. Every one has a row in
/// docs/reliability.md.
pub fn hostile() -> Vec<Seed> {
    let f32x4 = [0u8; 16];
    let mut out = vec![
        // safetensors
        seed("safetensors", "shorter-than-length-field", vec![1, 2, 3], err("fewer than the 8-byte header length")),
        seed(
            "safetensors",
            "header-longer-than-file",
            {
                let mut v = 1000u64.to_le_bytes().to_vec();
                v.extend_from_slice(b"{}");
                v
            },
            err("runs past the end of the file"),
        ),
        seed("safetensors", "header-length-u64-max", u64::MAX.to_le_bytes().to_vec(), err("over the 100000000-byte limit")),
        seed(
            "safetensors",
            "shape-product-overflows",
            st(r#"{"t":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}}"#, &f32x4),
            err("tensor t: invalid header"),
        ),
        seed(
            "safetensors",
            "shape-larger-than-data",
            st(r#"{"t":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,16]}}"#, &f32x4),
            err("tensor t: invalid header: byte count 16"),
        ),
        seed(
            "safetensors",
            "offsets-past-end",
            st(r#"{"t":{"dtype":"F32","shape":[250],"data_offsets":[0,1000]}}"#, &f32x4),
            err("tensor t: invalid header"),
        ),
        seed(
            "safetensors",
            "offsets-overlap",
            st(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                &f32x4,
            ),
            err("invalid header"),
        ),
        seed(
            "safetensors",
            "offsets-reversed",
            st(r#"{"t":{"dtype":"F32","shape":[0],"data_offsets":[16,0]}}"#, &f32x4),
            err("tensor t: invalid header"),
        ),
        seed(
            "safetensors",
            "offsets-sum-overflows",
            {
                // eight U8 tensors of 2^61 - 1 bytes each: the last ends at 2^64 - 8
                let size: u64 = (1 << 61) - 1;
                let entries: Vec<String> = (0..8u64)
                    .map(|i| {
                        let (s, e) = (i * size, (i + 1) * size);
                        format!(r#""t{i}":{{"dtype":"U8","shape":[{size}],"data_offsets":[{s},{e}]}}"#)
                    })
                    .collect();
                st(&format!("{{{}}}", entries.join(",")), &f32x4)
            },
            err("invalid header"),
        ),
        seed(
            "safetensors",
            "dtype-size-mismatch",
            st(r#"{"t":{"dtype":"F16","shape":[4],"data_offsets":[0,16]}}"#, &f32x4),
            err("tensor t: invalid header: byte count 16 (offsets 0..16) disagrees with shape [4] and dtype F16 (8 bytes)"),
        ),
        seed(
            "safetensors",
            "unknown-dtype",
            st(r#"{"t":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#, &f32x4),
            err("not a valid safetensors json header"),
        ),
        seed(
            "safetensors",
            "integer-dtype",
            st(r#"{"t":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}"#, &f32x4),
            Expect::Ok,
        ),
        seed(
            "safetensors",
            "zero-elements-huge-dims",
            st(r#"{"t":{"dtype":"F32","shape":[0,1152921504606846976],"data_offsets":[0,0]}}"#, &[]),
            Expect::Ok,
        ),
        seed(
            "safetensors",
            "header-not-utf8",
            {
                let mut v = 4u64.to_le_bytes().to_vec();
                v.extend_from_slice(b"{\"\xff\"");
                v
            },
            err("header is not utf-8"),
        ),
        seed(
            "safetensors",
            "deep-json-nesting",
            st(&format!(r#"{{"__metadata__":{}}}"#, deep_json(1000)), &[]),
            err("not a valid safetensors json header"),
        ),
        seed(
            "safetensors",
            "trailing-bytes",
            st(r#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, &f32x4),
            err("but the file holds 16 bytes of data"),
        ),
        // peft
        seed("peft", "no-files", Vec::new(), err("<dir>/adapter_config.json: No such file")),
        seed(
            "peft",
            "config-not-json",
            join_parts(&[b"{\"r\": 2,", b"x"]),
            err("<dir>/adapter_config.json: invalid json"),
        ),
        seed("peft", "config-not-utf8", join_parts(&[b"{\"r\": \xff}", b"x"]), err("adapter_config.json")),
        seed(
            "peft",
            "config-deep-nesting",
            join_parts(&[format!(r#"{{"peft_type":"LORA","r":2,"lora_alpha":2,"x":{}}}"#, deep_json(1000)).as_bytes(), b"x"]),
            err("recursion limit exceeded"),
        ),
        seed(
            "peft",
            "r-zero",
            join_parts(&[br#"{"peft_type":"LORA","r":0,"lora_alpha":2}"#, b"x"]),
            err("adapter_config.json, tensor r: r must be at least 1"),
        ),
        seed(
            "peft",
            "invalid-rank-pattern-regex",
            join_parts(&[br#"{"peft_type":"LORA","r":2,"lora_alpha":2,"rank_pattern":{"(":4}}"#, &peft_weights(2, 2)]),
            err("invalid pattern key"),
        ),
        seed(
            "peft",
            "r-claims-1e12",
            join_parts(&[br#"{"peft_type":"LORA","r":1000000000000,"lora_alpha":2}"#, &peft_weights(2, 2)]),
            err("rank 2 disagrees with adapter_config.json r, which says 1000000000000"),
        ),
        seed(
            "peft",
            "rank-mismatch-a-b",
            join_parts(&[br#"{"peft_type":"LORA","r":2,"lora_alpha":2}"#, &peft_weights(2, 3)]),
            err("rank 3 disagrees with"),
        ),
        seed(
            "peft",
            "lora-a-without-b",
            join_parts(&[
                br#"{"peft_type":"LORA","r":2,"lora_alpha":2}"#,
                &st(
                    r#"{"base_model.model.layers.0.q.lora_A.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#,
                    &f32x4,
                ),
            ]),
            err("has no matching lora_B.weight"),
        ),
        seed(
            "peft",
            "zero-rank-huge-dims",
            join_parts(&[
                br#"{"peft_type":"LORA","r":2,"lora_alpha":2}"#,
                &st(
                    r#"{"base_model.model.q.lora_A.weight":{"dtype":"F32","shape":[0,1152921504606846976],"data_offsets":[0,0]},"base_model.model.q.lora_B.weight":{"dtype":"F32","shape":[1152921504606846976,0],"data_offsets":[0,0]}}"#,
                    &[],
                ),
            ]),
            err("rank 0 disagrees"),
        ),
        // kohya
        seed(
            "kohya",
            "down-without-up",
            st(r#"{"lora_te_model_layers_0_self_attn_q_proj.lora_down.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#, &f32x4),
            err("has no matching lora_up.weight"),
        ),
        seed(
            "kohya",
            "alpha-not-scalar",
            kohya_file(r#","lora_te_model_layers_0_self_attn_q_proj.alpha":{"dtype":"F32","shape":[2],"data_offsets":[32,40]}"#, 40),
            err("expected shape [] (a scalar), got [2]"),
        ),
        seed(
            "kohya",
            "unknown-module",
            st(
                r#"{"lora_te_nothing_here.lora_down.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"lora_te_nothing_here.lora_up.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[16,32]}}"#,
                &[0u8; 32],
            ),
            err("matches no module path"),
        ),
        seed(
            "kohya",
            "network-dim-1e300",
            kohya_file_meta(r#""ss_network_dim":"1e300""#),
            Expect::Ok,
        ),
        seed(
            "kohya",
            "module-paths-not-json",
            kohya_file_meta(r#""lora_io.module_paths":"[1,""#),
            err("metadata is not a json list of strings"),
        ),
        // gguf
        seed("gguf", "bad-magic", b"GGUX\x03\0\0\0".to_vec(), err("not a GGUF file")),
        seed("gguf", "version-99", b"GGUF\x63\0\0\0".to_vec(), err("GGUF version 99 is not supported")),
        seed("gguf", "tensor-count-u64-max", GgufBytes::header(u64::MAX, 0).bytes(), err("cannot fit in")),
        seed("gguf", "kv-count-2e60", GgufBytes::header(0, 1 << 60).bytes(), err("cannot fit in")),
        seed(
            "gguf",
            "string-length-u64-max",
            {
                let mut g = GgufBytes::header(0, 1);
                g.u64(u64::MAX);
                g.bytes()
            },
            err("string length 18446744073709551615 is larger than the file"),
        ),
        seed(
            "gguf",
            "array-of-2e40-items",
            {
                let mut g = GgufBytes::header(0, 1);
                g.str("k").u32(9).u32(0).u64(1 << 40);
                g.bytes()
            },
            err("array of 1099511627776 items is longer than the rest of the file"),
        ),
        seed(
            "gguf",
            "arrays-nested-too-deep",
            {
                let mut g = GgufBytes::header(0, 1);
                g.str("k").u32(9);
                for _ in 0..4 {
                    g.u32(9).u64(1);
                }
                g.u32(0).u64(0);
                g.bytes()
            },
            err("arrays nested too deep"),
        ),
        seed(
            "gguf",
            "unknown-value-type",
            {
                let mut g = GgufBytes::header(0, 1);
                g.str("k").u32(13);
                g.bytes()
            },
            err("unknown metadata value type 13"),
        ),
        seed(
            "gguf",
            "five-dims",
            {
                let mut g = gguf_adapter(1);
                g.tensor("blk.0.attn_q.weight.lora_a", &[1, 1, 1, 1, 1], 0, 0);
                g.bytes()
            },
            err("5 dims (at most 4)"),
        ),
        seed(
            "gguf",
            "dims-overflow",
            {
                let mut g = gguf_adapter(1);
                g.tensor("blk.0.attn_q.weight.lora_a", &[1 << 32, 1 << 32], 0, 0);
                g.bytes()
            },
            err("overflow"),
        ),
        seed(
            "gguf",
            "data-past-end",
            {
                let mut g = gguf_adapter(1);
                g.tensor("blk.0.attn_q.weight.lora_a", &[1000, 1000], 0, 0).data(&[0; 32]);
                g.bytes()
            },
            err("runs past the end of the data"),
        ),
        seed(
            "gguf",
            "unaligned-offset",
            {
                let mut g = gguf_adapter(1);
                g.tensor("blk.0.attn_q.weight.lora_a", &[1], 0, 3).data(&[0; 32]);
                g.bytes()
            },
            err("is not aligned to 32"),
        ),
        seed(
            "gguf",
            "quantised-type",
            {
                let mut g = gguf_adapter(1);
                g.tensor("blk.0.attn_q.weight.lora_a", &[32], 2, 0).data(&[0; 32]);
                g.bytes()
            },
            err("unsupported dtype ggml type 2"),
        ),
        seed(
            "gguf",
            "duplicate-tensor",
            {
                let mut g = gguf_adapter(2);
                g.tensor("blk.0.attn_q.weight.lora_a", &[1], 0, 0).tensor("blk.0.attn_q.weight.lora_a", &[1], 0, 0);
                g.bytes()
            },
            err("tensor name appears twice"),
        ),
        seed(
            "gguf",
            "zero-rank-huge-rows",
            {
                let mut g = GgufBytes::header(2, 6);
                g.kv_str("general.architecture", "llama")
                    .kv_str("general.type", "adapter")
                    .kv_str("adapter.type", "lora")
                    .kv_f32("adapter.lora.alpha", 4.0)
                    .kv_u32("llama.attention.head_count", 2)
                    .kv_u32("llama.attention.head_count_kv", 2)
                    .tensor("blk.0.attn_q.weight.lora_a", &[1 << 40, 0], 0, 0)
                    .tensor("blk.0.attn_q.weight.lora_b", &[0, 1 << 40], 0, 0)
                    .data(&[]);
                g.bytes()
            },
            err("tensor blk.0.attn_q.weight.lora_a"),
        ),
        // model folder
        seed(
            "model_folder",
            "index-lists-1000-shards",
            join_parts(&[b"{}", shard_index(1000).as_bytes()]),
            err("1000 shards"),
        ),
        seed(
            "model_folder",
            "shard-outside-folder",
            join_parts(&[b"", br#"{"weight_map":{"w":"../model.safetensors"}}"#]),
            err("points outside the folder"),
        ),
        seed(
            "model_folder",
            "weight-map-not-object",
            join_parts(&[b"", br#"{"weight_map":[1,2]}"#]),
            err("tensor weight_map: missing or not an object"),
        ),
        seed(
            "model_folder",
            "index-names-missing-tensor",
            join_parts(&[
                b"",
                br#"{"weight_map":{"w":"model-00001-of-00001.safetensors","v":"model-00001-of-00001.safetensors"}}"#,
                &st(r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, &f32x4),
            ]),
            err("model-00001-of-00001.safetensors, tensor v: tensor not found"),
        ),
        seed(
            "model_folder",
            "tensor-in-two-shards",
            join_parts(&[
                b"",
                br#"{"weight_map":{"w":"model-00001-of-00002.safetensors","v":"model-00002-of-00002.safetensors"}}"#,
                &st(r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, &f32x4),
                &st(r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, &f32x4),
            ]),
            err("tensor appears in more than one shard"),
        ),
        seed(
            "model_folder",
            "config-deep-nesting",
            join_parts(&[deep_json(1000).as_bytes(), b""]),
            err("<dir>/config.json: invalid json: recursion limit exceeded"),
        ),
        seed("model_folder", "config-not-utf8", join_parts(&[b"\"\xff\"", b""]), err("<dir>/config.json: invalid json")),
        // lora-train config
        seed(
            "train_config",
            "vocab-size-1e12",
            join_parts(&[llama_config(&[("vocab_size", 1_000_000_000_000u64.into())]).as_bytes(), &tiny_llama_weights()]),
            err("vocab_size"),
        ),
        seed(
            "train_config",
            "layers-1e12",
            join_parts(&[llama_config(&[("num_hidden_layers", 1_000_000_000_000u64.into())]).as_bytes(), &tiny_llama_weights()]),
            err("num_hidden_layers"),
        ),
        seed(
            "train_config",
            "head-dim-product-overflows",
            join_parts(&[
                llama_config(&[
                    ("num_attention_heads", (1u64 << 40).into()),
                    ("num_key_value_heads", (1u64 << 40).into()),
                    ("head_dim", (1u64 << 40).into()),
                ])
                .as_bytes(),
                &tiny_llama_weights(),
            ]),
            err("overflows"),
        ),
        seed(
            "train_config",
            "hidden-size-zero",
            join_parts(&[llama_config(&[("hidden_size", 0.into())]).as_bytes(), &tiny_llama_weights()]),
            err("hidden_size must be at least 1"),
        ),
        seed("train_config", "config-not-utf8", join_parts(&[b"{\"model_type\": \"\xff\"}", b""]), err("config.json")),
        seed(
            "train_config",
            "config-deep-nesting",
            join_parts(&[llama_config(&[]).replacen('{', &format!(r#"{{"rope_scaling":{},"#, deep_json(1000)), 1).as_bytes(), b""]),
            err("recursion limit exceeded"),
        ),
        seed(
            "train_config",
            "size-is-a-string",
            join_parts(&[llama_config(&[("hidden_size", "4".into())]).as_bytes(), b""]),
            err("invalid type: string"),
        ),
    ];
    out.sort_by(|a, b| (a.target, &a.name).cmp(&(b.target, &b.name)));
    out
}

/// `adapter_model.safetensors` of one module with lora_A of rank `ra` and lora_B of rank `rb`
/// (d_in = d_out = 2).
fn peft_weights(ra: usize, rb: usize) -> Vec<u8> {
    let (na, nb) = (ra * 2 * 4, rb * 2 * 4);
    st(
        &format!(
            r#"{{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":{{"dtype":"F32","shape":[{ra},2],"data_offsets":[0,{na}]}},"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":{{"dtype":"F32","shape":[2,{rb}],"data_offsets":[{na},{}]}}}}"#,
            na + nb
        ),
        &vec![0u8; na + nb],
    )
}

/// A kohya file of one q_proj module (rank 2, d 2), with `more` header entries and `len` data
/// bytes.
fn kohya_file(more: &str, len: usize) -> Vec<u8> {
    st(
        &format!(
            r#"{{"lora_te_model_layers_0_self_attn_q_proj.lora_down.weight":{{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}},"lora_te_model_layers_0_self_attn_q_proj.lora_up.weight":{{"dtype":"F32","shape":[2,2],"data_offsets":[16,32]}}{more}}}"#
        ),
        &vec![0u8; len],
    )
}

fn kohya_file_meta(meta: &str) -> Vec<u8> {
    kohya_file(&format!(r#","__metadata__":{{{meta}}}"#), 32)
}

/// An index listing `n` shards, one tensor each.
pub fn shard_index(n: usize) -> String {
    let map: serde_json::Map<String, serde_json::Value> =
        (1..=n).map(|i| (format!("t{i}"), format!("model-{i:05}-of-{n:05}.safetensors").into())).collect();
    serde_json::json!({ "metadata": {}, "weight_map": map }).to_string()
}

/// The tensors of [`llama_config`]'s model with no changes.
pub fn tiny_llama_tensors() -> Vec<(String, ArrayD<f32>)> {
    let c = serde_json::from_str::<serde_json::Value>(&llama_config(&[])).expect("json");
    let n = |k: &str| c[k].as_u64().expect("size") as usize;
    let (h, i, v) = (n("hidden_size"), n("intermediate_size"), n("vocab_size"));
    let (heads, kv) = (n("num_attention_heads"), n("num_key_value_heads"));
    let (qd, kvd) = (h, h / heads * kv);
    let mut tensors: Vec<(String, ArrayD<f32>)> =
        vec![("model.embed_tokens.weight".into(), ArrayD::from_elem(vec![v, h], 0.1))];
    for (m, d_out, d_in) in [
        ("self_attn.q_proj", qd, h),
        ("self_attn.k_proj", kvd, h),
        ("self_attn.v_proj", kvd, h),
        ("self_attn.o_proj", h, qd),
        ("mlp.gate_proj", i, h),
        ("mlp.up_proj", i, h),
        ("mlp.down_proj", h, i),
    ] {
        tensors.push((format!("model.layers.0.{m}.weight"), ArrayD::from_elem(vec![d_out, d_in], 0.01)));
    }
    for n in
        ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight", "model.norm.weight"]
    {
        tensors.push((n.into(), ArrayD::from_elem(vec![h], 1.0)));
    }
    tensors
}

/// `model.safetensors` of [`llama_config`]'s model, in `dtype`.
pub fn tiny_llama_weights_in(tensors: &[(String, ArrayD<f32>)], dtype: DType) -> Vec<u8> {
    written(|p| lora_io::write_safetensors(p, tensors, dtype, &BTreeMap::new()).map_err(|e| e.to_string()))
}

/// `model.safetensors` of [`llama_config`]'s model, in f32.
pub fn tiny_llama_weights() -> Vec<u8> {
    tiny_llama_weights_in(&tiny_llama_tensors(), DType::F32)
}

/// Run a writer on a temporary path and return the file it wrote.
fn written(write: impl FnOnce(&Path) -> Result<(), String>) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temporary folder");
    let path = dir.path().join("out");
    write(&path).expect("the writer succeeds");
    std::fs::read(&path).expect("written file")
}

/// A two-module adapter (q and v of layer 0; d 8, rank 2) to write in every format.
fn small_adapter() -> Adapter<f32> {
    let modules = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"];
    let mut a = Adapter::new(AdapterConfig::new(2, 4.0, TargetModules::List(vec!["q_proj".into(), "v_proj".into()])));
    for (i, m) in modules.iter().enumerate() {
        let layer = LoraLayer::init(8, 8, 2, 4.0, Scaling::Standard, Init::Random { b_std: 0.1 }, i as u64)
            .expect("valid layer");
        a.insert(*m, AdapterModule::linear(layer)).expect("new module");
    }
    a
}

/// Files made by lora-io's writers (and lora-train's tiny model): accepted by their readers.
pub fn made() -> Vec<Seed> {
    let adapter = small_adapter();
    let dir = tempfile::tempdir().expect("temporary folder");
    let peft_dir = dir.path().join("peft");
    lora_io::write_peft(&adapter, &peft_dir, &lora_io::PeftWriteOptions { dtype: Some(DType::F16) })
        .expect("peft writes");
    let read = |p: &Path| std::fs::read(p).expect("written file");
    let peft_config = read(&peft_dir.join(lora_io::CONFIG_FILE));
    let peft_weights = read(&peft_dir.join(lora_io::WEIGHTS_FILE));
    let kohya = written(|p| lora_io::write_kohya(&adapter, p, &Default::default()).map_err(|e| e.to_string()));
    let gguf = |arch: &str, dtype| {
        let options = lora_io::GgufOptions { architecture: arch.into(), head_count: 2, head_count_kv: 2, dtype };
        written(|p| lora_io::write_gguf(&adapter, p, &options).map_err(|e| e.to_string()))
    };
    let config = llama_config(&[]);
    let weights = tiny_llama_weights();
    // The same model in two bf16 shards with an index.
    let tensors = tiny_llama_tensors();
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let mut map = serde_json::Map::new();
    for (part, shard) in [(first, 1), (second, 2)] {
        for (name, _) in part {
            map.insert(name.clone(), format!("model-{shard:05}-of-00002.safetensors").into());
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": map }).to_string();
    let sharded = join_parts(&[
        config.as_bytes(),
        index.as_bytes(),
        &tiny_llama_weights_in(first, DType::BF16),
        &tiny_llama_weights_in(second, DType::BF16),
    ]);
    vec![
        seed("safetensors", "made-peft-f16", peft_weights.clone(), Expect::Ok),
        seed("safetensors", "made-tiny-llama", weights.clone(), Expect::Ok),
        seed("peft", "made-f16", join_parts(&[&peft_config, &peft_weights]), Expect::Ok),
        seed("kohya", "made", kohya, Expect::Ok),
        seed("gguf", "made-llama-f32", gguf("llama", Some(DType::F32)), Expect::Ok),
        seed("gguf", "made-qwen2-bf16", gguf("qwen2", Some(DType::BF16)), Expect::Ok),
        seed("model_folder", "made-single", join_parts(&[config.as_bytes(), b"", &weights]), Expect::Ok),
        seed("model_folder", "made-sharded-bf16", sharded, Expect::Ok),
        seed("train_config", "made-tiny-llama", join_parts(&[config.as_bytes(), &weights]), Expect::Ok),
    ]
}

/// The PEFT fixtures made by the real PEFT (tests/fixtures/peft/*/adapter), as seeds of the peft
/// and safetensors targets, and the sharded base model of `plain` for the model folder target.
pub fn fixtures(root: &Path) -> Vec<Seed> {
    let peft = root.join("tests/fixtures/peft");
    let mut cases: Vec<_> = std::fs::read_dir(&peft)
        .expect("tests/fixtures/peft")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("adapter").is_dir())
        .collect();
    cases.sort();
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut out = Vec::new();
    for case in cases {
        let name = case.file_name().expect("name").to_string_lossy().into_owned();
        let config = read(&case.join("adapter").join(lora_io::CONFIG_FILE));
        let weights = read(&case.join("adapter").join(lora_io::WEIGHTS_FILE));
        out.push(seed("safetensors", &format!("fixture-{name}"), weights.clone(), Expect::Ok));
        out.push(seed("peft", &format!("fixture-{name}"), join_parts(&[&config, &weights]), Expect::Ok));
    }
    let base = peft.join("plain/base");
    let mut parts = vec![read(&base.join("config.json")), read(&base.join(lora_io::INDEX_FILE))];
    for i in 1..=3 {
        parts.push(read(&base.join(format!("model-{i:05}-of-00003.safetensors"))));
    }
    let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    out.push(seed("model_folder", "fixture-plain-base", join_parts(&parts), Expect::Ok));
    out
}

/// Every seed: [`made`], [`fixtures`] and [`hostile`].
pub fn all(root: &Path) -> Vec<Seed> {
    let mut out = made();
    out.extend(fixtures(root));
    out.extend(hostile());
    out
}
