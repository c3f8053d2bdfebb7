//! Products of a large matrix with a thin one, the passes of a randomized SVD: C = A X and
//! C = Aᵀ X for a row-major f32 A (m, n) and an X of 16, 32, 48 or 64 columns.
//!
//! BLAS packs (copies) A on every such product before multiplying, and with a thin X the copy
//! costs as much as the arithmetic. These AVX-512 kernels read A where it lies instead, a few
//! rows at a time, with X's rows (or C's) held in registers; rayon splits the rows of C. Each
//! element of C is summed in the same order whatever the threads, so results are reproducible.
//! Where the CPU lacks AVX-512 or the operands do not fit, the functions return `None` and the
//! caller uses BLAS.

use ndarray::{Array2, ArrayRef2};

/// C = A X, or `None` when the kernel does not apply.
pub(crate) fn mul(a: &ArrayRef2<f32>, x: &ArrayRef2<f32>) -> Option<Array2<f32>> {
    if a.ncols() != x.nrows() {
        return None;
    }
    kernel::run(a, x, false)
}

/// C = Aᵀ X, or `None` when the kernel does not apply.
pub(crate) fn mul_t(a: &ArrayRef2<f32>, x: &ArrayRef2<f32>) -> Option<Array2<f32>> {
    if a.nrows() != x.nrows() {
        return None;
    }
    kernel::run(a, x, true)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod kernel {
    use std::arch::x86_64::{
        __m512, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
    };

    use ndarray::{Array2, ArrayRef2};
    use rayon::prelude::*;

    /// Lanes of a 512-bit register of f32.
    const LANES: usize = 16;
    /// Rows of C (of Aᵀ X) per task: their slice of C stays in L2 while A's rows stream by, in
    /// runs of 4 KiB (shorter runs leave the hardware prefetcher behind: 128 took 50% longer).
    const COLUMN_BLOCK: usize = 1024;
    /// Rows of C (of A X) per parallel task.
    const ROW_TASK: usize = 64;

    pub(super) fn run(a: &ArrayRef2<f32>, x: &ArrayRef2<f32>, transposed: bool) -> Option<Array2<f32>> {
        let (m, n) = a.dim();
        let l = x.ncols();
        if l == 0 || l % LANES != 0 || l > 4 * LANES || m == 0 || n == 0 || !std::is_x86_feature_detected!("avx512f") {
            return None;
        }
        let (a, x) = (a.as_slice()?, x.as_slice()?);
        let rows = if transposed { n } else { m };
        let mut c = vec![0f32; rows * l];
        let task = if transposed { COLUMN_BLOCK } else { ROW_TASK };
        c.par_chunks_mut(task * l).enumerate().for_each(|(t, out)| {
            let first = t * task;
            // SAFETY: the CPU has AVX-512F (checked above); every other requirement is a slice
            // bound, checked by indexing inside.
            unsafe {
                match (l / LANES, transposed) {
                    (1, false) => a_x::<1, 8>(a, x, n, first, out),
                    (2, false) => a_x::<2, 8>(a, x, n, first, out),
                    (3, false) => a_x::<3, 8>(a, x, n, first, out),
                    (_, false) => a_x::<4, 6>(a, x, n, first, out),
                    (1, true) => at_x::<1, 8>(a, x, n, m, first, out),
                    (2, true) => at_x::<2, 8>(a, x, n, m, first, out),
                    (3, true) => at_x::<3, 8>(a, x, n, m, first, out),
                    _ => at_x::<4, 6>(a, x, n, m, first, out),
                }
            }
        });
        Array2::from_shape_vec((rows, l), c).ok()
    }

    /// Rows `first..` of C = A X into `out` (whole rows of C). W registers per row of X, R rows
    /// of A at a time: R W accumulators + W for a row of X + 1 broadcast fit the 32 registers.
    #[target_feature(enable = "avx512f")]
    fn a_x<const W: usize, const R: usize>(a: &[f32], x: &[f32], n: usize, first: usize, out: &mut [f32]) {
        let l = W * LANES;
        let rows = out.len() / l;
        let mut done = 0;
        while done + R <= rows {
            a_x_block::<W, R>(a, x, n, first + done, &mut out[done * l..(done + R) * l]);
            done += R;
        }
        while done < rows {
            a_x_block::<W, 1>(a, x, n, first + done, &mut out[done * l..(done + 1) * l]);
            done += 1;
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn a_x_block<const W: usize, const R: usize>(a: &[f32], x: &[f32], n: usize, row: usize, out: &mut [f32]) {
        let l = W * LANES;
        let a = &a[row * n..(row + R) * n];
        let x = &x[..n * l];
        let mut acc = [[_mm512_setzero_ps(); W]; R];
        for j in 0..n {
            let xj = &x[j * l..(j + 1) * l];
            let mut xr = [_mm512_setzero_ps(); W];
            for (w, v) in xr.iter_mut().enumerate() {
                // SAFETY: xj holds l = W * 16 values, so lanes w*16..w*16+16 are inside it.
                *v = unsafe { _mm512_loadu_ps(xj[w * LANES..].as_ptr()) };
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let s = _mm512_set1_ps(a[r * n + j]);
                for (acc_rw, &xw) in acc_r.iter_mut().zip(&xr) {
                    *acc_rw = _mm512_fmadd_ps(s, xw, *acc_rw);
                }
            }
        }
        store_rows::<W, R>(&acc, out);
    }

    /// Rows `first..` of C = Aᵀ X (n, l) into `out`: for each block of R rows of A, the R rows of
    /// X sit in registers and the block's rows of C are updated in turn (they stay in L1).
    #[target_feature(enable = "avx512f")]
    fn at_x<const W: usize, const R: usize>(a: &[f32], x: &[f32], n: usize, m: usize, first: usize, out: &mut [f32]) {
        let l = W * LANES;
        let cols = out.len() / l;
        let mut i = 0;
        while i + R <= m {
            at_x_block::<W, R>(a, x, n, i, first, &mut out[..cols * l]);
            i += R;
        }
        while i < m {
            at_x_block::<W, 1>(a, x, n, i, first, &mut out[..cols * l]);
            i += 1;
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn at_x_block<const W: usize, const R: usize>(
        a: &[f32],
        x: &[f32],
        n: usize,
        row: usize,
        first: usize,
        out: &mut [f32],
    ) {
        let l = W * LANES;
        let cols = out.len() / l;
        let xs = &x[row * l..(row + R) * l];
        let mut xr = [[_mm512_setzero_ps(); W]; R];
        for (r, xr_r) in xr.iter_mut().enumerate() {
            for (w, v) in xr_r.iter_mut().enumerate() {
                // SAFETY: xs holds R rows of l = W * 16 values; r < R and w < W.
                *v = unsafe { _mm512_loadu_ps(xs[r * l + w * LANES..].as_ptr()) };
            }
        }
        let a = &a[row * n..(row + R) * n];
        for (jj, c) in out.chunks_exact_mut(l).enumerate().take(cols) {
            let j = first + jj;
            let mut cr = [_mm512_setzero_ps(); W];
            for (w, v) in cr.iter_mut().enumerate() {
                // SAFETY: c holds l = W * 16 values.
                *v = unsafe { _mm512_loadu_ps(c[w * LANES..].as_ptr()) };
            }
            for (r, xr_r) in xr.iter().enumerate() {
                let s = _mm512_set1_ps(a[r * n + j]);
                for (crw, &xw) in cr.iter_mut().zip(xr_r) {
                    *crw = _mm512_fmadd_ps(s, xw, *crw);
                }
            }
            for (w, v) in cr.iter().enumerate() {
                // SAFETY: as for the loads above.
                unsafe { _mm512_storeu_ps(c[w * LANES..].as_mut_ptr(), *v) };
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn store_rows<const W: usize, const R: usize>(acc: &[[__m512; W]; R], out: &mut [f32]) {
        let l = W * LANES;
        for (r, acc_r) in acc.iter().enumerate() {
            let row = &mut out[r * l..(r + 1) * l];
            for (w, v) in acc_r.iter().enumerate() {
                // SAFETY: row holds l = W * 16 values.
                unsafe { _mm512_storeu_ps(row[w * LANES..].as_mut_ptr(), *v) };
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use ndarray::{Array2, ArrayRef2};

    pub(super) fn run(_: &ArrayRef2<f32>, _: &ArrayRef2<f32>, _: bool) -> Option<Array2<f32>> {
        None
    }
}
