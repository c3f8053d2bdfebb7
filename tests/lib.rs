//! Cross-crate integration tests live in `it/`. This library holds what they share with the
//! cargo-fuzz targets in `fuzz/`: the fuzz harnesses and their seed inputs.

pub mod fuzzing;
pub mod seeds;
