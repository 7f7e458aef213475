//! The chart: a grid with a row per run and a column per metric that binds. Each panel stacks the
//! metric's demand per minute by fate, with the metric's limit as a line; one key under the title
//! names the fates' colours and the limits drawn.
//!
//! Only minutes that saw requests are stored, and a trace may span millions of idle minutes, so
//! everything here is linear in the stored minutes: an idle stretch is drawn as a drop to zero
//! on either side, never as one point per minute.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use sluicegate_core::Metric;

use crate::replay::{Fate, Minute};

/// A panel's size in pixels.
const PANEL: (u32, u32) = (560, 380);
/// The height of the overall title.
const TITLE_HEIGHT: u32 = 40;
/// The key's font size, the height of one line of it and its margin.
const KEY_FONT: u32 = 12;
const KEY_LINE: u32 = 20;
const KEY_MARGIN: u32 = 16;

/// Each fate's colour, in [`Fate::ALL`] order.
const COLOURS: [RGBColor; 6] = [
    RGBColor(44, 160, 44),
    RGBColor(255, 187, 40),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
];

/// Draws `runs` (a policy's name and its minutes) into an SVG file at `path`: a row per run, a
/// column per metric that binds, the same columns in every row.
pub fn draw(runs: &[(&str, &[Minute])], title: &str, path: &str) -> Result<(), Box<dyn std::error::Error>> {
    let metrics = panels(runs);
    let (cols, rows) = (metrics.len().max(1), runs.len().max(1));
    let width = PANEL.0.saturating_mul(u32::try_from(cols).unwrap_or(u32::MAX));
    let has_limit =
        |metric: &&Metric| runs.iter().any(|run| run.1.iter().any(|m| limit(m, **metric as usize).is_some()));
    let entries: Vec<Entry> = Fate::ALL
        .into_iter()
        .zip(COLOURS)
        .map(|(fate, colour)| (fate.label().to_string(), Some(colour)))
        .chain(metrics.iter().filter(has_limit).map(|&metric| (limit_label(metric), None)))
        .collect();
    let (placed, key_height) = lay_out(&entries, width)?;
    let height = PANEL
        .1
        .saturating_mul(u32::try_from(rows).unwrap_or(u32::MAX))
        .saturating_add(TITLE_HEIGHT)
        .saturating_add(key_height);
    let root = SVGBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (key, body) = root.titled(title, ("sans-serif", 22))?.split_vertically(key_height);
    let font = TextStyle::from(("sans-serif", KEY_FONT).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for ((text, colour), (x, y)) in entries.iter().zip(placed) {
        let middle = y.saturating_add(KEY_LINE as i32 / 2);
        match colour {
            Some(c) => key.draw(&Rectangle::new([(x, middle - 5), (x + 12, middle + 5)], c.filled()))?,
            None => {
                key.draw(&PathElement::new(vec![(x, middle), (x + 12, middle)], BLACK.stroke_width(2)))?
            }
        }
        key.draw(&Text::new(text.as_str(), (x + 18, middle), font.clone()))?;
    }
    if runs.is_empty() {
        body.draw(&Text::new("no runs to draw", (20, 20), ("sans-serif", 16)))?;
    }
    let cells = body.split_evenly((rows, cols));
    let grid = runs.iter().flat_map(|run| metrics.iter().map(move |&m| (run, m)));
    for (cell, (&(policy, minutes), metric)) in cells.iter().zip(grid) {
        panel(cell, policy, minutes, metric)?;
    }
    root.present()?;
    Ok(())
}

/// A line of the key: its text, and the colour of its swatch (none: the black limit line).
type Entry = (String, Option<RGBColor>);

/// Where each entry of the key goes (pixels from its top left), and the key's height.
type Layout = (Vec<(i32, i32)>, u32);

/// Where each of `entries` goes in a key `width` pixels wide, left to right and wrapping, and
/// the key's height.
fn lay_out(entries: &[Entry], width: u32) -> Result<Layout, Box<dyn std::error::Error>> {
    let font = ("sans-serif", KEY_FONT).into_font();
    let left = KEY_MARGIN as i32;
    let right = i32::try_from(width.saturating_sub(KEY_MARGIN)).unwrap_or(i32::MAX);
    let (mut x, mut y) = (left, 0i32);
    let mut placed = Vec::with_capacity(entries.len());
    for (text, _) in entries {
        let (w, _) = font.box_size(text)?;
        let wide = i32::try_from(w).unwrap_or(i32::MAX).saturating_add(18 + 24);
        if x > left && x.saturating_add(wide) > right {
            (x, y) = (left, y.saturating_add(KEY_LINE as i32));
        }
        placed.push((x, y));
        x = x.saturating_add(wide);
    }
    let lines = u32::try_from(y).unwrap_or(0) / KEY_LINE + 1;
    Ok((placed, lines.saturating_mul(KEY_LINE).saturating_add(KEY_MARGIN / 2)))
}

/// The metrics that get a panel: requests always, and a token metric whose limit is enforced in
/// some minute of some run and that bound some 429 in some run.
fn panels(runs: &[(&str, &[Minute])]) -> Vec<Metric> {
    let every = || runs.iter().flat_map(|run| run.1.iter());
    Metric::ALL
        .into_iter()
        .filter(|&metric| {
            let index = metric as usize;
            !metric.is_tokens()
                || (every().any(|m| limit(m, index).is_some())
                    && every().any(|m| m.bound.get(index).is_some_and(|&b| b > 0)))
        })
        .collect()
}

/// The limit of metric `index` in minute `m`, if enforced.
fn limit(m: &Minute, index: usize) -> Option<u64> {
    m.limits.get(index).copied().filter(|&l| l != u64::MAX)
}

/// The demand for metric `index` in minute `m` by the first `depth` fates stacked.
fn stacked(m: &Minute, index: usize, depth: usize) -> u64 {
    m.demand.get(index).map_or(0, |by_fate| by_fate.iter().take(depth).fold(0, |a, &b| a.saturating_add(b)))
}

/// The points of a stacked band: each stored minute's `value`, and where stored minutes are not
/// adjacent, zero right after the one and right before the next, so idle minutes stay empty.
fn band(minutes: &[Minute], value: impl Fn(&Minute) -> u64) -> Vec<(u64, f64)> {
    let mut points = Vec::with_capacity(minutes.len().saturating_mul(3));
    let mut previous: Option<u64> = None;
    for m in minutes {
        if let Some(p) = previous {
            let (after, before) = (p.saturating_add(1), m.minute.saturating_sub(1));
            if m.minute > after {
                points.push((after, 0.0));
                if before > after {
                    points.push((before, 0.0));
                }
            }
        }
        points.push((m.minute, value(m) as f64));
        previous = Some(m.minute);
    }
    points
}

/// The limit line of metric `index`, in one piece per stretch of adjacent minutes that enforce it.
fn limit_segments(minutes: &[Minute], index: usize) -> Vec<Vec<(u64, f64)>> {
    let mut segments = Vec::new();
    let mut current: Vec<(u64, f64)> = Vec::new();
    let mut previous: Option<u64> = None;
    for m in minutes {
        let adjacent = previous.is_some_and(|p| p.checked_add(1) == Some(m.minute));
        let enforced = limit(m, index);
        let continues = adjacent && enforced.is_some();
        if !continues && !current.is_empty() {
            segments.push(std::mem::take(&mut current));
        }
        if let Some(l) = enforced {
            current.push((m.minute, l as f64));
        }
        previous = Some(m.minute);
    }
    if !current.is_empty() {
        segments.push(current);
    }
    segments
}

/// The legend text of `metric`'s limit line.
fn limit_label(metric: Metric) -> String {
    match metric {
        Metric::Requests => "request limit (RPM)".to_string(),
        _ => format!("{} limit (per minute)", metric.name()),
    }
}

/// A count on the y axis, short: 950, 12.5k, 3M.
fn short(v: f64) -> String {
    let (scaled, suffix) = match v.abs() {
        a if a >= 1e9 => (v / 1e9, "G"),
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e3 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let text = format!("{scaled:.1}");
    format!("{}{suffix}", text.strip_suffix(".0").unwrap_or(&text))
}

/// One panel: `metric`'s demand in `minutes` stacked by fate and its limit, captioned with
/// `policy`.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    policy: &str,
    minutes: &[Minute],
    metric: Metric,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let index = metric as usize;
    let first = minutes.iter().map(|m| m.minute).min().unwrap_or(0);
    let last = minutes.iter().map(|m| m.minute).max().unwrap_or(0).max(first.saturating_add(1));
    let highest = minutes
        .iter()
        .map(|m| stacked(m, index, Fate::ALL.len()).max(limit(m, index).unwrap_or(0)))
        .max()
        .unwrap_or(0);
    let top = (highest as f64 * 1.1).max(1.0);
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{policy}: {}", metric.name()), ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(32)
        .y_label_area_size(56)
        .build_cartesian_2d(first..last, 0f64..top)?;
    chart
        .configure_mesh()
        .x_desc("minute")
        .y_desc(format!("{} per minute", metric.name()))
        .y_label_formatter(&|v| short(*v))
        .x_labels(6)
        .light_line_style(WHITE.mix(0.0))
        .draw()?;

    // Stacked from the bottom in `Fate::ALL` order: the tallest band first, each lower one over it.
    for (depth, colour) in COLOURS.into_iter().enumerate().rev() {
        let mut points = band(minutes, |m| stacked(m, index, depth + 1));
        // A lone minute is a point, drawn as nothing: it drops to zero at the axis' end instead.
        if points.last().is_some_and(|&(x, _)| x < last) {
            points.push((last, 0.0));
        }
        chart.draw_series(AreaSeries::new(points, 0.0, colour.mix(0.85)).border_style(colour))?;
    }
    for segment in limit_segments(minutes, index) {
        if let [(x, y)] = segment[..] {
            // A lone minute has no line to draw: a short tick at its level.
            let tick =
                EmptyElement::at((x, y)) + PathElement::new(vec![(-5, 0), (5, 0)], BLACK.stroke_width(2));
            chart.draw_series(std::iter::once(tick))?;
        } else {
            chart.draw_series(LineSeries::new(segment, BLACK.stroke_width(2)))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minute at `minute` whose `demand` (per metric) all met `fate`, with `limits`, and 429s
    /// bound by `bound`.
    fn minute(minute: u64, fate: Fate, demand: [u64; 4], limits: [u64; 4], bound: [u64; 5]) -> Minute {
        let mut m = Minute { minute, limits, bound, ..Minute::default() };
        for (by_fate, units) in m.demand.iter_mut().zip(demand) {
            if let Some(d) = by_fate.get_mut(fate as usize) {
                *d = units;
            }
        }
        m
    }

    /// Draws `runs` into a fresh file and returns the SVG.
    fn svg(name: &str, runs: &[(&str, &[Minute])]) -> String {
        let path = std::env::temp_dir().join(format!("sluicegate-plot-{}-{name}.svg", std::process::id()));
        let path = path.to_str().expect("a UTF-8 temporary path").to_string();
        draw(runs, "trace.csv", &path).expect("drawn");
        let text = std::fs::read_to_string(&path).expect("written");
        std::fs::remove_file(&path).ok();
        assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"), "{text}");
        text
    }

    const NONE: u64 = u64::MAX;

    /// A run whose 429s are all bound by generated tokens, which are limited.
    fn generated_bound() -> Vec<Minute> {
        vec![
            minute(0, Fate::Admitted, [10, 5_000, 4_000, 900], [100, NONE, NONE, 1_000], [0; 5]),
            minute(1, Fate::RateLimited, [4, 2_000, 1_500, 400], [100, NONE, NONE, 1_000], [0, 0, 0, 4, 0]),
        ]
    }

    #[test]
    fn a_panel_for_requests_and_each_metric_that_binds() {
        let minutes = generated_bound();
        let drawn = svg("binds", &[("fixed", &minutes)]);
        assert!(drawn.contains("fixed: requests"), "{drawn}");
        assert!(drawn.contains("fixed: generated_tokens"), "{drawn}");
        assert!(drawn.contains("generated_tokens limit (per minute)"), "{drawn}");
        assert!(!drawn.contains("prompt_tokens"), "{drawn}");
    }

    #[test]
    fn a_limit_that_binds_nothing_or_is_not_enforced_gets_no_panel() {
        // Prompt tokens limited but never binding; uncached bound (somehow) but never limited.
        let minutes = [minute(0, Fate::RateLimited, [1, 10, 10, 10], [1, 5, NONE, NONE], [1, 0, 1, 0, 0])];
        let metrics = panels(&[("a", &minutes)]);
        assert_eq!(metrics, [Metric::Requests]);
        assert_eq!(panels(&[]), [Metric::Requests]);
    }

    #[test]
    fn every_run_gets_a_row_with_the_same_panels() {
        let binding = generated_bound();
        let loose = [minute(0, Fate::Admitted, [1, 1, 1, 1], [NONE; 4], [0; 5])];
        let runs: [(&str, &[Minute]); 2] = [("loose", &loose), ("fixed", &binding)];
        assert_eq!(panels(&runs), [Metric::Requests, Metric::GeneratedTokens]);
        let drawn = svg("two", &runs);
        for caption in
            ["loose: requests", "loose: generated_tokens", "fixed: requests", "fixed: generated_tokens"]
        {
            assert!(drawn.contains(caption), "{caption}: {drawn}");
        }
        assert!(drawn.contains("trace.csv"));
    }

    #[test]
    fn idle_minutes_cost_nothing_and_stay_empty() {
        let far = 28_333_333;
        let minutes = [
            minute(0, Fate::Admitted, [3, 30, 30, 30], [10, NONE, NONE, NONE], [0; 5]),
            minute(far, Fate::Admitted, [5, 50, 50, 50], [10, NONE, NONE, NONE], [0; 5]),
        ];
        let drawn = svg("sparse", &[("fixed", &minutes)]);
        assert!(drawn.contains("fixed: requests") && drawn.contains("request limit (RPM)"), "{drawn}");
        // The gap drops to zero on either side and is not walked minute by minute.
        let points = band(&minutes, |m| stacked(m, 0, 1));
        assert_eq!(points, [(0, 3.0), (1, 0.0), (far - 1, 0.0), (far, 5.0)]);
        // The limit is not drawn across it.
        assert_eq!(limit_segments(&minutes, 0), [vec![(0, 10.0)], vec![(far, 10.0)]]);
    }

    #[test]
    fn adjacent_minutes_join_and_a_one_minute_gap_gets_one_zero() {
        let minutes: Vec<Minute> = [0, 1, 3]
            .into_iter()
            .map(|t| minute(t, Fate::Admitted, [2, 0, 0, 0], [7, NONE, NONE, NONE], [0; 5]))
            .collect();
        assert_eq!(band(&minutes, |m| stacked(m, 0, 1)), [(0, 2.0), (1, 2.0), (2, 0.0), (3, 2.0)]);
        assert_eq!(limit_segments(&minutes, 0), [vec![(0, 7.0), (1, 7.0)], vec![(3, 7.0)]]);
    }

    #[test]
    fn the_legend_names_every_fate() {
        let minutes = generated_bound();
        let drawn = svg("legend", &[("fixed", &minutes)]);
        for fate in Fate::ALL {
            assert!(drawn.contains(fate.label()), "{}: {drawn}", fate.label());
        }
        assert!(drawn.contains("admitted (in limit)") && drawn.contains("rate limited (429)"));
    }

    #[test]
    fn a_limit_never_enforced_draws_no_line() {
        let minutes = [
            minute(0, Fate::Admitted, [3, 30, 30, 30], [NONE; 4], [0; 5]),
            minute(1, Fate::Admitted, [4, 30, 30, 30], [NONE; 4], [0; 5]),
        ];
        assert!(limit_segments(&minutes, 0).is_empty());
        let drawn = svg("unlimited", &[("none", &minutes)]);
        assert!(drawn.contains("none: requests"), "{drawn}");
        assert!(!drawn.contains("request limit"), "{drawn}");
    }

    #[test]
    fn nothing_to_draw_is_still_an_svg() {
        let drawn = svg("empty", &[]);
        assert!(drawn.contains("no runs to draw"), "{drawn}");
        let drawn = svg("no-minutes", &[("fixed", &[])]);
        assert!(drawn.contains("fixed: requests"), "{drawn}");
    }

    #[test]
    fn the_key_wraps_within_the_width() {
        let entries: Vec<Entry> = Fate::ALL.into_iter().map(|f| (f.label().to_string(), None)).collect();
        let (narrow, narrow_height) = lay_out(&entries, PANEL.0).expect("laid out");
        let (wide, wide_height) = lay_out(&entries, PANEL.0 * 4).expect("laid out");
        assert_eq!((narrow.len(), wide.len()), (6, 6));
        assert!(narrow_height > wide_height, "{narrow_height} {wide_height}");
        assert!(wide.iter().all(|&(_, y)| y == 0), "{wide:?}");
        assert!(narrow.iter().all(|&(x, _)| x < PANEL.0 as i32), "{narrow:?}");
    }

    #[test]
    fn counts_are_short_on_the_axis() {
        assert_eq!(short(0.0), "0");
        assert_eq!(short(2.5), "2.5");
        assert_eq!(short(950.0), "950");
        assert_eq!(short(12_500.0), "12.5k");
        assert_eq!(short(3_000_000.0), "3M");
        assert_eq!(short(4_200_000_000.0), "4.2G");
    }
}
