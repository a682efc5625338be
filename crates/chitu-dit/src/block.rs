//! One Wan transformer block, with the hook points FlexCache policies act on.

use crate::attention::{AttentionOp, SelfAttentionWrap, Wrapped};
use crate::embed::RopeTables;
use crate::layers::{affine_layer_norm, linear, norm_modulate, FeedForward, WanAttention};
use crate::WanDitConfig;
use burn::module::{Module, Param};
use burn::nn::{Initializer, LayerNorm};
use burn::tensor::{backend::Backend, Tensor};
use std::sync::Arc;

/// The sub-layers of a block whose outputs a cache policy may reuse or forecast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockPart {
    /// The self-attention output, before its gate.
    SelfAttn,
    /// The cross-attention output.
    CrossAttn,
    /// The feed-forward output, before its gate.
    Ffn,
}

/// Decides, for each sub-layer of each block, whether to compute it or to supply a stored value.
///
/// `compute` runs the real sub-layer; a hook that returns without calling it skips that work.
pub trait BlockHook<B: Backend> {
    /// Produces the output of `part` in block `block`.
    fn part(&mut self, block: usize, part: BlockPart, compute: &mut dyn FnMut() -> Tensor<B, 3>) -> Tensor<B, 3> {
        let _ = (block, part);
        compute()
    }
}

/// The hook that always computes.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHook;

impl<B: Backend> BlockHook<B> for NoHook {}

/// What every block reads besides the token stream.
#[derive(Debug, Clone)]
pub struct BlockInputs<B: Backend> {
    /// The per-row modulation input `e0` (diffusers' `timestep_proj`), `[B, 6, dim]`.
    pub e0: Tensor<B, 3>,
    /// Projected text states, `[B, L, dim]`.
    pub context: Tensor<B, 3>,
    /// RoPE angles of the tokens this call holds.
    pub rope: RopeTables<B>,
    /// Set when the tokens are one rank's share of a sequence-parallel run: self-attention then
    /// goes through it (Ulysses all-to-alls around the local kernel).
    pub self_attention: Option<Arc<dyn SelfAttentionWrap<B>>>,
    /// Wan2.2 TI2V's per-token timesteps (`expand_timesteps`) with an image: the first `k` tokens
    /// this call holds (latent frame 0) and their own modulation input `[B, 6, dim]`.
    pub first: Option<(usize, Tensor<B, 3>)>,
}

/// `f(x, true)` on the first `k` tokens of `x` `[B, S, dim]` and `f(x, false)` on the others: how
/// the first latent frame's tokens get their own modulation without a per-token tensor of it.
pub(crate) fn split_tokens<B: Backend>(
    x: Tensor<B, 3>,
    k: usize,
    f: impl Fn(Tensor<B, 3>, bool) -> Tensor<B, 3>,
) -> Tensor<B, 3> {
    let s = x.dims()[1];
    match k {
        0 => f(x, false),
        k if k >= s => f(x, true),
        k => Tensor::cat(
            vec![f(x.clone().narrow(1, 0, k), true), f(x.narrow(1, k, s - k), false)],
            1,
        ),
    }
}

/// `x + y * gate(is_first)`, the first `k` tokens gated by `gate(true)`, the rest by
/// `gate(false)`; `x + y` where the gate is `None`. One parallel pass on CPU backends in f32.
fn gated_residual<B: Backend, G: Into<Option<Tensor<B, 3>>>>(
    x: Tensor<B, 3>,
    y: Tensor<B, 3>,
    k: usize,
    gate: impl Fn(bool) -> G,
) -> Tensor<B, 3> {
    if k == 0 && chitu_host::is_host_f32(&x) && chitu_host::is_host_f32(&y) {
        return chitu_host::rows::residual(x, y, gate(false).into());
    }
    x + split_tokens(y, k, |y, f| match gate(f).into() {
        Some(g) => y * g,
        None => y,
    })
}

/// A Wan transformer block (diffusers' `WanTransformerBlock`).
#[derive(Module, Debug)]
pub struct WanBlock<B: Backend> {
    /// Self-attention (`attn1`).
    pub attn1: WanAttention<B>,
    /// Cross-attention to the text (`attn2`).
    pub attn2: WanAttention<B>,
    /// Affine LayerNorm in front of cross-attention (Wan's own checkpoints call it `norm3`).
    pub norm2: Option<LayerNorm<B>>,
    /// The feed-forward (`ffn`).
    pub ffn: FeedForward<B>,
    /// `[1, 6, dim]`: shift, scale, gate of self-attention, then of the FFN.
    pub scale_shift_table: Param<Tensor<B, 3>>,
    /// Epsilon of the block's layer norms.
    pub eps: f64,
}

impl<B: Backend> WanBlock<B> {
    /// A block with random weights (loading replaces them).
    pub fn new(config: &WanDitConfig, device: &B::Device) -> Self {
        let dim = config.dim();
        let std = 1.0 / (dim as f64).sqrt();
        Self {
            attn1: WanAttention::new(dim, config.num_heads, config.qk_norm, config.eps, device),
            attn2: WanAttention::new(dim, config.num_heads, config.qk_norm, config.eps, device),
            norm2: config
                .cross_attn_norm
                .then(|| affine_layer_norm(dim, config.eps, device)),
            ffn: FeedForward {
                fc1: linear(dim, config.ffn_dim, device),
                fc2: linear(config.ffn_dim, dim, device),
            },
            scale_shift_table: Initializer::Normal { mean: 0.0, std }.init([1, 6, dim], device),
            eps: config.eps,
        }
    }

    /// Runs the block on tokens `x` `[B, S, dim]`; `index` is the block's position, for the hook.
    pub fn forward(
        &self,
        index: usize,
        x: Tensor<B, 3>,
        inputs: &BlockInputs<B>,
        attn: &dyn AttentionOp<B>,
        hook: &mut dyn BlockHook<B>,
    ) -> Tensor<B, 3> {
        let table = self.scale_shift_table.val();
        let mods = table.clone() + inputs.e0.clone();
        let first = inputs.first.as_ref().map(|(k, e0)| (*k, table + e0.clone()));
        let k = first.as_ref().map_or(0, |f| f.0);
        // Modulation `i` (shift, scale, gate; then the FFN's) of the first frame or the rest.
        let m = |i: usize, is_first: bool| match (&first, is_first) {
            (Some((_, f)), true) => f.clone().narrow(1, i, 1),
            _ => mods.clone().narrow(1, i, 1),
        };
        let eps = self.eps;

        let normed = split_tokens(x.clone(), k, |x, f| norm_modulate(x, m(0, f), m(1, f), eps));
        let sa = hook.part(index, BlockPart::SelfAttn, &mut || match &inputs.self_attention {
            Some(wrap) => {
                let wrapped = Wrapped {
                    wrap: wrap.as_ref(),
                    local: attn,
                };
                self.attn1.forward(normed.clone(), None, Some(&inputs.rope), &wrapped)
            }
            None => self.attn1.forward(normed.clone(), None, Some(&inputs.rope), attn),
        });
        let x = gated_residual(x, sa, k, |f| m(2, f));

        let normed = match &self.norm2 {
            Some(norm) => norm.forward(x.clone()),
            None => x.clone(),
        };
        let ca = hook.part(index, BlockPart::CrossAttn, &mut || {
            self.attn2
                .forward(normed.clone(), Some(inputs.context.clone()), None, attn)
        });
        let x = gated_residual(x, ca, 0, |_| None);

        let normed = split_tokens(x.clone(), k, |x, f| norm_modulate(x, m(3, f), m(4, f), eps));
        let ff = hook.part(index, BlockPart::Ffn, &mut || self.ffn.forward(normed.clone()));
        gated_residual(x, ff, k, |f| m(5, f))
    }
}
