//! The chart: outcomes per minute as stacked areas, with the request limit as a line.

use plotters::prelude::*;

use crate::replay::Minute;

/// One stacked band: its legend, colour and the count it shows.
type Layer = (&'static str, RGBColor, fn(&Minute) -> u64);

/// Draws `minutes` into an SVG file at `path`.
pub fn draw(runs: &[(&str, &[Minute])], title: &str, path: &str) -> Result<(), Box<dyn std::error::Error>> {
    let minutes = runs.first().map_or(&[][..], |r| r.1);
    let root = SVGBackend::new(path, (1000, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let last = minutes.last().map_or(1, |m| m.minute + 1);
    let limit = |m: &Minute| m.limits[0].min(1 << 40);
    let top = minutes.iter().map(|m| m.demanded.max(limit(m))).max().unwrap_or(1).max(1) as f64 * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0u64..last, 0f64..top)?;
    chart
        .configure_mesh()
        .x_desc("minute")
        .y_desc("requests per minute")
        .light_line_style(WHITE.mix(0.0))
        .draw()?;

    // Stacked from the bottom: what ran normally, over-limit, then what was refused.
    let layers: [Layer; 4] = [
        ("admitted (in limit)", RGBColor(44, 160, 44), |m| m.fates[0]),
        ("over limit (lower priority)", RGBColor(255, 187, 40), |m| m.fates[1]),
        ("rate limited (429)", RGBColor(214, 39, 40), |m| m.fates[2]),
        ("shed (503)", RGBColor(148, 103, 189), |m| m.fates[3]),
    ];
    for depth in (0..layers.len()).rev() {
        let (name, color, _) = layers[depth];
        let height = |m: &Minute| layers[..=depth].iter().map(|(_, _, f)| f(m)).sum::<u64>() as f64;
        chart
            .draw_series(
                AreaSeries::new(minutes.iter().map(|m| (m.minute, height(m))), 0.0, color.mix(0.85))
                    .border_style(color),
            )?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .draw_series(LineSeries::new(
            minutes.iter().map(|m| (m.minute, limit(m) as f64)),
            BLACK.stroke_width(2),
        ))?
        .label("request limit (RPM)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
