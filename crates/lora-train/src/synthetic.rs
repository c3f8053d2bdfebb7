//! A learnable synthetic task and a tiny seeded base model, so the demo and the tests need no
//! downloaded files: [`generate`] makes prompt / completion pairs (multi-digit addition or
//! string reversal), [`answer_accuracy`] measures greedy next-token accuracy on the answers, and
//! [`write_tiny_model`] writes a small random Llama model folder (config.json and
//! model.safetensors) that [`crate::trainer::load_model`] and lora-io read.

use std::collections::BTreeMap;
use std::path::Path;

use lora_core::{DType, MemorySource};
use lora_io::write_safetensors;
use ndarray::{Array2, ArrayD, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::ModelConfig;
use crate::data::{Record, TextTokenizer};
use crate::error::{Error, Result};
use crate::model::{Batch, Model};

/// A generated task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// `"a+b="` → `"c"` with a and b of 1 to `digits` digits.
    Addition {
        /// Largest number of digits of an operand.
        digits: u32,
    },
    /// `"<s>|"` → `"<s reversed>"` with s of 1 to `len` lowercase letters from the first
    /// `alphabet` letters.
    Reversal {
        /// Longest string.
        len: usize,
        /// Number of distinct letters (1 to 26).
        alphabet: u8,
    },
}

/// One example: the prompt (not counted in the loss) and the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The question, e.g. `"12+7="`.
    pub prompt: String,
    /// The answer, e.g. `"19"` (a newline follows it when tokenised for training).
    pub completion: String,
}

/// `n` examples of `task` drawn from `seed`.
pub fn generate(task: Task, n: usize, seed: u64) -> Vec<Example> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| match task {
            Task::Addition { digits } => {
                let max = 10u64.pow(digits.clamp(1, 18));
                let (a, b) = (rng.random_range(0..max), rng.random_range(0..max));
                Example { prompt: format!("{a}+{b}="), completion: (a + b).to_string() }
            }
            Task::Reversal { len, alphabet } => {
                let k = rng.random_range(1..=len.max(1));
                let s: String = (0..k).map(|_| (b'a' + rng.random_range(0..alphabet.clamp(1, 26))) as char).collect();
                Example { prompt: format!("{s}|"), completion: s.chars().rev().collect() }
            }
        })
        .collect()
}

/// The examples as JSONL lines `{"prompt": ..., "completion": ...}` (what `lora train` reads).
pub fn to_jsonl(examples: &[Example]) -> String {
    examples
        .iter()
        .map(|e| serde_json::json!({"prompt": e.prompt, "completion": e.completion}).to_string() + "\n")
        .collect()
}

/// The examples tokenised as the data loader tokenises JSONL records (the completion followed
/// by a newline).
pub fn records(examples: &[Example], tokenizer: &TextTokenizer) -> Result<Vec<Record>> {
    examples
        .iter()
        .map(|e| {
            Ok(Record::prompt_completion(
                tokenizer.encode(&e.prompt, "prompt")?,
                tokenizer.encode(&format!("{}\n", e.completion), "completion")?,
            ))
        })
        .collect()
}

/// Held-out accuracy on the answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accuracy {
    /// Fraction of answer tokens (newline included) that the greedy next-token choice gets
    /// right, given the true prefix.
    pub token_accuracy: f64,
    /// Fraction of examples whose every answer token is right (what greedy decoding would
    /// produce).
    pub exact_match: f64,
    /// Number of examples.
    pub examples: usize,
}

/// Greedy next-token accuracy of `model` on the answers of `examples` (teacher forcing: the
/// prompt and the true answer so far are the input; the arg-max of the logits must be the next
/// answer token, the final newline included).
pub fn answer_accuracy(model: &Model<f32>, tokenizer: &TextTokenizer, examples: &[Example]) -> Result<Accuracy> {
    if examples.is_empty() {
        return Err(Error::Input("no example to measure accuracy on".into()));
    }
    let recs = records(examples, tokenizer)?;
    // group equal lengths into one batch
    let mut by_len: BTreeMap<usize, Vec<&Record>> = BTreeMap::new();
    for r in &recs {
        by_len.entry(r.ids.len()).or_default().push(r);
    }
    let (mut right, mut total, mut exact) = (0usize, 0usize, 0usize);
    for (len, group) in by_len {
        if len < 2 {
            continue;
        }
        let ids: Vec<u32> = group.iter().flat_map(|r| r.ids.iter().copied()).collect();
        let ids = Array2::from_shape_vec((group.len(), len), ids).map_err(|e| Error::Input(e.to_string()))?;
        let logits = model.logits(&Batch::new(ids)?)?;
        for (r, seq) in group.iter().zip(logits.axis_iter(Axis(0))) {
            let mut all = true;
            for t in 1..len {
                if !r.counts[t] {
                    continue;
                }
                let row = seq.row(t - 1);
                let best = row
                    .iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
                    .0;
                total += 1;
                if best as u32 == r.ids[t] {
                    right += 1;
                } else {
                    all = false;
                }
            }
            exact += usize::from(all);
        }
    }
    Ok(Accuracy {
        token_accuracy: right as f64 / total.max(1) as f64,
        exact_match: exact as f64 / examples.len() as f64,
        examples: examples.len(),
    })
}

/// The shape of a tiny Llama model made by [`tiny_model`] / [`write_tiny_model`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TinyModelSpec {
    /// hidden_size.
    pub hidden: usize,
    /// intermediate_size.
    pub intermediate: usize,
    /// num_hidden_layers.
    pub layers: usize,
    /// num_attention_heads.
    pub heads: usize,
    /// num_key_value_heads.
    pub kv_heads: usize,
    /// vocab_size (256 or more for byte tokens).
    pub vocab: usize,
    /// Seed of the weights.
    pub seed: u64,
}

impl Default for TinyModelSpec {
    /// hidden 64, intermediate 128, 2 layers, 4 heads, 2 key-value heads, vocabulary 256 (bytes),
    /// seed 0.
    fn default() -> Self {
        TinyModelSpec { hidden: 64, intermediate: 128, layers: 2, heads: 4, kv_heads: 2, vocab: 256, seed: 0 }
    }
}

impl TinyModelSpec {
    /// The config.json text of the model (llama, tied embeddings, rope_theta 10000).
    pub fn config_json(&self) -> String {
        let v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": true,
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": "float32",
        });
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }

    /// The weights, by transformers name, drawn from the seed: uniform, with variance
    /// 9 / hidden for the (tied) embeddings (logits of standard deviation about 3: with the
    /// final norm frozen at 1, smaller embeddings cap how confident a LoRA can make the model),
    /// and 1 / d_in for the projections; norms 1.
    pub fn tensors(&self) -> Vec<(String, ArrayD<f32>)> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let mut out = Vec::new();
        let mut put = |name: String, shape: &[usize], std: f64| {
            let bound = std * 3f64.sqrt();
            let t = ArrayD::from_shape_simple_fn(shape, || (rng.random::<f64>() * 2.0 - 1.0) as f32 * bound as f32);
            out.push((name, t));
        };
        let (h, i) = (self.hidden, self.intermediate);
        let head_dim = h / self.heads.max(1);
        let (qd, kvd) = (head_dim * self.heads, head_dim * self.kv_heads);
        put("model.embed_tokens.weight".into(), &[self.vocab, h], 3.0 / (h as f64).sqrt());
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            for (m, d_out, d_in) in [
                ("self_attn.q_proj", qd, h),
                ("self_attn.k_proj", kvd, h),
                ("self_attn.v_proj", kvd, h),
                ("self_attn.o_proj", h, qd),
                ("mlp.gate_proj", i, h),
                ("mlp.up_proj", i, h),
                ("mlp.down_proj", h, i),
            ] {
                put(format!("{p}.{m}.weight"), &[d_out, d_in], 1.0 / (d_in as f64).sqrt());
            }
        }
        for l in 0..self.layers {
            for n in ["input_layernorm", "post_attention_layernorm"] {
                out.push((format!("model.layers.{l}.{n}.weight"), ArrayD::ones(vec![h])));
            }
        }
        out.push(("model.norm.weight".into(), ArrayD::ones(vec![h])));
        out
    }
}

/// The tiny model in memory (no files).
pub fn tiny_model(spec: &TinyModelSpec) -> Result<Model<f32>> {
    let config = ModelConfig::from_json(&spec.config_json(), "<tiny model>")?;
    let mut src = MemorySource::new();
    for (name, t) in spec.tensors() {
        src.insert(name, t.mapv(f64::from), DType::F32);
    }
    Model::from_source(config, &src)
}

/// Write the tiny model as a Hugging Face folder `dir` (config.json and model.safetensors in
/// f32, both written atomically: temporary file and rename).
pub fn write_tiny_model(dir: &Path, spec: &TinyModelSpec) -> Result<()> {
    ModelConfig::from_json(&spec.config_json(), "<tiny model>")?;
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(dir.join("model.safetensors"), &spec.tensors(), DType::F32, &meta)?;
    let path = dir.join("config.json");
    let tmp = dir.join(".config.json.tmp");
    std::fs::write(&tmp, spec.config_json()).map_err(|source| Error::Io { path: tmp.clone(), source })?;
    std::fs::rename(&tmp, &path).map_err(|source| Error::Io { path, source })
}
