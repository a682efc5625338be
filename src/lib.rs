//! chitu: a Rust inference engine for Wan text-to-video diffusion.
//!
//! This facade re-exports the member crates so that one dependency gives the whole engine:
//! - [`sched`]: flow-matching noise schedulers matching diffusers (UniPC, DPM-Solver++, Euler);
//! - [`dit`]: the Wan diffusion transformer;
//! - [`text`]: prompt cleaning, the T5 tokenizer and the UMT5 encoder;
//! - [`vae`]: the Wan 3D causal VAE;
//! - [`cache`]: FlexCache feature-cache policies;
//! - [`dist`]: CFG and Ulysses context parallelism over in-process ranks, MPI or NCCL;
//! - [`gen`]: the Generator that runs whole pipelines.
//!
//! It also owns the parity runner ([`parity`]) that checks every component against reference
//! outputs made with diffusers/transformers.

pub use chitu_cache as cache;
pub use chitu_dist as dist;
pub use chitu_dit as dit;
pub use chitu_gen as gen;
pub use chitu_sched as sched;
pub use chitu_text as text;
pub use chitu_vae as vae;

pub mod parity;

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
