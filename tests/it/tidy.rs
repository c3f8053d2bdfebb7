//! Tidy rules checked as tests: the dependency direction of DESIGN.md, a `//!` header on every
//! Rust file, and no ignored or `should_panic` tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace root").to_path_buf()
}

/// Internal dependency edges (normal, dev and build) of every workspace package, from `cargo metadata`.
fn internal_edges() -> BTreeMap<String, BTreeSet<String>> {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(workspace_root())
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let packages = meta["packages"].as_array().expect("packages");
    let members: BTreeSet<String> = packages.iter().map(|p| p["name"].as_str().expect("name").to_string()).collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .map(|d| d["name"].as_str().expect("dependency name").to_string())
                .filter(|d| members.contains(d))
                .collect();
            (p["name"].as_str().expect("name").to_string(), deps)
        })
        .collect()
}

#[test]
fn dependency_direction_follows_the_design() {
    let allowed: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("lora-core", &[][..]),
        ("lora-svd", &["lora-core"][..]),
        ("lora-io", &["lora-core"][..]),
        ("lora-train", &["lora-core", "lora-io"][..]),
        ("lora-cli", &["lora-core", "lora-svd", "lora-io", "lora-train"][..]),
    ]);
    let edges = internal_edges();
    for (crate_name, allowed_deps) in &allowed {
        let deps = edges.get(*crate_name).unwrap_or_else(|| panic!("{crate_name} is not a workspace member"));
        for dep in deps {
            assert!(allowed_deps.contains(&dep.as_str()), "{crate_name} must not depend on {dep} (see DESIGN.md)");
        }
    }
    for name in edges.keys() {
        assert!(
            allowed.contains_key(name.as_str()) || name == "xtask" || name == "tests",
            "workspace member {name} is not in the dependency rules of this test"
        );
    }
}

#[test]
fn the_rule_catches_a_forbidden_edge() {
    // The check above reads the real graph; make sure the same logic rejects a bad one.
    let bad: BTreeSet<String> = ["lora-io".to_string()].into();
    let allowed = ["lora-core"];
    assert!(bad.iter().any(|d| !allowed.contains(&d.as_str())));
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable folder") {
        let path = entry.expect("folder entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            let data = ["target", "fixtures", "corpus", "artifacts"];
            if !name.starts_with('.') && !data.contains(&name) {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

fn all_rust_files() -> Vec<PathBuf> {
    let root = workspace_root();
    let mut files = Vec::new();
    for dir in ["crates", "xtask", "tests", "fuzz"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 10, "found only {} Rust files", files.len());
    files
}

#[test]
fn every_rust_file_starts_with_a_module_doc() {
    for file in all_rust_files() {
        let text = std::fs::read_to_string(&file).expect("readable file");
        assert!(text.starts_with("//!"), "{} must start with a `//!` comment saying what it is for", file.display());
    }
}

#[test]
fn no_test_is_ignored_or_expected_to_panic() {
    // The patterns are split so that this file does not match itself.
    let forbidden = [concat!("#[", "ignore"), concat!("#[", "should_panic")];
    for file in all_rust_files() {
        let text = std::fs::read_to_string(&file).expect("readable file");
        for pattern in forbidden {
            assert!(
                !text.contains(pattern),
                "{} contains {pattern}]: tests always run and never panic",
                file.display()
            );
        }
    }
}

#[test]
fn changelog_has_an_unreleased_section() {
    let changelog = std::fs::read_to_string(workspace_root().join("CHANGELOG.md")).expect("CHANGELOG.md");
    assert!(changelog.lines().any(|l| l.trim() == "## Unreleased"), "CHANGELOG.md needs a `## Unreleased` section");
}
