//! Benchmark matrices shared by the criterion bench and the `svd_report` example.
//!
//! `decaying(m, n, seed)`: dW = G1 diag(1/i) G2ᵀ over 1024 random (nearly orthonormal)
//! directions, plus i.i.d. Gaussian noise of standard deviation 3e-5 (a noise floor near
//! sigma = 4e-3 for 4096 x 4096): a 1/i spectrum plus noise, the shape of fine-tune deltas.

use ndarray::{Array1, Array2, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A (rows, cols) matrix of standard normal entries.
pub fn gaussian(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Array2::from_shape_simple_fn((rows, cols), || {
        let v: f64 = StandardNormal.sample(&mut rng);
        v as f32
    })
}

/// A 1/i spectrum over 1024 directions plus a noise floor.
pub fn decaying(m: usize, n: usize, seed: u64) -> Array2<f32> {
    let r = 1024.min(m).min(n);
    let sigma = Array1::from_shape_fn(r, |i| 1.0 / (i + 1) as f32);
    let u = gaussian(m, r, seed) / (m as f32).sqrt() * &sigma.insert_axis(Axis(0));
    let v = gaussian(n, r, seed + 1) / (n as f32).sqrt();
    let mut a = u.dot(&v.t());
    a.scaled_add(3e-5, &gaussian(m, n, seed + 2));
    a
}
