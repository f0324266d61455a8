//! Grouped bar charts as plain SVG text: each bar a median, a whisker
//! from the smallest to the largest repetition. Small enough to write by
//! hand, so no plotting dependency.

use std::fmt::Write as _;

use super::stats::Summary;

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 180.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLOURS: [&str; 6] = [
    "#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377",
];

/// One series of a chart: a name and one value per category.
pub struct Series {
    pub name: String,
    pub values: Vec<Option<Summary>>,
}

/// A grouped bar chart.
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    pub categories: Vec<String>,
    pub series: Vec<Series>,
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" axis maximum and tick step above `max`.
fn axis(max: f64) -> (f64, f64) {
    if max <= 0.0 || !max.is_finite() {
        return (1.0, 0.25);
    }
    let magnitude = 10f64.powf(max.log10().floor());
    let step = [0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0]
        .iter()
        .map(|factor| factor * magnitude)
        .find(|step| max / step <= 6.0)
        .unwrap_or(magnitude * 10.0);
    ((max / step).ceil() * step, step)
}

fn number(value: f64) -> String {
    if value >= 100.0 || value == value.trunc() {
        format!("{value:.0}")
    } else if value >= 1.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

impl BarChart {
    pub fn render(&self) -> String {
        let plot_width = WIDTH - LEFT - RIGHT;
        let plot_height = HEIGHT - TOP - BOTTOM;
        let max = self
            .series
            .iter()
            .flat_map(|series| series.values.iter().flatten())
            .map(|summary| summary.max.max(summary.median))
            .fold(0.0, f64::max);
        let (top, step) = axis(max);
        let y = |value: f64| TOP + plot_height * (1.0 - value.max(0.0) / top);
        let groups = self.categories.len().max(1) as f64;
        let group_width = plot_width / groups;
        let bar_width = group_width * 0.8 / self.series.len().max(1) as f64;

        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            svg,
            r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/><text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
            LEFT + plot_width / 2.0,
            escape(&self.title)
        );
        let mut tick = 0.0;
        while tick <= top + step / 2.0 {
            let ty = y(tick);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#dddddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + plot_width,
                LEFT - 6.0,
                ty + 4.0,
                number(tick)
            );
            tick += step;
        }
        let _ = writeln!(
            svg,
            r#"<text transform="translate(16,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            TOP + plot_height / 2.0,
            escape(&self.y_label)
        );
        for (g, category) in self.categories.iter().enumerate() {
            let group_x = LEFT + group_width * g as f64;
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                group_x + group_width / 2.0,
                TOP + plot_height + 18.0,
                escape(category)
            );
            for (s, series) in self.series.iter().enumerate() {
                let Some(Some(summary)) = series.values.get(g) else {
                    continue;
                };
                let x = group_x + group_width * 0.1 + bar_width * s as f64;
                let colour = COLOURS[s % COLOURS.len()];
                let bar_top = y(summary.median);
                let _ = writeln!(
                    svg,
                    r#"<rect x="{x:.1}" y="{bar_top:.1}" width="{:.1}" height="{:.1}" fill="{colour}"><title>{}: {}</title></rect>"#,
                    bar_width * 0.9,
                    (TOP + plot_height - bar_top).max(0.0),
                    escape(&series.name),
                    summary.show(1)
                );
                if summary.samples > 1 {
                    let cx = x + bar_width * 0.45;
                    let _ = writeln!(
                        svg,
                        r#"<line x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="black"/>"#,
                        y(summary.min),
                        y(summary.max)
                    );
                }
            }
        }
        let _ = writeln!(
            svg,
            r#"<line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
            TOP + plot_height,
            LEFT + plot_width,
            TOP + plot_height
        );
        for (s, series) in self.series.iter().enumerate() {
            let ly = TOP + 10.0 + 20.0 * s as f64;
            let lx = WIDTH - RIGHT + 15.0;
            let _ = writeln!(
                svg,
                r#"<rect x="{lx}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{}" y="{:.1}">{}</text>"#,
                ly - 10.0,
                COLOURS[s % COLOURS.len()],
                lx + 18.0,
                ly,
                escape(&series.name)
            );
        }
        let _ = writeln!(
            svg,
            r##"<text x="{LEFT}" y="{:.1}" font-size="10" fill="#555555">bars: median; whiskers: smallest to largest repetition</text>"##,
            HEIGHT - 8.0
        );
        svg.push_str("</svg>\n");
        svg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_is_rounded_up() {
        assert_eq!(axis(67.0), (80.0, 20.0));
        assert_eq!(axis(0.0), (1.0, 0.25));
        let (top, step) = axis(23_456.0);
        assert!(top >= 23_456.0 && step > 0.0 && top / step <= 7.0);
    }

    #[test]
    fn renders_every_bar_and_escapes_text() {
        let one = Summary::of(&[1.0, 2.0, 3.0]);
        let chart = BarChart {
            title: "a < b".into(),
            y_label: "ns".into(),
            categories: vec!["1".into(), "10".into()],
            series: vec![
                Series {
                    name: "x".into(),
                    values: vec![one, one],
                },
                Series {
                    name: "y".into(),
                    values: vec![one, None],
                },
            ],
        };
        let svg = chart.render();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("a &lt; b"));
        assert_eq!(svg.matches("<title>").count(), 3);
    }
}
