//! The SIMD kernels of the LoRA factors' gradients against sums in f64, over shapes that leave
//! row remainders, strips of columns, several tiles and gaps between rows: the kernel of every
//! instruction set the CPU has (the AVX2 build, compiled for the tests, checks the same code on
//! CPUs without AVX-512).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::thin::{dy_b_db, dy_b_db_on, xt_gb, xt_gb_on, Isa};

fn random(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Registers of f32 lanes of `isa`.
fn lanes(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 16,
        Isa::Avx2 => 8,
    }
}

/// |got - want| within 1e-5 of the sum of the terms' magnitudes (f32 rounding over 1000 terms).
fn close(got: f32, want: f64, scale: f64, what: &str) {
    assert!((f64::from(got) - want).abs() <= 1e-5 * scale + 1e-30, "{what}: {got} against {want}");
}

#[test]
fn dy_b_and_db_equal_their_sums() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let isas = Isa::available();
    // (rows, d_out, r, gb's row length, gb's first column): d_out over several tiles in the last two
    for (rows, d_out, r, ld, first) in [
        (19, 37, 16, 16, 0),
        (8, 5, 16, 40, 24),
        (13, 70, 32, 48, 16),
        (11, 9, 48, 48, 0),
        (7, 33, 64, 80, 16),
        (10, 21, 8, 8, 0),
        (9, 14, 24, 40, 8),
        (6, 300, 16, 16, 0),
        (5, 200, 32, 40, 8),
    ] {
        let (dy, b, xa) = (random(rows * d_out, &mut rng), random(d_out * r, &mut rng), random(rows * r, &mut rng));
        let gb0 = random(rows * ld, &mut rng);
        let db0 = random(d_out * r, &mut rng);
        let fits = |isa: Isa| r % lanes(isa) == 0 && r / lanes(isa) <= 4;
        let (mut gb, mut db) = (gb0.clone(), db0.clone());
        let applied = dy_b_db(&dy, &b, &xa, r, &mut gb[first..], ld, &mut db);
        assert_eq!(applied, (Isa::Avx512.detected() && fits(Isa::Avx512)), "the step's kernel runs where it fits");
        for &isa in &isas {
            let (mut gb, mut db) = (gb0.clone(), db0.clone());
            let applied = dy_b_db_on(isa, &dy, &b, &xa, r, &mut gb[first..], ld, &mut db);
            assert_eq!(applied, fits(isa), "{isa:?} applies to r = {r} exactly when r is 1 to 4 registers");
            if !applied {
                assert!(gb == gb0 && db == db0, "nothing written when the kernel does not apply");
                continue;
            }
            let what = format!("{isa:?}: rows {rows}, d_out {d_out}, r {r}");
            for i in 0..rows {
                for c in 0..ld {
                    let got = gb[i * ld + c];
                    if !(first..first + r).contains(&c) {
                        assert_eq!(got, gb0[i * ld + c], "{what}: gb outside the branch's columns");
                        continue;
                    }
                    let terms = (0..d_out).map(|j| f64::from(dy[i * d_out + j]) * f64::from(b[j * r + c - first]));
                    let scale: f64 = terms.clone().map(f64::abs).sum();
                    close(got, terms.sum(), scale, &format!("{what}: gb[{i}, {c}]"));
                }
            }
            for j in 0..d_out {
                for c in 0..r {
                    let terms = (0..rows).map(|i| f64::from(dy[i * d_out + j]) * f64::from(xa[i * r + c]));
                    let scale: f64 = terms.clone().map(f64::abs).sum::<f64>() + f64::from(db0[j * r + c]).abs();
                    let want = f64::from(db0[j * r + c]) + terms.sum::<f64>();
                    close(db[j * r + c], want, scale, &format!("{what}: db[{j}, {c}]"));
                }
            }
        }
    }
}

#[test]
fn xt_gb_equals_its_sums() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let isas = Isa::available();
    // (rows, d_in, ranks, gb's row length): ranks of 1 to 12 registers (strips, then the rest),
    // d_in over several tiles
    for (rows, d_in, ranks, ld) in [
        (19, 37, 16, 16),
        (9, 5, 32, 48),
        (13, 20, 48, 48),
        (5, 17, 64, 64),
        (23, 11, 96, 112),
        (17, 6, 24, 32),
        (7, 300, 16, 16),
        (9, 150, 32, 48),
    ] {
        let (x, gb) = (random(rows * d_in, &mut rng), random(rows * ld, &mut rng));
        let dat0 = random(d_in * ranks, &mut rng);
        let mut dat = dat0.clone();
        let applied = xt_gb(&x, d_in, &gb, ranks, ld, &mut dat);
        assert_eq!(
            applied,
            (Isa::Avx512.detected() && ranks % lanes(Isa::Avx512) == 0),
            "the step's kernel runs where it fits"
        );
        for &isa in &isas {
            let mut dat = dat0.clone();
            let applied = xt_gb_on(isa, &x, d_in, &gb, ranks, ld, &mut dat);
            assert_eq!(applied, ranks % lanes(isa) == 0, "{isa:?} applies to whole registers");
            if !applied {
                assert!(dat == dat0, "nothing written when the kernel does not apply");
                continue;
            }
            for k in 0..d_in {
                for c in 0..ranks {
                    let terms = (0..rows).map(|i| f64::from(x[i * d_in + k]) * f64::from(gb[i * ld + c]));
                    let scale: f64 = terms.clone().map(f64::abs).sum::<f64>() + f64::from(dat0[k * ranks + c]).abs();
                    let want = f64::from(dat0[k * ranks + c]) + terms.sum::<f64>();
                    close(
                        dat[k * ranks + c],
                        want,
                        scale,
                        &format!("{isa:?}, rows {rows}, ranks {ranks}: dAᵀ[{k}, {c}]"),
                    );
                }
            }
        }
    }
}

#[test]
fn ranks_that_are_not_whole_registers_are_left_to_blas() {
    // r = 4: less than a register of any instruction set
    let (mut gb, mut db, mut dat) = (vec![0f32; 3 * 4], vec![0f32; 4 * 4], vec![0f32; 4 * 4]);
    assert!(!dy_b_db(&[1.0; 12], &[1.0; 16], &[1.0; 12], 4, &mut gb, 4, &mut db));
    assert!(!xt_gb(&[1.0; 12], 4, &[1.0; 12], 4, 4, &mut dat));
    for isa in Isa::available() {
        assert!(!dy_b_db_on(isa, &[1.0; 12], &[1.0; 16], &[1.0; 12], 4, &mut gb, 4, &mut db));
        assert!(!xt_gb_on(isa, &[1.0; 12], 4, &[1.0; 12], 4, 4, &mut dat));
    }
    assert!(gb.iter().chain(&db).chain(&dat).all(|&v| v == 0.0), "nothing written");
}
