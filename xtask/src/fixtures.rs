//! `cargo xtask fixtures [--python P] [--only NAME] [--check]`: regenerate every committed file
//! that a script made with the real reference tools (PEFT, transformers, torch), then show what
//! changed against the commit (`git status --short`, `git diff --stat`), so anyone can check
//! where the fixtures came from. `--check` fails when anything changed.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::util::output;
use crate::venv;

/// One generator script and the committed files it writes.
struct Generator {
    name: &'static str,
    /// The program and its arguments; `{python}` is replaced by the interpreter.
    command: &'static [&'static str],
    /// Write the command's stdout to this file (relative to the root) instead of letting it write.
    stdout_to: Option<&'static str>,
    /// Paths (relative to the root) whose content the script owns.
    outputs: &'static [&'static str],
}

/// Every committed file made by a script. `tests/fixtures/train/eval.txt` is hand-written input;
/// the proptest regression files are written by proptest when a case fails.
const GENERATORS: &[Generator] = &[
    Generator {
        name: "peft",
        command: &["bash", "tests/fixtures/peft/make_all.sh", "{python}"],
        stdout_to: None,
        outputs: &["tests/fixtures/peft"],
    },
    Generator {
        name: "train",
        command: &["{python}", "tests/fixtures/train/make_train_fixtures.py", "tests/fixtures/train"],
        stdout_to: None,
        outputs: &["tests/fixtures/train"],
    },
    Generator {
        name: "optim",
        command: &["{python}", "crates/lora-train/reference/optim_reference.py"],
        stdout_to: Some("crates/lora-train/reference/optim_reference.json"),
        outputs: &["crates/lora-train/reference"],
    },
];

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let (python, args) = venv::take_python_arg(args)?;
    let mut only: Option<String> = None;
    let mut check = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--only" => only = Some(it.next().context("--only needs a generator name")?.clone()),
            "--check" => check = true,
            other => bail!("unknown argument {other}"),
        }
    }
    let selected: Vec<&Generator> =
        GENERATORS.iter().filter(|g| only.as_deref().is_none_or(|name| g.name == name)).collect();
    ensure!(
        !selected.is_empty(),
        "--only: no generator named {}; there are {}",
        only.unwrap_or_default(),
        GENERATORS.iter().map(|g| g.name).collect::<Vec<_>>().join(", ")
    );
    let python = venv::python(root, python)?;
    let python = python.to_str().context("the interpreter's path is not UTF-8")?;
    for generator in &selected {
        let argv: Vec<&str> = generator.command.iter().map(|a| if *a == "{python}" { python } else { *a }).collect();
        eprintln!("$ {}", argv.join(" "));
        let mut cmd = Command::new(argv[0]);
        // PEFT keeps target_modules in a set: its order in adapter_config.json follows Python's
        // string hashing, which is randomised per process unless the seed is fixed.
        cmd.args(&argv[1..]).current_dir(root).env("PYTHONHASHSEED", "0");
        if generator.stdout_to.is_some() {
            cmd.stdout(std::process::Stdio::piped());
        }
        let out = cmd.spawn().with_context(|| format!("cannot run {}", argv[0]))?.wait_with_output()?;
        ensure!(out.status.success(), "{} failed ({})", argv.join(" "), out.status);
        if let Some(path) = generator.stdout_to {
            std::fs::write(root.join(path), &out.stdout).with_context(|| format!("writing {path}"))?;
        }
    }
    let paths: Vec<&str> = selected.iter().flat_map(|g| g.outputs.iter().copied()).collect();
    let mut status_args = vec!["status", "--short", "--"];
    status_args.extend(&paths);
    let status = output(root, "git", &status_args)?;
    let mut diff_args = vec!["diff", "--stat", "--"];
    diff_args.extend(&paths);
    let diff = output(root, "git", &diff_args)?;
    println!("$ git {}\n{status}", status_args.join(" "));
    println!("$ git {}\n{diff}", diff_args.join(" "));
    if status.trim().is_empty() {
        println!("the regenerated fixtures are identical to the committed ones");
    } else if check {
        bail!("the regenerated fixtures differ from the committed ones (see above)");
    } else {
        println!("the fixtures changed: inspect with git diff, commit them or restore with git checkout -- <path>");
    }
    Ok(())
}
