//! Unit tests of the kernels: attention's causal blocks give the dense computation's output and
//! gradients, with padding and queries that see no key; the row pieces of the parallel products
//! and of the matrices built piece by piece.

use ndarray::{s, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::ops::{attention_backward, attention_blocks, AttnDims};
use crate::parallel::{chunk_rows, pieces, Par, Parallelism, Start};

fn random(rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Array2<f64> {
    Array2::from_shape_simple_fn((rows, cols), || rng.random::<f64>() * 2.0 - 1.0)
}

/// Dense causal attention of one (sequence, head), written out: scores of every pair, masked
/// softmax, a query with no visible key attending uniformly to every position. Returns the
/// output and (dq, dk, dv) for the output gradient `dout`.
#[allow(clippy::type_complexity)]
fn dense(
    q: &Array2<f64>,
    k: &Array2<f64>,
    v: &Array2<f64>,
    keep: &[bool],
    dout: &Array2<f64>,
) -> (Array2<f64>, [Array2<f64>; 3]) {
    let (t, d) = q.dim();
    let scale = 1.0 / (d as f64).sqrt();
    let mut p = Array2::zeros((t, t));
    let mut blind = vec![false; t];
    for i in 0..t {
        let visible: Vec<usize> = (0..=i).filter(|&j| keep[j]).collect();
        if visible.is_empty() {
            blind[i] = true;
            p.row_mut(i).fill(1.0 / t as f64);
            continue;
        }
        let score = |j: usize| scale * q.row(i).dot(&k.row(j));
        let max = visible.iter().map(|&j| score(j)).fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = visible.iter().map(|&j| (score(j) - max).exp()).sum();
        for &j in &visible {
            p[[i, j]] = (score(j) - max).exp() / sum;
        }
    }
    let out = p.dot(v);
    let dv = p.t().dot(dout);
    let dp = dout.dot(&v.t());
    let mut ds = Array2::zeros((t, t));
    for i in (0..t).filter(|&i| !blind[i]) {
        let dot = dp.row(i).dot(&p.row(i));
        for j in 0..t {
            ds[[i, j]] = p[[i, j]] * (dp[[i, j]] - dot);
        }
    }
    let dq = ds.dot(k) * scale;
    let dk = ds.t().dot(q) * scale;
    (out, [dq, dk, dv])
}

fn max_diff(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[test]
fn causal_blocks_equal_dense_attention_with_padding_forward_and_backward() {
    let dims = AttnDims { batch: 4, seq: 7, heads: 4, kv_heads: 2, head_dim: 4 };
    let (t, d) = (dims.seq, dims.head_dim);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let rows = dims.batch * t;
    let q = random(rows, dims.heads * d, &mut rng);
    let k = random(rows, dims.kv_heads * d, &mut rng);
    let v = random(rows, dims.kv_heads * d, &mut rng);
    let d_o = random(rows, dims.heads * d, &mut rng);
    // no padding; left padding (three queries see no key); a hole; nothing but padding
    let keep = Array2::from_shape_fn((dims.batch, t), |(b, j)| match b {
        0 => true,
        1 => j >= 3,
        2 => j != 1 && j != 4,
        _ => false,
    });
    let par = Par::new(Parallelism::Sequential).unwrap();
    // and no mask at all, which takes the unmasked softmax kernel
    let no_padding = Array2::from_elem((dims.batch, t), true);
    for (mask, keep) in [(Some(&keep), &keep), (None, &no_padding)] {
        for block in [1, 2, 3, 5, 7, 64] {
            let (o, probs) = attention_blocks(&q, &k, &v, dims, mask, &par, block);
            let (dq, dk, dv) = attention_backward(&d_o, [&q, &k, &v], &probs, dims, mask, &par);
            let mut want_dk = Array2::zeros(k.raw_dim());
            let mut want_dv = Array2::zeros(v.raw_dim());
            for b in 0..dims.batch {
                for h in 0..dims.heads {
                    let kh = h / (dims.heads / dims.kv_heads);
                    let (r, c, ck) = (b * t..(b + 1) * t, h * d..(h + 1) * d, kh * d..(kh + 1) * d);
                    let keep_b: Vec<bool> = keep.row(b).to_vec();
                    let (out, [gq, gk, gv]) = dense(
                        &q.slice(s![r.clone(), c.clone()]).to_owned(),
                        &k.slice(s![r.clone(), ck.clone()]).to_owned(),
                        &v.slice(s![r.clone(), ck.clone()]).to_owned(),
                        &keep_b,
                        &d_o.slice(s![r.clone(), c.clone()]).to_owned(),
                    );
                    let at = format!("mask {}, block {block}, sequence {b}, head {h}", mask.is_some());
                    assert!(max_diff(&o.slice(s![r.clone(), c.clone()]).to_owned(), &out) < 1e-12, "output, {at}");
                    assert!(max_diff(&dq.slice(s![r.clone(), c]).to_owned(), &gq) < 1e-12, "dq, {at}");
                    want_dk.slice_mut(s![r.clone(), ck.clone()]).scaled_add(1.0, &gk);
                    want_dv.slice_mut(s![r, ck]).scaled_add(1.0, &gv);
                }
            }
            assert!(max_diff(&dk, &want_dk) < 1e-12, "dk, block {block}");
            assert!(max_diff(&dv, &want_dv) < 1e-12, "dv, block {block}");
            // the cached probabilities are zero above the diagonal, and each row of a query that
            // sees a key sums to 1
            for i in 0..dims.batch * dims.heads {
                let starts: Vec<usize> = probs.layout().map(|(q0, ..)| q0).collect();
                assert_eq!(starts, (0..t).step_by(block).collect::<Vec<_>>());
                for at in probs.layout() {
                    let (q0, pb) = (at.0, probs.block(i, at));
                    assert_eq!(pb.dim(), ((q0 + block).min(t) - q0, (q0 + block).min(t)));
                    for (r, row) in pb.rows().into_iter().enumerate() {
                        let qi = q0 + r;
                        assert!(row.slice(s![qi + 1..]).iter().all(|&x| x == 0.0), "block {block}, row {qi}");
                        let sum: f64 = row.sum();
                        let sees = keep.row(i / dims.heads).iter().take(qi + 1).any(|&k| k);
                        assert!(
                            if sees { (sum - 1.0).abs() < 1e-12 } else { sum == 0.0 },
                            "block {block}, row {qi}: {sum}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
#[allow(clippy::single_range_in_vec_init)] // one piece is a list of one range
fn pieces_are_whole_blocks_one_per_thread() {
    assert_eq!([1, 300, 512, 1000, 2048, 4096, 100_000].map(chunk_rows), [128, 128, 128, 256, 512, 1024, 1024]);
    assert_eq!(pieces(2048, 1), [0..2048]);
    assert_eq!(pieces(2048, 2), [0..1024, 1024..2048]);
    assert_eq!(pieces(2048, 3), [0..1024, 1024..1536, 1536..2048]);
    assert_eq!(pieces(2048, 8), [0..512, 512..1024, 1024..1536, 1536..2048]);
    assert_eq!(pieces(300, 2), [0..256, 256..300]);
    assert_eq!(pieces(300, 0), [0..300]);
    assert!(pieces(0, 2).is_empty());
    assert_eq!(Par::new(Parallelism::Sequential).unwrap().pieces(300), [0..300]);
    assert_eq!(Par::new(Parallelism::Threads(3)).unwrap().pieces(300), [0..128, 128..256, 256..300]);
}

#[test]
fn row_pieces_cover_every_row_once() {
    for threads in [Parallelism::Sequential, Parallelism::Threads(1), Parallelism::Threads(3)] {
        let par = Par::new(threads).unwrap();
        let mut out = Array2::<usize>::zeros((1000, 3));
        par.row_chunks(&mut out, |first, mut chunk| {
            for (i, mut row) in chunk.rows_mut().into_iter().enumerate() {
                row.fill(first + i + 1);
            }
        });
        assert!(out.rows().into_iter().enumerate().all(|(i, row)| row.iter().all(|&v| v == i + 1)), "{threads:?}");
    }
}

#[test]
fn built_matrices_are_written_piece_by_piece_from_their_start() {
    for threads in [Parallelism::Sequential, Parallelism::Threads(3)] {
        let par = Par::new(threads).unwrap();
        for rows in [0, 1, 127, 300, 1000] {
            let start = Array2::from_shape_fn((rows, 4), |(i, j)| (10 * i + j) as f64);
            let starts = [Start::Zeros(3), Start::Zeros(0), Start::Copy(&start)];
            let ([a, empty, b], pieces) = par.build_many(rows, starts, |first, [mut a, empty, mut b]| {
                assert!(a.iter().all(|&v| v == 0.0), "{threads:?}, {rows} rows: not cleared");
                assert_eq!(b, start.slice(s![first..first + b.nrows(), ..]), "{threads:?}, {rows} rows: not copied");
                assert_eq!((a.nrows(), empty.nrows(), empty.ncols()), (b.nrows(), b.nrows(), 0));
                for (i, (mut a, mut b)) in a.rows_mut().into_iter().zip(b.rows_mut()).enumerate() {
                    a.fill((first + i) as f64);
                    b[0] = -((first + i) as f64);
                }
                (first, a.nrows())
            });
            assert_eq!((a.dim(), empty.dim(), b.dim()), ((rows, 3), (rows, 0), (rows, 4)));
            let expected: Vec<_> = par.pieces(rows).into_iter().map(|p| (p.start, p.len())).collect();
            assert_eq!(pieces, expected, "{threads:?}, {rows} rows");
            for (i, (a, b)) in a.rows().into_iter().zip(b.rows()).enumerate() {
                assert!(a.iter().all(|&v| v == i as f64), "{threads:?}, row {i}");
                assert_eq!(
                    b.to_vec(),
                    [-(i as f64), start[[i, 1]], start[[i, 2]], start[[i, 3]]],
                    "{threads:?}, row {i}"
                );
            }
        }
    }
}
