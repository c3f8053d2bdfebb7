//! Unit tests of the backward pass: every LoRA gradient against central finite differences in
//! f64, gradient checkpointing, dropout and input checks, on tiny random models.

use lora_core::{DType, Init, MemorySource, Scaling, TargetModules};
use ndarray::{array, s, Array, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Batch, LoraConfig, Model, ModelConfig, Parallelism, StepOptions, IGNORE_INDEX};

/// A model of `config` with random weights (norm weights near 1, every bias non-zero).
fn random_model(config: &ModelConfig, seed: u64) -> Model<f64> {
    Model::from_source(config.clone(), &random_weights(config, seed)).expect("consistent random weights")
}

/// The weights of [`random_model`].
fn random_weights(config: &ModelConfig, seed: u64) -> MemorySource {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut src = MemorySource::new();
    let mut put = |name: String, shape: &[usize], centre: f64, spread: f64| {
        let t = Array::from_shape_simple_fn(shape, || centre + spread * (rng.random::<f64>() * 2.0 - 1.0));
        src.insert(name, t, DType::F32);
    };
    let c = config;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    put("model.embed_tokens.weight".into(), &[c.vocab_size, h], 0.0, 1.0);
    put("model.norm.weight".into(), &[h], 1.0, 0.2);
    if !c.tie_word_embeddings {
        put("lm_head.weight".into(), &[c.vocab_size, h], 0.0, 0.5);
    }
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), &[h], 1.0, 0.2);
        put(format!("{p}.post_attention_layernorm.weight"), &[h], 1.0, 0.2);
        for (m, d_out, d_in, bias) in [
            ("self_attn.q_proj", c.q_dim(), h, c.qkv_bias),
            ("self_attn.k_proj", c.kv_dim(), h, c.qkv_bias),
            ("self_attn.v_proj", c.kv_dim(), h, c.qkv_bias),
            ("self_attn.o_proj", h, c.q_dim(), c.o_bias),
            ("mlp.gate_proj", i, h, c.mlp_bias),
            ("mlp.up_proj", i, h, c.mlp_bias),
            ("mlp.down_proj", h, i, c.mlp_bias),
        ] {
            put(format!("{p}.{m}.weight"), &[d_out, d_in], 0.0, 1.5 / (d_in as f64).sqrt());
            if bias {
                put(format!("{p}.{m}.bias"), &[d_out], 0.0, 0.3);
            }
        }
    }
    src
}

fn qwen2_gqa_tied() -> ModelConfig {
    ModelConfig::from_json(
        r#"{"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6, "vocab_size": 32,
            "tie_word_embeddings": true, "rope_theta": 100.0, "rms_norm_eps": 1e-5}"#,
        "tiny-qwen2",
    )
    .unwrap()
}

fn llama_biases_untied() -> ModelConfig {
    ModelConfig::from_json(
        r#"{"model_type": "llama", "hidden_size": 12, "intermediate_size": 20, "num_hidden_layers": 2,
            "num_attention_heads": 3, "vocab_size": 24, "attention_bias": true, "mlp_bias": true}"#,
        "tiny-llama",
    )
    .unwrap()
}

/// Two sequences of 6, the second left-padded by 2 (padding ignored in the labels), the first
/// with one ignored label in the middle.
fn padded_batch(vocab: u32) -> Batch {
    let ids = array![[3u32, 7, 1, 0, 5, 2], [0, 0, 4, 6, 9, 8]].mapv(|v| v % vocab);
    let mask = array![[true, true, true, true, true, true], [false, false, true, true, true, true]];
    let mut labels = ids.mapv(i64::from);
    labels[[0, 3]] = IGNORE_INDEX;
    labels[[1, 0]] = IGNORE_INDEX;
    labels[[1, 1]] = IGNORE_INDEX;
    Batch::new(ids).unwrap().with_attention_mask(mask).unwrap().with_labels(labels).unwrap()
}

/// Every LoRA factor entry: |analytic - central difference| <= 1e-4 |fd| + 1e-9. Returns the
/// largest relative error over entries with |fd| > 1e-6, and how many entries were checked.
fn check_gradients(mut model: Model<f64>, batch: &Batch, options: StepOptions) -> (f64, usize) {
    let (_, grads) = model.loss_and_grads(batch, options).unwrap();
    let eps = 1e-5;
    let mut worst: f64 = 0.0;
    let mut checked = 0;
    let modules = model.lora_modules();
    assert_eq!(grads.keys().cloned().collect::<Vec<_>>(), modules);
    for (mi, module) in modules.iter().enumerate() {
        for factor in 0..2 {
            let grad = if factor == 0 { &grads[module].a } else { &grads[module].b };
            for (idx, &g) in grad.indexed_iter() {
                let mut loss_at = |delta: f64| {
                    let mut params = model.lora_params_mut();
                    let p = &mut params[mi];
                    let m = if factor == 0 { &mut p.a } else { &mut p.b };
                    m[idx] += delta;
                    drop(params);
                    let loss = model.loss_and_grads(batch, options).unwrap().0.mean();
                    let mut params = model.lora_params_mut();
                    let p = &mut params[mi];
                    let m = if factor == 0 { &mut p.a } else { &mut p.b };
                    m[idx] -= delta;
                    loss
                };
                let fd = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
                assert!(
                    (g - fd).abs() <= 1e-4 * fd.abs() + 1e-9,
                    "{module} {} {idx:?}: analytic {g:e}, finite difference {fd:e}",
                    ["A", "B"][factor]
                );
                if fd.abs() > 1e-6 {
                    worst = worst.max((g - fd).abs() / fd.abs());
                }
                checked += 1;
            }
        }
    }
    (worst, checked)
}

#[test]
fn every_lora_gradient_equals_finite_differences_qwen2_gqa_tied_padded() {
    let config = qwen2_gqa_tied();
    let mut model = random_model(&config, 1);
    let mut lora = LoraConfig::new(2, 3.0, TargetModules::AllLinear);
    lora.init = Init::Random { b_std: 0.3 };
    model.add_lora(&lora).unwrap();
    let (worst, n) = check_gradients(model, &padded_batch(32), StepOptions::default());
    eprintln!("qwen2 (GQA, head_dim 6, tied, q/k/v biases, padding): {n} entries, max relative error {worst:.2e}");
}

#[test]
fn every_lora_gradient_equals_finite_differences_llama_biases_rslora_dropout() {
    let config = llama_biases_untied();
    let mut model = random_model(&config, 2);
    let mut lora = LoraConfig::new(3, 2.0, TargetModules::AllLinear);
    lora.scaling = Scaling::RsLora;
    lora.dropout = 0.25;
    lora.init = Init::Random { b_std: 0.3 };
    lora.seed = 9;
    model.add_lora(&lora).unwrap();
    // dropout masks are drawn from the step seed, so the loss is a fixed function of the factors
    let options = StepOptions { checkpointing: true, dropout_seed: 5 };
    let (worst, n) = check_gradients(model, &padded_batch(24), options);
    eprintln!(
        "llama (all biases, untied, rsLoRA, dropout 0.25, checkpointing): {n} entries, max relative error {worst:.2e}"
    );
}

#[test]
fn every_lora_gradient_equals_finite_differences_over_several_row_pieces() {
    // 3 sequences of 100 positions: 300 rows, so every product runs in three pieces of rows
    // (the last one short) whose partial LoRA gradients add up, and attention in two query
    // blocks; the second sequence padded past its first query block. No dropout: the branches
    // run merged, through the fused backward pass of linear::backward_shared.
    let config = qwen2_gqa_tied();
    let mut model = random_model(&config, 4);
    let mut lora = LoraConfig::new(1, 2.0, TargetModules::AllLinear);
    lora.init = Init::Random { b_std: 0.3 };
    model.add_lora(&lora).unwrap();
    let (worst, n) = check_gradients(model, &hundred_position_batch(), StepOptions::default());
    eprintln!("qwen2, 300 rows in three pieces: {n} entries, max relative error {worst:.2e}");
}

/// Three sequences of 100 random ids (vocabulary 32), the second padded on its first 70.
fn hundred_position_batch() -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let ids = Array2::from_shape_simple_fn((3, 100), || rng.random_range(0..32u32));
    let mut mask = Array2::from_elem((3, 100), true);
    mask.slice_mut(s![1, ..70]).fill(false);
    Batch::new(ids).unwrap().with_attention_mask(mask).unwrap()
}

#[test]
fn checkpointing_changes_no_gradient() {
    let config = qwen2_gqa_tied();
    let mut model = random_model(&config, 3);
    let mut lora = LoraConfig::new(2, 4.0, TargetModules::List(vec!["q_proj".into(), "down_proj".into()]));
    lora.init = Init::Random { b_std: 0.2 };
    lora.dropout = 0.1;
    assert_eq!(model.add_lora(&lora).unwrap(), 4);
    let batch = padded_batch(32);
    let plain = model.loss_and_grads(&batch, StepOptions { checkpointing: false, dropout_seed: 7 }).unwrap();
    let recomputed = model.loss_and_grads(&batch, StepOptions { checkpointing: true, dropout_seed: 7 }).unwrap();
    assert_eq!(plain, recomputed, "bit for bit");
    // and the dropout seed matters (the test above is not vacuous)
    let other = model.loss_and_grads(&batch, StepOptions { checkpointing: true, dropout_seed: 8 }).unwrap();
    assert_ne!(plain.1, other.1);
    // without dropout, the training pass computes the same loss as the plain forward pass
    model.set_lora_dropout(0.0).unwrap();
    let step = model.loss_and_grads(&batch, StepOptions { checkpointing: false, dropout_seed: 7 }).unwrap().0;
    assert_eq!(step, model.loss(&batch).unwrap());
}

#[test]
fn threads_give_the_same_numbers_over_many_row_chunks_and_query_blocks() {
    // 3 sequences of 100 positions: 300 rows, three pieces of 128 rows (the last one short) in
    // every parallel product, and two query blocks in attention; the second sequence padded
    // past its first query block
    let config = qwen2_gqa_tied();
    let mut model = random_model(&config, 5);
    let mut lora = LoraConfig::new(2, 3.0, TargetModules::AllLinear);
    lora.init = Init::Random { b_std: 0.3 };
    lora.dropout = 0.1;
    model.add_lora(&lora).unwrap();
    let batch = hundred_position_batch();
    let options = StepOptions { checkpointing: false, dropout_seed: 1 };
    let sequential = (model.loss_and_grads(&batch, options).unwrap(), model.logits(&batch).unwrap());
    let model = model.with_parallelism(Parallelism::Threads(2)).unwrap();
    let threaded = (model.loss_and_grads(&batch, options).unwrap(), model.logits(&batch).unwrap());
    assert!(sequential == threaded, "the pool changed the numbers");
}

/// Whether the BLAS computes each row of an f32 product the same way whatever other rows share
/// the call. OpenBLAS did on the AVX-512 hosts tried; on an AMD Zen 3 host (its `Zen` core) it
/// did not: there a row's numbers depend on which rows share the call.
fn sgemm_rows_do_not_depend_on_the_call() -> bool {
    let a = Array2::from_shape_fn((300, 16), |(i, j)| (((i * 7 + j * 3) % 11) as f32 * 0.37).sin());
    let b = Array2::from_shape_fn((16, 24), |(i, j)| (((i * 5 + j) % 13) as f32 * 0.91).cos());
    let whole = a.dot(&b);
    [128, 256].into_iter().all(|cut| {
        a.slice(s![..cut, ..]).dot(&b) == whole.slice(s![..cut, ..])
            && a.slice(s![cut.., ..]).dot(&b) == whole.slice(s![cut.., ..])
    })
}

/// The largest difference between `got` and `want`, over the largest magnitude of `want`.
fn relative_gap<'a>(got: impl IntoIterator<Item = &'a f32>, want: impl IntoIterator<Item = &'a f32>) -> f64 {
    let (mut gap, mut top) = (0f64, 0f64);
    for (&g, &w) in got.into_iter().zip(want) {
        gap = gap.max(f64::from(g - w).abs());
        top = top.max(f64::from(w).abs());
    }
    gap / top.max(f64::MIN_POSITIVE)
}

#[test]
fn the_thread_count_changes_f32_numbers_by_the_blas_rounding_at_most() {
    // 300 rows are 3 blocks of 128: one piece without a pool, two (256 + 44 rows) or three
    // with 2 or 3 threads, so every product runs with other row counts per call; f32, the
    // BLAS's sgemm, with the LoRA branch merged (no dropout) and apart (dropout); rank 16 takes
    // the LoRA gradients through the AVX-512 kernels of `thin` where the CPU has them. A pool
    // gives the same numbers run after run; pools of other sizes give the same numbers where
    // the BLAS computes a row whatever other rows share the call, and otherwise differ by f32
    // rounding only
    let exact = sgemm_rows_do_not_depend_on_the_call();
    let config = qwen2_gqa_tied();
    let batch = hundred_position_batch();
    for rank in [2, 16] {
        let mut model: Model<f32> = Model::from_source(config.clone(), &random_weights(&config, 9)).unwrap();
        let mut lora = LoraConfig::new(rank, 3.0, TargetModules::AllLinear);
        lora.init = Init::Random { b_std: 0.3 };
        model.add_lora(&lora).unwrap();
        for dropout in [0.0, 0.1] {
            model.set_lora_dropout(dropout).unwrap();
            let options = StepOptions { checkpointing: false, dropout_seed: 1 };
            let run = |m: &Model<f32>| (m.loss_and_grads(&batch, options).unwrap(), m.logits(&batch).unwrap());
            let sequential = run(&model);
            for threads in [2, 3] {
                let what = format!("rank {rank}, {threads} threads, dropout {dropout}");
                let pooled = model.clone().with_parallelism(Parallelism::Threads(threads)).unwrap();
                let got = run(&pooled);
                assert!(run(&pooled) == got, "{what}: a second run gave other numbers");
                if exact {
                    assert!(got == sequential, "{what}: other numbers than without a pool");
                    continue;
                }
                let ((loss, grads), logits) = &got;
                let ((want_loss, want_grads), want_logits) = &sequential;
                assert!((loss.mean() - want_loss.mean()).abs() <= 1e-6 * want_loss.mean(), "{what}: loss");
                assert!(relative_gap(logits, want_logits) <= 1e-6, "{what}: logits");
                for (name, want) in want_grads {
                    let g = &grads[name];
                    let gap = relative_gap(g.a.iter().chain(&g.b), want.a.iter().chain(&want.b));
                    assert!(gap <= 1e-5, "{what}: {name}'s gradients off by {gap:e}");
                }
            }
        }
    }
}

#[test]
fn rank_16_gradients_through_the_thin_kernels_equal_f64s() {
    // r = 16 in f32: the LoRA factors' gradients go through the AVX-512 kernels of `thin` where
    // the CPU has them (f64 always takes BLAS); 300 rows make blocks of 128 and 44 rows, so the
    // kernels also run their row remainders
    let config = qwen2_gqa_tied();
    let mut lora = LoraConfig::new(16, 32.0, TargetModules::AllLinear);
    lora.init = Init::Random { b_std: 0.3 };
    let m32: Model<f32> = Model::from_source(config.clone(), &random_weights(&config, 11)).unwrap();
    let mut m32 = m32.with_parallelism(Parallelism::Threads(2)).unwrap();
    let mut m64 = random_model(&config, 11);
    m32.add_lora(&lora).unwrap();
    m64.add_lora(&lora).unwrap();
    let batch = hundred_position_batch();
    let calls = crate::thin::CALLS.load(std::sync::atomic::Ordering::Relaxed);
    let (l32, g32) = m32.loss_and_grads(&batch, StepOptions::default()).unwrap();
    if crate::thin::Isa::Avx512.detected() {
        assert!(crate::thin::CALLS.load(std::sync::atomic::Ordering::Relaxed) > calls, "the kernels ran");
    }
    let (l64, g64) = m64.loss_and_grads(&batch, StepOptions::default()).unwrap();
    assert!((l32.mean() - l64.mean()).abs() < 1e-5 * l64.mean(), "loss {} against {}", l32.mean(), l64.mean());
    assert_eq!(g32.len(), 14);
    for (name, want) in &g64 {
        let got = &g32[name];
        for (got, want, factor) in [(&got.a, &want.a, "A"), (&got.b, &want.b, "B")] {
            let top = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            let err = got.iter().zip(want).fold(0f64, |m, (&g, &w)| m.max((f64::from(g) - w).abs()));
            assert!(err <= 1e-4 * top, "{name} d{factor}: off by {err:e}, largest {top:e}");
        }
    }
}

#[test]
fn the_avx_kernels_give_the_baseline_numbers_in_f32() {
    use std::sync::atomic::Ordering;
    // f32, where the kernels' exponentials are the vectorised polynomial; 2 x 37 positions
    // leave remainders after every lane of 8 and 16; no dropout, so the branch is merged
    let config = qwen2_gqa_tied();
    let model: Model<f32> = Model::from_source(config.clone(), &random_weights(&config, 7)).unwrap();
    let mut model = model.with_parallelism(Parallelism::Threads(2)).unwrap();
    let mut lora = LoraConfig::new(2, 3.0, TargetModules::AllLinear);
    lora.init = Init::Random { b_std: 0.3 };
    model.add_lora(&lora).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let ids = Array2::from_shape_simple_fn((2, 37), || rng.random_range(0..32u32));
    let batch = Batch::new(ids).unwrap();
    let run = || (model.loss_and_grads(&batch, StepOptions::default()).unwrap(), model.logits(&batch).unwrap());
    let dispatched = run();
    crate::parallel::BASELINE_ONLY.store(true, Ordering::Relaxed);
    let baseline = run();
    crate::parallel::BASELINE_ONLY.store(false, Ordering::Relaxed);
    assert!(dispatched.0 .0.sum.is_finite());
    assert!(dispatched == baseline, "the AVX copies of the kernels changed the numbers");
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let model = random_model(&qwen2_gqa_tied(), 4);
    let too_big = Batch::new(array![[1u32, 40]]).unwrap();
    assert!(model.logits(&too_big).unwrap_err().to_string().contains("token id 40"));
    let all_ignored = Batch::new(array![[1u32, 2]]).unwrap().with_labels(array![[1, IGNORE_INDEX]]).unwrap();
    assert!(model.loss_and_grads(&all_ignored, StepOptions::default()).unwrap_err().to_string().contains("no label"));
    assert!(Batch::new(Array2::zeros((0, 3))).is_err());
    assert!(Batch::new(array![[1u32, 2]]).unwrap().with_attention_mask(array![[true]]).is_err());
    let bad_label = Batch::new(array![[1u32, 2]]).unwrap().with_labels(array![[1, 99]]).unwrap();
    assert!(model.loss(&bad_label).unwrap_err().to_string().contains("label 99"));
}

#[test]
fn targets_select_modules_by_name_path_and_regex() {
    let mut model = random_model(&qwen2_gqa_tied(), 5);
    let lora = |t| LoraConfig::new(2, 2.0, t);
    assert_eq!(model.add_lora(&lora(TargetModules::List(vec!["v_proj".into()]))).unwrap(), 2);
    model.remove_lora();
    let path = TargetModules::List(vec!["model.layers.1.mlp.up_proj".into()]);
    assert_eq!(model.add_lora(&lora(path)).unwrap(), 1);
    model.remove_lora();
    assert_eq!(model.add_lora(&lora(TargetModules::Regex(r".*\.0\.self_attn\.[qk]_proj".into()))).unwrap(), 2);
    assert_eq!(model.lora_modules(), ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]);
    assert!(model.add_lora(&lora(TargetModules::List(vec!["lm_head".into()]))).is_err());
}

#[test]
fn module_paths_round_trip() {
    for p in crate::Proj::ALL {
        assert_eq!(crate::Proj::parse_path(&p.module_path(3)), Some((3, p)));
    }
    assert_eq!(crate::Proj::parse_path("model.layers.0.self_attn.q_proj.lora_A"), None);
    assert_eq!(crate::Proj::parse_path("lm_head"), None);
}

#[test]
fn eval_needs_a_tokenizer_or_a_byte_vocabulary_and_whole_blocks() {
    use crate::eval::{evaluate, tokenize, Tokenization};
    let no_dir = std::path::Path::new("/nonexistent-model-dir");
    let err = tokenize(no_dir, b"abc", "data.txt", 100).unwrap_err().to_string();
    assert!(err.contains("no tokenizer.json") && err.contains("256"), "{err}");
    let tokens = tokenize(no_dir, b"\x00\xffab", "data.txt", 256).unwrap();
    assert_eq!((tokens.ids, tokens.tokenization), (vec![0, 255, 97, 98], Tokenization::Bytes));
    let model = random_model(&qwen2_gqa_tied(), 6);
    assert!(evaluate(&model, &[1, 2, 3], 4, 1).unwrap_err().to_string().contains("one block"));
    assert!(evaluate(&model, &[1, 2, 3], 1, 1).is_err());
    // the batch size changes nothing but memory
    let ids: Vec<u32> = (0..50).map(|i| (i * 7 % 32) as u32).collect();
    let (a, b) = (evaluate(&model, &ids, 8, 1).unwrap(), evaluate(&model, &ids, 8, 4).unwrap());
    assert_eq!((a.blocks, a.tokens), (6, 6 * 7));
    assert!((a.loss - b.loss).abs() < 1e-12 && (a.perplexity - a.loss.exp()).abs() < 1e-9);
}

/// Resource bounds (issue 9): a config.json claiming sizes the weights do not have fails with an
/// error naming the field before anything of the claimed size is allocated.
mod claims {
    use super::*;

    fn claiming(field: &str, value: serde_json::Value) -> (crate::Result<Model<f64>>, ModelConfig) {
        let src = random_weights(&llama_biases_untied(), 1);
        let mut json: serde_json::Value = serde_json::from_str(
            r#"{"model_type": "llama", "hidden_size": 12, "intermediate_size": 20, "num_hidden_layers": 2,
                "num_attention_heads": 3, "vocab_size": 24, "attention_bias": true, "mlp_bias": true}"#,
        )
        .unwrap();
        json[field] = value;
        let config = ModelConfig::from_json(&json.to_string(), "config.json").unwrap();
        (Model::from_source(config.clone(), &src), config)
    }

    #[test]
    fn a_vocabulary_of_1e12_is_refused_naming_vocab_size() {
        let (r, c) = claiming("vocab_size", 1_000_000_000_000u64.into());
        assert_eq!(c.vocab_size, 1_000_000_000_000);
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("vocab_size 1000000000000 disagrees with model.embed_tokens.weight, which has 24 rows"),
            "{e}"
        );
    }

    #[test]
    fn a_trillion_layers_are_refused_before_any_is_reserved() {
        let (r, _) = claiming("num_hidden_layers", 1_000_000_000_000u64.into());
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("num_hidden_layers 1000000000000 but the weights have no model.layers.999999999999."),
            "{e}"
        );
    }

    #[test]
    fn sizes_whose_products_overflow_are_refused_by_the_parser() {
        let text = r#"{"model_type": "llama", "hidden_size": 12, "intermediate_size": 20, "num_hidden_layers": 1,
            "num_attention_heads": 1099511627776, "head_dim": 1099511627776, "vocab_size": 24}"#;
        let e = ModelConfig::from_json(text, "dir/config.json").unwrap_err().to_string();
        assert!(e.starts_with("dir/config.json: num_attention_heads x head_dim") && e.contains("overflows"), "{e}");
        let text = text.replace("1099511627776", "2").replace(r#""vocab_size": 24"#, r#""vocab_size": 1e20"#);
        assert!(ModelConfig::from_json(&text, "c").is_err());
        let text = text.replace("1e20", "4611686018427387904");
        let e = ModelConfig::from_json(&text, "c").unwrap_err().to_string();
        assert!(e.contains("vocab_size x hidden_size"), "{e}");
    }
}
