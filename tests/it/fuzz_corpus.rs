//! The fuzz corpora as ordinary tests: every committed input of every cargo-fuzz target
//! (`fuzz/corpus/<target>/`) is replayed through the same harness the fuzzer runs
//! (`tests::fuzzing`), so CI checks on every change that none of them panics; the hostile
//! hand-made inputs (`tests::seeds::hostile`) must give their clear errors, and each has a row in
//! docs/reliability.md.

use std::path::{Path, PathBuf};

use tests::fuzzing::{Target, TARGETS};
use tests::seeds::{self, Expect};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace root").to_path_buf()
}

fn target(name: &str) -> &'static Target {
    TARGETS.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no fuzz target {name}"))
}

/// What every error of a harness must look like: a message, naming a file of the input for
/// lora-io's readers.
fn check_error(target: &Target, input: &str, message: &str) {
    assert!(!message.trim().is_empty(), "{}: {input}: empty error message", target.name);
    if target.errors_name_a_file {
        assert!(message.starts_with("<dir>"), "{}: {input}: the error does not name the file: {message}", target.name);
    }
}

#[test]
fn every_committed_corpus_input_replays_without_a_panic() {
    for target in &TARGETS {
        let dir = root().join("fuzz/corpus").join(target.name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("folder entry").path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "the corpus of fuzz target {} ({}) is empty", target.name, dir.display());
        let mut accepted = 0;
        for file in &files {
            let data = std::fs::read(file).expect("readable corpus file");
            match (target.run)(&data) {
                Ok(()) => accepted += 1,
                Err(message) => check_error(target, &file.display().to_string(), &message),
            }
        }
        // Each corpus must also reach past the first check of its reader.
        assert!(accepted > 0, "no input of the {} corpus is accepted by its reader", target.name);
    }
}

#[test]
fn hostile_inputs_give_clear_errors() {
    let hostile = seeds::hostile();
    assert!(hostile.len() >= 40, "only {} hostile inputs", hostile.len());
    for s in &hostile {
        let t = target(s.target);
        let got = (t.run)(&s.bytes);
        let row = format!("{}/{}", s.target, s.name);
        match (&s.expect, got) {
            (Expect::Ok, Ok(())) => {}
            (Expect::Ok, Err(e)) => panic!("{row}: expected the reader to accept it, got: {e}"),
            (Expect::Error(_), Ok(())) => panic!("{row}: expected an error, the reader accepted it"),
            (Expect::Error(needle), Err(e)) => {
                check_error(t, &row, &e);
                assert!(e.contains(needle), "{row}: expected an error containing {needle:?}, got: {e}");
            }
        }
    }
}

#[test]
fn files_from_the_writers_and_the_peft_fixtures_are_accepted() {
    let mut all = seeds::made();
    all.extend(seeds::fixtures(&root()));
    for target in &TARGETS {
        assert!(all.iter().any(|s| s.target == target.name), "no valid seed for {}", target.name);
    }
    for s in &all {
        assert_eq!(s.expect, Expect::Ok);
        if let Err(e) = (target(s.target).run)(&s.bytes) {
            panic!("{}/{}: a valid file is refused: {e}", s.target, s.name);
        }
    }
}

#[test]
fn every_hostile_input_has_a_row_in_docs_reliability() {
    let doc = std::fs::read_to_string(root().join("docs/reliability.md")).expect("docs/reliability.md");
    for s in seeds::hostile() {
        let row = format!("`{}/{}`", s.target, s.name);
        assert!(doc.contains(&row), "docs/reliability.md has no row for {row}");
    }
}

#[test]
fn multi_file_inputs_split_back_into_their_parts() {
    let parts: [&[u8]; 3] = [b"{}", b"", b"\x00\xff"];
    let joined = tests::fuzzing::join_parts(&parts);
    assert_eq!(tests::fuzzing::split_parts(&joined), parts);
    assert_eq!(tests::fuzzing::split_parts(b"abc"), [b"abc"]);
}
