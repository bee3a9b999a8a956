//! Streaming statistics of a float array: enough for the trainer to normalise without a pass
//! over the data. Chunks are summarised exactly in f64 and merged with Chan et al.'s pairwise
//! update, in a fixed order, so every writer and `finalize` arrive at the same numbers.

use crate::dtype::DType;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    pub count: u64,
    pub sum_norm: f64,
    pub sum_sq_norm: f64,
    pub mean: Vec<f64>,
    /// Sum of squared deviations from `mean`, per column.
    pub m2: Vec<f64>,
}

/// The manifest's human-readable form of [`Stats`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsSummary {
    pub count: u64,
    pub mean_norm: f64,
    pub mean_sq_norm: f64,
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

impl Stats {
    pub fn empty(width: usize) -> Stats {
        Stats {
            count: 0,
            sum_norm: 0.0,
            sum_sq_norm: 0.0,
            mean: vec![0.0; width],
            m2: vec![0.0; width],
        }
    }

    /// Stats of `n` rows; rows holding a NaN or an infinity are left out. Two passes (norms and
    /// means, then squared deviations), each decoding the rows again rather than keeping them
    /// as f64 (19 MB a chunk at Gemma-2-2B's width, freshly faulted in each time): the same
    /// values in the same order, so the same sums.
    pub fn of_rows(dtype: DType, width: usize, data: &[u8], n: usize) -> Stats {
        let mut s = Stats::empty(width);
        let mut row = vec![0f64; width];
        let mut finite = Vec::with_capacity(n);
        for t in 0..n {
            dtype.row_f64(data, t * width, &mut row);
            let sq = row.iter().fold(0.0, |sq, x| sq + x * x);
            if !sq.is_finite() {
                continue;
            }
            s.count += 1;
            s.sum_norm += sq.sqrt();
            s.sum_sq_norm += sq;
            finite.push(t);
            // The mean's sums in the same pass: the same rows in the same order.
            for (m, x) in s.mean.iter_mut().zip(&row) {
                *m += x;
            }
        }
        if s.count == 0 {
            return s;
        }
        let inv = 1.0 / s.count as f64;
        s.mean.iter_mut().for_each(|m| *m *= inv);
        for &t in &finite {
            dtype.row_f64(data, t * width, &mut row);
            for ((m2, m), x) in s.m2.iter_mut().zip(&s.mean).zip(&row) {
                *m2 += (x - m) * (x - m);
            }
        }
        s
    }

    pub fn merge(&mut self, o: &Stats) {
        if o.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = o.clone();
            return;
        }
        let (na, nb) = (self.count as f64, o.count as f64);
        let n = na + nb;
        for d in 0..self.mean.len() {
            let delta = o.mean[d] - self.mean[d];
            self.mean[d] += delta * nb / n;
            self.m2[d] += o.m2[d] + delta * delta * na * nb / n;
        }
        self.count += o.count;
        self.sum_norm += o.sum_norm;
        self.sum_sq_norm += o.sum_sq_norm;
    }

    pub fn encoded_len(width: usize) -> usize {
        24 + 16 * width
    }

    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&self.sum_norm.to_le_bytes());
        out.extend_from_slice(&self.sum_sq_norm.to_le_bytes());
        for v in self.mean.iter().chain(&self.m2) {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// Parse from exactly `encoded_len(width)` bytes.
    pub fn read_from(b: &[u8], width: usize) -> Stats {
        let f = |i: usize| f64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap());
        Stats {
            count: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            sum_norm: f(1),
            sum_sq_norm: f(2),
            mean: (0..width).map(|d| f(3 + d)).collect(),
            m2: (0..width).map(|d| f(3 + width + d)).collect(),
        }
    }

    pub fn summary(&self) -> StatsSummary {
        let c = self.count.max(1) as f64;
        StatsSummary {
            count: self.count,
            mean_norm: self.sum_norm / c,
            mean_sq_norm: self.sum_sq_norm / c,
            mean: self.mean.clone(),
            var: self.m2.iter().map(|m| m / c).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_rows(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn merged_chunks_equal_one_pass() {
        let v: Vec<f32> = (0..60)
            .map(|i| ((i * 7919) % 101) as f32 * 0.37 - 11.0 + 1000.0 * (i % 3) as f32)
            .collect();
        let all = Stats::of_rows(DType::F32, 3, &f32_rows(&v), 20);
        let mut m = Stats::of_rows(DType::F32, 3, &f32_rows(&v[..21]), 7);
        m.merge(&Stats::of_rows(DType::F32, 3, &f32_rows(&v[21..]), 13));
        assert_eq!(all.count, 20);
        for d in 0..3 {
            assert!((all.mean[d] - m.mean[d]).abs() < 1e-9 * all.mean[d].abs().max(1.0));
            assert!((all.m2[d] - m.m2[d]).abs() < 1e-9 * all.m2[d]);
        }
        let col0: Vec<f64> = (0..20).map(|t| v[3 * t] as f64).collect();
        let mean = col0.iter().sum::<f64>() / 20.0;
        let var = col0.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 20.0;
        let s = m.summary();
        assert!((s.mean[0] - mean).abs() < 1e-9 && (s.var[0] - var).abs() < 1e-9 * var);
        let mut bytes = Vec::new();
        m.write_to(&mut bytes);
        assert_eq!(bytes.len(), Stats::encoded_len(3));
        assert_eq!(Stats::read_from(&bytes, 3), m);
    }

    #[test]
    fn non_finite_rows_are_left_out() {
        let s = Stats::of_rows(
            DType::F32,
            2,
            &f32_rows(&[1.0, 2.0, f32::NAN, 0.0, f32::INFINITY, 1.0, 3.0, 4.0]),
            4,
        );
        assert_eq!(s.count, 2);
        assert_eq!(s.mean, vec![2.0, 3.0]);
        assert!((s.sum_norm - (5f64.sqrt() + 5.0)).abs() < 1e-12);
    }
}
