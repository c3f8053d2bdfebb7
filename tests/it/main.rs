//! The one integration-test binary of the workspace: cross-crate tests and the tidy rules.

mod fuzz_corpus;
mod io_fixtures;
mod release;
mod tidy;
mod train_model;
mod trainer;
