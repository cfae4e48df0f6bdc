//! Line charts as SVG (through plotters), for the HTML report.

use plotters::prelude::*;

use crate::{Error, Result};

/// A chart of one line.
pub struct Chart<'a> {
    /// Caption above the plot.
    pub title: &'a str,
    /// Label of the horizontal axis.
    pub x_label: &'a str,
    /// Label of the vertical axis.
    pub y_label: &'a str,
    /// Plot `log10(y)` (all values must be positive; others are skipped).
    pub log_y: bool,
}

fn plot_error(e: impl std::fmt::Display) -> Error {
    Error::Config(format!("drawing a chart failed: {e}"))
}

/// The range of `values` with a margin (a unit range around a single value).
fn padded(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
    (lo - pad, hi + pad)
}

impl Chart<'_> {
    /// Draws the line through `points` (non-finite ones, and non-positive ones on a log
    /// scale, are skipped) and returns the SVG document.
    pub fn svg(&self, points: &[(f64, f64)]) -> Result<String> {
        let pts: Vec<(f64, f64)> = points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!self.log_y || *y > 0.0))
            .map(|&(x, y)| (x, if self.log_y { y.log10() } else { y }))
            .collect();
        let (x0, x1) = padded(pts.iter().map(|p| p.0));
        let (y0, y1) = padded(pts.iter().map(|p| p.1));
        let y_label = if self.log_y {
            format!("log10 {}", self.y_label)
        } else {
            self.y_label.to_string()
        };
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, (560, 320)).into_drawing_area();
            root.fill(&WHITE).map_err(plot_error)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(self.title, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(36)
                .y_label_area_size(56)
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(plot_error)?;
            chart
                .configure_mesh()
                .x_desc(self.x_label)
                .y_desc(y_label)
                .draw()
                .map_err(plot_error)?;
            chart
                .draw_series(LineSeries::new(pts, Palette99::pick(0).stroke_width(2)))
                .map_err(plot_error)?;
            root.present().map_err(plot_error)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_documents_even_with_odd_data() {
        let c = Chart {
            title: "t",
            x_label: "x",
            y_label: "y",
            log_y: true,
        };
        let points = [(0.0, 1.0), (1.0, 10.0), (2.0, f64::NAN), (3.0, 0.0)];
        let svg = c.svg(&points).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        let empty = c.svg(&[]).unwrap();
        assert!(empty.contains("<svg"));
    }
}
