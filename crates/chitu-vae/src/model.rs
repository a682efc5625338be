//! The Wan VAE: 3D causal encoder and decoder run chunk by chunk with a feature cache.

use crate::layers::{
    AttentionBlock, CausalConv3d, FeatCache, MidBlock, Resample, ResampleMode, ResidualBlock, RmsNorm,
};
use crate::residual::{dup_up, patchify, unpatchify, ResidualDownBlock};
use crate::{scratch, VaeError, WanVaeConfig};
use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

/// One entry of the encoder's flat layer list (`encoder.down_blocks.N`).
// Built once per model, a dozen entries: the unequal variant sizes cost a few KiB, and burn's
// derive needs the modules inline.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum DownLayer<B: Backend> {
    /// A residual block.
    Residual(ResidualBlock<B>),
    /// A spatial self-attention block.
    Attention(AttentionBlock<B>),
    /// A down-sampling layer.
    Resample(Resample<B>),
    /// A whole Wan2.2 stage: residual blocks and downsampler with their shortcut.
    Stage(ResidualDownBlock<B>),
}

/// The 3D encoder (diffusers' `WanEncoder3d`).
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    /// The input conv (`conv_in`).
    pub conv_in: CausalConv3d<B>,
    /// The down path, flattened as diffusers stores it (`down_blocks.N`).
    pub down_blocks: Vec<DownLayer<B>>,
    /// The middle block (`mid_block`).
    pub mid_block: MidBlock<B>,
    /// The output norm (`norm_out`).
    pub norm_out: RmsNorm<B, 4>,
    /// The output conv (`conv_out`).
    pub conv_out: CausalConv3d<B>,
}

impl<B: Backend> Encoder<B> {
    fn new(c: &WanVaeConfig, device: &B::Device) -> Self {
        let dims: Vec<usize> = std::iter::once(1)
            .chain(c.dim_mult.iter().copied())
            .map(|m| m * c.base_dim)
            .collect();
        let mut layers = Vec::new();
        let mut scale = 1.0;
        let last = c.dim_mult.len() - 1;
        for i in (0..c.dim_mult.len()).filter(|_| c.is_residual) {
            let (d_in, d_out) = (dims[i], dims[i + 1]);
            let temporal = i != last && c.temperal_downsample[i];
            let resnets = (0..c.num_res_blocks)
                .map(|j| ResidualBlock::new(if j == 0 { d_in } else { d_out }, d_out, device))
                .collect();
            let downsampler = (i != last).then(|| {
                let mode = if temporal {
                    ResampleMode::Downsample3d
                } else {
                    ResampleMode::Downsample2d
                };
                Resample::new(d_out, mode, device)
            });
            layers.push(DownLayer::Stage(ResidualDownBlock {
                resnets,
                downsampler,
                shortcut_t: if temporal { 2 } else { 1 },
                shortcut_s: if i != last { 2 } else { 1 },
            }));
        }
        for i in (0..c.dim_mult.len()).filter(|_| !c.is_residual) {
            let (mut d_in, d_out) = (dims[i], dims[i + 1]);
            for _ in 0..c.num_res_blocks {
                layers.push(DownLayer::Residual(ResidualBlock::new(d_in, d_out, device)));
                if c.attn_scales.contains(&scale) {
                    layers.push(DownLayer::Attention(AttentionBlock::new(d_out, device)));
                }
                d_in = d_out;
            }
            if i != last {
                let mode = if c.temperal_downsample[i] {
                    ResampleMode::Downsample3d
                } else {
                    ResampleMode::Downsample2d
                };
                layers.push(DownLayer::Resample(Resample::new(d_out, mode, device)));
                scale /= 2.0;
            }
        }
        let top = dims[dims.len() - 1];
        Self {
            conv_in: CausalConv3d::new(c.in_channels, dims[0], [3, 3, 3], 1, [1, 1], device),
            down_blocks: layers,
            mid_block: MidBlock::new(top, device),
            norm_out: RmsNorm::new(top, device),
            conv_out: CausalConv3d::new(top, 2 * c.z_dim, [3, 3, 3], 1, [1, 1], device),
        }
    }

    /// Encodes one chunk of frames.
    pub fn forward(&self, x: Tensor<B, 5>, cache: &mut FeatCache<B>) -> Tensor<B, 5> {
        let mut x = self.conv_in.forward_cached(x, cache);
        for layer in &self.down_blocks {
            x = match layer {
                DownLayer::Residual(r) => r.forward(x, cache),
                DownLayer::Attention(a) => a.forward(x),
                DownLayer::Resample(r) => r.forward(x, cache),
                DownLayer::Stage(s) => s.forward(x, cache),
            };
        }
        let x = self.mid_block.forward(x, cache);
        self.conv_out.forward_norm_silu_cached(x, &self.norm_out, cache)
    }
}

/// An up block of the decoder (diffusers' `WanUpBlock`, or Wan2.2's `WanResidualUpBlock`).
#[derive(Module, Debug)]
pub struct UpBlock<B: Backend> {
    /// The block's residual blocks (`resnets.N`).
    pub resnets: Vec<ResidualBlock<B>>,
    /// Wan2.1's up-sampling layer, on every block but the last (`upsamplers.0`).
    pub upsamplers: Option<Vec<Resample<B>>>,
    /// Wan2.2's up-sampling layer, on every block but the last (`upsampler`).
    pub upsampler: Option<Resample<B>>,
    /// Temporal factor of Wan2.2's duplicating shortcut around the block.
    pub shortcut_t: usize,
    /// Spatial factor of that shortcut; 0 where the block has none (Wan2.1, and the last block).
    pub shortcut_s: usize,
}

impl<B: Backend> UpBlock<B> {
    fn forward(&self, x: Tensor<B, 5>, cache: &mut FeatCache<B>) -> Tensor<B, 5> {
        let skip = (self.shortcut_s > 0).then(|| x.clone());
        let mut x = x;
        for r in &self.resnets {
            x = r.forward(x, cache);
        }
        if let Some(ups) = &self.upsamplers {
            x = ups[0].forward(x, cache);
        }
        if let Some(up) = &self.upsampler {
            x = up.forward(x, cache);
        }
        match skip {
            Some(skip) => {
                let out = x.dims()[1];
                let first = cache.is_first_chunk();
                x + dup_up(skip, self.shortcut_t, self.shortcut_s, out, first)
            }
            None => x,
        }
    }
}

/// The 3D decoder (diffusers' `WanDecoder3d`).
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// The input conv (`conv_in`).
    pub conv_in: CausalConv3d<B>,
    /// The middle block (`mid_block`).
    pub mid_block: MidBlock<B>,
    /// The up path (`up_blocks.N`).
    pub up_blocks: Vec<UpBlock<B>>,
    /// The output norm (`norm_out`).
    pub norm_out: RmsNorm<B, 4>,
    /// The output conv (`conv_out`).
    pub conv_out: CausalConv3d<B>,
}

impl<B: Backend> Decoder<B> {
    fn new(c: &WanVaeConfig, device: &B::Device) -> Self {
        let base = c.decoder_base_dim.unwrap_or(c.base_dim);
        let dims = c.decoder_dims(base);
        let temporal_up: Vec<bool> = c.temperal_downsample.iter().rev().copied().collect();
        let last = c.dim_mult.len() - 1;
        let mut up_blocks = Vec::new();
        for i in 0..c.dim_mult.len() {
            // Wan2.1's upsamplers halve the width, so its later blocks take half the previous
            // width; Wan2.2's keep it.
            let d_in = if i > 0 && !c.is_residual { dims[i] / 2 } else { dims[i] };
            let d_out = dims[i + 1];
            let resnets = (0..=c.num_res_blocks)
                .map(|j| ResidualBlock::new(if j == 0 { d_in } else { d_out }, d_out, device))
                .collect();
            let mode = if temporal_up[i.min(last.saturating_sub(1))] {
                ResampleMode::Upsample3d
            } else {
                ResampleMode::Upsample2d
            };
            let up = i != last;
            let (upsamplers, upsampler) = match c.is_residual {
                false => (up.then(|| vec![Resample::new(d_out, mode, device)]), None),
                true => (None, up.then(|| Resample::with_up_width(d_out, d_out, mode, device))),
            };
            up_blocks.push(UpBlock {
                resnets,
                upsamplers,
                upsampler,
                shortcut_t: if up && temporal_up[i] { 2 } else { 1 },
                shortcut_s: if up && c.is_residual { 2 } else { 0 },
            });
        }
        let out = dims[dims.len() - 1];
        Self {
            conv_in: CausalConv3d::new(c.z_dim, dims[0], [3, 3, 3], 1, [1, 1], device),
            mid_block: MidBlock::new(dims[0], device),
            up_blocks,
            norm_out: RmsNorm::new(out, device),
            conv_out: CausalConv3d::new(out, c.out_channels, [3, 3, 3], 1, [1, 1], device),
        }
    }

    /// Decodes one latent frame.
    pub fn forward(&self, x: Tensor<B, 5>, cache: &mut FeatCache<B>) -> Tensor<B, 5> {
        let x = self.conv_in.forward_cached(x, cache);
        let mut x = self.mid_block.forward(x, cache);
        for block in &self.up_blocks {
            x = block.forward(x, cache);
        }
        self.conv_out.forward_norm_silu_cached(x, &self.norm_out, cache)
    }
}

/// The posterior of an encode: per-latent Gaussian with `logvar` clamped to [-30, 20].
#[derive(Debug, Clone)]
pub struct Posterior<B: Backend> {
    /// Mean of the latent distribution.
    pub mean: Tensor<B, 5>,
    /// Log-variance of the latent distribution.
    pub logvar: Tensor<B, 5>,
}

/// diffusers' `AutoencoderKLWan` (Wan2.1 VAE).
#[derive(Module, Debug)]
pub struct WanVae<B: Backend> {
    /// The encoder (`encoder`).
    pub encoder: Encoder<B>,
    /// The 1x1x1 conv after the encoder (`quant_conv`).
    pub quant_conv: CausalConv3d<B>,
    /// The 1x1x1 conv before the decoder (`post_quant_conv`).
    pub post_quant_conv: CausalConv3d<B>,
    /// The decoder (`decoder`).
    pub decoder: Decoder<B>,
    #[module(skip)]
    /// The shape this VAE was built with.
    pub config: WanVaeConfig,
}

impl<B: Backend> WanVae<B> {
    /// A VAE with random weights; loading replaces them.
    pub fn new(config: WanVaeConfig, device: &B::Device) -> Result<Self, VaeError> {
        config.validate()?;
        let z = config.z_dim;
        Ok(Self {
            encoder: Encoder::new(&config, device),
            quant_conv: CausalConv3d::new(2 * z, 2 * z, [1, 1, 1], 1, [0, 0], device),
            post_quant_conv: CausalConv3d::new(z, z, [1, 1, 1], 1, [0, 0], device),
            decoder: Decoder::new(&config, device),
            config,
        })
    }

    /// Encodes video `[B, C, F, H, W]` in about [-1, 1]: frame 0 alone, then chunks of 4 frames,
    /// carrying the causal cache. `F` must be `4k + 1` and `H`, `W` multiples of the spatial factor.
    pub fn encode(&self, video: Tensor<B, 5>) -> Result<Posterior<B>, VaeError> {
        let [_, c, f, h, w] = video.dims();
        let (sf, tf) = (self.config.spatial_factor(), self.config.temporal_factor());
        if c != self.config.video_channels() {
            return Err(VaeError::Shape(format!(
                "video has {c} channels, the VAE expects {}",
                self.config.video_channels()
            )));
        }
        if f == 0 || (f - 1) % tf != 0 {
            return Err(VaeError::Shape(format!("{f} frames: the VAE encodes {tf}k+1 frames")));
        }
        if h == 0 || w == 0 || h % sf != 0 || w % sf != 0 {
            return Err(VaeError::Shape(format!("{h}x{w} is not a positive multiple of {sf}")));
        }
        let video = patchify(video, self.config.patch());
        let _scratch = scratch::Scope::enter();
        let mut cache = FeatCache::new();
        let mut chunks = Vec::new();
        let mut start = 0;
        while start < f {
            let len = if start == 0 { 1 } else { tf };
            cache.start_chunk(start + len >= f);
            chunks.push(self.encoder.forward(video.clone().narrow(2, start, len), &mut cache));
            start += len;
        }
        let h = self.quant_conv.forward(Tensor::cat(chunks, 2), None);
        let z = self.config.z_dim;
        Ok(Posterior {
            mean: h.clone().narrow(1, 0, z),
            logvar: h.narrow(1, z, z).clamp(-30.0, 20.0),
        })
    }

    fn check_latents(&self, z: &Tensor<B, 5>) -> Result<(), VaeError> {
        let [_, c, f, h, w] = z.dims();
        if c != self.config.z_dim {
            return Err(VaeError::Shape(format!(
                "latents have {c} channels, the VAE expects {}",
                self.config.z_dim
            )));
        }
        if f == 0 || h == 0 || w == 0 {
            return Err(VaeError::Shape(format!("empty latents {:?}", z.dims())));
        }
        Ok(())
    }

    /// Decodes raw (un-normalised) latents `[B, z, T, h, w]` one latent frame at a time to video
    /// `[B, 3, 1 + 4(T-1), s*h, s*w]` clamped to [-1, 1] (`s` the spatial factor, 8 or 16).
    pub fn decode(&self, z: Tensor<B, 5>) -> Result<Tensor<B, 5>, VaeError> {
        self.decode_with_progress(z, &mut |_, _| {})
    }

    /// [`WanVae::decode`], calling `progress(done, total)` after each latent frame: a decode is
    /// the slowest stage of a CPU run, and this is how a caller shows it moving.
    pub fn decode_with_progress(
        &self,
        z: Tensor<B, 5>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor<B, 5>, VaeError> {
        self.check_latents(&z)?;
        let t = z.dims()[2];
        let mut done = 0;
        let video = self.decode_unclamped(z, &mut || {
            done += 1;
            progress(done, t)
        });
        Ok(unpatchify(video, self.config.patch()).clamp(-1.0, 1.0))
    }

    /// [`WanVae::decode`] without the final clamp to [-1, 1], for training: a clamp passes no
    /// gradient to the pixels it cuts.
    pub fn decode_unclamped_for_training(&self, z: Tensor<B, 5>) -> Result<Tensor<B, 5>, VaeError> {
        self.check_latents(&z)?;
        Ok(unpatchify(self.decode_unclamped(z, &mut || {}), self.config.patch()))
    }

    /// The decode before the unpatchify and the clamp; `frame_done` runs after each latent frame.
    pub(crate) fn decode_unclamped(&self, z: Tensor<B, 5>, frame_done: &mut dyn FnMut()) -> Tensor<B, 5> {
        let _scratch = scratch::Scope::enter();
        let t = z.dims()[2];
        let x = self.post_quant_conv.forward(z, None);
        let mut cache = FeatCache::new();
        let frames: Vec<Tensor<B, 5>> = (0..t)
            .map(|i| {
                cache.start_chunk(i + 1 == t);
                let frame = self.decoder.forward(x.clone().narrow(2, i, 1), &mut cache);
                frame_done();
                frame
            })
            .collect();
        Tensor::cat(frames, 2)
    }

    /// The pipeline's latent de-normalisation before decoding, as diffusers' WanPipeline writes it:
    /// `latents / (1 / std) + mean` per channel, with `1 / std` rounded to float32.
    pub fn denormalize(&self, latents: Tensor<B, 5>) -> Tensor<B, 5> {
        let (mean, inv_std) = self.stats(&latents.device());
        latents / inv_std + mean
    }

    /// The inverse of [`WanVae::denormalize`]: `(latents - mean) * (1 / std)`.
    pub fn normalize(&self, latents: Tensor<B, 5>) -> Tensor<B, 5> {
        let (mean, inv_std) = self.stats(&latents.device());
        (latents - mean) * inv_std
    }

    /// Per-channel mean and `1 / std`, `[1, z, 1, 1, 1]`.
    fn stats(&self, device: &B::Device) -> (Tensor<B, 5>, Tensor<B, 5>) {
        let z = self.config.z_dim;
        let f = |v: Vec<f32>| Tensor::<B, 1>::from_floats(v.as_slice(), device).reshape([1, z, 1, 1, 1]);
        let mean = self.config.latents_mean.iter().map(|&x| x as f32).collect();
        let inv_std = self.config.latents_std.iter().map(|&x| 1.0 / x as f32).collect();
        (f(mean), f(inv_std))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::tests::GENERIC_ONLY;
    use burn::tensor::Distribution;
    use burn_flex::Flex;

    fn rel_l2(a: Tensor<Flex, 5>, b: Tensor<Flex, 5>) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let d: f32 = (a - b.clone()).square().sum().sqrt().into_scalar();
        d / b.square().sum().sqrt().into_scalar()
    }

    /// Runs `f` once on the host kernels and once on burn's generic ops.
    fn both<T>(f: impl Fn() -> T) -> (T, T) {
        let host = f();
        GENERIC_ONLY.with(|g| g.set(true));
        let generic = f();
        GENERIC_ONLY.with(|g| g.set(false));
        (host, generic)
    }

    /// Four chunks each way (the parity cases have two): the third is the first whose kept frames
    /// are as many as it read, so the host path writes them into the spent buffer, and the fourth
    /// reads them.
    #[test]
    fn host_kernels_match_the_generic_path_over_four_chunks() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/parity/models/wan21/vae"
        );
        let dev = Default::default();
        let vae = WanVae::<Flex>::from_dir(dir, &dev).unwrap();
        let z = Tensor::random([1, 16, 4, 4, 4], Distribution::Normal(0.0, 1.0), &dev);
        let (host, generic) = both(|| vae.decode(z.clone()).unwrap());
        assert_eq!(host.dims(), [1, 3, 13, 32, 32]);
        let err = rel_l2(host, generic);
        assert!(err < 1e-5, "decode: rel_l2 {err}");

        let video = Tensor::random([1, 3, 13, 32, 32], Distribution::Uniform(-1.0, 1.0), &dev);
        let (host, generic) = both(|| vae.encode(video.clone()).unwrap().mean);
        assert_eq!(host.dims()[2], 4);
        let err = rel_l2(host, generic);
        assert!(err < 1e-5, "encode: rel_l2 {err}");
    }
}
