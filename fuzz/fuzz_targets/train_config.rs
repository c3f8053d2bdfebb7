//! Fuzz target: lora-train's model loading (config.json + model.safetensors) and one forward pass.
//! The harness is `tests::fuzzing::train_config` (tests/fuzzing.rs), also run on the corpus by `cargo test`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tests::fuzzing::train_config(data);
});
