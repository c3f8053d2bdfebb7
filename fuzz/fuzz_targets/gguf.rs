//! Fuzz target: a GGUF LoRA adapter (GgufFile, every tensor decoded, read_gguf).
//! The harness is `tests::fuzzing::gguf` (tests/fuzzing.rs), also run on the corpus by `cargo test`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tests::fuzzing::gguf(data);
});
