//! `cargo xtask`: the project's automation, in Rust so that it runs wherever cargo does.
//!
//! - `cargo xtask ci`: what `.ci/run` checks (format, clippy, tests with the tidy rules, docs).
//! - `cargo xtask release <X.Y.Z | major | minor | patch> [--execute]`: bump, changelog, package,
//!   build the binary into dist/; publishes and tags only with `--execute`.
//! - `cargo xtask bench [--compare]`: run the criterion benches and rewrite the generated tables of
//!   docs/benchmarks.md; `--compare` also runs the Python reference scripts.
//! - `cargo xtask fixtures`: regenerate every committed fixture with the real PEFT / transformers
//!   and show what changed.
//!
//! The Python tools live in one venv under target/ (`venv.rs`), made from xtask/requirements.txt.

mod bench;
mod fixtures;
mod release;
mod util;
mod venv;

use anyhow::{bail, Result};

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  ci                                     format check, clippy, tests (tidy rules included), docs,
                                         then `crates`
  release <X.Y.Z|major|minor|patch>      dry run of a release; add --execute to publish and tag
          [--execute] [--allow-dirty] [--skip-ci] [--no-verify] [--binary-profile release|dev]
  bench [--compare] [--mkl] [--python PATH] [--only BLOCK-PREFIX] [--small]
                                         criterion benches, tables of docs/benchmarks.md;
                                         --compare: PyTorch / PEFT side by side; --mkl: lora-train
                                         with oneMKL (from PyPI) too; --small: toy sizes, blocks
                                         printed instead of written
  fixtures [--python PATH] [--only peft|train|optim] [--check]
                                         regenerate the committed fixtures with the real
                                         PEFT / transformers / torch, then git status and diff
  crates                                 each published crate checked on its own

The Python tools come from a venv made under target/bench-venv from xtask/requirements.txt,
unless --python names an interpreter.";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = util::workspace_root();
    match args.first().map(String::as_str) {
        Some("ci") => ci(&root),
        Some("release") => release::run(&root, &args[1..]),
        Some("bench") => bench::run(&root, &args[1..]),
        Some("fixtures") => fixtures::run(&root, &args[1..]),
        Some("crates") => crates_alone(&root),
        Some("-h" | "--help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown task {other}\n\n{USAGE}"),
    }
}

/// The crates published to crates.io, in dependency order.
pub(crate) const PUBLISHED: &[&str] = &["lora-core", "lora-svd", "lora-io", "lora-train", "lora-cli"];

/// Each published crate on its own: `cargo check -p X` (with and without `--all-targets`), so that
/// none relies on a feature only another workspace member turns on (cargo resolves the features
/// of the selected package alone), and `cargo package --list` holds the manifest, the README and
/// the sources, and no test data. A single crate cannot be packaged alone before its internal
/// dependencies are on crates.io (`cargo package -p lora-svd` looks lora-core up there);
/// `cargo package --workspace` and the release's `cargo publish --workspace --dry-run` package
/// them together.
pub(crate) fn crates_alone(root: &std::path::Path) -> Result<()> {
    for krate in PUBLISHED {
        util::cargo(root, &["check", "-q", "-p", krate], &[])?;
        util::cargo(root, &["check", "-q", "-p", krate, "--all-targets"], &[])?;
        let list = util::output(root, &util::cargo_bin(), &["package", "-p", krate, "--list", "--allow-dirty"])?;
        let files: Vec<&str> = list.lines().collect();
        let entry = if *krate == "lora-cli" { "src/main.rs" } else { "src/lib.rs" };
        for needed in ["Cargo.toml", "README.md", entry] {
            anyhow::ensure!(files.contains(&needed), "cargo package -p {krate}: {needed} is not in the package");
        }
        let stray: Vec<&&str> = files
            .iter()
            .filter(|f| f.contains("fixtures/") || f.ends_with(".safetensors") || f.ends_with(".gguf"))
            .collect();
        anyhow::ensure!(stray.is_empty(), "cargo package -p {krate} would ship test data: {stray:?}");
        eprintln!("{krate}: checked alone; package holds {} files", files.len());
    }
    Ok(())
}

/// The checks of `.ci/run`, without the system set-up.
pub(crate) fn ci(root: &std::path::Path) -> Result<()> {
    util::cargo(root, &["fmt", "--all", "--", "--check"], &[])?;
    util::cargo(root, &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"], &[])?;
    util::cargo(root, &["test", "--workspace"], &[])?;
    util::cargo(root, &["doc", "--workspace", "--no-deps"], &[("RUSTDOCFLAGS", "-D warnings")])?;
    // each crate alone: about 3 CPU-minutes the first time, seconds after
    crates_alone(root)?;
    Ok(())
}
