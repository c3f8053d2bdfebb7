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

/// oneMKL from PyPI, for `cargo xtask bench --mkl`: the version whose figures are in
/// docs/benchmarks.md. Not in requirements.txt: nothing else needs its 900 MB.
pub const MKL: &str = "mkl==2026.2.0";

/// oneMKL's single dynamic library (`libmkl_rt.so.N`) in the environment of the reference tools
/// (see [`python`]), installed there first when missing.
pub fn mkl(root: &Path, explicit: Option<PathBuf>) -> Result<PathBuf> {
    let python = python(root, explicit)?;
    let prefix = Command::new(&python)
        .args(["-c", "import sys; print(sys.prefix)"])
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    let lib = PathBuf::from(String::from_utf8(prefix.stdout)?.trim()).join("lib");
    if let Some(found) = find_mkl_rt(&lib)? {
        return Ok(found);
    }
    eprintln!("installing {MKL} into {} (about 900 MB, once)", lib.display());
    run(Command::new(&python).args(["-m", "pip", "install", "-q", MKL]))?;
    find_mkl_rt(&lib)?.with_context(|| format!("{MKL} installed, but no libmkl_rt.so.* in {}", lib.display()))
}

/// `dir/libmkl_rt.so.N` (the highest N), if any.
fn find_mkl_rt(dir: &Path) -> Result<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(None) };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(version) = name.strip_prefix("libmkl_rt.so.").and_then(|v| v.parse::<u32>().ok()) {
            found.push((version, path));
        }
    }
    Ok(found.into_iter().max().map(|(_, path)| path))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_mkl_runtime_is_found_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(find_mkl_rt(dir.path()).unwrap(), None);
        for name in ["libmkl_rt.so.2", "libmkl_rt.so.3", "libmkl_core.so.3", "libmkl_rt.so.x"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(find_mkl_rt(dir.path()).unwrap(), Some(dir.path().join("libmkl_rt.so.3")));
        assert_eq!(find_mkl_rt(&dir.path().join("missing")).unwrap(), None);
    }
}
