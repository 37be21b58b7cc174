//! bench/codecs.png and bench/codecs-smollm2.png: held-out loss against bytes uploaded, one
//! curve per codec setting, so the trade-off is seen at a glance. Text needs a TrueType font;
//! DejaVu Sans (Debian's fonts-dejavu-core) is used when present, else the plot is skipped
//! with a note.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde_json::Value;

use super::num;

const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];
const COLORS: [RGBColor; 6] = [BLACK, RED, BLUE, GREEN, MAGENTA, CYAN];

/// Draws `results["runs"]` (each: codec, heldout_loss, bytes_per_delta, accepted_deltas) into
/// `path`, leaving out points above `y_top` (the first rounds look alike for every codec; the
/// tail is the story).
pub fn codecs(results: &Value, path: &Path, caption: &str, y_top: f64) -> Result<()> {
    let font = FONTS
        .iter()
        .find_map(|f| std::fs::read(f).ok())
        .context("no DejaVu Sans font (apt install fonts-dejavu-core)")?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("the font file is not a usable TrueType font"))?;
    // (codec, [(cumulative bytes uploaded, held-out loss after that round)])
    let curves: Vec<(String, Vec<(f64, f64)>)> = results["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|run| {
            let losses = crate::demo::heldout_losses(run);
            let rounds = losses.len().saturating_sub(1).max(1) as f64;
            let per_round = num(&run["bytes_per_delta"]) * num(&run["accepted_deltas"]) / rounds;
            let points = losses
                .iter()
                .enumerate()
                .skip(1)
                .filter(|(_, loss)| **loss <= y_top)
                .map(|(r, loss)| (per_round * r as f64, *loss))
                .collect();
            (run["codec"].as_str().unwrap_or("?").to_string(), points)
        })
        .collect();
    let all = || curves.iter().flat_map(|(_, p)| p.iter());
    let (x_min, x_max) = all().fold((f64::MAX, 0f64), |(lo, hi), (x, _)| {
        (lo.min(*x), hi.max(*x))
    });
    let (y_min, y_max) = all().fold((f64::MAX, 0f64), |(lo, hi), (_, y)| {
        (lo.min(*y), hi.max(*y))
    });
    anyhow::ensure!(x_max > 0.0 && x_min < x_max, "no curve to draw");

    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d((x_min * 0.8..x_max * 1.25).log_scale(), y_min * 0.97..y_max)?;
    chart
        .configure_mesh()
        .x_desc("bytes uploaded so far (log)")
        .y_desc("held-out loss")
        .x_label_formatter(&|x| human_bytes(*x))
        .draw()?;
    for (i, (codec, points)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(codec.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn human_bytes(b: f64) -> String {
    match b {
        b if b >= 1e6 => format!("{:.0} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.0} kB", b / 1e3),
        b => format!("{b:.0} B"),
    }
}
