//! A small dependency-free SVG line-chart writer for run summaries (distillation cycles, sweeps,
//! evaluation). SVG text renders with whatever sans-serif font the viewer has, so no font files
//! are needed; the output is deterministic for a given input.

use std::fmt::Write as _;
use std::path::Path;

/// One line of a chart: points drawn in the given order, with a legend entry `name`.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 190.0; // room for the legend
const TOP: f64 = 40.0;
const BOTTOM: f64 = 58.0;
const MAX_MARKERS: usize = 200;
/// Colour-blind-safe palette (Okabe-Ito), cycled when there are more series.
const COLOURS: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
];

/// Writes a line chart with point markers, one colour per series, a legend and axis ticks to
/// `path` (atomically). Points with a non-finite coordinate (or x <= 0 on a log axis) are
/// skipped; a series with none left still gets a legend entry. An empty chart, one point or
/// equal values give a padded axis rather than a division by zero.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
) -> std::io::Result<()> {
    let svg = render(title, x_label, y_label, series, log_x);
    crate::export::write_atomic(path, svg.as_bytes())
}

fn usable(p: &(f64, f64), log_x: bool) -> bool {
    p.0.is_finite() && p.1.is_finite() && (!log_x || p.0 > 0.0)
}

/// The SVG text of [`line_chart`].
pub fn render(title: &str, x_label: &str, y_label: &str, series: &[Series], log_x: bool) -> String {
    let pts = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|p| usable(p, log_x))
    };
    let tx = |x: f64| if log_x { x.log10() } else { x };
    let (xs, ys): (Vec<f64>, Vec<f64>) = pts().map(|&(x, y)| (tx(x), y)).unzip();
    let (x_lo, x_hi) = padded_range(&xs);
    let (y_lo, y_hi) = padded_range(&ys);
    let x_ticks = if log_x {
        log_ticks(x_lo, x_hi)
    } else {
        nice_ticks(x_lo, x_hi)
    };
    let y_ticks = nice_ticks(y_lo, y_hi);
    // The axes span the ticks, so every point lies inside the frame.
    let x_lo = x_ticks.first().map_or(x_lo, |t| t.0.min(x_lo));
    let x_hi = x_ticks.last().map_or(x_hi, |t| t.0.max(x_hi));
    let y_lo = y_ticks.first().map_or(y_lo, |t| t.0.min(y_lo));
    let y_hi = y_ticks.last().map_or(y_hi, |t| t.0.max(y_hi));

    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let sx = |x: f64| LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w;
    let sy = |y: f64| TOP + plot_h - (y - y_lo) / (y_hi - y_lo) * plot_h;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        LEFT + plot_w / 2.0,
        esc(title)
    );
    // Grid and ticks.
    for &(v, ref label) in &x_ticks {
        let x = sx(v);
        let _ = writeln!(
            s,
            r##"<line class="grid" x1="{x:.1}" y1="{TOP:.1}" x2="{x:.1}" y2="{:.1}" stroke="#e5e5e5"/>"##,
            TOP + plot_h
        );
        let _ = writeln!(
            s,
            r#"<text class="xtick" x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + plot_h + 16.0,
            esc(label)
        );
    }
    for &(v, ref label) in &y_ticks {
        let y = sy(v);
        let _ = writeln!(
            s,
            r##"<line class="grid" x1="{LEFT:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/>"##,
            LEFT + plot_w
        );
        let _ = writeln!(
            s,
            r#"<text class="ytick" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            esc(label)
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT:.1}" y="{TOP:.1}" width="{plot_w:.1}" height="{plot_h:.1}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 14.0,
        esc(x_label)
    );
    let (cx, cy) = (18.0, TOP + plot_h / 2.0);
    let _ = writeln!(
        s,
        r#"<text x="{cx:.1}" y="{cy:.1}" text-anchor="middle" transform="rotate(-90 {cx:.1} {cy:.1})">{}</text>"#,
        esc(y_label)
    );
    // Series, then legend.
    for (i, ser) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let xy: Vec<(f64, f64)> = ser
            .points
            .iter()
            .filter(|p| usable(p, log_x))
            .map(|&(x, y)| (sx(tx(x)), sy(y)))
            .collect();
        let coords: Vec<String> = xy.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(
            s,
            r#"<polyline class="series" fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            coords.join(" ")
        );
        // Markers only where they can be told apart (an attribution curve has thousands).
        if xy.len() <= MAX_MARKERS {
            for (x, y) in &xy {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{colour}"/>"#
                );
            }
        }
        let ly = TOP + 10.0 + 20.0 * i as f64;
        let lx = LEFT + plot_w + 14.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"/><circle cx="{:.1}" cy="{ly:.1}" r="3.5" fill="{colour}"/>"#,
            lx + 22.0,
            lx + 11.0
        );
        let _ = writeln!(
            s,
            r#"<text class="legend" x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 28.0,
            ly + 4.0,
            esc(&ser.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Data range, widened when empty or flat so the scale never divides by zero.
fn padded_range(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo <= 1e-12 * lo.abs().max(hi.abs()).max(1e-300) {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - pad, hi + pad);
    }
    (lo, hi)
}

/// About 5 ticks at 1/2/5 x 10^n covering [lo, hi] (the first <= lo, the last >= hi).
fn nice_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let raw = (hi - lo) / 5.0;
    if !(raw.is_finite() && raw > 0.0) {
        return vec![(lo, fmt_num(lo, lo)), (hi, fmt_num(hi, hi))];
    }
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|st| *st >= raw)
        .unwrap_or(10.0 * mag);
    let start = (lo / step).floor();
    let end = (hi / step).ceil();
    let n = (end - start) as i64;
    (0..=n.clamp(0, 50))
        .map(|i| {
            let v = (start + i as f64) * step;
            // Snap float noise (0.30000000000000004) onto the step grid.
            let v = if v.abs() < step * 1e-9 { 0.0 } else { v };
            (v, fmt_num(v, step))
        })
        .collect()
}

/// Ticks on a log10 axis (positions are log10 values): every power of ten, or 1/2/5 within a
/// decade when the range is narrow.
fn log_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let (a, b) = (lo.floor() as i64, hi.ceil() as i64);
    let mut t = Vec::new();
    let mults: &[f64] = if b - a <= 2 { &[1.0, 2.0, 5.0] } else { &[1.0] };
    for e in a..=b {
        for m in mults {
            let v = m * 10f64.powi(e as i32);
            t.push((v.log10(), fmt_num(v, v)));
        }
    }
    t.sort_by(|x, y| x.0.total_cmp(&y.0));
    t.dedup_by(|x, y| x.0 == y.0);
    // The smallest run of ticks that covers the data.
    let first = t.iter().rposition(|x| x.0 <= lo + 1e-9).unwrap_or(0);
    let last = t
        .iter()
        .position(|x| x.0 >= hi - 1e-9)
        .unwrap_or(t.len() - 1);
    t[first..=last].to_vec()
}

/// A tick label with as many decimals as the step needs; scientific for very large/small.
fn fmt_num(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs().max(step.abs());
    if !(1e-3..1e6).contains(&a) {
        let s = format!("{v:.1e}");
        return s.replace(".0e", "e");
    }
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10() - 1e-9).ceil() as usize
    };
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ser(name: &str, points: &[(f64, f64)]) -> Series {
        Series {
            name: name.into(),
            points: points.to_vec(),
        }
    }

    /// Every element opened is closed (or self-closed), in order: a cheap well-formedness check.
    fn balanced(svg: &str) -> bool {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = svg;
        while let Some(i) = rest.find('<') {
            let j = match rest[i..].find('>') {
                Some(j) => i + j,
                None => return false,
            };
            let tag = &rest[i + 1..j];
            if let Some(name) = tag.strip_prefix('/') {
                if stack.pop().as_deref() != Some(name.trim()) {
                    return false;
                }
            } else if !tag.ends_with('/') {
                stack.push(tag.split_whitespace().next().unwrap_or("").to_string());
            }
            rest = &rest[j + 1..];
        }
        stack.is_empty()
    }

    fn tick_values(svg: &str, class: &str) -> Vec<f64> {
        let key = format!(r#"<text class="{class}""#);
        svg.lines()
            .filter(|l| l.starts_with(&key))
            .map(|l| {
                let a = l.find('>').unwrap() + 1;
                let b = l.rfind("</text>").unwrap();
                l[a..b].parse::<f64>().unwrap()
            })
            .collect()
    }

    #[test]
    fn chart_is_well_formed_with_one_polyline_per_series() {
        let svg = render(
            "FVU <vs> L0 & more",
            "L0",
            "FVU",
            &[
                ser("a", &[(16.0, 0.4), (32.0, 0.3), (64.0, 0.2)]),
                ser("b", &[(16.0, 0.45), (32.0, f64::NAN), (64.0, 0.25)]),
                ser("c", &[]),
            ],
            false,
        );
        assert!(balanced(&svg), "{svg}");
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert_eq!(svg.matches(r#"class="legend""#).count(), 3);
        // NaN skipped: 3 + 2 markers in the plot, plus one per legend entry.
        assert_eq!(svg.matches("<circle").count(), 5 + 3);
        assert!(svg.contains("FVU &lt;vs&gt; L0 &amp; more"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        let xs = tick_values(&svg, "xtick");
        let ys = tick_values(&svg, "ytick");
        assert!(
            xs.first().unwrap() <= &16.0 && xs.last().unwrap() >= &64.0,
            "{xs:?}"
        );
        assert!(
            ys.first().unwrap() <= &0.2 && ys.last().unwrap() >= &0.45,
            "{ys:?}"
        );
        assert!(xs.len() >= 3 && xs.len() <= 12 && ys.len() >= 3 && ys.len() <= 12);
        // Distinct colours.
        assert!(svg.contains(COLOURS[0]) && svg.contains(COLOURS[1]) && svg.contains(COLOURS[2]));
    }

    #[test]
    fn degenerate_inputs_do_not_panic_and_stay_finite() {
        for series in [
            vec![],
            vec![ser("one", &[(3.0, 7.0)])],
            vec![ser("flat", &[(1.0, 5.0), (2.0, 5.0), (3.0, 5.0)])],
            vec![ser("zero", &[(0.0, 0.0), (0.0, 0.0)])],
            vec![ser("nan", &[(f64::NAN, 1.0), (1.0, f64::INFINITY)])],
        ] {
            for log_x in [false, true] {
                let svg = render("t", "x", "y", &series, log_x);
                assert!(balanced(&svg));
                assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
            }
        }
        let svg = render("t", "x", "y", &[ser("one", &[(3.0, 7.0)])], false);
        let ys = tick_values(&svg, "ytick");
        assert!(
            ys.first().unwrap() < &7.0 && ys.last().unwrap() > &7.0,
            "{ys:?}"
        );
    }

    #[test]
    fn log_axis_ticks_cover_the_data() {
        let svg = render(
            "t",
            "k",
            "y",
            &[ser("s", &[(16.0, 1.0), (320.0, 2.0)])],
            true,
        );
        let xs = tick_values(&svg, "xtick");
        assert!(
            xs.first().unwrap() <= &16.0 && xs.last().unwrap() >= &320.0,
            "{xs:?}"
        );
        assert!(xs.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(xs, [10.0, 20.0, 50.0, 100.0, 200.0, 500.0]);
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(fmt_num(0.30000000000000004, 0.1), "0.3");
        assert_eq!(fmt_num(2.0e-5, 1.0e-5), "2e-5");
        assert_eq!(fmt_num(1500.0, 500.0), "1500");
        assert_eq!(fmt_num(0.5, 0.5), "0.5");
        assert_eq!(fmt_num(0.15, 0.05), "0.15");
        let t = nice_ticks(0.0, 1.0);
        assert_eq!(
            t.iter().map(|x| x.1.as_str()).collect::<Vec<_>>(),
            ["0", "0.2", "0.4", "0.6", "0.8", "1"]
        );
    }

    #[test]
    fn writes_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.svg");
        line_chart(&p, "t", "x", "y", &[ser("s", &[(1.0, 2.0)])], false).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("<svg") && text.ends_with("</svg>\n"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
