//! Model-level extraction: pair the tensors of a base and a tuned model by name, and factor the
//! difference of every selected linear weight into a LoRA layer.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use lora_core::{read_matrix, Adapter, AdapterConfig, AdapterModule, LoraLayer, TargetModules, TensorSource};
use ndarray::Array2;
use rayon::prelude::*;
use regex::Regex;

use crate::error::{Error, Result};
use crate::extract::{extract, extract_with_energy, ExtractConfig, Report};
use crate::factored::most_common;
use crate::svd::{SvdMethod, SvdScalar};

/// Which tensors are extracted: 2-D tensors whose name matches `include` and not `exclude`.
///
/// The default takes the weights of linear layers (`\.weight$`) and leaves out embeddings, the
/// output head and norms ([`Selection::DEFAULT_EXCLUDE`]); biases and norms are 1-D and never
/// extracted. Tensors that differ but are not extracted are listed in
/// [`ModelExtraction::not_extracted`], so nothing is lost silently.
#[derive(Debug, Clone)]
pub struct Selection {
    include: Regex,
    exclude: Option<Regex>,
}

impl Selection {
    /// The default include pattern: weights.
    pub const DEFAULT_INCLUDE: &'static str = r"\.weight$";
    /// The default exclude pattern: embeddings (`embed_tokens`, `wte`, `wpe`), output heads
    /// (`lm_head`, `embed_out`, llama.cpp's `output.weight`) and norms.
    pub const DEFAULT_EXCLUDE: &'static str =
        r"(?i)(embed|lm_head|norm|(^|\.)ln_|(^|\.)(wte|wpe)\.|(^|\.)output\.weight$)";

    /// A selection from patterns (regex syntax, matched anywhere in the name unless anchored).
    /// `exclude = None` excludes nothing.
    pub fn new(include: &str, exclude: Option<&str>) -> Result<Self> {
        let include =
            Regex::new(include).map_err(|source| Error::Regex { which: "include", pattern: include.into(), source })?;
        let exclude = exclude
            .map(|p| Regex::new(p).map_err(|source| Error::Regex { which: "exclude", pattern: p.into(), source }))
            .transpose()?;
        Ok(Selection { include, exclude })
    }

    /// True when a tensor of this name and shape is extracted.
    pub fn selects(&self, name: &str, shape: &[usize]) -> bool {
        shape.len() == 2 && self.include.is_match(name) && !self.exclude.as_ref().is_some_and(|e| e.is_match(name))
    }
}

impl Default for Selection {
    fn default() -> Self {
        Selection::new(Self::DEFAULT_INCLUDE, Some(Self::DEFAULT_EXCLUDE)).expect("default patterns are valid")
    }
}

/// How many tensors are worked on at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Parallelism {
    /// One tensor at a time, in the tuned model's order, on the calling thread: deterministic
    /// order of work and of progress calls. BLAS may still use its own threads inside each SVD.
    #[default]
    Sequential,
    /// Up to this many tensors at once on a dedicated rayon pool of as many threads; each one
    /// holds its base, tuned and delta matrices, so this also bounds memory. Results are the
    /// same as [`Parallelism::Sequential`]'s; give BLAS one thread (`OPENBLAS_NUM_THREADS=1`)
    /// so that threads are not oversubscribed.
    Layers(usize),
}

/// Settings of [`extract_model`].
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// How each tensor is factored. With a randomized method each tensor gets its own seed,
    /// derived from this seed and the tensor's name.
    pub extract: ExtractConfig,
    /// Which tensors are extracted.
    pub selection: Selection,
    /// How many tensors at once.
    pub parallelism: Parallelism,
}

/// Why a tensor that differs between the models has no LoRA module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// Not matched by the selection (embeddings, heads, or patterns given).
    NotSelected,
    /// Not 2-D (biases, norms).
    NotMatrix,
    /// Present in the tuned model only.
    OnlyInTuned,
    /// Present in the base model only.
    OnlyInBase,
}

/// A tensor that differs between the models (or exists in one only) and was not extracted: the
/// caller may save it whole (PEFT's `modules_to_save`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotExtracted {
    /// The tensor name.
    pub name: String,
    /// Why.
    pub reason: SkipReason,
}

/// One extracted module.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractedModule<T> {
    /// The tensor it came from (`model.layers.0.self_attn.q_proj.weight`).
    pub tensor: String,
    /// The layer.
    pub layer: LoraLayer<T>,
    /// How it went.
    pub report: Report,
}

/// The result of [`extract_model`].
#[derive(Debug, Clone, PartialEq)]
pub struct ModelExtraction<T> {
    /// Extracted modules by module path (the tensor name without `.weight`), in the tuned
    /// model's order.
    pub modules: IndexMap<String, ExtractedModule<T>>,
    /// Selected tensors equal in both models (no module).
    pub unchanged: Vec<String>,
    /// Tensors that differ but were not extracted.
    pub not_extracted: Vec<NotExtracted>,
    /// Wall time.
    pub elapsed: Duration,
}

impl<T: SvdScalar> ModelExtraction<T> {
    /// The modules as an adapter: the most common rank and alpha become the config's defaults,
    /// the others its rank and alpha patterns. Tensors of `not_extracted` are not included.
    pub fn to_adapter(&self, base_model: Option<String>) -> Result<Adapter<T>> {
        let rank = most_common(self.modules.values().map(|m| m.layer.rank())).unwrap_or(1);
        let alpha = self.modules.values().find(|m| m.layer.rank() == rank).map_or(rank as f64, |m| m.layer.alpha());
        let scaling = self.modules.values().next().map(|m| m.layer.scaling()).unwrap_or_default();
        let mut config =
            AdapterConfig::new(rank, alpha, TargetModules::from_modules(self.modules.keys().map(String::as_str)));
        config.scaling = scaling;
        config.base_model = base_model;
        let mut adapter = Adapter::new(config);
        for (name, module) in &self.modules {
            adapter.insert(name.clone(), AdapterModule::linear(module.layer.clone()))?;
        }
        Ok(adapter)
    }
}

/// Where one paired tensor stands, as reported to the progress callback.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// Tensors finished so far, this one included.
    pub done: usize,
    /// Tensors to look at in all.
    pub total: usize,
    /// This tensor.
    pub tensor: &'a str,
    /// The extraction report, when this tensor was extracted.
    pub report: Option<&'a Report>,
}

enum Outcome<T> {
    Extracted(Box<(LoraLayer<T>, Report)>),
    Unchanged,
    Differs(SkipReason),
    Same,
}

/// Extract a LoRA adapter from the difference of two models.
///
/// Tensors are paired by name. Selected pairs (see [`Selection`]) are factored with [`extract`];
/// every other pair is compared, and those that differ are listed with the tensors present in
/// one model only. `progress` is called once per pair, from the worker that finished it.
///
/// Errors (each naming the tensor): shapes that disagree (checked for every pair before any
/// work), read failures, non-finite differences.
pub fn extract_model<T, B, U>(
    base: &B,
    tuned: &U,
    config: &ModelConfig,
    progress: &(dyn Fn(&Progress<'_>) + Sync),
) -> Result<ModelExtraction<T>>
where
    T: SvdScalar,
    B: TensorSource + ?Sized,
    U: TensorSource + ?Sized,
{
    let start = Instant::now();
    let tuned_names = tuned.tensor_names();
    let base_names = base.tensor_names();
    let in_tuned: HashSet<&str> = tuned_names.iter().map(String::as_str).collect();
    let mut not_extracted = Vec::new();
    let mut jobs = Vec::new();
    for name in &tuned_names {
        let Some(b) = base.tensor_info(name) else {
            not_extracted.push(NotExtracted { name: name.clone(), reason: SkipReason::OnlyInTuned });
            continue;
        };
        let t = tuned.tensor_info(name).ok_or_else(|| lora_core::Error::TensorNotFound { name: name.clone() })?;
        if b.shape != t.shape {
            return Err(Error::TensorShapes { name: name.clone(), base: b.shape, tuned: t.shape });
        }
        let selected = config.selection.selects(name, &t.shape);
        let skip = if t.shape.len() == 2 { SkipReason::NotSelected } else { SkipReason::NotMatrix };
        jobs.push((name.as_str(), selected, skip));
    }
    for name in &base_names {
        if !in_tuned.contains(name.as_str()) {
            not_extracted.push(NotExtracted { name: name.clone(), reason: SkipReason::OnlyInBase });
        }
    }

    let total = jobs.len();
    let done = AtomicUsize::new(0);
    let buffers = Buffers::new();
    let run = |&(name, selected, skip): &(&str, bool, SkipReason)| -> Result<Outcome<T>> {
        let outcome = if selected {
            extract_one(base, tuned, name, &config.extract, &buffers)
        } else {
            differs(base, tuned, name).map(|d| if d { Outcome::Differs(skip) } else { Outcome::Same })
        }
        .map_err(|e| e.in_tensor(name))?;
        let report = match &outcome {
            Outcome::Extracted(done) => Some(&done.1),
            _ => None,
        };
        let done = done.fetch_add(1, Ordering::SeqCst) + 1;
        progress(&Progress { done, total, tensor: name, report });
        Ok(outcome)
    };
    let outcomes: Vec<Outcome<T>> = match config.parallelism {
        Parallelism::Sequential => jobs.iter().map(run).collect::<Result<_>>()?,
        Parallelism::Layers(threads) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads.max(1))
                .build()
                .map_err(|e| Error::param("parallelism", format!("cannot start {threads} threads: {e}")))?;
            pool.install(|| jobs.par_iter().with_max_len(1).map(run).collect::<Result<_>>())?
        }
    };

    let mut modules = IndexMap::new();
    let mut unchanged = Vec::new();
    for ((name, _, _), outcome) in jobs.iter().zip(outcomes) {
        match outcome {
            Outcome::Extracted(done) => {
                let (layer, report) = *done;
                let module = name.strip_suffix(".weight").unwrap_or(name).to_string();
                modules.insert(module, ExtractedModule { tensor: name.to_string(), layer, report });
            }
            Outcome::Unchanged => unchanged.push(name.to_string()),
            Outcome::Differs(reason) => not_extracted.push(NotExtracted { name: name.to_string(), reason }),
            Outcome::Same => {}
        }
    }
    Ok(ModelExtraction { modules, unchanged, not_extracted, elapsed: start.elapsed() })
}

fn extract_one<T: SvdScalar, B: TensorSource + ?Sized, U: TensorSource + ?Sized>(
    base: &B,
    tuned: &U,
    name: &str,
    config: &ExtractConfig,
    buffers: &Buffers<T>,
) -> Result<Outcome<T>> {
    let mut config = config.clone();
    config.method = reseed(config.method, name);
    if let Some((delta, energy)) = stored_delta(base, tuned, name, buffers) {
        let result = if energy == 0.0 {
            Ok(Outcome::Unchanged)
        } else {
            extract_with_energy(&delta, energy, &config).map(|done| Outcome::Extracted(Box::new(done)))
        };
        buffers.put(delta.into_raw_vec_and_offset().0);
        return result;
    }
    // The sources hold no bytes, or the difference is not finite: read through the sources,
    // whose checks name the file and the tensor of a NaN or an infinity.
    let mut delta = read_matrix::<T, _>(tuned, name)?;
    {
        let b = read_matrix::<T, _>(base, name)?;
        delta -= &b;
    }
    if delta.iter().all(|v| *v == T::zero()) {
        return Ok(Outcome::Unchanged);
    }
    let (layer, report) = extract(&delta, &config)?;
    Ok(Outcome::Extracted(Box::new((layer, report))))
}

/// Elements decoded per step of [`stored_delta`]: two blocks of this many values stay in L1.
const BLOCK: usize = 2048;

/// tuned - base decoded from the stored bytes of both in one pass, into a recycled buffer,
/// with its squared Frobenius norm (f64; 0 exactly when every difference is 0). `None` when a
/// source has no bytes for the tensor, when they do not hold a matrix of the tensor's shape, or
/// when the difference is not finite: the caller reads the tensors again, and gets a precise
/// error.
fn stored_delta<T: SvdScalar, B: TensorSource + ?Sized, U: TensorSource + ?Sized>(
    base: &B,
    tuned: &U,
    name: &str,
    buffers: &Buffers<T>,
) -> Option<(Array2<T>, f64)> {
    let (Some(t), Some(b), Some(info)) = (tuned.stored(name), base.stored(name), tuned.tensor_info(name)) else {
        return None;
    };
    let n = t.len();
    let [rows, cols] = info.shape[..] else { return None };
    if b.len() != n || rows * cols != n {
        return None; // the read path names what is wrong
    }
    let mut out = buffers.take(n);
    let (mut tt, mut bb) = (vec![T::zero(); BLOCK], vec![T::zero(); BLOCK]);
    let (mut acc, mut nonzero) = ([0.0f64; 8], false);
    for start in (0..n).step_by(BLOCK) {
        let len = BLOCK.min(n - start);
        t.decode_into(start, &mut tt[..len]);
        b.decode_into(start, &mut bb[..len]);
        let from = out.len();
        out.extend(tt[..len].iter().zip(&bb[..len]).map(|(&x, &y)| x - y));
        // Eight accumulators let the compiler vectorise the sum of squares.
        let written = &out[from..];
        let mut chunks = written.chunks_exact(8);
        for c in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += v.as_f64() * v.as_f64();
                nonzero |= v != T::zero();
            }
        }
        for &v in chunks.remainder() {
            acc[0] += v.as_f64() * v.as_f64();
            nonzero |= v != T::zero();
        }
    }
    tuned.release(name);
    base.release(name);
    let energy: f64 = acc.iter().sum();
    if !energy.is_finite() {
        buffers.put(out);
        return None;
    }
    // A non-zero difference whose squares underflow (f64 values below 1e-154) still counts.
    let energy = if nonzero && energy == 0.0 { f64::MIN_POSITIVE } else { energy };
    let delta = Array2::from_shape_vec((rows, cols), out).expect("rows * cols elements");
    Some((delta, energy))
}

/// Difference buffers handed from one tensor to the next. A large allocation is mapped fresh
/// from the kernel every time and zeroed page by page on first touch, which in a virtual
/// machine can cost as much as the decoding: reusing one buffer per worker does not, and each
/// buffer asks for transparent huge pages.
struct Buffers<T>(Mutex<Vec<Vec<T>>>);

impl<T> Buffers<T> {
    fn new() -> Self {
        Buffers(Mutex::new(Vec::new()))
    }

    /// An empty buffer with room for `n` values.
    fn take(&self, n: usize) -> Vec<T> {
        let mut v = self.0.lock().map(|mut free| free.pop()).ok().flatten().unwrap_or_default();
        v.clear();
        if v.capacity() < n {
            v.reserve(n);
            advise_huge_pages(&v);
        }
        v
    }

    fn put(&self, v: Vec<T>) {
        if let Ok(mut free) = self.0.lock() {
            free.push(v);
        }
    }
}

/// Ask the kernel to back a buffer not yet touched with transparent huge pages (where the system
/// allows them on request, as Debian's default `madvise` mode does): a first touch then faults
/// in 2 MiB at a time instead of 4 KiB, 512 times fewer faults. Only a hint; a failure changes
/// nothing.
#[allow(unsafe_code)]
fn advise_huge_pages<T>(v: &Vec<T>) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = v.as_ptr() as usize;
        let end = start + v.capacity() * std::mem::size_of::<T>();
        let (first, last) = (start.div_ceil(PAGE) * PAGE, end / PAGE * PAGE);
        if last > first {
            // SAFETY: the range lies inside the vector's own allocation (whole pages only).
            // MADV_HUGEPAGE sets a flag on the mapping; it does not change any byte of memory,
            // so nothing that reads or writes the vector can observe it.
            let _ = unsafe { libc::madvise(first as *mut libc::c_void, last - first, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}

/// True when the tensor's values differ bit for bit, read in f32 unless it is stored as f64
/// (half the memory of f64 for the common f16 / bf16 / f32 tensors).
fn differs<B: TensorSource + ?Sized, U: TensorSource + ?Sized>(base: &B, tuned: &U, name: &str) -> Result<bool> {
    let wide = |s: Option<lora_core::TensorInfo>| s.is_some_and(|i| i.dtype == lora_core::DType::F64);
    if wide(base.tensor_info(name)) || wide(tuned.tensor_info(name)) {
        let (b, t) = (base.read_f64(name)?, tuned.read_f64(name)?);
        return Ok(b.shape() != t.shape() || b.iter().zip(t.iter()).any(|(x, y)| x.to_bits() != y.to_bits()));
    }
    let (b, t) = (base.read_f32(name)?, tuned.read_f32(name)?);
    Ok(b.shape() != t.shape() || b.iter().zip(t.iter()).any(|(x, y)| x.to_bits() != y.to_bits()))
}

/// The method with its seed mixed with the tensor name (FNV-1a), so that a tensor's result does
/// not depend on which other tensors are extracted or in which order.
fn reseed(method: SvdMethod, name: &str) -> SvdMethod {
    let hash =
        name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3));
    match method {
        SvdMethod::Exact => SvdMethod::Exact,
        SvdMethod::Randomized(mut p) => {
            p.seed ^= hash;
            SvdMethod::Randomized(p)
        }
        SvdMethod::Auto(mut p) => {
            p.seed ^= hash;
            SvdMethod::Auto(p)
        }
    }
}
