//! The chitu Generator: Wan text-to-video pipelines as staged tasks, after Chitu's Generator API.
//!
//! A [`DiffusionBackend`] holds the loaded models (text encoder, a pool of one or two DiTs, the
//! VAE, the scheduler config). A [`Generator`] advances a [`DiffusionTask`] one unit at a time with
//! [`Generator::generate_step`]: text encoding, each denoise step, the VAE decode.

mod backend;
mod check;
mod generator;
mod native;
mod offload;
pub mod oom;
pub mod output;
mod params;
mod plan;
mod pool;
mod tiny;

pub use backend::DiffusionBackend;
pub use check::CacheCheck;
pub use generator::{seeded_noise, video_to_frames, DiffusionTask, Generator, Stage, StageTimings, TaskBuffer};
pub use native::{is_wan_native, unipc_flow_config, WanNativeConfig};
pub use offload::{Offload, Offloaded};
pub use params::DiffusionUserParams;
pub use plan::{PlanOutput, PlanStage};
pub use pool::{TaskId, TaskPool};
pub use tiny::TINY_WEIGHT_SEED;

/// Errors of the generator.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    /// A request field is invalid.
    #[error("invalid request: {0}")]
    Params(String),
    /// A model folder could not be loaded.
    #[error("loading the model: {0}")]
    Load(String),
    /// A stage failed.
    #[error("{0}")]
    Stage(String),
    /// A file could not be written.
    #[error("writing output: {0}")]
    Output(String),
    /// The device ran out of memory in a stage.
    #[error(
        "out of device memory in {stage}: {detail}; try --low-mem 1 (tiled VAE decode), 2 (text encoder off the device) or 3 (only the active DiT on the device), fewer frames or a smaller size"
    )]
    OutOfMemory { stage: String, detail: String },
    /// A collective of a parallel run failed (a dead or stuck rank, a bad layout).
    #[error("parallel run: {0}")]
    Parallel(String),
    /// Latents became NaN or infinite.
    #[error("NaN or Inf detected in {0}")]
    NonFinite(String),
}
