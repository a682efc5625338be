//! Plain layer structs named after diffusers' checkpoint keys (the crate's canonical layout).

use crate::attention::AttentionOp;
use crate::embed::{patchify, RopeTables};
use burn::module::{Module, Param};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::{backend::Backend, Tensor, TensorData, TensorPrimitive};
use chitu_host::{is_host_f32, mixed};
use rayon::prelude::*;

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

/// GELU with the tanh approximation (PyTorch's `approximate="tanh"`), written as `x * sigmoid(2u)`
/// with `u = sqrt(2/pi) (x + 0.044715 x^3)`: the same function as `0.5 x (1 + tanh u)`, in about a
/// fifth of the time on burn-flex, whose `powf` and `tanh` are scalar (see BENCHMARKS.md).
/// On CPU backends in f32 it runs as one parallel, vectorised pass (burn-flex's elementwise ops
/// run on one thread, and this is six of them over the FFN's widest tensor).
pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if is_host_f32(&x) {
        return gelu_tanh_host(x);
    }
    gelu_tanh_tensor(x)
}

const TWO_SQRT_2_OVER_PI: f64 = 1.595_769_121_605_730_8;

fn gelu_tanh_tensor<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let u = (x.clone() * x.clone())
        .mul_scalar(TWO_SQRT_2_OVER_PI * 0.044715)
        .add_scalar(TWO_SQRT_2_OVER_PI)
        * x.clone();
    x * sigmoid(u)
}

/// The tensor form's f32 operations in its order, burn-flex's two-branch sigmoid included, with
/// [`chitu_host::exp`] (within 3 ulp of libm's, and vectorised) for its `exp`.
fn gelu_tanh_host<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let (shape, device) = (x.shape(), x.device());
    let mut v = x.into_data().into_vec::<f32>().expect("dtype checked by gelu_tanh");
    let (a, c) = ((TWO_SQRT_2_OVER_PI * 0.044715) as f32, TWO_SQRT_2_OVER_PI as f32);
    v.par_chunks_mut(1 << 14).for_each(|chunk| {
        for x in chunk {
            let u = (*x * *x * a + c) * *x;
            let e = chitu_host::exp(-u.abs());
            let s = if u >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
            *x *= s;
        }
    });
    Tensor::from_data(TensorData::new(v, shape), &device)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn_flex::Flex;

    #[test]
    fn host_gelu_gives_the_tensor_form() {
        let dev = Default::default();
        // Wide enough to reach both sigmoid branches and saturation.
        let x = Tensor::<Flex, 2>::random([37, 1000], Distribution::Normal(0.0, 4.0), &dev);
        let host = gelu_tanh(x.clone());
        // The host `exp` is within 3 ulp of libm's.
        host.to_data().assert_approx_eq::<f32>(
            &gelu_tanh_tensor(x.clone()).to_data(),
            burn::tensor::Tolerance::rel_abs(1e-6, 1e-6),
        );
        let v: Vec<f32> = host.into_data().to_vec().unwrap();
        let x: Vec<f32> = x.into_data().to_vec().unwrap();
        // GELU is close to x for large x and to 0 for very negative x.
        assert!(x.iter().zip(&v).all(|(x, g)| *x < 8.0 || (g - x).abs() < 1e-3));
        assert!(x.iter().zip(&v).all(|(x, g)| *x > -8.0 || g.abs() < 1e-3));
    }
}
