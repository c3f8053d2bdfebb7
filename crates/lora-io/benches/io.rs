//! lora-io throughput against copying the same bytes: a synthetic sharded f32 model folder
//! (size from `LORA_IO_BENCH_MB`, default 64) is copied file by file with fsync (the baseline),
//! rewritten raw with `write_model`, converted to bf16, decoded tensor by tensor, and a PEFT
//! adapter of a quarter of that size is converted to GGUF and PEFT by decoding it whole (`read_peft`
//! + `write_*`) and by `convert_adapter`'s streaming path (also to kohya and back).
//!
//! `LORA_IO_BENCH_MB=1024 cargo bench -p lora-io --bench io`; results go to docs/benchmarks.md.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lora_core::{Adapter, AdapterConfig, AdapterModule, DType, Init, LoraLayer, Scaling, TargetModules, TensorSource};
use lora_io::{
    convert_adapter, read_peft, write_gguf, write_model, write_peft, ConvertOptions, Format, GgufOptions, ModelFolder,
    ModelWriteOptions, PeftWriteOptions, PlannedTensor, SafetensorsWriter, WriteOptions,
};
use ndarray::Array2;

const SIDE: usize = 1024; // 4 MiB f32 tensors

fn make_model(dir: &Path, mb: usize) -> u64 {
    let n_tensors = (mb / 4).max(2);
    let shards = 2;
    let per = n_tensors.div_ceil(shards);
    let t = Array2::from_shape_fn((SIDE, SIDE), |(i, j)| ((i * 31 + j * 17) % 1000) as f32 * 1e-3 - 0.5);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for s in 0..shards {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
        let names: Vec<String> =
            (s * per..((s + 1) * per).min(n_tensors)).map(|i| format!("model.layers.{i}.mlp.up_proj.weight")).collect();
        let plan = names.iter().map(|n| PlannedTensor::new(n.clone(), &[SIDE, SIDE], DType::F32)).collect();
        let mut w = SafetensorsWriter::create(dir.join(&file), plan, &BTreeMap::new()).expect("bench folder");
        for n in &names {
            w.write(n, &t).expect("write");
            weight_map.insert(n.clone(), file.clone().into());
            total += (SIDE * SIDE * 4) as u64;
        }
        w.finish().expect("finish");
    }
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("index");
    std::fs::write(dir.join("config.json"), r#"{"model_type":"llama","num_attention_heads":8}"#).expect("config");
    total
}

fn make_adapter(mb: usize) -> Adapter<f32> {
    // rank 64 on 4096 x 4096 q/k/v/o: 4 MiB per module.
    let modules = (mb / 4).max(1);
    let mut a = Adapter::new(AdapterConfig::new(64, 128.0, TargetModules::List(vec!["q_proj".into()])));
    for i in 0..modules {
        let layer = LoraLayer::init(4096, 4096, 64, 128.0, Scaling::Standard, Init::Random { b_std: 0.01 }, i as u64)
            .expect("layer");
        a.insert(format!("model.layers.{}.self_attn.q_proj", i), AdapterModule::linear(layer)).expect("insert");
    }
    a
}

fn copy_folder(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).expect("dir") {
        let p = e.expect("entry").path();
        let dst = to.join(p.file_name().expect("name"));
        std::fs::copy(&p, &dst).expect("copy");
        File::open(&dst).and_then(|f| f.sync_all()).expect("fsync");
    }
}

fn benches(c: &mut Criterion) {
    let mb: usize = std::env::var("LORA_IO_BENCH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("model");
    std::fs::create_dir_all(&src).expect("mkdir");
    let bytes = make_model(&src, mb);
    let model = ModelFolder::open(&src).expect("open");
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).expect("mkdir");

    // `LORA_BENCH_SMALL=1` (`cargo xtask bench --small`): short measurements, to check the bench
    let small = std::env::var("LORA_BENCH_SMALL").is_ok_and(|v| !v.is_empty() && v != "0");
    let mut g = c.benchmark_group("model");
    g.sample_size(10);
    if small {
        g.warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    }
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("copy_files_fsync (baseline)", |b| b.iter(|| copy_folder(&src, &out)));
    g.bench_function("write_model_raw", |b| {
        b.iter(|| write_model(&model, &out, &ModelWriteOptions::default(), |_| Ok(None)).expect("write"))
    });
    g.bench_function("write_model_decode_encode_f32", |b| {
        b.iter(|| {
            write_model(&model, &out, &ModelWriteOptions::default(), |n| Ok(Some(model.read_f32(n).expect("read"))))
                .expect("write")
        })
    });
    g.bench_function("write_model_to_bf16", |b| {
        b.iter(|| {
            write_model(&model, &out, &ModelWriteOptions { dtype: Some(DType::BF16) }, |_| Ok(None)).expect("write")
        })
    });
    g.bench_function("decode_all_f32", |b| {
        b.iter(|| model.tensor_names().iter().map(|n| model.read_f32(n).expect("read").len()).sum::<usize>())
    });
    g.finish();

    let adapter = make_adapter(mb / 4);
    let peft = tmp.path().join("peft");
    write_peft(&adapter, &peft, &PeftWriteOptions::default()).expect("peft");
    let adapter_bytes = std::fs::metadata(peft.join("adapter_model.safetensors")).expect("size").len();
    let opts = GgufOptions { architecture: "llama".into(), head_count: 32, head_count_kv: 32, dtype: None };
    let config = serde_json::json!({"model_type": "llama", "num_attention_heads": 32, "num_key_value_heads": 32});
    let mut g = c.benchmark_group("adapter");
    g.sample_size(10);
    if small {
        g.warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    }
    g.throughput(Throughput::Bytes(adapter_bytes));
    g.bench_function("copy_file_fsync (baseline)", |b| {
        b.iter(|| {
            std::fs::copy(peft.join("adapter_model.safetensors"), tmp.path().join("copy.safetensors")).expect("copy");
            File::open(tmp.path().join("copy.safetensors")).and_then(|f| f.sync_all()).expect("fsync");
        })
    });
    g.bench_function("peft_to_gguf", |b| {
        b.iter(|| {
            let a: Adapter<f32> = read_peft(&peft).expect("read");
            write_gguf(&a, tmp.path().join("a.gguf"), &opts).expect("gguf");
        })
    });
    g.bench_function("peft_to_peft", |b| {
        b.iter(|| {
            let a: Adapter<f32> = read_peft(&peft).expect("read");
            write_peft(&a, tmp.path().join("p2"), &PeftWriteOptions::default()).expect("peft");
        })
    });
    // The same conversions through `convert_adapter`, which streams the stored bytes (and the
    // kohya file it writes, converted back to PEFT).
    let write = WriteOptions { dtype: None, base_config: Some(config.clone()) };
    let options = ConvertOptions { write, ..ConvertOptions::default() };
    let streamed = |to: Format, out: &Path, input: &Path| {
        let done = convert_adapter(input, out, to, &options).expect("convert");
        assert!(done.streamed, "the bench measures the streaming path");
    };
    g.bench_function("streamed_peft_to_gguf", |b| b.iter(|| streamed(Format::Gguf, &tmp.path().join("s.gguf"), &peft)));
    g.bench_function("streamed_peft_to_peft", |b| b.iter(|| streamed(Format::Peft, &tmp.path().join("s2"), &peft)));
    let kohya = tmp.path().join("s.safetensors");
    g.bench_function("streamed_peft_to_kohya", |b| b.iter(|| streamed(Format::Kohya, &kohya, &peft)));
    g.bench_function("streamed_kohya_to_peft", |b| b.iter(|| streamed(Format::Peft, &tmp.path().join("s3"), &kohya)));
    g.finish();
}

criterion_group!(io, benches);
criterion_main!(io);
