//! Plain SVG bar charts for the benchmark reports: one panel per measure, one
//! horizontal bar per scenario, values printed at the bar ends. Hand-written because a
//! plotting crate would be the biggest dependency of the workspace for a few rectangles.

use std::fmt::Write;

const WIDTH: f64 = 760.0;
const LABEL_W: f64 = 190.0;
const BAR_H: f64 = 22.0;
const GAP: f64 = 8.0;
const PANEL_HEAD: f64 = 34.0;
const TITLE_H: f64 = 34.0;
/// One colour per bar position, so a scenario keeps its colour across panels.
const COLOURS: [&str; 8] = [
    "#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#76b7b2", "#b07aa1", "#edc948", "#9c755f",
];

/// An SVG with one panel per `(measure, bars)`; `bars` are `(label, value)`.
pub fn bar_charts(title: &str, panels: &[(&str, &[(String, f64)])]) -> String {
    let panel_h = |n: usize| PANEL_HEAD + n as f64 * (BAR_H + GAP) + GAP;
    let height = TITLE_H + panels.iter().map(|(_, b)| panel_h(b.len())).sum::<f64>();
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="#ffffff"/><text x="10" y="22" font-size="15" font-weight="bold">{}</text>"##,
        escape(title)
    );
    let mut y = TITLE_H;
    for (measure, bars) in panels {
        let _ = writeln!(
            svg,
            r#"<text x="10" y="{:.1}" font-weight="bold">{}</text>"#,
            y + 20.0,
            escape(measure)
        );
        let max = bars.iter().map(|b| b.1).fold(0.0_f64, f64::max);
        let span = WIDTH - LABEL_W - 90.0;
        for (i, (label, value)) in bars.iter().enumerate() {
            let by = y + PANEL_HEAD + i as f64 * (BAR_H + GAP);
            let w = if max > 0.0 { span * value / max } else { 0.0 };
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><rect x="{LABEL_W}" y="{by:.1}" width="{w:.1}" height="{BAR_H}" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                LABEL_W - 8.0,
                by + 16.0,
                escape(label),
                COLOURS[i % COLOURS.len()],
                LABEL_W + w + 6.0,
                by + 16.0,
                format_value(*value)
            );
        }
        y += panel_h(bars.len());
    }
    svg.push_str("</svg>\n");
    svg
}

fn format_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_largest_value_and_labels_are_escaped() {
        let bars = vec![("direct".to_string(), 100.0), ("a<b".to_string(), 25.0)];
        let svg = bar_charts("t & u", &[("WAN (MB)", bars.as_slice())]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        let span = WIDTH - LABEL_W - 90.0;
        assert!(svg.contains(&format!(r#"width="{span:.1}""#)), "{svg}");
        assert!(svg.contains(&format!(r#"width="{:.1}""#, span / 4.0)));
        assert!(svg.contains("a&lt;b") && svg.contains("t &amp; u"));
        assert!(svg.contains(">100<") && svg.contains(">25.0<"));
    }
}
