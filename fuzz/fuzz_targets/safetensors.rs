//! Fuzz target: a safetensors file (SafetensorsFile: header, then every tensor decoded).
//! The harness is `tests::fuzzing::safetensors` (tests/fuzzing.rs), also run on the corpus by `cargo test`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tests::fuzzing::safetensors(data);
});
