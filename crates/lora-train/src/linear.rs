//! A frozen linear layer with an optional trainable LoRA branch (and LoRA dropout), forward and
//! backward.

use lora_core::{LoraLayer, Scalar, Scaling};
use ndarray::linalg::general_mat_mul;
use std::ops::Range;

use ndarray::{s, Array1, Array2, ArrayView2, ArrayViewMut2, Axis, Zip};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::parallel::{chunk_rows, gemm, Par};
use crate::thin::{self, f32s, f32s_mut};

/// The trainable factors of one LoRA branch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LoraParams<T> {
    pub(crate) a: Array2<T>,
    pub(crate) b: Array2<T>,
    pub(crate) alpha: f64,
    pub(crate) scaling: Scaling,
    pub(crate) dropout: f64,
}

impl<T: Scalar> LoraParams<T> {
    pub(crate) fn from_layer(layer: &LoraLayer<T>, dropout: f64) -> Self {
        LoraParams {
            a: layer.a().clone(),
            b: layer.b().clone(),
            alpha: layer.alpha(),
            scaling: layer.scaling(),
            dropout,
        }
    }

    pub(crate) fn scale(&self) -> T {
        T::from_f64(self.scaling.scale(self.alpha, self.a.nrows()))
    }

    pub(crate) fn to_layer(&self) -> lora_core::Result<LoraLayer<T>> {
        LoraLayer::new(self.a.clone(), self.b.clone(), self.alpha, self.scaling)
    }
}

/// y = x Wᵀ + bias + s (dropout(x) Aᵀ) Bᵀ, W stored (d_out, d_in) and frozen.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Linear<T> {
    pub(crate) weight: Array2<T>,
    pub(crate) bias: Option<Array1<T>>,
    pub(crate) lora: Option<LoraParams<T>>,
}

/// What the backward pass of a [`Linear`] needs besides its input: the LoRA branch's
/// dropout mask (scaled by 1 / (1 - p)), x Aᵀ, and W + s B A when the branch has no mask.
#[derive(Debug)]
pub(crate) struct LinearCache<T> {
    mask: Option<Array2<T>>,
    xa: Option<Array2<T>>,
    merged: Option<Array2<T>>,
}

/// The gradient of the loss for the two factors of one LoRA module.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraGrad<T> {
    /// d loss / d A, shape (r, d_in).
    pub a: Array2<T>,
    /// d loss / d B, shape (d_out, r).
    pub b: Array2<T>,
}

impl<T: Scalar> Linear<T> {
    /// A frozen linear layer without a LoRA branch.
    pub(crate) fn new(weight: Array2<T>, bias: Option<Array1<T>>) -> Self {
        Linear { weight, bias, lora: None }
    }

    pub(crate) fn d_in(&self) -> usize {
        self.weight.ncols()
    }

    pub(crate) fn d_out(&self) -> usize {
        self.weight.nrows()
    }

    /// The forward pass, plus `residual` (a skip connection's input, added to the output in
    /// the same pass) when there is one. `dropout_seed` is given in training: the LoRA dropout
    /// mask is drawn from it (so a recomputation draws the same mask).
    ///
    /// Without a dropout mask the branch is merged for the pass: y = x (W + s B A)ᵀ, one
    /// product over the output instead of the base product plus a rank-r one (each a full pass
    /// over y, and the rank-r pass runs far from the CPU's peak); building W + s B A costs
    /// r / rows of the base product. The backward pass reuses the merged weight for the input
    /// gradient. B = 0 adds exactly nothing to W, so the base model's numbers are kept exactly.
    pub(crate) fn forward(
        &self,
        x: &Array2<T>,
        dropout_seed: Option<u64>,
        residual: Option<&Array2<T>>,
        par: &Par,
    ) -> (Array2<T>, LinearCache<T>) {
        let Some(lora) = &self.lora else {
            return self.forward_with(x, None, None, residual, par);
        };
        let mask = match dropout_seed {
            Some(seed) if lora.dropout > 0.0 => Some(dropout_mask(x.raw_dim(), lora.dropout, seed)),
            _ => None,
        };
        // beta = 1 on zeros: the same numbers as beta = 0 without BLAS clearing them again
        let mut xa = Array2::zeros((x.nrows(), lora.a.nrows()));
        match &mask {
            Some(m) => gemm(par, T::one(), &(x * m), &lora.a.t(), T::one(), &mut xa),
            None => gemm(par, T::one(), x, &lora.a.t(), T::one(), &mut xa),
        }
        self.forward_with(x, mask, Some(xa), residual, par)
    }

    /// Whether this pass draws no dropout mask for a LoRA branch (a branch is present).
    fn unmasked_branch(&self, dropout_seed: Option<u64>) -> bool {
        self.lora.as_ref().is_some_and(|lora| dropout_seed.is_none() || lora.dropout == 0.0)
    }

    /// The forward pass given the branch's dropout mask and x Aᵀ (`None` without a branch).
    fn forward_with(
        &self,
        x: &Array2<T>,
        mask: Option<Array2<T>>,
        xa: Option<Array2<T>>,
        residual: Option<&Array2<T>>,
        par: &Par,
    ) -> (Array2<T>, LinearCache<T>) {
        let merged = match &self.lora {
            Some(lora) if mask.is_none() => Some(self.merged_weight(lora, par)),
            _ => None,
        };
        let cache = LinearCache { mask, xa, merged };
        let weight = cache.merged.as_ref().unwrap_or(&self.weight);
        let (xa, lora) = (cache.xa.as_ref(), self.lora.as_ref().filter(|_| cache.mask.is_some()));
        let product = |first: usize, mut chunk: ArrayViewMut2<'_, T>| {
            let rows = first..first + chunk.nrows();
            if let Some(bias) = &self.bias {
                chunk += bias;
            }
            // a masked branch apart: s (dropout(x) Aᵀ) Bᵀ first, the base product added to it
            if let (Some(xa), Some(lora)) = (xa, lora) {
                general_mat_mul(lora.scale(), &xa.slice(s![rows.clone(), ..]), &lora.b.t(), T::one(), &mut chunk);
            }
            general_mat_mul(T::one(), &x.slice(s![rows, ..]), &weight.t(), T::one(), &mut chunk);
        };
        // the residual is the output's start: the same numbers as adding it after the product
        // when BLAS adds the product to it in one rounding (one pass over K), and no pass of
        // its own
        let (y, _) = match residual {
            Some(residual) => par.build_from(residual, product),
            None => par.build(x.nrows(), self.d_out(), product),
        };
        (y, cache)
    }

    /// W + s B A, by pieces of rows on the pool.
    fn merged_weight(&self, lora: &LoraParams<T>, par: &Par) -> Array2<T> {
        par.build_from(&self.weight, |first, mut chunk| {
            let rows = first..first + chunk.nrows();
            general_mat_mul(lora.scale(), &lora.b.slice(s![rows, ..]), &lora.a, T::one(), &mut chunk);
        })
        .0
    }

    /// The backward pass: adds dy W (+ the LoRA branch's input gradient) into `dx` (`None` when
    /// the input needs no gradient) and returns the LoRA gradients. Start `dx` from zeros rather
    /// than asking BLAS to overwrite it: beta = 0 makes OpenBLAS clear it once more.
    pub(crate) fn backward(
        &self,
        dy: &Array2<T>,
        x: &Array2<T>,
        cache: &LinearCache<T>,
        mut dx: Option<&mut Array2<T>>,
        par: &Par,
    ) -> Option<LoraGrad<T>> {
        let Some(lora) = self.lora.as_ref() else {
            if let Some(dx) = dx {
                gemm(par, T::one(), dy, &self.weight, T::one(), dx);
            }
            return None;
        };
        let s = lora.scale();
        let mut gb = Array2::zeros((dy.nrows(), lora.b.ncols())); // dy B, (n, r)
        gemm(par, T::one(), dy, &lora.b, T::one(), &mut gb);
        if let (Some(dx), Some(merged)) = (dx.as_deref_mut(), &cache.merged) {
            // dy (W + s B A): the base and the branch's input gradients in one product
            gemm(par, T::one(), dy, merged, T::one(), dx);
        } else if let Some(dx) = dx {
            par.row_chunks(dx, |first, mut chunk| {
                let rows = first..first + chunk.nrows();
                general_mat_mul(T::one(), &dy.slice(s![rows.clone(), ..]), &self.weight, T::one(), &mut chunk);
                let gb = gb.slice(s![rows.clone(), ..]);
                match &cache.mask {
                    None => general_mat_mul(s, &gb, &lora.a, T::one(), &mut chunk),
                    Some(mask) => {
                        let mut branch = gb.dot(&lora.a);
                        Zip::from(&mut branch).and(mask.slice(s![rows, ..])).for_each(|v, &m| *v = *v * m * s);
                        chunk += &branch;
                    }
                }
            });
        }
        let xa = cache.xa.as_ref().expect("the forward pass keeps x Aᵀ when there is a LoRA branch");
        // two thin products over all n rows (r x n times n x d): one per thread rather than one
        // after the other while the other core waits
        let (da, db) = par.join(
            || {
                let mut da = Array2::zeros(lora.a.raw_dim());
                match &cache.mask {
                    None => general_mat_mul(s, &gb.t(), x, T::zero(), &mut da),
                    Some(mask) => general_mat_mul(s, &gb.t(), &(x * mask), T::zero(), &mut da),
                }
                da
            },
            || {
                let mut db = Array2::zeros(lora.b.raw_dim());
                general_mat_mul(s, &dy.t(), xa, T::zero(), &mut db);
                db
            },
        );
        Some(LoraGrad { a: da, b: db })
    }

    /// W + s B A with the LoRA branch removed.
    pub(crate) fn merged(&self) -> Self {
        let mut weight = self.weight.clone();
        if let Some(lora) = &self.lora {
            general_mat_mul(lora.scale(), &lora.b, &lora.a, T::one(), &mut weight);
        }
        Linear::new(weight, self.bias.clone())
    }
}

/// The forward passes of linears that read the same input (q/k/v, or gate/up). When each has a
/// LoRA branch and none draws a dropout mask, their x Aᵀ come from one product with the factors
/// stacked (x read and packed once, not once per branch).
pub(crate) fn forward_shared<T: Scalar>(
    linears: &[&Linear<T>],
    x: &Array2<T>,
    dropout_seeds: &[Option<u64>],
    par: &Par,
) -> Vec<(Array2<T>, LinearCache<T>)> {
    if !linears.iter().zip(dropout_seeds).all(|(l, &seed)| l.unmasked_branch(seed)) {
        return linears.iter().zip(dropout_seeds).map(|(l, &seed)| l.forward(x, seed, None, par)).collect();
    }
    let factors: Vec<_> = linears.iter().map(|l| l.lora.as_ref().expect("checked above").a.view()).collect();
    let stacked = ndarray::concatenate(Axis(0), &factors).expect("factors of the same input width");
    let mut xa = Array2::zeros((x.nrows(), stacked.nrows()));
    gemm(par, T::one(), x, &stacked.t(), T::one(), &mut xa);
    let mut first = 0;
    linears
        .iter()
        .map(|l| {
            let r = l.lora.as_ref().expect("checked above").a.nrows();
            let own = xa.slice(s![.., first..first + r]).to_owned();
            first += r;
            l.forward_with(x, None, Some(own), None, par)
        })
        .collect()
}

/// Rows of dy per step of the thin products in [`backward_shared`]: dy B and dyᵀ (x Aᵀ) read
/// the same rows one after the other, and 128 rows of the widest dy of the bench config (1376
/// columns, 700 KB in f32) are still in the core's cache for the second.
const THIN_ROWS: usize = 128;

/// The backward passes of linears that read the same input `x` (q/k/v, or gate/up, or one
/// linear alone): the gradient of `x` (the sum of their input gradients, when `need_dx`) and
/// their LoRA gradients.
///
/// When each has a LoRA branch run without a dropout mask, everything runs in one parallel pass
/// over the [`crate::parallel::pieces`] of the rows. For each block ([`chunk_rows`] rows) of a
/// piece: for each branch dy B and its dB partial s dyᵀ (x Aᵀ), in one pass over dy with the
/// AVX-512 kernels of [`thin`] where they apply, else by [`THIN_ROWS`] rows (dy's rows come from
/// cache for the second product instead of from memory), then the dA partial of every branch at
/// once, (dy B)ᵀ x with the dy B side by side. Then the piece's rows of the input
/// gradient, dy (W + s B A) of each branch. Both threads stay busy to the end (as thin products
/// of whole matrices the work split into a few uneven tasks), and the partials of the blocks
/// add up in row order, so the result does not depend on the thread count. Measured on the
/// issue-6 bench config: the backward passes of the four groups of a layer about 30 ms faster
/// per training step (docs/benchmarks.md).
pub(crate) fn backward_shared<T: Scalar>(
    linears: &[&Linear<T>],
    dys: &[&Array2<T>],
    x: &Array2<T>,
    caches: &[&LinearCache<T>],
    need_dx: bool,
    par: &Par,
) -> (Option<Array2<T>>, Vec<Option<LoraGrad<T>>>) {
    let (n, d_in) = x.dim();
    let shared = linears.iter().zip(caches).all(|(l, c)| l.lora.is_some() && c.merged.is_some());
    if !shared {
        let mut dx = need_dx.then(|| par.zeros(n, d_in));
        let grads =
            linears.iter().zip(dys).zip(caches).map(|((l, dy), c)| l.backward(dy, x, c, dx.as_mut(), par)).collect();
        return (dx, grads);
    }
    let loras: Vec<&LoraParams<T>> = linears.iter().map(|l| l.lora.as_ref().expect("checked above")).collect();
    let ranks: usize = loras.iter().map(|l| l.a.nrows()).sum();
    // the dA and dB partials of one block of rows
    let block_partials = |rows: Range<usize>| {
        let x = x.slice(s![rows.clone(), ..]);
        let mut gb = Array2::zeros((rows.len(), ranks)); // dy B of every branch, side by side
        let mut first = 0;
        let mut dbs = Vec::with_capacity(loras.len());
        for ((lora, dy), cache) in loras.iter().zip(dys).zip(caches) {
            let r = lora.a.nrows();
            let dy = dy.slice(s![rows.clone(), ..]);
            let xa = cache.xa.as_ref().expect("the forward pass keeps x Aᵀ when there is a LoRA branch");
            let xa = xa.slice(s![rows.clone(), ..]);
            let mut db = Array2::zeros(lora.b.raw_dim());
            if thin_partials(&dy, &lora.b, &xa, &mut gb, first, &mut db) {
                db.mapv_inplace(|v| v * lora.scale());
            } else {
                for j in (0..dy.nrows()).step_by(THIN_ROWS) {
                    let sub = j..(j + THIN_ROWS).min(dy.nrows());
                    let dys = dy.slice(s![sub.clone(), ..]);
                    let mut gb = gb.slice_mut(s![sub.clone(), first..first + r]);
                    general_mat_mul(T::one(), &dys, &lora.b, T::one(), &mut gb);
                    general_mat_mul(lora.scale(), &dys.t(), &xa.slice(s![sub, ..]), T::one(), &mut db);
                }
            }
            dbs.push(db);
            first += r;
        }
        let mut dat = Array2::zeros((x.ncols(), ranks)); // dAᵀ, for the kernel
        let da = if thin_xt_gb(&x, &gb, &mut dat) {
            dat.reversed_axes()
        } else {
            let mut da = Array2::zeros((ranks, x.ncols()));
            general_mat_mul(T::one(), &gb.t(), &x, T::one(), &mut da);
            da
        };
        (da, dbs)
    };
    // a piece: the partials of its blocks, then its rows of dx, dy (W + s B A) of each branch
    // (the base and the branch's input gradients in one product)
    let block = chunk_rows(n);
    let piece = |rows: Range<usize>, dx: Option<ArrayViewMut2<'_, T>>| {
        let parts: Vec<_> = rows.clone().step_by(block).map(|b| block_partials(b..(b + block).min(rows.end))).collect();
        if let Some(mut dx) = dx {
            for (dy, cache) in dys.iter().zip(caches) {
                let merged = cache.merged.as_ref().expect("checked above");
                general_mat_mul(T::one(), &dy.slice(s![rows.clone(), ..]), merged, T::one(), &mut dx);
            }
        }
        parts
    };
    let (dx, partials) = match need_dx {
        true => {
            let (dx, partials) = par.build(n, d_in, |first, dx| piece(first..first + dx.nrows(), Some(dx)));
            (Some(dx), partials)
        }
        false => (None, par.map_vec(par.pieces(n), |rows| piece(rows, None))),
    };
    let mut partials = partials.into_iter().flatten();
    let (mut da_all, mut dbs) = partials.next().expect("at least one row");
    for (da, more) in partials {
        da_all += &da;
        dbs.iter_mut().zip(&more).for_each(|(db, more)| *db += more);
    }
    let mut first = 0;
    let grads = loras
        .iter()
        .zip(dbs)
        .map(|(lora, db)| {
            let r = lora.a.nrows();
            let da = da_all.slice(s![first..first + r, ..]).mapv(|v| v * lora.scale());
            first += r;
            Some(LoraGrad { a: da, b: db })
        })
        .collect();
    (dx, grads)
}

/// gb[.., first..first + r] = dy B and db = dyᵀ xa over one block of rows with the AVX-512
/// kernels of [`thin`], when they apply (f32, standard layouts, r a multiple of 16); `false`
/// (nothing written) otherwise.
fn thin_partials<T: Scalar>(
    dy: &ArrayView2<'_, T>,
    b: &Array2<T>,
    xa: &ArrayView2<'_, T>,
    gb: &mut Array2<T>,
    first: usize,
    db: &mut Array2<T>,
) -> bool {
    let (r, ld_gb) = (b.ncols(), gb.ncols());
    let (Some(dy), Some(b), Some(xa)) = (dy.as_slice(), b.as_slice(), xa.as_slice()) else { return false };
    let (Some(dy), Some(b), Some(xa)) = (f32s(dy), f32s(b), f32s(xa)) else { return false };
    let (Some(gb), Some(db)) = (gb.as_slice_mut().and_then(f32s_mut), db.as_slice_mut().and_then(f32s_mut)) else {
        return false;
    };
    thin::dy_b_db(dy, b, xa, r, &mut gb[first..], ld_gb, db)
}

/// dat = xᵀ gb over one block of rows with the AVX-512 kernel of [`thin`], when it applies
/// (f32, standard layouts, the summed ranks a multiple of 16); `false` (nothing written)
/// otherwise.
fn thin_xt_gb<T: Scalar>(x: &ArrayView2<'_, T>, gb: &Array2<T>, dat: &mut Array2<T>) -> bool {
    let (d_in, ranks) = (x.ncols(), gb.ncols());
    let (Some(x), Some(gb)) = (x.as_slice().and_then(f32s), gb.as_slice().and_then(f32s)) else { return false };
    let Some(dat) = dat.as_slice_mut().and_then(f32s_mut) else { return false };
    thin::xt_gb(x, d_in, gb, ranks, ranks, dat)
}

/// Inverted dropout: each entry 0 with probability p, else 1 / (1 - p).
fn dropout_mask<T: Scalar>(dim: ndarray::Ix2, p: f64, seed: u64) -> Array2<T> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let keep = T::from_f64(1.0 / (1.0 - p));
    Array2::from_shape_simple_fn(dim, || if rng.random::<f64>() < p { T::zero() } else { keep })
}
