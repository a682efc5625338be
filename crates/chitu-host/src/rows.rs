//! Row-wise passes over `[..., dim]` f32 tensors on burn-flex, each one parallel pass.
//!
//! burn-flex runs its elementwise binary ops on one thread, and an RMS norm written in tensor
//! ops is five of them. The DiT and UMT5 call these instead where [`crate::is_host_f32`] holds;
//! they compute what the tensor forms compute, in f32, to rounding (about 1e-7 relative).

use crate::{sum_of, HostF32};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use rayon::prelude::*;

/// Rows per parallel task: a few hundred KB at Wan's widths, so that a task is worth a
/// thread's hand-over while 2 to 16 threads still share the work evenly.
pub const ROWS_PER_TASK: usize = 16;

/// `t`'s f32 elements, owned: its own buffer when nothing else holds it (burn-flex's
/// `into_data` moves a unique buffer), else a copy. `t` must be f32.
pub fn take<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    let t = if t.dtype() == burn::tensor::DType::F32 {
        t
    } else {
        t.cast(burn::tensor::DType::F32)
    };
    t.into_data()
        .into_vec::<f32>()
        .unwrap_or_else(|_| unreachable!("cast to f32 above"))
}

/// `row / sqrt(mean(row^2) + eps) * gamma`, in place.
#[inline]
pub fn rms_norm_row(row: &mut [f32], gamma: &[f32], eps: f32) {
    let rms = (sum_of(row, |x| x * x) / row.len() as f32 + eps).sqrt();
    row.iter_mut().zip(gamma).for_each(|(x, g)| *x = *x / rms * g);
}

/// RMS norm over the last axis with gain `gamma` `[dim]` (T5's layer norm, burn's `RmsNorm`).
pub fn rms_norm<B: Backend, const D: usize>(x: Tensor<B, D>, gamma: Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
    let (shape, device) = (x.shape(), x.device());
    let dim = shape.dims::<D>()[D - 1];
    let gamma = HostF32::new(gamma);
    let mut v = take(x);
    v.par_chunks_mut(dim * ROWS_PER_TASK).for_each(|rows| {
        rows.chunks_exact_mut(dim)
            .for_each(|row| rms_norm_row(row, gamma.as_slice(), eps as f32));
    });
    Tensor::from_data(TensorData::new(v, shape), &device)
}

/// `x + y * gate` with `gate` `[B, 1, dim]` (one per batch), or `x + y` without a gate;
/// `x` and `y` are `[B, S, dim]`.
pub fn residual<B: Backend>(x: Tensor<B, 3>, y: Tensor<B, 3>, gate: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
    let ([b, s, dim], device) = (x.dims(), x.device());
    let y = HostF32::new(y);
    let gate = gate.map(HostF32::new);
    let mut v = take(x);
    v.par_chunks_mut(dim * ROWS_PER_TASK)
        .zip(y.as_slice().par_chunks(dim * ROWS_PER_TASK))
        .enumerate()
        .for_each(|(task, (rows, ys))| {
            for (r, (row, y)) in rows.chunks_exact_mut(dim).zip(ys.chunks_exact(dim)).enumerate() {
                match &gate {
                    Some(g) => {
                        let batch = (task * ROWS_PER_TASK + r) / s;
                        let g = &g.as_slice()[batch * dim..(batch + 1) * dim];
                        row.iter_mut().zip(y).zip(g).for_each(|((x, y), g)| *x += y * g);
                    }
                    None => row.iter_mut().zip(y).for_each(|(x, y)| *x += y),
                }
            }
        });
    Tensor::from_data(TensorData::new(v, [b, s, dim]), &device)
}

/// `x * y`, elementwise, for tensors of one shape.
pub fn mul<B: Backend, const D: usize>(x: Tensor<B, D>, y: Tensor<B, D>) -> Tensor<B, D> {
    let (shape, device) = (x.shape(), x.device());
    let y = HostF32::new(y);
    let mut v = take(x);
    const CHUNK: usize = 1 << 14;
    v.par_chunks_mut(CHUNK)
        .zip(y.as_slice().par_chunks(CHUNK))
        .for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(x, y)| *x *= y));
    Tensor::from_data(TensorData::new(v, shape), &device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::RmsNormConfig;
    use burn::tensor::{Distribution, Tolerance};
    use burn_flex::Flex;

    fn r<const D: usize>(shape: [usize; D]) -> Tensor<Flex, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 2.0), &Default::default())
    }

    fn close<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>) {
        a.into_data()
            .assert_approx_eq::<f32>(&b.into_data(), Tolerance::rel_abs(1e-5, 1e-5));
    }

    #[test]
    fn rms_norm_is_burns() {
        let dev = Default::default();
        let mut norm = RmsNormConfig::new(40).with_epsilon(1e-6).init::<Flex>(&dev);
        norm.gamma = burn::module::Param::from_tensor(r([40]));
        // More rows than one task.
        let x = r([2, 37, 40]);
        close(rms_norm(x.clone(), norm.gamma.val(), 1e-6), norm.forward(x));
    }

    #[test]
    fn residual_and_mul_are_the_tensor_forms() {
        let (x, y, g) = (r([2, 37, 24]), r([2, 37, 24]), r([2, 1, 24]));
        close(
            residual(x.clone(), y.clone(), Some(g.clone())),
            x.clone() + y.clone() * g,
        );
        close(residual(x.clone(), y.clone(), None), x.clone() + y.clone());
        close(mul(x.clone(), y.clone()), x * y);
    }
}
