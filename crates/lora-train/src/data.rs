//! Training data: a plain text file or JSONL records, tokenised as `lora eval` does, packed into
//! fixed-length blocks with per-token loss flags, split into training and validation blocks, and
//! shuffled per epoch from a seed.
//!
//! - A plain text file is one token stream (exactly `eval`'s tokens) and every token counts.
//! - A `.jsonl` file holds one object per line: `{"text": ...}` (every token counts) or
//!   `{"prompt": ..., "completion": ...}` (only the completion's tokens count: the prompt's
//!   labels are [`IGNORE_INDEX`]). Each record is followed by a newline (`"\n"`, tokenised and
//!   counted with the text or completion) so that the model learns where a record ends. Prompt
//!   and completion are tokenised separately, so the boundary is exact.
//! - Records are concatenated and cut into blocks of exactly `seq_len` tokens; the final partial
//!   block is dropped (eval's convention). The last `round(val_fraction x blocks)` blocks are
//!   the validation split (at least one when the fraction is positive); training blocks in which no
//!   token counts are dropped.

use std::path::{Path, PathBuf};

use ndarray::Array2;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::eval::Tokenization;
use crate::model::{Batch, IGNORE_INDEX};

/// A text tokenizer loaded once: the model folder's tokenizer.json, else raw bytes.
#[derive(Debug)]
pub struct TextTokenizer {
    tokenizer: Option<tokenizers::Tokenizer>,
    tokenization: Tokenization,
}

impl TextTokenizer {
    /// `model_dir/tokenizer.json` when the folder has one, else raw bytes (which needs
    /// `vocab_size >= 256`), as [`crate::eval::tokenize`] chooses.
    pub fn load(model_dir: &Path, vocab_size: usize) -> Result<Self> {
        let path = model_dir.join("tokenizer.json");
        if path.is_file() {
            let tokenizer = tokenizers::Tokenizer::from_file(&path)
                .map_err(|e| Error::Tokenizer { file: path.display().to_string(), message: e.to_string() })?;
            return Ok(TextTokenizer { tokenizer: Some(tokenizer), tokenization: Tokenization::Tokenizer(path) });
        }
        if vocab_size < 256 {
            return Err(Error::Input(format!(
                "{} has no tokenizer.json and the vocabulary ({vocab_size}) is too small for raw bytes (256 needed)",
                model_dir.display()
            )));
        }
        Ok(TextTokenizer::bytes())
    }

    /// The raw-bytes tokenizer (one byte one token).
    pub fn bytes() -> Self {
        TextTokenizer { tokenizer: None, tokenization: Tokenization::Bytes }
    }

    /// How this tokenizer makes tokens.
    pub fn tokenization(&self) -> &Tokenization {
        &self.tokenization
    }

    /// The ids of `text` (no special tokens added). `what` names the text in errors.
    pub fn encode(&self, text: &str, what: &str) -> Result<Vec<u32>> {
        match (&self.tokenizer, &self.tokenization) {
            (Some(t), Tokenization::Tokenizer(path)) => Ok(t
                .encode(text, false)
                .map_err(|e| Error::Tokenizer { file: path.display().to_string(), message: format!("{what}: {e}") })?
                .get_ids()
                .to_vec()),
            _ => Ok(text.bytes().map(u32::from).collect()),
        }
    }

    /// The text of `ids` (lossy for bytes that are not UTF-8).
    pub fn decode(&self, ids: &[u32]) -> String {
        match &self.tokenizer {
            Some(t) => t.decode(ids, false).unwrap_or_default(),
            None => String::from_utf8_lossy(&ids.iter().map(|&i| i.min(255) as u8).collect::<Vec<u8>>()).into_owned(),
        }
    }
}

/// A tokenised record: ids and whether each token counts in the loss.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// Token ids.
    pub ids: Vec<u32>,
    /// For each token: does predicting it count in the loss.
    pub counts: Vec<bool>,
}

impl Record {
    /// A record of which every token counts.
    pub fn text(ids: Vec<u32>) -> Self {
        let counts = vec![true; ids.len()];
        Record { ids, counts }
    }

    /// A prompt (not counted) followed by a completion (counted).
    pub fn prompt_completion(prompt: Vec<u32>, completion: Vec<u32>) -> Self {
        let mut counts = vec![false; prompt.len()];
        counts.resize(prompt.len() + completion.len(), true);
        let mut ids = prompt;
        ids.extend(completion);
        Record { ids, counts }
    }
}

/// Read `data` (plain text, or JSONL when its name ends in `.jsonl`) into tokenised records.
pub fn read_records(data: &Path, tokenizer: &TextTokenizer) -> Result<Vec<Record>> {
    let bytes = std::fs::read(data).map_err(|source| Error::Io { path: data.to_path_buf(), source })?;
    let name = data.display().to_string();
    let is_jsonl = data.extension().is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    if !is_jsonl {
        let ids = match tokenizer.tokenization {
            Tokenization::Bytes => bytes.iter().map(|&b| u32::from(b)).collect(),
            Tokenization::Tokenizer(_) => {
                let text = std::str::from_utf8(&bytes)
                    .map_err(|e| Error::Input(format!("{name} is not UTF-8 text ({e}); tokenizer.json needs text")))?;
                tokenizer.encode(text, &name)?
            }
        };
        return Ok(vec![Record::text(ids)]);
    }
    let text = std::str::from_utf8(&bytes).map_err(|e| Error::Input(format!("{name} is not UTF-8 ({e})")))?;
    parse_jsonl(text, &name, tokenizer)
}

/// Parse JSONL `text` (named `name` in errors) into tokenised records.
pub fn parse_jsonl(text: &str, name: &str, tokenizer: &TextTokenizer) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{name}:{}", i + 1);
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|source| Error::Json { file: at.clone(), source })?;
        let field = |key: &str| -> Result<Option<&str>> {
            match value.get(key) {
                None => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.as_str())),
                Some(_) => Err(Error::Input(format!("{at}: field {key:?} is not a string"))),
            }
        };
        let record = match (field("text")?, field("prompt")?, field("completion")?) {
            (Some(t), None, None) => Record::text(tokenizer.encode(&format!("{t}\n"), &at)?),
            (None, Some(p), Some(c)) => {
                Record::prompt_completion(tokenizer.encode(p, &at)?, tokenizer.encode(&format!("{c}\n"), &at)?)
            }
            _ => {
                return Err(Error::Input(format!(
                    "{at}: expected an object with \"text\", or with \"prompt\" and \"completion\""
                )))
            }
        };
        records.push(record);
    }
    if records.is_empty() {
        return Err(Error::Input(format!("{name} holds no record")));
    }
    Ok(records)
}

/// One packed block: `seq_len` ids and their labels (the id, or [`IGNORE_INDEX`] where the token
/// does not count).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Labels: position t of the block predicts label t + 1.
    pub labels: Vec<i64>,
}

/// Concatenate `records` and cut them into blocks of exactly `seq_len` (the final partial block
/// is dropped).
pub fn pack(records: &[Record], seq_len: usize) -> Vec<Block> {
    let ids = records.iter().flat_map(|r| r.ids.iter().copied());
    let labels = records
        .iter()
        .flat_map(|r| r.ids.iter().zip(&r.counts).map(|(&id, &c)| if c { i64::from(id) } else { IGNORE_INDEX }));
    let (ids, labels): (Vec<u32>, Vec<i64>) = ids.zip(labels).unzip();
    ids.chunks_exact(seq_len.max(1))
        .zip(labels.chunks_exact(seq_len.max(1)))
        .map(|(i, l)| Block { ids: i.to_vec(), labels: l.to_vec() })
        .collect()
}

/// A training set and a validation set of packed blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// Blocks trained on.
    pub train: Vec<Block>,
    /// Held-out blocks for evaluation (empty when the fraction is 0).
    pub val: Vec<Block>,
    /// Block length.
    pub seq_len: usize,
    /// Where the data came from (for error messages).
    pub source: PathBuf,
}

impl Dataset {
    /// Pack `records` into blocks of `seq_len` and hold out the last `round(val_fraction x
    /// blocks)` (at least one when `val_fraction > 0`). `source` names the data in errors.
    pub fn from_records(records: &[Record], seq_len: usize, val_fraction: f64, source: &Path) -> Result<Self> {
        let name = source.display();
        if seq_len < 2 {
            return Err(Error::Input(format!("seq_len must be at least 2, got {seq_len}")));
        }
        if !(0.0..1.0).contains(&val_fraction) {
            return Err(Error::Input(format!("val_fraction must be in [0, 1), got {val_fraction}")));
        }
        let mut train = pack(records, seq_len);
        let n = train.len();
        let n_val = if val_fraction > 0.0 { ((val_fraction * n as f64).round() as usize).max(1) } else { 0 };
        if n_val >= n {
            let tokens: usize = records.iter().map(|r| r.ids.len()).sum();
            return Err(Error::Input(format!(
                "{name}: {tokens} tokens make {n} blocks of {seq_len}, too few for training with {n_val} validation blocks"
            )));
        }
        let val = train.split_off(n - n_val);
        // a block with nothing to predict adds nothing to training: drop it
        train.retain(|b| b.labels.iter().skip(1).any(|&l| l != IGNORE_INDEX));
        if train.is_empty() {
            return Err(Error::Input(format!("{name}: no training block has a token that counts in the loss")));
        }
        Ok(Dataset { train, val, seq_len, source: source.to_path_buf() })
    }

    /// Read and tokenise `data` ([`read_records`]) with the tokenizer of `model_dir`, then
    /// [`Dataset::from_records`].
    pub fn load(model_dir: &Path, data: &Path, vocab_size: usize, seq_len: usize, val_fraction: f64) -> Result<Self> {
        let tokenizer = TextTokenizer::load(model_dir, vocab_size)?;
        let records = read_records(data, &tokenizer)?;
        Dataset::from_records(&records, seq_len, val_fraction, data)
    }

    /// A 64-bit FNV-1a fingerprint of every block (ids and labels, training and validation), so
    /// a resumed run can check that its data did not change.
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |v: u64| {
            for b in v.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        eat(self.seq_len as u64);
        for (split, blocks) in [(1, &self.train), (2, &self.val)] {
            eat(split);
            eat(blocks.len() as u64);
            for b in blocks.iter() {
                b.ids.iter().for_each(|&i| eat(u64::from(i)));
                b.labels.iter().for_each(|&l| eat(l as u64));
            }
        }
        h
    }
}

/// The order of the training blocks in `epoch`: a permutation drawn from `seed` and the epoch.
pub fn epoch_order(n_blocks: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n_blocks).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(splitmix64(seed ^ splitmix64(0x5348_5546_464c_4500 ^ epoch)));
    order.shuffle(&mut rng);
    order
}

/// splitmix64's finaliser: a well-mixed 64-bit value of `x`.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A batch of blocks (every block `seq_len` long).
pub fn batch_of(blocks: &[&Block]) -> Result<Batch> {
    let seq_len = blocks.first().map_or(0, |b| b.ids.len());
    let ids: Vec<u32> = blocks.iter().flat_map(|b| b.ids.iter().copied()).collect();
    let labels: Vec<i64> = blocks.iter().flat_map(|b| b.labels.iter().copied()).collect();
    let shape = (blocks.len(), seq_len);
    let ids = Array2::from_shape_vec(shape, ids).map_err(|e| Error::Input(format!("blocks of unequal length: {e}")))?;
    let labels =
        Array2::from_shape_vec(shape, labels).map_err(|e| Error::Input(format!("blocks of unequal length: {e}")))?;
    Batch::new(ids)?.with_labels(labels)
}
