//! The Generator: text encoding, the denoise loop with classifier-free guidance and the Wan2.2
//! expert switch, and VAE decoding, staged so that one call advances one unit of work.

use crate::offload::{parks_dits, parks_text};
use crate::{DiffusionBackend, DiffusionUserParams, GenError};
use burn::tensor::{backend::Backend, ElementConversion, Tensor, TensorData};
use chitu_cache::{Branch, CachePolicy, CacheStats, DitCall};
use chitu_dist::{Mesh, TensorComm, UlyssesGroup};
use chitu_dit::{DitRunner, SeqParallel, WanTransformer};
use chitu_sched::Scheduler;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::sync::Arc;
use std::time::Instant;

/// Where a task is in the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    TextEncode,
    /// One scheduler step per `generate_step` call.
    Denoise,
    VaeDecode,
    Done,
}

/// Intermediate state of a task (Chitu's `task.buffer`).
#[derive(Default)]
pub struct TaskBuffer<B: Backend> {
    /// Prompt embeddings `[1, L, d]`.
    pub cond: Option<Tensor<B, 3>>,
    /// Negative-prompt embeddings, when guidance is on.
    pub uncond: Option<Tensor<B, 3>>,
    /// Current latents `[1, 16, T, h, w]`.
    pub latents: Option<Tensor<B, 5>>,
    /// Denoise steps taken.
    pub current_step: usize,
    /// The scheduler of this task, once text encoding has built it.
    pub scheduler: Option<Box<dyn Scheduler<B>>>,
    /// The decoded video `[1, 3, F, H, W]` in [-1, 1].
    pub video: Option<Tensor<B, 5>>,
    /// Seconds spent per stage: text, denoise, decode.
    pub timings: StageTimings,
}

/// Wall time per stage, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimings {
    pub text_encode: f64,
    pub denoise: f64,
    pub vae_decode: f64,
}

/// One generation request moving through the stages.
pub struct DiffusionTask<B: Backend> {
    pub params: DiffusionUserParams,
    pub stage: Stage,
    pub buffer: TaskBuffer<B>,
    initial_latents: Option<Tensor<B, 5>>,
    /// The latents denoising started from (the cache check reruns from them).
    start_latents: Option<Tensor<B, 5>>,
    /// Pins the pool model and guidance (stage plans); the timestep boundary decides otherwise.
    pub(crate) expert_override: Option<(usize, f64)>,
    /// The request's FlexCache policy, with its state for this run.
    cache: Option<Box<dyn CachePolicy<B>>>,
}

impl<B: Backend> DiffusionTask<B> {
    /// A task for validated `params`, starting from seeded noise.
    pub fn from_user_request(params: DiffusionUserParams) -> Result<Self, GenError> {
        params.validate()?;
        let cache = match &params.cache {
            Some(config) => Some(chitu_cache::build::<B>(config).map_err(|e| GenError::Params(e.to_string()))?),
            None => None,
        };
        Ok(Self {
            params,
            stage: Stage::TextEncode,
            buffer: TaskBuffer::default(),
            initial_latents: None,
            start_latents: None,
            expert_override: None,
            cache,
        })
    }

    /// The latents denoising started from, once text encoding has set them.
    pub fn start_latents(&self) -> Option<Tensor<B, 5>> {
        self.start_latents.clone()
    }

    /// The cache policy's counters, when the request uses one.
    pub fn cache_stats(&self) -> Option<CacheStats> {
        self.cache.as_ref().map(|c| c.stats())
    }

    /// Starts from the given latents instead of seeded noise (how the parity cases run).
    pub fn with_initial_latents(mut self, latents: Tensor<B, 5>) -> Self {
        self.initial_latents = Some(latents);
        self
    }

    /// Whether the video is decoded.
    pub fn is_finished(&self) -> bool {
        self.stage == Stage::Done
    }
}

/// Standard-normal latents from `seed`, drawn on the host with ChaCha8 so that a seed gives the
/// same noise on every machine and backend.
pub fn seeded_noise<B: Backend>(seed: u64, shape: [usize; 5], device: &B::Device) -> Tensor<B, 5> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// Runs tasks on one [`DiffusionBackend`].
pub struct Generator<B: Backend> {
    pub backend: DiffusionBackend<B>,
    /// Check latents for NaN/Inf after every step (on by default).
    pub check_nan_enabled: bool,
    parallel: Option<Parallel<B>>,
}

/// This rank's place in a parallel run.
struct Parallel<B: Backend> {
    mesh: Mesh,
    /// The context-parallel group as the DiT's sequence-parallel seam.
    seq: Arc<dyn SeqParallel<B>>,
}

impl<B: Backend> Generator<B> {
    pub fn new(backend: DiffusionBackend<B>) -> Self {
        Self {
            backend,
            check_nan_enabled: true,
            parallel: None,
        }
    }

    /// Runs as one rank of `mesh`: every rank of the mesh must build its own generator and run
    /// the same requests. With `cfg = 2` the two guidance branches run on the two ranks of each
    /// CFG pair; with `cp > 1` the DiT's tokens are split over the CP group (Ulysses). Latents
    /// stay identical on every rank; only the mesh's output rank decodes the video.
    pub fn with_mesh(mut self, mesh: Mesh) -> Self {
        let seq: Arc<dyn SeqParallel<B>> = Arc::new(UlyssesGroup::<B>::new(mesh.cp.clone()));
        self.parallel = (mesh.layout.world() > 1).then_some(Parallel { mesh, seq });
        self
    }

    /// The mesh this generator runs in, when parallel.
    pub fn mesh(&self) -> Option<&Mesh> {
        self.parallel.as_ref().map(|p| &p.mesh)
    }

    /// Whether this rank decodes and writes the video (always, without a mesh).
    pub fn is_output_rank(&self) -> bool {
        self.mesh().is_none_or(|m| m.is_output_rank())
    }

    /// The one guidance branch this rank runs under CFG parallelism, for a request with guidance.
    fn cfg_branch(&self, params: &DiffusionUserParams) -> Option<Branch> {
        let mesh = self.mesh()?;
        (mesh.layout.cfg == 2 && params.cfg()).then(|| match mesh.cfg.rank() {
            0 => Branch::Cond,
            _ => Branch::Uncond,
        })
    }

    /// The DiT runner of `model` on this rank: local, or sharded over the CP group.
    fn runner<'a>(&'a self, model: &'a WanTransformer<B>) -> DitRunner<'a, B> {
        match &self.parallel {
            Some(p) if p.mesh.layout.cp > 1 => DitRunner::sharded(model, p.seq.clone()),
            _ => DitRunner::local(model),
        }
    }

    /// Prompt embeddings `[1, max_len, d]` as the pipeline gives the DiT (zero past the prompt).
    pub fn encode_text(&self, prompt: &str, max_len: usize) -> Result<Tensor<B, 3>, GenError> {
        self.backend
            .text
            .with(|text| text.encode_prompt(&[prompt], max_len))?
            .map_err(|e| GenError::Stage(format!("text encode: {e}")))
    }

    /// Fails if `tensor` holds NaN or Inf, naming where.
    pub fn check_nan(&self, tensor: &Tensor<B, 5>, name: &str) -> Result<(), GenError> {
        let any = |t: Tensor<B, 1, burn::tensor::Bool>| t.int().into_scalar().elem::<i64>() != 0;
        let bad = any(tensor.clone().is_nan().any()) || any(tensor.clone().is_inf().any());
        if bad {
            Err(GenError::NonFinite(name.to_string()))
        } else {
            Ok(())
        }
    }

    /// Builds the task's scheduler: the folder's config, or the requested solver, with the
    /// requested shift.
    pub(crate) fn scheduler(&self, params: &DiffusionUserParams) -> Result<Box<dyn Scheduler<B>>, GenError> {
        let cfg = &self.backend.scheduler_config;
        let err = |e: chitu_sched::SchedError| GenError::Stage(format!("scheduler: {e}"));
        let mut sched = match params.solver {
            None => {
                let mut cfg = cfg.clone();
                if let (Some(shift), Some(obj)) = (params.shift, cfg.as_object_mut()) {
                    let key = if obj.contains_key("flow_shift") {
                        "flow_shift"
                    } else {
                        "shift"
                    };
                    obj.insert(key.into(), shift.into());
                }
                chitu_sched::from_config_json::<B, 5>(&cfg).map_err(err)?
            }
            Some(kind) => {
                let folder_shift = cfg
                    .get("flow_shift")
                    .or_else(|| cfg.get("shift"))
                    .and_then(|v| v.as_f64());
                chitu_sched::for_solver::<B, 5>(kind, params.shift.or(folder_shift).unwrap_or(5.0)).map_err(err)?
            }
        };
        sched.set_timesteps(params.num_inference_steps).map_err(err)?;
        Ok(sched)
    }

    /// Which pool model and guidance scale denoise at timestep `t`.
    fn expert(&self, t: f64, params: &DiffusionUserParams) -> (usize, f64) {
        let train_steps = self
            .backend
            .scheduler_config
            .get("num_train_timesteps")
            .and_then(|v| v.as_f64())
            .unwrap_or(1000.0);
        match self.backend.boundary_ratio {
            Some(ratio) if t < ratio * train_steps => (1, params.guidance_scale_2.unwrap_or(params.guidance_scale)),
            _ => (0, params.guidance_scale),
        }
    }

    /// One scheduler step: the velocity of the active expert at the step's timestep, with
    /// classifier-free guidance `uncond + g * (cond - uncond)`, then the scheduler update.
    fn denoise_step(&self, task: &mut DiffusionTask<B>) -> Result<(), GenError> {
        let buf = &mut task.buffer;
        let sched = buf
            .scheduler
            .as_mut()
            .ok_or_else(|| GenError::Stage("denoise before text encode".into()))?;
        let step = buf.current_step;
        let t = sched.timesteps()[step];
        let (expert, guidance) = task.expert_override.unwrap_or_else(|| self.expert(t, &task.params));
        let pool = &self.backend.model_pool;
        let slot = pool.get(expert).ok_or_else(|| {
            GenError::Params(format!("the model pool has {} model(s), no model {expert}", pool.len()))
        })?;
        if parks_dits(task.params.low_mem) {
            // Only the active expert on the device: park the other one before this one returns.
            self.backend.park_dits_except(Some(expert))?;
        }
        let latents = buf.latents.take().ok_or_else(|| GenError::Stage("no latents".into()))?;
        let num_steps = task.params.num_inference_steps;
        let cache = &mut task.cache;
        let cfg_branch = self.cfg_branch(&task.params);
        let (cond, uncond) = (&buf.cond, &buf.uncond);
        let velocity = slot.with(|model| {
            let runner = self.runner(model);
            let mut run = |ctx: Option<Tensor<B, 3>>, branch: Branch| {
                let ctx = ctx.ok_or_else(|| GenError::Stage(format!("no {branch:?} text embeddings")))?;
                let call = DitCall {
                    step,
                    num_steps,
                    branch,
                    expert,
                };
                match cache {
                    Some(policy) => policy.forward(&runner, call, latents.clone(), t, ctx),
                    None => runner.forward(latents.clone(), &[t], ctx, &mut chitu_dit::NoHook),
                }
                .map_err(|e| GenError::Stage(format!("denoise step {step}: {e}")))
            };
            match cfg_branch {
                // CFG parallel: this rank's branch, then both predictions on both ranks of the pair.
                Some(branch) => {
                    let ctx = match branch {
                        Branch::Cond => cond.clone(),
                        Branch::Uncond => uncond.clone(),
                    };
                    let mine = run(ctx, branch)?;
                    let pair = &self.mesh().expect("a CFG branch implies a mesh").cfg;
                    let both = pair.all_gather(mine, 0).map_err(|e| {
                        GenError::Parallel(format!("denoise step {step}: gathering the CFG branches: {e}"))
                    })?;
                    let (v_cond, v_uncond) = (both.clone().narrow(0, 0, 1), both.narrow(0, 1, 1));
                    Ok(v_uncond.clone() + (v_cond - v_uncond).mul_scalar(guidance as f32))
                }
                None => {
                    let v_cond = run(cond.clone(), Branch::Cond)?;
                    match uncond.clone() {
                        Some(uncond) => {
                            let v_uncond = run(Some(uncond), Branch::Uncond)?;
                            Ok(v_uncond.clone() + (v_cond - v_uncond).mul_scalar(guidance as f32))
                        }
                        None => Ok(v_cond),
                    }
                }
            }
        })??;
        let next = sched
            .step(velocity, t, latents)
            .map_err(|e| GenError::Stage(format!("scheduler step {step}: {e}")))?;
        if self.check_nan_enabled {
            self.check_nan(&next, &format!("latents after denoise step {step} (t={t})"))?;
        }
        buf.latents = Some(next);
        buf.current_step += 1;
        Ok(())
    }

    /// Advances `task` by exactly one unit: text encoding, one denoise step, or the VAE decode.
    ///
    /// A device allocation failure comes back as [`GenError::OutOfMemory`] naming the stage.
    pub fn generate_step(&self, task: &mut DiffusionTask<B>) -> Result<(), GenError> {
        let stage = task.stage;
        let step = task.buffer.current_step;
        crate::oom::guard(
            || match stage {
                Stage::TextEncode => "text encode".into(),
                Stage::Denoise => format!("denoise step {step}"),
                Stage::VaeDecode => "VAE decode".into(),
                Stage::Done => "done".into(),
            },
            || self.advance(task),
        )
    }

    fn advance(&self, task: &mut DiffusionTask<B>) -> Result<(), GenError> {
        let t0 = Instant::now();
        match task.stage {
            Stage::TextEncode => {
                let p = &task.params;
                if parks_dits(p.low_mem) {
                    // No DiT is active while the prompt is encoded.
                    self.backend.park_dits_except(None)?;
                }
                // Under CFG parallelism each rank encodes only the prompt of its own branch.
                let branch = self.cfg_branch(p);
                if branch != Some(Branch::Uncond) {
                    task.buffer.cond = Some(self.encode_text(&p.prompt, p.max_sequence_length)?);
                }
                if p.cfg() && branch != Some(Branch::Cond) {
                    task.buffer.uncond = Some(self.encode_text(&p.negative_prompt, p.max_sequence_length)?);
                }
                if parks_text(p.low_mem) {
                    self.backend.text.park()?;
                }
                task.buffer.scheduler = Some(self.scheduler(p)?);
                let shape = p.latent_shape(self.backend.vae.config.z_dim);
                let latents = match task.initial_latents.take() {
                    Some(l) if l.dims() == shape => l,
                    Some(l) => {
                        return Err(GenError::Params(format!(
                            "initial latents {:?} do not match the request's {shape:?}",
                            l.dims()
                        )))
                    }
                    None => seeded_noise(p.seed, shape, &self.backend.device),
                };
                task.start_latents = Some(latents.clone());
                task.buffer.latents = Some(latents);
                task.buffer.timings.text_encode += t0.elapsed().as_secs_f64();
                task.stage = Stage::Denoise;
            }
            Stage::Denoise => {
                self.denoise_step(task)?;
                task.buffer.timings.denoise += t0.elapsed().as_secs_f64();
                if task.buffer.current_step == task.params.num_inference_steps {
                    task.stage = Stage::VaeDecode;
                }
            }
            Stage::VaeDecode if !self.is_output_rank() => {
                // The video is decoded and written once, by the output rank.
                task.stage = Stage::Done;
            }
            Stage::VaeDecode => {
                self.backend.park_for(task.params.low_mem)?;
                let latents = task
                    .buffer
                    .latents
                    .clone()
                    .ok_or_else(|| GenError::Stage("no latents".into()))?;
                task.buffer.video = Some(if task.params.low_mem >= 1 {
                    self.decode_vae_tiled(latents)?
                } else {
                    self.decode_vae(latents)?
                });
                task.buffer.timings.vae_decode += t0.elapsed().as_secs_f64();
                task.stage = Stage::Done;
            }
            Stage::Done => {}
        }
        Ok(())
    }

    /// Progress from 0 to 1: text encoding and decoding count as one step each.
    pub fn get_progress(&self, task: &DiffusionTask<B>) -> f64 {
        let total = task.params.num_inference_steps + 2;
        let done = match task.stage {
            Stage::TextEncode => 0,
            Stage::Denoise => 1 + task.buffer.current_step,
            Stage::VaeDecode => 1 + task.params.num_inference_steps,
            Stage::Done => total,
        };
        done as f64 / total as f64
    }

    /// Runs the whole denoise loop on `latents` with the given embeddings (Chitu's `denoise_loop`).
    pub fn denoise_loop(
        &self,
        latents: Tensor<B, 5>,
        cond: Tensor<B, 3>,
        uncond: Option<Tensor<B, 3>>,
        params: &DiffusionUserParams,
    ) -> Result<Tensor<B, 5>, GenError> {
        let mut task = DiffusionTask::from_user_request(params.clone())?;
        task.buffer.cond = Some(cond);
        task.buffer.uncond = if params.cfg() { uncond } else { None };
        if params.cfg() && task.buffer.uncond.is_none() {
            return Err(GenError::Params("guidance_scale > 1 needs negative embeddings".into()));
        }
        task.buffer.scheduler = Some(self.scheduler(params)?);
        task.buffer.latents = Some(latents);
        task.stage = Stage::Denoise;
        while task.stage == Stage::Denoise {
            self.generate_step(&mut task)?;
        }
        task.buffer.latents.ok_or_else(|| GenError::Stage("no latents".into()))
    }

    /// De-normalises latents and decodes them to video `[B, 3, F, H, W]` in [-1, 1].
    pub fn decode_vae(&self, latents: Tensor<B, 5>) -> Result<Tensor<B, 5>, GenError> {
        let vae = &self.backend.vae;
        vae.decode(vae.denormalize(latents))
            .map_err(|e| GenError::Stage(format!("VAE decode: {e}")))
    }

    /// [`Generator::decode_vae`] in spatial tiles (diffusers' default 256-pixel tiles, stride 192),
    /// bounding decode memory to about one row of tiles.
    pub fn decode_vae_tiled(&self, latents: Tensor<B, 5>) -> Result<Tensor<B, 5>, GenError> {
        let vae = &self.backend.vae;
        vae.decode_tiled(vae.denormalize(latents), chitu_vae::TileConfig::default())
            .map_err(|e| GenError::Stage(format!("VAE decode: {e}")))
    }

    /// Runs a task to the end and returns it.
    pub fn generate(&self, mut task: DiffusionTask<B>) -> Result<DiffusionTask<B>, GenError> {
        while !task.is_finished() {
            self.generate_step(&mut task)?;
        }
        Ok(task)
    }
}

/// Frames as diffusers' `output_type="np"`: `(video / 2 + 0.5)` clamped to [0, 1], `[B, F, H, W, 3]`.
pub fn video_to_frames<B: Backend>(video: Tensor<B, 5>) -> Tensor<B, 5> {
    (video / 2.0 + 0.5).clamp(0.0, 1.0).permute([0, 2, 3, 4, 1])
}
