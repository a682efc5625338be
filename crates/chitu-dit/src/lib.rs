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

#![warn(missing_docs)]

mod attention;
mod block;
mod config;
pub mod embed;
mod host;
mod layers;
mod load;
pub mod lora;
mod model;
mod parallel;
mod ulysses;

pub use attention::{AttentionKind, AttentionOp, KeyPadding, SelfAttentionWrap, SCORE_BUDGET_BYTES};
pub use block::{BlockHook, BlockInputs, BlockPart, NoHook, WanBlock};
pub use chitu_store::{weight_files, LoadReport, Precision};
pub use config::WanDitConfig;
pub use layers::{gelu_tanh, layer_norm, modulate, norm_modulate};
pub use load::{CheckpointLayout, KEEP_F32};
pub use lora::{lora_deltas, LoraDeltas, LoraError, LoraFile};
pub use model::{Embedded, WanTransformer, ROPE_THETA};
pub use parallel::DitRunner;
pub use ulysses::{CollectiveError, SeqParallel, SeqShard};

/// Errors from building, loading or running the DiT.
#[derive(Debug, thiserror::Error)]
pub enum DitError {
    /// The config is malformed or describes an unsupported model.
    #[error("invalid transformer config: {0}")]
    Config(String),
    /// A config or weight file could not be read, or the checkpoint does not fit the model
    /// (missing or unexpected keys, a wrong shape): the store's error, with the file and keys.
    #[error(transparent)]
    Load(#[from] chitu_store::LoadError),
    /// An input has the wrong shape.
    #[error("bad DiT input: {0}")]
    Shape(String),
    /// A collective of a sequence-parallel run failed (a dead or stuck rank).
    #[error("context parallelism, {during}: {source}")]
    Parallel {
        /// What the DiT was doing.
        during: &'static str,
        /// The communicator's error.
        #[source]
        source: CollectiveError,
    },
}
