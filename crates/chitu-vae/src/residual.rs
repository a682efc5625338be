//! The Wan2.2 VAE's additions to Wan2.1's: the 2x2 patchify around the encoder and decoder, and
//! the parameter-free shortcuts of its residual down and up blocks (diffusers' `AvgDown3D` and
//! `DupUp3D`), as index shuffles on burn tensors.

use crate::layers::{FeatCache, Resample, ResidualBlock};
use burn::module::Module;
use burn::tensor::ops::PadMode;
use burn::tensor::{backend::Backend, Tensor};

/// Folds each `p x p` block of pixels into channels: `[B, C, F, H, W]` to
/// `[B, C * p * p, F, H / p, W / p]`, channel `c * p * p + dx * p + dy` holding pixel
/// `(y * p + dy, x * p + dx)`: the width offset varies slower, as diffusers' `patchify` orders it.
pub fn patchify<B: Backend>(x: Tensor<B, 5>, p: usize) -> Tensor<B, 5> {
    if p == 1 {
        return x;
    }
    let [b, c, f, h, w] = x.dims();
    let x: Tensor<B, 7> = x.reshape([b, c, f, h / p, p, w / p, p]);
    x.permute([0, 1, 6, 4, 2, 3, 5])
        .reshape([b, c * p * p, f, h / p, w / p])
}

/// The inverse of [`patchify`].
pub fn unpatchify<B: Backend>(x: Tensor<B, 5>, p: usize) -> Tensor<B, 5> {
    if p == 1 {
        return x;
    }
    let [b, cp, f, h, w] = x.dims();
    let c = cp / (p * p);
    let x: Tensor<B, 7> = x.reshape([b, c, p, p, f, h, w]);
    x.permute([0, 1, 4, 5, 3, 6, 2]).reshape([b, c, f, h * p, w * p])
}

/// diffusers' `AvgDown3D`: pads time on the left to a multiple of `ft`, folds each
/// `ft x fs x fs` block into channels and averages groups of consecutive channels down to `out`.
fn avg_down<B: Backend>(x: Tensor<B, 5>, ft: usize, fs: usize, out: usize) -> Tensor<B, 5> {
    let pad_t = (ft - x.dims()[2] % ft) % ft;
    let x = if pad_t > 0 {
        x.pad([(pad_t, 0), (0, 0), (0, 0)], PadMode::Constant(0.0))
    } else {
        x
    };
    let [b, c, t, h, w] = x.dims();
    let (t2, h2, w2) = (t / ft, h / fs, w / fs);
    let factor = ft * fs * fs;
    let x: Tensor<B, 8> = x.reshape([b, c, t2, ft, h2, fs, w2, fs]);
    let x: Tensor<B, 6> = x
        .permute([0, 1, 3, 5, 7, 2, 4, 6])
        .reshape([b, out, c * factor / out, t2, h2, w2]);
    x.mean_dim(2).reshape([b, out, t2, h2, w2])
}

/// diffusers' `DupUp3D`: repeats each channel, unfolds channels into `ft x fs x fs` blocks of
/// `out` channels, and on the first chunk drops the `ft - 1` leading frames (the first latent
/// frame decodes to one frame).
pub(crate) fn dup_up<B: Backend>(x: Tensor<B, 5>, ft: usize, fs: usize, out: usize, first_chunk: bool) -> Tensor<B, 5> {
    let [b, c, t, h, w] = x.dims();
    let factor = ft * fs * fs;
    let repeats = out * factor / c;
    let x: Tensor<B, 6> = x.unsqueeze_dim(2);
    let x: Tensor<B, 8> = x
        .expand([b, c, repeats, t, h, w])
        .reshape([b, out, ft, fs, fs, t, h, w]);
    let x: Tensor<B, 5> = x
        .permute([0, 1, 5, 2, 6, 3, 7, 4])
        .reshape([b, out, t * ft, h * fs, w * fs]);
    if first_chunk && ft > 1 {
        x.narrow(2, ft - 1, t * ft - (ft - 1))
    } else {
        x
    }
}

/// A Wan2.2 encoder stage (diffusers' `WanResidualDownBlock`): residual blocks and a downsampler,
/// plus the averaging shortcut around both.
#[derive(Module, Debug)]
pub struct ResidualDownBlock<B: Backend> {
    /// The residual blocks (`resnets.N`).
    pub resnets: Vec<ResidualBlock<B>>,
    /// The down-sampling layer, on every stage but the last (`downsampler`).
    pub downsampler: Option<Resample<B>>,
    /// Temporal factor of the shortcut (2 where the stage halves time).
    pub shortcut_t: usize,
    /// Spatial factor of the shortcut (2 where the stage halves space).
    pub shortcut_s: usize,
}

impl<B: Backend> ResidualDownBlock<B> {
    /// Runs the stage on one chunk, reading and updating the causal frame cache.
    pub fn forward(&self, x: Tensor<B, 5>, cache: &mut FeatCache<B>) -> Tensor<B, 5> {
        let skip = x.clone();
        let mut x = x;
        for r in &self.resnets {
            x = r.forward(x, cache);
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(x, cache);
        }
        let out = x.dims()[1];
        x + avg_down(skip, self.shortcut_t, self.shortcut_s, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};
    use burn_flex::Flex;

    #[test]
    fn patchify_orders_channels_as_diffusers_and_inverts() {
        let dev = Default::default();
        // One channel, one frame, 2x4 pixels numbered row-major.
        let x = Tensor::<Flex, 5>::from_data(
            TensorData::new((0..8).map(|v| v as f32).collect(), [1, 1, 1, 2, 4]),
            &dev,
        );
        let p = patchify(x.clone(), 2);
        assert_eq!(p.dims(), [1, 4, 1, 1, 2]);
        // Channel dx * 2 + dy holds pixel (dy, 2 * col + dx): 0 = (0,0), 1 = (1,0), 2 = (0,1), 3 = (1,1).
        let v: Vec<f32> = p.clone().into_data().to_vec().unwrap();
        assert_eq!(v, vec![0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]);
        unpatchify(p, 2).into_data().assert_eq(&x.into_data(), true);
    }

    #[test]
    fn shortcuts_pad_and_drop_the_first_frame() {
        let dev = Default::default();
        let x = Tensor::<Flex, 5>::random([1, 4, 1, 4, 4], Distribution::Default, &dev);
        // One frame, temporal factor 2: padded with a zero frame in front, then averaged.
        assert_eq!(avg_down(x.clone(), 2, 2, 8).dims(), [1, 8, 1, 2, 2]);
        // The first chunk's one latent frame stays one frame.
        assert_eq!(dup_up(x.clone(), 2, 2, 2, true).dims(), [1, 2, 1, 8, 8]);
        assert_eq!(dup_up(x, 2, 2, 2, false).dims(), [1, 2, 2, 8, 8]);
    }
}
