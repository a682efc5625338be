//! How far a cached run lands from the uncached one.

use burn::tensor::{backend::Backend, ElementConversion, Tensor};

/// Peak signal-to-noise ratio in dB of `a` against `b`, both with values in `[0, 1]` (frames as
/// `chitu_gen::video_to_frames` gives them); infinite when they are identical.
pub fn psnr<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f64 {
    let mse: f64 = (a - b).powi_scalar(2).mean().into_scalar().elem();
    if mse == 0.0 {
        f64::INFINITY
    } else {
        -10.0 * mse.log10()
    }
}

/// The largest absolute elementwise difference.
pub fn max_abs_diff<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f64 {
    (a - b).abs().max().into_scalar().elem()
}
