//! End-to-end tests of the `lora` binary: every command run as a user runs it, on models the demo
//! builds and on the PEFT fixtures, checking outputs against the libraries and every error path
//! for its one-line message, its exit code and the absence of partial output.
//!
//! They live beside the binary, not in the workspace's `tests/` crate, because only a package's
//! own integration tests are given its executable (`CARGO_BIN_EXE_lora`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lora_core::deltas;
use serde_json::Value;

mod support;

use support::{fails, json, ok, s, tmp};

/// The demo's files (a 2-layer Llama-shaped base and tuned model, adapters), made once per run.
fn demo() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        ok(&["demo", "--out", s(dir.path()), "--hidden", "64", "--rank", "8", "--train-steps", "20"]);
        dir
    })
    .path()
}

fn read(path: &Path) -> lora_core::Adapter<f32> {
    let base = lora_io::ModelFolder::open(demo().join("base")).expect("base");
    let modules = lora_core::TensorSource::tensor_names(&base)
        .into_iter()
        .filter_map(|n| n.strip_suffix(".weight").map(str::to_string))
        .collect();
    let options = lora_io::ReadOptions { modules: Some(modules), base_config: base.config().cloned() };
    lora_io::read_adapter_with(path, &options).expect("the adapter reads")
}

fn max_diff(a: &ndarray::Array2<f32>, b: &ndarray::Array2<f32>) -> f32 {
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn every_command_has_help_with_an_example() {
    for cmd in ["inspect", "extract", "merge", "convert", "resize", "combine", "train", "eval", "demo"] {
        let help = ok(&[cmd, "--help"]);
        assert!(help.contains("Example"), "lora {cmd} --help has no example:\n{help}");
    }
}

#[test]
fn demo_writes_every_step() {
    let dir = demo();
    for p in [
        "base/config.json",
        "tuned/model.safetensors",
        "adapter/adapter_config.json",
        "adapter-r8",
        "merged",
        "adapter.gguf",
        "adapter-kohya.safetensors",
        "spectra.svg",
        "extract-report.json",
    ] {
        assert!(dir.join(p).exists(), "{p} is missing");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("lora-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary outputs left behind: {leftovers:?}");
}

#[test]
fn extract_with_each_rule_and_report() {
    let dir = demo();
    let out = tmp();
    let report = out.path().join("report.json");
    let summary = json(&[
        "extract",
        "--base",
        s(&dir.join("base")),
        "--tuned",
        s(&dir.join("tuned")),
        "--out",
        s(&out.path().join("a")),
        "--rank",
        "4",
        "--method",
        "exact",
        "--report",
        s(&report),
        "--plot",
        s(&out.path().join("p.svg")),
        "--json",
        "--threads",
        "1",
    ]);
    assert_eq!(summary["modules"], 14);
    let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 14);
    assert!(layers.iter().all(|l| l["rank"] == 4));
    let adapter = read(&out.path().join("a"));
    assert!(adapter.modules().values().all(|m| m.layer().rank() == 4));

    // energy: different ranks per module become the rank pattern
    let summary = json(&[
        "extract",
        "--base",
        s(&dir.join("base")),
        "--tuned",
        s(&dir.join("tuned")),
        "--out",
        s(&out.path().join("e")),
        "--energy",
        "0.9",
        "--max-rank",
        "40",
        "--json",
    ]);
    assert!(summary["max_relative_error"].as_f64().unwrap() <= (0.1f64).sqrt() + 1e-6, "{summary}");

    for (flag, value) in [("--sv-ratio", "4"), ("--sv-epsilon", "0.05"), ("--sv-cumulative", "0.5")] {
        let target = out.path().join(flag.trim_start_matches('-'));
        ok(&[
            "extract",
            "--base",
            s(&dir.join("base")),
            "--tuned",
            s(&dir.join("tuned")),
            "--out",
            s(&target),
            flag,
            value,
            "--method",
            "exact",
            "--quiet",
        ]);
        assert!(target.join("adapter_model.safetensors").exists());
    }
    fails(
        &[
            "extract",
            "--base",
            s(&dir.join("base")),
            "--tuned",
            s(&dir.join("tuned")),
            "--out",
            s(&out.path().join("c")),
            "--sv-cumulative",
            "0.5",
            "--method",
            "randomized",
        ],
        &["cumulative"],
    );
    assert!(!out.path().join("c").exists());
}

#[test]
fn merge_then_unmerge_returns_the_base() {
    let dir = demo();
    let out = tmp();
    ok(&[
        "merge",
        "--base",
        s(&dir.join("base")),
        "--adapter",
        s(&dir.join("adapter")),
        "--out",
        s(&out.path().join("m")),
    ]);
    ok(&[
        "merge",
        "--base",
        s(&out.path().join("m")),
        "--adapter",
        s(&dir.join("adapter")),
        "--unmerge",
        "--out",
        s(&out.path().join("u")),
    ]);
    let base = lora_io::ModelFolder::open(dir.join("base")).unwrap();
    let merged = lora_io::ModelFolder::open(out.path().join("m")).unwrap();
    let back = lora_io::ModelFolder::open(out.path().join("u")).unwrap();
    let adapter = read(&dir.join("adapter"));
    let d = deltas(&adapter);
    for name in lora_core::TensorSource::tensor_names(&base) {
        let w0 = lora_core::read_matrix::<f32, _>(&base, &name);
        let Ok(w0) = w0 else { continue };
        let w1 = lora_core::read_matrix::<f32, _>(&merged, &name).unwrap();
        let w2 = lora_core::read_matrix::<f32, _>(&back, &name).unwrap();
        let module = name.trim_end_matches(".weight");
        let want = match d.get(module) {
            Some(delta) => &w0 + delta,
            None => w0.clone(),
        };
        assert!(max_diff(&w1, &want) <= 1e-6, "{name}: merged differs from W + s B A");
        assert!(max_diff(&w2, &w0) <= 1e-5, "{name}: unmerge does not return the base");
    }
    // same files as the base, nothing of the adapter
    let mut files: Vec<String> = std::fs::read_dir(out.path().join("m"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["config.json", "model.safetensors"]);
}

#[test]
fn convert_round_trips_keep_every_delta() {
    let dir = demo();
    let out = tmp();
    let base = dir.join("base");
    let peft = dir.join("adapter");
    ok(&["convert", s(&peft), "--to", "kohya", "--out", s(&out.path().join("k.safetensors"))]);
    ok(&[
        "convert",
        s(&out.path().join("k.safetensors")),
        "--to",
        "peft",
        "--base",
        s(&base),
        "--out",
        s(&out.path().join("p")),
    ]);
    ok(&["convert", s(&peft), "--to", "gguf", "--base", s(&base), "--out", s(&out.path().join("a.gguf"))]);
    ok(&[
        "convert",
        s(&out.path().join("a.gguf")),
        "--to",
        "peft",
        "--base",
        s(&base),
        "--out",
        s(&out.path().join("g")),
    ]);
    let want = deltas(&read(&peft));
    for round in ["p", "g"] {
        let got = deltas(&read(&out.path().join(round)));
        assert_eq!(got.len(), want.len());
        for (name, d) in &want {
            assert!(max_diff(&got[name], d) <= 1e-6, "{round}: {name} changed");
        }
    }
}

#[test]
fn resize_and_combine_agree_with_the_library() {
    let dir = demo();
    let out = tmp();
    let adapter = read(&dir.join("adapter"));
    ok(&["resize", s(&dir.join("adapter")), "--rank", "3", "--out", s(&out.path().join("r"))]);
    let resized = read(&out.path().join("r"));
    let rule = lora_svd::RankRule::fixed(3).unwrap();
    for (name, m) in adapter.modules() {
        let (want, _) = lora_svd::resize(m.layer(), &rule).unwrap();
        assert!(max_diff(&resized.module(name).unwrap().layer().delta(), &want.delta()) <= 1e-6, "{name}");
    }

    let a = s(&dir.join("adapter")).to_string();
    let b = s(&dir.join("adapter-r8")).to_string();
    ok(&[
        "combine",
        &format!("{a}:0.25"),
        &format!("{b}:0.75"),
        "--method",
        "svd",
        "--rank",
        "5",
        "--out",
        s(&out.path().join("c")),
    ]);
    let combined = read(&out.path().join("c"));
    let other = read(&dir.join("adapter-r8"));
    let (want, _) = lora_svd::combine_adapters(
        &[&adapter, &other],
        &[0.25, 0.75],
        &lora_svd::CombineMethod::Svd(Some(lora_svd::RankRule::fixed(5).unwrap())),
    )
    .unwrap();
    for (name, m) in want.modules() {
        assert!(max_diff(&combined.module(name).unwrap().layer().delta(), &m.layer().delta()) <= 1e-6, "{name}");
    }
    ok(&["combine", &a, &a, "--method", "cat", "--out", s(&out.path().join("cat"))]);
    let cat = read(&out.path().join("cat"));
    for (name, m) in adapter.modules() {
        let twice = m.layer().delta() * 2.0;
        assert!(max_diff(&cat.module(name).unwrap().layer().delta(), &twice) <= 1e-5, "{name}");
        assert_eq!(cat.module(name).unwrap().layer().rank(), 2 * m.layer().rank());
    }
}

#[test]
fn inspect_reports_adapters_and_models() {
    let dir = demo();
    let report = json(&["inspect", s(&dir.join("adapter")), "--json"]);
    assert_eq!(report["format"], "peft");
    assert_eq!(report["modules"].as_array().unwrap().len(), 14);
    assert_eq!(report["problems"].as_array().unwrap().len(), 0);
    let text = ok(&["inspect", s(&dir.join("adapter.gguf"))]);
    assert!(text.contains("gguf adapter"), "{text}");
    let model = json(&["inspect", s(&dir.join("base")), "--json"]);
    assert_eq!(model["kind"], "model");
    assert_eq!(model["model_type"], "llama");
}

#[test]
fn errors_name_the_file_and_leave_no_output() {
    let dir = demo();
    let out = tmp();
    let target = out.path().join("never");

    fails(
        &["merge", "--base", s(&dir.join("base")), "--adapter", "/no/such/adapter", "--out", s(&target)],
        &["/no/such/adapter"],
    );
    assert!(!target.exists());

    // an existing output is refused without --force and left as it was
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("keep"), b"x").unwrap();
    fails(&["convert", s(&dir.join("adapter")), "--to", "kohya", "--out", s(&target)], &["exists", "--force"]);
    assert!(target.join("keep").exists());
    std::fs::remove_dir_all(&target).unwrap();

    // a truncated adapter file
    let bad = out.path().join("bad.safetensors");
    let bytes = std::fs::read(dir.join("adapter-kohya.safetensors")).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    fails(&["convert", s(&bad), "--to", "peft", "--out", s(&target)], &["bad.safetensors"]);
    assert!(!target.exists());

    // a header length past the end of the file
    std::fs::write(&bad, [0xff, 0xff, 0xff, 0x00, 0, 0, 0, 0, b'{', b'}']).unwrap();
    fails(&["inspect", s(&bad)], &["bad.safetensors"]);

    // a refused conversion (DoRA has no GGUF form) names the output asked for, not the staged one
    let gguf = out.path().join("dora.gguf");
    let dora = fixtures().join("peft/dora");
    let (adapter, base) = (dora.join("adapter"), dora.join("base"));
    let err =
        fails(&["convert", s(&adapter), "--to", "gguf", "--base", s(&base), "--out", s(&gguf)], &["dora.gguf", "DoRA"]);
    assert!(!err.contains("lora-tmp"), "the error names the staged output: {err}");
    assert!(!gguf.exists());

    // an adapter for another model: the shape error names the tensor
    let small = out.path().join("small");
    ok(&["demo", "--out", s(&small), "--hidden", "32", "--rank", "2", "--layers", "1", "--train-steps", "0"]);
    fails(
        &["merge", "--base", s(&dir.join("base")), "--adapter", s(&small.join("adapter")), "--out", s(&target)],
        &["model.layers.0.self_attn.q_proj"],
    );
    assert!(!target.exists());
    let leftovers: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary outputs left behind: {leftovers:?}");
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn eval_equals_transformers_loss_and_the_library_with_an_adapter() {
    let train = fixtures().join("train");
    let model = train.join("llama/model");
    let data = train.join("eval.txt");
    let report = json(&["eval", "--base", s(&model), "--data", s(&data), "--seq-len", "16", "--batch", "5", "--json"]);
    let reference = lora_io::SafetensorsFile::open(train.join("llama/reference.safetensors")).unwrap();
    let want = reference.tensor_f64("eval_bytes_loss").unwrap().iter().copied().next().unwrap();
    let loss = report["loss"].as_f64().unwrap();
    assert!((loss - want).abs() / want < 1e-4, "lora eval loss {loss}, transformers {want}");
    assert_eq!(report["tokenization"], "bytes");
    assert!((report["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9);

    let adapted = json(&[
        "eval",
        "--base",
        s(&model),
        "--adapter",
        s(&train.join("llama/adapter")),
        "--data",
        s(&data),
        "--seq-len",
        "16",
        "--json",
    ]);
    let mut m = lora_train::Model::<f32>::from_dir(&model).unwrap();
    m.load_adapter(&lora_io::read_peft::<f32>(train.join("llama/adapter")).unwrap()).unwrap();
    let ids: Vec<u32> = std::fs::read(&data).unwrap().into_iter().map(u32::from).collect();
    let want = lora_train::eval::evaluate(&m, &ids, 16, 8).unwrap();
    assert!((adapted["loss"].as_f64().unwrap() - want.loss).abs() <= 1e-6 * want.loss, "{adapted} vs {want:?}");
    assert_ne!(adapted["loss"], report["loss"], "the adapter changes the loss");

    fails(&["eval", "--base", s(&model), "--data", "/no/such/file.txt"], &["/no/such/file.txt"]);
}

/// Largest |a - b| over every tensor of two models with the same names.
fn max_model_diff(a: &Path, b: &Path) -> f32 {
    use lora_core::TensorSource;
    let (a, b) = (lora_io::ModelFolder::open(a).unwrap(), lora_io::ModelFolder::open(b).unwrap());
    let mut names = a.tensor_names();
    names.sort();
    let mut other = b.tensor_names();
    other.sort();
    assert_eq!(names, other, "the two models hold different tensors");
    names.iter().fold(0.0f32, |m, n| {
        let (x, y) = (a.read_f32(n).unwrap(), b.read_f32(n).unwrap());
        x.iter().zip(y.iter()).fold(m, |m, (p, q)| m.max((p - q).abs()))
    })
}

#[test]
fn merge_and_extract_agree_with_peft_on_its_fixtures() {
    let out = tmp();
    // plain: a sharded base; dora: magnitudes; gpt2_fifo: Conv1D weights (fan_in_fan_out);
    // embed_save: an embedding LoRA and a modules_to_save lm_head
    for case in ["plain", "dora", "gpt2_fifo", "rslora", "patterns", "embed_save"] {
        let dir = fixtures().join("peft").join(case);
        let merged = out.path().join(format!("{case}-merged"));
        ok(&[
            "merge",
            "--base",
            s(&dir.join("base")),
            "--adapter",
            s(&dir.join("adapter")),
            "--out",
            s(&merged),
            "--quiet",
        ]);
        let diff = max_model_diff(&merged, &dir.join("merged"));
        assert!(diff <= 1e-5, "{case}: lora merge differs from PEFT's merge_and_unload by {diff:e}");
        if case == "plain" {
            let shards = std::fs::read_dir(&merged)
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("model-"))
                .count();
            assert_eq!(shards, 3, "the base's sharding is kept");
        }
    }
    // extract from (base, PEFT-merged) at the adapter's rank: the merge reproduces PEFT's
    for (case, rank) in [("plain", "8"), ("gpt2_fifo", "4")] {
        let dir = fixtures().join("peft").join(case);
        let adapter = out.path().join(format!("{case}-extracted"));
        let summary = json(&[
            "extract",
            "--base",
            s(&dir.join("base")),
            "--tuned",
            s(&dir.join("merged")),
            "--rank",
            rank,
            "--method",
            "exact",
            "--out",
            s(&adapter),
            "--json",
        ]);
        assert_eq!(summary["fan_in_fan_out"], case == "gpt2_fifo");
        let remerged = out.path().join(format!("{case}-remerged"));
        ok(&["merge", "--base", s(&dir.join("base")), "--adapter", s(&adapter), "--out", s(&remerged)]);
        let diff = max_model_diff(&remerged, &dir.join("merged"));
        assert!(diff <= 1e-4, "{case}: extract + merge differs from PEFT's merged model by {diff:e}");
    }
}

#[test]
fn train_writes_a_peft_adapter_and_resumes_exactly() {
    let dir = demo();
    let out = tmp();
    let (base, data) = (dir.join("tiny-llama"), dir.join("addition.jsonl"));
    // a constant schedule, so that a 3-step run is the first half of a 6-step one
    let common = [
        "--rank",
        "2",
        "--batch",
        "2",
        "--seq-len",
        "32",
        "--lr",
        "1e-2",
        "--schedule",
        "constant",
        "--threads",
        "1",
        "--quiet",
    ];
    let full = out.path().join("full");
    let mut args = vec!["train", "--base", s(&base), "--data", s(&data), "--out", s(&full), "--steps", "6", "--json"];
    args.extend(common);
    let summary = json(&args);
    assert_eq!(summary["steps"], 6);
    let metrics = std::fs::read_to_string(full.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 6);
    let adapter = lora_io::read_peft::<f32>(&full).unwrap();
    assert_eq!(adapter.len(), 14, "all-linear on 2 layers");

    // stopped after 3 steps (a checkpoint), resumed to 6: the same adapter
    let split = out.path().join("split");
    let mut first =
        vec!["train", "--base", s(&base), "--data", s(&data), "--out", s(&split), "--steps", "3", "--save-every", "3"];
    first.extend(common);
    ok(&first);
    let mut second =
        vec!["train", "--base", s(&base), "--data", s(&data), "--out", s(&split), "--steps", "6", "--resume"];
    second.extend(common);
    ok(&second);
    let resumed = lora_io::read_peft::<f32>(&split).unwrap();
    for (name, m) in adapter.modules() {
        let r = resumed.module(name).unwrap().layer();
        assert!(
            max_diff(r.a(), m.layer().a()) <= 1e-6 && max_diff(r.b(), m.layer().b()) <= 1e-6,
            "{name} differs after resume"
        );
    }
    fails(
        &["train", "--base", s(&base), "--data", "/no/such/data.jsonl", "--out", s(&out.path().join("x"))],
        &["/no/such/data.jsonl"],
    );
}
