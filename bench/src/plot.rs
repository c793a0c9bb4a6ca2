//! PNG plots: SLO attainment against request rate, latency CDFs, and overlays of several runs.
//! Text needs a TrueType font: `$TANDEM_FONT`, or DejaVu Sans where Debian puts it
//! (`apt-get install fonts-dejavu-core`); without one, plots are skipped with a warning.

use crate::summary::{Attainment, percentile};
use anyhow::{Context, bail};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers a font once; false when none is found.
pub fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let paths = std::env::var("TANDEM_FONT")
            .ok()
            .into_iter()
            .chain(FONT_PATHS.iter().map(|s| s.to_string()));
        for p in paths {
            if let Ok(bytes) = std::fs::read(&p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// A named way to read one number out of an attainment point.
type AttainmentPart = (&'static str, fn(&Attainment) -> f64);
/// A named latency sample set of a CDF series.
type CdfPart = (&'static str, fn(&CdfSeries) -> &Vec<f64>);

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One curve of attainment against offered rate.
pub struct AttainmentSeries {
    pub label: String,
    /// (rate, attainment), sorted by rate.
    pub points: Vec<(f64, Attainment)>,
}

/// Attainment vs rate: both SLOs, TTFT only and TPOT only for one run (or just "both" per run
/// when overlaying several), with the target line.
pub fn attainment_vs_rate(
    path: &Path,
    title: &str,
    series: &[AttainmentSeries],
    target: f64,
    overlay: bool,
) -> anyhow::Result<()> {
    if !font_ready() {
        bail!("no TrueType font found (set TANDEM_FONT or install fonts-dejavu-core)");
    }
    let max_rate = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(0.0, f64::max);
    if max_rate <= 0.0 {
        bail!("no finite request rates to plot");
    }
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..max_rate * 1.05, 0.0..1.02)?;
    chart
        .configure_mesh()
        .x_desc("offered request rate (req/s)")
        .y_desc("SLO attainment")
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, target), (max_rate * 1.05, target)],
            ShapeStyle::from(&BLACK.mix(0.5)).stroke_width(1),
        ))?
        .label(format!("{:.0}% target", target * 100.0))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.mix(0.5)));
    let mut color = 0;
    for s in series {
        let parts: Vec<AttainmentPart> = if overlay {
            vec![("", |a| a.all)]
        } else {
            vec![
                ("both SLOs", |a| a.all),
                ("TTFT only", |a| a.ttft),
                ("TPOT only", |a| a.tpot),
            ]
        };
        for (name, get) in parts {
            let c = COLORS[color % COLORS.len()];
            color += 1;
            let pts: Vec<(f64, f64)> = s.points.iter().map(|(r, a)| (*r, get(a))).collect();
            let label = if overlay {
                s.label.clone()
            } else {
                name.to_string()
            };
            chart
                .draw_series(LineSeries::new(
                    pts.clone(),
                    ShapeStyle::from(&c).stroke_width(2),
                ))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], ShapeStyle::from(&c).stroke_width(2))
                });
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present().context("writing the PNG")?;
    Ok(())
}

/// One labelled latency sample set (seconds) per run or rate.
pub struct CdfSeries {
    pub label: String,
    pub ttft: Vec<f64>,
    pub tpot: Vec<f64>,
    pub e2el: Vec<f64>,
}

/// Three panels of CDFs: TTFT, TPOT, E2EL, one curve per series.
pub fn latency_cdfs(path: &Path, title: &str, series: &[CdfSeries]) -> anyhow::Result<()> {
    if !font_ready() {
        bail!("no TrueType font found (set TANDEM_FONT or install fonts-dejavu-core)");
    }
    let root = BitMapBackend::new(path, (1500, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let panels = root.split_evenly((1, 3));
    let getters: [CdfPart; 3] = [
        ("TTFT (ms)", |s| &s.ttft),
        ("TPOT (ms)", |s| &s.tpot),
        ("E2EL (ms)", |s| &s.e2el),
    ];
    for (panel, (name, get)) in panels.iter().zip(getters) {
        let sorted: Vec<Vec<f64>> = series
            .iter()
            .map(|s| {
                let mut v: Vec<f64> = get(s).iter().map(|x| x * 1e3).collect();
                v.sort_by(f64::total_cmp);
                v
            })
            .collect();
        let max_x = sorted
            .iter()
            .filter_map(|v| v.last().copied())
            .fold(0.0, f64::max)
            .max(1e-3);
        let p99 = sorted
            .iter()
            .filter(|v| !v.is_empty())
            .map(|v| percentile(v, 99.5))
            .fold(0.0, f64::max)
            .max(1e-3);
        let mut chart = ChartBuilder::on(panel)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..p99.min(max_x) * 1.05, 0.0..1.0)?;
        chart
            .configure_mesh()
            .x_desc(name)
            .y_desc("fraction of requests")
            .draw()?;
        for (i, (s, v)) in series.iter().zip(&sorted).enumerate() {
            if v.is_empty() {
                continue;
            }
            let c = COLORS[i % COLORS.len()];
            let n = v.len() as f64;
            let pts: Vec<(f64, f64)> = v
                .iter()
                .enumerate()
                .map(|(j, x)| (*x, (j + 1) as f64 / n))
                .collect();
            chart
                .draw_series(LineSeries::new(pts, ShapeStyle::from(&c).stroke_width(2)))?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], ShapeStyle::from(&c).stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present().context("writing the PNG")?;
    Ok(())
}
