//! Tests of the trainer on a tiny seeded model and the generated addition task: it learns,
//! resumes exactly, is deterministic, and its adapter evaluates the same merged or not; and of
//! the data loader.

use std::ops::ControlFlow;
use std::path::Path;

use lora_core::TargetModules;

use crate::data::{epoch_order, pack, parse_jsonl, read_records, Dataset, Record, TextTokenizer};
use crate::eval::{evaluate, tokenize_file};
use crate::synthetic::{answer_accuracy, generate, records, tiny_model, Task, TinyModelSpec};
use crate::{Model, Schedule, TrainConfig, TrainLength, Trainer, IGNORE_INDEX};

const TASK: Task = Task::Addition { digits: 2 };

fn spec() -> TinyModelSpec {
    TinyModelSpec { hidden: 32, intermediate: 64, layers: 2, heads: 4, kv_heads: 2, vocab: 256, seed: 1 }
}

fn dataset(n: usize, seq_len: usize, val_fraction: f64) -> Dataset {
    let recs = records(&generate(TASK, n, 11), &TextTokenizer::bytes()).unwrap();
    Dataset::from_records(&recs, seq_len, val_fraction, Path::new("addition.jsonl")).unwrap()
}

fn config(steps: usize) -> TrainConfig {
    TrainConfig {
        rank: 4,
        alpha: 8.0,
        lr: 1e-2,
        length: TrainLength::Steps(steps),
        batch: 4,
        seq_len: 32,
        ..TrainConfig::default()
    }
}

fn factors(model: &Model<f32>) -> Vec<f32> {
    model
        .adapter()
        .unwrap()
        .modules()
        .values()
        .flat_map(|m| m.layer().a().iter().chain(m.layer().b().iter()).copied().collect::<Vec<_>>())
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn loss_falls_on_the_addition_task() {
    let cfg = TrainConfig { length: TrainLength::Steps(LEARN_STEPS), warmup: 5, ..config(0) };
    let mut trainer = Trainer::new(tiny_model(&spec()).unwrap(), dataset(400, 32, 0.0), cfg).unwrap();
    let held_out = generate(TASK, 64, 999);
    let before = answer_accuracy(trainer.model(), &TextTokenizer::bytes(), &held_out).unwrap();
    let mut losses = Vec::new();
    let summary = trainer
        .run(None, |r| {
            losses.push(r.loss);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(summary.steps, LEARN_STEPS);
    let first = losses[0];
    let last10 = losses[losses.len() - 10..].iter().sum::<f64>() / 10.0;
    let after = answer_accuracy(trainer.model(), &TextTokenizer::bytes(), &held_out).unwrap();
    eprintln!(
        "loss {first:.3} -> {last10:.3}; token accuracy {:.3} -> {:.3}",
        before.token_accuracy, after.token_accuracy
    );
    assert!(first > 4.5, "an untrained byte model starts above ln 256 = 5.5, got {first}");
    assert!(
        last10 < LEARN_THRESHOLD,
        "mean loss of the last 10 of {LEARN_STEPS} steps is {last10}, want < {LEARN_THRESHOLD}"
    );
    assert!(after.token_accuracy > before.token_accuracy + 0.2, "{before:?} -> {after:?}");
}

/// The learnable-task figures stated in the docs.
/// (2-digit addition, byte tokens, hidden 32, rank 4 on all linear layers, lr 1e-2, batch 4 x 32.)
const LEARN_STEPS: usize = 150;
const LEARN_THRESHOLD: f64 = 3.0;

fn resume_config(steps: usize) -> TrainConfig {
    TrainConfig {
        grad_accum: 2,
        dropout: 0.1,
        warmup: 2,
        schedule: Schedule::Cosine,
        weight_decay: 0.01,
        save_every: Some(3),
        eval_every: Some(2),
        val_fraction: 0.1,
        seed: 7,
        ..config(steps)
    }
}

#[test]
fn stopped_and_resumed_equals_uninterrupted() {
    let data = dataset(60, 32, 0.1); // few blocks: the run crosses epochs
    assert!(data.n_train() < 4 * 2 * 7);
    let tmp = tempfile::tempdir().unwrap();
    let (full_dir, cut_dir) = (tmp.path().join("full"), tmp.path().join("cut"));

    let mut full = Trainer::new(tiny_model(&spec()).unwrap(), data.clone(), resume_config(7)).unwrap();
    let mut full_losses = Vec::new();
    full.run(Some(&full_dir), |r| {
        full_losses.push(r.loss);
        ControlFlow::Continue(())
    })
    .unwrap();

    let mut cut = Trainer::new(tiny_model(&spec()).unwrap(), data.clone(), resume_config(7)).unwrap();
    let s = cut
        .run(Some(&cut_dir), |r| if r.step == 3 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) })
        .unwrap();
    assert!(s.stopped && s.steps == 3 && s.adapter_dir.is_none());
    drop(cut);
    let checkpoint = crate::latest_checkpoint(&cut_dir).unwrap().unwrap();
    assert!(checkpoint.ends_with("checkpoint-3"));
    let resumed_cfg = TrainConfig { resume: Some(checkpoint), ..resume_config(7) };
    let mut resumed = Trainer::new(tiny_model(&spec()).unwrap(), data, resumed_cfg).unwrap();
    assert_eq!(resumed.steps_done(), 3);
    let mut resumed_losses = Vec::new();
    resumed
        .run(Some(&cut_dir), |r| {
            resumed_losses.push(r.loss);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(resumed_losses, full_losses[3..], "steps 4 to 7 see the same data, dropout and rates");
    let diff = max_diff(&factors(full.model()), &factors(resumed.model()));
    eprintln!("resumed vs uninterrupted: max |diff| = {diff:e}");
    assert!(diff <= 1e-6, "resumed adapter differs by {diff}");
    // the final PEFT folders agree too, and no staging folder is left behind
    let a = lora_io::read_peft::<f32>(&full_dir).unwrap();
    let b = lora_io::read_peft::<f32>(&cut_dir).unwrap();
    assert_eq!(a.modules().keys().collect::<Vec<_>>(), b.modules().keys().collect::<Vec<_>>());
    let leftovers: Vec<_> = std::fs::read_dir(&cut_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(cut_dir.join("checkpoint-6").join(crate::OPTIMIZER_FILE).is_file());
}

#[test]
fn resume_refuses_other_data_or_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(tiny_model(&spec()).unwrap(), dataset(60, 32, 0.1), resume_config(3)).unwrap();
    t.run(Some(tmp.path()), |_| ControlFlow::Continue(())).unwrap();
    let ckpt = tmp.path().join("checkpoint-3");
    let other_seed = TrainConfig { seed: 8, resume: Some(ckpt.clone()), ..resume_config(3) };
    let err = Trainer::new(tiny_model(&spec()).unwrap(), dataset(60, 32, 0.1), other_seed).unwrap_err().to_string();
    assert!(err.contains("trainer_state.json") && err.contains("seed"), "{err}");
    let other_data = TrainConfig { resume: Some(ckpt.clone()), ..resume_config(3) };
    let err = Trainer::new(tiny_model(&spec()).unwrap(), dataset(90, 32, 0.1), other_data).unwrap_err().to_string();
    assert!(err.contains("data"), "{err}");
    let missing = TrainConfig { resume: Some(tmp.path().join("nope")), ..resume_config(3) };
    let err = Trainer::new(tiny_model(&spec()).unwrap(), dataset(60, 32, 0.1), missing).unwrap_err().to_string();
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn same_seed_and_threads_give_the_same_adapter() {
    let run = |seed: u64, threads: usize| {
        let cfg = TrainConfig { seed, threads, dropout: 0.1, grad_accum: 2, ..config(4) };
        let mut t = Trainer::new(tiny_model(&spec()).unwrap(), dataset(60, 32, 0.0), cfg).unwrap();
        t.run(None, |_| ControlFlow::Continue(())).unwrap();
        factors(t.model())
    };
    let a = run(3, 2);
    assert_eq!(a, run(3, 2), "same seed, same threads: bit for bit");
    assert_eq!(a, run(3, 1), "the thread count does not change a bit either");
    assert!(max_diff(&a, &run(4, 2)) > 1e-4, "another seed trains another adapter");
}

#[test]
fn merged_eval_equals_base_plus_adapter() {
    let mut t = Trainer::new(tiny_model(&spec()).unwrap(), dataset(60, 32, 0.0), config(5)).unwrap();
    t.run(None, |_| ControlFlow::Continue(())).unwrap();
    let tokens: Vec<u32> = generate(TASK, 30, 5)
        .iter()
        .flat_map(|e| format!("{}{}\n", e.prompt, e.completion).into_bytes())
        .map(u32::from)
        .collect();
    let with = evaluate(t.model(), &tokens, 32, 4).unwrap();
    let merged = evaluate(&t.model().merged(), &tokens, 32, 4).unwrap();
    let mut reloaded = tiny_model(&spec()).unwrap();
    reloaded.load_adapter(&t.adapter().unwrap()).unwrap();
    let reload = evaluate(&reloaded, &tokens, 32, 4).unwrap();
    let base = evaluate(&tiny_model(&spec()).unwrap(), &tokens, 32, 4).unwrap();
    eprintln!("eval loss: base {:.6}, base + adapter {:.6}, merged {:.6}", base.loss, with.loss, merged.loss);
    assert!((with.loss - merged.loss).abs() <= 1e-5 * with.loss, "{} vs {}", with.loss, merged.loss);
    assert_eq!(with.loss, reload.loss);
    assert!((base.loss - with.loss).abs() > 1e-3, "the adapter changed something");
}

#[test]
fn accumulation_equals_one_large_batch() {
    // grad_accum 2 x batch 2 and batch 4 see the same blocks and weigh every token equally
    let one = TrainConfig { batch: 4, max_grad_norm: None, ..config(3) };
    let two = TrainConfig { batch: 2, grad_accum: 2, max_grad_norm: None, ..config(3) };
    let run = |cfg: TrainConfig| {
        let mut t = Trainer::new(tiny_model(&spec()).unwrap(), dataset(60, 32, 0.0), cfg).unwrap();
        let mut losses = Vec::new();
        t.run(None, |r| {
            losses.push(r.loss);
            ControlFlow::Continue(())
        })
        .unwrap();
        (factors(t.model()), losses)
    };
    let ((a, la), (b, lb)) = (run(one), run(two));
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() < 1e-5, "{la:?} vs {lb:?}");
    }
    assert!(max_diff(&a, &b) < 1e-5, "{}", max_diff(&a, &b));
}

#[test]
fn jsonl_prompts_do_not_count() {
    let text = "{\"prompt\": \"ab\", \"completion\": \"c\"}\n\n{\"text\": \"de\"}\n";
    let recs = parse_jsonl(text, "d.jsonl", &TextTokenizer::bytes()).unwrap();
    assert_eq!(recs[0], Record { ids: vec![97, 98, 99, 10], counts: vec![false, false, true, true] });
    assert_eq!(recs[1], Record::text(vec![100, 101, 10]));
    let blocks = pack(&recs, 3);
    assert_eq!(blocks.len(), 2, "7 tokens make 2 blocks of 3, the partial one dropped");
    assert_eq!(blocks[0].labels, vec![IGNORE_INDEX, IGNORE_INDEX, 99]);
    assert_eq!(blocks[1].labels, vec![10, 100, 101]);
    for (bad, what) in [
        ("{\"text\": 3}\n", "not a string"),
        ("{\"prompt\": \"a\"}\n", "expected an object"),
        ("{\"text\": \"a\"}\nnot json\n", "d.jsonl:2"),
        ("\n", "no record"),
    ] {
        let err = parse_jsonl(bad, "d.jsonl", &TextTokenizer::bytes()).unwrap_err().to_string();
        assert!(err.contains("d.jsonl") && err.contains(what), "{bad:?}: {err}");
    }
}

#[test]
fn text_files_tokenize_as_eval_and_split() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t.txt");
    std::fs::write(&path, "hello world, ".repeat(20)).unwrap();
    let recs = read_records(&path, &TextTokenizer::bytes()).unwrap();
    assert_eq!(recs[0].ids, tokenize_file(tmp.path(), &path, 256).unwrap().ids);
    let d = Dataset::from_records(&recs, 16, 0.25, &path).unwrap();
    assert_eq!((d.n_train(), d.n_val()), (12, 4), "260 tokens: 16 blocks, the last 4 held out");
    assert_eq!(d.val_block(3).unwrap().ids, recs[0].ids[15 * 16..16 * 16]);
    let err = Dataset::from_records(&recs, 300, 0.0, &path).unwrap_err().to_string();
    assert!(err.contains("t.txt"), "{err}");
    let err = read_records(&tmp.path().join("missing.txt"), &TextTokenizer::bytes()).unwrap_err().to_string();
    assert!(err.contains("missing.txt"), "{err}");
    assert!(Dataset::from_records(&recs, 16, 1.0, &path).is_err());
    // epochs are permutations, different per epoch, fixed by the seed
    let (e0, e1) = (epoch_order(12, 5, 0), epoch_order(12, 5, 1));
    assert_ne!(e0, e1);
    assert_eq!(e0, epoch_order(12, 5, 0));
    let mut sorted = e0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..12).collect::<Vec<_>>());
}

#[test]
fn bad_configs_are_refused() {
    let model = || tiny_model(&spec()).unwrap();
    for (cfg, what) in [
        (TrainConfig { rank: 0, ..config(2) }, "rank"),
        (TrainConfig { batch: 0, ..config(2) }, "batch"),
        (TrainConfig { length: TrainLength::Steps(0), ..config(2) }, "steps"),
        (TrainConfig { length: TrainLength::Epochs(f64::NAN), ..config(2) }, "epochs"),
        (TrainConfig { dropout: 1.0, ..config(2) }, "dropout"),
        (TrainConfig { threads: 0, ..config(2) }, "threads"),
        (TrainConfig { seq_len: 16, ..config(2) }, "seq_len"),
        (TrainConfig { targets: TargetModules::List(vec!["nothing".into()]), ..config(2) }, "match no"),
    ] {
        let err = Trainer::new(model(), dataset(20, 32, 0.0), cfg).unwrap_err().to_string();
        assert!(err.contains(what), "{what}: {err}");
    }
    let epochs = TrainConfig { length: TrainLength::Epochs(2.0), ..config(0) };
    let t = Trainer::new(model(), dataset(60, 32, 0.0), epochs).unwrap();
    assert_eq!(t.total_steps(), (2 * t.data().n_train()).div_ceil(4));
}

#[test]
fn written_adapter_config_records_the_dropout() {
    let tmp = tempfile::tempdir().unwrap();
    for (dropout, dir) in [(0.15, "with"), (0.0, "without")] {
        let out = tmp.path().join(dir);
        let cfg = TrainConfig { dropout, save_every: Some(1), ..config(1) };
        let mut t = Trainer::new(tiny_model(&spec()).unwrap(), dataset(20, 32, 0.0), cfg).unwrap();
        t.run(Some(&out), |_| ControlFlow::Continue(())).unwrap();
        for folder in [out.clone(), out.join("checkpoint-1")] {
            let pc = lora_io::PeftConfig::read(&folder.join(lora_io::CONFIG_FILE)).unwrap();
            assert_eq!(pc.lora_dropout, dropout, "{}", folder.display());
            assert_eq!(pc.task_type.as_deref(), Some("CAUSAL_LM"));
        }
    }
}
