//! Tests of lora-svd.
