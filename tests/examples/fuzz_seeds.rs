//! Write the fuzz seeds (tests/seeds.rs) into `fuzz/corpus/<target>/seed-<name>`:
//! `cargo run -p tests --example fuzz_seeds`. Run it before fuzzing a fresh corpus, then
//! `cargo +nightly fuzz cmin <target>` (docs/reliability.md). With `--table` it writes nothing
//! and prints the hostile inputs' rows of docs/reliability.md with the outcomes they give now.

use std::path::Path;

use tests::fuzzing::TARGETS;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace root");
    if std::env::args().any(|a| a == "--table") {
        for s in tests::seeds::hostile() {
            let target = TARGETS.iter().find(|t| t.name == s.target).expect("known target");
            let outcome = match (target.run)(&s.bytes) {
                Ok(()) => "accepted".to_string(),
                Err(e) => format!("`{}`", e.replace('|', "\\|").replace('`', "'").replace('\n', " ")),
            };
            println!("| `{}/{}` | {} bytes | {outcome} |", s.target, s.name, s.bytes.len());
        }
        return Ok(());
    }
    let seeds = tests::seeds::all(root);
    for s in &seeds {
        let dir = root.join("fuzz/corpus").join(s.target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{}", s.name)), &s.bytes)?;
    }
    println!("wrote {} seeds under {}", seeds.len(), root.join("fuzz/corpus").display());
    Ok(())
}
