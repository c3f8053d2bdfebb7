//! `cargo xtask release`: one command from a green main to published crates and a tagged binary.
//!
//! Steps, in order: a clean tree on main; bump `[workspace.package].version` and the version
//! requirement of every internal crate in `[workspace.dependencies]` (toml_edit keeps the file's
//! formatting); turn CHANGELOG.md's `## Unreleased` into `## X.Y.Z - date` (an empty section is
//! refused); run the ci task; `cargo publish --workspace --dry-run` (packages every publishable
//! crate in dependency order); build the `lora` binary into dist/ with a SHA-256 file and the
//! release notes. Nothing is committed, published or tagged without `--execute`.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};
use toml_edit::{value, DocumentMut};

use crate::util::{cargo, output};

/// Options of the release task.
#[derive(Debug, Default)]
struct Options {
    level: String,
    execute: bool,
    allow_dirty: bool,
    skip_ci: bool,
    no_verify: bool,
    binary_profile: String,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut opts = Options { binary_profile: "release".into(), ..Options::default() };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--execute" => opts.execute = true,
            "--allow-dirty" => opts.allow_dirty = true,
            "--skip-ci" => opts.skip_ci = true,
            "--no-verify" => opts.no_verify = true,
            "--binary-profile" => opts.binary_profile = it.next().context("--binary-profile needs a value")?.clone(),
            flag if flag.starts_with('-') => bail!("unknown flag {flag}"),
            level if opts.level.is_empty() => opts.level = level.to_string(),
            extra => bail!("unexpected argument {extra}"),
        }
    }
    ensure!(!opts.level.is_empty(), "release needs a version: X.Y.Z, major, minor or patch");
    ensure!(!(opts.execute && opts.allow_dirty), "--execute releases only from a clean tree");
    Ok(opts)
}

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let opts = parse(args)?;
    if !opts.allow_dirty {
        let status = output(root, "git", &["status", "--porcelain"])?;
        ensure!(status.trim().is_empty(), "the working tree is not clean:\n{status}");
        let branch = output(root, "git", &["rev-parse", "--abbrev-ref", "HEAD"])?;
        ensure!(branch.trim() == "main", "releases are made from main, not {}", branch.trim());
    }

    let manifest_path = root.join("Cargo.toml");
    let mut manifest: DocumentMut = std::fs::read_to_string(&manifest_path)?.parse().context("Cargo.toml")?;
    let current =
        manifest["workspace"]["package"]["version"].as_str().context("[workspace.package] version")?.to_string();
    let version = next_version(&current, &opts.level)?;
    let bumped = bump_manifest(&mut manifest, &version)?;
    eprintln!("version {current} -> {version}; internal requirements bumped: {}", bumped.join(", "));

    let changelog_path = root.join("CHANGELOG.md");
    let changelog = std::fs::read_to_string(&changelog_path).context("CHANGELOG.md")?;
    let (changelog, notes) = finalize_changelog(&changelog, &version, &today())?;

    std::fs::write(&manifest_path, manifest.to_string())?;
    std::fs::write(&changelog_path, changelog)?;
    // Cargo.lock follows the bump (offline: only the workspace's own versions change).
    cargo(root, &["update", "--workspace", "--offline"], &[])?;

    if !opts.skip_ci {
        crate::ci(root)?;
    }

    let mut package = vec!["publish", "--workspace", "--dry-run", "--allow-dirty"];
    if opts.no_verify {
        package.push("--no-verify");
    }
    cargo(root, &package, &[])?;

    write_dist(root, &version, &notes, &opts.binary_profile)?;

    if opts.execute {
        output(root, "git", &["commit", "-am", &format!("Release v{version}")])?;
        cargo(root, &["publish", "--workspace"], &[])?;
        output(root, "git", &["tag", "-a", &format!("v{version}"), "-m", &format!("Release v{version}")])?;
        eprintln!("released v{version}: crates published, tag v{version} made (push it with git push --tags)");
    } else {
        eprintln!(
            "dry run of v{version} complete: files bumped and dist/ written; nothing committed, published or tagged \
             (git checkout -- Cargo.toml Cargo.lock CHANGELOG.md undoes the bump)"
        );
    }
    Ok(())
}

/// The version after `current` for `level`: `major`, `minor`, `patch` or an explicit X.Y.Z that
/// must be greater.
pub fn next_version(current: &str, level: &str) -> Result<String> {
    let parse = |v: &str| -> Result<[u64; 3]> {
        let parts: Vec<&str> = v.split('.').collect();
        ensure!(parts.len() == 3, "version {v} is not X.Y.Z");
        let mut out = [0; 3];
        for (o, p) in out.iter_mut().zip(&parts) {
            *o = p.parse().with_context(|| format!("version {v} is not X.Y.Z"))?;
        }
        Ok(out)
    };
    let [major, minor, patch] = parse(current)?;
    let next = match level {
        "major" => [major + 1, 0, 0],
        "minor" => [major, minor + 1, 0],
        "patch" => [major, minor, patch + 1],
        explicit => {
            let v = parse(explicit)?;
            ensure!(v > [major, minor, patch], "version {explicit} is not greater than the current {current}");
            v
        }
    };
    Ok(format!("{}.{}.{}", next[0], next[1], next[2]))
}

/// Set the workspace version and the `version` of every path dependency in
/// `[workspace.dependencies]`; returns the names of the dependencies bumped.
pub fn bump_manifest(manifest: &mut DocumentMut, version: &str) -> Result<Vec<String>> {
    set_keeping_decor(&mut manifest["workspace"]["package"]["version"], version);
    let deps = manifest["workspace"]["dependencies"].as_table_like_mut().context("[workspace.dependencies]")?;
    let mut bumped = Vec::new();
    for (name, dep) in deps.iter_mut() {
        if let Some(table) = dep.as_table_like_mut() {
            if table.contains_key("path") {
                match table.get_mut("version") {
                    Some(item) => set_keeping_decor(item, version),
                    None => {
                        table.insert("version", value(version));
                    }
                }
                bumped.push(name.to_string());
            }
        }
    }
    ensure!(!bumped.is_empty(), "no internal crate found in [workspace.dependencies]");
    Ok(bumped)
}

/// Replace a string value, keeping the comments and spacing around it.
fn set_keeping_decor(item: &mut toml_edit::Item, new: &str) {
    match item.as_value_mut() {
        Some(v) => {
            let decor = v.decor().clone();
            *v = new.into();
            *v.decor_mut() = decor;
        }
        None => *item = value(new),
    }
}

/// Turn `## Unreleased` into `## {version} - {date}` under a new empty `## Unreleased`; returns
/// the new text and the release notes (the section's body). An empty section is an error.
pub fn finalize_changelog(text: &str, version: &str, date: &str) -> Result<(String, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let start =
        lines.iter().position(|l| l.trim() == "## Unreleased").context("CHANGELOG.md has no `## Unreleased`")?;
    let end = lines[start + 1..].iter().position(|l| l.starts_with("## ")).map_or(lines.len(), |i| start + 1 + i);
    let body = &lines[start + 1..end];
    let has_entries = body.iter().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    if !has_entries {
        bail!("CHANGELOG.md: the Unreleased section is empty; say what this release changes");
    }
    let notes = body.join("\n").trim().to_string();
    let mut out: Vec<String> = lines[..start].iter().map(|s| s.to_string()).collect();
    out.push("## Unreleased".into());
    out.push(String::new());
    out.push(format!("## {version} - {date}"));
    out.extend(lines[start + 1..].iter().map(|s| s.to_string()));
    Ok((out.join("\n") + "\n", notes))
}

fn write_dist(root: &Path, version: &str, notes: &str, profile: &str) -> Result<()> {
    cargo(root, &["build", "--profile", profile, "--bin", "lora"], &[])?;
    let target_dir = std::env::var("CARGO_TARGET_DIR").map(std::path::PathBuf::from).unwrap_or(root.join("target"));
    let profile_dir = if profile == "dev" { "debug" } else { profile };
    let binary = target_dir.join(profile_dir).join(format!("lora{}", std::env::consts::EXE_SUFFIX));
    let dist = root.join("dist");
    std::fs::create_dir_all(&dist)?;
    let name =
        format!("lora-{version}-{}-{}{}", std::env::consts::ARCH, std::env::consts::OS, std::env::consts::EXE_SUFFIX);
    let bytes = std::fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
    std::fs::write(dist.join(&name), &bytes)?;
    let digest: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(dist.join(format!("{name}.sha256")), format!("{digest}  {name}\n"))?;
    std::fs::write(dist.join(format!("RELEASE-NOTES-{version}.md")), format!("# lora {version}\n\n{notes}\n"))?;
    eprintln!("dist/{name} (sha256 {digest})");
    Ok(())
}

/// Today's UTC date as YYYY-MM-DD (civil-from-days, H. Hinnant's algorithm).
pub fn today() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_bump() {
        assert_eq!(next_version("0.1.0", "patch").unwrap(), "0.1.1");
        assert_eq!(next_version("0.1.3", "minor").unwrap(), "0.2.0");
        assert_eq!(next_version("0.9.3", "major").unwrap(), "1.0.0");
        assert_eq!(next_version("0.1.0", "0.3.0").unwrap(), "0.3.0");
        assert!(next_version("0.3.0", "0.2.9").is_err());
        assert!(next_version("0.3.0", "banana").is_err());
        assert!(next_version("0.3", "patch").is_err());
    }

    #[test]
    fn manifest_bump_touches_workspace_version_and_internal_requirements_only() {
        let mut doc: DocumentMut = r#"[workspace.package]
version = "0.1.0" # the one version

[workspace.dependencies]
lora-core = { path = "crates/lora-core", version = "0.1.0" }
ndarray = { version = "0.17.2", default-features = false }
serde = "1.0"
"#
        .parse()
        .unwrap();
        let bumped = bump_manifest(&mut doc, "0.2.0").unwrap();
        assert_eq!(bumped, ["lora-core"]);
        let text = doc.to_string();
        assert!(text.contains("version = \"0.2.0\" # the one version"), "{text}");
        assert!(text.contains("lora-core = { path = \"crates/lora-core\", version = \"0.2.0\" }"), "{text}");
        assert!(text.contains("ndarray = { version = \"0.17.2\""), "{text}");
    }

    #[test]
    fn changelog_is_finalised_and_an_empty_section_refused() {
        let text = "# Changelog\n\n## Unreleased\n\n### Added\n- a thing\n\n## 0.1.0 - 2026-01-01\n- old\n";
        let (out, notes) = finalize_changelog(text, "0.2.0", "2026-11-30").unwrap();
        assert_eq!(
            out,
            "# Changelog\n\n## Unreleased\n\n## 0.2.0 - 2026-11-30\n\n### Added\n- a thing\n\n## 0.1.0 - 2026-01-01\n- old\n"
        );
        assert_eq!(notes, "### Added\n- a thing");
        let empty = "# Changelog\n\n## Unreleased\n\n### Added\n\n## 0.1.0 - 2026-01-01\n- old\n";
        assert!(finalize_changelog(empty, "0.2.0", "2026-11-30").unwrap_err().to_string().contains("empty"));
        assert!(finalize_changelog("# Changelog\n", "0.2.0", "x").is_err());
    }

    #[test]
    fn today_is_a_date() {
        let d = today();
        assert_eq!(d.len(), 10);
        assert!(d.starts_with("20"), "{d}");
    }
}
