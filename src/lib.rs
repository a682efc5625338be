//! chitu: a Rust inference engine for Wan text-to-video diffusion.
//!
//! The short path, from a model folder to a video file:
//!
//! ```no_run
//! use chitu::pipeline::{DiffusionUserParams, Generator, LoadOptions};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let generator = Generator::<chitu::DefaultBackend>::from_dir("Wan2.1-T2V-1.3B-Diffusers", &chitu::default_device(), LoadOptions::default())?;
//! let video = generator.generate(DiffusionUserParams::new("A cat walking on grass"))?;
//! video.save_mp4("cat.mp4")?;
//! # Ok(()) }
//! ```
//!
//! This facade re-exports the member crates so that one dependency gives the whole engine:
//! - [`sched`]: flow-matching noise schedulers matching diffusers (UniPC, DPM-Solver++, Euler);
//! - [`dit`]: the Wan diffusion transformer;
//! - [`text`]: prompt cleaning, the T5 tokenizer and the UMT5 encoder;
//! - [`vae`]: the Wan 3D causal VAE;
//! - [`cache`]: FlexCache feature-cache policies;
//! - [`dist`]: CFG and Ulysses context parallelism over in-process ranks, MPI or NCCL;
//! - [`pipeline`]: the Generator that runs whole pipelines (the `chitu-gen` crate);
//! - [`store`]: strict checkpoint loading and its errors;
//! - [`host`]: which backends chitu's own CPU kernels run on.
//!
//! The parity harness that checks every component against diffusers/transformers references is
//! the dev-only `chitu-parity` crate (`cargo run --release --example parity -- DIR`).

#![warn(missing_docs)]

pub mod cli;
pub mod demo;
#[cfg(feature = "serve")]
pub mod serve;

pub use chitu_cache as cache;
pub use chitu_dist as dist;
pub use chitu_dit as dit;
pub use chitu_gen as pipeline;
pub use chitu_host as host;
pub use chitu_sched as sched;
pub use chitu_store as store;
pub use chitu_text as text;
pub use chitu_vae as vae;

/// With the default `mimalloc` feature every program that links the facade allocates through
/// mimalloc, which reuses freed buffers instead of mapping and faulting in fresh pages for each
/// large tensor as glibc does (see BENCHMARKS.md for the measured effect).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The backend the examples and the CLI use: `burn-flex` on CPU, or CUDA with `--features cuda`.
#[cfg(not(feature = "cuda"))]
pub type DefaultBackend = burn_flex::Flex;
/// The backend the examples and the CLI use: `burn-flex` on CPU, or CUDA with `--features cuda`.
#[cfg(feature = "cuda")]
pub type DefaultBackend = burn_cuda::Cuda;

/// The default device of [`DefaultBackend`].
pub fn default_device() -> burn::tensor::Device<DefaultBackend> {
    Default::default()
}

/// The device of rank `index` in a multi-device run: CUDA device `index` (modulo the devices on
/// the node is the launcher's business), or the CPU for `burn-flex`.
pub fn rank_device(index: usize) -> burn::tensor::Device<DefaultBackend> {
    #[cfg(feature = "cuda")]
    {
        burn_cuda::CudaDevice::new(index)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = index;
        Default::default()
    }
}
