//! SVG plots: singular-value spectra with the chosen ranks marked.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// One line per module: sigma_i against i on a log scale, with a dot at the chosen rank.
pub fn spectra_svg(path: &Path, spectra: &[(String, Vec<f64>, usize)]) -> Result<()> {
    let max_len = spectra.iter().map(|(_, s, _)| s.len()).max().unwrap_or(1).max(2);
    let positive = spectra.iter().flat_map(|(_, s, _)| s.iter().copied()).filter(|v| *v > 0.0);
    let (lo, hi) = positive.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if hi > 0.0 { (lo * 0.8, hi * 1.25) } else { (1e-3, 1.0) };
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("singular values of each weight difference (dot: rank kept)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(1usize..max_len, (lo..hi).log_scale())
        .map_err(plot_err)?;
    chart.configure_mesh().x_desc("index i").y_desc("sigma_i").draw().map_err(plot_err)?;
    for (k, (name, sigma, rank)) in spectra.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let points: Vec<(usize, f64)> =
            sigma.iter().enumerate().filter(|(_, v)| **v > 0.0).map(|(i, v)| (i + 1, *v)).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(1)))
            .map_err(plot_err)?
            .label(name.clone());
        if let Some(p) = points.get(rank.saturating_sub(1)) {
            chart.draw_series(std::iter::once(Circle::new(*p, 3, color.filled()))).map_err(plot_err)?;
        }
    }
    if spectra.len() <= 12 {
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("cannot draw the plot: {e:?}")
}

/// Curves of (step, value), one per named series, on linear axes.
pub fn curves_svg(path: &Path, title: &str, series: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    let points = series.iter().flat_map(|(_, s)| s.iter());
    let (x_max, y_lo, y_hi) = points.fold((1.0f64, f64::INFINITY, f64::NEG_INFINITY), |(x, lo, hi), (px, py)| {
        (x.max(*px), lo.min(*py), hi.max(*py))
    });
    let (y_lo, y_hi) = if y_lo.is_finite() && y_hi > y_lo { (y_lo, y_hi) } else { (0.0, 1.0) };
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, y_lo..y_hi)
        .map_err(plot_err)?;
    chart.configure_mesh().x_desc("step").y_desc("loss").draw().map_err(plot_err)?;
    for (k, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(name.clone());
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw().map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}
