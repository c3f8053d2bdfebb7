//! Explicit parallelism: a rayon thread pool of a given size, or the deterministic sequential
//! path.

use std::mem::MaybeUninit;
use std::sync::Arc;

use lora_core::Scalar;
use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array2, ArrayRef2, ArrayViewMut2, Axis};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// How many threads the model's work runs on.
///
/// With a pool, attention runs in parallel across (sequence, head) pairs, and every large
/// product and elementwise pass across pieces of rows (sequences x positions), one per thread,
/// each piece one `general_mat_mul` (a CBLAS when the final binary links one). A given thread
/// count gives the same numbers run after run. Other thread counts give the same numbers where
/// the BLAS computes each row of a product the same way whatever other rows share the call, and
/// numbers that differ by f32 rounding elsewhere: sums over rows (the loss, LoRA gradients) go
/// over blocks of rows that depend on the row count alone, combined in row order, but the
/// pieces of a product depend on the thread count. OpenBLAS computed rows independently on the
/// AVX-512 hosts tried and did not on an AMD Zen 3 host (its `Zen` core);
/// the tests check whichever the machine does. oneMKL promises it only in its reproducible mode
/// (`MKL_CBWR`).
///
/// A multi-threaded BLAS under a rayon pool oversubscribes the cores (measured: 3.5x slower on
/// 2 cores); run OpenBLAS single-threaded (`OPENBLAS_NUM_THREADS=1`) with
/// [`Parallelism::Threads`], and leave it threaded with [`Parallelism::Sequential`].
///
/// The products go to whatever `cblas_sgemm` the process resolves, so another CBLAS can stand in
/// for the linked OpenBLAS without a rebuild: oneMKL, preloaded with its sequential layer
/// (`MKL_THREADING_LAYER=SEQUENTIAL LD_PRELOAD=.../libmkl_rt.so.3`), made the issue-6 bench
/// config's step about 9% faster when every product ran in four pieces (docs/benchmarks.md,
/// "Session 6"); with one piece per thread OpenBLAS is the faster of the two ("Session 7").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Parallelism {
    /// Everything on the calling thread, no rayon: deterministic and the reference path.
    #[default]
    Sequential,
    /// A dedicated rayon pool of this many threads (at least 1).
    Threads(usize),
}

/// The runtime side of [`Parallelism`]: the pool, if any.
#[derive(Debug, Clone, Default)]
pub(crate) struct Par {
    pool: Option<Arc<rayon::ThreadPool>>,
}

/// Rows of a matrix, `rows`, cut into pieces of whole [`chunk_rows`] blocks, one piece per
/// thread (at most one per block): the row ranges, in order.
///
/// Every piece of a product is one BLAS call, which packs all of the other operand (a weight)
/// again, so one piece per thread packs it the fewest times: on the issue-6 bench config (2048
/// rows, blocks of 512, 2 threads) pieces of two blocks took 3.5% less CPU time per training
/// step than pieces of one (docs/benchmarks.md). Sums over rows (LoRA gradients, the loss) go
/// block by block, in row order, whatever the pieces; the products' rows are the same bit for
/// bit only where the BLAS computes a row whatever other rows share the call (see
/// [`Parallelism`]; checked by `the_thread_count_changes_f32_numbers_by_the_blas_rounding_at_most`).
pub(crate) fn pieces(rows: usize, threads: usize) -> Vec<std::ops::Range<usize>> {
    let block = chunk_rows(rows);
    let blocks = rows.div_ceil(block);
    let count = threads.clamp(1, blocks.max(1));
    let mut first = 0;
    (0..count)
        .map(|i| {
            let n = blocks / count + usize::from(i < blocks % count);
            let piece = first..(first + n * block).min(rows);
            first = piece.end;
            piece
        })
        .filter(|p| !p.is_empty())
        .collect()
}

impl Par {
    pub(crate) fn new(parallelism: Parallelism) -> Result<Self> {
        match parallelism {
            Parallelism::Sequential => Ok(Par { pool: None }),
            Parallelism::Threads(0) => Err(Error::ThreadPool("the thread count must be at least 1".into())),
            Parallelism::Threads(n) => {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("lora-train-{i}"))
                    .build()
                    .map_err(|e| Error::ThreadPool(e.to_string()))?;
                Ok(Par { pool: Some(Arc::new(pool)) })
            }
        }
    }

    /// The number of threads: 1 without a pool.
    pub(crate) fn threads(&self) -> usize {
        self.pool.as_ref().map_or(1, |p| p.current_num_threads())
    }

    /// The row ranges of [`pieces`] for this pool.
    pub(crate) fn pieces(&self, rows: usize) -> Vec<std::ops::Range<usize>> {
        pieces(rows, self.threads())
    }

    /// Run `f` inside the pool (so that nested `map` calls use it), or on this thread.
    pub(crate) fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }

    /// `f` of every item, in order, computed in parallel when there is a pool.
    pub(crate) fn map_vec<I: Send, R: Send>(&self, items: Vec<I>, f: impl Fn(I) -> R + Sync + Send) -> Vec<R> {
        match &self.pool {
            Some(_) => items.into_par_iter().map(f).collect(),
            None => items.into_iter().map(f).collect(),
        }
    }

    /// `(a(), b())`, the two run in parallel when there is a pool.
    pub(crate) fn join<A: Send, B: Send>(&self, a: impl FnOnce() -> A + Send, b: impl FnOnce() -> B + Send) -> (A, B) {
        match &self.pool {
            Some(_) => rayon::join(a, b),
            None => (a(), b()),
        }
    }

    /// `f(first_row, piece)` on the [`pieces`] of `out`'s rows, in parallel when there is a
    /// pool.
    pub(crate) fn row_chunks<T: Send + Sync>(
        &self,
        out: &mut Array2<T>,
        f: impl Fn(usize, ArrayViewMut2<'_, T>) + Sync + Send,
    ) {
        self.row_chunks_map(out, f);
    }

    /// [`Par::row_chunks`] returning what `f` returns for each chunk, in row order.
    pub(crate) fn row_chunks_map<T: Send + Sync, R: Send>(
        &self,
        out: &mut Array2<T>,
        f: impl Fn(usize, ArrayViewMut2<'_, T>) -> R + Sync + Send,
    ) -> Vec<R> {
        let pieces = self.pieces(out.nrows());
        let mut rest = out.view_mut();
        let mut chunks = Vec::new();
        for piece in pieces {
            let (chunk, tail) = rest.split_at(Axis(0), piece.len());
            chunks.push((piece.start, chunk));
            rest = tail;
        }
        self.map_vec(chunks, |(first, chunk)| f(first, chunk))
    }

    /// A (rows, cols) matrix of zeros, cleared by the pool's threads.
    ///
    /// `Array2::zeros` clears the memory on the calling thread (glibc's `calloc` of a reused
    /// block is a `memset`) while the other threads wait. For a matrix that a product or kernel
    /// writes next, [`Par::build`] clears it piece by piece instead.
    #[allow(unsafe_code)] // Vec::set_len after every element is written
    pub(crate) fn zeros<T: Scalar>(&self, rows: usize, cols: usize) -> Array2<T> {
        let len = rows * cols;
        let data = match &self.pool {
            Some(_) if len >= PARALLEL_FILL => {
                let mut data = Vec::with_capacity(len);
                let spare = &mut data.spare_capacity_mut()[..len];
                spare.par_chunks_mut(PARALLEL_FILL).for_each(|c| c.fill(MaybeUninit::new(T::zero())));
                // SAFETY: the capacity is at least len and the fill above wrote all len elements
                unsafe { data.set_len(len) };
                data
            }
            _ => vec![T::zero(); len],
        };
        Array2::from_shape_vec((rows, cols), data).expect("rows x cols elements")
    }

    /// A new (rows, cols) matrix written by `f` piece by piece, from zeros: [`Par::build_many`]
    /// with one output.
    pub(crate) fn build<T: Scalar, R: Send>(
        &self,
        rows: usize,
        cols: usize,
        f: impl Fn(usize, ArrayViewMut2<'_, T>) -> R + Sync + Send,
    ) -> (Array2<T>, Vec<R>) {
        let ([m], out) = self.build_many(rows, [Start::Zeros(cols)], |first, [chunk]| f(first, chunk));
        (m, out)
    }

    /// A new matrix written by `f` piece by piece, from a copy of `start`: [`Par::build_many`]
    /// with one output.
    pub(crate) fn build_from<T: Scalar, R: Send>(
        &self,
        start: &Array2<T>,
        f: impl Fn(usize, ArrayViewMut2<'_, T>) -> R + Sync + Send,
    ) -> (Array2<T>, Vec<R>) {
        let ([m], out) = self.build_many(start.nrows(), [Start::Copy(start)], |first, [chunk]| f(first, chunk));
        (m, out)
    }

    /// New matrices of `rows` rows written by `f` piece by piece: each of the [`pieces`] of
    /// every matrix is set to its [`Start`] (zeros, or the rows of another matrix) and handed to
    /// `f(first_row, pieces)`, in parallel when there is a pool; returns the matrices and what
    /// `f` returned for each piece, in row order.
    ///
    /// The same numbers as [`Par::zeros`] (or a copy) followed by [`Par::row_chunks`], without
    /// a separate pass over whole matrices: a piece is set just before `f` writes it, while its
    /// lines are in the core's cache. Whole-matrix clears were 9.7% of a training step's CPU
    /// samples on the issue-6 bench config; clearing by pieces (with the residual adds folded
    /// in) took the step from 1.20-1.24 to 1.17 s on two threads (docs/benchmarks.md, "Session
    /// 7").
    #[allow(unsafe_code)] // the pieces are initialised before they are seen as T
    pub(crate) fn build_many<T: Scalar, R: Send, const N: usize>(
        &self,
        rows: usize,
        starts: [Start<'_, T>; N],
        f: impl Fn(usize, [ArrayViewMut2<'_, T>; N]) -> R + Sync + Send,
    ) -> ([Array2<T>; N], Vec<R>) {
        let cols = starts.each_ref().map(|s| match s {
            Start::Zeros(cols) => *cols,
            Start::Copy(m) => {
                assert_eq!(m.nrows(), rows, "a start of {rows} rows");
                m.ncols()
            }
        });
        let pieces = self.pieces(rows);
        let mut data = cols.map(|c| Box::<[T]>::new_uninit_slice(rows * c));
        let mut splits = data.each_mut().map(|d| {
            let mut rest: &mut [MaybeUninit<T>] = d;
            let cols = rest.len() / rows.max(1);
            pieces
                .iter()
                .map(|piece| {
                    let (head, tail) = std::mem::take(&mut rest).split_at_mut(piece.len() * cols);
                    rest = tail;
                    head
                })
                .collect::<Vec<_>>()
                .into_iter()
        });
        let tasks: Vec<_> =
            pieces.iter().map(|p| (p.clone(), splits.each_mut().map(|s| s.next().expect("one per piece")))).collect();
        drop(splits);
        let out = self.map_vec(tasks, |(piece, parts)| {
            let (first, n) = (piece.start, piece.len());
            let mut i = 0;
            let views = parts.map(|p| {
                let (cols, start) = (cols[i], &starts[i]);
                i += 1;
                match start {
                    Start::Zeros(_) => p.fill(MaybeUninit::new(T::zero())),
                    Start::Copy(m) => {
                        for (dst, src) in p.chunks_exact_mut(cols.max(1)).zip(m.slice(s![first..first + n, ..]).rows())
                        {
                            dst.iter_mut().zip(src).for_each(|(d, &s)| _ = d.write(s));
                        }
                    }
                }
                // SAFETY: every element was just written, and MaybeUninit<T> has T's layout
                let p = unsafe { std::slice::from_raw_parts_mut(p.as_mut_ptr().cast::<T>(), p.len()) };
                ArrayViewMut2::from_shape((n, cols), p).expect("a piece of whole rows")
            });
            f(first, views)
        });
        let mats = std::array::from_fn(|i| {
            let d = std::mem::take(&mut data[i]);
            // SAFETY: the pieces cover every element and each was written above
            let d = unsafe { d.assume_init() };
            Array2::from_shape_vec((rows, cols[i]), d.into_vec()).expect("rows x cols elements")
        });
        (mats, out)
    }
}

/// What a matrix of [`Par::build_many`] holds before its pieces are handed out.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Start<'a, T> {
    /// Zeros, this many columns.
    Zeros(usize),
    /// A copy of this matrix (of the built one's rows).
    Copy(&'a Array2<T>),
}

/// Defines `fn name<T: Scalar>(args) -> R` that runs `body` compiled for AVX-512 (or AVX2)
/// when the CPU has it, and for baseline x86-64 otherwise.
///
/// The workspace builds for baseline x86-64, whose vectors hold 4 f32; the exponentials of
/// softmax, SiLU and the loss run several times faster with 16 lanes. The body is an
/// `#[inline(always)]` function called directly from each target-feature copy, so all of it
/// (and what it calls inline, such as `Scalar::exp_vectorised`) is compiled with the
/// features. Target features do not enable FMA contraction (Rust never fuses a * b + c on its
/// own), so every element is computed by the same operations on every path: the results are
/// identical.
macro_rules! multiversioned {
    ($(#[$meta:meta])* fn $name:ident<T: Scalar>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(unsafe_code)] // calls of target-feature functions, after the CPU checks
        fn $name<T: Scalar>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn kernel<T: Scalar>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            if !$crate::parallel::baseline_only() {
                #[target_feature(enable = "avx512f,avx2")]
                fn avx512<T: Scalar>($($arg: $ty),*) $(-> $ret)? {
                    kernel($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2<T: Scalar>($($arg: $ty),*) $(-> $ret)? {
                    kernel($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has the features avx512 was compiled for
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has the feature avx2 was compiled for
                    return unsafe { avx2($($arg),*) };
                }
            }
            kernel($($arg),*)
        }
    };
}
pub(crate) use multiversioned;

/// Tests set this to run [`multiversioned`] functions in their baseline copy.
#[cfg(test)]
pub(crate) static BASELINE_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether [`multiversioned`] functions must run their baseline copy (only ever in tests).
#[inline(always)]
pub(crate) fn baseline_only() -> bool {
    #[cfg(test)]
    return BASELINE_ONLY.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(test))]
    false
}

/// Below this many elements [`Par::zeros`] fills on the calling thread.
const PARALLEL_FILL: usize = 1 << 16;

/// Rows per block of a matrix of `rows` rows: about a quarter of them (enough blocks to share
/// among a few threads), in multiples of 64, from 128 to 1024. The [`pieces`] of parallel work
/// are whole blocks, and sums over rows go block by block: a function of `rows` alone, so the
/// sums are the same whatever the thread count.
///
/// Blocks of 256 rows instead of 128 took about 10% less CPU time per training step on the
/// issue-6 bench config (2048 rows) when each block was a piece of its own, and blocks of 512
/// about 5% less again (docs/benchmarks.md).
pub(crate) fn chunk_rows(rows: usize) -> usize {
    rows.div_ceil(4).next_multiple_of(64).clamp(128, 1024)
}

/// c = alpha a b + beta c, with a's and c's rows split into [`pieces`] computed in parallel
/// (each piece a single-threaded GEMM).
pub(crate) fn gemm<T: Scalar>(par: &Par, alpha: T, a: &ArrayRef2<T>, b: &ArrayRef2<T>, beta: T, c: &mut Array2<T>) {
    par.row_chunks(c, |first, mut chunk| {
        let rows = first..first + chunk.nrows();
        general_mat_mul(alpha, &a.slice(s![rows, ..]), b, beta, &mut chunk);
    });
}

/// Bytes of heap address space [`prefer_huge_pages`] marks for huge pages (address space
/// only: pages are taken when first written). The bench config's step peaks at 0.9 GB; past
/// this the heap grows on 4 KiB pages as before.
const HUGE_PAGE_HEAP: usize = 1536 << 20;

/// Ask the C allocator to keep freed memory for reuse instead of returning it to the system.
///
/// A training step allocates and frees activations of several MiB to tens of MiB many times.
/// glibc's defaults hand such blocks back (munmap, or trimming the heap top) and take them again
/// on the next allocation, so every step pays page faults, zeroing of fresh pages and TLB
/// shootdowns across cores (interrupts, which are expensive in a virtual machine). Measured on
/// the issue-6 bench config (2 cores, a VM): kernel time fell from about 30% of the samples to
/// 4%, and the step from 1.97-2.16 s to 1.90 s (docs/benchmarks.md). Peak memory is unchanged:
/// freed blocks are reused, not added to.
///
/// Every thread also allocates from the one main arena: rayon's workers otherwise get arenas of
/// their own, each keeping its freed blocks apart from the others'. Peak resident memory of the
/// bench config's step fell from 1.075 to 0.876 GB, its time unchanged (docs/benchmarks.md,
/// "Session 8"): the step allocates few, large blocks, so the arena's lock is not contended.
///
/// This changes a process-wide setting, so the library never calls it on its own: the `lora`
/// binary and the benches do, at start-up. A no-op outside Linux with glibc.
#[allow(unsafe_code)] // mallopt: a call into C
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any worker thread
    // exists in the binaries that use it, and glibc serialises it with its own lock anyway.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Ask for transparent huge pages for the heap: its first 1.5 GiB of address
/// space (grown once, untouched, so no memory is taken) are marked `MADV_HUGEPAGE`, which
/// transparent huge pages set to `madvise` (as on the machines measured) require. Call it after
/// [`retain_freed_memory`] (which keeps the heap from being trimmed), before loading a model.
///
/// A training step's activations then sit on 2 MiB pages, and the products' packing and the row
/// passes stop missing the TLB on every 4 KiB: 2.6% less wall time and 1.8-3.3% less CPU per
/// issue-6 bench-config step, peak memory unchanged (what glibc's
/// `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` gives, without the environment variable). It pays in
/// processes that reuse their memory, such as training and evaluation. A short command that
/// writes its memory once gains nothing and pays for clearing (and, with memory fragmented,
/// compacting) whole huge pages: `lora merge` of a 642 MiB model, six interleaved runs, median
/// 0.84 s with it against 0.80 s without (docs/benchmarks.md, "Session 8"). The `lora` binary
/// calls it for `train` and `eval` only.
///
/// A process-wide setting, so the library never calls it on its own. A no-op outside Linux with
/// glibc.
#[allow(unsafe_code)] // mallopt, malloc, madvise and free
pub fn prefer_huge_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters (glibc serialises it with its own lock). The
    // block is checked for null, madvised only inside its own bounds (advice that changes how
    // pages are served, not what they hold; an error leaves it as it was) and freed once.
    unsafe {
        // one block from the heap (not a mapping of its own), marked for huge pages, then handed
        // back: it stays the heap's free top (never trimmed), and later blocks are cut from it
        libc::mallopt(libc::M_MMAP_MAX, 0);
        let block = libc::malloc(HUGE_PAGE_HEAP);
        libc::mallopt(libc::M_MMAP_MAX, 65536);
        if !block.is_null() {
            const HUGE: usize = 2 << 20;
            let first = (block as usize).next_multiple_of(HUGE);
            let end = (block as usize + HUGE_PAGE_HEAP) / HUGE * HUGE;
            libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
            libc::free(block);
        }
    }
}
