//! The seeded random Llama-family model with LoRA r = 16 on every linear layer that the training
//! step bench (`benches/train_step.rs`) and the `step_cpu` example time.

use lora_core::{DType, Init, MemorySource, TargetModules};
use lora_train::{LoraConfig, Model, ModelConfig, Parallelism};
use ndarray::Array;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The model of `config` with uniform random weights (seed 0) and LoRA factors (B random too,
/// so that every gradient is non-trivial), on `threads` rayon threads (0: sequential).
pub fn random_model(config: &ModelConfig, threads: usize) -> Model<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut src = MemorySource::new();
    let mut put = |name: String, shape: &[usize], centre: f64, spread: f64| {
        let t = Array::from_shape_simple_fn(shape, || centre + spread * (rng.random::<f64>() * 2.0 - 1.0));
        src.insert(name, t, DType::F32);
    };
    let (h, i) = (config.hidden_size, config.intermediate_size);
    put("model.embed_tokens.weight".into(), &[config.vocab_size, h], 0.0, 0.04);
    put("lm_head.weight".into(), &[config.vocab_size, h], 0.0, 0.04);
    put("model.norm.weight".into(), &[h], 1.0, 0.0);
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), &[h], 1.0, 0.0);
        put(format!("{p}.post_attention_layernorm.weight"), &[h], 1.0, 0.0);
        for (m, d_out, d_in) in [
            ("self_attn.q_proj", config.q_dim(), h),
            ("self_attn.k_proj", config.kv_dim(), h),
            ("self_attn.v_proj", config.kv_dim(), h),
            ("self_attn.o_proj", h, config.q_dim()),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            put(format!("{p}.{m}.weight"), &[d_out, d_in], 0.0, 0.04);
        }
    }
    let mut model = Model::from_source(config.clone(), &src).expect("consistent weights");
    drop(src);
    let mut lora = LoraConfig::new(16, 32.0, TargetModules::AllLinear);
    lora.init = Init::Random { b_std: 0.01 };
    model.add_lora(&lora).expect("all-linear matches");
    let parallelism = if threads == 0 { Parallelism::Sequential } else { Parallelism::Threads(threads) };
    model.with_parallelism(parallelism).expect("thread pool")
}
