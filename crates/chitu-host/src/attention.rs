//! Scaled dot-product attention on the host, for the DiT's and UMT5's f32 tensors on burn-flex.
//!
//! q, k and v stay in the `[B, S, H, D]` layout their projections write: the GEMMs read each
//! head through its strides, so no head-first copy is made, and the scores are scaled inside the
//! first GEMM. Tasks are (batch, head, block of query rows), each on one thread: its scores stay
//! in L2, its softmax runs on [`crate::exp`] (vectorised) while other tasks multiply, and the
//! normalisation is applied to the `D`-wide output rows rather than to the `Sk`-wide scores.
//! burn-flex's own attention runs its heads one after another with a scalar `exp`.

use crate::sgemm::{row_major, Mat, Sgemm};
use crate::{exp, sum_of, HostF32};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use rayon::prelude::*;

/// Query rows per task: their scores (`rows x Sk` f32, 1 MB at 1,950 keys) stay in L2.
pub const QUERY_ROWS: usize = 128;

/// Adds an attention bias to one row of scores: `bias(batch, head, query_row, scores)`.
pub type RowBias<'a> = &'a (dyn Fn(usize, usize, usize, &mut [f32]) + Sync);

/// `softmax(scale * q kᵀ + bias) v` per head, on `[B, Sq, H, D]` queries and `[B, Sk, H, D]`
/// keys and values; the result is `[B, Sq, H, D]`. `key_padding` (`B * Sk` flags, batch-major)
/// marks keys that no query may see. A query row whose keys are all masked gets NaN, as a
/// softmax over nothing does in PyTorch.
///
/// Any dtype is read as f32 (see [`HostF32`]); on backends without host kernels it still runs,
/// on copies, so callers choose it only where [`crate::is_host_f32`] holds.
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f32,
    key_padding: Option<&[bool]>,
    bias: Option<RowBias>,
) -> Tensor<B, 4> {
    let ([b, sq, h, d], sk, device) = (q.dims(), k.dims()[1], q.device());
    let (q, k, v) = (HostF32::new(q), HostF32::new(k), HostF32::new(v));
    let mut out = vec![0f32; b * sq * h * d];
    let row = (h * d) as isize;
    let blocks = sq.div_ceil(QUERY_ROWS);
    let dst = SendPtr(out.as_mut_ptr());
    let (qs, ks, vs) = (q.as_slice(), k.as_slice(), v.as_slice());
    (0..b * h * blocks).into_par_iter().for_each(|task| {
        let (bh, block) = (task / blocks, task % blocks);
        let (bi, hi) = (bh / h, bh % h);
        let r0 = block * QUERY_ROWS;
        let rows = QUERY_ROWS.min(sq - r0);
        let masked = key_padding.map(|p| &p[bi * sk..(bi + 1) * sk]);
        SCORES.with(|scores| {
            let mut scores = scores.borrow_mut();
            if scores.len() < rows * sk {
                scores.resize(rows * sk, 0.0);
            }
            let scores = &mut scores[..rows * sk];
            let q0 = ((bi * sq + r0) * h + hi) * d;
            let kv0 = (bi * sk * h + hi) * d;
            // SAFETY: rows x d of q from row r0, and sk x d of k and v, lie inside their buffers.
            unsafe {
                Sgemm::crate_kernel().run_scaled(
                    rows,
                    sk,
                    d,
                    row_major(scores.as_mut_ptr(), sk),
                    Mat {
                        ptr: qs.as_ptr().add(q0),
                        rs: row,
                        cs: 1,
                    },
                    Mat {
                        ptr: ks.as_ptr().add(kv0),
                        rs: 1,
                        cs: row,
                    },
                    scale,
                );
            }
            let mut sums = [0f32; QUERY_ROWS];
            for (r, sc) in scores.chunks_exact_mut(sk).enumerate() {
                if let Some(add) = bias {
                    add(bi, hi, r0 + r, sc);
                }
                if let Some(masked) = masked {
                    sc.iter_mut()
                        .zip(masked)
                        .filter(|(_, m)| **m)
                        .for_each(|(x, _)| *x = f32::NEG_INFINITY);
                }
                let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                // e^(-inf) is 0 exactly (the fast `exp` saturates at 1.6e-38, which is not).
                sc.iter_mut()
                    .for_each(|x| *x = if *x == f32::NEG_INFINITY { 0.0 } else { exp(*x - max) });
                sums[r] = sum_of(sc, |x| x);
            }
            // SAFETY: this task's rows x d output run (head hi of rows r0..r0+rows) is inside
            // the output and written by no other task.
            unsafe {
                let o = dst.at(q0);
                Sgemm::crate_kernel().run(
                    rows,
                    d,
                    sk,
                    Mat { ptr: o, rs: row, cs: 1 },
                    row_major(scores.as_ptr(), sk),
                    Mat {
                        ptr: vs.as_ptr().add(kv0),
                        rs: row,
                        cs: 1,
                    },
                    false,
                    false,
                );
                for (r, sum) in sums[..rows].iter().enumerate() {
                    let o = std::slice::from_raw_parts_mut(o.offset(r as isize * row), d);
                    let inv = 1.0 / sum;
                    o.iter_mut().for_each(|x| *x *= inv);
                }
            }
        });
    });
    Tensor::from_data(TensorData::new(out, [b, sq, h, d]), &device)
}

thread_local! {
    /// One task's score block, reused by the thread's next task.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The output buffer, shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

// SAFETY: tasks write disjoint element runs (see `attention`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Element `i` (a method, so that closures capture the whole wrapper, not its raw field).
    ///
    /// # Safety
    /// `i` is inside the buffer.
    unsafe fn at(self, i: usize) -> *mut f32 {
        unsafe { self.0.add(i) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tolerance};
    use burn_flex::Flex;

    /// The plain tensor form, heads first: softmax(scale q kᵀ + bias + mask) v.
    fn reference(
        q: Tensor<Flex, 4>,
        k: Tensor<Flex, 4>,
        v: Tensor<Flex, 4>,
        scale: f32,
        extra: Tensor<Flex, 4>,
    ) -> Tensor<Flex, 4> {
        let (q, k, v) = (q.swap_dims(1, 2), k.swap_dims(1, 2), v.swap_dims(1, 2));
        let scores = q.matmul(k.transpose()).mul_scalar(scale) + extra;
        burn::tensor::activation::softmax(scores, 3).matmul(v).swap_dims(1, 2)
    }

    #[test]
    fn blocks_bias_and_padding_give_the_tensor_form() {
        let dev = Default::default();
        let r = |s| Tensor::<Flex, 4>::random(s, Distribution::Normal(0.0, 1.0), &dev);
        // Two query blocks (the second short), an odd key count, two batches.
        let (b, sq, sk, h, d) = (2, QUERY_ROWS + 9, 13, 3, 8);
        let (q, k, v) = (r([b, sq, h, d]), r([b, sk, h, d]), r([b, sk, h, d]));
        let mut pad = vec![false; b * sk];
        pad[sk + 10..].iter_mut().for_each(|p| *p = true);
        // A bias that depends on everything it is given.
        let bias_of = |bi: usize, hi: usize, i: usize, j: usize| ((bi + 2 * hi + 3 * i + 5 * j) % 7) as f32 * 0.25;
        let add = |bi: usize, hi: usize, i: usize, row: &mut [f32]| {
            row.iter_mut()
                .enumerate()
                .for_each(|(j, x)| *x += bias_of(bi, hi, i, j));
        };
        let mut extra = vec![0f32; b * h * sq * sk];
        for (n, x) in extra.iter_mut().enumerate() {
            let (j, i, hi, bi) = (n % sk, n / sk % sq, n / (sk * sq) % h, n / (sk * sq * h));
            *x = match pad[bi * sk + j] {
                true => f32::NEG_INFINITY,
                false => bias_of(bi, hi, i, j),
            };
        }
        let extra = Tensor::<Flex, 4>::from_data(TensorData::new(extra, [b, h, sq, sk]), &dev);
        let got = attention(q.clone(), k.clone(), v.clone(), 0.3, Some(&pad), Some(&add));
        got.into_data().assert_approx_eq::<f32>(
            &reference(q, k, v, 0.3, extra).into_data(),
            Tolerance::rel_abs(1e-5, 1e-5),
        );
    }
}
