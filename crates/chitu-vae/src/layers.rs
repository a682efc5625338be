//! VAE building blocks named after diffusers' keys, and the causal feature cache.

use crate::conv::{causal_conv_host, conv2d_s, conv3d_t, Prologue};
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::{AttentionModuleOptions, PadMode};
use burn::tensor::{backend::Backend, Tensor};
// Weights are widened to their input's dtype at each use, so a weight held in bf16 meets the
// same kernels as an f32 one.
use chitu_host::{is_host_f32, mixed};

/// Frames of a causal conv's input kept between chunks.
pub const CACHE_T: usize = 2;

/// One slot of the feature cache: what a causal conv (or an upsampler) saw last chunk.
#[derive(Debug, Clone)]
pub enum Slot<B: Backend> {
    /// Not visited yet.
    Empty,
    /// An upsampler that has seen its first chunk, which it passes through unchanged.
    Repeat,
    /// The last frames of the input.
    Frames(Tensor<B, 5>),
}

/// The feature cache threaded through one chunked encode or decode.
#[derive(Debug, Clone)]
pub struct FeatCache<B: Backend> {
    slots: Vec<Slot<B>>,
    next: usize,
    last: bool,
    chunks: usize,
}

impl<B: Backend> FeatCache<B> {
    /// An empty cache.
    pub fn new() -> Self {
        Self {
            slots: Vec::new(),
            next: 0,
            last: false,
            chunks: 0,
        }
    }

    /// Whether the chunk being run is the first (Wan2.2's upsampling shortcuts drop frames there).
    pub fn is_first_chunk(&self) -> bool {
        self.chunks == 1
    }

    /// Starts a chunk: slots are visited again from the first. The convs of the `last` chunk
    /// keep no frames, as no chunk follows to read them (at the top of a decode those are tens
    /// of MB per conv).
    pub fn start_chunk(&mut self, last: bool) {
        self.next = 0;
        self.last = last;
        self.chunks += 1;
    }

    /// Takes the next slot's index, growing the cache on the first chunk.
    fn claim(&mut self) -> usize {
        if self.next == self.slots.len() {
            self.slots.push(Slot::Empty);
        }
        self.next += 1;
        self.next - 1
    }
}

impl<B: Backend> Default for FeatCache<B> {
    fn default() -> Self {
        Self::new()
    }
}

/// The last `n` frames (fewer if the input is shorter).
fn last_frames<B: Backend>(x: &Tensor<B, 5>, n: usize) -> Tensor<B, 5> {
    let t = x.dims()[2];
    x.clone().narrow(2, t - n.min(t), n.min(t))
}

/// A Conv3d whose time axis is causal: padded on the left only (with cached frames when given),
/// space padded symmetrically.
#[derive(Module, Debug)]
pub struct CausalConv3d<B: Backend> {
    /// `[out, in, kt, kh, kw]`.
    pub weight: Param<Tensor<B, 5>>,
    /// Bias `[out]`.
    pub bias: Param<Tensor<B, 1>>,
    /// Spatial stride.
    pub stride: usize,
    /// Causal padding in time (all before the first frame).
    pub pad_t: usize,
    /// Spatial padding on each side.
    pub pad_s: usize,
}

impl<B: Backend> CausalConv3d<B> {
    /// `kernel` is (kt, ks, ks); `padding` (pt, ps) as given to diffusers (time is padded by 2*pt on the left).
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: [usize; 3],
        stride: usize,
        padding: [usize; 2],
        device: &B::Device,
    ) -> Self {
        let fan_in = c_in * kernel.iter().product::<usize>();
        let bound = 1.0 / (fan_in as f64).sqrt();
        let init = Initializer::Uniform {
            min: -bound,
            max: bound,
        };
        Self {
            weight: init.init([c_out, c_in, kernel[0], kernel[1], kernel[2]], device),
            bias: init.init([c_out], device),
            stride,
            pad_t: 2 * padding[0],
            pad_s: padding[1],
        }
    }

    /// Runs the conv, prepending `cache` frames in place of (some of) the left zero padding.
    pub fn forward(&self, x: Tensor<B, 5>, cache: Option<&Tensor<B, 5>>) -> Tensor<B, 5> {
        if is_host_f32(&x) {
            return self.forward_host(x, cache.cloned(), Prologue::Copy, 0).0;
        }
        let mut x = x;
        let mut pad_t = self.pad_t;
        if let (Some(c), true) = (cache, self.pad_t > 0) {
            pad_t -= c.dims()[2].min(pad_t);
            x = Tensor::cat(vec![c.clone(), x], 2);
        }
        if pad_t > 0 {
            x = x.pad([(pad_t, 0), (0, 0), (0, 0)], PadMode::Constant(0.0));
        }
        let w = mixed::like(self.weight.val(), &x);
        conv3d_t(x, w, self.bias.val(), self.stride, self.pad_s)
    }

    /// [`Self::forward`] on the host kernel, with `prologue` applied to `x` and the last `keep`
    /// frames of the conv's input returned beside the output.
    fn forward_host(
        &self,
        x: Tensor<B, 5>,
        cache: Option<Tensor<B, 5>>,
        prologue: Prologue,
        keep: usize,
    ) -> (Tensor<B, 5>, Option<Tensor<B, 5>>) {
        let prev = cache.filter(|_| self.pad_t > 0);
        let zero_t = self.pad_t - prev.as_ref().map_or(0, |c| c.dims()[2].min(self.pad_t));
        let (w, b) = (mixed::like(self.weight.val(), &x), self.bias.val());
        causal_conv_host(x, prev, zero_t, self.pad_s, prologue, w, b, self.stride, keep)
    }

    /// The chunked call every cached conv makes: use and refresh this conv's cache slot.
    pub fn forward_cached(&self, x: Tensor<B, 5>, cache: &mut FeatCache<B>) -> Tensor<B, 5> {
        self.cached(x, None, cache)
    }

    /// `forward_cached(silu(norm.forward(x)))`; on CPU backends the norm and SiLU are fused into
    /// the conv's input copy, which saves five full-size temporaries.
    pub fn forward_norm_silu_cached(
        &self,
        x: Tensor<B, 5>,
        norm: &RmsNorm<B, 4>,
        cache: &mut FeatCache<B>,
    ) -> Tensor<B, 5> {
        self.cached(x, Some(norm), cache)
    }

    fn cached(&self, x: Tensor<B, 5>, norm: Option<&RmsNorm<B, 4>>, cache: &mut FeatCache<B>) -> Tensor<B, 5> {
        let idx = cache.claim();
        if is_host_f32(&x) && self.pad_t >= CACHE_T {
            // Taken, not cloned, so that the host conv can reuse the frames' buffer.
            let prev = match std::mem::replace(&mut cache.slots[idx], Slot::Empty) {
                Slot::Frames(t) => Some(t),
                _ => None,
            };
            // The cache keeps the last CACHE_T frames of the conv's input (after the norm), which
            // are the last frames of the padded input that are not zero padding.
            let prev_t = prev.as_ref().map_or(0, |p| p.dims()[2].min(self.pad_t));
            let keep = if cache.last {
                0
            } else {
                (prev_t + x.dims()[2]).min(CACHE_T)
            };
            let gamma = norm.map(|n| n.scaled_gamma().into_data());
            let prologue = match &gamma {
                Some(g) => Prologue::NormSilu(g.as_slice::<f32>().expect("f32 gamma on the host path")),
                None => Prologue::Copy,
            };
            let (out, kept) = self.forward_host(x, prev, prologue, keep);
            cache.slots[idx] = kept.map_or(Slot::Empty, Slot::Frames);
            return out;
        }
        let prev = match &cache.slots[idx] {
            Slot::Frames(t) => Some(t.clone()),
            _ => None,
        };
        let x = match norm {
            Some(n) => silu(n.forward(x)),
            None => x,
        };
        let mut keep = last_frames(&x, CACHE_T);
        if keep.dims()[2] < CACHE_T {
            if let Some(p) = &prev {
                keep = Tensor::cat(vec![last_frames(p, 1), keep], 2);
            }
        }
        let out = self.forward(x, prev.as_ref());
        cache.slots[idx] = if cache.last { Slot::Empty } else { Slot::Frames(keep) };
        out
    }
}

/// Wan's channel RMS norm: L2-normalise over channels, times `sqrt(C)` and a learned gamma.
/// `D` is the rank of gamma as stored: 4 (`[C,1,1,1]`, video) or 3 (`[C,1,1]`, images).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend, const D: usize> {
    /// Per-channel scale (`gamma`).
    pub gamma: Param<Tensor<B, D>>,
}

impl<B: Backend, const D: usize> RmsNorm<B, D> {
    /// A layer for `dim` channels with random weights (loading replaces them).
    pub fn new(dim: usize, device: &B::Device) -> Self {
        let mut shape = [1usize; D];
        shape[0] = dim;
        Self {
            gamma: Initializer::Ones.init(shape, device),
        }
    }

    /// Gamma times `sqrt(C)`, as a `[C]` vector.
    pub(crate) fn scaled_gamma(&self) -> Tensor<B, 1> {
        let c = self.gamma.dims()[0];
        self.gamma.val().reshape([c]) * (c as f64).sqrt()
    }

    /// Normalises `x` over axis 1 (channels).
    pub fn forward<const R: usize>(&self, x: Tensor<B, R>) -> Tensor<B, R> {
        let dims = x.dims();
        let (b, c) = (dims[0], dims[1]);
        let n = dims[2..].iter().product();
        // As [B, C, N]: burn-flex broadcasts `[B, 1, N]` over C quickly, but takes a strided path
        // 16x slower for the same broadcast on the 5-D shape (BENCHMARKS.md).
        let x: Tensor<B, 3> = x.reshape([b, c, n]);
        let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
        let gamma = self.scaled_gamma().reshape([1, c, 1]);
        (x / norm * gamma).reshape(dims)
    }
}

/// Residual block: RMS norm, SiLU, causal conv, twice, plus a 1x1x1 shortcut when widths differ.
#[derive(Module, Debug)]
pub struct ResidualBlock<B: Backend> {
    /// Norm before the first conv.
    pub norm1: RmsNorm<B, 4>,
    /// First 3x3x3 conv.
    pub conv1: CausalConv3d<B>,
    /// Norm before the second conv.
    pub norm2: RmsNorm<B, 4>,
    /// Second 3x3x3 conv.
    pub conv2: CausalConv3d<B>,
    /// 1x1x1 conv on the skip path when the width changes.
    pub conv_shortcut: Option<CausalConv3d<B>>,
}

impl<B: Backend> ResidualBlock<B> {
    /// A block from `c_in` to `c_out` channels with random weights.
    pub fn new(c_in: usize, c_out: usize, device: &B::Device) -> Self {
        Self {
            norm1: RmsNorm::new(c_in, device),
            conv1: CausalConv3d::new(c_in, c_out, [3, 3, 3], 1, [1, 1], device),
            norm2: RmsNorm::new(c_out, device),
            conv2: CausalConv3d::new(c_out, c_out, [3, 3, 3], 1, [1, 1], device),
            conv_shortcut: (c_in != c_out).then(|| CausalConv3d::new(c_in, c_out, [1, 1, 1], 1, [0, 0], device)),
        }
    }

    /// Runs the layer on one chunk, reading and updating the causal frame cache.
    pub fn forward(&self, x: Tensor<B, 5>, cache: &mut FeatCache<B>) -> Tensor<B, 5> {
        let h = match &self.conv_shortcut {
            Some(c) => c.forward(x.clone(), None),
            None => x.clone(),
        };
        let x = self.conv1.forward_norm_silu_cached(x, &self.norm1, cache);
        let x = self.conv2.forward_norm_silu_cached(x, &self.norm2, cache);
        x + h
    }
}

/// A 1x1 Conv2d (`[out, in, 1, 1]`), applied as a matmul over channels.
#[derive(Module, Debug)]
pub struct PointConv<B: Backend> {
    /// Weight `[out, in, 1, 1]`.
    pub weight: Param<Tensor<B, 4>>,
    /// Bias `[out]`.
    pub bias: Param<Tensor<B, 1>>,
}

impl<B: Backend> PointConv<B> {
    fn new(c_in: usize, c_out: usize, device: &B::Device) -> Self {
        let bound = 1.0 / (c_in as f64).sqrt();
        let init = Initializer::Uniform {
            min: -bound,
            max: bound,
        };
        Self {
            weight: init.init([c_out, c_in, 1, 1], device),
            bias: init.init([c_out], device),
        }
    }

    /// `[N, S, in]` tokens to `[N, S, out]`.
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [c_out, c_in, _, _] = self.weight.dims();
        let w: Tensor<B, 2> = mixed::like(self.weight.val(), &x).reshape([c_out, c_in]);
        x.matmul(w.transpose().unsqueeze()) + self.bias.val().unsqueeze()
    }
}

/// Single-head self-attention over the pixels of each frame.
#[derive(Module, Debug)]
pub struct AttentionBlock<B: Backend> {
    /// Norm before the projections.
    pub norm: RmsNorm<B, 3>,
    /// The joint query/key/value projection.
    pub to_qkv: PointConv<B>,
    /// The output projection.
    pub proj: PointConv<B>,
}

impl<B: Backend> AttentionBlock<B> {
    /// A layer for `dim` channels with random weights (loading replaces them).
    pub fn new(dim: usize, device: &B::Device) -> Self {
        Self {
            norm: RmsNorm::new(dim, device),
            to_qkv: PointConv::new(dim, 3 * dim, device),
            proj: PointConv::new(dim, dim, device),
        }
    }

    /// Attends over each frame's pixels, `[B, C, T, H, W]` in and out.
    pub fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        let [b, c, t, h, w] = x.dims();
        let frames: Tensor<B, 4> = x.clone().swap_dims(1, 2).reshape([b * t, c, h, w]);
        let tokens: Tensor<B, 3> = self.norm.forward(frames).reshape([b * t, c, h * w]).swap_dims(1, 2);
        let qkv = self.to_qkv.forward(tokens);
        let part = |i: usize| qkv.clone().narrow(2, i * c, c).unsqueeze_dim::<4>(1);
        let out = attention(part(0), part(1), part(2), None, None, AttentionModuleOptions::default());
        let out = self.proj.forward(out.squeeze_dim(1));
        let out: Tensor<B, 5> = out.swap_dims(1, 2).reshape([b, t, c, h, w]).swap_dims(1, 2);
        out + x
    }
}

/// A 3x3 Conv2d applied to every frame.
#[derive(Module, Debug)]
pub struct FrameConv<B: Backend> {
    /// Weight `[out, in, 1, 1]`.
    pub weight: Param<Tensor<B, 4>>,
    /// Bias `[out]`.
    pub bias: Param<Tensor<B, 1>>,
}

impl<B: Backend> FrameConv<B> {
    fn new(c_in: usize, c_out: usize, device: &B::Device) -> Self {
        let bound = 1.0 / ((c_in * 9) as f64).sqrt();
        let init = Initializer::Uniform {
            min: -bound,
            max: bound,
        };
        Self {
            weight: init.init([c_out, c_in, 3, 3], device),
            bias: init.init([c_out], device),
        }
    }
}

/// How a [`Resample`] changes the resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResampleMode {
    /// 2x spatial up-sampling.
    Upsample2d,
    /// 2x spatial and 2x temporal up-sampling.
    Upsample3d,
    /// 2x spatial down-sampling.
    Downsample2d,
    /// 2x spatial and 2x temporal down-sampling.
    Downsample3d,
}

/// Spatial (and optionally temporal) up- or down-sampling (diffusers' `WanResample`).
#[derive(Module, Debug)]
pub struct Resample<B: Backend> {
    /// The per-frame conv (`resample.1` in diffusers' keys).
    pub resample: FrameConv<B>,
    /// The temporal conv of the 3D modes.
    pub time_conv: Option<CausalConv3d<B>>,
    /// 0 up2d, 1 up3d, 2 down2d, 3 down3d.
    pub mode: usize,
}

impl<B: Backend> Resample<B> {
    /// A layer for `dim` channels in `mode`, with random weights; upsamplers halve the width.
    pub fn new(dim: usize, mode: ResampleMode, device: &B::Device) -> Self {
        Self::with_up_width(dim, dim / 2, mode, device)
    }

    /// [`Resample::new`] with upsamplers giving `up_out` channels (Wan2.2 keeps the width).
    pub fn with_up_width(dim: usize, up_out: usize, mode: ResampleMode, device: &B::Device) -> Self {
        let (conv, time_conv, code) = match mode {
            ResampleMode::Upsample2d => (FrameConv::new(dim, up_out, device), None, 0),
            ResampleMode::Upsample3d => (
                FrameConv::new(dim, up_out, device),
                Some(CausalConv3d::new(dim, dim * 2, [3, 1, 1], 1, [1, 0], device)),
                1,
            ),
            ResampleMode::Downsample2d => (FrameConv::new(dim, dim, device), None, 2),
            ResampleMode::Downsample3d => (
                FrameConv::new(dim, dim, device),
                Some(CausalConv3d::new(dim, dim, [3, 1, 1], 2, [0, 0], device)),
                3,
            ),
        };
        Self {
            resample: conv,
            time_conv,
            mode: code,
        }
    }

    /// Runs the layer on one chunk, reading and updating the causal frame cache.
    pub fn forward(&self, x: Tensor<B, 5>, cache: &mut FeatCache<B>) -> Tensor<B, 5> {
        let mut x = x;
        if self.mode == 1 {
            x = self.time_upsample(x, cache);
        }
        let weight = mixed::like(self.resample.weight.val(), &x);
        if self.mode <= 1 && is_host_f32(&x) {
            // Upsampling fused into the conv's input copy, and the per-frame conv as a 1x3x3
            // conv over [b, c, t, h, w]: neither the 4x larger upsampled tensor nor the
            // frame-major copies exist.
            let (w, b) = (weight.unsqueeze_dim(2), self.resample.bias.val());
            return causal_conv_host(x, None, 0, 1, Prologue::Upsample2x, w, b, 1, 0).0;
        }
        let [b, c, t, h, w] = x.dims();
        let frames: Tensor<B, 4> = x.swap_dims(1, 2).reshape([b * t, c, h, w]);
        let frames = if self.mode <= 1 {
            // Nearest x2 ("nearest-exact" with an integer factor): every pixel becomes a 2x2 block.
            let up: Tensor<B, 6> = frames.reshape([b * t, c, h, 1, w, 1]);
            let up = up.expand([b * t, c, h, 2, w, 2]).reshape([b * t, c, 2 * h, 2 * w]);
            conv2d_s(up, weight, self.resample.bias.val(), 1, 1)
        } else {
            let padded = frames.pad((0, 1, 0, 1), PadMode::Constant(0.0));
            conv2d_s(padded, weight, self.resample.bias.val(), 2, 0)
        };
        let [_, c2, h2, w2] = frames.dims();
        let mut x: Tensor<B, 5> = frames.reshape([b, t, c2, h2, w2]).swap_dims(1, 2);
        if self.mode == 3 {
            x = self.time_downsample(x, cache);
        }
        x
    }

    /// Doubles the frame count from the second chunk on (the first latent frame stays one frame).
    fn time_upsample(&self, x: Tensor<B, 5>, cache: &mut FeatCache<B>) -> Tensor<B, 5> {
        let conv = self.time_conv.as_ref().expect("upsample3d has a time conv");
        let idx = cache.claim();
        let prev = std::mem::replace(&mut cache.slots[idx], Slot::Empty);
        let [b, c, t, h, w] = x.dims();
        let (out, keep) = match prev {
            Slot::Empty => {
                cache.slots[idx] = Slot::Repeat;
                return x;
            }
            Slot::Repeat => {
                let mut keep = last_frames(&x, CACHE_T);
                if keep.dims()[2] < CACHE_T {
                    keep = Tensor::cat(vec![keep.zeros_like(), keep], 2);
                }
                (conv.forward(x, None), keep)
            }
            Slot::Frames(p) => {
                let mut keep = last_frames(&x, CACHE_T);
                if keep.dims()[2] < CACHE_T {
                    keep = Tensor::cat(vec![last_frames(&p, 1), keep], 2);
                }
                (conv.forward(x, Some(&p)), keep)
            }
        };
        cache.slots[idx] = Slot::Frames(keep);
        // [b, 2c, t, h, w] -> interleave the two halves along time: [b, c, 2t, h, w].
        let out: Tensor<B, 6> = out.reshape([b, 2, c, t, h, w]);
        out.permute([0, 2, 3, 1, 4, 5]).reshape([b, c, 2 * t, h, w])
    }

    /// Halves the frame count from the second chunk on, using the previous chunk's last frame.
    fn time_downsample(&self, x: Tensor<B, 5>, cache: &mut FeatCache<B>) -> Tensor<B, 5> {
        let conv = self.time_conv.as_ref().expect("downsample3d has a time conv");
        let idx = cache.claim();
        match std::mem::replace(&mut cache.slots[idx], Slot::Empty) {
            Slot::Frames(p) => {
                let keep = last_frames(&x, 1);
                let out = conv.forward(Tensor::cat(vec![last_frames(&p, 1), x], 2), None);
                cache.slots[idx] = Slot::Frames(keep);
                out
            }
            _ => {
                cache.slots[idx] = Slot::Frames(x.clone());
                x
            }
        }
    }
}

/// diffusers' `WanMidBlock`: residual, attention, residual.
#[derive(Module, Debug)]
pub struct MidBlock<B: Backend> {
    /// The attention between the two residual blocks.
    pub attentions: Vec<AttentionBlock<B>>,
    /// The two residual blocks.
    pub resnets: Vec<ResidualBlock<B>>,
}

impl<B: Backend> MidBlock<B> {
    /// A layer for `dim` channels with random weights (loading replaces them).
    pub fn new(dim: usize, device: &B::Device) -> Self {
        Self {
            attentions: vec![AttentionBlock::new(dim, device)],
            resnets: vec![
                ResidualBlock::new(dim, dim, device),
                ResidualBlock::new(dim, dim, device),
            ],
        }
    }

    /// Runs the layer on one chunk, reading and updating the causal frame cache.
    pub fn forward(&self, x: Tensor<B, 5>, cache: &mut FeatCache<B>) -> Tensor<B, 5> {
        let mut x = self.resnets[0].forward(x, cache);
        for (attn, res) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = res.forward(attn.forward(x), cache);
        }
        x
    }
}
