//! Tests of the streaming data pipeline: the blocks, the split and the fingerprint equal those
//! of packing the whole data in memory (the pipeline before it streamed), for text and JSONL,
//! u16 and u32 storage; tokenizer.json text tokenised in pieces equals eval's tokens; ids outside
//! the vocabulary are refused.

use std::path::Path;

use crate::data::{pack, read_records, stream_records_in, Block, Dataset, Event, Record, TextTokenizer};
use crate::eval::tokenize_file;
use crate::IGNORE_INDEX;

const FIXTURE_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/train/llama_tied/model");

/// The in-memory pipeline: pack everything, hold out the tail, drop blocks with nothing to predict.
fn reference(records: &[Record], seq_len: usize, val_fraction: f64) -> (Vec<Block>, Vec<Block>) {
    let mut train = pack(records, seq_len);
    let n = train.len();
    let n_val = if val_fraction > 0.0 { ((val_fraction * n as f64).round() as usize).max(1) } else { 0 };
    let val = train.split_off(n - n_val);
    train.retain(|b| b.labels.iter().skip(1).any(|&l| l != IGNORE_INDEX));
    (train, val)
}

/// The fingerprint as the in-memory dataset computed it.
fn reference_fingerprint(train: &[Block], val: &[Block], seq_len: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |v: u64| {
        for b in v.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(seq_len as u64);
    for (split, blocks) in [(1, train), (2, val)] {
        eat(split);
        eat(blocks.len() as u64);
        for b in blocks {
            b.ids.iter().for_each(|&i| eat(u64::from(i)));
            b.labels.iter().for_each(|&l| eat(l as u64));
        }
    }
    h
}

fn assert_same(d: &Dataset, train: &[Block], val: &[Block]) {
    assert_eq!((d.n_train(), d.n_val()), (train.len(), val.len()));
    for (i, b) in train.iter().enumerate() {
        assert_eq!(&d.train_block(i).unwrap(), b, "training block {i}");
    }
    for (i, b) in val.iter().enumerate() {
        assert_eq!(&d.val_block(i).unwrap(), b, "validation block {i}");
    }
    assert!(d.train_block(train.len()).is_err() && d.val_block(val.len()).is_err());
    assert_eq!(d.fingerprint().unwrap(), reference_fingerprint(train, val, d.seq_len()));
}

#[test]
fn streamed_text_equals_in_memory_packing() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t.txt");
    let text: String = (0..3000).map(|i| format!("line {i}: {}\n", "ab".repeat(i % 7))).collect();
    std::fs::write(&path, &text).unwrap();
    let records = read_records(&path, &TextTokenizer::bytes()).unwrap();
    for (seq_len, val) in [(16, 0.1), (33, 0.0), (7, 0.5)] {
        let (train, held) = reference(&records, seq_len, val);
        // u16 storage (bytes), then u32 storage (a vocabulary over 2^15)
        for vocab in [256, 40_000] {
            let d = Dataset::load(tmp.path(), &path, vocab, seq_len, val).unwrap();
            assert_same(&d, &train, &held);
        }
        assert_same(&Dataset::from_records(&records, seq_len, val, &path).unwrap(), &train, &held);
    }
}

#[test]
fn streamed_jsonl_drops_prompt_only_blocks_as_before() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("d.jsonl");
    // long prompts, short completions: many blocks hold no counted label and are dropped
    let lines: String = (0..400)
        .map(|i| {
            if i % 5 == 0 {
                format!("{{\"text\": \"plain {i}\"}}\n")
            } else {
                format!("{{\"prompt\": \"{}?\", \"completion\": \"{i}\"}}\n\n", "q".repeat(20 + i % 30))
            }
        })
        .collect();
    std::fs::write(&path, lines).unwrap();
    let records = read_records(&path, &TextTokenizer::bytes()).unwrap();
    assert_eq!(records.len(), 400);
    let (train, held) = reference(&records, 8, 0.2);
    assert!(train.len() + held.len() < pack(&records, 8).len(), "some blocks are dropped");
    assert_same(&Dataset::load(tmp.path(), &path, 256, 8, 0.2).unwrap(), &train, &held);
}

#[test]
fn tokenizer_text_in_pieces_equals_eval_tokens() {
    let model = Path::new(FIXTURE_MODEL);
    let tokenizer = TextTokenizer::load(model, 200).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t.txt");
    let text: String = (0..300)
        .map(|i| format!("the cat {i} sat on\n  the mat,\n\nand then {}\n", "it ran. ".repeat(i % 4)))
        .collect();
    std::fs::write(&path, &text).unwrap();
    let whole = tokenize_file(model, &path, 200).unwrap().ids;
    for piece in [1, 7, 64, 1000, 1 << 20] {
        let mut ids = Vec::new();
        stream_records_in(&path, &tokenizer, piece, |e| {
            if let Event::Tokens { ids: t, .. } = e {
                ids.extend_from_slice(t);
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(ids, whole, "pieces of {piece} bytes");
    }
}

#[test]
fn ids_outside_the_vocabulary_and_bad_text_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t.txt");
    std::fs::write(&path, "the cat sat on the mat\n".repeat(20)).unwrap();
    // the fixture's tokenizer has 200 ids; a model of 20 cannot take them
    let model = Path::new(FIXTURE_MODEL);
    let err = Dataset::load(model, &path, 20, 8, 0.0).unwrap_err().to_string();
    assert!(err.contains("t.txt") && err.contains("outside the vocabulary of 20"), "{err}");
    std::fs::write(&path, b"ok\n\xff\xfe not utf-8\n").unwrap();
    let err = Dataset::load(model, &path, 200, 2, 0.0).unwrap_err().to_string();
    assert!(err.contains("t.txt") && err.contains("UTF-8"), "{err}");
    let jsonl = tmp.path().join("d.jsonl");
    std::fs::write(&jsonl, b"{\"text\": \"a\"}\n\xff\n").unwrap();
    let err = Dataset::load(tmp.path(), &jsonl, 256, 2, 0.0).unwrap_err().to_string();
    assert!(err.contains("d.jsonl:2") && err.contains("UTF-8"), "{err}");
}
