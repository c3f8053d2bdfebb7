//! `cargo xtask release` as a dry run on a temporary copy of the repository: versions bumped,
//! changelog finalised, dist/ written with a binary, its SHA-256 and the release notes; an empty
//! Unreleased section refused.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace root").to_path_buf()
}

fn run(dir: &Path, program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program).args(args).current_dir(dir).output().unwrap_or_else(|e| panic!("{program}: {e}"))
}

/// Copy the files git knows (tracked, or untracked but not ignored) as they are in the working tree.
fn copy_repository(to: &Path) {
    let out = run(&root(), "git", &["ls-files", "--cached", "--others", "--exclude-standard", "-z"]);
    assert!(out.status.success());
    for name in out.stdout.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = std::str::from_utf8(name).expect("utf-8 path");
        let (src, dst) = (root().join(name), to.join(name));
        if src.is_file() {
            std::fs::create_dir_all(dst.parent().expect("parent")).expect("mkdir");
            std::fs::copy(&src, &dst).expect("copy");
        }
    }
    for args in [
        &["init", "-q", "-b", "main"][..],
        &["add", "-A"],
        &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"],
    ] {
        assert!(run(to, "git", args).status.success(), "git {args:?}");
    }
}

fn workspace_version(manifest: &str) -> String {
    let doc: toml_edit::DocumentMut = manifest.parse().expect("Cargo.toml parses");
    doc["workspace"]["package"]["version"].as_str().expect("version").to_string()
}

#[test]
fn release_dry_run_on_a_copy() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let copy = tmp.path();
    copy_repository(copy);
    let before = workspace_version(&std::fs::read_to_string(copy.join("Cargo.toml")).unwrap());
    let parts: Vec<u64> = before.split('.').map(|p| p.parse().unwrap()).collect();
    let want = format!("{}.{}.0", parts[0], parts[1] + 1);

    let cargo = env!("CARGO");
    let target = root().join("target/xtask-release-test");
    let out = Command::new(cargo)
        .args([
            "run",
            "-q",
            "-p",
            "xtask",
            "--",
            "release",
            "minor",
            "--skip-ci",
            "--no-verify",
            "--binary-profile",
            "dev",
        ])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(copy)
        .output()
        .expect("cargo xtask release runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "release dry run failed:\n{stderr}");
    assert!(stderr.contains("Packaging lora-core"), "every crate is packaged:\n{stderr}");
    assert!(stderr.contains("Packaging lora-cli"), "every crate is packaged:\n{stderr}");

    let manifest = std::fs::read_to_string(copy.join("Cargo.toml")).unwrap();
    assert_eq!(workspace_version(&manifest), want);
    for krate in ["lora-core", "lora-svd", "lora-io", "lora-train"] {
        let line = manifest.lines().find(|l| l.starts_with(&format!("{krate} ="))).expect("internal dependency");
        assert!(line.contains(&format!("version = \"{want}\"")), "{line}");
    }
    let changelog = std::fs::read_to_string(copy.join("CHANGELOG.md")).unwrap();
    let unreleased = changelog.find("## Unreleased").expect("a new Unreleased section");
    let released = changelog.find(&format!("## {want} - 20")).expect("the release heading with a date");
    assert!(unreleased < released);

    let dist = copy.join("dist");
    let binary_name = format!("lora-{want}-{}-{}", std::env::consts::ARCH, std::env::consts::OS);
    let binary = std::fs::read(dist.join(&binary_name)).expect("the binary in dist/");
    let sha = std::fs::read_to_string(dist.join(format!("{binary_name}.sha256"))).expect("sha file");
    let digest: String = sha2::Sha256::digest(&binary).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(sha, format!("{digest}  {binary_name}\n"));
    let notes = std::fs::read_to_string(dist.join(format!("RELEASE-NOTES-{want}.md"))).expect("notes");
    assert!(notes.contains("### Added"), "{notes}");
    assert!(!run(copy, "git", &["tag"]).stdout.iter().any(|b| !b.is_ascii_whitespace()), "a dry run makes no tag");

    // Nothing new under Unreleased now: a second release is refused before anything is built.
    let out = Command::new(cargo)
        .args(["run", "-q", "-p", "xtask", "--", "release", "patch", "--allow-dirty", "--skip-ci"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(copy)
        .output()
        .expect("cargo xtask release runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unreleased section is empty"));
}

use sha2::Digest as _;
