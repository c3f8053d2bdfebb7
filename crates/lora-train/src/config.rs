//! The model's config.json (model_type llama, mistral or qwen2), parsed into a typed, validated
//! [`ModelConfig`]; what lora-train does not implement is refused, never ignored.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The architecture named by config.json's `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// `llama` (also SmolLM, TinyLlama): optional biases on every attention projection
    /// (`attention_bias`) and on the MLP (`mlp_bias`).
    Llama,
    /// `mistral`: Llama with grouped-query attention and a sliding window.
    Mistral,
    /// `qwen2`: biases on q, k and v (always), none on o or the MLP.
    Qwen2,
}

impl Architecture {
    /// The `model_type` string.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

/// The hyper-parameters of a Llama-family model.
///
/// Build one with [`ModelConfig::from_json`] / [`ModelConfig::from_file`] (which validate and
/// refuse unsupported features) or in code followed by [`ModelConfig::validate`]; a
/// [`crate::Model`] validates its config again on construction.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The architecture.
    pub architecture: Architecture,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key and value heads (grouped-query attention when smaller than the query heads).
    pub num_key_value_heads: usize,
    /// Width of one head (`hidden_size / num_attention_heads` when config.json has none).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// The output head shares the embedding table.
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v.
    pub qkv_bias: bool,
    /// Bias on o.
    pub o_bias: bool,
    /// Biases on gate, up and down.
    pub mlp_bias: bool,
    /// The attention window of the layers that use one; sequences longer than it are refused.
    pub sliding_window: Option<usize>,
}

/// config.json as written by transformers (4.x and 5.x), before validation.
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: String,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    partial_rotary_factor: Option<f64>,
    vocab_size: usize,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    attention_dropout: Option<f64>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    pretraining_tp: Option<usize>,
}

impl ModelConfig {
    /// Parse config.json's text; `file` names it in errors.
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|source| Error::Json { file: file.to_string(), source })?;
        let unsupported = |what: String| Error::Unsupported { file: file.to_string(), what };

        let architecture = match raw.model_type.as_str() {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            other => return Err(unsupported(format!("model_type {other:?} (llama, mistral and qwen2 are supported)"))),
        };
        let act = raw.hidden_act.as_deref().unwrap_or("silu");
        if act != "silu" {
            return Err(unsupported(format!("hidden_act {act:?} (only silu)")));
        }
        if let Some(p) = raw.attention_dropout.filter(|&p| p != 0.0) {
            return Err(unsupported(format!("attention_dropout {p} (only 0)")));
        }
        if let Some(f) = raw.partial_rotary_factor.filter(|&f| f != 1.0) {
            return Err(unsupported(format!("partial_rotary_factor {f} (only 1)")));
        }
        if let Some(tp) = raw.pretraining_tp.filter(|&tp| tp != 1) {
            return Err(unsupported(format!("pretraining_tp {tp} (only 1)")));
        }
        // transformers 4.x: rope_theta + rope_scaling; 5.x: rope_parameters {rope_type, rope_theta}
        let mut rope_theta = raw.rope_theta;
        for (field, value) in [("rope_scaling", &raw.rope_scaling), ("rope_parameters", &raw.rope_parameters)] {
            match value {
                None | Some(Value::Null) => {}
                Some(Value::Object(map)) => {
                    let kind = map.get("rope_type").or_else(|| map.get("type")).and_then(Value::as_str);
                    if kind.is_some_and(|k| k != "default") || (kind.is_none() && field == "rope_scaling") {
                        return Err(unsupported(format!("{field} {value:?} (only the default rope)", value = map)));
                    }
                    if let Some(theta) = map.get("rope_theta").and_then(Value::as_f64) {
                        rope_theta = Some(theta);
                    }
                    if let Some(f) = map.get("partial_rotary_factor").and_then(Value::as_f64).filter(|&f| f != 1.0) {
                        return Err(unsupported(format!("{field}.partial_rotary_factor {f} (only 1)")));
                    }
                }
                Some(other) => return Err(unsupported(format!("{field} {other}"))),
            }
        }

        let sliding_layers = match (architecture, &raw.layer_types) {
            (Architecture::Llama, _) => false,
            (Architecture::Mistral, None) => raw.sliding_window.is_some(),
            (_, Some(types)) => types.iter().any(|t| t == "sliding_attention"),
            (Architecture::Qwen2, None) => {
                raw.use_sliding_window.unwrap_or(false) && raw.max_window_layers.unwrap_or(0) < raw.num_hidden_layers
            }
        };
        if let Some(bad) =
            raw.layer_types.iter().flatten().find(|t| *t != "full_attention" && *t != "sliding_attention")
        {
            return Err(unsupported(format!("layer type {bad:?}")));
        }
        let sliding_window = match (sliding_layers, raw.sliding_window) {
            (false, _) => None,
            (true, Some(w)) => Some(w),
            (true, None) => {
                return Err(Error::Config {
                    file: file.to_string(),
                    message: "sliding attention layers without a sliding_window".into(),
                })
            }
        };

        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.num_attention_heads > 0 => raw.hidden_size / raw.num_attention_heads,
            None => 0,
        };
        let config = ModelConfig {
            architecture,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: rope_theta.unwrap_or(10000.0),
            vocab_size: raw.vocab_size,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: match architecture {
                Architecture::Qwen2 => true,
                _ => raw.attention_bias.unwrap_or(false),
            },
            o_bias: architecture != Architecture::Qwen2 && raw.attention_bias.unwrap_or(false),
            mlp_bias: architecture == Architecture::Llama && raw.mlp_bias.unwrap_or(false),
            sliding_window,
        };
        config.validate().map_err(|e| match e {
            Error::Config { message, .. } => Error::Config { file: file.to_string(), message },
            e => e,
        })?;
        Ok(config)
    }

    /// Read and parse a config.json file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Check sizes and their consistency.
    pub fn validate(&self) -> Result<()> {
        let bad = |message: String| Err(Error::Config { file: "<config>".into(), message });
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        // Every weight's element count must be representable: a config.json claiming sizes
        // whose products overflow is refused here, before anything is computed from them.
        for (what, a, b) in [
            ("num_attention_heads x head_dim", self.num_attention_heads, self.head_dim),
            ("num_key_value_heads x head_dim", self.num_key_value_heads, self.head_dim),
            ("vocab_size x hidden_size", self.vocab_size, self.hidden_size),
            ("intermediate_size x hidden_size", self.intermediate_size, self.hidden_size),
        ] {
            if a.checked_mul(b).is_none_or(|n| n > isize::MAX as usize) {
                return bad(format!("{what} = {a} x {b} overflows"));
            }
        }
        if self.q_dim().checked_mul(self.hidden_size).is_none_or(|n| n > isize::MAX as usize) {
            return bad(format!("the query projection ({} x {}) overflows", self.q_dim(), self.hidden_size));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!("head_dim {} must be even for rotary embeddings", self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(format!("rms_norm_eps {} must be finite and non-negative", self.rms_norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta {} must be finite and positive", self.rope_theta));
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window must be at least 1".into());
        }
        Ok(())
    }

    /// Width of the query projection's output (heads x head_dim).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key and value projections' outputs.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: &str = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256, "hidden_act": "silu"}"#;

    fn with(extra: &str) -> String {
        LLAMA.replacen('{', &format!("{{{extra},"), 1)
    }

    #[test]
    fn defaults_follow_transformers() {
        let c = ModelConfig::from_json(LLAMA, "config.json").unwrap();
        assert_eq!((c.head_dim, c.num_key_value_heads, c.rope_theta), (16, 4, 10000.0));
        assert!(!c.tie_word_embeddings && !c.qkv_bias && c.sliding_window.is_none());
        let c =
            ModelConfig::from_json(&with(r#""rope_parameters": {"rope_type": "default", "rope_theta": 500.0}"#), "c")
                .unwrap();
        assert_eq!(c.rope_theta, 500.0);
    }

    #[test]
    fn unsupported_features_are_refused_with_the_file_name() {
        for (extra, needle) in [
            (r#""rope_scaling": {"rope_type": "linear", "factor": 2.0}"#, "rope_scaling"),
            (r#""rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}"#, "rope_parameters"),
            (r#""hidden_act": "gelu""#, "hidden_act"),
            (r#""model_type": "gpt2""#, "model_type"),
            (r#""attention_dropout": 0.1"#, "attention_dropout"),
        ] {
            let mut value: Value = serde_json::from_str(LLAMA).unwrap();
            let extra: Value = serde_json::from_str(&format!("{{{extra}}}")).unwrap();
            value.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            let text = value.to_string();
            let err = ModelConfig::from_json(&text, "dir/config.json").unwrap_err().to_string();
            assert!(err.starts_with("dir/config.json: unsupported") && err.contains(needle), "{err}");
        }
    }

    #[test]
    fn sliding_windows_are_recorded_per_architecture() {
        let mistral = LLAMA.replace("\"llama\"", "\"mistral\"").replacen('}', r#","sliding_window": 8}"#, 1);
        assert_eq!(ModelConfig::from_json(&mistral, "c").unwrap().sliding_window, Some(8));
        let qwen = LLAMA.replace("\"llama\"", "\"qwen2\"").replacen(
            '}',
            r#","sliding_window": 8, "use_sliding_window": false}"#,
            1,
        );
        let c = ModelConfig::from_json(&qwen, "c").unwrap();
        assert_eq!((c.sliding_window, c.qkv_bias, c.o_bias), (None, true, false));
        let llama = LLAMA.replacen('}', r#","sliding_window": 8}"#, 1);
        assert_eq!(ModelConfig::from_json(&llama, "c").unwrap().sliding_window, None);
    }

    #[test]
    fn inconsistent_sizes_are_errors() {
        let text = LLAMA.replacen('}', r#","num_key_value_heads": 3}"#, 1);
        let err = ModelConfig::from_json(&text, "config.json").unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("multiple"), "{err}");
        assert!(ModelConfig::from_json("{", "config.json").unwrap_err().to_string().starts_with("config.json"));
    }
}
