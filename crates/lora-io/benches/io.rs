//! Placeholder bench target (filled below).
fn main() {}
