//! lora_svd: filled by a later issue.
