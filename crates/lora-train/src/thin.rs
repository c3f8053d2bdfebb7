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
//! Each kernel goes over dB's (or dAᵀ's) rows in tiles of 8 KiB, every row of the block for one
//! tile before the next, so that the tile and B's rows stay in the L1 cache; the sums run in
//! the same order as without tiles.
//!
//! They apply to f32 with r (or the summed ranks) a whole number of AVX-512 registers (at most
//! 4 for dB), on a CPU with AVX-512; elsewhere the functions return `false` and the caller uses
//! BLAS. The same code is also compiled for AVX2 with FMA (registers of 8 f32), for the tests
//! only: on an AMD Zen 3 host (AVX2, no AVX-512) that build took the training step 1% more CPU
//! than OpenBLAS's products (3.7% more before the tiles), so the step uses BLAS there, and the
//! tests run the kernels' code on such CPUs too.

/// The instruction sets the kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512F: 16 f32 lanes, 32 registers. The training step's kernels.
    Avx512,
    /// AVX2 with FMA: 8 f32 lanes, 16 registers. Compiled for the tests only, so that the
    /// kernels' code runs (and is checked) on CPUs without AVX-512 too.
    #[cfg(test)]
    Avx2,
}

impl Isa {
    /// Every instruction set, best first.
    #[cfg(test)]
    const ALL: [Isa; 2] = [Isa::Avx512, Isa::Avx2];

    /// Whether this CPU has the instruction set (the kernels check it themselves before they
    /// run; the tests ask it to know what to expect).
    #[cfg(test)]
    pub(crate) fn detected(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return match self {
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
        };
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The instruction sets this CPU has, best first.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.detected()).collect()
    }
}

/// gb = dy B (written) and db += dyᵀ xa for `rows` rows: dy (rows, d_out) with rows `d_out`
/// apart, b (d_out, r), xa (rows, r), gb (rows, r) with rows `ld_gb` apart, db (d_out, r).
/// Returns `false` (and touches nothing) when no kernel applies.
pub(crate) fn dy_b_db(
    dy: &[f32],
    b: &[f32],
    xa: &[f32],
    r: usize,
    gb: &mut [f32],
    ld_gb: usize,
    db: &mut [f32],
) -> bool {
    dy_b_db_on(Isa::Avx512, dy, b, xa, r, gb, ld_gb, db)
}

/// [`dy_b_db`] in the kernel of `isa` (`false` when the CPU lacks it or the rank does not fit).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dy_b_db_on(
    isa: Isa,
    dy: &[f32],
    b: &[f32],
    xa: &[f32],
    r: usize,
    gb: &mut [f32],
    ld_gb: usize,
    db: &mut [f32],
) -> bool {
    counted(match isa {
        Isa::Avx512 => kernel::avx512::dy_b_db(dy, b, xa, r, gb, ld_gb, db),
        #[cfg(test)]
        Isa::Avx2 => kernel::avx2::dy_b_db(dy, b, xa, r, gb, ld_gb, db),
    })
}

/// dat += xᵀ gb for `rows` rows: x (rows, d_in), gb (rows, ranks) with rows `ld_gb` apart,
/// dat (d_in, ranks). Returns `false` (and touches nothing) when no kernel applies.
pub(crate) fn xt_gb(x: &[f32], d_in: usize, gb: &[f32], ranks: usize, ld_gb: usize, dat: &mut [f32]) -> bool {
    xt_gb_on(Isa::Avx512, x, d_in, gb, ranks, ld_gb, dat)
}

/// [`xt_gb`] in the kernel of `isa` (`false` when the CPU lacks it or the ranks do not fit).
pub(crate) fn xt_gb_on(
    isa: Isa,
    x: &[f32],
    d_in: usize,
    gb: &[f32],
    ranks: usize,
    ld_gb: usize,
    dat: &mut [f32],
) -> bool {
    counted(match isa {
        Isa::Avx512 => kernel::avx512::xt_gb(x, d_in, gb, ranks, ld_gb, dat),
        #[cfg(test)]
        Isa::Avx2 => kernel::avx2::xt_gb(x, d_in, gb, ranks, ld_gb, dat),
    })
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

/// The kernels of one instruction set: the same code over its register type and intrinsics,
/// with the rows taken at a time (R) for each register count of the rank (W) chosen so that
/// the accumulators stay within its registers.
#[cfg(target_arch = "x86_64")]
macro_rules! kernels {
    (
        $(#[$doc:meta])*
        mod $isa:ident: features $feature:literal, detected by $detect:expr,
        $reg:ident of $lanes:literal lanes: $zero:ident, $loadu:ident, $storeu:ident, $set1:ident, $fmadd:ident, $add:ident;
        dy_b_db rows $($dw:literal => $dr:literal),*;
        xt_gb strips of at most $xmax:literal registers, rows $($xw:literal => $xr:literal),*;
    ) => {
        $(#[$doc])*
        pub(super) mod $isa {
            use std::arch::x86_64::{$reg, $add, $fmadd, $loadu, $set1, $zero, $storeu};

            use std::ops::Range;

            use super::{runs, tiles};

            /// f32 lanes of a register.
            const LANES: usize = $lanes;

            /// The numbers at the start of `s` in a register (panics when `s` is shorter).
            #[target_feature(enable = $feature)]
            #[inline]
            fn load(s: &[f32]) -> $reg {
                let s = &s[..LANES];
                // SAFETY: s holds LANES f32 (checked by the slice above); loadu has no alignment
                // needs.
                unsafe { $loadu(s.as_ptr()) }
            }

            /// `v` into the first numbers of `s` (panics when `s` is shorter).
            #[target_feature(enable = $feature)]
            #[inline]
            fn store(s: &mut [f32], v: $reg) {
                let s = &mut s[..LANES];
                // SAFETY: as for `load`.
                unsafe { $storeu(s.as_mut_ptr(), v) }
            }

            pub(crate) fn dy_b_db(
                dy: &[f32],
                b: &[f32],
                xa: &[f32],
                r: usize,
                gb: &mut [f32],
                ld_gb: usize,
                db: &mut [f32],
            ) -> bool {
                if r == 0 || r % LANES != 0 || !$detect {
                    return false;
                }
                let (rows, d_out) = (xa.len() / r, db.len() / r);
                assert!(dy.len() >= rows * d_out && b.len() >= d_out * r && ld_gb >= r, "operand sizes");
                assert!(rows == 0 || gb.len() >= (rows - 1) * ld_gb + r, "gb's size");
                // SAFETY: the CPU has the features (checked above); everything else is checked
                // by indexing.
                unsafe {
                    match r / LANES {
                        $($dw => dy_b_db_w::<$dw, $dr>(dy, b, xa, rows, d_out, gb, ld_gb, db),)*
                        _ => return false,
                    }
                }
                true
            }

            /// [`dy_b_db`] with r = W registers, R rows at a time (R W accumulators of gb and
            /// R W registers of xa, plus two partial sums of dB's row).
            #[target_feature(enable = $feature)]
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
                for js in tiles(d_out, W * LANES) {
                    runs(rows, R, |i, whole| match whole {
                        true => dy_b_db_rows::<W, R>(dy, b, xa, i, d_out, js.clone(), gb, ld_gb, db),
                        false => dy_b_db_rows::<W, 1>(dy, b, xa, i, d_out, js.clone(), gb, ld_gb, db),
                    });
                }
            }

            /// Rows `first..first + R` of [`dy_b_db_w`] over the rows `js` of B and dB: their
            /// rows of gb summed on from what the tiles before left in gb (from zero for the
            /// first), and their terms of those rows of dB.
            #[target_feature(enable = $feature)]
            #[inline]
            #[allow(clippy::too_many_arguments)]
            fn dy_b_db_rows<const W: usize, const R: usize>(
                dy: &[f32],
                b: &[f32],
                xa: &[f32],
                first: usize,
                d_out: usize,
                js: Range<usize>,
                gb: &mut [f32],
                ld_gb: usize,
                db: &mut [f32],
            ) {
                let r = W * LANES;
                let mut acc = [[$zero(); W]; R];
                let mut xr = [[$zero(); W]; R];
                for k in 0..R {
                    for w in 0..W {
                        xr[k][w] = load(&xa[(first + k) * r + w * LANES..]);
                        if js.start > 0 {
                            acc[k][w] = load(&gb[(first + k) * ld_gb + w * LANES..]);
                        }
                    }
                }
                let dy = &dy[first * d_out..(first + R) * d_out];
                for j in js {
                    let (bj, dbj) = (&b[j * r..(j + 1) * r], &mut db[j * r..(j + 1) * r]);
                    let mut even = [$zero(); W];
                    let mut odd = [$zero(); W];
                    for w in 0..W {
                        even[w] = load(&dbj[w * LANES..]);
                    }
                    for k in 0..R {
                        let s = $set1(dy[k * d_out + j]);
                        for w in 0..W {
                            acc[k][w] = $fmadd(s, load(&bj[w * LANES..]), acc[k][w]);
                            if k % 2 == 0 {
                                even[w] = $fmadd(s, xr[k][w], even[w]);
                            } else {
                                odd[w] = $fmadd(s, xr[k][w], odd[w]);
                            }
                        }
                    }
                    for w in 0..W {
                        store(&mut dbj[w * LANES..], $add(even[w], odd[w]));
                    }
                }
                for k in 0..R {
                    for w in 0..W {
                        store(&mut gb[(first + k) * ld_gb + w * LANES..], acc[k][w]);
                    }
                }
            }

            pub(crate) fn xt_gb(x: &[f32], d_in: usize, gb: &[f32], ranks: usize, ld_gb: usize, dat: &mut [f32]) -> bool {
                if ranks == 0 || ranks % LANES != 0 || d_in == 0 || !$detect {
                    return false;
                }
                let rows = x.len() / d_in;
                assert!(dat.len() == d_in * ranks && ld_gb >= ranks, "operand sizes");
                assert!(rows == 0 || gb.len() >= (rows - 1) * ld_gb + ranks, "gb's size");
                // columns of gb (and dA) in strips of a few registers
                let mut c = 0;
                while c < ranks {
                    let w = ((ranks - c) / LANES).min($xmax);
                    // SAFETY: the CPU has the features (checked above); everything else is
                    // checked by indexing.
                    unsafe {
                        match w {
                            $($xw => xt_gb_w::<$xw, $xr>(x, d_in, rows, gb, ld_gb, c, ranks, dat),)*
                            _ => unreachable!("strips of 1 to {} registers", $xmax),
                        }
                    }
                    c += w * LANES;
                }
                true
            }

            /// Columns `c..c + W LANES` of [`xt_gb`], R rows at a time.
            #[target_feature(enable = $feature)]
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
                for ks in tiles(d_in, W * LANES) {
                    runs(rows, R, |i, whole| match whole {
                        true => xt_gb_rows::<W, R>(x, d_in, ks.clone(), i, gb, ld_gb, c, ranks, dat),
                        false => xt_gb_rows::<W, 1>(x, d_in, ks.clone(), i, gb, ld_gb, c, ranks, dat),
                    });
                }
            }

            /// Rows `first..first + R` of x into the rows `ks` of dAᵀ, columns `c..c + W LANES`.
            #[target_feature(enable = $feature)]
            #[inline]
            #[allow(clippy::too_many_arguments)]
            fn xt_gb_rows<const W: usize, const R: usize>(
                x: &[f32],
                d_in: usize,
                ks: Range<usize>,
                first: usize,
                gb: &[f32],
                ld_gb: usize,
                c: usize,
                ranks: usize,
                dat: &mut [f32],
            ) {
                let mut gr = [[$zero(); W]; R];
                for i in 0..R {
                    for w in 0..W {
                        gr[i][w] = load(&gb[(first + i) * ld_gb + c + w * LANES..]);
                    }
                }
                let x = &x[first * d_in..(first + R) * d_in];
                for k in ks {
                    let row = &mut dat[k * ranks + c..k * ranks + c + W * LANES];
                    let mut even = [$zero(); W];
                    let mut odd = [$zero(); W];
                    for w in 0..W {
                        even[w] = load(&row[w * LANES..]);
                    }
                    for i in 0..R {
                        let s = $set1(x[i * d_in + k]);
                        for w in 0..W {
                            if i % 2 == 0 {
                                even[w] = $fmadd(s, gr[i][w], even[w]);
                            } else {
                                odd[w] = $fmadd(s, gr[i][w], odd[w]);
                            }
                        }
                    }
                    for w in 0..W {
                        store(&mut row[w * LANES..], $add(even[w], odd[w]));
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // SIMD intrinsics, after the CPU checks
mod kernel {
    /// `f(first, true)` for each run of `r` rows of `rows`, then `f(first, false)` for each row
    /// left over.
    #[inline(always)]
    fn runs(rows: usize, r: usize, mut f: impl FnMut(usize, bool)) {
        let whole = rows / r * r;
        (0..whole).step_by(r).for_each(|i| f(i, true));
        (whole..rows).for_each(|i| f(i, false));
    }

    /// Bytes of dB's (or dAᵀ's) rows that the kernels update while they go over every row of
    /// the block: a quarter of a 32 KiB L1 data cache, so that those rows and B's stay in it.
    const TILE_BYTES: usize = 8 << 10;

    /// The ranges of rows of a (`n`, `width`) f32 matrix that make tiles of [`TILE_BYTES`]
    /// (one empty range when `n` is 0, so that the kernels still write gb).
    fn tiles(n: usize, width: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        let step = (TILE_BYTES / (4 * width)).max(1);
        (0..n.max(1)).step_by(step).map(move |start| start.min(n)..(start + step).min(n))
    }

    kernels! {
        /// AVX-512F: 32 registers of 16 f32.
        mod avx512: features "avx512f", detected by std::arch::is_x86_feature_detected!("avx512f"),
        __m512 of 16 lanes: _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps;
        dy_b_db rows 1 => 8, 2 => 4, 3 => 2, 4 => 2;
        xt_gb strips of at most 4 registers, rows 1 => 8, 2 => 8, 3 => 6, 4 => 4;
    }

    #[cfg(test)]
    kernels! {
        /// AVX2 with FMA: 16 registers of 8 f32.
        mod avx2: features "avx2,fma",
        detected by std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
        __m256 of 8 lanes: _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps;
        dy_b_db rows 1 => 4, 2 => 2, 3 => 1, 4 => 1;
        xt_gb strips of at most 2 registers, rows 1 => 8, 2 => 4;
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    pub(super) mod avx512 {
        pub(crate) fn dy_b_db(
            _: &[f32],
            _: &[f32],
            _: &[f32],
            _: usize,
            _: &mut [f32],
            _: usize,
            _: &mut [f32],
        ) -> bool {
            false
        }

        pub(crate) fn xt_gb(_: &[f32], _: usize, _: &[f32], _: usize, _: usize, _: &mut [f32]) -> bool {
            false
        }
    }
    #[cfg(test)]
    pub(super) use avx512 as avx2;
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
