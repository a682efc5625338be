//! The chitu Generator: Wan text-to-video pipelines as staged tasks, after Chitu's Generator API.
//!
//! The short path loads a model folder and generates one video:
//!
//! ```no_run
//! use chitu_gen::{DiffusionUserParams, Generator, LoadOptions};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = Default::default();
//! let generator = Generator::<burn_flex::Flex>::from_dir("Wan2.1-T2V-1.3B-Diffusers", &device, LoadOptions::default())?;
//! let video = generator.generate(DiffusionUserParams::new("A cat walking on grass"))?;
//! video.save_mp4("cat.mp4")?;
//! # Ok(()) }
//! ```
//!
//! Underneath, a [`DiffusionBackend`] holds the loaded models (text encoder, a pool of one or two
//! DiTs, the VAE, the scheduler spec) and a [`Generator`] advances a [`DiffusionTask`] one unit at
//! a time with [`Generator::generate_step`]: text encoding, each denoise step, the VAE decode.
//! `pipeline.rs` holds that loop, in the order diffusers' `pipeline_wan.py` runs it.

#![warn(missing_docs)]

mod backend;
mod check;
mod condition;
pub mod demo;
#[cfg(feature = "video")]
mod encode;
pub mod estimate;
mod host_weights;
mod image;
mod lora;
mod memory_plan;
mod native;
mod offload;
pub mod oom;
mod parallel;
mod params;
mod pipeline;
mod plan;
mod pool;
mod task;
pub mod video;

pub use backend::{DiffusionBackend, LoadOptions, MemoryLevel, PipelineKind, TINY_WEIGHT_SEED};
pub use check::CacheCheck;
pub use chitu_sched::StepList;
pub use chitu_store::{Format, Precision, Weights};
pub use estimate::{estimate_stages, EstimatedStage, MemoryEstimate, ModelSizes, StageEstimate};
pub use host_weights::HostWeights;
pub use image::{ConditionImage, ImageError};
pub use lora::{Expert, LoraApplied, LoraReport, LoraSpec};
pub use memory_plan::{plan_memory, BudgetSource, MemoryPlan, PlanLimits};
pub use native::{is_wan_native, NativeDefaults, WanNativeConfig};
pub use offload::{Offload, OffloadError, Offloaded, Patch, Reload};
pub use parallel::UlyssesGroup;
pub use params::DiffusionUserParams;
pub use pipeline::{seeded_noise, video_to_frames, Generator};
pub use plan::{PlanOutput, PlanStage};
pub use pool::{TaskId, TaskPool};
pub use task::{DiffusionTask, OomRetry, Stage, StageTimings};
pub use video::{Video, VideoError};

use std::path::PathBuf;

/// Errors of the generator. Each wraps the failing crate's own error, so a caller can match on,
/// say, a missing checkpoint key (`GenError::Dit(DitError::Load(LoadError::MissingKeys { .. }))`).
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    /// A request field is invalid; the message names the field.
    #[error("invalid request: {0}")]
    Params(String),
    /// A model folder is incomplete or inconsistent (a missing file, a `transformer_2` without
    /// `boundary_ratio`).
    #[error("{}: {message}", path.display())]
    Folder {
        /// The folder or file at fault.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A file of the demo model did not load (a build from a tree without the trained files, or
    /// files that do not match the model code).
    #[error("the demo model's {file}: {message}")]
    Embedded {
        /// The file.
        file: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A folder's JSON (`model_index.json`, the scheduler config) could not be read.
    #[error(transparent)]
    Store(#[from] chitu_store::LoadError),
    /// Loading or running the text encoder failed.
    #[error("text encoder: {0}")]
    Text(#[from] chitu_text::TextError),
    /// Loading the transformer failed.
    #[error("transformer: {0}")]
    Dit(#[from] chitu_dit::DitError),
    /// A LoRA could not be read, or does not fit the model (the keys are listed).
    #[error(transparent)]
    Lora(#[from] chitu_dit::LoraError),
    /// A denoise step's transformer call failed.
    #[error("denoise step {step}: {source}")]
    Denoise {
        /// The step, from 0.
        step: usize,
        /// The transformer's error.
        #[source]
        source: chitu_dit::DitError,
    },
    /// Loading or running the VAE failed.
    #[error("VAE: {0}")]
    Vae(#[from] chitu_vae::VaeError),
    /// The scheduler config is unsupported, or a step failed.
    #[error("scheduler: {0}")]
    Scheduler(#[from] chitu_sched::SchedError),
    /// The request's cache settings are invalid.
    #[error(transparent)]
    Cache(#[from] chitu_cache::CacheError),
    /// Moving a model between the device and host memory failed.
    #[error("the {model}: {source}")]
    Offload {
        /// The model's name.
        model: String,
        /// What failed.
        #[source]
        source: OffloadError,
    },
    /// The device ran out of memory in a stage. The task cannot continue; lower the memory
    /// level's footprint (a higher `low_mem`, fewer frames, a smaller size) and run it again.
    #[error("out of device memory in {stage}: {detail}")]
    OutOfMemory {
        /// The stage that failed.
        stage: String,
        /// The backend's first line about it.
        detail: String,
    },
    /// A collective of a parallel run failed (a dead or stuck rank, a bad layout).
    #[error("parallel run, {during}: {source}")]
    Parallel {
        /// What the generator was doing.
        during: String,
        /// The communicator's error.
        #[source]
        source: chitu_dist::CommError,
    },
    /// The backend cannot hold weights in the asked dtype.
    #[error("{what} {precision}: this backend ({backend}) cannot hold tensors of that dtype; try --dtype f32")]
    Dtype {
        /// Which setting asked for it (`dtype`, `VAE dtype`).
        what: &'static str,
        /// The dtype asked for.
        precision: chitu_store::Precision,
        /// The backend's name.
        backend: String,
    },
    /// The backend cannot hold weights in the asked format.
    #[error("--weights {weights}: this backend ({backend}) cannot hold quantized tensors; use --weights float")]
    Weights {
        /// The format asked for.
        weights: chitu_store::Weights,
        /// The backend's name.
        backend: String,
    },
    /// A tensor became NaN or infinite; the string says which and where.
    #[error("NaN or Inf detected in {0}")]
    NonFinite(String),
    /// A finished task was asked for something it does not hold (a video on a rank that does not
    /// decode, latents of a task that has not started).
    #[error("the task {0}")]
    Task(&'static str),
    /// Taking the frames or writing an output file failed.
    #[error(transparent)]
    Output(#[from] VideoError),
    /// A conditioning picture is missing, corrupt, or the wrong size with resizing off.
    #[error(transparent)]
    Image(#[from] ImageError),
}
