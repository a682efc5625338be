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

use super::clips::{self, Rng, FRAMES, SIZE};
use super::judge;
use crate::dit::WanTransformer;
use crate::pipeline::{demo, DiffusionBackend, Precision};
use crate::text::{T5Tokenizer, TextEncoder, Umt5Encoder};
use crate::vae::WanVae;
use burn::grad_clipping::GradientClippingConfig;
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{Adam, AdamConfig, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use burn_store::{ModuleSnapshot, SafetensorsStore};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

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

/// A training run's settings. The VAE's defaults are the schedule the best VAE so far ended on
/// (that run was resumed twice with longer schedules, so no run has yet used them from step 0);
/// no model ships yet.
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
        train_vae(args, &device)?;
    }
    if all || args.stage == Stage::Stats {
        latent_stats(args)?;
    }
    if all || args.stage == Stage::Dit {
        train_dit(args, &device)?;
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

/// Frames `start..start + len` of each of the `channels` planes of a clip.
fn window(clip: &[f32], channels: usize, start: usize, len: usize) -> Vec<f32> {
    let plane = SIZE * SIZE;
    (0..channels)
        .flat_map(|c| {
            clip[(c * FRAMES + start) * plane..(c * FRAMES + start + len) * plane]
                .iter()
                .copied()
        })
        .collect()
}

fn train_vae(args: &TrainOptions, device: &burn::tensor::Device<Train>) -> Result<(), TrainError> {
    // Placeholder statistics: the VAE's own training never normalises latents.
    let config = demo::vae_config(vec![0.0; demo::DEMO_Z], vec![1.0; demo::DEMO_Z]);
    let mut model = seeded::<Train, _>(args.seed + 1, device, || {
        WanVae::new(config, device).expect("a valid config")
    });
    // The posterior's log-variance starts at -12 instead of about 0. The KL weight is small, so
    // it barely moves, and the sampled noise sets how much detail survives the latents while
    // they are small: unit noise (log-variance 0) held an earlier run at 9.7 dB PSNR for 300
    // steps, and -6 (noise 0.05 against latents of about 0.15) at 13.9 dB.
    let z = demo::DEMO_Z;
    let mut bias = model.quant_conv.bias.val().into_data().to_vec::<f32>()?;
    bias[z..].fill(-12.0);
    model.quant_conv.bias = Param::from_tensor(Tensor::from_data(TensorData::new(bias, [2 * z]), device));
    // Clipped: the VAE's channel-wise L2 norms give rare gradient spikes at this width, and one
    // spike in Adam's moments set an earlier run back by hundreds of steps.
    let optim = AdamConfig::new()
        .with_grad_clipping(Some(GradientClippingConfig::Norm(1.0)))
        .init::<Train, WanVae<Train>>();
    let ckpt = Checkpoint {
        dir: args.work.clone(),
        name: "vae",
    };
    let (mut model, mut optim, first) = ckpt.resume(model, optim, device)?;
    // Windows first, which are cheap, then whole clips: a window decodes at most two latent
    // frames, so only whole clips train the third with a cache filled by a four-frame chunk
    // (the 2,500-window run reached 18.8 dB on windows and 11.9 dB on whole held-out clips).
    let total = args.vae_steps + args.vae_clip_steps;
    let progress = bar(total, "vae");
    progress.set_position(first as u64);
    let mut smooth = None::<f32>;
    for step in first..total {
        let whole = step >= args.vae_steps;
        let (frames, lr) = if whole {
            let s = step - args.vae_steps;
            (FRAMES, learning_rate(args.vae_clip_lr, s, args.vae_clip_steps))
        } else {
            (VAE_WINDOW, learning_rate(args.vae_lr, step, args.vae_steps))
        };
        // Each step draws from its own stream, so that a resumed run draws what it would have.
        let mut rng = Rng::new(args.seed ^ 0x5AE0 ^ (step as u64).wrapping_mul(0x9E37_79B9));
        let mut batch = Vec::with_capacity(VAE_BATCH * 3 * frames * SIZE * SIZE);
        let mut weight = Vec::with_capacity(VAE_BATCH * frames * SIZE * SIZE);
        for j in 0..VAE_BATCH {
            let scene = clips::training_scene(args.seed, (step * VAE_BATCH + j) as u64);
            let start = if whole || rng.below(2) == 0 {
                0
            } else {
                FRAMES - VAE_WINDOW
            };
            batch.extend(window(&scene.render(), 3, start, frames));
            let objects = window(&scene.object_pixels(), 1, start, frames);
            weight.extend(objects.iter().map(|o| 1.0 + args.vae_object_weight * o));
        }
        let x = Tensor::<Train, 5>::from_data(TensorData::new(batch, [VAE_BATCH, 3, frames, SIZE, SIZE]), device);
        let weight = TensorData::new(weight, [VAE_BATCH, 1, frames, SIZE, SIZE]);
        let weight = Tensor::<Train, 5>::from_data(weight, device);
        let posterior = model.encode(x.clone())?;
        let eps: Vec<f32> = (0..posterior.mean.shape().num_elements())
            .map(|_| rng.normal())
            .collect();
        let eps = Tensor::<Train, 5>::from_data(TensorData::new(eps, posterior.mean.dims()), device);
        let z = posterior.mean.clone() + (posterior.logvar.clone() * 0.5).exp() * eps;
        let recon = model.decode_unclamped_for_training(z)?;
        let error = (recon - x).powi_scalar(2);
        let mse = error.clone().mean();
        // Normalised by the mean weight, so that the KL term keeps its share.
        let weighted = (error * weight.clone()).mean() / weight.mean();
        let kl = (posterior.mean.powi_scalar(2) + posterior.logvar.clone().exp() - posterior.logvar - 1.0).mean() * 0.5;
        let loss = weighted + kl.clone() * KL_WEIGHT;
        let mse_value = mse.into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr, model, grads);
        let s = match smooth {
            // The whole clips' error starts higher than the windows': restart the average.
            Some(s) if step != args.vae_steps => 0.95 * s + 0.05 * mse_value,
            _ => mse_value,
        };
        smooth = Some(s);
        log(
            &progress,
            step,
            format!("mse {s:.5} (psnr {:.1} dB) kl {:.3}", psnr(s), kl.into_scalar()),
        );
        if (step + 1) % CHECKPOINT_EVERY == 0 || step + 1 == total {
            ckpt.save(&model, &optim, step + 1)?;
        }
    }
    progress.finish();
    let vae = model.valid();
    save_safetensors(&vae, &args.work.join("vae_unnormalised.safetensors"))?;
    let (all, objects) = held_out_psnr(&vae, args.seed)?;
    println!("vae: held-out PSNR {all:.2} dB, {objects:.2} dB on the objects' pixels");
    Ok(())
}

fn psnr(mse: f32) -> f32 {
    // Pixels in [-1, 1]: the peak-to-peak range is 2.
    10.0 * (4.0 / mse.max(1e-12)).log10()
}

/// PSNR of whole 9-frame clips never used in training, reconstructed through the posterior
/// mean: over all pixels, and over those that show an object (a VAE can score well on the
/// backgrounds alone).
fn held_out_psnr(vae: &WanVae<Cpu>, seed: u64) -> Result<(f32, f32), TrainError> {
    let device = Default::default();
    let (mut total, mut on_objects, mut object_pixels) = (0.0, 0.0, 0.0);
    let n = 32;
    for i in 0..n {
        let scene = clips::training_scene(seed ^ 0xE7A1, i);
        let x = Tensor::<Cpu, 5>::from_data(TensorData::new(scene.render(), [1, 3, FRAMES, SIZE, SIZE]), &device);
        let mask = Tensor::<Cpu, 5>::from_data(
            TensorData::new(scene.object_pixels(), [1, 1, FRAMES, SIZE, SIZE]),
            &device,
        );
        let z = vae.encode(x.clone())?.mean;
        let error = (vae.decode(z)? - x).powi_scalar(2);
        total += error.clone().mean().into_scalar();
        on_objects += (error * mask.clone()).sum().into_scalar() / 3.0;
        object_pixels += mask.sum().into_scalar();
    }
    Ok((psnr(total / n as f32), psnr(on_objects / object_pixels.max(1.0))))
}

fn load_vae(args: &TrainOptions, mean: Vec<f64>, std: Vec<f64>) -> Result<WanVae<Cpu>, TrainError> {
    let device = Default::default();
    let vae = WanVae::<Cpu>::new(demo::vae_config(mean, std), &device)?;
    load_safetensors(vae, &args.work.join("vae_unnormalised.safetensors"))
}

/// A training clip's posterior, `[z, T, h, w]` row-major, its caption, and which latent cells
/// show an object (`[T, h, w]`, 1 or 0).
struct Encoded {
    mean: Vec<f32>,
    logvar: Vec<f32>,
    caption: String,
    objects: Vec<f32>,
}

fn encode_clips(vae: &WanVae<Cpu>, seed: u64, n: usize) -> Result<Vec<Encoded>, TrainError> {
    let device = Default::default();
    let progress = bar(n, "encode");
    let mut out = Vec::with_capacity(n);
    let (sf, tf) = (vae.config.spatial_factor(), vae.config.temporal_factor());
    for i in 0..n {
        let scene = clips::training_scene(seed, i as u64);
        let x = Tensor::<Cpu, 5>::from_data(TensorData::new(scene.render(), [1, 3, FRAMES, SIZE, SIZE]), &device);
        let p = vae.encode(x)?;
        out.push(Encoded {
            mean: p.mean.into_data().to_vec::<f32>()?,
            logvar: p.logvar.into_data().to_vec::<f32>()?,
            caption: scene.caption(),
            objects: scene.object_cells(sf, tf),
        });
        progress.inc(1);
    }
    progress.finish();
    Ok(out)
}

fn latent_stats(args: &TrainOptions) -> Result<(), TrainError> {
    let z = demo::DEMO_Z;
    let vae = load_vae(args, vec![0.0; z], vec![1.0; z])?;
    let latents = encode_clips(&vae, args.seed, 512)?;
    let per = latents[0].mean.len() / z;
    let (mut mean, mut std) = (vec![0.0f64; z], vec![0.0f64; z]);
    for c in 0..z {
        let values: Vec<f64> = latents
            .iter()
            .flat_map(|l| l.mean[c * per..(c + 1) * per].iter().map(|&v| v as f64))
            .collect();
        let mu = values.iter().sum::<f64>() / values.len() as f64;
        let var = values.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / values.len() as f64;
        mean[c] = mu;
        std[c] = var.sqrt().max(1e-3);
    }
    println!("latents mean {mean:.3?}\nlatents std {std:.3?}");
    let json = serde_json::json!({"latents_mean": mean, "latents_std": std});
    write_atomic(
        &args.out.join("vae_stats.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    save_safetensors(&vae, &args.out.join("vae.safetensors"))?;
    Ok(())
}

fn read_stats(dir: &Path) -> Result<(Vec<f64>, Vec<f64>), TrainError> {
    let path = dir.join("vae_stats.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).map_err(io(&path))?)?;
    let get = |k: &str| -> Result<Vec<f64>, TrainError> { Ok(serde_json::from_value(json[k].clone())?) };
    Ok((get("latents_mean")?, get("latents_std")?))
}

/// The frozen text encoder: the seeded random UMT5 over the demo tokenizer.
fn text_encoder(args: &TrainOptions) -> Result<TextEncoder<Cpu>, TrainError> {
    let device = Default::default();
    let path = args.out.join("tokenizer.json");
    let tokenizer = T5Tokenizer::from_json_bytes(&std::fs::read(&path).map_err(io(&path))?)?;
    let config = demo::text_config(tokenizer.vocab_size());
    let encoder = seeded::<Cpu, _>(args.seed, &device, || {
        Umt5Encoder::new(config, &device).expect("a valid config")
    });
    save_safetensors(&encoder, &args.out.join("text_encoder.safetensors"))?;
    Ok(TextEncoder::new(tokenizer, encoder, device))
}

fn train_dit(args: &TrainOptions, device: &burn::tensor::Device<Train>) -> Result<(), TrainError> {
    let (mean, std) = read_stats(&args.out)?;
    let vae = load_vae(args, mean.clone(), std.clone())?;
    let text = text_encoder(args)?;
    let latents = encode_clips(&vae, args.seed, args.dit_clips)?;
    let mut states: HashMap<String, Vec<f32>> = HashMap::new();
    for caption in latents.iter().map(|l| l.caption.as_str()).chain([""]) {
        if !states.contains_key(caption) {
            let s = text.encode_prompt(&[caption], demo::DEMO_TEXT_LEN)?;
            states.insert(caption.to_string(), s.into_data().to_vec::<f32>()?);
        }
    }
    let z = demo::DEMO_Z;
    let (sf, tf) = (vae.config.spatial_factor(), vae.config.temporal_factor());
    let [lt, lh, lw] = [(FRAMES - 1) / tf + 1, SIZE / sf, SIZE / sf];
    let per = lt * lh * lw;
    let width = text.encoder.config.d_model;

    let model = seeded::<Train, _>(args.seed + 2, device, || {
        WanTransformer::new(demo::dit_config(), device).expect("a valid config")
    });
    let optim = AdamConfig::new().init::<Train, WanTransformer<Train>>();
    let ckpt = Checkpoint {
        dir: args.work.clone(),
        name: "dit",
    };
    let (mut model, mut optim, first) = ckpt.resume(model, optim, device)?;
    let progress = bar(args.dit_steps, "dit");
    progress.set_position(first as u64);
    let mut smooth = None::<f32>;
    for step in first..args.dit_steps {
        let mut rng = Rng::new(args.seed ^ 0xD17 ^ (step as u64).wrapping_mul(0x9E37_79B9));
        let (mut xt, mut target, mut context, mut timesteps) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut weight = Vec::with_capacity(DIT_BATCH * per);
        for _ in 0..DIT_BATCH {
            let Encoded {
                mean: m,
                logvar: lv,
                caption,
                objects,
            } = &latents[rng.below(latents.len())];
            weight.extend(objects.iter().map(|o| 1.0 + args.dit_object_weight * o));
            let sigma = {
                let t = rng.unit();
                SHIFT * t / (1.0 + (SHIFT - 1.0) * t)
            };
            for c in 0..z {
                for k in 0..per {
                    let i = c * per + k;
                    // A posterior sample, normalised as the pipeline's latents are.
                    let x0 = ((m[i] + (0.5 * lv[i]).exp() * rng.normal()) as f64 - mean[c]) / std[c];
                    let noise = rng.normal();
                    xt.push((1.0 - sigma) * x0 as f32 + sigma * noise);
                    target.push(noise - x0 as f32);
                }
            }
            let caption = if rng.unit() < DROP_CAPTION {
                ""
            } else {
                caption.as_str()
            };
            context.extend_from_slice(&states[caption]);
            timesteps.push(sigma as f64 * 1000.0);
        }
        let shape = [DIT_BATCH, z, lt, lh, lw];
        let xt = Tensor::<Train, 5>::from_data(TensorData::new(xt, shape), device);
        let target = Tensor::<Train, 5>::from_data(TensorData::new(target, shape), device);
        let context = Tensor::<Train, 3>::from_data(
            TensorData::new(context, [DIT_BATCH, demo::DEMO_TEXT_LEN, width]),
            device,
        );
        let weight = TensorData::new(weight, [DIT_BATCH, 1, lt, lh, lw]);
        let weight = Tensor::<Train, 5>::from_data(weight, device);
        let pred = model.forward(xt, &timesteps, context)?;
        // Normalised by the mean weight, so that the loss reads as a mean squared error.
        let loss = ((pred - target).powi_scalar(2) * weight.clone()).mean() / weight.mean();
        let value = loss.clone().into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(learning_rate(args.dit_lr, step, args.dit_steps), model, grads);
        let s = smooth.map_or(value, |s| 0.98 * s + 0.02 * value);
        smooth = Some(s);
        log(&progress, step, format!("loss {s:.4}"));
        if (step + 1) % CHECKPOINT_EVERY == 0 || step + 1 == args.dit_steps {
            ckpt.save(&model, &optim, step + 1)?;
        }
    }
    progress.finish();
    save_safetensors(&model.valid(), &args.out.join("transformer.safetensors"))?;
    Ok(())
}
