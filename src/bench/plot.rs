//! PNG plots of benchmark reports (plotters, bitmap backend). Text is drawn with
//! ab_glyph from a TrueType font found at run time: `$TRUSTFLOW_FONT`, else DejaVu Sans
//! where Debian, Fedora and Arch put it. Without a font a plot is an error the caller
//! reports (the JSON and Markdown reports do not depend on it).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

use trustflow_engine::error::{Error, Result};

const FONT_CANDIDATES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
];

/// Registers one font as plotters' `sans-serif`, once per process.
fn ensure_font() -> Result<()> {
    static FONT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    let found = FONT.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os("TRUSTFLOW_FONT")
            .map(PathBuf::from)
            .into_iter()
            .chain(FONT_CANDIDATES.iter().map(PathBuf::from))
            .collect();
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                // plotters keeps the font for the whole process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(path);
                }
            }
        }
        Err(
            "no TrueType font found for plot labels: set TRUSTFLOW_FONT to a .ttf file \
             (e.g. DejaVuSans.ttf)"
                .into(),
        )
    });
    found
        .as_ref()
        .map(|_| ())
        .map_err(|m| Error::Environment(m.clone()))
}

fn draw_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::output(path, format!("cannot draw the plot: {e}"))
}

/// One panel per group: histograms (density over 20 bins of [0, m], m the largest
/// weight rounded up to a tenth, since batch-softmax weights can all be small) of
/// `pseudo_weight` for right and for wrong pseudo-labels, overlaid.
pub fn weight_histograms(path: &Path, groups: &[(String, Vec<f64>, Vec<f64>)]) -> Result<()> {
    ensure_font()?;
    const BINS: usize = 20;
    let panels = groups.len().max(1);
    let root = BitMapBackend::new(path, (520 * panels as u32, 380)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let areas = root.split_evenly((1, panels));
    for (area, (name, right, wrong)) in areas.iter().zip(groups) {
        let largest = right
            .iter()
            .chain(wrong)
            .copied()
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max);
        let x_max = ((largest * 10.0).ceil() / 10.0).clamp(0.1, 1.0);
        let width = x_max / BINS as f64;
        let density = |values: &[f64]| -> Vec<f64> {
            let mut counts = [0f64; BINS];
            for v in values {
                let bin = ((v.clamp(0.0, x_max) / width) as usize).min(BINS - 1);
                counts[bin] += 1.0;
            }
            let total = values.len().max(1) as f64;
            counts.iter().map(|c| c / total / width).collect()
        };
        let (dr, dw) = (density(right), density(wrong));
        let top = dr.iter().chain(&dw).cloned().fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "{name}: pseudo_weight ({} right, {} wrong)",
                    right.len(),
                    wrong.len()
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(0f64..x_max, 0f64..top)
            .map_err(|e| draw_err(path, e))?;
        chart
            .configure_mesh()
            .x_desc("weight w")
            .y_desc("density")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| draw_err(path, e))?;
        for (values, colour, label) in [
            (&dr, GREEN.mix(0.55), "right pseudo-label"),
            (&dw, RED.mix(0.55), "wrong pseudo-label"),
        ] {
            chart
                .draw_series(values.iter().enumerate().map(|(i, &h)| {
                    let x0 = i as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width, h)], colour.filled())
                }))
                .map_err(|e| draw_err(path, e))?
                .label(label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled())
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| draw_err(path, e))?;
    }
    root.present().map_err(|e| draw_err(path, e))
}

/// A named series of (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

/// Panels stacked vertically, each a line chart of its series over a shared x axis
/// (e.g. seconds): `(title, y label, series)`.
pub fn line_panels(
    path: &Path,
    x_label: &str,
    panels: &[(String, String, Vec<Series>)],
) -> Result<()> {
    ensure_font()?;
    let n = panels.len().max(1);
    let root = BitMapBackend::new(path, (900, 300 * n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let areas = root.split_evenly((n, 1));
    for (area, (title, y_label, series)) in areas.iter().zip(panels) {
        let points = series.iter().flat_map(|(_, p)| p.iter());
        let (mut x_max, mut y_max) = (1e-9f64, 1e-9f64);
        for &(x, y) in points {
            x_max = x_max.max(x);
            y_max = y_max.max(y);
        }
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max * 1.02, 0f64..y_max * 1.1)
            .map_err(|e| draw_err(path, e))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label.as_str())
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| draw_err(path, e))?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), colour.stroke_width(2)))
                .map_err(|e| draw_err(path, e))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 14, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| draw_err(path, e))?;
    }
    root.present().map_err(|e| draw_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_png_files() {
        if ensure_font().is_err() {
            eprintln!("no font on this machine: plot test skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let hist = dir.path().join("w.png");
        weight_histograms(
            &hist,
            &[("target_a".into(), vec![0.9, 0.8, 0.7], vec![0.1, 0.3])],
        )
        .unwrap();
        let lines = dir.path().join("l.png");
        line_panels(
            &lines,
            "seconds",
            &[(
                "throughput".into(),
                "rows/s".into(),
                vec![("run".into(), vec![(0.0, 1.0), (1.0, 3.0)])],
            )],
        )
        .unwrap();
        for f in [hist, lines] {
            let bytes = std::fs::read(&f).unwrap();
            assert_eq!(&bytes[1..4], b"PNG", "{}", f.display());
            let img = image::load_from_memory(&bytes).unwrap();
            assert!(img.width() >= 500);
        }
    }
}
