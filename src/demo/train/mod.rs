//! Training the demo model from scratch on procedural clips ([`super::clips`]), with burn's
//! autodiff on the CPU backend (`examples/train_demo.rs` is its command line).
//!
//! Stages, each resumable from its last checkpoint in `work` (model and Adam state):
//! 1. `vae`: the Wan VAE (tiny config) on 5-frame windows, then on whole clips, reconstruction
//!    plus a small KL term; prints the PSNR on held-out clips.
//! 2. `stats`: the per-channel mean and std of the latents of training clips, which the
//!    pipeline's latent (de)normalisation uses.
//! 3. `dit`: the Wan DiT (tiny config) with Wan's flow-matching objective (velocity target,
//!    timesteps shifted by 3), on the frozen UMT5's states of each caption, the caption dropped
//!    one time in ten so that classifier-free guidance has an unconditional model to push from.
//!
//! Everything is drawn from the seed (clips, noise, timesteps, initial weights), so a rerun gives
//! the same weights up to float summation order.

use super::clips::{self, FRAMES, SIZE};
use super::judge;
use crate::pipeline::{demo, DiffusionBackend, Precision};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{Adam, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use burn_store::{ModuleSnapshot, SafetensorsStore};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

mod dit;
mod vae;

type Cpu = burn_flex::Flex;
type Train = burn_autodiff::Autodiff<Cpu>;

/// Which stages a run takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// Every stage, in order.
    All,
    /// The VAE.
    Vae,
    /// The latent statistics (needs the VAE).
    Stats,
    /// The DiT (needs the VAE and its statistics).
    Dit,
    /// Only the semantic check of a trained model in `out` (which `all` and `dit` end with).
    Eval,
}

/// A training run's settings. From step 0 the defaults make a model that gets 10 of the 16
/// held-back prompts right (the README has the measurements); no model ships yet.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Where the model's files go ([`demo::FILES`]).
    pub out: PathBuf,
    /// Checkpoints and intermediate files.
    pub work: PathBuf,
    /// The stages to run.
    pub stage: Stage,
    /// Seed of everything drawn.
    pub seed: u64,
    /// VAE optimiser steps on 5-frame windows (2 windows each).
    pub vae_steps: usize,
    /// VAE optimiser steps on whole clips (2 clips each) after the windows.
    pub vae_clip_steps: usize,
    /// DiT optimiser steps (32 latents each).
    pub dit_steps: usize,
    /// Clips whose latents the DiT trains on.
    pub dit_clips: usize,
    /// Adam's peak learning rate for the VAE's window steps.
    pub vae_lr: f64,
    /// Adam's peak learning rate for the VAE's whole-clip steps.
    pub vae_clip_lr: f64,
    /// Extra weight of the VAE's reconstruction error on pixels that show an object (1 + this,
    /// against 1 for the background): without it the VAE learns the backgrounds, nine tenths of
    /// the pixels, and drops the objects.
    pub vae_object_weight: f32,
    /// Adam's peak learning rate for the DiT.
    pub dit_lr: f64,
    /// Extra weight of the DiT's loss on latent cells that show an object (1 + this, against 1
    /// for background cells): objects cover about a tenth of the cells, and they are what a
    /// caption is about.
    pub dit_object_weight: f32,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            out: "crates/chitu-gen/assets/demo".into(),
            work: "target/train-demo".into(),
            stage: Stage::All,
            seed: demo::DEMO_SEED,
            vae_steps: 4500,
            vae_clip_steps: 800,
            dit_steps: 3000,
            dit_clips: 6000,
            vae_lr: 1e-3,
            vae_clip_lr: 3e-4,
            vae_object_weight: 9.0,
            dit_lr: 1e-3,
            dit_object_weight: 4.0,
        }
    }
}

/// Errors of a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A file is not what the stage expects (say, a missing tensor).
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Saving or loading a checkpoint failed.
    #[error("checkpoint: {0}")]
    Record(#[from] burn::record::RecorderError),
    /// Writing a safetensors file failed.
    #[error("safetensors: {0}")]
    Safetensors(#[from] burn_store::SafetensorsStoreError),
    /// Reading a tensor's values failed.
    #[error("tensor data: {0}")]
    Data(#[from] burn::tensor::DataError),
    /// JSON could not be written or read.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The VAE failed.
    #[error("VAE: {0}")]
    Vae(#[from] crate::vae::VaeError),
    /// The DiT failed.
    #[error("transformer: {0}")]
    Dit(#[from] crate::dit::DitError),
    /// The text encoder or the tokenizer failed.
    #[error("text encoder: {0}")]
    Text(#[from] crate::text::TextError),
    /// Loading or running the trained model failed.
    #[error("generator: {0}")]
    Gen(#[from] crate::pipeline::GenError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Frames of a VAE training window: the first frame alone and one chunk of four, which is every
/// path of the causal encoder and decoder.
const VAE_WINDOW: usize = 5;
const VAE_BATCH: usize = 2;
const DIT_BATCH: usize = 32;
/// Weight of the KL term against the per-pixel MSE.
const KL_WEIGHT: f32 = 3e-4;
/// The sampler's flow shift (the embedded default's UniPC), which training timesteps follow.
const SHIFT: f32 = 3.0;
/// Caption dropout for classifier-free guidance.
const DROP_CAPTION: f32 = 0.1;
const CHECKPOINT_EVERY: usize = 250;

/// Runs the stages `args` asks for, writing the model's files to `args.out`.
pub fn train(args: &TrainOptions) -> Result<(), TrainError> {
    for dir in [&args.out, &args.work] {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let device = Default::default();
    write_atomic(
        &args.out.join("tokenizer.json"),
        demo::tokenizer_json(&clips::vocabulary()).as_bytes(),
    )?;
    let start = std::time::Instant::now();
    let all = args.stage == Stage::All;
    if all || args.stage == Stage::Vae {
        vae::train_vae(args, &device)?;
    }
    if all || args.stage == Stage::Stats {
        dit::latent_stats(args)?;
    }
    if all || args.stage == Stage::Dit {
        dit::train_dit(args, &device)?;
    }
    if matches!(args.stage, Stage::All | Stage::Dit | Stage::Eval) {
        let backend = DiffusionBackend::<Cpu>::demo_from_dir(&args.out, &Default::default(), Precision::F32)?;
        let sheets = args.work.join("held-back");
        std::fs::create_dir_all(&sheets).map_err(io(&sheets))?;
        let outcomes = judge::evaluate(backend, 0, Some(&sheets))?;
        println!(
            "held-back prompts (contact sheets in {}):\n{}",
            sheets.display(),
            judge::confusion_table(&outcomes)
        );
    }
    println!("done in {:.1} min", start.elapsed().as_secs_f64() / 60.0);
    Ok(())
}

/// Writes through a temporary file and a rename, so that a killed run leaves no half file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}

fn save_safetensors<B: Backend, M: ModuleSnapshot<B>>(model: &M, path: &Path) -> Result<(), TrainError> {
    let tmp = path.with_extension("partial");
    let mut store = SafetensorsStore::from_file(&tmp);
    model.save_into(&mut store)?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}

fn load_safetensors<B: Backend, M: ModuleSnapshot<B>>(mut model: M, path: &Path) -> Result<M, TrainError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let mut store = SafetensorsStore::from_bytes(Some(bytes));
    let applied = model.load_from(&mut store)?;
    if !applied.missing.is_empty() || !applied.errors.is_empty() {
        return Err(TrainError::File {
            path: path.to_path_buf(),
            message: format!(
                "{} tensors missing, {} errors",
                applied.missing.len(),
                applied.errors.len()
            ),
        });
    }
    Ok(model)
}

/// Draws every lazily initialised parameter now, in module order, so that the weights depend on
/// the seed alone.
struct DrawNow;
impl<B: Backend> ModuleVisitor<B> for DrawNow {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let _ = param.val();
    }
}

fn seeded<B: Backend, M: Module<B>>(seed: u64, device: &B::Device, build: impl FnOnce() -> M) -> M {
    B::seed(device, seed);
    let model = build();
    model.visit(&mut DrawNow);
    model
}

/// Learning rate: linear warm-up over the first 5% of steps, then a cosine decay to a tenth.
fn learning_rate(peak: f64, step: usize, total: usize) -> f64 {
    let warm = (total / 20).max(1);
    if step < warm {
        return peak * (step + 1) as f64 / warm as f64;
    }
    let p = (step - warm) as f64 / (total - warm).max(1) as f64;
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

fn bar(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
            .expect("a valid template"),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// Shows a step's numbers on the bar, or as a line every 50 steps where there is no terminal.
fn log(progress: &ProgressBar, step: usize, message: String) {
    if progress.is_hidden() && step.is_multiple_of(50) {
        println!("{} step {step}: {message}", progress.prefix());
    }
    progress.set_message(message);
    progress.inc(1);
}

type Adapted<M> = OptimizerAdaptor<Adam, M, Train>;

/// The mean of `error` weighted by `weight` (one weight per pixel or latent cell, the same for
/// every channel), divided by the mean weight so that it reads as a mean squared error.
fn weighted_mean(error: Tensor<Train, 5>, weight: Tensor<Train, 5>) -> Tensor<Train, 1> {
    (error * weight.clone()).mean() / weight.mean()
}

/// A training run's state in `work`: the model and Adam's moments as burn records
/// (`NAME-model.mpk`, `NAME-adam.mpk`: the recorder sets the extension itself), and the number of
/// steps taken (`NAME.step`).
struct Checkpoint {
    dir: PathBuf,
    name: &'static str,
}

impl Checkpoint {
    fn step(&self) -> usize {
        std::fs::read_to_string(self.dir.join(format!("{}.step", self.name)))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn resume<M: AutodiffModule<Train>>(
        &self,
        model: M,
        optim: Adapted<M>,
        device: &burn::tensor::Device<Train>,
    ) -> Result<(M, Adapted<M>, usize), TrainError> {
        let step = self.step();
        if step == 0 {
            return Ok((model, optim, 0));
        }
        let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
        let model = model.load_record(recorder.load(self.dir.join(format!("{}-model", self.name)), device)?);
        let optim = optim.load_record(recorder.load(self.dir.join(format!("{}-adam", self.name)), device)?);
        println!("{}: resuming at step {step}", self.name);
        Ok((model, optim, step))
    }

    fn save<M: AutodiffModule<Train>>(&self, model: &M, optim: &Adapted<M>, step: usize) -> Result<(), TrainError> {
        let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
        recorder.record(
            model.clone().into_record(),
            self.dir.join(format!("{}-model", self.name)),
        )?;
        recorder.record(optim.to_record(), self.dir.join(format!("{}-adam", self.name)))?;
        write_atomic(
            &self.dir.join(format!("{}.step", self.name)),
            step.to_string().as_bytes(),
        )
    }
}
