//! Faults and bad numbers, tried on the `lora` binary: runs killed (SIGKILL) while they write, a
//! full disk, unwritable folders, outputs that exist, two runs racing for one output, NaN and
//! infinities in inputs, values too large for f16, zero and denormal deltas. Each test is a row
//! of docs/reliability.md; `reliability_table_names_tests_that_exist` keeps the table and the
//! tests in step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use lora_core::{Adapter, AdapterConfig, AdapterModule, DType, Init, LoraLayer, Scaling, TargetModules};
use ndarray::{Array2, ArrayD};

mod support;

use support::{failed, fails, json, lora, ok, s, tmp};

// ---------------------------------------------------------------------------------------------
// Models made once per run

/// Size of the square projections of the big model: 8 of them in f32 make 18.9 MB, enough for a
/// merge to take a while to write, small enough for CI.
const D: usize = 768;
/// Rank of the big adapter (6.3 MB in f32).
const R: usize = 128;

fn names(layers: usize) -> Vec<String> {
    (0..layers).flat_map(|l| ["q_proj", "v_proj"].map(|p| format!("model.layers.{l}.self_attn.{p}.weight"))).collect()
}

/// Deterministic values in (-scale, scale) (xorshift; no RNG state shared between tests).
fn noise(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

fn matrix(seed: u64, rows: usize, cols: usize, scale: f32) -> Array2<f32> {
    Array2::from_shape_vec((rows, cols), noise(seed, rows * cols, scale)).expect("shape")
}

/// A model folder: config.json and model.safetensors holding `tensors` in f32.
fn write_model(dir: &Path, tensors: &[(String, ArrayD<f32>)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}"#)
        .unwrap();
    lora_io::write_safetensors(dir.join("model.safetensors"), tensors, DType::F32, &BTreeMap::new()).unwrap();
}

/// base/ and tuned/ (tuned = base + a rank-4 delta on every projection) of `layers` layers of
/// d x d projections and a norm, and a PEFT adapter/ of rank `r` on every projection.
fn write_models(root: &Path, layers: usize, d: usize, r: usize) {
    let mut base = Vec::new();
    let mut tuned = Vec::new();
    for (i, name) in names(layers).iter().enumerate() {
        let i = i as u64;
        let w = matrix(1 + i, d, d, 0.02);
        let delta = matrix(100 + i, d, 4, 0.1).dot(&matrix(200 + i, 4, d, 0.1));
        tuned.push((name.clone(), (&w + &delta).into_dyn()));
        base.push((name.clone(), w.into_dyn()));
    }
    let norm = ArrayD::from_elem(vec![d], 1.0f32);
    base.push(("model.norm.weight".to_string(), norm.clone()));
    tuned.push(("model.norm.weight".to_string(), norm));
    write_model(&root.join("base"), &base);
    write_model(&root.join("tuned"), &tuned);
    let targets = TargetModules::List(vec!["q_proj".into(), "v_proj".into()]);
    let mut adapter = Adapter::<f32>::new(AdapterConfig::new(r, r as f64, targets));
    for (i, name) in names(layers).iter().enumerate() {
        let layer =
            LoraLayer::init(d, d, r, r as f64, Scaling::Standard, Init::Random { b_std: 0.01 }, i as u64).unwrap();
        adapter.insert(name.trim_end_matches(".weight"), AdapterModule::linear(layer)).unwrap();
    }
    lora_io::write_peft(&adapter, root.join("adapter"), &lora_io::PeftWriteOptions::default()).unwrap();
}

/// The big models (4 layers of 768 x 768, adapter of rank 128), made once per run.
fn big() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tmp();
        write_models(dir.path(), 4, D, R);
        dir
    })
    .path()
}

/// Small models (2 layers of 64 x 64, adapter of rank 8) for the tests of numbers.
fn small(root: &Path) -> PathBuf {
    let dir = root.join("small");
    write_models(&dir, 2, 64, 8);
    dir
}

// ---------------------------------------------------------------------------------------------
// The commands tried, as functions of the output path

fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

fn merge(out: &Path, extra: &[&str]) -> Vec<String> {
    let m = big();
    let mut a = args(&["merge", "--base", s(&m.join("base")), "--adapter", s(&m.join("adapter"))]);
    a.extend(args(&["--out", s(out), "--threads", "1", "--quiet"]));
    a.extend(args(extra));
    a
}

fn extract(out: &Path, extra: &[&str]) -> Vec<String> {
    let m = big();
    let mut a = args(&["extract", "--base", s(&m.join("base")), "--tuned", s(&m.join("tuned"))]);
    a.extend(args(&["--out", s(out), "--rank", "32", "--method", "randomized", "--threads", "1", "--quiet"]));
    a.extend(args(extra));
    a
}

fn convert(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = args(&["convert", s(&big().join("adapter")), "--to", "kohya", "--out", s(out)]);
    a.extend(args(extra));
    a
}

type Cmd = fn(&Path, &[&str]) -> Vec<String>;

/// (name, command, output name, flags that make another valid output)
const COMMANDS: [(&str, Cmd, &str, &[&str]); 3] = [
    ("merge", merge, "merged", &["--scale", "0.5"]),
    ("extract", extract, "adapter", &["--seed", "1"]),
    ("convert", convert, "adapter.safetensors", &["--dtype", "bf16"]),
];

// ---------------------------------------------------------------------------------------------
// Files on disk

/// Every file under `path` (or `path` itself) by relative path, with its bytes; `None` when
/// nothing is there.
fn snapshot(path: &Path) -> Option<BTreeMap<PathBuf, Vec<u8>>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    let meta = std::fs::symlink_metadata(path).ok()?;
    let mut out = BTreeMap::new();
    if meta.is_dir() {
        walk(path, path, &mut out);
    } else {
        out.insert(PathBuf::new(), std::fs::read(path).unwrap());
    }
    Some(out)
}

fn copy(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let _ = std::fs::remove_file(to);
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let p = entry.unwrap().path();
            copy(&p, &to.join(p.file_name().unwrap()));
        }
    } else {
        std::fs::copy(from, to).unwrap();
    }
}

/// Entries beside `out` that a run writing `out` stages or leaves (`.NAME.lora-*`, `..NAME.lora-*`).
fn leftovers(out: &Path) -> Vec<String> {
    let name = out.file_name().unwrap().to_string_lossy().to_string();
    std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.') && n.contains(&format!("{name}.lora-")))
        .collect()
}

/// True when process `pid` is staging `out` (`.NAME.lora-tmp-PID`, `..NAME.lora-tmp-PID.*.tmp`).
fn staged_by(out: &Path, pid: u32) -> bool {
    let tag = format!("{}.lora-tmp-{pid}", out.file_name().unwrap().to_string_lossy());
    leftovers(out).iter().any(|n| n.contains(&tag))
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into())
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// Killing runs

/// When to kill a run.
#[derive(Debug, Clone, Copy)]
enum When {
    /// This many milliseconds after it started.
    AfterStart(u64),
    /// This many milliseconds after its staged output appeared (or it ended).
    AfterStaging(u64),
}

fn spawn(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lora"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the lora binary starts")
}

/// Start `args`, SIGKILL it at `when`; true when it was staging its output at the kill.
/// `staging(pid, started)` tells whether process `pid`, started at `started`, is staging.
fn run_and_kill(args: &[String], when: When, staging: impl Fn(u32, SystemTime) -> bool) -> bool {
    let started = SystemTime::now();
    let mut child = spawn(args);
    let pid = child.id();
    let staging = || staging(pid, started);
    let start = Instant::now();
    let delay = match when {
        When::AfterStart(ms) => ms,
        When::AfterStaging(ms) => {
            while !staging() && child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_micros(200));
            }
            ms
        }
    };
    std::thread::sleep(Duration::from_millis(delay));
    let was_staging = staging();
    let _ = child.kill(); // SIGKILL on unix; an error only when it has ended already
    child.wait().unwrap();
    was_staging
}

const KILLS: [When; 6] = [
    When::AfterStart(0),
    When::AfterStart(40),
    When::AfterStaging(0),
    When::AfterStaging(2),
    When::AfterStaging(10),
    When::AfterStaging(40),
];

#[test]
fn killed_runs_leave_no_output_or_a_complete_one() {
    for (cmd, run, out_name, _) in COMMANDS {
        let dir = tmp();
        let reference = dir.path().join(format!("reference-{out_name}"));
        ok(&run(&reference, &[]));
        let expected = snapshot(&reference).unwrap();
        let out = dir.path().join(out_name);
        let mut caught = 0;
        for when in KILLS {
            caught += usize::from(run_and_kill(&run(&out, &[]), when, |pid, _| staged_by(&out, pid)));
            if let Some(found) = snapshot(&out) {
                assert!(found == expected, "{cmd} killed at {when:?} left an output that is not the complete one");
                std::fs::remove_dir_all(&out).or_else(|_| std::fs::remove_file(&out)).unwrap();
            }
        }
        eprintln!("{cmd}: {caught} of {} kills landed while the output was staged", KILLS.len());
        assert!(caught > 0, "{cmd}: no kill landed while the output was being written");
        // What the killed runs left does not stop the next run, which removes it.
        ok(&run(&out, &[]));
        assert!(snapshot(&out).unwrap() == expected, "{cmd} after killed runs wrote another output");
        assert_eq!(leftovers(&out), Vec::<String>::new(), "{cmd}: files of killed runs are left");
    }
}

#[test]
fn killed_forced_runs_keep_the_previous_output_whole() {
    for (cmd, run, out_name, other) in COMMANDS {
        let dir = tmp();
        let (old_ref, new_ref) =
            (dir.path().join(format!("old-{out_name}")), dir.path().join(format!("new-{out_name}")));
        ok(&run(&old_ref, other));
        ok(&run(&new_ref, &[]));
        let (old, new) = (snapshot(&old_ref).unwrap(), snapshot(&new_ref).unwrap());
        assert!(old != new, "{cmd}: the two versions must differ for this test to mean anything");
        let out = dir.path().join(out_name);
        let mut caught = 0;
        for when in KILLS {
            copy(&old_ref, &out);
            caught += usize::from(run_and_kill(&run(&out, &["--force"]), when, |pid, _| staged_by(&out, pid)));
            let found = snapshot(&out).unwrap_or_else(|| panic!("{cmd} --force killed at {when:?} left no output"));
            assert!(found == old || found == new, "{cmd} --force killed at {when:?} left a mix of versions");
        }
        eprintln!("{cmd}: {caught} of {} kills landed while the output was staged", KILLS.len());
        assert!(caught > 0, "{cmd}: no kill landed while the output was being written");
        ok(&run(&out, &["--force"]));
        assert!(snapshot(&out).unwrap() == new, "{cmd} --force after killed runs");
        assert_eq!(leftovers(&out), Vec::<String>::new(), "{cmd}: files of killed runs are left");
    }
}

/// A tiny Llama folder and addition data for `lora train`.
fn train_inputs(root: &Path) -> (PathBuf, PathBuf) {
    use lora_train::synthetic::{generate, to_jsonl, write_tiny_model, Task, TinyModelSpec};
    let model = root.join("tiny-llama");
    write_tiny_model(&model, &TinyModelSpec::default()).unwrap();
    let data = root.join("addition.jsonl");
    std::fs::write(&data, to_jsonl(&generate(Task::Addition { digits: 2 }, 200, 0))).unwrap();
    (model, data)
}

fn train(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = args(&["train", "--base", s(model), "--data", s(data), "--out", s(out)]);
    if !extra.contains(&"--steps") {
        a.extend(args(&["--steps", "30"]));
    }
    a.extend(args(&["--save-every", "1", "--rank", "16", "--batch", "2", "--seq-len", "32", "--threads", "1"]));
    a.extend(args(&["--schedule", "constant", "--quiet"]));
    a.extend(args(extra));
    a
}

fn checkpoints(run: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(run).map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_default();
    v.retain(|p| p.file_name().unwrap().to_string_lossy().starts_with("checkpoint-"));
    v
}

fn staged_checkpoints(run: &Path) -> Vec<String> {
    std::fs::read_dir(run)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().to_string()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.starts_with(".checkpoint-"))
        .collect()
}

#[test]
fn killed_training_leaves_whole_checkpoints_and_resumes() {
    let dir = tmp();
    let (model, data) = train_inputs(dir.path());
    let run = dir.path().join("run");
    let mut caught = 0;
    for when in [When::AfterStaging(0), When::AfterStaging(3), When::AfterStaging(15), When::AfterStart(300)] {
        let resume: &[&str] = if checkpoints(&run).is_empty() { &["--force"] } else { &["--resume"] };
        caught += usize::from(run_and_kill(&train(&model, &data, &run, resume), when, |_, started| {
            staged_checkpoints(&run).iter().any(|n| {
                let modified = std::fs::metadata(run.join(n)).and_then(|m| m.modified());
                modified.is_ok_and(|t| t >= started)
            })
        }));
        for c in checkpoints(&run) {
            lora_io::read_peft::<f32>(&c).unwrap_or_else(|e| panic!("{c:?} after a kill at {when:?}: {e}"));
            lora_io::SafetensorsFile::open(c.join("optimizer.safetensors")).unwrap();
            let state: serde_json::Value =
                serde_json::from_slice(&std::fs::read(c.join("trainer_state.json")).unwrap()).unwrap();
            assert!(state["step"].as_u64().is_some(), "{c:?}: trainer_state.json without a step");
        }
    }
    eprintln!("train: {caught} of 4 kills landed while a checkpoint was staged");
    assert!(caught > 0, "no kill landed while a checkpoint was being written");
    let resume: &[&str] = if checkpoints(&run).is_empty() { &["--force"] } else { &["--resume"] };
    ok(&train(&model, &data, &run, resume));
    assert!(run.join("adapter_config.json").exists() && run.join("checkpoint-30").exists());
    assert_eq!(staged_checkpoints(&run), Vec::<String>::new(), "staged checkpoints of killed runs are left");
}

// ---------------------------------------------------------------------------------------------
// Full disks, unwritable folders

/// A tmpfs mounted for a test, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    /// A tmpfs of `options` at a new folder under `root`, or `None` where this process may not
    /// mount (not root, a container without CAP_SYS_ADMIN).
    fn tmpfs(root: &Path, options: &str) -> Option<Mount> {
        let at = root.join(format!("mnt-{}", options.replace([',', '='], "-")));
        std::fs::create_dir_all(&at).ok()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs", s(&at)])
            .stderr(Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(Mount(at))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_a_clear_error_and_leaves_nothing() {
    let dir = tmp();
    let Some(mnt) = Mount::tmpfs(dir.path(), "size=1m") else {
        eprintln!("no tmpfs here (mount not allowed): injected_write_errors_leave_nothing covers the full disk");
        return;
    };
    for (cmd, run, out_name, _) in COMMANDS {
        let out = mnt.0.join(out_name);
        let err = fails(&run(&out, &[]), &["No space left on device", out_name]);
        assert!(err.contains(&format!("cannot write {}", out.display())), "{cmd}: {err}");
        assert_eq!(entries(&mnt.0), Vec::<String>::new(), "{cmd} left files on the full disk");
    }
}

#[test]
fn injected_write_errors_leave_nothing() {
    if !cfg!(debug_assertions) {
        eprintln!("release build: LORA_IO_FAIL_AFTER_BYTES is honoured by debug builds only");
        return;
    }
    let dir = tmp();
    for (cmd, run, out_name, _) in COMMANDS {
        let out = dir.path().join(out_name);
        let output = Command::new(env!("CARGO_BIN_EXE_lora"))
            .args(run(&out, &[]))
            .env("LORA_IO_FAIL_AFTER_BYTES", "300000")
            .output()
            .unwrap();
        failed(cmd, &output, &["no space left on device", out_name]);
        assert_eq!(entries(dir.path()), Vec::<String>::new(), "{cmd} left files after a failed write");
    }
    // a checkpoint that cannot be written: an error, no checkpoint, no staged folder
    let (model, data) = train_inputs(dir.path());
    let run = dir.path().join("run");
    let output = Command::new(env!("CARGO_BIN_EXE_lora"))
        .args(train(&model, &data, &run, &[]))
        .env("LORA_IO_FAIL_AFTER_BYTES", "20000")
        .output()
        .unwrap();
    failed("train", &output, &["no space left on device", "checkpoint-1"]);
    assert!(checkpoints(&run).is_empty() && staged_checkpoints(&run).is_empty(), "{:?}", entries(&run));
}

#[test]
fn unwritable_output_folders_are_clear_errors() {
    let dir = tmp();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a folder").unwrap();
    for (cmd, run, out_name, _) in COMMANDS {
        fails(&run(&file.join(out_name), &[]), &["a-file", "not a folder"]);
        assert_eq!(entries(dir.path()), vec!["a-file".to_string()], "{cmd}");
    }
    let (model, data) = train_inputs(&dir.path().join("inputs"));
    fails(&train(&model, &data, &file.join("run"), &[]), &["a-file"]);
    // root ignores permission bits, but not a read-only file system
    if let Some(ro) = Mount::tmpfs(dir.path(), "ro,size=1m") {
        for (cmd, run, out_name, _) in COMMANDS {
            fails(&run(&ro.0.join(out_name), &[]), &["Read-only file system", out_name]);
            assert_eq!(entries(&ro.0), Vec::<String>::new(), "{cmd}");
        }
        fails(&train(&model, &data, &ro.0.join("run"), &[]), &["Read-only file system"]);
    }
}

// ---------------------------------------------------------------------------------------------
// Existing outputs, concurrent runs

#[test]
fn an_existing_output_is_refused_without_force() {
    for (cmd, run, out_name, other) in COMMANDS {
        let dir = tmp();
        let out = dir.path().join(out_name);
        ok(&run(&out, other));
        let before = snapshot(&out).unwrap();
        fails(&run(&out, &[]), &["exists", "--force"]);
        assert!(snapshot(&out).unwrap() == before, "{cmd} changed an output it refused to replace");
        ok(&run(&out, &["--force"]));
        assert!(snapshot(&out).unwrap() != before, "{cmd} --force did not replace the output");
        assert_eq!(leftovers(&out), Vec::<String>::new(), "{cmd}");
    }
    // train: a folder holding an earlier run needs --resume or --force
    let dir = tmp();
    let (model, data) = train_inputs(dir.path());
    let run = dir.path().join("run");
    let short = ["--steps", "2"];
    ok(&train(&model, &data, &run, &short));
    let before = snapshot(&run).unwrap();
    fails(&train(&model, &data, &run, &short), &["holds an earlier run", "checkpoint-1", "--resume", "--force"]);
    assert!(snapshot(&run).unwrap() == before, "train changed the folder of the run it refused to replace");
    ok(&train(&model, &data, &run, &["--steps", "1", "--force"]));
    assert!(run.join("checkpoint-1").exists() && !run.join("checkpoint-2").exists(), "--force starts over");
}

#[test]
fn two_runs_writing_one_output_leave_one_complete_output() {
    for (cmd, run, out_name, other) in COMMANDS {
        let dir = tmp();
        let (ref_a, ref_b) = (dir.path().join(format!("a-{out_name}")), dir.path().join(format!("b-{out_name}")));
        ok(&run(&ref_a, &[]));
        ok(&run(&ref_b, other));
        let (a, b) = (snapshot(&ref_a).unwrap(), snapshot(&ref_b).unwrap());
        let out = dir.path().join(out_name);
        for force in [false, true] {
            let flags: Vec<&str> = if force { vec!["--force"] } else { vec![] };
            let mut other_flags = other.to_vec();
            other_flags.extend(&flags);
            let runs = [run(&out, &flags), run(&out, &other_flags)];
            let children: Vec<_> = runs
                .iter()
                .map(|r| {
                    Command::new(env!("CARGO_BIN_EXE_lora"))
                        .args(r)
                        .stdout(Stdio::null())
                        .stderr(Stdio::piped())
                        .spawn()
                        .unwrap()
                })
                .collect();
            let outputs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
            let succeeded = outputs.iter().filter(|o| o.status.success()).count();
            for o in outputs.iter().filter(|o| !o.status.success()) {
                assert!(!force, "{cmd} --force: both runs must succeed:\n{}", String::from_utf8_lossy(&o.stderr));
                failed(cmd, o, &["exists", "--force"]);
            }
            // without --force exactly one run may publish the output; with it, both do
            assert_eq!(succeeded, if force { 2 } else { 1 }, "{cmd} (force {force}): runs that succeeded");
            let found = snapshot(&out).unwrap();
            assert!(found == a || found == b, "{cmd} (force {force}): two runs left a mix");
            assert_eq!(leftovers(&out), Vec::<String>::new(), "{cmd}");
            std::fs::remove_dir_all(&out).or_else(|_| std::fs::remove_file(&out)).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Numbers

/// Rewrite one tensor of a model's model.safetensors with `edit`.
fn edit_tensor(model: &Path, name: &str, edit: impl Fn(&mut ArrayD<f32>)) {
    let file = lora_io::SafetensorsFile::open(model.join("model.safetensors")).unwrap();
    let mut tensors: Vec<(String, ArrayD<f32>)> =
        file.names().map(|n| (n.to_string(), file.tensor_f32(n).unwrap())).collect();
    drop(file);
    for (n, t) in &mut tensors {
        if n == name {
            edit(t);
        }
    }
    lora_io::write_safetensors(model.join("model.safetensors"), &tensors, DType::F32, &BTreeMap::new()).unwrap();
}

const Q0: &str = "model.layers.0.self_attn.q_proj.weight";

#[test]
fn nonfinite_inputs_are_errors_naming_the_file_and_tensor() {
    let dir = tmp();
    let m = small(dir.path());
    let (base, tuned, adapter) = (m.join("base"), m.join("tuned"), m.join("adapter"));
    let out = dir.path().join("out");

    // merge: NaN in a merged weight, inf in a copied one; --allow-nonfinite warns
    edit_tensor(&base, Q0, |t| t[[3, 5]] = f32::NAN);
    let merge = |extra: &[&str]| {
        let mut a = args(&["merge", "--base", s(&base), "--adapter", s(&adapter), "--out", s(&out)]);
        a.extend(args(extra));
        a
    };
    fails(&merge(&[]), &["base/model.safetensors", Q0, "NaN at index [3, 5]", "--allow-nonfinite"]);
    assert!(!out.exists());
    let warned = lora(&merge(&["--allow-nonfinite"]));
    assert!(warned.status.success());
    let stderr = String::from_utf8_lossy(&warned.stderr);
    assert!(stderr.contains("warning") && stderr.contains(Q0), "{stderr}");
    std::fs::remove_dir_all(&out).unwrap();
    edit_tensor(&base, Q0, |t| t[[3, 5]] = 0.0);
    edit_tensor(&base, "model.norm.weight", |t| t[[7]] = f32::NEG_INFINITY);
    fails(&merge(&[]), &["model.norm.weight", "-inf at index [7]"]);
    assert!(!out.exists());

    // extract: every tensor of both models is checked, factored or not
    let extract = |extra: &[&str]| {
        let mut a = args(&["extract", "--base", s(&base), "--tuned", s(&tuned), "--out", s(&out), "--rank", "2"]);
        a.extend(args(&["--threads", "1"]));
        a.extend(args(extra));
        a
    };
    fails(&extract(&[]), &["base/model.safetensors", "model.norm.weight", "-inf"]);
    ok(&extract(&["--allow-nonfinite"]));
    std::fs::remove_dir_all(&out).unwrap();
    edit_tensor(&base, "model.norm.weight", |t| t[[7]] = 1.0);
    edit_tensor(&tuned, Q0, |t| t[[1, 2]] = f32::INFINITY);
    fails(&extract(&[]), &["tuned/model.safetensors", Q0, "inf at index [1, 2]"]);
    // a factored tensor with a non-finite difference fails even with --allow-nonfinite
    let run = lora(&extract(&["--allow-nonfinite"]));
    let stderr = String::from_utf8_lossy(&run.stderr);
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked") && lines.len() == 2, "a warning, then the error:\n{stderr}");
    assert!(lines[0].starts_with("warning: ") && lines[0].contains("tuned/model.safetensors"), "{stderr}");
    assert!(lines[1].starts_with("error: ") && lines[1].contains(Q0) && lines[1].contains("non-finite"), "{stderr}");
    assert!(!out.exists());

    // adapters: a non-finite factor is refused by every command that reads it
    let bad = dir.path().join("bad-adapter");
    copy(&adapter, &bad);
    let st = bad.join("adapter_model.safetensors");
    let file = lora_io::SafetensorsFile::open(&st).unwrap();
    let mut tensors: Vec<(String, ArrayD<f32>)> =
        file.names().map(|n| (n.to_string(), file.tensor_f32(n).unwrap())).collect();
    drop(file);
    let b_name = tensors.iter().map(|(n, _)| n.clone()).find(|n| n.contains("lora_B")).unwrap();
    tensors.iter_mut().filter(|(n, _)| *n == b_name).for_each(|(_, t)| t[[0, 0]] = f32::NAN);
    lora_io::write_safetensors(&st, &tensors, DType::F32, &BTreeMap::new()).unwrap();
    let module = b_name.trim_start_matches("base_model.model.").split(".lora_B").next().unwrap().to_string();
    for cmd in [
        args(&["convert", s(&bad), "--to", "kohya", "--out", s(&out)]),
        args(&["resize", s(&bad), "--rank", "2", "--out", s(&out)]),
        args(&["merge", "--base", s(&m.join("tuned")), "--adapter", s(&bad), "--out", s(&out)]),
        args(&["inspect", s(&bad)]),
    ] {
        fails(&cmd, &["bad-adapter", &module, "non-finite"]);
        assert!(!out.exists());
    }

    // train: a non-finite base weight is refused before training
    let (model, data) = train_inputs(dir.path());
    edit_tensor(&model, "model.layers.0.mlp.up_proj.weight", |t| t[[0, 1]] = f32::NAN);
    fails(&train(&model, &data, &dir.path().join("run"), &[]), &["model.layers.0.mlp.up_proj.weight", "NaN"]);
}

#[test]
fn values_too_large_for_f16_are_errors_naming_the_tensor() {
    let dir = tmp();
    let m = small(dir.path());
    let (base, adapter) = (m.join("base"), m.join("adapter"));
    let out = dir.path().join("out");
    edit_tensor(&base, "model.layers.0.self_attn.v_proj.weight", |t| t[[2, 3]] = 1.0e5);
    let merge = |dtype: &str| {
        args(&["merge", "--base", s(&base), "--adapter", s(&adapter), "--out", s(&out), "--dtype", dtype])
    };
    fails(&merge("f16"), &["model.layers.0.self_attn.v_proj.weight", "F16", "index [2, 3]", "too large"]);
    assert!(!out.exists() && leftovers(&out).is_empty());
    ok(&merge("bf16"));
    std::fs::remove_dir_all(&out).unwrap();

    // an adapter factor past 65504, written as f16 by convert (kohya) and as the default f32
    let big_factor = dir.path().join("big-factor");
    copy(&adapter, &big_factor);
    let st = big_factor.join("adapter_model.safetensors");
    let file = lora_io::SafetensorsFile::open(&st).unwrap();
    let mut tensors: Vec<(String, ArrayD<f32>)> =
        file.names().map(|n| (n.to_string(), file.tensor_f32(n).unwrap())).collect();
    drop(file);
    tensors.iter_mut().filter(|(n, _)| n.contains("lora_A")).take(1).for_each(|(_, t)| t[[1, 1]] = 70000.0);
    lora_io::write_safetensors(&st, &tensors, DType::F32, &BTreeMap::new()).unwrap();
    let kohya = dir.path().join("a.safetensors");
    fails(
        &args(&["convert", s(&big_factor), "--to", "kohya", "--out", s(&kohya), "--dtype", "f16"]),
        &["lora_down", "F16", "70000", "too large"],
    );
    assert!(!kohya.exists() && leftovers(&kohya).is_empty());
    ok(&args(&["convert", s(&big_factor), "--to", "kohya", "--out", s(&kohya)]));
}

#[test]
fn zero_deltas_get_rank_zero_and_subnormal_ones_keep_the_rank_rules() {
    let dir = tmp();
    let m = small(dir.path());
    let (base, tuned) = (m.join("base"), m.join("tuned"));
    // layer 0's q_proj: no change; v_proj: base 0, tuned all subnormal (1e-39 .. 1e-41)
    let q = lora_io::SafetensorsFile::open(base.join("model.safetensors")).unwrap().tensor_f32(Q0).unwrap();
    edit_tensor(&tuned, Q0, |t| t.assign(&q));
    let v0 = "model.layers.0.self_attn.v_proj.weight";
    edit_tensor(&base, v0, |t| t.fill(0.0));
    edit_tensor(&tuned, v0, |t| {
        for (i, x) in t.iter_mut().enumerate() {
            *x = [1.0e-39f32, -3.0e-40, 1.0e-41][i % 3] * (1.0 + (i % 7) as f32);
        }
    });
    let rules: [&[&str]; 5] = [
        &["--rank", "4"],
        &["--energy", "0.9"],
        &["--sv-ratio", "10"],
        &["--sv-epsilon", "0"],
        &["--sv-cumulative", "0.9"],
    ];
    for method in ["exact", "randomized"] {
        for rule in rules.iter().filter(|r| method == "exact" || r[0] != "--sv-cumulative") {
            let what = format!("{method} {rule:?}");
            let out = dir.path().join(format!("out-{method}{}", rule[0]));
            let report = dir.path().join(format!("report-{method}{}.json", rule[0]));
            let mut a = args(&["extract", "--base", s(&base), "--tuned", s(&tuned), "--out", s(&out), "--json"]);
            a.extend(args(&["--method", method, "--report", s(&report)]));
            a.extend(args(rule));
            let summary = json(&a);
            let text = summary.to_string();
            assert!(!text.contains("NaN") && !text.contains("null"), "{what}: {text}");
            // the zero delta: rank 0, reported, not in the adapter
            assert_eq!(summary["zero_rank"], serde_json::json!([Q0]), "{what}: {text}");
            assert_eq!(summary["unchanged"], 1, "{what}");
            let report_text = std::fs::read_to_string(&report).unwrap();
            assert!(!report_text.contains("NaN") && !report_text.contains("null"), "{what}: {report_text}");
            let report: serde_json::Value = serde_json::from_str(&report_text).unwrap();
            let layers: BTreeMap<String, serde_json::Value> = report["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| (l["tensor"].as_str().unwrap().to_string(), l.clone()))
                .collect();
            assert_eq!(layers[Q0]["rank"], 0, "{what}");
            assert_eq!(layers[Q0]["relative_error"], 0.0, "{what}");
            // the subnormal delta: a rank the rule picks, finite figures, finite factors
            let rank = layers[v0]["rank"].as_u64().unwrap();
            assert!((1..=64).contains(&rank), "{what}: rank {rank}");
            if rule[0] == "--rank" {
                assert_eq!(rank, 4, "{what}");
            }
            for key in ["relative_error", "retained_energy"] {
                let v = layers[v0][key].as_f64().unwrap();
                assert!((0.0..=1.0 + 1e-9).contains(&v), "{what}: {key} {v}");
            }
            let adapter = lora_io::read_peft::<f32>(&out).unwrap();
            let layer = adapter.module("model.layers.0.self_attn.v_proj").unwrap().layer();
            assert!(layer.a().iter().chain(layer.b().iter()).all(|x| x.is_finite()), "{what}");
            assert!(adapter.module("model.layers.0.self_attn.q_proj").is_none(), "{what}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The table

/// Every test named in docs/reliability.md's tables (a `` `name` `` in the last column) is a
/// `#[test] fn` somewhere in the workspace.
#[test]
fn reliability_table_names_tests_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let table = std::fs::read_to_string(root.join("docs/reliability.md")).expect("docs/reliability.md");
    let mut sources = String::new();
    fn collect(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = entry.path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if p.is_dir() && !name.starts_with('.') && name != "target" {
                collect(&p, out);
            } else if name.ends_with(".rs") {
                out.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
    }
    for d in ["crates", "tests", "xtask", "fuzz"] {
        collect(&root.join(d), &mut sources);
    }
    let mut named = 0;
    let last_cell =
        |row: &str| row.trim_end().trim_end_matches('|').rsplit('|').next().unwrap_or("").trim().to_string();
    // the tables whose last column is headed "Test" (the fuzzing section's tables have their
    // own check, in tests/it/fuzz_corpus.rs)
    let mut in_test_table = false;
    let mut previous_was_row = false;
    for line in table.lines() {
        let is_row = line.starts_with('|');
        if is_row && !previous_was_row {
            in_test_table = last_cell(line) == "Test";
        }
        previous_was_row = is_row;
        if !is_row
            || !in_test_table
            || line.starts_with("|--")
            || line.starts_with("| ---")
            || last_cell(line) == "Test"
        {
            continue;
        }
        let last = last_cell(line);
        for test in last.split('`').skip(1).step_by(2) {
            let test = test.rsplit("::").next().unwrap();
            named += 1;
            assert!(sources.contains(&format!("fn {test}(")), "docs/reliability.md names {test}, which is no test");
        }
    }
    assert!(named >= 10, "docs/reliability.md names only {named} tests");
}
