//! Known-answer data for tests and demos: activations built from a known sparse dictionary.

use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `n` rows of `sum_{i in S} c_i a_i + noise`: `atoms` random unit atoms in R^d, |S| = `active`
/// atoms drawn uniformly per row, c_i ~ U(0.5, 1.5), noise N(0, noise^2) per dimension.
/// Returns (atoms [atoms, d], rows [n, d]), row-major.
pub fn sparse_dictionary(
    d: usize,
    atoms: usize,
    active: usize,
    n: usize,
    noise: f64,
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let gauss = move |rng: &mut ChaCha8Rng| {
        let (u, v): (f64, f64) = (rng.gen::<f64>().max(f64::MIN_POSITIVE), rng.gen());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    };
    let mut dict = vec![0f64; atoms * d];
    for a in dict.chunks_exact_mut(d) {
        a.iter_mut().for_each(|x| *x = gauss(&mut rng));
        let norm = a.iter().map(|x| x * x).sum::<f64>().sqrt();
        a.iter_mut().for_each(|x| *x /= norm);
    }
    let mut rows = vec![0f32; n * d];
    for row in rows.chunks_exact_mut(d) {
        let mut acc = vec![0f64; d];
        for i in sample(&mut rng, atoms, active) {
            let c = rng.gen_range(0.5..1.5);
            acc.iter_mut()
                .zip(&dict[i * d..(i + 1) * d])
                .for_each(|(x, a)| *x += c * a);
        }
        for (r, x) in row.iter_mut().zip(acc) {
            *r = (x + noise * gauss(&mut rng)) as f32;
        }
    }
    (dict.into_iter().map(|x| x as f32).collect(), rows)
}

/// Mean over true atoms of the largest cosine with any decoder row (rows of `w_dec`, [f, d]).
pub fn recovery(dict: &[f32], w_dec: &[f32], d: usize) -> f64 {
    let unit = |v: &[f32]| {
        let n = v
            .iter()
            .map(|x| (*x as f64).powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-30);
        v.iter().map(|x| *x as f64 / n).collect::<Vec<f64>>()
    };
    let rows: Vec<Vec<f64>> = w_dec.chunks_exact(d).map(unit).collect();
    let atoms: Vec<Vec<f64>> = dict.chunks_exact(d).map(unit).collect();
    let best = |a: &Vec<f64>| {
        rows.iter()
            .map(|r| r.iter().zip(a).map(|(x, y)| x * y).sum::<f64>())
            .fold(f64::NEG_INFINITY, f64::max)
    };
    atoms.iter().map(best).sum::<f64>() / atoms.len() as f64
}
