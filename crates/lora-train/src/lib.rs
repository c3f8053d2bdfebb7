//! lora_train: filled by a later issue.
