//! The attention seam: every attention in the DiT goes through [`AttentionOp`] on `[B, S, H, D]`
//! tensors, so a context-parallel implementation (Ulysses all-to-all) can wrap the local one.

use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{backend::Backend, Bool, Tensor};

/// `[B, Sk]`, true where a key must be ignored (the pad keys of a context-parallel run).
pub type KeyPadding<B> = Option<Tensor<B, 2, Bool>>;

/// Scaled dot-product attention over `[B, S, H, D]` queries, keys and values.
pub trait AttentionOp<B: Backend>: Send + Sync {
    /// `softmax(q kᵀ / sqrt(D)) v` per head. `key_padding` is `[B, Sk]`, true where a key must be ignored.
    fn attend(&self, q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, key_padding: KeyPadding<B>) -> Tensor<B, 4>;
}

/// Replaces the local kernel for self-attention: context parallelism's all-to-alls go here, so
/// that a block knows nothing of how its tokens are split.
pub trait SelfAttentionWrap<B: Backend>: Send + Sync + std::fmt::Debug {
    /// Self-attention over `[B, S, H, D]` with `local` doing the attention proper.
    fn attend(&self, local: &dyn AttentionOp<B>, q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4>;
}

/// `local` run through `wrap`, as one [`AttentionOp`].
pub(crate) struct Wrapped<'a, B: Backend> {
    pub wrap: &'a dyn SelfAttentionWrap<B>,
    pub local: &'a dyn AttentionOp<B>,
}

impl<B: Backend> AttentionOp<B> for Wrapped<'_, B> {
    fn attend(&self, q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, _key_padding: KeyPadding<B>) -> Tensor<B, 4> {
        self.wrap.attend(self.local, q, k, v)
    }
}

/// The local attention kernels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AttentionKind {
    /// [`AttentionKind::Reference`] on backends with host kernels (burn-flex, see
    /// [`chitu_host::host_kernels`]), where it measured about 2x faster (BENCHMARKS.md);
    /// [`AttentionKind::Fused`] on every other backend while the `[B, H, Sq, Sk]` f32 scores
    /// fit in [`SCORE_BUDGET_BYTES`], and the blocked reference kernel beyond. burn's fused op
    /// falls back to materialising the whole score matrix for shapes its flash kernel refuses
    /// (and its CUDA autotuner times that fallback too): 51 GB for Wan2.1-1.3B at 480p.
    #[default]
    Auto,
    /// burn's attention op (a flash kernel on CUDA and on flex).
    Fused,
    /// Matmul, softmax, matmul over blocks of queries, so that the score matrix never exceeds
    /// [`SCORE_BUDGET_BYTES`] whatever the sequence length.
    Reference,
}

/// The most bytes of attention scores the reference kernel holds at once.
pub const SCORE_BUDGET_BYTES: usize = 256 << 20;

impl AttentionKind {
    /// The concrete kernel for backend `B` on a short sequence (the device does not change
    /// the choice); see [`AttentionKind::resolve_for`].
    pub fn resolve<B: Backend>(self, device: &B::Device) -> Self {
        self.resolve_for::<B>(device, 0)
    }

    /// The concrete kernel for backend `B` when the attention's f32 scores `[B, H, Sq, Sk]`
    /// take `score_bytes`.
    pub fn resolve_for<B: Backend>(self, _device: &B::Device, score_bytes: usize) -> Self {
        match self {
            Self::Auto if chitu_host::host_kernels::<B>() || score_bytes > SCORE_BUDGET_BYTES => Self::Reference,
            Self::Auto => Self::Fused,
            kind => kind,
        }
    }
}

/// Matmul-softmax-matmul on `[B, H, S, D]`, over as many query rows at a time as keep the scores
/// within `budget` bytes.
fn blocked_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    key_padding: Option<Tensor<B, 2, Bool>>,
    budget: usize,
) -> Tensor<B, 4> {
    let [b, h, sq, d] = q.dims();
    let sk = k.dims()[2];
    // Scaling q costs S*D multiplies; scaling the scores would cost S*S.
    let q = q.mul_scalar(1.0 / (d as f64).sqrt());
    let kt = k.transpose();
    let mask = key_padding.map(|m| m.reshape([b, 1, 1, sk]));
    let rows = (budget / (4 * b * h * sk).max(1)).clamp(1, sq);
    let blocks: Vec<Tensor<B, 4>> = (0..sq)
        .step_by(rows)
        .map(|start| {
            let n = rows.min(sq - start);
            let scores = q.clone().narrow(2, start, n).matmul(kt.clone());
            let scores = match &mask {
                Some(m) => scores.mask_fill(m.clone().expand([b, h, n, sk]), f32::NEG_INFINITY),
                None => scores,
            };
            softmax(scores, 3).matmul(v.clone())
        })
        .collect();
    Tensor::cat(blocks, 2)
}

impl<B: Backend> AttentionOp<B> for AttentionKind {
    fn attend(&self, q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, key_padding: KeyPadding<B>) -> Tensor<B, 4> {
        let ([b, sq, h, _], sk) = (q.dims(), k.dims()[1]);
        let score_bytes = [b, h, sq, sk, 4].iter().fold(1usize, |a, &n| a.saturating_mul(n));
        let kind = self.resolve_for::<B>(&q.device(), score_bytes);
        if kind == Self::Reference && [&q, &k, &v].iter().all(|t| chitu_host::is_host_f32(*t)) {
            // On the host the blocked kernel reads the heads in place, in blocks of query rows.
            return crate::host::attention(q, k, v, key_padding);
        }
        // Heads first for the kernels.
        let (q, k, v) = (q.swap_dims(1, 2), k.swap_dims(1, 2), v.swap_dims(1, 2));
        let out = match kind {
            Self::Reference => blocked_attention(q, k, v, key_padding, SCORE_BUDGET_BYTES),
            _ => {
                let mask = key_padding.map(|m| m.reshape([b, 1, 1, sk]).expand([b, h, sq, sk]));
                attention(q, k, v, mask, None, AttentionModuleOptions::default())
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

    #[test]
    fn score_blocks_give_the_unblocked_result() {
        let dev = Default::default();
        let r = |s| Tensor::<Flex, 4>::random(s, Distribution::Normal(0.0, 1.0), &dev);
        // Heads first, as the kernels take them.
        let (q, k, v) = (r([2, 3, 11, 8]), r([2, 3, 7, 8]), r([2, 3, 7, 8]));
        let pad =
            Tensor::<Flex, 2, Bool>::from_data([[false; 7], [false, false, false, false, false, true, true]], &dev);
        let one_block = blocked_attention(q.clone(), k.clone(), v.clone(), Some(pad.clone()), usize::MAX);
        // Room for 2 query rows of scores: 6 blocks, the last one short.
        let budget = 2 * 4 * 2 * 3 * 7;
        let blocks = blocked_attention(q, k, v, Some(pad), budget);
        one_block
            .into_data()
            .assert_approx_eq::<f32>(&blocks.into_data(), Tolerance::absolute(1e-6));
    }

    #[test]
    fn auto_never_gives_a_long_sequence_to_the_fused_op_elsewhere() {
        // Autodiff<Flex> has no host kernels: it stands for CUDA here.
        type Other = burn_autodiff::Autodiff<Flex>;
        let dev = Default::default();
        assert_eq!(
            AttentionKind::Auto.resolve_for::<Other>(&dev, 1 << 20),
            AttentionKind::Fused
        );
        let wan_480p = 12 * 32760 * 32760 * 4;
        assert_eq!(
            AttentionKind::Auto.resolve_for::<Other>(&dev, wan_480p),
            AttentionKind::Reference
        );
        // Asked for by name, the fused op is used whatever the length.
        assert_eq!(
            AttentionKind::Fused.resolve_for::<Other>(&dev, wan_480p),
            AttentionKind::Fused
        );
    }

    #[test]
    fn auto_is_the_reference_kernel_on_the_cpu_backend() {
        assert_eq!(
            AttentionKind::Auto.resolve::<Flex>(&Default::default()),
            AttentionKind::Reference
        );
        assert_eq!(
            AttentionKind::Fused.resolve::<Flex>(&Default::default()),
            AttentionKind::Fused
        );
    }
}
