//! The attention seam: every attention in the DiT goes through [`AttentionOp`] on `[B, S, H, D]`
//! tensors, so a context-parallel implementation (Ulysses all-to-all) can wrap the local one.

use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{backend::Backend, Bool, Tensor};

/// Scaled dot-product attention over `[B, S, H, D]` queries, keys and values.
pub trait AttentionOp<B: Backend>: Send + Sync {
    /// `softmax(q kᵀ / sqrt(D)) v` per head. `key_padding` is `[B, Sk]`, true where a key must be ignored.
    fn attend(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        key_padding: Option<Tensor<B, 2, Bool>>,
    ) -> Tensor<B, 4>;
}

/// The local attention kernels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AttentionKind {
    /// burn's attention op (fused on flex and CUDA).
    #[default]
    Fused,
    /// Plain matmul, softmax, matmul: slower, kept as the reference.
    Reference,
}

impl<B: Backend> AttentionOp<B> for AttentionKind {
    fn attend(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        key_padding: Option<Tensor<B, 2, Bool>>,
    ) -> Tensor<B, 4> {
        // Heads first for the kernels.
        let (q, k, v) = (q.swap_dims(1, 2), k.swap_dims(1, 2), v.swap_dims(1, 2));
        let [b, h, sq, d] = q.dims();
        let sk = k.dims()[2];
        let mask = key_padding.map(|m| m.reshape([b, 1, 1, sk]).expand([b, h, sq, sk]));
        let out = match self {
            AttentionKind::Fused => attention(q, k, v, mask, None, AttentionModuleOptions::default()),
            AttentionKind::Reference => {
                let scores = q.matmul(k.transpose()).mul_scalar(1.0 / (d as f64).sqrt());
                let scores = match mask {
                    Some(m) => scores.mask_fill(m, f32::NEG_INFINITY),
                    None => scores,
                };
                softmax(scores, 3).matmul(v)
            }
        };
        out.swap_dims(1, 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tolerance};
    use burn_flex::Flex;

    #[test]
    fn fused_matches_reference_with_and_without_padding() {
        let dev = Default::default();
        let r = |s| Tensor::<Flex, 4>::random(s, Distribution::Normal(0.0, 1.0), &dev);
        let (q, k, v) = (r([2, 5, 3, 8]), r([2, 7, 3, 8]), r([2, 7, 3, 8]));
        let a = AttentionKind::Fused.attend(q.clone(), k.clone(), v.clone(), None);
        let b = AttentionKind::Reference.attend(q.clone(), k.clone(), v.clone(), None);
        a.into_data()
            .assert_approx_eq::<f32>(&b.into_data(), Tolerance::absolute(1e-5));

        let pad =
            Tensor::<Flex, 2, Bool>::from_data([[false; 7], [false, false, false, false, true, true, true]], &dev);
        let a = AttentionKind::Fused.attend(q.clone(), k.clone(), v.clone(), Some(pad.clone()));
        let b = AttentionKind::Reference.attend(q.clone(), k.clone(), v.clone(), Some(pad));
        a.clone()
            .into_data()
            .assert_approx_eq::<f32>(&b.into_data(), Tolerance::absolute(1e-5));
        // Masking the last keys must equal dropping them.
        let short = AttentionKind::Reference.attend(q.slice(1..2), k.slice([1..2, 0..4]), v.slice([1..2, 0..4]), None);
        a.slice(1..2)
            .into_data()
            .assert_approx_eq::<f32>(&short.into_data(), Tolerance::absolute(1e-5));
    }
}
