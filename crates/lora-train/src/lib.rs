//! A Llama-family causal language model (Llama, Mistral, Qwen2, SmolLM, TinyLlama) with LoRA on
//! any of its linear layers: forward pass, loss and a hand-written backward pass to every LoRA
//! factor, on the CPU, with the numbers transformers and PEFT compute; and the trainer around it
//! (AdamW, schedules, clipping, accumulation, data, checkpoints that resume exactly).
//!
//! # Design
//! - Weights come through lora-core's [`lora_core::TensorSource`] (lora-io implements it over
//!   safetensors files and Hugging Face folders), config.json through [`ModelConfig`], which
//!   refuses what is not implemented (rope scaling, other activations, attention dropout) instead
//!   of ignoring it. Sequences longer than a sliding window are refused too.
//! - Generic over lora-core's [`lora_core::Scalar`]: `f32` for work, `f64` for gradient checks.
//! - Activations are (sequences x positions, features) matrices, so every linear layer is one
//!   large product (`general_mat_mul`, a CBLAS when the binary links one); attention runs per
//!   (sequence, head) in parallel on an explicit rayon pool ([`Parallelism`]).
//! - The base is frozen: the backward pass computes input gradients and LoRA factor gradients
//!   only, never a gradient of a base weight. Gradient checkpointing
//!   ([`StepOptions::checkpointing`]) keeps one matrix per layer and recomputes the rest.
//! - Adapters go in and out as lora-core [`lora_core::Adapter`]s named with PEFT's module paths
//!   (`model.layers.0.self_attn.q_proj`), so a PEFT reader and writer plug in directly.
//!
//! - Training ([`train`], [`Trainer`], [`TrainConfig`]): AdamW with PyTorch's arithmetic
//!   ([`optim`]), transformers' warmup schedules, clipping by global norm, gradient accumulation
//!   weighted by counted tokens, LoRA dropout, seeded PEFT initialisation. Every random draw is
//!   derived from the seed and the counters (step, epoch), so a checkpoint (a PEFT folder plus
//!   `trainer_state.json` and `optimizer.safetensors`, staged and renamed into place) resumes
//!   bit for bit. Data ([`data`]): plain text or JSONL (`text`, or `prompt` / `completion` with
//!   the loss on the completion only), packed into blocks, a validation tail, seeded epochs.
//! - [`synthetic`]: a generated task (addition, reversal), held-out answer accuracy and a tiny
//!   seeded model folder, for the demo and tests without downloads.
//!
//! # Example: training
//! ```
//! use std::ops::ControlFlow;
//! use lora_train::data::{Dataset, TextTokenizer};
//! use lora_train::synthetic::{generate, records, tiny_model, Task, TinyModelSpec};
//! use lora_train::{TrainConfig, TrainLength, Trainer};
//!
//! let spec = TinyModelSpec { hidden: 16, intermediate: 32, layers: 1, heads: 2, kv_heads: 1, ..Default::default() };
//! let examples = generate(Task::Addition { digits: 2 }, 50, 1);
//! let recs = records(&examples, &TextTokenizer::bytes())?;
//! let data = Dataset::from_records(&recs, 16, 0.1, "addition.jsonl".as_ref())?;
//! let config = TrainConfig { rank: 2, lr: 1e-2, length: TrainLength::Steps(3), batch: 2, seq_len: 16, ..Default::default() };
//! let mut trainer = Trainer::new(tiny_model(&spec)?, data, config)?;
//! let summary = trainer.run(None, |step| {
//!     println!("{}", step.to_json()); // step, loss, lr, tokens_per_second, ...
//!     ControlFlow::Continue(())
//! })?;
//! assert_eq!(summary.steps, 3);
//! assert!(summary.eval.is_some()); // the validation split is evaluated at the end
//! let adapter = trainer.adapter()?; // lora-io's write_peft writes it as a PEFT folder
//! # Ok::<(), lora_train::Error>(())
//! ```
//!
//! # Example: the model
//! ```
//! use lora_core::{Init, MemorySource, DType, TargetModules};
//! use lora_train::{Batch, LoraConfig, Model, ModelConfig, StepOptions};
//! use ndarray::{array, Array};
//!
//! let config = ModelConfig::from_json(
//!     r#"{"model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
//!         "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10,
//!         "tie_word_embeddings": true}"#,
//!     "config.json",
//! )?;
//! // Weights from anywhere that implements TensorSource; here, made up in memory.
//! let mut weights = MemorySource::new();
//! let mut k = 0;
//! let mut put = |name: &str, shape: &[usize]| {
//!     let t = Array::from_shape_simple_fn(shape, || { k += 1; ((k * 7 % 11) as f64 - 5.0) / 10.0 });
//!     weights.insert(name, t, DType::F32);
//! };
//! put("model.embed_tokens.weight", &[10, 8]);
//! put("model.norm.weight", &[8]);
//! for m in ["input_layernorm", "post_attention_layernorm"] {
//!     put(&format!("model.layers.0.{m}.weight"), &[8]);
//! }
//! for (m, shape) in [("self_attn.q_proj", [8, 8]), ("self_attn.k_proj", [8, 8]), ("self_attn.v_proj", [8, 8]),
//!     ("self_attn.o_proj", [8, 8]), ("mlp.gate_proj", [16, 8]), ("mlp.up_proj", [16, 8]), ("mlp.down_proj", [8, 16])] {
//!     put(&format!("model.layers.0.{m}.weight"), &shape);
//! }
//! let mut model = Model::<f32>::from_source(config, &weights)?;
//!
//! let mut lora = LoraConfig::new(2, 4.0, TargetModules::AllLinear);
//! lora.init = Init::Random { b_std: 0.1 };
//! assert_eq!(model.add_lora(&lora)?, 7);
//!
//! let batch = Batch::new(array![[1u32, 5, 2, 7], [3, 3, 9, 0]])?;
//! let (loss, grads) = model.loss_and_grads(&batch, StepOptions::default())?;
//! assert_eq!(loss.count, 2 * 3); // position t predicts token t + 1
//! assert_eq!(grads["model.layers.0.self_attn.q_proj"].a.dim(), (2, 8));
//! let adapter = model.adapter()?; // PEFT module paths, for a PEFT writer
//! assert_eq!(adapter.len(), 7);
//! # Ok::<(), lora_train::Error>(())
//! ```
#![deny(missing_docs)]

mod config;
pub mod data;
mod error;
pub mod eval;
mod linear;
mod lora;
mod model;
mod ops;
pub mod optim;
mod parallel;
pub mod synthetic;
mod thin;
mod trainer;

pub use config::{Architecture, ModelConfig};
pub use error::{Error, Result};
pub use linear::LoraGrad;
pub use lora::{LoraConfig, LoraParamsMut};
pub use model::{Batch, LoraGrads, Loss, Model, Proj, StepOptions, IGNORE_INDEX};
pub use optim::{AdamW, AdamWConfig, Schedule};
pub use parallel::{prefer_huge_pages, retain_freed_memory, Parallelism};
pub use trainer::{
    evaluate_blocks, latest_checkpoint, load_model, train, StepReport, TrainConfig, TrainLength, TrainSummary, Trainer,
    OPTIMIZER_FILE, TRAINER_STATE_FILE,
};

#[cfg(test)]
mod data_tests;
#[cfg(test)]
mod ops_tests;
#[cfg(test)]
mod optim_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod thin_tests;
#[cfg(test)]
mod trainer_tests;
