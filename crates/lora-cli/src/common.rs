//! What the commands share: rank-rule flags, dtype and format choices, progress bars, thread
//! counts and outputs that appear complete or not at all.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lora_core::DType;
use lora_io::{Format, WriteOptions};
use lora_svd::{Criterion, RankRule};

use crate::source::{open_model, Model};

/// One rank rule (exactly one of the five) with its floor and cap, as `extract` and `resize` take.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct RankArgs {
    /// Keep exactly N singular values.
    #[arg(long, value_name = "N")]
    pub rank: Option<usize>,
    /// Keep the fewest singular values whose squares reach fraction F of ||dW||_F^2 (kohya's
    /// sv_fro = x is --energy x^2).
    #[arg(long, value_name = "F")]
    pub energy: Option<f64>,
    /// Keep every sigma_i >= sigma_max / X (kohya's sv_ratio).
    #[arg(long, value_name = "X")]
    pub sv_ratio: Option<f64>,
    /// Keep every sigma_i > E (mergekit's sv_epsilon).
    #[arg(long, value_name = "E")]
    pub sv_epsilon: Option<f64>,
    /// Keep the fewest singular values whose sum reaches fraction F of the sum of all (kohya's
    /// sv_cumulative; exact method only).
    #[arg(long, value_name = "F")]
    pub sv_cumulative: Option<f64>,
    /// Never keep more than this many.
    #[arg(long, value_name = "N")]
    pub max_rank: Option<usize>,
    /// Never keep fewer than this many.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub min_rank: usize,
}

impl RankArgs {
    /// The rule these flags describe.
    pub fn rule(&self) -> Result<RankRule> {
        let given = [
            self.rank.is_some(),
            self.energy.is_some(),
            self.sv_ratio.is_some(),
            self.sv_epsilon.is_some(),
            self.sv_cumulative.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            bail!("give one rank rule, not several: --rank, --energy, --sv-ratio, --sv-epsilon or --sv-cumulative");
        }
        let criterion = match (self.rank, self.energy, self.sv_ratio, self.sv_epsilon, self.sv_cumulative) {
            (Some(n), ..) => Criterion::Fixed(n),
            (_, Some(f), ..) => Criterion::Energy(f),
            (_, _, Some(x), ..) => Criterion::Ratio(x),
            (_, _, _, Some(e), _) => Criterion::Threshold(e),
            (.., Some(f)) => Criterion::Cumulative(f),
            _ => bail!("give one rank rule: --rank, --energy, --sv-ratio, --sv-epsilon or --sv-cumulative"),
        };
        Ok(RankRule::new(criterion, self.min_rank, self.max_rank)?)
    }
}

/// A stored element type for outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> DType {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

/// An adapter format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// A PEFT adapter folder.
    Peft,
    /// A kohya / sd-scripts .safetensors file.
    Kohya,
    /// A llama.cpp GGUF adapter.
    Gguf,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Peft => Format::Peft,
            FormatArg::Kohya => Format::Kohya,
            FormatArg::Gguf => Format::Gguf,
        }
    }
}

/// The output flags every writing command shares: where, in which dtype, whether to replace an
/// existing output, and whether to print the summary as JSON.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct OutputArgs {
    /// Where to write: a folder for PEFT adapters and models, a file for kohya and GGUF.
    #[arg(long)]
    pub out: PathBuf,
    /// Stored dtype (default: the input's).
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

impl OutputArgs {
    /// `--out PATH --force --json`, as the demo runs the commands.
    pub fn replacing(out: PathBuf) -> Self {
        OutputArgs { out, dtype: None, force: true, json: true }
    }

    /// The chosen dtype, if any.
    pub fn dtype(&self) -> Option<DType> {
        self.dtype.map(DType::from)
    }

    /// Adapter write options: the chosen dtype and the base model's config.json.
    pub fn write_options(&self, base: Option<&Model>) -> WriteOptions {
        WriteOptions { dtype: self.dtype(), base_config: base.and_then(|b| b.config().cloned()) }
    }

    /// Write the output through [`write_output`].
    pub fn write(&self, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        write_output(&self.out, self.force, write)
    }
}

/// The output format and the optional base model of the commands that rewrite adapters
/// (`resize`, `combine`).
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct AdapterOutputArgs {
    /// Output format (default: the (first) input's).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// The base model, for kohya names and GGUF architecture.
    #[arg(long)]
    pub base: Option<PathBuf>,
}

impl AdapterOutputArgs {
    /// The base model, opened, when one was given.
    pub fn open_base(&self) -> Result<Option<Model>> {
        self.base.as_deref().map(|p| open_model(p, "base")).transpose()
    }

    /// The format to write: the one given, else that of `input`.
    pub fn format_or_that_of(&self, input: &Path) -> Result<Format> {
        Ok(self.format.map_or_else(|| lora_io::detect_format(input), |f| Ok(f.into()))?)
    }
}

/// A progress bar on stderr, hidden when stderr is not a terminal or with `--quiet`.
pub fn progress_bar(len: u64, quiet: bool, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if quiet || !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// Use `threads` threads: rayon's global pool, and OpenBLAS inside each product. `None` leaves
/// both at their defaults (all cores).
pub fn set_threads(threads: Option<usize>, blas_threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // A second call (tests run commands in one process) keeps the first pool.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    }
    if let Some(n) = blas_threads.or(threads) {
        blas::set_num_threads(n);
    }
    Ok(())
}

#[allow(unsafe_code)]
mod blas {
    //! OpenBLAS's thread count, set at run time (the environment variable is read only when the
    //! library loads).
    extern "C" {
        fn openblas_set_num_threads(n: std::os::raw::c_int);
    }

    pub fn set_num_threads(n: usize) {
        let n = n.clamp(1, 1024) as std::os::raw::c_int;
        // SAFETY: OpenBLAS documents this call as safe at any time outside a BLAS call; the
        // commands call it before any product runs.
        unsafe { openblas_set_num_threads(n) }
    }
}

/// Write an output (a file or a folder) so that it appears complete or not at all: `write` fills a
/// temporary path in the same folder (`.NAME.lora-tmp-PID`), which takes the place of `out` in
/// one step only when it succeeded ([`lora_io::rename_into_place`]). An existing `out` is refused
/// unless `force`, also when another process creates it meanwhile; with `force` the old output
/// stays whole at its path until the new one replaces it. Temporary paths left by a killed run
/// (whose process is gone) are removed first.
pub fn write_output(out: &Path, force: bool, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if out.exists() && !force {
        bail!("{} exists; pass --force to replace it", out.display());
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if parent.exists() && !parent.is_dir() {
        bail!("{} is not a folder: cannot write {} there", parent.display(), out.display());
    }
    std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let name = out.file_name().with_context(|| format!("{} has no file name", out.display()))?.to_string_lossy();
    remove_stale(&parent, &name);
    let staged = parent.join(format!(".{name}.lora-tmp-{}", std::process::id()));
    remove_path(&staged)?;
    if let Err(err) = write(&staged) {
        let _ = remove_path(&staged);
        // the writers name the staged path; the user asked for `out`
        let message = format!("{err:#}").replace(&staged.display().to_string(), &out.display().to_string());
        bail!("cannot write {}: {message}", out.display());
    }
    let existing = if force { lora_io::Existing::Replace } else { lora_io::Existing::Refuse };
    if let Err(err) = lora_io::rename_into_place(&staged, out, existing) {
        let _ = remove_path(&staged);
        if let lora_io::Error::Io { source, .. } = &err {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                bail!("{} exists (another run wrote it meanwhile); pass --force to replace it", out.display());
            }
        }
        return Err(err.into());
    }
    Ok(())
}

/// Remove what a killed run writing `name` in `dir` left: `.NAME.lora-tmp-PID` (the staged
/// output), `..NAME.lora-tmp-PID.*.tmp` (lora-io's temporary file for it) and `.NAME.lora-old-PID`,
/// when process PID no longer runs. Where running processes cannot be listed (no /proc), nothing
/// is removed: the leftovers are ignored, as their names never collide with a new run's.
fn remove_stale(dir: &Path, name: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let prefixes = [format!(".{name}.lora-tmp-"), format!("..{name}.lora-tmp-"), format!(".{name}.lora-old-")];
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else { continue };
        let Some(rest) = prefixes.iter().find_map(|p| file_name.strip_prefix(p.as_str())) else { continue };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(pid) = digits.parse::<u32>() else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = remove_path(&entry.path());
        }
    }
}

/// Remove a file or a folder with its contents; a missing path is fine.
pub fn remove_path(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => {
            std::fs::remove_dir_all(path).with_context(|| format!("cannot remove {}", path.display()))
        }
        Ok(_) => std::fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display())),
    }
}

/// Print a JSON value on stdout.
pub fn print_json(value: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(value).expect("JSON values serialise"));
}

/// Split `PATH[:WEIGHT]`; a Windows drive letter or a path containing ':' without a number after
/// the last ':' is taken whole.
pub fn split_weight(arg: &str) -> (PathBuf, f64) {
    if let Some((path, weight)) = arg.rsplit_once(':') {
        if let Ok(w) = weight.parse::<f64>() {
            return (PathBuf::from(path), w);
        }
    }
    (PathBuf::from(arg), 1.0)
}
