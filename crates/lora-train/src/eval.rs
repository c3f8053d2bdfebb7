//! The library side of `lora eval`: tokens from a text file, cut into blocks, and the mean
//! next-token loss and perplexity of a model over them.
//!
//! The convention, so results compare with transformers: the tokens are cut into consecutive
//! blocks of exactly `seq_len`, the final partial block is dropped, each block is an
//! independent sequence; position t predicts token t + 1; the loss is the mean cross-entropy
//! over all n_blocks x (seq_len - 1) predictions and the perplexity is exp(loss). This is what
//! `model(input_ids=block, labels=block).loss` computes in transformers (averaged over blocks of
//! equal length, which is the same mean).

use std::path::{Path, PathBuf};

use lora_core::Scalar;
use ndarray::Array2;

use crate::error::{Error, Result};
use crate::model::{Batch, Loss, Model};

/// Where the tokens came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tokenization {
    /// The model folder's tokenizer.json (encoded without special tokens: no BOS is added).
    Tokenizer(PathBuf),
    /// The file's raw bytes, one byte one token (the model's vocabulary must hold 256 ids).
    Bytes,
}

/// A token stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// The token ids.
    pub ids: Vec<u32>,
    /// How they were made.
    pub tokenization: Tokenization,
}

/// Tokenize `data` (the contents of the file `data_name`) with `model_dir/tokenizer.json` when
/// the folder has one, else as raw bytes, which needs `vocab_size >= 256`.
pub fn tokenize(model_dir: &Path, data: &[u8], data_name: &str, vocab_size: usize) -> Result<Tokens> {
    let tokenizer_path = model_dir.join("tokenizer.json");
    if tokenizer_path.is_file() {
        let file = tokenizer_path.display().to_string();
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| Error::Tokenizer { file: file.clone(), message: e.to_string() })?;
        let text = std::str::from_utf8(data)
            .map_err(|e| Error::Input(format!("{data_name} is not UTF-8 text ({e}); tokenizer.json needs text")))?;
        let encoding = tokenizer.encode(text, false).map_err(|e| Error::Tokenizer { file, message: e.to_string() })?;
        return Ok(Tokens { ids: encoding.get_ids().to_vec(), tokenization: Tokenization::Tokenizer(tokenizer_path) });
    }
    if vocab_size < 256 {
        return Err(Error::Input(format!(
            "{} has no tokenizer.json and the vocabulary ({vocab_size}) is too small for raw bytes (256 needed)",
            model_dir.display()
        )));
    }
    Ok(Tokens { ids: data.iter().map(|&b| u32::from(b)).collect(), tokenization: Tokenization::Bytes })
}

/// Read the file `data` and [`tokenize`] it.
pub fn tokenize_file(model_dir: &Path, data: &Path, vocab_size: usize) -> Result<Tokens> {
    let bytes = std::fs::read(data).map_err(|source| Error::Io { path: data.to_path_buf(), source })?;
    tokenize(model_dir, &bytes, &data.display().to_string(), vocab_size)
}

/// The result of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalReport {
    /// Mean cross-entropy (nats) over every prediction.
    pub loss: f64,
    /// exp(loss).
    pub perplexity: f64,
    /// Number of predictions: blocks x (seq_len - 1).
    pub tokens: usize,
    /// Number of blocks.
    pub blocks: usize,
    /// Block length.
    pub seq_len: usize,
}

impl EvalReport {
    /// The report as one JSON object (`loss`, `perplexity`, `tokens`, `blocks`, `seq_len`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "loss": self.loss,
            "perplexity": self.perplexity,
            "tokens": self.tokens,
            "blocks": self.blocks,
            "seq_len": self.seq_len,
        })
    }
}

/// Loss and perplexity of `model` on `tokens` cut into blocks of `seq_len`, run `batch_size`
/// blocks at a time (memory grows with it; the result does not depend on it).
pub fn evaluate<T: Scalar>(model: &Model<T>, tokens: &[u32], seq_len: usize, batch_size: usize) -> Result<EvalReport> {
    if seq_len < 2 {
        return Err(Error::Input(format!("seq_len must be at least 2, got {seq_len}")));
    }
    if batch_size == 0 {
        return Err(Error::Input("batch size must be at least 1".into()));
    }
    let blocks = tokens.len() / seq_len;
    if blocks == 0 {
        return Err(Error::Input(format!("{} tokens do not fill one block of {seq_len}", tokens.len())));
    }
    let mut total = Loss { sum: 0.0, count: 0 };
    for first in (0..blocks).step_by(batch_size) {
        let n = batch_size.min(blocks - first);
        let ids = &tokens[first * seq_len..(first + n) * seq_len];
        let batch = Batch::new(Array2::from_shape_vec((n, seq_len), ids.to_vec()).expect("n x seq_len tokens"))?;
        let loss = model.loss(&batch)?;
        total.sum += loss.sum;
        total.count += loss.count;
    }
    let loss = total.mean();
    Ok(EvalReport { loss, perplexity: loss.exp(), tokens: total.count, blocks, seq_len })
}
