//! Command-line arguments shared by the `chitu` binary and the model examples, one clap `Args`
//! per concern: the model, the request, the outputs. The CLI's own wording (hints such as "try
//! `--low-mem`") lives here, not in the library's errors.

mod memory;
mod prompts;
pub use memory::LowMem;
pub use prompts::{FieldError, Request};

use crate::pipeline::{
    ConditionImage, DiffusionBackend, DiffusionUserParams, GenError, LoadOptions, LoraSpec, Precision, Video, Weights,
};
use burn::tensor::backend::Backend;
use chitu_cache::CacheConfig;
use chitu_sched::{SolverKind, StepList};
use std::path::PathBuf;

/// Errors of turning arguments into a request, or of writing the outputs.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// `--cache` or `--cache-threshold` is invalid.
    #[error("--cache: {0}")]
    Cache(#[source] chitu_cache::CacheError),
    /// The output folder cannot be created or written.
    #[error("output folder {}: {source}", path.display())]
    OutDir {
        /// The folder.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A prompt file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    PromptFile {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A line of `--prompts-file` is not a request.
    #[error("{}:{line}: {message}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// Ctrl-C stopped the run at a step boundary.
    #[error("interrupted (Ctrl-C) before {0}; nothing was written")]
    Interrupted(String),
    /// Generation or writing failed.
    #[error(transparent)]
    Gen(#[from] GenError),
}

/// Which model to load, and how.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A diffusers-layout Wan2.1/2.2 folder or a Wan release folder; the embedded model
    /// (`--embedded`) when omitted.
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// The model built into the binary, used without `--model-dir`: `tiny`, random weights at
    /// 64x64 that only show the engine running, or `demo`, the toy trained on coloured shapes
    /// (`examples/train_demo.rs`), in a build that has its trained files.
    #[arg(long, value_enum, default_value_t = Embedded::Tiny, conflicts_with = "model_dir")]
    pub embedded: Embedded,
    /// Memory saving level: 1 decodes the VAE in tiles; 2 also keeps the text encoder off the
    /// device except while it encodes; 3 also keeps only the active DiT on the device. On a GPU
    /// a model off the device waits in host memory; on the CPU it is dropped and read again
    /// from its files when needed. `auto` (the default) chooses the level and the weight format
    /// for a model folder before loading it: the cheapest plan that fits the memory budget,
    /// printed as a table; it also retries a stage that runs out of device memory once.
    #[arg(long, default_value_t = LowMem::Auto)]
    pub low_mem: LowMem,
    /// The memory budget for `--low-mem auto`, in GB; by default the memory available now on
    /// the CPU (a GPU's memory is not read: pass its size).
    #[arg(long, value_parser = memory::budget_gb)]
    pub memory_budget: Option<f64>,
    /// Retry a stage that runs out of device memory once, at the next memory level (always on
    /// under `--low-mem auto`).
    #[arg(long)]
    pub oom_retry: bool,
    /// The dtype of the DiT's and the text encoder's weights: f32, bf16 or f16. The parts
    /// diffusers keeps in f32 (embedders, modulation, norms) stay f32, and so do the
    /// activations, latents and the scheduler.
    #[arg(long, default_value_t = Precision::Bf16)]
    pub dtype: Precision,
    /// The dtype of the VAE's weights (f32, bf16 or f16); f32 unless asked, as diffusers keeps it.
    #[arg(long, default_value_t = Precision::F32, value_parser = vae_dtype)]
    pub vae_dtype: Precision,
    /// How the DiT's and the text encoder's linear layers are held: `float` (in --dtype) or
    /// `int8` (quantized at load, one scale per 64 weights: about half of bf16's memory). Left
    /// to `--low-mem auto`'s plan when not given; `float` otherwise.
    #[arg(long)]
    pub weights: Option<Weights>,
    /// A LoRA to merge into the DiT: `PATH[:STRENGTH[:EXPERT]]`, strength 1 and expert `both`
    /// by default; on Wan2.2-A14B `high` is `transformer/` and `low` is `transformer_2/`.
    /// Repeat it for several, applied in order. Wan/ComfyUI, diffusers/PEFT and musubi-tuner
    /// keys are read.
    #[arg(long = "lora", value_name = "PATH[:STRENGTH[:EXPERT]]", value_parser = parse_lora)]
    pub loras: Vec<LoraSpec>,
    /// Apply the keys of each LoRA that fit the model and print those skipped, instead of
    /// refusing a LoRA with any key that does not fit.
    #[arg(long, requires = "loras")]
    pub lora_partial: bool,
}

/// The models built into the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Embedded {
    /// The demo model: trained in this project on 32x32 clips of coloured shapes.
    Demo,
    /// Random weights with a fixed seed, at 64x64: it shows the pipeline runs, not quality.
    Tiny,
}

fn parse_lora(s: &str) -> Result<LoraSpec, String> {
    s.parse()
}

/// `--vae-dtype`, refusing an 8-bit request by name: the VAE's convolutions have no 8-bit path.
fn vae_dtype(s: &str) -> Result<Precision, String> {
    if s.trim().parse::<Weights>() == Ok(Weights::Int8) {
        return Err("the VAE has no 8-bit path (its convolutions run in f32, bf16 or f16); \
                    --weights int8 quantizes the DiT and the text encoder"
            .into());
    }
    s.parse::<Precision>().map_err(|e| e.to_string())
}

impl ModelArgs {
    /// The load options these arguments ask for.
    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            low_mem: self.low_mem.level(),
            dtype: self.dtype,
            vae_dtype: self.vae_dtype,
            weights: self.weights.unwrap_or_default(),
            release_after_use: false,
            loras: self.loras.clone(),
            lora_partial: self.lora_partial,
        }
    }

    /// The defaults a request starts from: for a Wan release folder, its Wan config's (steps,
    /// guidance, frames, size); diffusers' (Wan2.1's) for a diffusers folder; the embedded
    /// model's own small size otherwise.
    pub fn defaults(&self) -> DiffusionUserParams {
        match &self.model_dir {
            Some(dir) if crate::pipeline::is_wan_native(dir) => {
                let d = crate::pipeline::WanNativeConfig::for_dir(dir).defaults;
                DiffusionUserParams {
                    num_inference_steps: d.steps,
                    guidance_scale: d.guidance,
                    guidance_scale_2: d.guidance_2,
                    num_frames: d.frames,
                    height: d.size.0,
                    width: d.size.1,
                    ..DiffusionUserParams::default()
                }
            }
            Some(_) => DiffusionUserParams::default(),
            None => match self.embedded {
                Embedded::Demo => DiffusionUserParams::demo(String::new()),
                Embedded::Tiny => DiffusionUserParams::tiny(String::new()),
            },
        }
    }

    /// Loads the model on `device` as `plan` says (from [`ModelArgs::plan`]), or as the
    /// arguments say without one, with [`ModelArgs::defaults`]. With `one_request` each model is
    /// released once its stage is over ([`LoadOptions::release_after_use`]).
    pub fn load<B: Backend>(
        &self,
        device: &B::Device,
        one_request: bool,
        plan: Option<&crate::pipeline::MemoryPlan>,
    ) -> Result<(DiffusionBackend<B>, DiffusionUserParams), GenError> {
        let options = LoadOptions {
            release_after_use: one_request,
            loras: self.loras.clone(),
            lora_partial: self.lora_partial,
            ..plan.map_or_else(|| self.options(), |p| p.options())
        };
        let backend = match &self.model_dir {
            Some(dir) => DiffusionBackend::load(dir, device, options)?,
            None => {
                let format = self.options().format();
                let backend = match self.embedded {
                    Embedded::Demo => DiffusionBackend::embedded_demo_as(device, format)?,
                    Embedded::Tiny => DiffusionBackend::embedded_tiny_as(device, format)?,
                };
                backend.apply_lora(&self.loras, self.lora_partial)?;
                backend
            }
        };
        Ok((backend, self.defaults()))
    }
}

/// The solvers `--solver` picks by name, with Wan's settings. Without `--solver` a model
/// folder's own scheduler config runs, which may name any of diffusers'
/// `UniPCMultistepScheduler`, `DPMSolverMultistepScheduler` or `FlowMatchEulerDiscreteScheduler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SolverArg {
    /// UniPC, bh2, order 2 (Wan's default).
    Unipc,
    /// DPM-Solver++ order 2, midpoint.
    #[value(name = "dpm++", alias = "dpmpp", alias = "dpm")]
    DpmPlusPlus,
    /// First-order flow-matching Euler.
    Euler,
}

impl From<SolverArg> for SolverKind {
    fn from(s: SolverArg) -> Self {
        match s {
            SolverArg::Unipc => SolverKind::UniPc,
            SolverArg::DpmPlusPlus => SolverKind::DpmPlusPlus,
            SolverArg::Euler => SolverKind::Euler,
        }
    }
}

/// What to generate: the request's fields, each left at the model's default when omitted.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).multiple(false)))]
pub struct RequestArgs {
    /// What to generate.
    #[arg(long, group = "source")]
    pub prompt: Option<String>,
    /// Read the prompt from this file (for long prompts, or characters a shell mangles).
    #[arg(long, group = "source")]
    pub prompt_file: Option<PathBuf>,
    /// One request per line, run in sequence with the model loaded once: a plain-text prompt,
    /// or a JSON object with this command's flag names (`{"prompt": "...", "seed": 3}`); other
    /// flags are the defaults. Each video is named after its line; a bad line fails only its
    /// own request, and the run ends with the list of those that failed.
    #[arg(long, group = "source")]
    pub prompts_file: Option<PathBuf>,
    /// The unconditional prompt.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Denoise steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// The steps as training timesteps, as LightX2V's `denoising_step_list` for its 4-step
    /// LoRAs: `1000,750,500,250`. Each is shifted by the flow shift (`--shift 5` for those
    /// LoRAs) and the run steps with Euler; `--steps` defaults to the list's length.
    #[arg(long, value_delimiter = ',', num_args = 1.., conflicts_with = "sigmas")]
    pub timesteps: Option<Vec<f64>>,
    /// The steps as noise levels in (0, 1], descending, used as given (no shift), stepped with
    /// Euler; `--steps` defaults to the list's length.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub sigmas: Option<Vec<f64>>,
    /// Height in pixels, a multiple of 16 (32 for Wan2.2 TI2V-5B).
    #[arg(long)]
    pub height: Option<usize>,
    /// Width in pixels, a multiple of 16 (32 for Wan2.2 TI2V-5B).
    #[arg(long)]
    pub width: Option<usize>,
    /// Frame count, 4k+1.
    #[arg(long)]
    pub frames: Option<usize>,
    /// Classifier-free guidance scale (of the high-noise expert on Wan2.2-A14B).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Guidance of the low-noise expert (Wan2.2-A14B).
    #[arg(long)]
    pub guidance_2: Option<f64>,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A solver by name, with Wan's settings; the folder's scheduler config when omitted.
    #[arg(long, value_enum)]
    pub solver: Option<SolverArg>,
    /// Flow shift; the folder's when omitted.
    #[arg(long)]
    pub shift: Option<f64>,
    /// Text tokens the prompt is padded or cut to.
    #[arg(long)]
    pub max_sequence_length: Option<usize>,
    /// FlexCache policy: teacache, pab, first_block_cache or taylorseer, or a JSON object such
    /// as '{"policy": "pab", "skip_self_range": 3}'.
    #[arg(long)]
    pub cache: Option<String>,
    /// Threshold of teacache or first_block_cache.
    #[arg(long, requires = "cache")]
    pub cache_threshold: Option<f64>,
    /// A PNG or JPEG to start the video from (image-to-video: Wan2.2 TI2V-5B, I2V-A14B). It is
    /// scaled to cover the request size and center-cropped.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// A PNG or JPEG to end the video on (first-last-frame, on I2V-A14B).
    #[arg(long, requires = "image")]
    pub last_image: Option<PathBuf>,
    /// Refuse a picture of another size than the request's instead of fitting it.
    #[arg(long)]
    pub no_resize: bool,
}

impl RequestArgs {
    /// No field given: every value is the model's default (seed 0, no negative prompt), and no
    /// prompt yet.
    pub fn empty() -> Self {
        Self {
            prompt: None,
            prompt_file: None,
            prompts_file: None,
            negative_prompt: String::new(),
            steps: None,
            timesteps: None,
            sigmas: None,
            height: None,
            width: None,
            frames: None,
            guidance: None,
            guidance_2: None,
            seed: 0,
            solver: None,
            shift: None,
            max_sequence_length: None,
            cache: None,
            cache_threshold: None,
            image: None,
            last_image: None,
            no_resize: false,
        }
    }

    /// `base` (the model's defaults) with every given field set; `low_mem` comes from the model
    /// arguments, so a request never runs below the level its backend was loaded at.
    pub fn params(&self, base: DiffusionUserParams, low_mem: u8) -> Result<DiffusionUserParams, CliError> {
        let cache = match &self.cache {
            Some(spec) => {
                let config = CacheConfig::parse(spec).map_err(CliError::Cache)?;
                Some(match self.cache_threshold {
                    Some(t) => config.with_threshold(t).map_err(CliError::Cache)?,
                    None => config,
                })
            }
            None => None,
        };
        let step_list = match (&self.timesteps, &self.sigmas) {
            (Some(t), _) => Some(StepList::Timesteps(t.clone())),
            (None, Some(s)) => Some(StepList::Sigmas(s.clone())),
            (None, None) => base.step_list.clone(),
        };
        let steps = self
            .steps
            .or(step_list.as_ref().map(StepList::len))
            .unwrap_or(base.num_inference_steps);
        Ok(DiffusionUserParams {
            prompt: self.prompt.clone().unwrap_or_default(),
            negative_prompt: self.negative_prompt.clone(),
            seed: self.seed,
            height: self.height.unwrap_or(base.height),
            width: self.width.unwrap_or(base.width),
            num_frames: self.frames.unwrap_or(base.num_frames),
            num_inference_steps: steps,
            guidance_scale: self.guidance.unwrap_or(base.guidance_scale),
            guidance_scale_2: self.guidance_2.or(base.guidance_scale_2),
            solver: self.solver.map(SolverKind::from),
            shift: self.shift.or(base.shift),
            step_list,
            max_sequence_length: self.max_sequence_length.unwrap_or(base.max_sequence_length),
            low_mem,
            cache,
            image: self.picture(self.image.as_ref())?.or(base.image),
            last_image: self.picture(self.last_image.as_ref())?.or(base.last_image),
        })
    }

    /// The picture at `path`, decoded now so that a missing or corrupt file fails before any
    /// model work.
    fn picture(&self, path: Option<&PathBuf>) -> Result<Option<ConditionImage>, CliError> {
        match path {
            None => Ok(None),
            Some(p) => {
                let img = ConditionImage::open(p).map_err(GenError::from)?;
                Ok(Some(img.with_resize(!self.no_resize)))
            }
        }
    }
}

/// Where the outputs go.
#[derive(Debug, Clone, clap::Args)]
pub struct OutputArgs {
    /// Folder for the outputs.
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
    /// Also write one PNG per frame.
    #[arg(long)]
    pub png_frames: bool,
}

impl OutputArgs {
    /// Creates the output folder and checks that it takes files, before any work starts.
    pub fn prepare(&self) -> Result<(), CliError> {
        let err = |source| CliError::OutDir {
            path: self.out.clone(),
            source,
        };
        std::fs::create_dir_all(&self.out).map_err(err)?;
        let probe = self.out.join(format!(".chitu-write-check-{}", std::process::id()));
        std::fs::write(&probe, b"").map_err(err)?;
        std::fs::remove_file(&probe).map_err(err)
    }

    /// Writes the MP4 and the contact sheet (and the frames when asked) under `out`, which
    /// [`OutputArgs::prepare`] made, named `stem`; returns the paths. Each file appears whole or
    /// not at all; the caller writes the sidecar last.
    pub fn write(&self, video: &Video, stem: &str) -> Result<Vec<PathBuf>, CliError> {
        let mp4 = self.out.join(format!("{stem}.mp4"));
        let sheet = self.out.join(format!("{stem}.png"));
        video.save_mp4(&mp4).map_err(GenError::from)?;
        video.save_png_sheet(&sheet).map_err(GenError::from)?;
        let mut files = vec![mp4, sheet];
        if self.png_frames {
            files.extend(video.save_png_frames(&self.out, stem).map_err(GenError::from)?);
        }
        Ok(files)
    }
}

/// Everything `chitu generate` and the model examples take for one video: the model, the request
/// and the outputs.
#[derive(Debug, Clone, clap::Args)]
pub struct JobArgs {
    /// Which model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// What to generate.
    #[command(flatten)]
    pub request: RequestArgs,
    /// Where the files go.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// What the CLI suggests after an error, when it has a suggestion.
pub fn hint(e: &GenError) -> Option<&'static str> {
    match e {
        GenError::OutOfMemory { .. } => Some(
            "try --low-mem 1 (tiled VAE decode), 2 (text encoder off the device) or 3 (only the active DiT on the device), fewer frames or a smaller size",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_suggests_the_memory_levels() {
        let e = GenError::OutOfMemory {
            stage: "VAE decode".into(),
            detail: "can't allocate buffer of size: 8".into(),
        };
        assert!(hint(&e).is_some_and(|h| h.contains("--low-mem")));
        assert!(hint(&GenError::NonFinite("x".into())).is_none());
    }
}
