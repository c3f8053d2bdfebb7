//! `cargo xtask`: the project's automation, in Rust so that it runs wherever cargo does.
//!
//! - `cargo xtask ci`: what `.ci/run` checks (format, clippy, tests, docs), to run locally.

use std::process::Command;

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some(other) => bail!("unknown task {other}; tasks: ci"),
        None => {
            eprintln!("usage: cargo xtask <task>\n\ntasks:\n  ci    format check, clippy, tests and docs, as .ci/run");
            Ok(())
        }
    }
}

/// Run one cargo command in the workspace root, failing on a non-zero exit.
fn cargo(args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("xtask sits in the workspace root")?;
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root)
        .status()
        .with_context(|| format!("cannot run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn ci() -> Result<()> {
    cargo(&["fmt", "--all", "--", "--check"], &[])?;
    cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"], &[])?;
    cargo(&["test", "--workspace"], &[])?;
    cargo(&["doc", "--workspace", "--no-deps"], &[("RUSTDOCFLAGS", "-D warnings")])?;
    Ok(())
}
