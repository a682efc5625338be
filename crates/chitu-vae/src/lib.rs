//! The Wan 3D causal VAEs in burn (Wan2.1's, and Wan2.2's with its residual stages and 2x2
//! patchify), reproducing diffusers' `AutoencoderKLWan`: chunked causal
//! encode (frame 0, then 4 frames at a time) and decode (one latent frame at a time) with the
//! feature cache, and spatial tiling with blended overlaps for bounded memory.
//!
//! ```no_run
//! use burn_flex::Flex;
//! use chitu_vae::WanVae;
//! # fn main() -> Result<(), chitu_vae::VaeError> {
//! let device = Default::default();
//! let vae = WanVae::<Flex>::from_dir("Wan2.1-T2V-1.3B-Diffusers/vae", &device)?;
//! # let latents = burn::tensor::Tensor::zeros([1, 16, 21, 60, 104], &device);
//! let video = vae.decode(vae.denormalize(latents))?; // [1, 3, 81, 480, 832] in [-1, 1]
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod config;
mod conv;
pub mod layers;
mod load;
mod model;
mod residual;
mod scratch;
mod tiling;

pub use chitu_store::Precision;
pub use config::WanVaeConfig;
pub use load::{VaeLayout, KEEP_F32};
pub use model::{Decoder, DownLayer, Encoder, Posterior, UpBlock, WanVae};
pub use residual::{patchify, unpatchify, ResidualDownBlock};
pub use tiling::TileConfig;

/// Errors from building, loading or running the VAE.
#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    /// The config is malformed or unsupported.
    #[error("invalid VAE config: {0}")]
    Config(String),
    /// A config or weight file could not be read, or the checkpoint does not fit the model
    /// (missing or unexpected keys, a wrong shape): the store's error, with the file and keys.
    #[error(transparent)]
    Load(#[from] chitu_store::LoadError),
    /// An input has the wrong shape.
    #[error("bad VAE input: {0}")]
    Shape(String),
}
