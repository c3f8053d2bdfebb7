//! One-shot figures for docs/benchmarks.md, and the Rust side of `benches/compare_torch.py`.
//!
//! - `svd_report full`: exact against randomized extraction on 4096 x 4096 and 4096 x 11008
//!   (time, error ratio to the optimum), and resize 64 -> 16 against rebuild plus full SVD.
//! - `svd_report dump DIR [ROWSxCOLS ...]`: write the benchmark matrices (default: the two shapes
//!   above) as raw little-endian f32, `DIR/decaying_ROWSxCOLS.f32`.
//! - `svd_report time FILE ROWS COLS RANK REPS [OVERSAMPLE POWER_ITERS]`: time randomized
//!   extraction on a dumped matrix, print JSON.
//!
//! - `svd_report model LAYERS THREADS`: model-level extraction of LAYERS 4096 x 4096 deltas at
//!   rank 64, sequential (THREADS = 0) or THREADS layers at once; prints wall time and CPU time
//!   (set `OPENBLAS_NUM_THREADS` to choose BLAS's threads).
//!
//! Build with `--release`: `cargo run --release -p lora-svd --example svd_report -- full`.

use std::io::Write;
use std::time::Instant;

use lora_core::{DType, MemorySource};
use lora_svd::{
    extract, extract_model, resize, ExtractConfig, ModelConfig, ModelExtraction, Parallelism, Progress, Randomized,
    RankRule, Selection, SvdMethod,
};
use ndarray::Array2;

#[path = "../benches/support/data.rs"]
mod data;

const SHAPES: [(usize, usize); 2] = [(4096, 4096), (4096, 11008)];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("full") => full(),
        Some("dump") => dump(args.get(1).map_or("/tmp/lora-svd-bench", String::as_str), &args[2.min(args.len())..]),
        Some("time") => time(&args[1..]),
        Some("model") => model(&args[1..]),
        _ => anyhow::bail!(
            "usage: svd_report full | dump DIR [ROWSxCOLS ...] | time FILE ROWS COLS RANK REPS [P Q] | model LAYERS THREADS"
        ),
    }
}

fn seconds(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn full() -> anyhow::Result<()> {
    println!("| shape | method | rank | time (s) | error / optimum |");
    println!("|---|---|---|---|---|");
    for (m, n) in SHAPES {
        let delta = data::decaying(m, n, 1);
        let start = Instant::now();
        let exact = ExtractConfig::new(RankRule::fixed(64)?, SvdMethod::Exact);
        let mut exact_cfg = exact.clone();
        exact_cfg.spectrum_len = usize::MAX;
        let (_, report) = extract(&delta, &exact_cfg)?;
        let exact_time = seconds(start);
        let sigma = report.singular_values;
        let total: f64 = sigma.iter().map(|s| s * s).sum();
        let optimum = |k: usize| (sigma[k..].iter().map(|s| s * s).sum::<f64>() / total).sqrt();
        println!("| {m} x {n} | exact (gesdd) | any | {exact_time:.2} | 1 |");
        for k in [16, 64] {
            for (label, method) in [
                ("randomized (default)", SvdMethod::default()),
                (
                    "randomized p=10 q=2 (torch's svd_lowrank)",
                    SvdMethod::Randomized(Randomized { oversample: 10, power_iters: 2, seed: 0 }),
                ),
            ] {
                let config = ExtractConfig::new(RankRule::fixed(k)?, method);
                let mut times = Vec::new();
                let mut err = 0.0;
                for _ in 0..5 {
                    let start = Instant::now();
                    let (_, report) = extract(&delta, &config)?;
                    times.push(seconds(start));
                    err = report.relative_error;
                }
                let t = median(times);
                println!(
                    "| {m} x {n} | {label} | {k} | {t:.3} (exact / this: {:.0}x) | {:.5} |",
                    exact_time / t,
                    err / optimum(k)
                );
            }
        }
        if m == n {
            let (layer, _) = extract(&delta, &ExtractConfig::new(RankRule::fixed(64)?, SvdMethod::default()))?;
            let rule = RankRule::fixed(16)?;
            let mut times = Vec::new();
            let mut small = None;
            for _ in 0..20 {
                let start = Instant::now();
                small = Some(resize(&layer, &rule)?.0);
                times.push(seconds(start));
            }
            let t_resize = median(times);
            let start = Instant::now();
            let (rebuilt, _) = extract(&layer.delta(), &ExtractConfig::new(rule, SvdMethod::Exact))?;
            let t_rebuild = seconds(start);
            let small = small.expect("20 runs");
            let diff = frob(&(small.delta() - rebuilt.delta())) / frob(&layer.delta());
            println!(
                "| {m} x {n} | resize 64 -> 16: factored | 16 | {t_resize:.4} | ||difference|| / ||dW|| = {diff:.1e} |"
            );
            println!(
                "| {m} x {n} | resize 64 -> 16: rebuild dW + full SVD | 16 | {t_rebuild:.2} (factored is {:.0}x faster) | |",
                t_rebuild / t_resize
            );
        }
    }
    Ok(())
}

fn frob(a: &Array2<f32>) -> f64 {
    a.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt()
}

fn dump(dir: &str, shapes: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let shapes: Vec<(usize, usize)> = if shapes.is_empty() {
        SHAPES.to_vec()
    } else {
        shapes
            .iter()
            .map(|s| {
                let (m, n) = s.split_once('x').ok_or_else(|| anyhow::anyhow!("shape {s}: expected ROWSxCOLS"))?;
                Ok((m.parse()?, n.parse()?))
            })
            .collect::<anyhow::Result<_>>()?
    };
    for (m, n) in shapes {
        let delta = data::decaying(m, n, 1);
        let path = format!("{dir}/decaying_{m}x{n}.f32");
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for v in delta.iter() {
            file.write_all(&v.to_le_bytes())?;
        }
        file.flush()?;
        println!("{path}");
    }
    Ok(())
}

fn time(args: &[String]) -> anyhow::Result<()> {
    let [file, m, n, k, reps, rest @ ..] = args else {
        anyhow::bail!("time FILE ROWS COLS RANK REPS [OVERSAMPLE POWER_ITERS]");
    };
    let (m, n, k, reps): (usize, usize, usize, usize) = (m.parse()?, n.parse()?, k.parse()?, reps.parse()?);
    let bytes = std::fs::read(file)?;
    anyhow::ensure!(bytes.len() == 4 * m * n, "{file}: expected {} bytes, got {}", 4 * m * n, bytes.len());
    let values = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let delta = Array2::from_shape_vec((m, n), values)?;
    let method = match rest {
        [p, q] => SvdMethod::Randomized(Randomized { oversample: p.parse()?, power_iters: q.parse()?, seed: 0 }),
        _ => SvdMethod::default(),
    };
    let config = ExtractConfig::new(RankRule::fixed(k)?, method);
    let mut times = Vec::new();
    let mut err = 0.0;
    extract(&delta, &config)?; // warm-up: thread pools, page faults
    for _ in 0..reps {
        let start = Instant::now();
        let (_, report) = extract(&delta, &config)?;
        times.push(seconds(start));
        err = report.relative_error;
    }
    println!("{{\"times\": {times:?}, \"rel_error\": {err}}}");
    Ok(())
}

/// User plus system CPU time of this process, in seconds (Linux).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
    ticks / 100.0
}

fn model(args: &[String]) -> anyhow::Result<()> {
    let [layers, threads] = args else { anyhow::bail!("model LAYERS THREADS") };
    let (layers, threads): (usize, usize) = (layers.parse()?, threads.parse()?);
    let mut base = MemorySource::new();
    let mut tuned = MemorySource::new();
    for i in 0..layers {
        let name = format!("model.layers.{i}.mlp.up_proj.weight");
        let w = data::gaussian(4096, 4096, 100 + i as u64).mapv(|v| v * 0.02);
        let delta = data::decaying(4096, 4096, 200 + i as u64);
        base.insert(&name, w.clone().into_dyn(), DType::F32);
        tuned.insert(&name, (w + delta).into_dyn(), DType::F32);
    }
    let config = ModelConfig {
        extract: ExtractConfig::new(RankRule::fixed(64)?, SvdMethod::default()),
        selection: Selection::default(),
        parallelism: if threads == 0 { Parallelism::Sequential } else { Parallelism::Layers(threads) },
    };
    let (cpu, start) = (cpu_seconds(), Instant::now());
    let out: ModelExtraction<f32> = extract_model(&base, &tuned, &config, &|_: &Progress<'_>| {})?;
    let (wall, cpu) = (seconds(start), cpu_seconds() - cpu);
    anyhow::ensure!(out.modules.len() == layers, "every layer extracted");
    println!(
        "{{\"layers\": {layers}, \"threads\": {threads}, \"blas_threads\": {:?}, \"wall_s\": {wall:.3}, \"cpu_s\": {cpu:.2}, \"cores_busy\": {:.2}}}",
        std::env::var("OPENBLAS_NUM_THREADS").unwrap_or_else(|_| "default".into()),
        cpu / wall
    );
    Ok(())
}
