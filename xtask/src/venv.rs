//! The Python environment of the reference tools (torch, transformers, PEFT, gguf), shared by
//! `cargo xtask fixtures` and `cargo xtask bench --compare`: `target/bench-venv`, created from
//! `xtask/requirements.txt` on first use, or any interpreter given with `--python`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Where the shared venv lives, relative to the workspace root.
pub const VENV: &str = "target/bench-venv";

/// The interpreter to use: `explicit` when given (it must exist), else the shared venv, created
/// when missing.
pub fn python(root: &Path, explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(python) = explicit {
        if !python.exists() {
            bail!("--python {}: no such file", python.display());
        }
        return Ok(python);
    }
    let venv = root.join(VENV);
    let python = venv.join("bin/python");
    if python.exists() {
        return Ok(python);
    }
    let requirements = root.join("xtask/requirements.txt");
    eprintln!(
        "creating {} from {} (torch, transformers, peft, gguf: a few GB, once)",
        venv.display(),
        requirements.display()
    );
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    let pip = venv.join("bin/pip");
    if let Ok(index) = std::env::var("LORA_TORCH_INDEX") {
        let torch = std::fs::read_to_string(&requirements)?
            .lines()
            .find(|l| l.starts_with("torch=="))
            .context("xtask/requirements.txt pins no torch")?
            .to_string();
        run(Command::new(&pip).args(["install", "-q", "--index-url", &index, &torch]))?;
    }
    run(Command::new(&pip).args(["install", "-q", "-r"]).arg(&requirements))?;
    Ok(python)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status}); remove {VENV} and try again, or pass --python");
    }
    Ok(())
}

/// The value after `--python` in `args`, and the other arguments.
pub fn take_python_arg(args: &[String]) -> Result<(Option<PathBuf>, Vec<String>)> {
    let mut python = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--python" {
            python = Some(PathBuf::from(it.next().context("--python needs a path")?));
        } else {
            rest.push(arg.clone());
        }
    }
    Ok((python, rest))
}
