//! Plain layer structs named after diffusers' checkpoint keys (the crate's canonical layout).

use crate::attention::AttentionOp;
use crate::embed::{patchify, RopeTables};
use burn::module::{Module, Param};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::activation::silu;
use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};
use chitu_host::{is_host_f32, mixed};

/// LayerNorm over the last axis without affine parameters, in float32 (diffusers' `FP32LayerNorm`
/// with `elementwise_affine=False`).
pub fn layer_norm<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    let dim = x.dims()[D - 1];
    let gamma = Tensor::<B, 1>::ones([dim], &x.device());
    Tensor::from_primitive(TensorPrimitive::Float(B::layer_norm(
        x.into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        None,
        eps,
    )))
}

pub use chitu_host::gelu::gelu_tanh;

/// Adaptive modulation `x * (1 + scale) + shift`.
pub fn modulate<B: Backend>(x: Tensor<B, 3>, shift: Tensor<B, 3>, scale: Tensor<B, 3>) -> Tensor<B, 3> {
    x * (scale + 1.0) + shift
}

/// `modulate(layer_norm(x, eps), shift, scale)`: one parallel pass on CPU backends in f32.
pub fn norm_modulate<B: Backend>(x: Tensor<B, 3>, shift: Tensor<B, 3>, scale: Tensor<B, 3>, eps: f64) -> Tensor<B, 3> {
    if is_host_f32(&x) {
        return crate::host::norm_modulate(x, shift, scale, eps);
    }
    modulate(layer_norm(x, eps), shift, scale)
}

pub(crate) fn linear<B: Backend>(d_in: usize, d_out: usize, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d_in, d_out).init(device)
}

/// The patch embedding: a Conv3d with kernel = stride = patch size, computed as patchify + matmul.
#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    /// `[dim, C, pt, ph, pw]`, PyTorch's Conv3d layout.
    pub weight: Param<Tensor<B, 5>>,
    pub bias: Param<Tensor<B, 1>>,
}

impl<B: Backend> PatchEmbed<B> {
    pub fn new(in_channels: usize, dim: usize, patch: [usize; 3], device: &B::Device) -> Self {
        let fan_in = in_channels * patch.iter().product::<usize>();
        let bound = 1.0 / (fan_in as f64).sqrt();
        let init = Initializer::Uniform {
            min: -bound,
            max: bound,
        };
        Self {
            weight: init.init([dim, in_channels, patch[0], patch[1], patch[2]], device),
            bias: init.init([dim], device),
        }
    }

    /// `[B, C, F, H, W]` to tokens `[B, S, dim]`.
    pub fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 3> {
        let [dim, c, pt, ph, pw] = self.weight.dims();
        let tokens = patchify(x, [pt, ph, pw]);
        let w = mixed::like(self.weight.val(), &tokens)
            .reshape([dim, c * pt * ph * pw])
            .transpose();
        tokens.matmul(w.unsqueeze()) + self.bias.val().unsqueeze()
    }
}

/// diffusers' `TimestepEmbedding`: Linear, SiLU, Linear.
#[derive(Module, Debug)]
pub struct TimestepEmbedding<B: Backend> {
    pub linear_1: Linear<B>,
    pub linear_2: Linear<B>,
}

impl<B: Backend> TimestepEmbedding<B> {
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        mixed::linear(&self.linear_2, silu(mixed::linear(&self.linear_1, x)))
    }
}

/// diffusers' `PixArtAlphaTextProjection` with GELU-tanh: Linear, GELU(tanh), Linear.
#[derive(Module, Debug)]
pub struct TextProjection<B: Backend> {
    pub linear_1: Linear<B>,
    pub linear_2: Linear<B>,
}

impl<B: Backend> TextProjection<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        mixed::linear(&self.linear_2, gelu_tanh(mixed::linear(&self.linear_1, x)))
    }
}

/// Timestep and text conditioning (`condition_embedder.*`).
#[derive(Module, Debug)]
pub struct ConditionEmbedder<B: Backend> {
    pub time_embedder: TimestepEmbedding<B>,
    /// Projects SiLU(temb) to the six modulation vectors of every block.
    pub time_proj: Linear<B>,
    pub text_embedder: TextProjection<B>,
}

/// The feed-forward network: Linear, GELU(tanh), Linear (`ffn.net.0.proj`, `ffn.net.2`).
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        mixed::linear(&self.fc2, gelu_tanh(mixed::linear(&self.fc1, x)))
    }
}

/// Self- or cross-attention with RMSNorm across heads on q and k (`attn1`, `attn2`).
#[derive(Module, Debug)]
pub struct WanAttention<B: Backend> {
    pub to_q: Linear<B>,
    pub to_k: Linear<B>,
    pub to_v: Linear<B>,
    /// diffusers keeps the output projection at index 0 of a list (`to_out.0`).
    pub to_out: Vec<Linear<B>>,
    pub norm_q: Option<RmsNorm<B>>,
    pub norm_k: Option<RmsNorm<B>>,
    pub num_heads: usize,
}

impl<B: Backend> WanAttention<B> {
    pub fn new(dim: usize, num_heads: usize, qk_norm: bool, eps: f64, device: &B::Device) -> Self {
        let norm = || qk_norm.then(|| RmsNormConfig::new(dim).with_epsilon(eps).init(device));
        Self {
            to_q: linear(dim, dim, device),
            to_k: linear(dim, dim, device),
            to_v: linear(dim, dim, device),
            to_out: vec![linear(dim, dim, device)],
            norm_q: norm(),
            norm_k: norm(),
            num_heads,
        }
    }

    /// Attends from `x` `[B, S, dim]` to `context` (itself for self-attention), rotating q and k
    /// with `rope` when given.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        context: Option<Tensor<B, 3>>,
        rope: Option<&RopeTables<B>>,
        attn: &dyn AttentionOp<B>,
    ) -> Tensor<B, 3> {
        let context = context.unwrap_or_else(|| x.clone());
        if is_host_f32(&x) && is_host_f32(&context) {
            return self.forward_host(x, context, rope, attn);
        }
        let norm = |n: &Option<RmsNorm<B>>, t: Tensor<B, 3>| match n {
            Some(n) => n.forward(t),
            None => t,
        };
        let q = norm(&self.norm_q, mixed::linear(&self.to_q, x));
        let k = norm(&self.norm_k, mixed::linear(&self.to_k, context.clone()));
        let v = mixed::linear(&self.to_v, context);
        let heads = |t: Tensor<B, 3>| {
            let [b, s, d] = t.dims();
            t.reshape([b, s, self.num_heads, d / self.num_heads])
        };
        let (mut q, mut k, v) = (heads(q), heads(k), heads(v));
        if let Some(rope) = rope {
            q = rope.apply(q);
            k = rope.apply(k);
        }
        let out = attn.attend(q, k, v, None);
        let [b, s, h, d] = out.dims();
        mixed::linear(&self.to_out[0], out.reshape([b, s, h * d]))
    }
}

impl<B: Backend> WanAttention<B> {
    /// [`WanAttention::forward`] on CPU backends in f32: each of q and k's RMS norm and rotation
    /// is one parallel pass, and the heads stay where the projections put them.
    fn forward_host(
        &self,
        x: Tensor<B, 3>,
        context: Tensor<B, 3>,
        rope: Option<&RopeTables<B>>,
        attn: &dyn AttentionOp<B>,
    ) -> Tensor<B, 3> {
        let heads = self.num_heads;
        let tables = || rope.map(|r| (r.cos.clone(), r.sin.clone()));
        let norm_rope = |n: &Option<RmsNorm<B>>, t: Tensor<B, 3>, rope| {
            let (gamma, eps) = match n {
                Some(n) => (Some(n.gamma.val()), n.epsilon),
                None => (None, 0.0),
            };
            crate::host::rms_rope(t, gamma, eps, heads, rope)
        };
        let q = norm_rope(&self.norm_q, mixed::linear(&self.to_q, x), tables());
        let k = norm_rope(&self.norm_k, mixed::linear(&self.to_k, context.clone()), tables());
        let v = mixed::linear(&self.to_v, context);
        let [b, s, d] = v.dims();
        let out = attn.attend(q, k, v.reshape([b, s, heads, d / heads]), None);
        let [b, s, h, d] = out.dims();
        mixed::linear(&self.to_out[0], out.reshape([b, s, h * d]))
    }
}

/// An affine LayerNorm (diffusers' `FP32LayerNorm(elementwise_affine=True)`), for `norm2`.
pub(crate) fn affine_layer_norm<B: Backend>(dim: usize, eps: f64, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(dim).with_epsilon(eps).init(device)
}
