//! The DiT block's passes between GEMMs, fused and run on all threads, for f32 tensors of a
//! backend with host kernels (burn-flex; see [`chitu_host::host_kernels`]).
//!
//! burn-flex runs its elementwise binary ops on one thread, so each of the block's modulations,
//! gated residual adds, q/k RMS norms and attention softmaxes left one of two cores idle, and
//! each was several passes over memory (a norm, then `* (1 + scale)`, then `+ shift`). Here
//! each is one parallel pass. The attention ([`chitu_host::attention`]) reads q, k and v in their
//! `[B, S, H, D]` layout through the GEMM's strides, so no head-first copy is made.
//!
//! Every function computes what the tensor form beside its caller computes, in f32, but not
//! always in the same order: results agree to rounding (about 1e-7 relative), not bit for bit.
//! The tests below hold each one to its tensor form.

use burn::tensor::{backend::Backend, Bool, Tensor, TensorData};
use chitu_host::rows::{rms_norm_row, take, ROWS_PER_TASK};
use chitu_host::{sum_of, HostF32};
use rayon::prelude::*;

/// `LayerNorm(x) * (1 + scale) + shift` (no affine weights), `x` `[B, S, dim]`, `shift` and
/// `scale` `[B, 1, dim]`.
pub(crate) fn norm_modulate<B: Backend>(
    x: Tensor<B, 3>,
    shift: Tensor<B, 3>,
    scale: Tensor<B, 3>,
    eps: f64,
) -> Tensor<B, 3> {
    let ([b, s, dim], device) = (x.dims(), x.device());
    let (shift, scale) = (HostF32::new(shift), HostF32::new(scale));
    let mut v = take(x);
    let eps = eps as f32;
    v.par_chunks_mut(dim * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, rows)| {
            for (r, row) in rows.chunks_exact_mut(dim).enumerate() {
                let batch = (task * ROWS_PER_TASK + r) / s;
                let at = batch * dim..(batch + 1) * dim;
                let (shift, scale) = (&shift.as_slice()[at.clone()], &scale.as_slice()[at]);
                let mean = sum_of(row, |x| x) / dim as f32;
                let var = sum_of(row, |x| (x - mean) * (x - mean)) / dim as f32;
                let inv = 1.0 / (var + eps).sqrt();
                for ((x, sh), sc) in row.iter_mut().zip(shift).zip(scale) {
                    *x = (*x - mean) * inv * (1.0 + sc) + sh;
                }
            }
        });
    Tensor::from_data(TensorData::new(v, [b, s, dim]), &device)
}

/// RMS norm across the whole row (`x / sqrt(mean(x^2) + eps) * gamma`, Wan's norm across heads),
/// then the rotary embedding of interleaved pairs per head when `rope` is given (`cos`, `sin`
/// `[S, head_dim / 2]`): `x` `[B, S, dim]` to `[B, S, heads, dim / heads]`.
pub(crate) fn rms_rope<B: Backend>(
    x: Tensor<B, 3>,
    gamma: Option<Tensor<B, 1>>,
    eps: f64,
    heads: usize,
    rope: Option<(Tensor<B, 2>, Tensor<B, 2>)>,
) -> Tensor<B, 4> {
    let ([b, s, dim], device) = (x.dims(), x.device());
    let gamma = gamma.map(HostF32::new);
    let rope = rope.map(|(c, sn)| (HostF32::new(c), HostF32::new(sn)));
    let mut v = take(x);
    let (eps, pairs) = (eps as f32, dim / heads / 2);
    v.par_chunks_mut(dim * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, rows)| {
            for (r, row) in rows.chunks_exact_mut(dim).enumerate() {
                if let Some(g) = &gamma {
                    rms_norm_row(row, g.as_slice(), eps);
                }
                if let Some((cos, sin)) = &rope {
                    let at = ((task * ROWS_PER_TASK + r) % s) * pairs;
                    let (cos, sin) = (&cos.as_slice()[at..at + pairs], &sin.as_slice()[at..at + pairs]);
                    for head in row.chunks_exact_mut(2 * pairs) {
                        for ((pair, &c), &sn) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                            let (x0, x1) = (pair[0], pair[1]);
                            pair[0] = x0 * c - x1 * sn;
                            pair[1] = x0 * sn + x1 * c;
                        }
                    }
                }
            }
        });
    Tensor::from_data(TensorData::new(v, [b, s, heads, dim / heads]), &device)
}

/// `softmax(q kᵀ / sqrt(D)) v` on `[B, S, H, D]` tensors, the result in the same layout.
/// `key_padding` `[B, Sk]` is true for keys to ignore. See [`chitu_host::attention`].
pub(crate) fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    key_padding: Option<Tensor<B, 2, Bool>>,
) -> Tensor<B, 4> {
    let d = q.dims()[3];
    let pad: Option<Vec<bool>> = key_padding.map(|m| m.into_data().convert::<bool>().to_vec().unwrap_or_default());
    chitu_host::attention::attention(q, k, v, 1.0 / (d as f32).sqrt(), pad.as_deref(), None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::RopeTables;
    use crate::layers::{layer_norm, modulate};
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
    fn norm_modulate_is_the_tensor_form() {
        // More rows than one task, two batches with their own modulation.
        let (x, shift, scale) = (r([2, 37, 24]), r([2, 1, 24]), r([2, 1, 24]));
        let want = modulate(layer_norm(x.clone(), 1e-6), shift.clone(), scale.clone());
        close(norm_modulate(x, shift, scale, 1e-6), want);
    }

    #[test]
    fn rms_rope_is_the_norm_then_the_rotation() {
        let dev = Default::default();
        let (heads, d) = (3, 24);
        let x = r([2, 24, heads * d]);
        let mut norm = RmsNormConfig::new(heads * d).with_epsilon(1e-6).init::<Flex>(&dev);
        norm.gamma = burn::module::Param::from_tensor(r([heads * d]));
        let rope = RopeTables::<Flex>::new([2, 3, 4], d, 10000.0, 0..24, &dev);
        let want = rope.apply(norm.forward(x.clone()).reshape([2, 24, heads, d]));
        let got = rms_rope(
            x.clone(),
            Some(norm.gamma.val()),
            1e-6,
            heads,
            Some((rope.cos.clone(), rope.sin.clone())),
        );
        close(got, want);
        // Neither: only the heads split.
        close(
            rms_rope(x.clone(), None, 0.0, heads, None),
            x.reshape([2, 24, heads, d]),
        );
    }

    #[test]
    fn attention_over_several_query_blocks_with_padding() {
        use crate::attention::{AttentionKind, AttentionOp};
        // More query rows than one block, an odd key count, padding on the second batch.
        let (q, k, v) = (r([2, 137, 3, 8]), r([2, 13, 3, 8]), r([2, 13, 3, 8]));
        let mut pad = vec![false; 26];
        pad[22..].iter_mut().for_each(|p| *p = true);
        let pad = Tensor::<Flex, 2, Bool>::from_data(TensorData::new(pad, [2, 13]), &Default::default());
        let want = AttentionKind::Fused.attend(q.clone(), k.clone(), v.clone(), Some(pad.clone()));
        close(attention(q, k, v, Some(pad)), want);
    }
}
