//! What the tests of the `lora` binary share: running it, and checking a success or a clean
//! failure (exit code 1, one line on stderr naming what is wrong, never a panic).

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Run `lora` with these arguments.
pub fn lora<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lora")).args(args).output().expect("the lora binary runs")
}

/// Run `lora`, which must succeed; its stdout.
pub fn ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let out = lora(args);
    assert!(
        out.status.success(),
        "lora {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Run `lora --json ...`; the JSON it prints.
pub fn json<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).expect("--json prints JSON")
}

/// Check a failed run: exit code 1, exactly one line on stderr that contains every `needle`, no
/// panic. Returns stderr.
pub fn failed(what: &str, out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("{what}\n  -> exit {:?}: {}", out.status.code(), stderr.trim_end());
    assert_eq!(out.status.code(), Some(1), "{what} should fail with exit code 1:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{what} panicked:\n{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{what}: one line of error:\n{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "the error of {what} should mention {n:?}:\n{stderr}");
    }
    stderr
}

/// Run `lora`, which must fail cleanly with an error that mentions every `needle`.
pub fn fails<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S], needles: &[&str]) -> String {
    failed(&format!("lora {args:?}"), &lora(args), needles)
}

/// A path as a `&str`.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A fresh temporary folder.
pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}
