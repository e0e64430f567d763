//! `chart.svg`, drawn by hand: end-to-end latency p50/p90/p99 per second on a log scale
//! above, sent/completed/errors per second below, phase starts as dashed lines.
use std::fmt::Write;

use crate::stats::TimelinePoint;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 600.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const PLOT_WIDTH: f64 = WIDTH - LEFT - RIGHT;
/// Top and bottom of the latency panel, then of the throughput panel.
const LATENCY_PANEL: (f64, f64) = (60.0, 320.0);
const THROUGHPUT_PANEL: (f64, f64) = (380.0, 550.0);

/// A line on the chart: name, colour, and its value in a timeline point.
type Series = (&'static str, &'static str, fn(&TimelinePoint) -> f64);

const SERIES_LATENCY: [Series; 3] =
    [("p50", "#1f77b4", |p| p.e2e_p50_ms), ("p90", "#ff7f0e", |p| p.e2e_p90_ms), ("p99", "#d62728", |p| p.e2e_p99_ms)];
const SERIES_THROUGHPUT: [Series; 3] = [
    ("sent/s", "#7f7f7f", |p| p.sent as f64),
    ("completed/s", "#2ca02c", |p| p.completed as f64),
    ("errors/s", "#d62728", |p| p.errors as f64),
];

/// The chart for `timeline`; `markers` are phase starts (seconds on the run clock, label).
pub fn render(timeline: &[TimelinePoint], markers: &[(f64, String)]) -> String {
    let seconds = timeline.len().max(1) as f64;
    let x = |t: f64| LEFT + t / seconds * PLOT_WIDTH;
    let mut svg = String::new();
    // `write!` to a String cannot fail.
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#);
    let _ =
        writeln!(svg, r#"<text x="{LEFT}" y="24" font-size="16">End-to-end latency per second (ms, log scale)</text>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="{}" font-size="16">Requests per second</text>"#,
        THROUGHPUT_PANEL.0 - 20.0
    );

    latency_panel(&mut svg, timeline, &x);
    throughput_panel(&mut svg, timeline, &x);
    time_axis(&mut svg, seconds, &x);
    for (at, label) in markers {
        let px = x(*at);
        let _ = writeln!(
            svg,
            r##"<line x1="{px:.1}" y1="{}" x2="{px:.1}" y2="{}" stroke="#999" stroke-dasharray="4 4"/>"##,
            LATENCY_PANEL.0, THROUGHPUT_PANEL.1
        );
        // Rotated to run down the line from the top of the plot, just right of it.
        let (lx, ly) = (px + 10.0, LATENCY_PANEL.0 + 4.0);
        let _ = writeln!(
            svg,
            r##"<text x="{lx:.1}" y="{ly}" font-size="10" fill="#555" text-anchor="end" transform="rotate(-90 {lx:.1} {ly})">{}</text>"##,
            escape(label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn latency_panel(svg: &mut String, timeline: &[TimelinePoint], x: &impl Fn(f64) -> f64) {
    let (top, bottom) = LATENCY_PANEL;
    let values = timeline.iter().filter(|p| p.completed > 0);
    let lowest = values.clone().map(|p| p.e2e_p50_ms).filter(|v| *v > 0.0).fold(f64::INFINITY, f64::min);
    let highest = values.map(|p| p.e2e_p99_ms).fold(0.0, f64::max);
    if !lowest.is_finite() || highest <= 0.0 {
        let _ = writeln!(svg, r#"<text x="{}" y="{}">no request completed</text>"#, LEFT + 10.0, (top + bottom) / 2.0);
        return;
    }
    let low_decade = lowest.log10().floor();
    let high_decade = highest.log10().ceil().max(low_decade + 1.0);
    let y = |ms: f64| {
        bottom - (ms.max(f64::MIN_POSITIVE).log10() - low_decade) / (high_decade - low_decade) * (bottom - top)
    };
    for decade in low_decade as i32..=high_decade as i32 {
        let ms = 10f64.powi(decade);
        grid_line(svg, y(ms), &duration_label(ms));
    }
    for (name, color, value) in SERIES_LATENCY {
        let points: Vec<Option<(f64, f64)>> = timeline
            .iter()
            .map(|p| (p.completed > 0 && value(p) > 0.0).then(|| (x(p.second as f64 + 0.5), y(value(p)))))
            .collect();
        series(svg, &points, color, name);
    }
    legend(svg, top, &SERIES_LATENCY.map(|(name, color, _)| (name, color)));
}

fn throughput_panel(svg: &mut String, timeline: &[TimelinePoint], x: &impl Fn(f64) -> f64) {
    let (top, bottom) = THROUGHPUT_PANEL;
    let highest = timeline.iter().map(|p| p.sent.max(p.completed).max(p.errors)).max().unwrap_or(0).max(1) as f64;
    let step = nice_step(highest / 4.0);
    let ceiling = (highest / step).ceil() * step;
    let y = |v: f64| bottom - v / ceiling * (bottom - top);
    // Ticks by index, so that float steps do not accumulate into labels like 0.30000000000000004.
    for i in 0..=(ceiling / step).round() as u32 {
        let tick = f64::from(i) * step;
        grid_line(svg, y(tick), &format!("{tick}"));
    }
    // No error line (nor its legend entry) when there were no errors.
    let any_errors = timeline.iter().any(|p| p.errors > 0);
    let shown: Vec<Series> =
        SERIES_THROUGHPUT.into_iter().filter(|(name, ..)| any_errors || *name != "errors/s").collect();
    for (name, color, value) in &shown {
        let points: Vec<Option<(f64, f64)>> =
            timeline.iter().map(|p| Some((x(p.second as f64 + 0.5), y(value(p))))).collect();
        series(svg, &points, color, name);
    }
    legend(svg, top, &shown.iter().map(|(name, color, _)| (*name, *color)).collect::<Vec<_>>());
}

fn time_axis(svg: &mut String, seconds: f64, x: &impl Fn(f64) -> f64) {
    let bottom = THROUGHPUT_PANEL.1;
    let step = [1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0]
        .into_iter()
        .find(|s| seconds / s <= 12.0)
        .unwrap_or(7200.0);
    for i in 0..=(seconds / step) as u32 {
        let t = f64::from(i) * step;
        let _ = writeln!(svg, r#"<text x="{:.1}" y="{}" text-anchor="middle">{t}</text>"#, x(t), bottom + 18.0);
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">seconds since start</text>"#,
        LEFT + PLOT_WIDTH / 2.0,
        bottom + 40.0
    );
}

fn grid_line(svg: &mut String, y: f64, label: &str) {
    let _ =
        writeln!(svg, r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#e5e5e5"/>"##, LEFT + PLOT_WIDTH);
    let _ = writeln!(svg, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, LEFT - 6.0, y + 4.0, escape(label));
}

/// A line through the points, broken where a point is missing; a lone point becomes a dot.
fn series(svg: &mut String, points: &[Option<(f64, f64)>], color: &str, name: &str) {
    for run in points.split(Option::is_none).filter(|r| !r.is_empty()) {
        let coords: Vec<(f64, f64)> = run.iter().flatten().copied().collect();
        if let [(cx, cy)] = coords[..] {
            let _ = writeln!(
                svg,
                r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="2" fill="{color}"><title>{name}</title></circle>"#
            );
        } else {
            let list: Vec<String> = coords.iter().map(|(px, py)| format!("{px:.1},{py:.1}")).collect();
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.5"><title>{name}</title></polyline>"#,
                list.join(" ")
            );
        }
    }
}

fn legend(svg: &mut String, top: f64, entries: &[(&str, &str)]) {
    let mut x = LEFT + PLOT_WIDTH - 110.0 * entries.len() as f64;
    for (name, color) in entries {
        let _ = writeln!(svg, r#"<rect x="{x:.1}" y="{:.1}" width="14" height="4" fill="{color}"/>"#, top - 12.0);
        let _ = writeln!(svg, r#"<text x="{:.1}" y="{:.1}">{name}</text>"#, x + 18.0, top - 7.0);
        x += 110.0;
    }
}

/// The smallest 1, 2 or 5 × 10^k at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let magnitude = 10f64.powf(raw.max(1e-9).log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * magnitude).find(|s| *s >= raw).unwrap_or(10.0 * magnitude)
}

fn duration_label(ms: f64) -> String {
    if ms >= 1000.0 { format!("{} s", ms / 1000.0) } else { format!("{ms} ms") }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::super::tests::report;
    use super::*;

    #[test]
    fn the_chart_has_both_panels_all_series_and_the_phase_markers() {
        let timeline = report(vec![], None, true).timeline;
        let svg = render(&timeline, &[(0.0, "step 1 @ 5/s".into()), (6.0, "a<b".into())]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for title in [
            "<title>p50</title>",
            "<title>p90</title>",
            "<title>p99</title>",
            "<title>sent/s</title>",
            "<title>completed/s</title>",
        ] {
            assert!(svg.contains(title), "{title} missing");
        }
        assert!(!svg.contains("<title>errors/s</title>"), "no errors, no error line");
        // p50 ~100 ms and p99 450 ms: decades from 100 ms to 1 s.
        assert!(svg.contains(">100 ms<") && svg.contains(">1 s<"), "{svg}");
        assert!(svg.contains("step 1 @ 5/s") && svg.contains("a&lt;b"));
        assert_eq!(svg.matches("stroke-dasharray").count(), 2);
        // Second 0 completed nothing: the latency lines start at second 1.
        let p50 = svg.lines().find(|l| l.contains("<title>p50</title>")).unwrap();
        let first_x: f64 = p50.split('"').nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
        assert!((first_x - (LEFT + 1.5 / 12.0 * PLOT_WIDTH)).abs() < 0.1, "{p50}");
    }

    #[test]
    fn an_empty_or_idle_timeline_still_renders() {
        let svg = render(&[], &[]);
        assert!(svg.contains("no request completed") && svg.ends_with("</svg>\n"));
    }

    #[test]
    fn gaps_break_lines_and_lone_points_become_dots() {
        let mut svg = String::new();
        series(&mut svg, &[Some((1.0, 1.0)), Some((2.0, 2.0)), None, Some((4.0, 4.0))], "red", "s");
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert_eq!(svg.matches("<circle").count(), 1);
    }

    #[test]
    fn steps_are_round() {
        assert_eq!(
            [nice_step(0.3), nice_step(1.0), nice_step(2.5), nice_step(7.0), nice_step(120.0)],
            [0.5, 1.0, 5.0, 10.0, 200.0]
        );
    }
}
