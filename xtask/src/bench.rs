//! `cargo xtask bench [--compare] [--mkl] [--python P] [--only PREFIX] [--small]`: run the
//! criterion benches and rewrite the generated blocks of docs/benchmarks.md from criterion's
//! estimates; with `--compare`, run the reference scripts (PyTorch, PEFT) in the same session and
//! put their output beside, with the ratios.
//!
//! `--mkl` also runs the benches marked [`Blas::Mkl`] with Intel's oneMKL as the BLAS (the one
//! PyTorch's wheels use), put in front of the linked OpenBLAS with `LD_PRELOAD` through cargo's
//! runner setting, so nothing is rebuilt. oneMKL comes from PyPI (`mkl`, pinned in
//! [`venv::MKL`]) and is installed into the Python environment of the reference tools.
//!
//! A generated block sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`; the prose
//! around it (what was measured and why) is written by hand and kept.
//!
//! `--small` runs everything at toy sizes (it sets `LORA_BENCH_SMALL=1` for every bench and
//! script, and `LORA_IO_BENCH_MB=8`) and prints the blocks instead of writing the document: a
//! cheap check that the whole pipeline works, not a measurement.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

use anyhow::{bail, Context, Result};

use crate::util::cargo;
use crate::venv;

/// One criterion bench target and the groups it reports.
struct BenchSpec {
    /// Name of the generated block in docs/benchmarks.md.
    block: &'static str,
    package: &'static str,
    bench: &'static str,
    features: &'static [&'static str],
    /// Criterion group names, as passed to `benchmark_group`.
    groups: &'static [&'static str],
    /// What one element of `Throughput::Elements` is, for the throughput column.
    element: &'static str,
    /// Environment of the bench process.
    env: &'static [(&'static str, &'static str)],
    /// The BLAS the bench runs with.
    blas: Blas,
}

/// Which BLAS a bench runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blas {
    /// The one the binary links (Debian's OpenBLAS).
    Linked,
    /// oneMKL, preloaded; run only with `--mkl`. Its results are keyed `mkl/ID`.
    Mkl,
}

/// A reference script run with `--compare`.
struct CompareSpec {
    block: &'static str,
    script: &'static str,
    /// One run of the script per argument list; outputs are concatenated.
    runs: &'static [&'static [&'static str]],
    /// The runs of `--small`.
    small_runs: &'static [&'static [&'static str]],
    /// The script drives the release `lora` binary: build it first and pass `--lora PATH`.
    binary: bool,
    /// Ratios against criterion results of the same invocation, appended to the block.
    ratios: Option<fn(&str, &Results) -> String>,
}

const BENCHES: &[BenchSpec] = &[
    BenchSpec {
        block: "forward",
        package: "lora-core",
        bench: "forward",
        features: &["openblas-system"],
        groups: &["forward_openblas"],
        element: "flop",
        env: &[],
        blas: Blas::Linked,
    },
    BenchSpec {
        block: "forward-mm",
        package: "lora-core",
        bench: "forward",
        features: &[],
        groups: &["forward_matrixmultiply"],
        element: "flop",
        env: &[],
        blas: Blas::Linked,
    },
    BenchSpec {
        block: "io",
        package: "lora-io",
        bench: "io",
        features: &[],
        groups: &["model", "adapter"],
        element: "elem",
        env: &[],
        blas: Blas::Linked,
    },
    BenchSpec {
        block: "svd",
        package: "lora-svd",
        bench: "svd",
        features: &[],
        groups: &["extract", "resize"],
        element: "elem",
        env: &[],
        blas: Blas::Linked,
    },
    BenchSpec {
        block: "train",
        package: "lora-train",
        bench: "train_step",
        features: &[],
        groups: &["train_step/bench", "train_step/tiny"],
        element: "token",
        // a threaded OpenBLAS under the trainer's rayon pool oversubscribes the cores
        env: &[("OPENBLAS_NUM_THREADS", "1")],
        blas: Blas::Linked,
    },
    BenchSpec {
        block: "train-mkl",
        package: "lora-train",
        bench: "train_step",
        features: &[],
        groups: &["train_step/bench", "train_step/tiny"],
        element: "token",
        // likewise: oneMKL's sequential layer under the pool (its threaded layers also need
        // Intel's OpenMP runtime)
        env: &[("MKL_THREADING_LAYER", "SEQUENTIAL")],
        blas: Blas::Mkl,
    },
];

const COMPARES: &[CompareSpec] = &[
    CompareSpec {
        block: "forward-torch",
        script: "crates/lora-core/benches/forward_torch.py",
        runs: &[&["--threads", "2"]],
        small_runs: &[&["--threads", "2"]],
        binary: false,
        ratios: None,
    },
    CompareSpec {
        block: "svd-torch",
        script: "crates/lora-svd/benches/compare_torch.py",
        runs: &[&[]],
        small_runs: &[&[]],
        binary: false,
        ratios: None,
    },
    CompareSpec {
        block: "merge-peft",
        script: "crates/lora-cli/benches/merge_peft.py",
        runs: &[&[]],
        small_runs: &[&[]],
        binary: true,
        ratios: None,
    },
    CompareSpec {
        block: "extract-torch",
        script: "crates/lora-cli/benches/extract_torch.py",
        runs: &[&[]],
        small_runs: &[&[]],
        binary: true,
        ratios: None,
    },
    CompareSpec {
        block: "train-step-torch",
        script: "crates/lora-train/benches/train_step_torch.py",
        runs: &[
            &["--case", "tiny", "--threads", "2", "--steps", "20"],
            &["--case", "bench", "--threads", "2", "--steps", "5"],
        ],
        small_runs: &[&["--case", "tiny", "--threads", "2", "--steps", "3"]],
        binary: false,
        ratios: Some(train_step_ratios),
    },
    CompareSpec {
        block: "train-torch",
        script: "crates/lora-cli/benches/train_torch.py",
        runs: &[&["--threads", "2"]],
        small_runs: &[&["--threads", "2"]],
        binary: true,
        ratios: None,
    },
];

/// Criterion results of this invocation: full benchmark id -> (median ns, elements per iteration).
type Results = HashMap<String, (f64, Option<f64>)>;

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let (python, args) = venv::take_python_arg(args)?;
    let mut compare = false;
    let mut mkl = false;
    let mut small = false;
    let mut only: Option<String> = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--compare" => compare = true,
            "--mkl" => mkl = true,
            "--small" => small = true,
            "--only" => only = Some(it.next().context("--only needs a block name prefix")?.clone()),
            other => bail!("unknown argument {other}"),
        }
    }
    let mut env: Vec<(&str, &str)> = Vec::new();
    if small {
        env.extend([("LORA_BENCH_SMALL", "1"), ("LORA_IO_BENCH_MB", "8")]);
    }
    let doc_path = root.join("docs/benchmarks.md");
    let mut doc = std::fs::read_to_string(&doc_path).context("docs/benchmarks.md")?;
    let mut blocks: Vec<(&str, String)> = Vec::new();
    let mut results = Results::new();
    let selected = |block: &str| only.as_deref().is_none_or(|prefix| block.starts_with(prefix));
    let target = target_dir(root);
    let mkl_runner = if mkl && BENCHES.iter().any(|s| s.blas == Blas::Mkl && selected(s.block)) {
        let lib = venv::mkl(root, python.clone())?;
        Some(preload_runner(&lib))
    } else {
        None
    };
    for spec in BENCHES.iter().filter(|s| selected(s.block)) {
        let runner = match spec.blas {
            Blas::Linked => None,
            Blas::Mkl => match &mkl_runner {
                Some(runner) => Some(runner.as_str()),
                None => continue,
            },
        };
        let load = load_average();
        let mut cmd = vec!["bench", "-p", spec.package, "--bench", spec.bench];
        let features = spec.features.join(",");
        if !features.is_empty() {
            cmd.extend(["--features", &features]);
        }
        if let Some(runner) = runner {
            cmd.extend(["--config", runner]);
        }
        let bench_env: Vec<(&str, &str)> = spec.env.iter().copied().chain(env.iter().copied()).collect();
        let started = SystemTime::now();
        cargo(root, &cmd, &bench_env)?;
        let rows = read_results(&target.join("criterion"), started)?;
        let prefix: String = bench_env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
        let mut table = format!(
            "`{prefix}cargo {}` (load average before: {load})\n\n\
             | benchmark | median | throughput | ratio to first of group |\n|---|---|---|---|\n",
            cmd.iter().map(|a| shell_word(a)).collect::<Vec<_>>().join(" "),
        );
        for group in spec.groups {
            let in_group: Vec<&Row> = rows.iter().filter(|r| r.group == *group).collect();
            let first = in_group.first().map_or(1.0, |r| r.median_ns);
            for row in &in_group {
                let throughput = match row.throughput {
                    Some(Throughput::Elements(n)) => {
                        format!("{}{}/s", si(n / (row.median_ns * 1e-9)), spec.element)
                    }
                    Some(Throughput::Bytes(n)) => format!("{:.0} MiB/s", n / (row.median_ns * 1e-9) / 1048576.0),
                    None => String::new(),
                };
                table.push_str(&format!(
                    "| {} | {} | {throughput} | {:.4} |\n",
                    row.id,
                    human(row.median_ns),
                    row.median_ns / first
                ));
                let elements = match row.throughput {
                    Some(Throughput::Elements(n)) => Some(n),
                    _ => None,
                };
                let key = match spec.blas {
                    Blas::Linked => row.id.clone(),
                    Blas::Mkl => format!("mkl/{}", row.id),
                };
                results.insert(key, (row.median_ns, elements));
            }
        }
        eprintln!("{table}");
        blocks.push((spec.block, table));
    }
    if compare {
        let python = venv::python(root, python)?;
        let specs: Vec<&CompareSpec> = COMPARES.iter().filter(|s| selected(s.block)).collect();
        let lora = target.join("release/lora");
        if specs.iter().any(|s| s.binary) {
            cargo(root, &["build", "--release", "-p", "lora-cli"], &[])?;
        }
        for spec in specs {
            let load = load_average();
            let mut text = String::new();
            for run_args in if small { spec.small_runs } else { spec.runs } {
                let mut args: Vec<String> = run_args.iter().map(|a| a.to_string()).collect();
                if spec.binary {
                    args.extend(["--lora".to_string(), relative(root, &lora)]);
                }
                let shown = format!("{} {} {}", relative(root, &python), spec.script, args.join(" "));
                eprintln!("$ {shown}");
                let out = Command::new(&python)
                    .arg(root.join(spec.script))
                    .args(&args)
                    .envs(env.iter().copied())
                    .current_dir(root)
                    .stderr(Stdio::inherit())
                    .output()
                    .with_context(|| format!("running {}", spec.script))?;
                let stdout = String::from_utf8_lossy(&out.stdout);
                eprint!("{stdout}");
                if !out.status.success() {
                    bail!("{} failed ({})", spec.script, out.status);
                }
                text.push_str(&format!("`{shown}` (load average before: {load})\n\n```\n{stdout}```\n"));
                if let Some(ratios) = spec.ratios {
                    let lines = ratios(&stdout, &results);
                    eprint!("{lines}");
                    text.push_str(&format!("\n```\n{lines}```\n"));
                }
            }
            blocks.push((spec.block, text));
        }
    }
    if small {
        for (block, text) in &blocks {
            println!("<!-- bench:{block} -->\n{text}<!-- /bench:{block} -->\n");
        }
        eprintln!("--small: docs/benchmarks.md left as it was");
        return Ok(());
    }
    for (block, text) in &blocks {
        doc = replace_block(&doc, block, text)?;
    }
    std::fs::write(&doc_path, doc)?;
    eprintln!("docs/benchmarks.md updated");
    Ok(())
}

/// `word` as a shell reads it back: in double quotes when it has spaces or quotes.
fn shell_word(word: &str) -> String {
    if word.contains([' ', '\'', '"']) {
        format!("\"{}\"", word.replace('\\', "\\\\").replace('"', "\\\"").replace('$', "\\$"))
    } else {
        word.to_string()
    }
}

/// cargo's `--config` value that runs the bench executables with oneMKL's `lib` preloaded
/// (cargo's runner applies to what it runs, not to rustc or build scripts).
fn preload_runner(lib: &Path) -> String {
    format!("target.'cfg(all())'.runner = [\"env\", \"LD_PRELOAD={}\"]", lib.display())
}

/// lora-train's criterion tokens/s against the lines `CASE FUNCTION: X ms/step, Y tokens/s` of
/// train_step_torch.py: one line with the linked BLAS and, when `--mkl` ran, one with oneMKL.
fn train_step_ratios(stdout: &str, results: &Results) -> String {
    let mut out = String::new();
    for line in stdout.lines() {
        let Some((name, rest)) = line.split_once(": ") else { continue };
        let Some(torch) = rest.split(", ").find_map(|p| p.strip_suffix(" tokens/s")?.trim().parse::<f64>().ok()) else {
            continue;
        };
        let Some((case, function)) = name.split_once(' ') else { continue };
        let id = format!("train_step/{case}/{function}");
        match results.get(&id) {
            Some((ns, Some(tokens))) => out.push_str(&ratio_line(&id, "", *ns, *tokens, torch)),
            _ => out.push_str(&format!("{id}: no criterion result in this run (run the `train` block too)\n")),
        }
        if let Some((ns, Some(tokens))) = results.get(&format!("mkl/{id}")) {
            out.push_str(&ratio_line(&id, " (oneMKL)", *ns, *tokens, torch));
        }
    }
    out
}

fn ratio_line(id: &str, blas: &str, ns: f64, tokens: f64, torch: f64) -> String {
    let ours = tokens / (ns * 1e-9);
    format!(
        "{id}: lora-train{blas} {ours:.0} tokens/s, PyTorch + PEFT {torch:.0} tokens/s, ratio {:.2}\n",
        ours / torch
    )
}

fn load_average() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root).unwrap_or(path).display().to_string()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Throughput {
    Elements(f64),
    Bytes(f64),
}

/// One criterion benchmark's result.
#[derive(Debug)]
struct Row {
    group: String,
    id: String,
    median_ns: f64,
    throughput: Option<Throughput>,
}

/// Every criterion result under `dir` written at or after `since` (so results of earlier runs
/// of benches that did not run now are left out), sorted by id.
fn read_results(dir: &Path, since: SystemTime) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).with_context(|| format!("no criterion results in {}", dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            if !path.is_dir() {
                continue;
            }
            if path.file_name().is_some_and(|n| n == "new") {
                let estimates = path.join("estimates.json");
                let fresh = std::fs::metadata(&estimates).and_then(|m| m.modified()).is_ok_and(|t| t >= since);
                if fresh {
                    rows.push(read_row(&path)?);
                }
            } else if path.file_name().is_some_and(|n| n != "base" && n != "change" && n != "report") {
                stack.push(path);
            }
        }
    }
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(rows)
}

fn read_row(new: &Path) -> Result<Row> {
    let json = |name: &str| -> Result<serde_json::Value> {
        let path = new.join(name);
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}", path.display()))
    };
    let estimates = json("estimates.json")?;
    let benchmark = json("benchmark.json")?;
    let median_ns = estimates["median"]["point_estimate"].as_f64().context("median in estimates.json")?;
    let text =
        |key: &str| benchmark[key].as_str().map(str::to_string).with_context(|| format!("{key} in benchmark.json"));
    let throughput = match &benchmark["throughput"] {
        serde_json::Value::Object(t) => {
            if let Some(n) = t.get("Elements").and_then(serde_json::Value::as_f64) {
                Some(Throughput::Elements(n))
            } else {
                t.get("Bytes").and_then(serde_json::Value::as_f64).map(Throughput::Bytes)
            }
        }
        _ => None,
    };
    Ok(Row { group: text("group_id")?, id: text("full_id")?, median_ns, throughput })
}

fn human(ns: f64) -> String {
    match ns {
        ns if ns >= 1e9 => format!("{:.3} s", ns / 1e9),
        ns if ns >= 1e6 => format!("{:.2} ms", ns / 1e6),
        ns if ns >= 1e3 => format!("{:.2} µs", ns / 1e3),
        ns => format!("{ns:.0} ns"),
    }
}

/// A rate with an SI prefix: 1234567 -> "1.23 M".
fn si(per_second: f64) -> String {
    match per_second {
        x if x >= 1e9 => format!("{:.2} G", x / 1e9),
        x if x >= 1e6 => format!("{:.2} M", x / 1e6),
        x if x >= 1e3 => format!("{:.2} k", x / 1e3),
        x => format!("{x:.1} "),
    }
}

/// Replace the body of a generated block; the markers must already be in the document.
pub fn replace_block(doc: &str, block: &str, body: &str) -> Result<String> {
    let open = format!("<!-- bench:{block} -->");
    let close = format!("<!-- /bench:{block} -->");
    let start = doc.find(&open).with_context(|| format!("docs/benchmarks.md has no {open} marker"))? + open.len();
    let end = doc[start..].find(&close).with_context(|| format!("docs/benchmarks.md has no {close} marker"))? + start;
    Ok(format!("{}\n{}{}", &doc[..start], body, &doc[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_replaced_and_prose_kept() {
        let doc = "intro\n<!-- bench:x -->\nold\n<!-- /bench:x -->\nafter\n";
        assert_eq!(
            replace_block(doc, "x", "new\n").unwrap(),
            "intro\n<!-- bench:x -->\nnew\n<!-- /bench:x -->\nafter\n"
        );
        assert!(replace_block(doc, "y", "new\n").is_err());
    }

    #[test]
    fn every_block_has_markers_in_the_document() {
        let doc = std::fs::read_to_string(crate::util::workspace_root().join("docs/benchmarks.md")).unwrap();
        for block in BENCHES.iter().map(|b| b.block).chain(COMPARES.iter().map(|c| c.block)) {
            assert!(replace_block(&doc, block, "").is_ok(), "docs/benchmarks.md lacks the block {block}");
        }
    }

    #[test]
    fn every_script_exists() {
        let root = crate::util::workspace_root();
        for spec in COMPARES {
            assert!(root.join(spec.script).is_file(), "{} is missing", spec.script);
        }
    }

    #[test]
    fn criterion_results_are_read_and_stale_ones_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let write = |rel: &str, group: &str, id: &str, median: f64, throughput: &str| {
            let new = dir.path().join(rel).join("new");
            std::fs::create_dir_all(&new).unwrap();
            std::fs::write(
                new.join("benchmark.json"),
                format!(r#"{{"group_id": "{group}", "full_id": "{id}", "throughput": {throughput}}}"#),
            )
            .unwrap();
            std::fs::write(new.join("estimates.json"), format!(r#"{{"median": {{"point_estimate": {median}}}}}"#))
                .unwrap();
        };
        write("train_step_tiny/forward", "train_step/tiny", "train_step/tiny/forward", 2e6, r#"{"Elements": 512}"#);
        write("io/copy", "io", "io/copy", 1e9, r#"{"Bytes": 1048576}"#);
        write("x/base/new", "x", "x/stale", 1.0, "null");
        let rows = read_results(dir.path(), SystemTime::UNIX_EPOCH).unwrap();
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["io/copy", "train_step/tiny/forward"]);
        assert_eq!(rows[0].throughput, Some(Throughput::Bytes(1048576.0)));
        assert_eq!(rows[1].throughput, Some(Throughput::Elements(512.0)));
        let later = SystemTime::now() + std::time::Duration::from_secs(3600);
        assert!(read_results(dir.path(), later).unwrap().is_empty());

        let results: Results = [("train_step/tiny/forward".to_string(), (2e6, Some(512.0)))].into();
        let lines = train_step_ratios("tiny forward: 4.0 ms/step, 128000 tokens/s\nnoise\n", &results);
        assert_eq!(
            lines,
            "train_step/tiny/forward: lora-train 256000 tokens/s, PyTorch + PEFT 128000 tokens/s, ratio 2.00\n"
        );
    }

    #[test]
    fn mkl_results_get_their_own_ratio_line() {
        let results: Results = [
            ("train_step/bench/forward".to_string(), (2e6, Some(512.0))),
            ("mkl/train_step/bench/forward".to_string(), (1e6, Some(512.0))),
        ]
        .into();
        let lines = train_step_ratios("bench forward: 4.0 ms/step, 128000 tokens/s\n", &results);
        assert_eq!(
            lines,
            "train_step/bench/forward: lora-train 256000 tokens/s, PyTorch + PEFT 128000 tokens/s, ratio 2.00\n\
             train_step/bench/forward: lora-train (oneMKL) 512000 tokens/s, PyTorch + PEFT 128000 tokens/s, ratio 4.00\n"
        );
    }

    #[test]
    fn words_with_spaces_or_quotes_are_quoted_for_the_shell() {
        assert_eq!(shell_word("bench"), "bench");
        assert_eq!(shell_word(r#"a 'b' ["c"]"#), r#""a 'b' [\"c\"]""#);
    }

    #[test]
    fn the_runner_preloads_the_library_for_every_target() {
        assert_eq!(
            preload_runner(Path::new("/v/lib/libmkl_rt.so.3")),
            r#"target.'cfg(all())'.runner = ["env", "LD_PRELOAD=/v/lib/libmkl_rt.so.3"]"#
        );
    }
}
