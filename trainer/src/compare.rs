//! Series compared at equal total L0 (core latents counted), for the sweep's and the
//! evaluation's tables: SAEs of different series land at different L0 for the same k, so each
//! series is read at every SAE's L0 instead of being compared k for k.

/// `points` (total L0, value) read at `l0`: the value of a point at exactly `l0`, else linear in
/// log L0 between the two nearest points around it; None outside their range (never
/// extrapolated) or where a value is missing.
pub fn interpolate(points: &[(f64, f64)], l0: f64) -> Option<f64> {
    // The neighbours are chosen among all models, so a missing value is never bridged over.
    let mut p: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, _)| *x > 0.0 && x.is_finite())
        .collect();
    p.sort_by(|a, b| a.0.total_cmp(&b.0));
    let finite = |y: f64| Some(y).filter(|y| y.is_finite());
    if let Some(&(_, y)) = p.iter().find(|(x, _)| *x == l0) {
        return finite(y);
    }
    let w = p.windows(2).find(|w| w[0].0 < l0 && l0 < w[1].0)?;
    let (y0, y1) = (finite(w[0].1)?, finite(w[1].1)?);
    let t = (l0.ln() - w[0].0.ln()) / (w[1].0.ln() - w[0].0.ln());
    Some(y0 + t * (y1 - y0))
}

/// The distinct finite L0 values, ascending.
pub fn l0_grid(l0s: impl IntoIterator<Item = f64>) -> Vec<f64> {
    let mut l0s: Vec<f64> = l0s.into_iter().filter(|x| x.is_finite()).collect();
    l0s.sort_by(f64::total_cmp);
    l0s.dedup();
    l0s
}

/// How a column prints its values.
pub type Format = fn(f64) -> String;

/// One column of the table: a metric of one series.
pub struct Column {
    pub header: String,
    pub points: Vec<(f64, f64)>,
    pub fmt: Format,
}

/// The markdown table: a row per L0 of `l0_grid`, a cell per column (- where `interpolate`
/// gives none).
pub fn markdown(cols: &[Column]) -> String {
    let mut md = String::from(
        "\nAt equal total L0: each series read at every SAE's total L0, linearly in log L0 between \
         its own two nearest SAEs (- outside its range, never extrapolated).\n\n| L0 total |",
    );
    for c in cols {
        md += &format!(" {} |", c.header);
    }
    md += &format!("\n|---|{}\n", "---|".repeat(cols.len()));
    for l0 in l0_grid(cols.iter().flat_map(|c| c.points.iter().map(|p| p.0))) {
        md += &format!("| {l0:.2} |");
        for c in cols {
            md += &format!(
                " {} |",
                interpolate(&c.points, l0).map_or("-".into(), c.fmt)
            );
        }
        md.push('\n');
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_is_linear_in_log_l0_and_never_extrapolates() {
        let p = [(64.0, 0.10), (16.0, 0.20)];
        assert_eq!(interpolate(&p, 16.0), Some(0.20));
        assert_eq!(interpolate(&p, 64.0), Some(0.10));
        // 32 is halfway between 16 and 64 in log L0.
        assert!((interpolate(&p, 32.0).unwrap() - 0.15).abs() < 1e-12);
        assert_eq!(interpolate(&p, 15.9), None);
        assert_eq!(interpolate(&p, 64.1), None);
        assert_eq!(interpolate(&[(8.0, 0.3)], 8.0), Some(0.3));
        assert_eq!(interpolate(&[(8.0, f64::NAN), (4.0, 0.3)], 6.0), None);
        // A model with a missing value is not bridged over by its neighbours.
        let gap = [(16.0, 0.2), (32.0, f64::NAN), (64.0, 0.1)];
        assert_eq!(interpolate(&gap, 32.0), None);
        assert_eq!(interpolate(&gap, 24.0), None);
    }

    #[test]
    fn the_table_has_a_row_per_l0_and_a_dash_outside_a_series() {
        let fmt = |x: f64| format!("{x:.3}");
        let cols = [
            Column {
                header: "a".into(),
                points: vec![(10.0, 1.0), (40.0, 2.0)],
                fmt,
            },
            Column {
                header: "b".into(),
                points: vec![(20.0, 5.0)],
                fmt,
            },
        ];
        let md = markdown(&cols);
        let rows: Vec<&str> = md
            .lines()
            .filter(|l| l.starts_with("| ") && !l.contains("L0 total"))
            .collect();
        assert_eq!(
            rows,
            [
                "| 10.00 | 1.000 | - |",
                "| 20.00 | 1.500 | 5.000 |",
                "| 40.00 | 2.000 | - |"
            ]
        );
    }
}
