//! Medians and spreads: every reported figure is the median of repeated
//! measurements, shown with the smallest and largest of them.

use std::fmt;
use std::time::Duration;

/// The median of repeated measurements of one figure, with their range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: usize,
}

impl Summary {
    /// `None` for no values (nothing was measured).
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Self {
            median: percentile_of_sorted(&sorted, 50.0),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            samples: sorted.len(),
        })
    }

    /// The same figure in another unit.
    pub fn scaled(self, factor: f64) -> Self {
        Self {
            median: self.median * factor,
            min: self.min * factor,
            max: self.max * factor,
            samples: self.samples,
        }
    }

    /// `median (min–max)` with `decimals` decimals.
    pub fn show(&self, decimals: usize) -> String {
        if self.samples == 1 {
            return format!("{:.decimals$}", self.median);
        }
        format!(
            "{:.decimals$} ({:.decimals$}–{:.decimals$})",
            self.median, self.min, self.max
        )
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.show(0))
    }
}

/// The `p`-th percentile (0–100) of sorted values, nearest rank.
pub fn percentile_of_sorted(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of nothing");
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50 and p99 of durations, in microseconds.
pub fn p50_p99_us(durations: &[Duration]) -> (f64, f64) {
    let mut micros: Vec<f64> = durations.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    micros.sort_by(f64::total_cmp);
    (
        percentile_of_sorted(&micros, 50.0),
        percentile_of_sorted(&micros, 99.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range() {
        let summary = Summary::of(&[5.0, 1.0, 3.0, 9.0, 7.0]).expect("values");
        assert_eq!(summary.median, 5.0);
        assert_eq!((summary.min, summary.max, summary.samples), (1.0, 9.0, 5));
        assert_eq!(summary.show(0), "5 (1–9)");
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile_of_sorted(&values, 50.0), 50.0);
        assert_eq!(percentile_of_sorted(&values, 99.0), 99.0);
        assert_eq!(percentile_of_sorted(&values, 0.0), 1.0);
        assert_eq!(percentile_of_sorted(&[4.0], 99.0), 4.0);
    }
}
