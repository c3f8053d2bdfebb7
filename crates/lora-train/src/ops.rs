//! The building blocks of the decoder and their hand-written backward passes: RMSNorm, rotary
//! embeddings, SwiGLU, causal attention with grouped-query heads and a padding mask, and
//! cross-entropy. Activations are (rows, features) matrices with rows = sequences x positions.

use lora_core::Scalar;
use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array1, Array2, ArrayView2, ArrayViewMut2, Axis, Zip};

use crate::parallel::{multiversioned, Par, Start};

/// y = w ⊙ x / sqrt(mean(x²) + eps) per row; also returns 1 / sqrt(mean(x²) + eps) per row.
pub(crate) fn rms_norm<T: Scalar>(x: &Array2<T>, w: &Array1<T>, eps: f64, par: &Par) -> (Array2<T>, Array1<T>) {
    let (x, w) = (x.as_standard_layout(), w.as_standard_layout());
    let w = w.as_slice().expect("standard layout");
    let eps = T::from_f64(eps);
    let (y, rstd) = par.build(x.nrows(), x.ncols(), |first, mut chunk| {
        let x = x.slice(s![first..first + chunk.nrows(), ..]);
        let rows = chunk.rows_mut().into_iter().zip(x.rows());
        rows.map(|(mut y, x)| rms_norm_row(as_slice_mut(&mut y), x.to_slice().expect("standard layout"), w, eps))
            .collect::<Vec<_>>()
    });
    (y, rstd.into_iter().flatten().collect())
}

/// The contiguous elements of a row of a standard-layout matrix.
fn as_slice_mut<'a, T>(row: &'a mut ndarray::ArrayViewMut1<'_, T>) -> &'a mut [T] {
    row.as_slice_mut().expect("rows of a standard-layout matrix")
}

multiversioned! {
    /// [`rms_norm`] of one row: y = w ⊙ x r, returns r = 1 / sqrt(mean(x²) + eps), the sum of
    /// squares in [`LANES`] partial sums.
    fn rms_norm_row<T: Scalar>(y: &mut [T], x: &[T], w: &[T], eps: T) -> T {
        let r = T::one() / (dot(x, x) / T::from_f64(x.len() as f64) + eps).sqrt();
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            *y = w * (x * r);
        }
        r
    }
}

/// Backward of [`rms_norm`], plus `residual` (the gradient reaching x by a skip connection)
/// when there is one: with g = dy ⊙ w, dx = (r g - x r³ mean(g ⊙ x)) + residual.
pub(crate) fn rms_norm_backward<T: Scalar>(
    dy: &Array2<T>,
    x: &Array2<T>,
    w: &Array1<T>,
    rstd: &Array1<T>,
    residual: Option<&Array2<T>>,
    par: &Par,
) -> Array2<T> {
    let (dy, x, w) = (dy.as_standard_layout(), x.as_standard_layout(), w.as_standard_layout());
    let residual = residual.map(|r| r.as_standard_layout());
    let (rows, cols) = x.dim();
    let (w, dy, x) = (w.as_slice(), dy.as_slice(), x.as_slice());
    let [w, dy, x] = [w, dy, x].map(|m| m.expect("standard layout"));
    let residual = residual.as_ref().map(|m| m.as_slice().expect("standard layout"));
    par.build(rows, cols, |first, mut chunk| {
        for (i, mut dx) in (first..).zip(chunk.rows_mut()) {
            let row = i * cols..(i + 1) * cols;
            let residual = residual.map(|m| &m[row.clone()]);
            rms_norm_backward_row(as_slice_mut(&mut dx), &dy[row.clone()], &x[row], w, rstd[i], residual);
        }
    })
    .0
}

multiversioned! {
    /// [`rms_norm_backward`] of one row, r its 1 / rms; the sum of dy w x in [`LANES`] partial
    /// sums.
    fn rms_norm_backward_row<T: Scalar>(dx: &mut [T], dy: &[T], x: &[T], w: &[T], r: T, residual: Option<&[T]>) {
        let mut sums = [T::zero(); LANES];
        let (cy, cx, cw) = (dy.chunks_exact(LANES), x.chunks_exact(LANES), w.chunks_exact(LANES));
        let tail = cy.remainder().iter().zip(cx.remainder()).zip(cw.remainder());
        let tail = tail.fold(T::zero(), |acc, ((&dy, &x), &w)| acc + dy * w * x);
        for ((dy, x), w) in cy.zip(cx).zip(cw) {
            for i in 0..LANES {
                sums[i] += dy[i] * w[i] * x[i];
            }
        }
        let dot = sums.iter().fold(tail, |a, &b| a + b);
        let c = r * r * r * dot / T::from_f64(x.len() as f64);
        let rows = dx.iter_mut().zip(dy).zip(x).zip(w);
        match residual {
            None => rows.for_each(|(((dx, &dy), &x), &w)| *dx = r * dy * w - x * c),
            Some(res) => rows.zip(res).for_each(|((((dx, &dy), &x), &w), &res)| *dx = (r * dy * w - x * c) + res),
        }
    }
}

/// cos and sin of the rotary angles, (positions, head_dim / 2): angle(t, i) = t / theta^(2i / d).
#[derive(Debug, Clone)]
pub(crate) struct Rope<T> {
    cos: Array2<T>,
    sin: Array2<T>,
}

impl<T: Scalar> Rope<T> {
    pub(crate) fn new(positions: usize, head_dim: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        // transformers computes inv_freq and the angles in f32; f64 here, rounded once
        let angle = |t: usize, i: usize| t as f64 / theta.powf((2 * i) as f64 / head_dim as f64);
        Rope {
            cos: Array2::from_shape_fn((positions, half), |(t, i)| T::from_f64(angle(t, i).cos())),
            sin: Array2::from_shape_fn((positions, half), |(t, i)| T::from_f64(angle(t, i).sin())),
        }
    }

    /// Rotate every head of x (rows = sequences x `seq` positions, heads x head_dim columns) in
    /// place, with transformers' rotate-half convention: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s).
    /// `inverse` applies the transpose (the backward pass).
    pub(crate) fn apply(&self, x: &mut Array2<T>, seq: usize, head_dim: usize, inverse: bool, par: &Par) {
        par.row_chunks(x, |first, mut chunk| {
            for (row, mut xr) in (first..).zip(chunk.rows_mut()) {
                let t = row % seq;
                let (cos, sin) = (self.cos.row(t), self.sin.row(t));
                let [cos, sin] = [&cos, &sin].map(|r| r.to_slice().expect("rows of a standard-layout matrix"));
                rope_row(xr.as_slice_mut().expect("rows of a standard-layout matrix"), cos, sin, head_dim, inverse);
            }
        });
    }
}

multiversioned! {
    /// [`Rope::apply`] to one row: every head of `head_dim` numbers rotated by the position's
    /// cos and sin (their transpose when `inverse`).
    fn rope_row<T: Scalar>(row: &mut [T], cos: &[T], sin: &[T], head_dim: usize, inverse: bool) {
        for head in row.chunks_exact_mut(head_dim) {
            let (first, second) = head.split_at_mut(head_dim / 2);
            for (((x1, x2), &c), &s) in first.iter_mut().zip(second.iter_mut()).zip(cos).zip(sin) {
                let s = if inverse { -s } else { s };
                let (a, b) = (*x1, *x2);
                *x1 = a * c - b * s;
                *x2 = b * c + a * s;
            }
        }
    }
}

/// SiLU.
#[inline(always)]
pub(crate) fn silu<T: Scalar>(x: T) -> T {
    x / (T::one() + (-x).exp_vectorised())
}

/// act = silu(g) ⊙ u.
pub(crate) fn swiglu<T: Scalar>(g: &Array2<T>, u: &Array2<T>, par: &Par) -> Array2<T> {
    let (g, u) = (g.as_standard_layout(), u.as_standard_layout());
    let cols = g.ncols();
    par.build(g.nrows(), cols, |first, mut chunk| {
        let span = first * cols..(first + chunk.nrows()) * cols;
        let act = chunk.as_slice_mut().expect("rows of a standard-layout matrix");
        let (g, u) =
            (&g.as_slice().expect("standard layout")[span.clone()], &u.as_slice().expect("standard layout")[span]);
        swiglu_kernel(act, g, u);
    })
    .0
}

multiversioned! {
    /// act = silu(g) ⊙ u over slices of equal length.
    fn swiglu_kernel<T: Scalar>(act: &mut [T], g: &[T], u: &[T]) {
        for ((a, &g), &u) in act.iter_mut().zip(g).zip(u) {
            *a = silu(g) * u;
        }
    }
}

/// Backward of [`swiglu`]: (dg, du), in one pass over the rows with one exponential per entry.
pub(crate) fn swiglu_backward<T: Scalar>(
    da: &Array2<T>,
    g: &Array2<T>,
    u: &Array2<T>,
    par: &Par,
) -> (Array2<T>, Array2<T>) {
    let (da, g, u) = (da.as_standard_layout(), g.as_standard_layout(), u.as_standard_layout());
    let (rows, cols) = (g.nrows(), g.ncols());
    let [da, g, u] = [&da, &g, &u].map(|m| m.as_slice().expect("standard layout"));
    let ([dg, du], _) = par.build_many(rows, [Start::Zeros(cols); 2], |first, [mut dg, mut du]| {
        let span = first * cols..(first + dg.nrows()) * cols;
        let dg = dg.as_slice_mut().expect("rows of a standard-layout matrix");
        let du = du.as_slice_mut().expect("rows of a standard-layout matrix");
        let (da, g, u) = (&da[span.clone()], &g[span.clone()], &u[span]);
        swiglu_backward_kernel(dg, du, da, g, u);
    });
    (dg, du)
}

multiversioned! {
    /// The body of [`swiglu_backward`] over slices of equal length.
    fn swiglu_backward_kernel<T: Scalar>(dg: &mut [T], du: &mut [T], da: &[T], g: &[T], u: &[T]) {
    for ((((dg, du), &da), &g), &u) in dg.iter_mut().zip(du.iter_mut()).zip(da).zip(g).zip(u) {
        // silu(g) = g sig, silu'(g) = sig (1 + g (1 - sig)), sig = 1 / (1 + exp(-g))
        let denom = T::one() + (-g).exp_vectorised();
        let sig = T::one() / denom;
        *du = da * (g / denom);
        *dg = da * u * (sig * (T::one() + g * (T::one() - sig)));
    }
    }
}

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnDims {
    pub(crate) batch: usize,
    pub(crate) seq: usize,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
}

impl AttnDims {
    fn kv_head(&self, h: usize) -> usize {
        h / (self.heads / self.kv_heads)
    }

    fn block<'a, T>(&self, m: &'a Array2<T>, b: usize, h: usize) -> ArrayView2<'a, T> {
        let (t, d) = (self.seq, self.head_dim);
        m.slice(s![b * t..(b + 1) * t, h * d..(h + 1) * d])
    }
}

/// The blocks of `t` rows (a sequence) by `width` columns (a head, or a group of heads) of `m`,
/// sequence by sequence and, within one, left to right.
fn head_blocks<T>(m: &mut Array2<T>, t: usize, width: usize) -> Vec<ndarray::ArrayViewMut2<'_, T>> {
    let mut blocks = Vec::new();
    for mut rest in m.axis_chunks_iter_mut(Axis(0), t) {
        while rest.ncols() > 0 {
            let cut = width.min(rest.ncols());
            let (block, tail) = rest.split_at(Axis(1), cut);
            blocks.push(block);
            rest = tail;
        }
    }
    blocks
}

/// Query rows per block in [`attention`]: query block [q0, q1) only meets keys [0, q1), so the
/// products and the softmax skip the blocks above the diagonal (at 256 positions, 6 of the 16
/// blocks of 64 x 64).
const QUERY_BLOCK: usize = 64;

/// Index of the first key of sequence `b` that is not padding (`seq` when there is none): the
/// queries before it see no key.
fn first_visible(keep: Option<&Array2<bool>>, b: usize, seq: usize) -> usize {
    keep.map_or(0, |m| m.row(b).iter().position(|&k| k).unwrap_or(seq))
}

/// Lanes of the vectorisable reductions ([`max_of`], [`sum_of`], [`dot`]): one 512-bit vector
/// of f32.
const LANES: usize = 16;

/// The largest element (NaN ignored unless every element is NaN; -inf for none), in [`LANES`]
/// partial results so the loop vectorises.
#[inline(always)]
fn max_of<T: Scalar>(x: &[T]) -> T {
    let mut lanes = [T::neg_infinity(); LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    tail.iter().chain(&lanes).fold(T::neg_infinity(), |m, &v| if v > m { v } else { m })
}

/// Σ x_i in [`LANES`] partial sums (combined in a fixed order), so the loop vectorises.
#[inline(always)]
fn sum_of<T: Scalar>(x: &[T]) -> T {
    let mut sums = [T::zero(); LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(T::zero(), |acc, &v| acc + v);
    for c in chunks {
        for (s, &v) in sums.iter_mut().zip(c) {
            *s += v;
        }
    }
    sums.iter().fold(tail, |a, &b| a + b)
}

multiversioned! {
    /// ds = p ⊙ (dp - Σ dp_i p_i) over one row, written over dp.
    fn softmax_backward_kernel<T: Scalar>(dp: &mut [T], p: &[T]) {
        let dot = dot(dp, p);
        for (ds, &p) in dp.iter_mut().zip(p) {
            *ds = p * (*ds - dot);
        }
    }
}

/// Σ a_i b_i in [`LANES`] partial sums (combined in a fixed order), so the loop vectorises.
#[inline(always)]
fn dot<T: Scalar>(a: &[T], b: &[T]) -> T {
    let mut sums = [T::zero(); LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = ca.remainder().iter().zip(cb.remainder()).fold(T::zero(), |acc, (&x, &y)| acc + x * y);
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            sums[i] += x[i] * y[i];
        }
    }
    sums.iter().fold(tail, |a, &b| a + b)
}

/// The attention probabilities of every (sequence, head), kept for the backward pass: only the
/// blocks the causal mask leaves. Query block [q0, q1) (rows of `block` queries) meets keys
/// [0, q1), so it is stored as a (q1 - q0, q1) row-major matrix, zero above the diagonal and on
/// the rows of queries that see no key (their uniform attention is applied apart, in
/// [`attention`] and [`attention_backward`]); the blocks of one (sequence, head) follow each
/// other, and (sequence b, head h) is row b x heads + h of `data`. At 256 positions and blocks
/// of 64 this is 10 of the 16 blocks of the full (seq, seq) matrix.
#[derive(Debug)]
pub(crate) struct Probs<T> {
    data: Array2<T>,
    seq: usize,
    block: usize,
}

impl<T> Probs<T> {
    /// (q0, q1, offset) of each query block of one (sequence, head), in order.
    fn blocks(seq: usize, block: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        (0..seq).step_by(block.max(1)).scan(0, move |offset, q0| {
            let q1 = (q0 + block).min(seq);
            let at = *offset;
            *offset += (q1 - q0) * q1;
            Some((q0, q1, at))
        })
    }

    /// Numbers stored per (sequence, head).
    fn per_head(seq: usize, block: usize) -> usize {
        Self::blocks(seq, block).map(|(q0, q1, _)| (q1 - q0) * q1).sum()
    }

    /// The query blocks of this value's layout, as [`Probs::blocks`] gives them.
    pub(crate) fn layout(&self) -> impl Iterator<Item = (usize, usize, usize)> {
        Self::blocks(self.seq, self.block)
    }

    /// The block (q0, q1, offset) (one of [`Probs::layout`]) of (sequence, head) number `i`
    /// (b x heads + h), as a (q1 - q0, q1) matrix.
    pub(crate) fn block(&self, i: usize, (q0, q1, at): (usize, usize, usize)) -> ArrayView2<'_, T> {
        let row = self.data.row(i).to_slice().expect("rows of a standard-layout matrix");
        ArrayView2::from_shape((q1 - q0, q1), &row[at..at + (q1 - q0) * q1]).expect("the block's numbers")
    }
}

multiversioned! {
    /// Causal softmax of one row of scores in place: the first `visible` entries become
    /// e^(x - max) / Σ e^(x - max) (max, exponentials, sum and division each one vectorised pass
    /// over the row, the sums in [`LANES`] partial results), the rest zero.
    fn causal_softmax_row<T: Scalar>(row: &mut [T], visible: usize) {
        let (seen, masked) = row.split_at_mut(visible);
        let max = max_of(seen);
        seen.iter_mut().for_each(|v| *v = (*v - max).exp_vectorised());
        let sum = sum_of(seen);
        seen.iter_mut().for_each(|v| *v /= sum);
        masked.fill(T::zero());
    }
}

/// Causal softmax attention for every (sequence, head), in parallel. q is (rows, heads x d)
/// after rotary embedding, k and v (rows, kv_heads x d). `keep[b][j]` false masks key j of
/// sequence b (padding); a query with no visible key attends uniformly to every position, as in
/// transformers. Returns the output (rows, heads x d) and the probabilities, for
/// [`attention_backward`].
pub(crate) fn attention<T: Scalar>(
    q: &Array2<T>,
    k: &Array2<T>,
    v: &Array2<T>,
    dims: AttnDims,
    keep: Option<&Array2<bool>>,
    par: &Par,
) -> (Array2<T>, Probs<T>) {
    attention_blocks(q, k, v, dims, keep, par, QUERY_BLOCK)
}

pub(crate) fn attention_blocks<T: Scalar>(
    q: &Array2<T>,
    k: &Array2<T>,
    v: &Array2<T>,
    dims: AttnDims,
    keep: Option<&Array2<bool>>,
    par: &Par,
    block: usize,
) -> (Array2<T>, Probs<T>) {
    let (t, d) = (dims.seq, dims.head_dim);
    let scale = T::from_f64(1.0 / (d as f64).sqrt());
    // one row of stored blocks per (sequence, head), cleared by the pool's threads (every
    // number is written below, but safe Rust hands out initialised memory only)
    let mut probs = par.zeros(dims.batch * dims.heads, Probs::<T>::per_head(t, block));
    // each task writes its (sequence, head) block of the output in place
    let mut o = par.zeros(dims.batch * t, dims.heads * d);
    let tasks: Vec<_> = probs.axis_iter_mut(Axis(0)).zip(head_blocks(&mut o, t, d)).enumerate().collect();
    par.map_vec(tasks, |(i, (mut p, mut out))| {
        let p = p.as_slice_mut().expect("rows of a standard-layout matrix");
        let (b, h) = (i / dims.heads, i % dims.heads);
        let kh = dims.kv_head(h);
        let (qm, km, vm) = (dims.block(q, b, h), dims.block(k, b, kh), dims.block(v, b, kh));
        let keep_row = keep.map(|m| m.row(b));
        let first = first_visible(keep, b, t);
        for (q0, q1, at) in Probs::<T>::blocks(t, block) {
            let cells = &mut p[at..at + (q1 - q0) * q1];
            let mut pb = ArrayViewMut2::from_shape((q1 - q0, q1), cells).expect("the block's numbers");
            general_mat_mul(scale, &qm.slice(s![q0..q1, ..]), &km.slice(s![..q1, ..]).t(), T::zero(), &mut pb);
            for (qi, mut row) in (q0..q1).zip(pb.rows_mut()) {
                if qi < first {
                    // No visible key (a padded query before the first real token): transformers'
                    // eager attention adds the dtype's minimum to every score, which leaves them
                    // all equal, so the query attends uniformly to every position (applied below)
                    row.fill(T::zero());
                    continue;
                }
                match (keep_row, row.as_slice_mut()) {
                    (None, Some(row)) => causal_softmax_row(row, qi + 1),
                    _ => {
                        let visible = |j: usize| j <= qi && keep_row.is_none_or(|m| m[j]);
                        let max = (first..=qi).filter(|&j| visible(j)).map(|j| row[j]).fold(T::neg_infinity(), T::max);
                        let mut sum = T::zero();
                        for (j, v) in row.iter_mut().enumerate() {
                            *v = if visible(j) { (*v - max).exp_vectorised() } else { T::zero() };
                            sum += *v;
                        }
                        row.slice_mut(s![..=qi]).iter_mut().for_each(|v| *v /= sum);
                    }
                }
            }
            general_mat_mul(T::one(), &pb, &vm.slice(s![..q1, ..]), T::zero(), &mut out.slice_mut(s![q0..q1, ..]));
        }
        if first > 0 {
            let mean = vm.sum_axis(Axis(0)) / T::from_f64(t as f64);
            out.slice_mut(s![..first.min(t), ..]).assign(&mean.broadcast((first.min(t), d)).expect("row"));
        }
    });
    (o, Probs { data: probs, seq: t, block })
}

/// Backward of [`attention`]: (dq, dk, dv) from the output gradient, with key and value
/// gradients of the query heads that share a kv head summed (in head order, deterministic).
/// The query blocks are those of `probs`.
pub(crate) fn attention_backward<T: Scalar>(
    d_o: &Array2<T>,
    [q, k, v]: [&Array2<T>; 3],
    probs: &Probs<T>,
    dims: AttnDims,
    keep: Option<&Array2<bool>>,
    par: &Par,
) -> (Array2<T>, Array2<T>, Array2<T>) {
    let (t, d) = (dims.seq, dims.head_dim);
    let block = probs.block;
    let group = dims.heads / dims.kv_heads;
    let scale = T::from_f64(1.0 / (d as f64).sqrt());
    // one task per (sequence, kv head), writing its blocks of dq, dk and dv in place: the query
    // heads of the group one after the other, so their key and value gradients add up in head
    // order (deterministic)
    let mut dq = par.zeros(q.nrows(), q.ncols());
    let mut dk = par.zeros(k.nrows(), k.ncols());
    let mut dv = par.zeros(v.nrows(), v.ncols());
    let tasks: Vec<_> = head_blocks(&mut dq, t, group * d)
        .into_iter()
        .zip(head_blocks(&mut dk, t, d))
        .zip(head_blocks(&mut dv, t, d))
        .enumerate()
        .collect();
    par.map_vec(tasks, |(i, ((mut dq, mut dk), mut dv))| {
        let (b, kh) = (i / dims.kv_heads, i % dims.kv_heads);
        let (km, vm) = (dims.block(k, b, kh), dims.block(v, b, kh));
        let mut buf = Array2::zeros((block.min(t), t));
        for g in 0..group {
            let h = kh * group + g;
            let i = b * dims.heads + h;
            let qm = dims.block(q, b, h);
            let dout = dims.block(d_o, b, h);
            let mut dq = dq.slice_mut(s![.., g * d..(g + 1) * d]);
            for (q0, q1, at) in probs.layout() {
                let (pb, doutb) = (probs.block(i, (q0, q1, at)), dout.slice(s![q0..q1, ..]));
                let mut dp = buf.slice_mut(s![..q1 - q0, ..q1]);
                general_mat_mul(T::one(), &doutb, &vm.slice(s![..q1, ..]).t(), T::zero(), &mut dp);
                general_mat_mul(T::one(), &pb.t(), &doutb, T::one(), &mut dv.slice_mut(s![..q1, ..]));
                // dS = P ⊙ (dP - rowsum(dP ⊙ P)), written over dP; zero above the diagonal and
                // for a query that sees no key (its probabilities are stored as zeros: its
                // uniform attention does not depend on the scores)
                Zip::from(dp.rows_mut()).and(pb.rows()).for_each(|mut dp, p| match (dp.as_slice_mut(), p.as_slice()) {
                    (Some(ds), Some(p)) => softmax_backward_kernel(ds, p),
                    _ => {
                        let dot = Zip::from(&dp).and(&p).fold(T::zero(), |acc, &a, &b| acc + a * b);
                        Zip::from(&mut dp).and(&p).for_each(|ds, &p| *ds = p * (*ds - dot));
                    }
                });
                general_mat_mul(scale, &dp, &km.slice(s![..q1, ..]), T::zero(), &mut dq.slice_mut(s![q0..q1, ..]));
                general_mat_mul(scale, &dp.t(), &qm.slice(s![q0..q1, ..]), T::one(), &mut dk.slice_mut(s![..q1, ..]));
            }
            // the queries that see no key take the mean of every value
            let first = first_visible(keep, b, t).min(t);
            if first > 0 {
                let sum = dout.slice(s![..first, ..]).sum_axis(Axis(0)) / T::from_f64(t as f64);
                dv += &sum;
            }
        }
    });
    (dq, dk, dv)
}

/// Cross-entropy of next-token prediction for a run of rows: row i of `logits` predicts
/// `targets[i]` (the shifted labels, see `Batch::targets`); targets equal to
/// [`crate::IGNORE_INDEX`] do not count. Returns the sum of the losses (f64) and the number of
/// predictions counted. The logits are scratch: with `grad` they are overwritten by
/// d(sum)/d(logits) multiplied by `grad`, without it by the softmax's numerators.
pub(crate) fn cross_entropy_rows<T: Scalar>(
    logits: &mut ndarray::ArrayViewMut2<'_, T>,
    targets: ndarray::ArrayView1<'_, i64>,
    grad: Option<T>,
) -> (f64, usize) {
    let mut sum = 0.0;
    let mut count = 0;
    for (mut row, &label) in logits.axis_iter_mut(Axis(0)).zip(&targets) {
        if label == crate::IGNORE_INDEX {
            if grad.is_some() {
                row.fill(T::zero());
            }
            continue;
        }
        let row = row.as_slice_mut().expect("logits rows are contiguous");
        sum += cross_entropy_kernel(row, label as usize, grad);
        count += 1;
    }
    (sum, count)
}

multiversioned! {
/// The loss of one row of logits for the label `label`. The row is overwritten: by
/// grad x (softmax - onehot) with `grad`, by the exponentials otherwise.
fn cross_entropy_kernel<T: Scalar>(row: &mut [T], label: usize, grad: Option<T>) -> f64 {
    let max = max_of(row);
    let target = row[label];
    // the exponentials in T, over the row (a full-width vector loop); their sum in f64, in
    // lanes of 8
    row.iter_mut().for_each(|v| *v = (*v - max).exp_vectorised());
    let mut sums = [0.0f64; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder().iter().map(|e| e.as_f64()).sum::<f64>();
    for c in chunks {
        for (s, e) in sums.iter_mut().zip(c) {
            *s += e.as_f64();
        }
    }
    let sum_exp = sums.iter().fold(tail, |a, &b| a + b);
    if let Some(scale) = grad {
        // d/dlogit = softmax - onehot, times the 1 / count of the mean
        let factor = T::from_f64(scale.as_f64() / sum_exp);
        row.iter_mut().for_each(|v| *v *= factor);
        row[label] -= scale;
    }
    max.as_f64() + sum_exp.ln() - target.as_f64()
}
}
