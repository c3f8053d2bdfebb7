//! Training data: a plain text file or JSONL records, tokenised as `lora eval` does, packed into
//! fixed-length blocks with per-token loss flags, split into training and validation blocks, and
//! shuffled per epoch from a seed.
//!
//! - A plain text file is one token stream (`eval`'s tokens; see [`stream_records`] for tokenizer.json
//!   text over a MiB) and every token counts.
//! - A `.jsonl` file holds one object per line: `{"text": ...}` (every token counts) or
//!   `{"prompt": ..., "completion": ...}` (only the completion's tokens count: the prompt's
//!   labels are [`IGNORE_INDEX`]). Each record is followed by a newline (`"\n"`, tokenised and
//!   counted with the text or completion) so that the model learns where a record ends. Prompt
//!   and completion are tokenised separately, so the boundary is exact.
//! - Records are concatenated and cut into blocks of exactly `seq_len` tokens; the final partial
//!   block is dropped (eval's convention). The last `round(val_fraction x blocks)` blocks are
//!   the validation split (at least one when the fraction is positive); training blocks in which no
//!   token counts are dropped.
//!
//! Memory is bounded by the batch, not the data set: [`Dataset::load`] tokenises the file in one
//! streaming pass ([`stream_records`]: a JSONL line or about a MiB of text at a time) into an
//! unnamed temporary file of 2-byte (vocabularies up to 2^15) or 4-byte words, the top bit of each
//! being the loss flag, and reads blocks back by index. What stays in memory is O(blocks): the
//! kept training blocks (4 bytes each, only when some are dropped), a bit per block while
//! packing, and the epoch order (8 bytes per training block).

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

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

/// What a streaming read of the data gives, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// Tokens of the current record; `counted` says whether predicting them counts in the loss.
    Tokens {
        /// Token ids.
        ids: &'a [u32],
        /// Do these tokens count in the loss.
        counted: bool,
    },
    /// The current record ends.
    RecordEnd,
}

/// Bytes of a plain text file tokenised at once with a tokenizer.json.
const TEXT_PIECE: usize = 1 << 20;

/// Read `data` (plain text, or JSONL when its name ends in `.jsonl`) and give its tokens to `on`
/// as they are made, never holding more than a piece of the file: a JSONL line, or about
/// a MiB of plain text.
///
/// Plain text is read in pieces cut after a newline that a non-whitespace character follows
/// (a piece grows until it holds such a cut). With raw bytes the tokens are exactly
/// [`crate::eval::tokenize`]'s. With a tokenizer.json they are too for a file of up to a piece,
/// and for larger files whenever the tokenizer's pre-tokenizer never joins a newline with the
/// character after it (the byte-level regexes of GPT-2 and Llama 3 do not); a SentencePiece
/// (Metaspace) tokenizer may tokenise the first word of a piece differently.
pub fn stream_records(data: &Path, tokenizer: &TextTokenizer, on: impl FnMut(Event<'_>) -> Result<()>) -> Result<()> {
    stream_records_in(data, tokenizer, TEXT_PIECE, on)
}

/// [`stream_records`] with plain text tokenised in pieces of about `piece` bytes.
pub(crate) fn stream_records_in(
    data: &Path,
    tokenizer: &TextTokenizer,
    piece: usize,
    mut on: impl FnMut(Event<'_>) -> Result<()>,
) -> Result<()> {
    let io = |source| Error::Io { path: data.to_path_buf(), source };
    let file = std::fs::File::open(data).map_err(io)?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let name = data.display().to_string();
    let is_jsonl = data.extension().is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    if !is_jsonl {
        match tokenizer.tokenization {
            Tokenization::Bytes => {
                let mut buf = vec![0u8; 1 << 20];
                let mut ids = Vec::with_capacity(buf.len());
                loop {
                    let n = reader.read(&mut buf).map_err(io)?;
                    if n == 0 {
                        break;
                    }
                    ids.clear();
                    ids.extend(buf[..n].iter().map(|&b| u32::from(b)));
                    on(Event::Tokens { ids: &ids, counted: true })?;
                }
            }
            Tokenization::Tokenizer(_) => {
                let mut pending: Vec<u8> = Vec::new();
                let mut consumed = 0usize; // bytes of the file before `pending`
                let mut chunk = vec![0u8; piece.max(1)];
                let mut eof = false;
                while !eof || !pending.is_empty() {
                    if !eof && pending.len() < piece {
                        let n = reader.read(&mut chunk).map_err(io)?;
                        eof = n == 0;
                        pending.extend_from_slice(&chunk[..n]);
                        if !eof {
                            continue;
                        }
                    }
                    let cut = if eof { pending.len() } else { text_cut(&pending).unwrap_or(0) };
                    if cut == 0 {
                        // no cut yet: read on (the piece grows to the next line break)
                        let n = reader.read(&mut chunk).map_err(io)?;
                        eof = n == 0;
                        pending.extend_from_slice(&chunk[..n]);
                        continue;
                    }
                    let text = std::str::from_utf8(&pending[..cut]).map_err(|e| {
                        Error::Input(format!(
                            "{name} is not UTF-8 text (invalid byte at offset {}); tokenizer.json needs text",
                            consumed + e.valid_up_to()
                        ))
                    })?;
                    let ids = tokenizer.encode(text, &name)?;
                    on(Event::Tokens { ids: &ids, counted: true })?;
                    pending.drain(..cut);
                    consumed += cut;
                }
            }
        }
        return on(Event::RecordEnd);
    }
    let mut line = Vec::new();
    let mut number = 0usize;
    let mut any = false;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(io)?;
        if n == 0 {
            break;
        }
        number += 1;
        let at = format!("{name}:{number}");
        let text = std::str::from_utf8(&line).map_err(|e| Error::Input(format!("{at} is not UTF-8 ({e})")))?;
        let text = text.strip_suffix('\n').map_or(text, |t| t.strip_suffix('\r').unwrap_or(t));
        any |= jsonl_line(text, &at, tokenizer, &mut on)?;
    }
    if !any {
        return Err(Error::Input(format!("{name} holds no record")));
    }
    Ok(())
}

/// The end of the last line of `bytes` after which a non-whitespace character starts a line.
fn text_cut(bytes: &[u8]) -> Option<usize> {
    (1..bytes.len()).rev().find(|&i| bytes[i - 1] == b'\n' && !bytes[i].is_ascii_whitespace())
}

/// Tokenise one JSONL line (`at` names it in errors); false for a blank line.
fn jsonl_line(
    line: &str,
    at: &str,
    tokenizer: &TextTokenizer,
    on: &mut impl FnMut(Event<'_>) -> Result<()>,
) -> Result<bool> {
    if line.trim().is_empty() {
        return Ok(false);
    }
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|source| Error::Json { file: at.to_string(), source })?;
    let field = |key: &str| -> Result<Option<&str>> {
        match value.get(key) {
            None => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(Error::Input(format!("{at}: field {key:?} is not a string"))),
        }
    };
    match (field("text")?, field("prompt")?, field("completion")?) {
        (Some(t), None, None) => on(Event::Tokens { ids: &tokenizer.encode(&format!("{t}\n"), at)?, counted: true })?,
        (None, Some(p), Some(c)) => {
            on(Event::Tokens { ids: &tokenizer.encode(p, at)?, counted: false })?;
            on(Event::Tokens { ids: &tokenizer.encode(&format!("{c}\n"), at)?, counted: true })?;
        }
        _ => {
            return Err(Error::Input(format!(
                "{at}: expected an object with \"text\", or with \"prompt\" and \"completion\""
            )))
        }
    }
    on(Event::RecordEnd)?;
    Ok(true)
}

/// Read `data` (plain text, or JSONL when its name ends in `.jsonl`) into tokenised records, in
/// memory ([`stream_records`] gives the same tokens without holding them).
pub fn read_records(data: &Path, tokenizer: &TextTokenizer) -> Result<Vec<Record>> {
    let mut records = Records::default();
    stream_records(data, tokenizer, |event| {
        records.push(event);
        Ok(())
    })?;
    Ok(records.done)
}

/// Records assembled from [`Event`]s.
#[derive(Default)]
struct Records {
    done: Vec<Record>,
    current: Record,
}

impl Records {
    fn push(&mut self, event: Event<'_>) {
        match event {
            Event::Tokens { ids, counted } => {
                self.current.ids.extend_from_slice(ids);
                self.current.counts.resize(self.current.ids.len(), counted);
            }
            Event::RecordEnd => self.done.push(std::mem::take(&mut self.current)),
        }
    }
}

/// Parse JSONL `text` (named `name` in errors) into tokenised records.
pub fn parse_jsonl(text: &str, name: &str, tokenizer: &TextTokenizer) -> Result<Vec<Record>> {
    let mut collected = Records::default();
    for (i, line) in text.lines().enumerate() {
        jsonl_line(line, &format!("{name}:{}", i + 1), tokenizer, &mut |event| {
            collected.push(event);
            Ok(())
        })?;
    }
    let records = collected.done;
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

/// Tokens packed into blocks as they stream in, stored in an unnamed temporary file (in
/// `std::env::temp_dir()`, so `TMPDIR`): one little-endian word per token, u16 when the
/// vocabulary has at most 2^15 ids, else u32, whose top bit says whether the token counts.
#[derive(Debug)]
struct Packer {
    seq_len: usize,
    width: usize,
    vocab: u64,
    out: BufWriter<File>,
    /// The encoded words of one `push`.
    scratch: Vec<u8>,
    tokens: usize,
    /// Does the block being filled have a counted label past its first position.
    block_counts: bool,
    /// One bit per finished block: does it have something to predict.
    useful: Vec<u64>,
    source: PathBuf,
}

fn temp_error(source: std::io::Error) -> Error {
    Error::Io { path: std::env::temp_dir(), source }
}

impl Packer {
    fn new(seq_len: usize, vocab: usize, source: &Path) -> Result<Self> {
        let width = if vocab <= 1 << 15 { 2 } else { 4 };
        if vocab as u64 > 1 << 31 {
            return Err(Error::Input(format!("a vocabulary of {vocab} ids is over the 2^31 the data store holds")));
        }
        let file = tempfile::tempfile().map_err(temp_error)?;
        Ok(Packer {
            seq_len,
            width,
            vocab: vocab as u64,
            out: BufWriter::with_capacity(1 << 20, file),
            scratch: Vec::new(),
            tokens: 0,
            block_counts: false,
            useful: Vec::new(),
            source: source.to_path_buf(),
        })
    }

    fn push(&mut self, ids: &[u32], counted: bool) -> Result<()> {
        let flag = 1u32 << (8 * self.width - 1);
        self.scratch.clear();
        for &id in ids {
            if u64::from(id) >= self.vocab {
                return Err(Error::Input(format!(
                    "{}: token id {id} is outside the vocabulary of {}",
                    self.source.display(),
                    self.vocab
                )));
            }
            let word = if counted { id | flag } else { id };
            self.scratch.extend_from_slice(&word.to_le_bytes()[..self.width]);
            let position = self.tokens % self.seq_len;
            self.block_counts |= counted && position > 0;
            self.tokens += 1;
            if position + 1 == self.seq_len {
                let block = self.tokens / self.seq_len - 1;
                if block % 64 == 0 {
                    self.useful.push(0);
                }
                self.useful[block / 64] |= u64::from(self.block_counts) << (block % 64);
                self.block_counts = false;
            }
        }
        self.out.write_all(&self.scratch).map_err(temp_error)
    }

    fn finish(self, val_fraction: f64) -> Result<Dataset> {
        let name = self.source.display();
        let seq_len = self.seq_len;
        let n = self.tokens / seq_len;
        let n_val = if val_fraction > 0.0 { ((val_fraction * n as f64).round() as usize).max(1) } else { 0 };
        if n_val >= n {
            return Err(Error::Input(format!(
                "{name}: {} tokens make {n} blocks of {seq_len}, too few for training with {n_val} validation blocks",
                self.tokens
            )));
        }
        let useful = |b: usize| (self.useful[b / 64] >> (b % 64)) & 1 == 1;
        // a block with nothing to predict adds nothing to training: drop it
        let kept = (0..n - n_val).filter(|&b| useful(b)).count();
        if kept == 0 {
            return Err(Error::Input(format!("{name}: no training block has a token that counts in the loss")));
        }
        let train = if kept == n - n_val {
            None
        } else {
            let index: Vec<u32> = (0..n - n_val).filter(|&b| useful(b)).map(|b| b as u32).collect();
            Some(index)
        };
        let file = self.out.into_inner().map_err(|e| temp_error(e.into_error()))?;
        Ok(Dataset {
            file: Arc::new(Mutex::new(file)),
            width: self.width,
            seq_len,
            blocks: n,
            n_train: kept,
            train,
            n_val,
            fingerprint: OnceLock::new(),
            source: self.source,
        })
    }
}

/// A training set and a validation set of packed blocks, kept on disk: memory holds one batch
/// of blocks at a time (and 4 bytes per training block when some blocks are dropped), whatever
/// the size of the data.
///
/// The tokens are in an unnamed temporary file (see [`Dataset::load`]); blocks are read back by
/// index, so shuffling, packing and the validation split work on block indices. A clone shares
/// the file.
#[derive(Debug, Clone)]
pub struct Dataset {
    file: Arc<Mutex<File>>,
    /// Bytes per stored token (2 or 4); the top bit is the loss flag.
    width: usize,
    seq_len: usize,
    /// Blocks in the file (training region, then the validation tail).
    blocks: usize,
    n_train: usize,
    /// The kept training blocks, when some were dropped (else blocks 0..n_train).
    train: Option<Vec<u32>>,
    n_val: usize,
    fingerprint: OnceLock<u64>,
    source: PathBuf,
}

impl Dataset {
    /// Pack `records` into blocks of `seq_len` and hold out the last `round(val_fraction x
    /// blocks)` (at least one when `val_fraction > 0`). `source` names the data in errors.
    pub fn from_records(records: &[Record], seq_len: usize, val_fraction: f64, source: &Path) -> Result<Self> {
        check_split(seq_len, val_fraction)?;
        let vocab = records.iter().flat_map(|r| r.ids.iter()).max().map_or(1, |&m| m as usize + 1);
        let mut packer = Packer::new(seq_len, vocab, source)?;
        for r in records {
            for (i, &id) in r.ids.iter().enumerate() {
                packer.push(&[id], r.counts.get(i).copied().unwrap_or(true))?;
            }
        }
        packer.finish(val_fraction)
    }

    /// Read and tokenise `data` ([`stream_records`]) with the tokenizer of `model_dir` in one
    /// streaming pass, packing the tokens into an unnamed temporary file in
    /// `std::env::temp_dir()` (`TMPDIR`): 2 bytes per token for vocabularies of up to 2^15 ids,
    /// else 4. A token id of `vocab_size` or more is an error naming the data file.
    pub fn load(model_dir: &Path, data: &Path, vocab_size: usize, seq_len: usize, val_fraction: f64) -> Result<Self> {
        check_split(seq_len, val_fraction)?;
        let tokenizer = TextTokenizer::load(model_dir, vocab_size)?;
        let mut packer = Packer::new(seq_len, vocab_size, data)?;
        stream_records(data, &tokenizer, |event| match event {
            Event::Tokens { ids, counted } => packer.push(ids, counted),
            Event::RecordEnd => Ok(()),
        })?;
        packer.finish(val_fraction)
    }

    /// Block length.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Where the data came from (for error messages).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Number of training blocks.
    pub fn n_train(&self) -> usize {
        self.n_train
    }

    /// Number of held-out blocks (0 when the fraction is 0).
    pub fn n_val(&self) -> usize {
        self.n_val
    }

    /// Training block `i` (`i < n_train`).
    pub fn train_block(&self, i: usize) -> Result<Block> {
        if i >= self.n_train {
            return Err(Error::Input(format!("training block {i} of {} does not exist", self.n_train)));
        }
        let block = self.train.as_ref().map_or(i, |t| t[i] as usize);
        self.read_block(block)
    }

    /// Held-out block `i` (`i < n_val`).
    pub fn val_block(&self, i: usize) -> Result<Block> {
        if i >= self.n_val {
            return Err(Error::Input(format!("validation block {i} of {} does not exist", self.n_val)));
        }
        self.read_block(self.blocks - self.n_val + i)
    }

    fn read_block(&self, block: usize) -> Result<Block> {
        let mut bytes = vec![0u8; self.seq_len * self.width];
        {
            let mut f = self.file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            f.seek(SeekFrom::Start((block * bytes.len()) as u64)).map_err(temp_error)?;
            f.read_exact(&mut bytes).map_err(temp_error)?;
        }
        let mut ids = Vec::with_capacity(self.seq_len);
        let mut labels = Vec::with_capacity(self.seq_len);
        for (id, counted) in self.decode(&bytes) {
            ids.push(id);
            labels.push(if counted { i64::from(id) } else { IGNORE_INDEX });
        }
        Ok(Block { ids, labels })
    }

    fn decode<'a>(&self, bytes: &'a [u8]) -> impl Iterator<Item = (u32, bool)> + 'a {
        let width = self.width;
        let flag = 1u32 << (8 * width - 1);
        bytes.chunks_exact(width).map(move |c| {
            let word = if width == 2 {
                u32::from(u16::from_le_bytes([c[0], c[1]]))
            } else {
                u32::from_le_bytes([c[0], c[1], c[2], c[3]])
            };
            (word & !flag, word & flag != 0)
        })
    }

    /// A 64-bit FNV-1a fingerprint of every block (ids and labels, training and validation), so
    /// a resumed run can check that its data did not change. Computed on first use in one
    /// sequential pass over the stored tokens.
    pub fn fingerprint(&self) -> Result<u64> {
        if let Some(&h) = self.fingerprint.get() {
            return Ok(h);
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |v: u64| {
            for b in v.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        eat(self.seq_len as u64);
        eat(1);
        eat(self.n_train as u64);
        let mut f = self.file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f.seek(SeekFrom::Start(0)).map_err(temp_error)?;
        let block_bytes = self.seq_len * self.width;
        let per_read = (1 << 20) / block_bytes.max(1) + 1;
        let mut buf = vec![0u8; per_read * block_bytes];
        let mut next_kept = 0usize; // index into the kept list
        let mut block = 0usize;
        while block < self.blocks {
            let n = per_read.min(self.blocks - block);
            let bytes = &mut buf[..n * block_bytes];
            f.read_exact(bytes).map_err(temp_error)?;
            for b in bytes.chunks_exact(block_bytes) {
                if block == self.blocks - self.n_val {
                    eat(2);
                    eat(self.n_val as u64);
                }
                let in_val = block >= self.blocks - self.n_val;
                let kept = in_val
                    || match &self.train {
                        None => true,
                        Some(t) => t.get(next_kept) == Some(&(block as u32)),
                    };
                if kept {
                    if !in_val {
                        next_kept += 1;
                    }
                    let tokens: Vec<(u32, bool)> = self.decode(b).collect();
                    tokens.iter().for_each(|&(id, _)| eat(u64::from(id)));
                    tokens.iter().for_each(|&(id, c)| eat(if c { u64::from(id) } else { IGNORE_INDEX as u64 }));
                }
                block += 1;
            }
        }
        if self.n_val == 0 {
            eat(2);
            eat(0);
        }
        let _ = self.fingerprint.set(h);
        Ok(h)
    }
}

fn check_split(seq_len: usize, val_fraction: f64) -> Result<()> {
    if seq_len < 2 {
        return Err(Error::Input(format!("seq_len must be at least 2, got {seq_len}")));
    }
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(Error::Input(format!("val_fraction must be in [0, 1), got {val_fraction}")));
    }
    Ok(())
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
