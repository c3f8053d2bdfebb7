//! The thin products of the LoRA factors' gradients over one block of rows, in AVX-512
//! registers (f32): gb = dy B together with dB += dyᵀ (x Aᵀ) in one pass over dy, and
//! dAᵀ += xᵀ gb in one pass over x.
//!
//! With r = 16 these products do 32 flops per element of the wide operand (dy or x), which the
//! training step reads from memory, and BLAS copies (packs) that operand before multiplying it.
//! These kernels read dy and x where they lie, a few rows at a time, with those rows' numbers
//! of x Aᵀ (or gb) in registers, and read dy once for both of its products. On the issue-6
//! bench config a scratch timer put these products at 100.6 ms of CPU per training step
//! through BLAS and 91 ms through a first version of the kernels; the final ones took the step
//! 1.7-2.1% less CPU in concurrent pairs (docs/benchmarks.md, "Session 8"). Every sum runs in a
//! fixed order (the rows of the block in order, in two interleaved partial sums), so the
//! results do not depend on the thread count.
//!
//! They apply to f32 with r (or the summed ranks) a multiple of 16, on a CPU with AVX-512;
//! elsewhere the functions return `false` and the caller uses BLAS.

/// f32 lanes of an AVX-512 register.
const LANES: usize = 16;

/// gb = dy B (written) and db += dyᵀ xa for `rows` rows: dy (rows, d_out) with rows `d_out`
/// apart, b (d_out, r), xa (rows, r), gb (rows, r) with rows `ld_gb` apart, db (d_out, r).
/// Returns `false` (and touches nothing) when the kernel does not apply.
pub(crate) fn dy_b_db(
    dy: &[f32],
    b: &[f32],
    xa: &[f32],
    r: usize,
    gb: &mut [f32],
    ld_gb: usize,
    db: &mut [f32],
) -> bool {
    counted(kernel::dy_b_db(dy, b, xa, r, gb, ld_gb, db))
}

/// dat += xᵀ gb for `rows` rows: x (rows, d_in), gb (rows, ranks) with rows `ld_gb` apart,
/// dat (d_in, ranks). Returns `false` (and touches nothing) when the kernel does not apply.
pub(crate) fn xt_gb(x: &[f32], d_in: usize, gb: &[f32], ranks: usize, ld_gb: usize, dat: &mut [f32]) -> bool {
    counted(kernel::xt_gb(x, d_in, gb, ranks, ld_gb, dat))
}

/// Calls of the kernels that applied, for tests to see them run.
#[cfg(test)]
pub(crate) static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// `applied`, counted in [`CALLS`] in tests.
#[inline(always)]
fn counted(applied: bool) -> bool {
    #[cfg(test)]
    CALLS.fetch_add(usize::from(applied), std::sync::atomic::Ordering::Relaxed);
    applied
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // AVX-512 intrinsics, after the CPU check
mod kernel {
    use std::arch::x86_64::{
        __m512, _mm512_add_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
    };

    use super::LANES;

    /// `f(first, true)` for each run of `r` rows of `rows`, then `f(first, false)` for each row
    /// left over.
    #[inline(always)]
    fn runs(rows: usize, r: usize, mut f: impl FnMut(usize, bool)) {
        let whole = rows / r * r;
        (0..whole).step_by(r).for_each(|i| f(i, true));
        (whole..rows).for_each(|i| f(i, false));
    }

    fn avx512() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    /// The 16 numbers at the start of `s` in a register (panics when `s` is shorter).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn load(s: &[f32]) -> __m512 {
        let s = &s[..LANES];
        // SAFETY: s holds 16 f32 (checked by the slice above); loadu has no alignment needs.
        unsafe { _mm512_loadu_ps(s.as_ptr()) }
    }

    /// `v` into the first 16 numbers of `s` (panics when `s` is shorter).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn store(s: &mut [f32], v: __m512) {
        let s = &mut s[..LANES];
        // SAFETY: as for `load`.
        unsafe { _mm512_storeu_ps(s.as_mut_ptr(), v) }
    }

    pub(super) fn dy_b_db(
        dy: &[f32],
        b: &[f32],
        xa: &[f32],
        r: usize,
        gb: &mut [f32],
        ld_gb: usize,
        db: &mut [f32],
    ) -> bool {
        if r == 0 || r % LANES != 0 || !avx512() {
            return false;
        }
        let (rows, d_out) = (xa.len() / r, db.len() / r);
        assert!(dy.len() >= rows * d_out && b.len() >= d_out * r && ld_gb >= r, "operand sizes");
        assert!(rows == 0 || gb.len() >= (rows - 1) * ld_gb + r, "gb's size");
        // SAFETY: the CPU has AVX-512F (checked above); everything else is checked by indexing.
        unsafe {
            match r / LANES {
                1 => dy_b_db_w::<1, 8>(dy, b, xa, rows, d_out, gb, ld_gb, db),
                2 => dy_b_db_w::<2, 4>(dy, b, xa, rows, d_out, gb, ld_gb, db),
                3 => dy_b_db_w::<3, 2>(dy, b, xa, rows, d_out, gb, ld_gb, db),
                4 => dy_b_db_w::<4, 2>(dy, b, xa, rows, d_out, gb, ld_gb, db),
                _ => return false,
            }
        }
        true
    }

    /// [`dy_b_db`] with r = W x 16, R rows at a time (R W accumulators of gb and R W registers of
    /// xa, plus B's row and two partial sums of dB's row: within the 32 registers).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    fn dy_b_db_w<const W: usize, const R: usize>(
        dy: &[f32],
        b: &[f32],
        xa: &[f32],
        rows: usize,
        d_out: usize,
        gb: &mut [f32],
        ld_gb: usize,
        db: &mut [f32],
    ) {
        runs(rows, R, |i, whole| match whole {
            true => dy_b_db_rows::<W, R>(dy, b, xa, i, d_out, gb, ld_gb, db),
            false => dy_b_db_rows::<W, 1>(dy, b, xa, i, d_out, gb, ld_gb, db),
        });
    }

    /// Rows `first..first + R` of [`dy_b_db_w`]: their rows of gb, and their terms of every row
    /// of dB.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn dy_b_db_rows<const W: usize, const R: usize>(
        dy: &[f32],
        b: &[f32],
        xa: &[f32],
        first: usize,
        d_out: usize,
        gb: &mut [f32],
        ld_gb: usize,
        db: &mut [f32],
    ) {
        let r = W * LANES;
        let mut acc = [[_mm512_setzero_ps(); W]; R];
        let mut xr = [[_mm512_setzero_ps(); W]; R];
        for k in 0..R {
            for w in 0..W {
                xr[k][w] = load(&xa[(first + k) * r + w * LANES..]);
            }
        }
        let dy = &dy[first * d_out..(first + R) * d_out];
        for j in 0..d_out {
            let (bj, dbj) = (&b[j * r..(j + 1) * r], &mut db[j * r..(j + 1) * r]);
            let mut even = [_mm512_setzero_ps(); W];
            let mut odd = [_mm512_setzero_ps(); W];
            for w in 0..W {
                even[w] = load(&dbj[w * LANES..]);
            }
            for k in 0..R {
                let s = _mm512_set1_ps(dy[k * d_out + j]);
                for w in 0..W {
                    acc[k][w] = _mm512_fmadd_ps(s, load(&bj[w * LANES..]), acc[k][w]);
                    if k % 2 == 0 {
                        even[w] = _mm512_fmadd_ps(s, xr[k][w], even[w]);
                    } else {
                        odd[w] = _mm512_fmadd_ps(s, xr[k][w], odd[w]);
                    }
                }
            }
            for w in 0..W {
                store(&mut dbj[w * LANES..], _mm512_add_ps(even[w], odd[w]));
            }
        }
        for k in 0..R {
            for w in 0..W {
                store(&mut gb[(first + k) * ld_gb + w * LANES..], acc[k][w]);
            }
        }
    }

    pub(super) fn xt_gb(x: &[f32], d_in: usize, gb: &[f32], ranks: usize, ld_gb: usize, dat: &mut [f32]) -> bool {
        if ranks == 0 || ranks % LANES != 0 || d_in == 0 || !avx512() {
            return false;
        }
        let rows = x.len() / d_in;
        assert!(dat.len() == d_in * ranks && ld_gb >= ranks, "operand sizes");
        assert!(rows == 0 || gb.len() >= (rows - 1) * ld_gb + ranks, "gb's size");
        // columns of gb (and dA) in strips of at most 4 registers
        let mut c = 0;
        while c < ranks {
            let w = ((ranks - c) / LANES).min(4);
            // SAFETY: the CPU has AVX-512F (checked above); everything else is checked by
            // indexing.
            unsafe {
                match w {
                    1 => xt_gb_w::<1, 8>(x, d_in, rows, gb, ld_gb, c, ranks, dat),
                    2 => xt_gb_w::<2, 8>(x, d_in, rows, gb, ld_gb, c, ranks, dat),
                    3 => xt_gb_w::<3, 6>(x, d_in, rows, gb, ld_gb, c, ranks, dat),
                    _ => xt_gb_w::<4, 4>(x, d_in, rows, gb, ld_gb, c, ranks, dat),
                }
            }
            c += w * LANES;
        }
        true
    }

    /// Columns `c..c + 16 W` of [`xt_gb`], R rows at a time.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    fn xt_gb_w<const W: usize, const R: usize>(
        x: &[f32],
        d_in: usize,
        rows: usize,
        gb: &[f32],
        ld_gb: usize,
        c: usize,
        ranks: usize,
        dat: &mut [f32],
    ) {
        runs(rows, R, |i, whole| match whole {
            true => xt_gb_rows::<W, R>(x, d_in, i, gb, ld_gb, c, ranks, dat),
            false => xt_gb_rows::<W, 1>(x, d_in, i, gb, ld_gb, c, ranks, dat),
        });
    }

    /// Rows `first..first + R` of x into every row of dAᵀ, columns `c..c + 16 W`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn xt_gb_rows<const W: usize, const R: usize>(
        x: &[f32],
        d_in: usize,
        first: usize,
        gb: &[f32],
        ld_gb: usize,
        c: usize,
        ranks: usize,
        dat: &mut [f32],
    ) {
        let mut gr = [[_mm512_setzero_ps(); W]; R];
        for i in 0..R {
            for w in 0..W {
                gr[i][w] = load(&gb[(first + i) * ld_gb + c + w * LANES..]);
            }
        }
        let x = &x[first * d_in..(first + R) * d_in];
        for k in 0..d_in {
            let row = &mut dat[k * ranks + c..k * ranks + c + W * LANES];
            let mut even = [_mm512_setzero_ps(); W];
            let mut odd = [_mm512_setzero_ps(); W];
            for w in 0..W {
                even[w] = load(&row[w * LANES..]);
            }
            for i in 0..R {
                let s = _mm512_set1_ps(x[i * d_in + k]);
                for w in 0..W {
                    if i % 2 == 0 {
                        even[w] = _mm512_fmadd_ps(s, gr[i][w], even[w]);
                    } else {
                        odd[w] = _mm512_fmadd_ps(s, gr[i][w], odd[w]);
                    }
                }
            }
            for w in 0..W {
                store(&mut row[w * LANES..], _mm512_add_ps(even[w], odd[w]));
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    pub(super) fn dy_b_db(_: &[f32], _: &[f32], _: &[f32], _: usize, _: &mut [f32], _: usize, _: &mut [f32]) -> bool {
        false
    }

    pub(super) fn xt_gb(_: &[f32], _: usize, _: &[f32], _: usize, _: usize, _: &mut [f32]) -> bool {
        false
    }
}

/// `s` as f32 numbers, when T is f32.
pub(crate) fn f32s<T: 'static>(s: &[T]) -> Option<&[f32]> {
    #[allow(unsafe_code)]
    // SAFETY: T is f32 (same type id), so the slice's memory holds s.len() f32.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len()) })
}

/// `s` as f32 numbers, when T is f32.
pub(crate) fn f32s_mut<T: 'static>(s: &mut [T]) -> Option<&mut [f32]> {
    #[allow(unsafe_code)]
    // SAFETY: as for `f32s`; the borrow of `s` moves into the result.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<f32>(), s.len()) })
}
