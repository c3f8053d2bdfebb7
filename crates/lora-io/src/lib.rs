//! lora_io: filled by a later issue.
