//! Fuzz target: a Hugging Face model folder (config.json, index, shards) through ModelFolder.
//! The harness is `tests::fuzzing::model_folder` (tests/fuzzing.rs), also run on the corpus by `cargo test`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tests::fuzzing::model_folder(data);
});
