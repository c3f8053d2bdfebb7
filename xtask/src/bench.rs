//! `cargo xtask bench [--compare]`: run the criterion benches and rewrite the generated blocks of
//! docs/benchmarks.md from criterion's estimates; with `--compare`, run the reference scripts
//! (PyTorch, PEFT) in the same session and put their output beside.
//!
//! A generated block sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`; the prose
//! around it (what was measured and why) is written by hand and kept.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::cargo;

/// One criterion bench target and the groups it reports.
struct BenchSpec {
    /// Name of the generated block in docs/benchmarks.md.
    block: &'static str,
    package: &'static str,
    bench: &'static str,
    features: &'static [&'static str],
    /// Criterion group names, as passed to `benchmark_group`.
    groups: &'static [&'static str],
}

/// A reference script run with `--compare`.
struct CompareSpec {
    block: &'static str,
    script: &'static str,
    args: &'static [&'static str],
}

const BENCHES: &[BenchSpec] = &[
    BenchSpec {
        block: "forward",
        package: "lora-core",
        bench: "forward",
        features: &["openblas-system"],
        groups: &["forward_openblas"],
    },
    BenchSpec {
        block: "forward-mm",
        package: "lora-core",
        bench: "forward",
        features: &[],
        groups: &["forward_matrixmultiply"],
    },
    BenchSpec { block: "io", package: "lora-io", bench: "io", features: &[], groups: &["model", "adapter"] },
];

const COMPARES: &[CompareSpec] = &[CompareSpec {
    block: "forward-torch",
    script: "crates/lora-core/benches/forward_torch.py",
    args: &["--threads", "2"],
}];

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let mut compare = false;
    let mut only: Option<String> = None;
    let mut python = root.join("target/bench-venv/bin/python");
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--compare" => compare = true,
            "--python" => python = PathBuf::from(it.next().context("--python needs a path")?),
            "--only" => only = Some(it.next().context("--only needs a block name prefix")?.clone()),
            other => bail!("unknown argument {other}"),
        }
    }
    let doc_path = root.join("docs/benchmarks.md");
    let mut doc = std::fs::read_to_string(&doc_path).context("docs/benchmarks.md")?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let selected = |block: &str| only.as_deref().is_none_or(|prefix| block.starts_with(prefix));
    for spec in BENCHES.iter().filter(|s| selected(s.block)) {
        let mut cmd = vec!["bench", "-p", spec.package, "--bench", spec.bench];
        let features = spec.features.join(",");
        if !features.is_empty() {
            cmd.extend(["--features", &features]);
        }
        cargo(root, &cmd, &[])?;
        let mut table = format!(
            "`cargo {}` (load average before: {})\n\n| group | function | median | ratio to first |\n|---|---|---|---|\n",
            cmd.join(" "),
            load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        );
        for group in spec.groups {
            let rows = read_group(&root.join("target/criterion").join(group))?;
            let first = rows.first().map_or(1.0, |r| r.1);
            for (name, ns) in &rows {
                table.push_str(&format!("| {group} | {name} | {} | {:.4} |\n", human(*ns), ns / first));
            }
        }
        doc = replace_block(&doc, spec.block, &table)?;
    }
    if compare {
        ensure_venv(root, &python)?;
        for spec in COMPARES.iter().filter(|s| selected(s.block)) {
            let out = Command::new(&python)
                .arg(root.join(spec.script))
                .args(spec.args)
                .current_dir(root)
                .output()
                .with_context(|| format!("running {}", spec.script))?;
            if !out.status.success() {
                bail!("{} failed: {}", spec.script, String::from_utf8_lossy(&out.stderr));
            }
            let text = format!(
                "`{} {} {}`\n\n```\n{}```\n",
                python.display(),
                spec.script,
                spec.args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            );
            doc = replace_block(&doc, spec.block, &text)?;
        }
    }
    std::fs::write(&doc_path, doc)?;
    eprintln!("docs/benchmarks.md updated");
    Ok(())
}

/// Create the reference venv under target/ when it is missing.
fn ensure_venv(root: &Path, python: &Path) -> Result<()> {
    if python.exists() {
        return Ok(());
    }
    let venv = root.join("target/bench-venv");
    eprintln!("creating {} with torch, transformers, peft (a few GB, once)", venv.display());
    let ok = Command::new("python3").arg("-m").arg("venv").arg(&venv).status()?.success()
        && Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "torch", "transformers", "peft", "safetensors", "numpy", "gguf"])
            .status()?
            .success();
    if !ok {
        bail!("could not create the benchmark venv at {}", venv.display());
    }
    Ok(())
}

/// (function, median ns) for every function of a criterion group, in name order.
fn read_group(dir: &Path) -> Result<Vec<(String, f64)>> {
    let mut rows = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("no criterion results in {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let estimates = path.join("new/estimates.json");
        if !estimates.exists() {
            continue;
        }
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&estimates)?)?;
        let ns = json["median"]["point_estimate"].as_f64().context("median in estimates.json")?;
        rows.push((path.file_name().unwrap_or_default().to_string_lossy().into_owned(), ns));
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(rows)
}

fn human(ns: f64) -> String {
    match ns {
        ns if ns >= 1e9 => format!("{:.3} s", ns / 1e9),
        ns if ns >= 1e6 => format!("{:.2} ms", ns / 1e6),
        ns if ns >= 1e3 => format!("{:.2} µs", ns / 1e3),
        ns => format!("{ns:.0} ns"),
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
}
