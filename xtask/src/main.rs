//! `cargo xtask`: the project's automation, in Rust so that it runs wherever cargo does.
//!
//! - `cargo xtask ci`: what `.ci/run` checks (format, clippy, tests with the tidy rules, docs).
//! - `cargo xtask release <X.Y.Z | major | minor | patch> [--execute]`: bump, changelog, package,
//!   build the binary into dist/; publishes and tags only with `--execute`.
//! - `cargo xtask bench [--compare]`: run the criterion benches and rewrite the generated tables of
//!   docs/benchmarks.md; `--compare` also runs the Python reference scripts.

mod bench;
mod release;
mod util;

use anyhow::{bail, Result};

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  ci                                     format check, clippy, tests (tidy rules included), docs
  release <X.Y.Z|major|minor|patch>      dry run of a release; add --execute to publish and tag
          [--execute] [--allow-dirty] [--skip-ci] [--no-verify] [--binary-profile release|dev]
  bench [--compare] [--python PATH] [--only BLOCK-PREFIX]
                                         criterion benches, tables of docs/benchmarks.md";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = util::workspace_root();
    match args.first().map(String::as_str) {
        Some("ci") => ci(&root),
        Some("release") => release::run(&root, &args[1..]),
        Some("bench") => bench::run(&root, &args[1..]),
        Some("-h" | "--help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown task {other}\n\n{USAGE}"),
    }
}

/// The checks of `.ci/run`, without the system set-up.
pub(crate) fn ci(root: &std::path::Path) -> Result<()> {
    util::cargo(root, &["fmt", "--all", "--", "--check"], &[])?;
    util::cargo(root, &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"], &[])?;
    util::cargo(root, &["test", "--workspace"], &[])?;
    util::cargo(root, &["doc", "--workspace", "--no-deps"], &[("RUSTDOCFLAGS", "-D warnings")])?;
    Ok(())
}
