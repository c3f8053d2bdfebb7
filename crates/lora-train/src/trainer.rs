//! The LoRA trainer: [`TrainConfig`], the step loop ([`Trainer`]) with AdamW, schedules,
//! clipping, gradient accumulation and dropout, periodic evaluation and atomic checkpoints that
//! resume exactly, and the one-call entry point [`train`].
//!
//! Randomness is derived, never carried: the initialisation from the seed, the order of epoch e
//! from (seed, e), the dropout masks of micro-batch k of step t from (seed, t, k). A checkpoint
//! therefore holds the RNG state as the seed plus the counters (step, epoch, position), and a
//! resumed run draws exactly what the uninterrupted run would have drawn.

use std::fs::File;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indexmap::IndexMap;
use lora_core::DType;
use lora_core::{Adapter, Init, Scaling, TargetModules};
use lora_io::{
    peft_config_for, read_peft, rename_into_place, write_peft, write_safetensors, Existing, ModelFolder,
    PeftWriteOptions, SafetensorsFile, META_PEFT_CONFIG,
};
use ndarray::{ArrayD, Ix2};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::data::{batch_of, epoch_order, splitmix64, Block, Dataset};
use crate::error::{Error, Result};
use crate::eval::EvalReport;
use crate::lora::LoraConfig;
use crate::model::{LoraGrads, Loss, Model, StepOptions};
use crate::optim::{clip_grad_norm, grad_norm, AdamW, AdamWConfig, Moments, Schedule};
use crate::parallel::Parallelism;

/// How long to train.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TrainLength {
    /// This many optimizer steps.
    Steps(usize),
    /// This many passes over the training blocks (fractions allowed): ceil(epochs x blocks /
    /// (batch x grad_accum)) optimizer steps.
    Epochs(f64),
}

/// Everything a training run needs besides the model and the data (the options of
/// `lora train`). [`TrainConfig::default`] gives transformers' / PEFT's usual defaults where
/// they have one.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// LoRA rank r (default 8).
    pub rank: usize,
    /// LoRA alpha (default 16).
    pub alpha: f64,
    /// rsLoRA scale alpha / sqrt(r) instead of alpha / r.
    pub rslora: bool,
    /// The adapted modules (default all-linear).
    pub targets: TargetModules,
    /// Initialisation of A (B starts at zero): PEFT's kaiming-uniform (default) or gaussian.
    pub init: Init,
    /// Peak learning rate (default 2e-4).
    pub lr: f64,
    /// Steps or epochs (default 100 steps).
    pub length: TrainLength,
    /// Blocks per micro-batch (default 4).
    pub batch: usize,
    /// Block length in tokens (default 128).
    pub seq_len: usize,
    /// Micro-batches per optimizer step (default 1); the gradient is the mean over every counted
    /// token of the step, as one large batch would give.
    pub grad_accum: usize,
    /// Linear warmup steps (default 0).
    pub warmup: usize,
    /// Learning-rate schedule after warmup (default linear).
    pub schedule: Schedule,
    /// AdamW's decoupled weight decay (default 0, as transformers' Trainer).
    pub weight_decay: f64,
    /// AdamW's beta1, beta2 and eps (defaults 0.9, 0.999, 1e-8).
    pub adam_betas: (f64, f64),
    /// AdamW's eps.
    pub adam_eps: f64,
    /// Clip the gradient to this global norm (default 1.0, as transformers); `None` never clips.
    pub max_grad_norm: Option<f64>,
    /// LoRA dropout probability (default 0).
    pub dropout: f64,
    /// Seed of the initialisation, the shuffling and the dropout masks (default 0).
    pub seed: u64,
    /// Threads: 1 is the sequential path (default), n > 1 a rayon pool of n.
    pub threads: usize,
    /// Gradient checkpointing (less memory, one more forward pass per step).
    pub checkpointing: bool,
    /// Write a checkpoint every this many steps.
    pub save_every: Option<usize>,
    /// Evaluate on the validation blocks every this many steps (and at the end).
    pub eval_every: Option<usize>,
    /// Fraction of the blocks held out for validation (default 0).
    pub val_fraction: f64,
    /// Continue from this checkpoint folder (one written by a run with the same data, seed,
    /// batch, grad_accum and seq_len).
    pub resume: Option<PathBuf>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            rank: 8,
            alpha: 16.0,
            rslora: false,
            targets: TargetModules::AllLinear,
            init: Init::KaimingUniform,
            lr: 2e-4,
            length: TrainLength::Steps(100),
            batch: 4,
            seq_len: 128,
            grad_accum: 1,
            warmup: 0,
            schedule: Schedule::Linear,
            weight_decay: 0.0,
            adam_betas: (0.9, 0.999),
            adam_eps: 1e-8,
            max_grad_norm: Some(1.0),
            dropout: 0.0,
            seed: 0,
            threads: 1,
            checkpointing: false,
            save_every: None,
            eval_every: None,
            val_fraction: 0.0,
            resume: None,
        }
    }
}

impl TrainConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Input(m));
        if self.rank == 0 {
            return bad("rank must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("alpha must be finite and > 0, got {}", self.alpha));
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad(format!("learning rate must be finite and >= 0, got {}", self.lr));
        }
        if self.batch == 0 || self.grad_accum == 0 {
            return bad(format!("batch ({}) and grad_accum ({}) must be at least 1", self.batch, self.grad_accum));
        }
        if self.threads == 0 {
            return bad("threads must be at least 1".into());
        }
        match self.length {
            TrainLength::Steps(0) => return bad("steps must be at least 1".into()),
            TrainLength::Epochs(e) if !(e.is_finite() && e > 0.0) => {
                return bad(format!("epochs must be finite and > 0, got {e}"))
            }
            _ => {}
        }
        if self.save_every == Some(0) || self.eval_every == Some(0) {
            return bad("save_every and eval_every must be at least 1".into());
        }
        if let Some(n) = self.max_grad_norm.filter(|n| !(n.is_finite() && *n > 0.0)) {
            return bad(format!("max_grad_norm must be finite and > 0, got {n}"));
        }
        Ok(())
    }

    fn lora_config(&self) -> LoraConfig {
        let mut lora = LoraConfig::new(self.rank, self.alpha, self.targets.clone());
        lora.scaling = if self.rslora { Scaling::RsLora } else { Scaling::Standard };
        lora.dropout = self.dropout;
        lora.init = self.init;
        lora.seed = self.seed;
        lora
    }

    fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.adam_betas.0,
            beta2: self.adam_betas.1,
            eps: self.adam_eps,
            weight_decay: self.weight_decay,
        }
    }

    fn parallelism(&self) -> Parallelism {
        if self.threads <= 1 {
            Parallelism::Sequential
        } else {
            Parallelism::Threads(self.threads)
        }
    }

    /// The number of optimizer steps for `train_blocks` training blocks.
    pub fn total_steps(&self, train_blocks: usize) -> usize {
        match self.length {
            TrainLength::Steps(n) => n,
            TrainLength::Epochs(e) => {
                let per_step = (self.batch * self.grad_accum) as f64;
                ((e * train_blocks as f64 / per_step).ceil() as usize).max(1)
            }
        }
    }
}

/// What one optimizer step did, for a progress bar and a metrics file.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Steps done (1 after the first step).
    pub step: usize,
    /// Steps of the whole run.
    pub total_steps: usize,
    /// Fractional epochs done.
    pub epoch: f64,
    /// Mean training loss over the step's counted tokens.
    pub loss: f64,
    /// Learning rate used by the step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens the step read (batch x grad_accum x seq_len).
    pub tokens: usize,
    /// Tokens per second of the step (forward, backward and update).
    pub tokens_per_second: f64,
    /// Validation loss and perplexity, when the step evaluated.
    pub eval: Option<EvalReport>,
    /// The checkpoint folder the step wrote, if any.
    pub checkpoint: Option<PathBuf>,
}

impl StepReport {
    /// The report as one JSON object (a line of a metrics JSONL file).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.epoch,
            "loss": self.loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "tokens": self.tokens,
            "tokens_per_second": self.tokens_per_second,
        });
        if let Some(e) = &self.eval {
            v["eval_loss"] = e.loss.into();
            v["eval_perplexity"] = e.perplexity.into();
        }
        if let Some(c) = &self.checkpoint {
            v["checkpoint"] = c.display().to_string().into();
        }
        v
    }
}

/// The outcome of [`Trainer::run`] / [`train`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Steps done.
    pub steps: usize,
    /// Steps of the whole run.
    pub total_steps: usize,
    /// The last step's training loss.
    pub last_loss: Option<f64>,
    /// The final validation evaluation (when there is a validation split).
    pub eval: Option<EvalReport>,
    /// Where the final adapter was written (none when the run was stopped by the callback).
    pub adapter_dir: Option<PathBuf>,
    /// True when the callback stopped the run before its last step.
    pub stopped: bool,
}

/// File names inside a checkpoint folder besides the PEFT adapter's.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// The optimizer moments of a checkpoint (`<module>.lora_A.exp_avg`, `.exp_avg_sq`, and B's).
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// What a checkpoint records besides the adapter and the moments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TrainerState {
    format: String,
    version: u32,
    step: usize,
    total_steps: usize,
    epoch: u64,
    position: usize,
    optimizer_step: u64,
    rng: RngState,
    data: DataState,
    config: ConfigState,
    last_loss: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RngState {
    /// How every random draw is made.
    scheme: String,
    seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DataState {
    fingerprint: String,
    train_blocks: usize,
    val_blocks: usize,
    seq_len: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ConfigState {
    rank: usize,
    alpha: f64,
    rslora: bool,
    lr: f64,
    batch: usize,
    grad_accum: usize,
    warmup: usize,
    schedule: String,
    weight_decay: f64,
    dropout: f64,
    max_grad_norm: Option<f64>,
}

const STATE_FORMAT: &str = "lora-train trainer state";
const RNG_SCHEME: &str =
    "derived: init from seed; epoch order ChaCha8(seed, epoch); dropout from (seed, step, micro-batch)";

/// A training run in progress: the model with its LoRA branches, the data, the optimizer and
/// the position in the data.
#[derive(Debug)]
pub struct Trainer {
    model: Model<f32>,
    data: Dataset,
    config: TrainConfig,
    opt: AdamW<f32>,
    step: usize,
    total_steps: usize,
    epoch: u64,
    position: usize,
    order: Vec<usize>,
    last_loss: Option<f64>,
    base_model: Option<String>,
}

impl Trainer {
    /// Start training `model` on `data`: fresh LoRA branches from `config` (seeded), or, when
    /// `config.resume` names a checkpoint folder, its adapter, moments and position.
    pub fn new(model: Model<f32>, data: Dataset, config: TrainConfig) -> Result<Self> {
        config.validate()?;
        if data.seq_len() != config.seq_len {
            return Err(Error::Input(format!(
                "the data is packed in blocks of {} but seq_len is {}",
                data.seq_len(),
                config.seq_len
            )));
        }
        let mut model = model.with_parallelism(config.parallelism())?;
        model.add_lora(&config.lora_config())?;
        let total_steps = config.total_steps(data.n_train());
        let opt = AdamW::new(config.adamw())?;
        let order = epoch_order(data.n_train(), config.seed, 0);
        let mut t = Trainer {
            model,
            data,
            config,
            opt,
            step: 0,
            total_steps,
            epoch: 0,
            position: 0,
            order,
            last_loss: None,
            base_model: None,
        };
        if let Some(dir) = t.config.resume.clone() {
            t.restore(&dir)?;
        }
        Ok(t)
    }

    /// Record the base model's name or path in the written adapters
    /// (`base_model_name_or_path`).
    pub fn with_base_model(mut self, name: impl Into<String>) -> Self {
        self.base_model = Some(name.into());
        self
    }

    /// The model with its current LoRA branches.
    pub fn model(&self) -> &Model<f32> {
        &self.model
    }

    /// The data.
    pub fn data(&self) -> &Dataset {
        &self.data
    }

    /// The config.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW<f32> {
        &self.opt
    }

    /// Steps done.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// Steps of the whole run.
    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    /// The current LoRA branches as a lora-core adapter (PEFT module paths), with the base
    /// model's name and the training dropout recorded for `adapter_config.json` (PEFT reads
    /// `lora_dropout` from it when training goes on).
    pub fn adapter(&self) -> Result<Adapter<f32>> {
        let adapter = self.model.adapter()?;
        let mut config = adapter.config().clone();
        if let Some(base) = &self.base_model {
            config.base_model = Some(base.clone());
        }
        let mut peft = peft_config_for(&adapter);
        peft.lora_dropout = self.config.dropout;
        config.metadata.insert(META_PEFT_CONFIG.into(), peft.to_json());
        let mut out = Adapter::new(config);
        for (name, module) in adapter.modules() {
            out.insert(name.clone(), module.clone())?;
        }
        Ok(out)
    }

    /// The learning rate of the next step.
    pub fn lr(&self) -> f64 {
        self.config.lr * self.config.schedule.factor(self.step, self.config.warmup, self.total_steps)
    }

    fn next_blocks(&mut self, n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| {
                if self.position == self.order.len() {
                    self.epoch += 1;
                    self.position = 0;
                    self.order = epoch_order(self.data.n_train(), self.config.seed, self.epoch);
                }
                self.position += 1;
                self.order[self.position - 1]
            })
            .collect()
    }

    /// One optimizer step: `grad_accum` micro-batches of `batch` blocks, gradients weighted by
    /// their counted tokens, clipped, AdamW at the scheduled rate.
    pub fn step(&mut self) -> Result<StepReport> {
        let start = Instant::now();
        let c = &self.config;
        let (batch, accum, seed) = (c.batch, c.grad_accum, c.seed);
        let lr = self.lr();
        let mut micro = Vec::with_capacity(accum);
        for _ in 0..accum {
            let idx = self.next_blocks(batch);
            let blocks = idx.iter().map(|&i| self.data.train_block(i)).collect::<Result<Vec<Block>>>()?;
            micro.push(batch_of(&blocks.iter().collect::<Vec<_>>())?);
        }
        let total: usize = micro.iter().map(|b| b.predictions()).sum();
        let mut loss = Loss { sum: 0.0, count: 0 };
        let mut acc: Option<LoraGrads<f32>> = None;
        for (k, b) in micro.iter().enumerate() {
            if b.predictions() == 0 {
                continue;
            }
            let dropout_seed = splitmix64(seed ^ splitmix64(((self.step as u64) << 16) ^ k as u64 ^ 0xD509_0000_0000));
            let options = StepOptions { checkpointing: self.config.checkpointing, dropout_seed };
            let (l, mut grads) = self.model.loss_and_grads(b, options)?;
            loss.sum += l.sum;
            loss.count += l.count;
            if accum > 1 {
                let w = l.count as f32 / total as f32;
                for g in grads.values_mut() {
                    g.a *= w;
                    g.b *= w;
                }
            }
            match &mut acc {
                None => acc = Some(grads),
                Some(acc) => {
                    for (name, g) in grads {
                        let a = acc.get_mut(&name).ok_or_else(|| Error::Adapter {
                            module: name.clone(),
                            message: "gradient missing in an earlier micro-batch".into(),
                        })?;
                        a.a += &g.a;
                        a.b += &g.b;
                    }
                }
            }
        }
        let mut grads = acc.ok_or_else(|| Error::Input("no token counts in this step's blocks".into()))?;
        let mean = loss.mean();
        if !mean.is_finite() {
            return Err(Error::Input(format!(
                "the training loss at step {} is {mean}: training diverged",
                self.step + 1
            )));
        }
        let norm = match self.config.max_grad_norm {
            Some(max) => clip_grad_norm(&mut grads, max)?,
            None => grad_norm(&grads),
        };
        let mut params = self.model.lora_params_mut();
        self.opt.step(&mut params, &grads, lr)?;
        self.step += 1;
        self.last_loss = Some(mean);
        let tokens = batch * accum * self.config.seq_len;
        let secs = start.elapsed().as_secs_f64();
        let n_train = self.data.n_train().max(1);
        Ok(StepReport {
            step: self.step,
            total_steps: self.total_steps,
            epoch: self.epoch as f64 + self.position as f64 / n_train as f64,
            loss: mean,
            lr,
            grad_norm: norm,
            tokens,
            tokens_per_second: if secs > 0.0 { tokens as f64 / secs } else { 0.0 },
            eval: None,
            checkpoint: None,
        })
    }

    /// Loss and perplexity on the validation blocks (`None` without a validation split), with
    /// eval's convention: the mean over every counted prediction.
    pub fn evaluate(&self) -> Result<Option<EvalReport>> {
        let (data, batch) = (&self.data, self.config.batch.max(1));
        if data.n_val() == 0 {
            return Ok(None);
        }
        let batches = (0..data.n_val()).step_by(batch).map(|start| {
            let blocks =
                (start..(start + batch).min(data.n_val())).map(|i| data.val_block(i)).collect::<Result<Vec<_>>>()?;
            batch_of(&blocks.iter().collect::<Vec<_>>())
        });
        evaluate_batches(&self.model, batches, data.n_val(), data.seq_len()).map(Some)
    }

    /// Train until the last step, or until `on_step` breaks; evaluate every `eval_every` steps
    /// and at the end, write a checkpoint every `save_every` steps into `out_dir`
    /// (`checkpoint-<step>`), and the final adapter as a PEFT folder in `out_dir` (when given
    /// and the run was not stopped).
    pub fn run(
        &mut self,
        out_dir: Option<&Path>,
        mut on_step: impl FnMut(&StepReport) -> ControlFlow<()>,
    ) -> Result<TrainSummary> {
        let mut stopped = false;
        let mut last_eval: Option<(usize, EvalReport)> = None;
        while self.step < self.total_steps {
            let mut report = self.step()?;
            let last = self.step == self.total_steps;
            if self.config.eval_every.is_some_and(|n| self.step % n == 0) || last {
                report.eval = self.evaluate()?;
                last_eval = report.eval.map(|e| (self.step, e));
            }
            if let (Some(out), Some(n)) = (out_dir, self.config.save_every) {
                if self.step % n == 0 {
                    report.checkpoint = Some(self.save_checkpoint(out)?);
                }
            }
            if on_step(&report).is_break() && !last {
                stopped = true;
                break;
            }
        }
        let eval = match last_eval {
            Some((s, e)) if s == self.step => Some(e),
            _ => self.evaluate()?,
        };
        let adapter_dir = match out_dir {
            Some(out) if !stopped => {
                write_peft(&self.adapter()?, out, &PeftWriteOptions::default())?;
                Some(out.to_path_buf())
            }
            _ => None,
        };
        Ok(TrainSummary {
            steps: self.step,
            total_steps: self.total_steps,
            last_loss: self.last_loss,
            eval,
            adapter_dir,
            stopped,
        })
    }

    /// Write a checkpoint of the current state to `out_dir/checkpoint-<step>`: the PEFT adapter,
    /// [`OPTIMIZER_FILE`] and [`TRAINER_STATE_FILE`]. The folder is staged under a temporary
    /// name and renamed into place when complete, so a kill leaves either the whole checkpoint
    /// or none. A checkpoint of the same step is replaced in one step (the old one stays whole
    /// until then); a failed write removes the staged folder. Returns the folder.
    pub fn save_checkpoint(&self, out_dir: &Path) -> Result<PathBuf> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
        let name = format!("checkpoint-{}", self.step);
        let target = out_dir.join(&name);
        let stage = out_dir.join(format!(".{name}.tmp"));
        if stage.exists() {
            std::fs::remove_dir_all(&stage).map_err(io(&stage))?;
        }
        std::fs::create_dir_all(&stage).map_err(io(&stage))?;
        // A failed write (a full disk) leaves nothing behind.
        self.write_checkpoint_files(&stage)
            .and_then(|()| Ok(rename_into_place(&stage, &target, Existing::Replace)?))
            .inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&stage);
        })?;
        Ok(target)
    }

    /// The files of a checkpoint, written into `stage`.
    fn write_checkpoint_files(&self, stage: &Path) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        write_peft(&self.adapter()?, stage, &PeftWriteOptions { dtype: Some(DType::F32) })?;
        let mut tensors: Vec<(String, ArrayD<f32>)> = Vec::new();
        for (module, m) in self.opt.moments() {
            for (f, t) in [
                ("lora_A.exp_avg", &m.m_a),
                ("lora_A.exp_avg_sq", &m.v_a),
                ("lora_B.exp_avg", &m.m_b),
                ("lora_B.exp_avg_sq", &m.v_b),
            ] {
                tensors.push((format!("{module}.{f}"), t.clone().into_dyn()));
            }
        }
        write_safetensors(stage.join(OPTIMIZER_FILE), &tensors, DType::F32, &Default::default())?;
        let state = self.state()?;
        let json = serde_json::to_string_pretty(&state)
            .map_err(|source| Error::Json { file: TRAINER_STATE_FILE.into(), source })?;
        let state_path = stage.join(TRAINER_STATE_FILE);
        let mut f = File::create(&state_path).map_err(io(&state_path))?;
        f.write_all(json.as_bytes()).and_then(|_| f.sync_all()).map_err(io(&state_path))?;
        drop(f);
        Ok(())
    }

    fn state(&self) -> Result<TrainerState> {
        let c = &self.config;
        Ok(TrainerState {
            format: STATE_FORMAT.into(),
            version: 1,
            step: self.step,
            total_steps: self.total_steps,
            epoch: self.epoch,
            position: self.position,
            optimizer_step: self.opt.steps(),
            rng: RngState { scheme: RNG_SCHEME.into(), seed: c.seed },
            data: DataState {
                fingerprint: format!("{:016x}", self.data.fingerprint()?),
                train_blocks: self.data.n_train(),
                val_blocks: self.data.n_val(),
                seq_len: self.data.seq_len(),
            },
            config: ConfigState {
                rank: c.rank,
                alpha: c.alpha,
                rslora: c.rslora,
                lr: c.lr,
                batch: c.batch,
                grad_accum: c.grad_accum,
                warmup: c.warmup,
                schedule: c.schedule.name().into(),
                weight_decay: c.weight_decay,
                dropout: c.dropout,
                max_grad_norm: c.max_grad_norm,
            },
            last_loss: self.last_loss,
        })
    }

    fn restore(&mut self, dir: &Path) -> Result<()> {
        let state_path = dir.join(TRAINER_STATE_FILE);
        let text =
            std::fs::read_to_string(&state_path).map_err(|source| Error::Io { path: state_path.clone(), source })?;
        let file = state_path.display().to_string();
        let state: TrainerState =
            serde_json::from_str(&text).map_err(|source| Error::Json { file: file.clone(), source })?;
        let mismatch = |what: &str, saved: String, now: String| {
            Err(Error::Config {
                file: file.clone(),
                message: format!("the checkpoint was made with {what} {saved}, this run has {now}"),
            })
        };
        if state.format != STATE_FORMAT || state.version != 1 {
            return mismatch(
                "format",
                format!("{:?} v{}", state.format, state.version),
                format!("{STATE_FORMAT:?} v1"),
            );
        }
        let c = &self.config;
        let fp = format!("{:016x}", self.data.fingerprint()?);
        if state.data.fingerprint != fp {
            return mismatch("data fingerprint", state.data.fingerprint, format!("{fp} (the data or seq_len changed)"));
        }
        if state.rng.seed != c.seed {
            return mismatch("seed", state.rng.seed.to_string(), c.seed.to_string());
        }
        if (state.config.batch, state.config.grad_accum) != (c.batch, c.grad_accum) {
            return mismatch(
                "batch x grad_accum",
                format!("{} x {}", state.config.batch, state.config.grad_accum),
                format!("{} x {}", c.batch, c.grad_accum),
            );
        }
        if (state.config.rank, state.config.alpha, state.config.rslora) != (c.rank, c.alpha, c.rslora) {
            return mismatch(
                "rank, alpha, rslora",
                format!("{}, {}, {}", state.config.rank, state.config.alpha, state.config.rslora),
                format!("{}, {}, {}", c.rank, c.alpha, c.rslora),
            );
        }
        if state.position > self.data.n_train() {
            return mismatch(
                "data position",
                state.position.to_string(),
                format!("{} training blocks", self.data.n_train()),
            );
        }
        let adapter = read_peft::<f32>(dir)?;
        let expected = self.model.lora_modules();
        let got: Vec<&String> = adapter.modules().keys().collect();
        if got.len() != expected.len() || got.iter().zip(&expected).any(|(a, b)| *a != b) {
            return mismatch("modules", format!("{got:?}"), format!("{expected:?}"));
        }
        self.model.load_adapter(&adapter)?;
        self.model.set_lora_dropout(self.config.dropout)?;
        let opt_path = dir.join(OPTIMIZER_FILE);
        let st = SafetensorsFile::open(&opt_path)?;
        let mut moments = IndexMap::new();
        let read = |name: String| -> Result<ndarray::Array2<f32>> {
            st.tensor::<f32>(&name)?.into_dimensionality::<Ix2>().map_err(|_| Error::WeightShape {
                tensor: format!("{}: {name}", opt_path.display()),
                expected: vec![0, 0],
                got: st.shape(&name).unwrap_or_default().to_vec(),
            })
        };
        if state.optimizer_step > 0 {
            for module in &expected {
                moments.insert(
                    module.clone(),
                    Moments {
                        m_a: read(format!("{module}.lora_A.exp_avg"))?,
                        v_a: read(format!("{module}.lora_A.exp_avg_sq"))?,
                        m_b: read(format!("{module}.lora_B.exp_avg"))?,
                        v_b: read(format!("{module}.lora_B.exp_avg_sq"))?,
                    },
                );
            }
        }
        self.opt = AdamW::from_state(self.config.adamw(), state.optimizer_step, moments)?;
        self.step = state.step;
        self.epoch = state.epoch;
        self.position = state.position;
        self.order = epoch_order(self.data.n_train(), self.config.seed, self.epoch);
        self.last_loss = state.last_loss;
        Ok(())
    }
}

/// Mean loss and perplexity of `model` over `blocks` (their labels decide what counts), `batch`
/// blocks at a time: eval's convention (the mean over every counted prediction).
pub fn evaluate_blocks(model: &Model<f32>, blocks: &[Block], batch: usize) -> Result<EvalReport> {
    let batches = blocks.chunks(batch.max(1)).map(|chunk| batch_of(&chunk.iter().collect::<Vec<_>>()));
    evaluate_batches(model, batches, blocks.len(), blocks.first().map_or(0, |b| b.ids.len()))
}

/// Mean loss and perplexity over batches made one at a time.
fn evaluate_batches(
    model: &Model<f32>,
    batches: impl Iterator<Item = Result<crate::model::Batch>>,
    blocks: usize,
    seq_len: usize,
) -> Result<EvalReport> {
    let mut total = Loss { sum: 0.0, count: 0 };
    for b in batches {
        let b = b?;
        if b.predictions() == 0 {
            continue;
        }
        let l = model.loss(&b)?;
        total.sum += l.sum;
        total.count += l.count;
    }
    if total.count == 0 {
        return Err(Error::Input("no counted prediction in the evaluation blocks".into()));
    }
    let loss = total.mean();
    Ok(EvalReport { loss, perplexity: loss.exp(), tokens: total.count, blocks, seq_len })
}

/// The newest checkpoint (`checkpoint-<step>` with the largest step) in `out_dir`, if any.
pub fn latest_checkpoint(out_dir: &Path) -> Result<Option<PathBuf>> {
    let entries = match std::fs::read_dir(out_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(Error::Io { path: out_dir.to_path_buf(), source }),
    };
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in entries {
        let entry = entry.map_err(|source| Error::Io { path: out_dir.to_path_buf(), source })?;
        let name = entry.file_name();
        let Some(step) =
            name.to_str().and_then(|n| n.strip_prefix("checkpoint-")).and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if entry.path().join(TRAINER_STATE_FILE).is_file() && best.as_ref().is_none_or(|(s, _)| step > *s) {
            best = Some((step, entry.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Load a Hugging Face model folder (config.json and safetensors weights, through lora-io) as
/// an f32 model.
pub fn load_model(base: &Path) -> Result<Model<f32>> {
    let config = ModelConfig::from_file(&base.join("config.json"))?;
    let folder = ModelFolder::open(base)?;
    Model::from_source(config, &folder)
}

/// `lora train`'s library side: load the base model folder `base` and the data file `data`
/// (plain text or JSONL, tokenised with `base/tokenizer.json` or as bytes), train LoRA branches
/// as `config` says (resuming from `config.resume` when set), call `on_step` after every step
/// (return [`ControlFlow::Break`] to stop; the checkpoints written so far stay), write
/// checkpoints into `out` and finally the PEFT adapter folder `out` itself.
pub fn train(
    base: &Path,
    data: &Path,
    out: &Path,
    config: &TrainConfig,
    on_step: impl FnMut(&StepReport) -> ControlFlow<()>,
) -> Result<TrainSummary> {
    let model = load_model(base)?;
    let dataset = Dataset::load(base, data, model.config().vocab_size, config.seq_len, config.val_fraction)?;
    let mut trainer = Trainer::new(model, dataset, config.clone())?.with_base_model(base.display().to_string());
    trainer.run(Some(out), on_step)
}
