//! The decoder: weights, batches, the forward pass, the loss and the hand-written backward pass
//! of the loss to every LoRA factor, with optional gradient checkpointing.

use indexmap::IndexMap;
use lora_core::{Scalar, TensorSource};
use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array1, Array2, Array3, ArrayD, Axis, Ix1, Ix2};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::linear::{self, Linear, LinearCache, LoraGrad};
use crate::ops::{self, AttnDims, Rope};
use crate::parallel::{chunk_rows, gemm, Par, Parallelism};

/// Labels equal to this value do not count in the loss (PyTorch's and transformers' -100).
pub const IGNORE_INDEX: i64 = -100;

/// The seven linear layers of a decoder layer that LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    /// `self_attn.q_proj`.
    Q,
    /// `self_attn.k_proj`.
    K,
    /// `self_attn.v_proj`.
    V,
    /// `self_attn.o_proj`.
    O,
    /// `mlp.gate_proj`.
    Gate,
    /// `mlp.up_proj`.
    Up,
    /// `mlp.down_proj`.
    Down,
}

impl Proj {
    /// All seven, in the order of the layer's forward pass.
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// The module's own name (`q_proj`).
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// The module path in layer `layer`, as transformers and PEFT name it
    /// (`model.layers.0.self_attn.q_proj`).
    pub fn module_path(self, layer: usize) -> String {
        let parent = match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            Proj::Gate | Proj::Up | Proj::Down => "mlp",
        };
        format!("model.layers.{layer}.{parent}.{}", self.name())
    }

    /// The layer and projection of a module path, if it names one.
    pub fn parse_path(path: &str) -> Option<(usize, Proj)> {
        let (layer, _) = path.strip_prefix("model.layers.")?.split_once('.')?;
        let layer = layer.parse().ok()?;
        Proj::ALL.into_iter().find(|p| p.module_path(layer) == path).map(|p| (layer, p))
    }
}

/// A batch of sequences of equal length: token ids, an optional padding mask and the labels of
/// the loss.
///
/// Position t of a sequence predicts label t + 1 (the shift transformers does inside its loss).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    input_ids: Array2<u32>,
    keep: Option<Array2<bool>>,
    labels: Array2<i64>,
}

impl Batch {
    /// A batch whose labels are its input ids, with no padding (`model(input_ids=x, labels=x)`).
    pub fn new(input_ids: Array2<u32>) -> Result<Self> {
        if input_ids.is_empty() {
            return Err(Error::Input(format!("empty batch of shape {:?}", input_ids.shape())));
        }
        let labels = input_ids.mapv(i64::from);
        Ok(Batch { input_ids, keep: None, labels })
    }

    /// Add transformers' `attention_mask` (true or 1: a real token; false or 0: padding, which no
    /// query attends to). Labels are not changed: mask padded labels with [`IGNORE_INDEX`].
    pub fn with_attention_mask(mut self, mask: Array2<bool>) -> Result<Self> {
        if mask.shape() != self.input_ids.shape() {
            return Err(Error::Input(format!(
                "attention mask shape {:?} differs from input ids shape {:?}",
                mask.shape(),
                self.input_ids.shape()
            )));
        }
        self.keep = Some(mask);
        Ok(self)
    }

    /// Replace the labels (same shape as the ids; [`IGNORE_INDEX`] where nothing is predicted).
    pub fn with_labels(mut self, labels: Array2<i64>) -> Result<Self> {
        if labels.shape() != self.input_ids.shape() {
            return Err(Error::Input(format!(
                "labels shape {:?} differs from input ids shape {:?}",
                labels.shape(),
                self.input_ids.shape()
            )));
        }
        self.labels = labels;
        Ok(self)
    }

    /// The token ids, (sequences, positions).
    pub fn input_ids(&self) -> &Array2<u32> {
        &self.input_ids
    }

    /// The labels.
    pub fn labels(&self) -> &Array2<i64> {
        &self.labels
    }

    /// Number of predictions that count in the loss.
    pub fn predictions(&self) -> usize {
        self.labels.rows().into_iter().map(|row| row.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()).sum()
    }

    /// The label each row of the activations predicts: row b x positions + t predicts
    /// `labels[b][t + 1]` (the shift transformers does inside its loss); a sequence's last
    /// position predicts nothing ([`IGNORE_INDEX`]).
    fn targets(&self) -> Array1<i64> {
        let t = self.seq_len();
        Array1::from_shape_fn(self.labels.len(), |r| match r % t + 1 {
            next if next < t => self.labels[(r / t, next)],
            _ => IGNORE_INDEX,
        })
    }

    fn sequences(&self) -> usize {
        self.input_ids.nrows()
    }

    fn seq_len(&self) -> usize {
        self.input_ids.ncols()
    }
}

/// A summed loss: the sum of the cross-entropies and how many predictions it holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Loss {
    /// Sum of the cross-entropies, in f64.
    pub sum: f64,
    /// Number of predictions.
    pub count: usize,
}

impl Loss {
    /// The mean cross-entropy (what transformers reports as `loss`).
    pub fn mean(&self) -> f64 {
        self.sum / self.count as f64
    }
}

/// Gradients of the mean loss for every LoRA module, by module path.
pub type LoraGrads<T> = IndexMap<String, LoraGrad<T>>;

/// Options of a training forward + backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepOptions {
    /// Keep only each layer's input during the forward pass and recompute the layer's
    /// activations in the backward pass: activation memory drops from about a layer's worth of
    /// activations per layer to one residual-stream matrix per layer, for one more forward pass.
    pub checkpointing: bool,
    /// Seed of the LoRA dropout masks of this step (each module draws its own mask from it).
    pub dropout_seed: u64,
}

/// One decoder layer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Block<T> {
    pub(crate) input_norm: Array1<T>,
    pub(crate) post_norm: Array1<T>,
    /// Indexed by [`Proj`] as usize.
    pub(crate) linears: Vec<Linear<T>>,
}

/// What a layer's backward pass needs from its forward pass.
#[derive(Debug)]
struct BlockCache<T> {
    x1: Array2<T>,
    rstd1: Array1<T>,
    q: Array2<T>,
    k: Array2<T>,
    v: Array2<T>,
    /// Attention probabilities, the blocks under the causal mask.
    probs: ops::Probs<T>,
    o: Array2<T>,
    h2: Array2<T>,
    x2: Array2<T>,
    rstd2: Array1<T>,
    g: Array2<T>,
    u: Array2<T>,
    act: Array2<T>,
    lin: Vec<LinearCache<T>>,
}

/// Everything shared by the layers of one pass.
struct Ctx<'a, T> {
    dims: AttnDims,
    rope: &'a Rope<T>,
    keep: Option<&'a Array2<bool>>,
    dropout_seed: Option<u64>,
    eps: f64,
    par: &'a Par,
}

impl<T: Scalar> Block<T> {
    fn lin(&self, p: Proj) -> &Linear<T> {
        &self.linears[p as usize]
    }

    /// [`linear::forward_shared`] of the projections `ps`, which read the same input.
    fn forward_shared<const N: usize>(
        &self,
        ps: [Proj; N],
        x: &Array2<T>,
        seed: impl Fn(Proj) -> Option<u64>,
        par: &Par,
    ) -> [(Array2<T>, LinearCache<T>); N] {
        let out = linear::forward_shared(&ps.map(|p| self.lin(p)), x, &ps.map(seed), par);
        out.try_into().unwrap_or_else(|_| unreachable!("one result per projection"))
    }

    /// [`linear::backward_shared`] of the projections `ps`, which read the same input.
    fn backward_shared<const N: usize>(
        &self,
        ps: [Proj; N],
        dys: [&Array2<T>; N],
        x: &Array2<T>,
        c: &BlockCache<T>,
        need_dx: bool,
        par: &Par,
    ) -> (Option<Array2<T>>, [Option<LoraGrad<T>>; N]) {
        let caches = ps.map(|p| &c.lin[p as usize]);
        let (dx, out) = linear::backward_shared(&ps.map(|p| self.lin(p)), &dys, x, &caches, need_dx, par);
        (dx, out.try_into().unwrap_or_else(|_| unreachable!("one result per projection")))
    }

    fn forward(
        &self,
        h: &Array2<T>,
        layer: usize,
        ctx: &Ctx<'_, T>,
        keep_cache: bool,
    ) -> (Array2<T>, Option<BlockCache<T>>) {
        let seed = |p: Proj| ctx.dropout_seed.map(|s| mix(s, layer, p));
        let (x1, rstd1) = ops::rms_norm(h, &self.input_norm, ctx.eps, ctx.par);
        let qkv = [Proj::Q, Proj::K, Proj::V];
        let [(mut q, cq), (mut k, ck), (v, cv)] = self.forward_shared(qkv, &x1, seed, ctx.par);
        ctx.rope.apply(&mut q, ctx.dims.seq, ctx.dims.head_dim, false, ctx.par);
        ctx.rope.apply(&mut k, ctx.dims.seq, ctx.dims.head_dim, false, ctx.par);
        let (o, probs) = ops::attention(&q, &k, &v, ctx.dims, ctx.keep, ctx.par);
        let (h2, co) = self.lin(Proj::O).forward(&o, seed(Proj::O), Some(h), ctx.par); // h + o_proj(...)
        let (x2, rstd2) = ops::rms_norm(&h2, &self.post_norm, ctx.eps, ctx.par);
        let [(g, cg), (u, cu)] = self.forward_shared([Proj::Gate, Proj::Up], &x2, seed, ctx.par);
        let act = ops::swiglu(&g, &u, ctx.par);
        let (out, cd) = self.lin(Proj::Down).forward(&act, seed(Proj::Down), Some(&h2), ctx.par); // h2 + down(...)
        let cache = keep_cache.then(|| BlockCache {
            x1,
            rstd1,
            q,
            k,
            v,
            probs,
            o,
            h2,
            x2,
            rstd2,
            g,
            u,
            act,
            lin: vec![cq, ck, cv, co, cg, cu, cd],
        });
        (out, cache)
    }

    /// The gradient of the layer's input from its output's (`None` unless `need_dx`: the first
    /// layer's input, the embeddings, is frozen), pushing LoRA gradients into `grads` (indexed
    /// by [`Proj`]).
    fn backward(
        &self,
        h: &Array2<T>,
        c: &BlockCache<T>,
        dh: &Array2<T>,
        ctx: &Ctx<'_, T>,
        grads: &mut [Option<LoraGrad<T>>],
        need_dx: bool,
    ) -> Option<Array2<T>> {
        let par = ctx.par;
        let dx_of = |p: Proj, dy: &Array2<T>, x: &Array2<T>, grads: &mut [Option<LoraGrad<T>>]| {
            let (dx, [grad]) = self.backward_shared([p], [dy], x, c, true, par);
            grads[p as usize] = grad;
            dx.expect("asked for the input gradient")
        };
        // MLP: out = h2 + down(silu(gate(x2)) * up(x2)), x2 = norm(h2)
        let dact = dx_of(Proj::Down, dh, &c.act, grads);
        let (dg, du) = ops::swiglu_backward(&dact, &c.g, &c.u, par);
        drop(dact);
        let (dx2, [gate, up]) = self.backward_shared([Proj::Gate, Proj::Up], [&dg, &du], &c.x2, c, true, par);
        (grads[Proj::Gate as usize], grads[Proj::Up as usize]) = (gate, up);
        let dx2 = dx2.expect("asked for the input gradient");
        let dh2 = ops::rms_norm_backward(&dx2, &c.h2, &self.post_norm, &c.rstd2, Some(dh), par);
        // attention: h2 = h + o_proj(attn(rope(q(x1)), rope(k(x1)), v(x1))), x1 = norm(h)
        let d_o = dx_of(Proj::O, &dh2, &c.o, grads);
        let (mut dq, mut dk, dv) = ops::attention_backward(&d_o, [&c.q, &c.k, &c.v], &c.probs, ctx.dims, ctx.keep, par);
        ctx.rope.apply(&mut dq, ctx.dims.seq, ctx.dims.head_dim, true, par);
        ctx.rope.apply(&mut dk, ctx.dims.seq, ctx.dims.head_dim, true, par);
        let qkv = [Proj::Q, Proj::K, Proj::V];
        let (dx1, [gq, gk, gv]) = self.backward_shared(qkv, [&dq, &dk, &dv], &c.x1, c, need_dx, par);
        (grads[Proj::Q as usize], grads[Proj::K as usize], grads[Proj::V as usize]) = (gq, gk, gv);
        dx1.map(|dx1| ops::rms_norm_backward(&dx1, h, &self.input_norm, &c.rstd1, Some(&dh2), par))
    }
}

/// The dropout seed of one module in one step (splitmix64 of the step seed, layer and module).
pub(crate) fn mix(seed: u64, layer: usize, p: Proj) -> u64 {
    let mut z = seed ^ ((layer as u64) << 8 | p as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A Llama-family causal language model with frozen weights in `T` and optional LoRA branches
/// on its linear layers.
#[derive(Debug, Clone)]
pub struct Model<T> {
    pub(crate) config: ModelConfig,
    pub(crate) embed: Array2<T>,
    pub(crate) blocks: Vec<Block<T>>,
    pub(crate) norm: Array1<T>,
    /// None when tied to the embedding table.
    pub(crate) lm_head: Option<Array2<T>>,
    pub(crate) par: Par,
}

fn read_tensor<T: Scalar, S: TensorSource + ?Sized>(source: &S, name: &str, shape: &[usize]) -> Result<ArrayD<T>> {
    let info = source.tensor_info(name).ok_or_else(|| lora_core::Error::TensorNotFound { name: name.into() })?;
    if info.shape != shape {
        return Err(Error::WeightShape { tensor: name.into(), expected: shape.to_vec(), got: info.shape });
    }
    let t = T::read_from(source, name)?;
    if t.shape() != shape {
        return Err(Error::WeightShape { tensor: name.into(), expected: shape.to_vec(), got: t.shape().to_vec() });
    }
    if let Some(flat) = t.iter().position(|v| !v.is_finite()) {
        return Err(Error::Input(format!("tensor {name} holds a non-finite value at flat index {flat}")));
    }
    Ok(t)
}

/// Compare the sizes config.json claims with the weights before anything is allocated from
/// them: the vocabulary with the embedding table's rows, the layer count with the last layer's
/// tensors. A config claiming a vocabulary of 10^12 or a million layers fails here, naming the
/// field.
fn check_claims<S: TensorSource + ?Sized>(c: &ModelConfig, source: &S, file: &str) -> Result<()> {
    let bad = |message: String| Err(Error::Config { file: file.to_string(), message });
    let embed = "model.embed_tokens.weight";
    if let Some(rows) = source.tensor_info(embed).and_then(|i| i.shape.first().copied()) {
        if rows != c.vocab_size {
            return bad(format!("vocab_size {} disagrees with {embed}, which has {rows} rows", c.vocab_size));
        }
    }
    if let Some(last) = c.num_hidden_layers.checked_sub(1) {
        let norm = format!("model.layers.{last}.input_layernorm.weight");
        if source.tensor_info(&norm).is_none() {
            return bad(format!("num_hidden_layers {} but the weights have no {norm}", c.num_hidden_layers));
        }
    }
    Ok(())
}

fn read2<T: Scalar, S: TensorSource + ?Sized>(source: &S, name: &str, rows: usize, cols: usize) -> Result<Array2<T>> {
    Ok(read_tensor(source, name, &[rows, cols])?.into_dimensionality::<Ix2>().expect("shape checked"))
}

fn read1<T: Scalar, S: TensorSource + ?Sized>(source: &S, name: &str, len: usize) -> Result<Array1<T>> {
    Ok(read_tensor(source, name, &[len])?.into_dimensionality::<Ix1>().expect("shape checked"))
}

impl<T: Scalar> Model<T> {
    /// Load a Hugging Face model folder: config.json and the weights (single or sharded
    /// safetensors, f32, f16 or bf16), memory-mapped and converted to `T` one tensor at a time.
    pub fn from_dir(dir: impl AsRef<std::path::Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("config.json");
        let config = ModelConfig::from_file(&config_path)?;
        let folder = lora_io::ModelFolder::open(dir)?;
        Self::load(config, &folder, &config_path.display().to_string())
    }

    /// Load the weights named as in a transformers checkpoint (`model.embed_tokens.weight`,
    /// `model.layers.0.self_attn.q_proj.weight`, ...) from `source`, converted to `T`.
    /// Missing tensors, wrong shapes and non-finite values are errors naming the tensor.
    pub fn from_source<S: TensorSource + ?Sized>(config: ModelConfig, source: &S) -> Result<Self> {
        Self::load(config, source, "<config>")
    }

    /// [`Model::from_source`]; `file` names the config in errors.
    fn load<S: TensorSource + ?Sized>(config: ModelConfig, source: &S, file: &str) -> Result<Self> {
        config.validate().map_err(|e| match e {
            Error::Config { message, .. } => Error::Config { file: file.to_string(), message },
            e => e,
        })?;
        check_claims(&config, source, file)?;
        let c = &config;
        let (h, i, qd, kvd) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
        let embed = read2(source, "model.embed_tokens.weight", c.vocab_size, h)?;
        // No reservation from the config's layer count: the weights bound it, not the claim.
        let mut blocks = Vec::new();
        for l in 0..c.num_hidden_layers {
            let mut linears = Vec::with_capacity(7);
            for p in Proj::ALL {
                let (d_out, d_in, bias) = match p {
                    Proj::Q => (qd, h, c.qkv_bias),
                    Proj::K | Proj::V => (kvd, h, c.qkv_bias),
                    Proj::O => (h, qd, c.o_bias),
                    Proj::Gate | Proj::Up => (i, h, c.mlp_bias),
                    Proj::Down => (h, i, c.mlp_bias),
                };
                let path = p.module_path(l);
                let weight = read2(source, &format!("{path}.weight"), d_out, d_in)?;
                let bias = if bias { Some(read1(source, &format!("{path}.bias"), d_out)?) } else { None };
                linears.push(Linear::new(weight, bias));
            }
            blocks.push(Block {
                input_norm: read1(source, &format!("model.layers.{l}.input_layernorm.weight"), h)?,
                post_norm: read1(source, &format!("model.layers.{l}.post_attention_layernorm.weight"), h)?,
                linears,
            });
        }
        let norm = read1(source, "model.norm.weight", h)?;
        let lm_head =
            if c.tie_word_embeddings { None } else { Some(read2(source, "lm_head.weight", c.vocab_size, h)?) };
        Ok(Model { config, embed, blocks, norm, lm_head, par: Par::default() })
    }

    /// The same model running on `parallelism` (a new rayon pool for [`Parallelism::Threads`]).
    pub fn with_parallelism(mut self, parallelism: Parallelism) -> Result<Self> {
        self.par = Par::new(parallelism)?;
        Ok(self)
    }

    /// The config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn lm_head(&self) -> &Array2<T> {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    fn check(&self, batch: &Batch) -> Result<()> {
        let vocab = self.config.vocab_size;
        if let Some(((b, t), &id)) = batch.input_ids.indexed_iter().find(|(_, &id)| id as usize >= vocab) {
            return Err(Error::Input(format!("token id {id} at ({b}, {t}) is outside the vocabulary of {vocab}")));
        }
        if let Some(((b, t), &l)) =
            batch.labels.indexed_iter().find(|(_, &l)| l != IGNORE_INDEX && !(0..vocab as i64).contains(&l))
        {
            return Err(Error::Input(format!("label {l} at ({b}, {t}) is outside the vocabulary of {vocab}")));
        }
        if let Some(w) = self.config.sliding_window.filter(|&w| batch.seq_len() > w) {
            return Err(Error::Unsupported {
                file: "config.json".into(),
                what: format!("sliding_window {w} shorter than the sequence length {}", batch.seq_len()),
            });
        }
        Ok(())
    }

    fn dims(&self, batch: &Batch) -> AttnDims {
        AttnDims {
            batch: batch.sequences(),
            seq: batch.seq_len(),
            heads: self.config.num_attention_heads,
            kv_heads: self.config.num_key_value_heads,
            head_dim: self.config.head_dim,
        }
    }

    fn embed(&self, batch: &Batch) -> Array2<T> {
        let ids: Vec<usize> = batch.input_ids.iter().map(|&id| id as usize).collect();
        self.embed.select(Axis(0), &ids)
    }

    fn ctx<'a>(&'a self, batch: &'a Batch, rope: &'a Rope<T>, dropout_seed: Option<u64>) -> Ctx<'a, T> {
        Ctx {
            dims: self.dims(batch),
            rope,
            keep: batch.keep.as_ref(),
            dropout_seed,
            eps: self.config.rms_norm_eps,
            par: &self.par,
        }
    }

    /// Final norm and output head: logits (rows, vocab).
    fn head(&self, h: &Array2<T>) -> Array2<T> {
        let (xf, _) = ops::rms_norm(h, &self.norm, self.config.rms_norm_eps, &self.par);
        let mut logits = self.par.zeros(h.nrows(), self.config.vocab_size);
        gemm(&self.par, T::one(), &xf, &self.lm_head().t(), T::one(), &mut logits);
        logits
    }

    /// Final norm, output head and cross-entropy, one block of rows ([`chunk_rows`]) at a time,
    /// so the (rows, vocab) logits are never held whole: the summed loss and, with `grad` (the
    /// scale of the loss's gradient, 1 / predictions for the mean), the gradient of the final
    /// norm's input.
    ///
    /// Each thread reuses one block's buffer: 16 MiB on the issue-6 bench config, under glibc's
    /// largest mmap threshold (32 MiB), so it comes from the heap and is kept. A whole piece's
    /// logits (32 MiB at 2 threads, 64 at 1) were mapped fresh every step, and calloc's
    /// untouched pages were first read by the product (the zero page), then copied on write,
    /// each copy a TLB shootdown. Measured (docs/benchmarks.md, "Session 8"): one thread, 5%
    /// less CPU per step; two threads, no change in wall time (the head's weight is now packed
    /// once per block instead of once per piece, which takes back what the faults cost).
    fn head_loss(&self, h: &Array2<T>, batch: &Batch, grad: Option<T>) -> (Loss, Option<Array2<T>>) {
        let (xf, rstd) = ops::rms_norm(h, &self.norm, self.config.rms_norm_eps, &self.par);
        let targets = batch.targets();
        let w = self.lm_head();
        // no columns when no gradient is asked for: the pieces of rows are still the same
        let mut dxf = self.par.zeros(h.nrows(), if grad.is_some() { h.ncols() } else { 0 });
        let block = chunk_rows(h.nrows());
        let parts = self.par.row_chunks_map(&mut dxf, |first, mut dx| {
            // block by block (the loss's sum then does not depend on the pieces), in one buffer
            let n = dx.nrows();
            let mut buffer = Array2::zeros((block.min(n), self.config.vocab_size));
            (0..n)
                .step_by(block)
                .map(|b| {
                    let sub = b..(b + block).min(n);
                    let mut logits = buffer.slice_mut(s![..sub.len(), ..]);
                    if sub.start > 0 {
                        logits.fill(T::zero());
                    }
                    let rows = first + sub.start..first + sub.end;
                    general_mat_mul(T::one(), &xf.slice(s![rows.clone(), ..]), &w.t(), T::one(), &mut logits);
                    let part = ops::cross_entropy_rows(&mut logits, targets.slice(s![rows]), grad);
                    if grad.is_some() {
                        general_mat_mul(T::one(), &logits, w, T::one(), &mut dx.slice_mut(s![sub, ..]));
                    }
                    part
                })
                .collect::<Vec<_>>()
        });
        let loss = parts
            .into_iter()
            .flatten()
            .fold(Loss { sum: 0.0, count: 0 }, |acc, (s, c)| Loss { sum: acc.sum + s, count: acc.count + c });
        let dh = grad.map(|_| ops::rms_norm_backward(&dxf, h, &self.norm, &rstd, None, &self.par));
        (loss, dh)
    }

    /// Logits (sequences, positions, vocab), no dropout.
    pub fn logits(&self, batch: &Batch) -> Result<Array3<T>> {
        self.check(batch)?;
        let rope = Rope::new(batch.seq_len(), self.config.head_dim, self.config.rope_theta);
        let logits = self.par.install(|| {
            let ctx = self.ctx(batch, &rope, None);
            let mut h = self.embed(batch);
            for (l, block) in self.blocks.iter().enumerate() {
                h = block.forward(&h, l, &ctx, false).0;
            }
            self.head(&h)
        });
        let (b, t) = (batch.sequences(), batch.seq_len());
        Ok(logits.into_shape_with_order((b, t, self.config.vocab_size)).expect("rows are sequences x positions"))
    }

    /// The summed next-token cross-entropy of the batch, no dropout.
    pub fn loss(&self, batch: &Batch) -> Result<Loss> {
        self.check(batch)?;
        let rope = Rope::new(batch.seq_len(), self.config.head_dim, self.config.rope_theta);
        Ok(self.par.install(|| {
            let ctx = self.ctx(batch, &rope, None);
            let mut h = self.embed(batch);
            for (l, block) in self.blocks.iter().enumerate() {
                h = block.forward(&h, l, &ctx, false).0;
            }
            self.head_loss(&h, batch, None).0
        }))
    }

    /// The mean loss of the batch and its gradient for every LoRA factor (LoRA dropout active,
    /// drawn from `options.dropout_seed`).
    pub fn loss_and_grads(&self, batch: &Batch, options: StepOptions) -> Result<(Loss, LoraGrads<T>)> {
        self.check(batch)?;
        let count = batch.predictions();
        if count == 0 {
            return Err(Error::Input("no label to predict: every label is ignored".into()));
        }
        let rope = Rope::new(batch.seq_len(), self.config.head_dim, self.config.rope_theta);
        let (loss, grads) = self.par.install(|| {
            let ctx = self.ctx(batch, &rope, Some(options.dropout_seed));
            let mut inputs = Vec::with_capacity(self.blocks.len());
            let mut caches = Vec::with_capacity(self.blocks.len());
            let mut h = self.embed(batch);
            for (l, block) in self.blocks.iter().enumerate() {
                let (out, cache) = block.forward(&h, l, &ctx, !options.checkpointing);
                inputs.push(h);
                caches.push(cache);
                h = out;
            }
            let (loss, dh) = self.head_loss(&h, batch, Some(T::from_f64(1.0 / count as f64)));
            let mut dh = dh.expect("asked for the gradient");
            let mut grads = IndexMap::new();
            let mut layer_grads: Vec<Vec<Option<LoraGrad<T>>>> = Vec::with_capacity(self.blocks.len());
            for (l, block) in self.blocks.iter().enumerate().rev() {
                let cache = match caches[l].take() {
                    Some(c) => c,
                    None => block.forward(&inputs[l], l, &ctx, true).1.expect("asked for the cache"),
                };
                let mut g = vec![None; 7];
                if let Some(d) = block.backward(&inputs[l], &cache, &dh, &ctx, &mut g, l > 0) {
                    dh = d;
                }
                layer_grads.push(g);
            }
            for (l, g) in layer_grads.into_iter().rev().enumerate() {
                for (p, grad) in Proj::ALL.into_iter().zip(g) {
                    if let Some(grad) = grad {
                        grads.insert(p.module_path(l), grad);
                    }
                }
            }
            (loss, grads)
        });
        Ok((loss, grads))
    }
}
