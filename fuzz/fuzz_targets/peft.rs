//! Fuzz target: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
//! The harness is `tests::fuzzing::peft` (tests/fuzzing.rs), also run on the corpus by `cargo test`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tests::fuzzing::peft(data);
});
