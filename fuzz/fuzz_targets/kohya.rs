//! Fuzz target: a kohya / sd-scripts adapter file.
//! The harness is `tests::fuzzing::kohya` (tests/fuzzing.rs), also run on the corpus by `cargo test`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tests::fuzzing::kohya(data);
});
