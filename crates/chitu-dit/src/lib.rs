//! The Wan video diffusion transformer (DiT) in burn, reproducing diffusers' `WanTransformer3DModel`.
//!
//! One architecture covers Wan2.1 T2V 1.3B/14B and both Wan2.2-A14B experts. The forward can be run
//! whole ([`WanTransformer::forward`]) or in pieces ([`WanTransformer::embed`],
//! [`WanTransformer::forward_blocks`], [`WanTransformer::head`]) so that feature caches can skip
//! work; every sub-layer output passes through a [`BlockHook`], and every attention through an
//! [`AttentionOp`] that context parallelism can wrap.
//!
//! ```no_run
//! use burn_flex::Flex;
//! use chitu_dit::WanTransformer;
//! # fn main() -> Result<(), chitu_dit::DitError> {
//! let device = Default::default();
//! let dit = WanTransformer::<Flex>::from_dir("Wan2.1-T2V-1.3B-Diffusers/transformer", &device)?;
//! # let (latents, text) = (burn::tensor::Tensor::zeros([1, 16, 21, 60, 104], &device), burn::tensor::Tensor::zeros([1, 512, 4096], &device));
//! let velocity = dit.forward(latents, &[999.0], text)?;
//! # Ok(()) }
//! ```

mod attention;
mod block;
mod config;
pub mod embed;
mod layers;
mod load;
mod model;
mod parallel;

pub use attention::{AttentionKind, AttentionOp};
pub use block::{BlockHook, BlockInputs, BlockPart, NoHook, WanBlock};
pub use chitu_store::{weight_files, LoadReport};
pub use config::WanDitConfig;
pub use layers::{gelu_tanh, layer_norm, modulate};
pub use load::CheckpointLayout;
pub use model::{Embedded, WanTransformer, ROPE_THETA};
pub use parallel::{DitRunner, SeqParallel, SeqShard};

/// Errors from building, loading or running the DiT.
#[derive(Debug, thiserror::Error)]
pub enum DitError {
    /// A file could not be read.
    #[error("cannot read {0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The config is malformed or describes an unsupported model.
    #[error("invalid transformer config: {0}")]
    Config(String),
    /// The weights do not match the model.
    #[error("{0}")]
    Weights(String),
    /// An input has the wrong shape.
    #[error("bad DiT input: {0}")]
    Shape(String),
    /// A collective of a sequence-parallel run failed (a dead or stuck rank).
    #[error("context parallelism: {0}")]
    Parallel(String),
}
