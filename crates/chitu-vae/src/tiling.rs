//! Spatial tiling with linear blending over the overlaps, identical to diffusers' `tiled_decode`
//! and `tiled_encode`, but streamed row by row: only the previous row of tiles is kept alive.

use crate::layers::FeatCache;
use crate::model::{Posterior, WanVae};
use crate::{scratch, VaeError};
use burn::tensor::{backend::Backend, Tensor, TensorData};

/// Tile geometry in output pixels (diffusers' `tile_sample_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileConfig {
    /// Pixel height above which a decode is tiled.
    pub min_height: usize,
    /// Pixel width above which a decode is tiled.
    pub min_width: usize,
    /// Vertical pixel stride between tiles (tiles overlap by the difference).
    pub stride_height: usize,
    /// Horizontal pixel stride between tiles.
    pub stride_width: usize,
}

impl Default for TileConfig {
    /// diffusers' defaults: 256-pixel tiles every 192 pixels.
    fn default() -> Self {
        Self {
            min_height: 256,
            min_width: 256,
            stride_height: 192,
            stride_width: 192,
        }
    }
}

impl TileConfig {
    fn validate(&self, factor: usize) -> Result<(), VaeError> {
        let ok = self.stride_height > 0
            && self.stride_width > 0
            && self.stride_height <= self.min_height
            && self.stride_width <= self.min_width
            && self.min_height >= factor
            && self.min_width >= factor
            && self.stride_height >= factor
            && self.stride_width >= factor;
        if ok {
            Ok(())
        } else {
            Err(VaeError::Config(format!(
                "tiles {self:?}: strides must be positive, at most the tile size, and at least {factor} pixels"
            )))
        }
    }
}

/// Blends the last `extent` rows (axis 3) or columns (axis 4) of `a` into the first of `b`:
/// `b[k] = a[-extent + k] * (1 - k / extent) + b[k] * (k / extent)`.
fn blend<B: Backend>(a: &Tensor<B, 5>, b: Tensor<B, 5>, extent: usize, axis: usize) -> Tensor<B, 5> {
    let extent = extent.min(a.dims()[axis]).min(b.dims()[axis]);
    if extent == 0 {
        return b;
    }
    let weights: Vec<f32> = (0..extent).map(|k| (k as f64 / extent as f64) as f32).collect();
    let mut shape = [1usize; 5];
    shape[axis] = extent;
    let w = Tensor::<B, 5>::from_data(TensorData::new(weights, shape), &b.device());
    let a_tail = a.clone().narrow(axis, a.dims()[axis] - extent, extent);
    let b_len = b.dims()[axis];
    let head = a_tail * (w.clone().neg() + 1.0) + b.clone().narrow(axis, 0, extent) * w;
    if b_len == extent {
        head
    } else {
        Tensor::cat(vec![head, b.narrow(axis, extent, b_len - extent)], axis)
    }
}

/// Runs `tile_fn` on overlapping tiles of `x` (axes 3, 4), blends neighbours and stitches the
/// strided parts. `in_*` are tile size and stride in input units, `out_*` in output units.
fn tiled<B: Backend>(
    x: &Tensor<B, 5>,
    in_size: [usize; 2],
    in_stride: [usize; 2],
    out_size: [usize; 2],
    out_stride: [usize; 2],
    out_total: [usize; 2],
    mut tile_fn: impl FnMut(Tensor<B, 5>) -> Tensor<B, 5>,
) -> Tensor<B, 5> {
    // One scratch buffer across all tiles, not one per tile.
    let _scratch = scratch::Scope::enter();
    let [_, _, _, h, w] = x.dims();
    let blend_extent = [out_size[0] - out_stride[0], out_size[1] - out_stride[1]];
    let mut prev_row: Option<Vec<Tensor<B, 5>>> = None;
    let mut rows = Vec::new();
    for i in (0..h).step_by(in_stride[0]) {
        let mut row: Vec<Tensor<B, 5>> = Vec::new();
        for (jj, j) in (0..w).step_by(in_stride[1]).enumerate() {
            let th = in_size[0].min(h - i);
            let tw = in_size[1].min(w - j);
            let mut tile = tile_fn(x.clone().narrow(3, i, th).narrow(4, j, tw));
            if let Some(prev) = &prev_row {
                tile = blend(&prev[jj], tile, blend_extent[0], 3);
            }
            if let Some(left) = row.last() {
                tile = blend(left, tile, blend_extent[1], 4);
            }
            row.push(tile);
        }
        let parts: Vec<Tensor<B, 5>> = row
            .iter()
            .map(|t| {
                let [_, _, _, th, tw] = t.dims();
                t.clone()
                    .narrow(3, 0, out_stride[0].min(th))
                    .narrow(4, 0, out_stride[1].min(tw))
            })
            .collect();
        rows.push(Tensor::cat(parts, 4));
        // The blended tiles of this row are all the next row needs.
        prev_row = Some(row);
    }
    let out = Tensor::cat(rows, 3);
    let [_, _, _, oh, ow] = out.dims();
    out.narrow(3, 0, out_total[0].min(oh))
        .narrow(4, 0, out_total[1].min(ow))
}

impl<B: Backend> WanVae<B> {
    /// Decodes in overlapping spatial tiles and blends them, as diffusers' `tiled_decode`.
    pub fn decode_tiled(&self, z: Tensor<B, 5>, tiles: TileConfig) -> Result<Tensor<B, 5>, VaeError> {
        self.decode_tiled_with_progress(z, tiles, &mut |_, _| {})
    }

    /// [`WanVae::decode_tiled`], calling `progress(done, total)` after each latent frame of
    /// each tile.
    pub fn decode_tiled_with_progress(
        &self,
        z: Tensor<B, 5>,
        tiles: TileConfig,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor<B, 5>, VaeError> {
        let (sf, p) = (self.config.spatial_factor(), self.config.patch());
        tiles.validate(sf)?;
        let [_, c, t, h, w] = z.dims();
        if c != self.config.z_dim {
            return Err(VaeError::Shape(format!(
                "latents have {c} channels, the VAE expects {}",
                self.config.z_dim
            )));
        }
        let (size, stride) = (
            [tiles.min_height / sf, tiles.min_width / sf],
            [tiles.stride_height / sf, tiles.stride_width / sf],
        );
        let total = h.div_ceil(stride[0]) * w.div_ceil(stride[1]) * t;
        let mut done = 0;
        let mut frame_done = || {
            done += 1;
            progress(done, total)
        };
        // With a patchify the tiles are blended before it is undone, in its units, as diffusers
        // does.
        let out = tiled(
            &z,
            size,
            stride,
            [tiles.min_height / p, tiles.min_width / p],
            [tiles.stride_height / p, tiles.stride_width / p],
            [h * sf / p, w * sf / p],
            |tile| self.decode_unclamped(tile, &mut frame_done),
        );
        Ok(crate::unpatchify(out, p).clamp(-1.0, 1.0))
    }

    /// Encodes in overlapping spatial tiles and blends the latents, as diffusers' `tiled_encode`.
    /// With a patchify, diffusers tiles the patchified video, so the tile sizes are in its units.
    pub fn encode_tiled(&self, video: Tensor<B, 5>, tiles: TileConfig) -> Result<Posterior<B>, VaeError> {
        let sf = self.config.conv_spatial_factor();
        tiles.validate(sf)?;
        let [_, c, f, h, w] = video.dims();
        let p = self.config.patch();
        if c != self.config.video_channels() || h % (sf * p) != 0 || w % (sf * p) != 0 {
            return Err(VaeError::Shape(format!(
                "video {:?}: the VAE encodes {} channels at multiples of {} pixels",
                video.dims(),
                self.config.video_channels(),
                sf * p
            )));
        }
        let video = crate::patchify(video, p);
        let [_, _, _, h, w] = video.dims();
        let tf = self.config.temporal_factor();
        if f == 0 || (f - 1) % tf != 0 {
            return Err(VaeError::Shape(format!("{f} frames: the VAE encodes {tf}k+1 frames")));
        }
        let enc = tiled(
            &video,
            [tiles.min_height, tiles.min_width],
            [tiles.stride_height, tiles.stride_width],
            [tiles.min_height / sf, tiles.min_width / sf],
            [tiles.stride_height / sf, tiles.stride_width / sf],
            [h / sf, w / sf],
            |tile| {
                let mut cache = FeatCache::new();
                let f = tile.dims()[2];
                let mut chunks = Vec::new();
                let mut start = 0;
                while start < f {
                    let len = if start == 0 { 1 } else { tf };
                    cache.start_chunk(start + len >= f);
                    let out = self.encoder.forward(tile.clone().narrow(2, start, len), &mut cache);
                    chunks.push(self.quant_conv.forward(out, None));
                    start += len;
                }
                Tensor::cat(chunks, 2)
            },
        );
        let z = self.config.z_dim;
        Ok(Posterior {
            mean: enc.clone().narrow(1, 0, z),
            logvar: enc.narrow(1, z, z).clamp(-30.0, 20.0),
        })
    }

    /// A rough upper bound, in bytes, of the activations a plain (untiled) decode holds at once:
    /// a few full-width feature maps of the widest stage at each resolution, over the frames of one
    /// chunk, plus the output video.
    pub fn estimate_decode_bytes(&self, latent_shape: [usize; 5]) -> usize {
        let [b, _, t, h, w] = latent_shape;
        let c = &self.config;
        let base = c.decoder_base_dim.unwrap_or(c.base_dim);
        let sf = c.conv_spatial_factor();
        let frames_out = 1 + c.temporal_factor() * (t.max(1) - 1);
        let mut peak = 0usize;
        for (i, m) in c.dim_mult.iter().rev().enumerate() {
            let scale = sf >> (c.dim_mult.len() - 1 - i);
            // Up to the temporal factor of frames per chunk, plus two cached frames per conv input.
            let fm = b * m * base * (c.temporal_factor() + 2) * h * scale * w * scale;
            peak = peak.max(fm);
        }
        4 * (4 * peak + b * c.out_channels * frames_out * h * sf * w * sf)
    }

    /// Decodes plainly when the estimate fits `budget_bytes`, in tiles otherwise.
    pub fn decode_within(
        &self,
        z: Tensor<B, 5>,
        budget_bytes: usize,
        tiles: TileConfig,
    ) -> Result<Tensor<B, 5>, VaeError> {
        if self.estimate_decode_bytes(z.dims()) > budget_bytes {
            self.decode_tiled(z, tiles)
        } else {
            self.decode(z)
        }
    }
}
