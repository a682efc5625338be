//! The Wan text-to-video pipeline, in the order diffusers' `pipeline_wan.py` runs it: encode the
//! prompts, draw the latents, build the scheduler; then per step pick the expert, predict the
//! conditional and unconditional velocity, apply guidance, step the scheduler and check for NaN;
//! finally decode the latents with the VAE.
//!
//! [`Generator::generate_step`] advances a task by one of those units, so that a task scheduler can
//! interleave requests (Chitu's `chitu_generate()`); [`Generator::generate`] runs one request to
//! its video.

use crate::backend::LoadOptions;
use crate::condition::Condition;
use crate::parallel::Parallel;
use crate::task::{Denoising, State};
use crate::{DiffusionBackend, DiffusionTask, DiffusionUserParams, GenError, MemoryLevel, Stage};
use burn::tensor::{backend::Backend, ElementConversion, Tensor, TensorData};
use chitu_cache::{Branch, DitCall, DitInput};
use chitu_dist::Mesh;
use chitu_dit::{DitRunner, WanTransformer};
use chitu_sched::{FlowMatchEulerConfig, FlowMatchEulerScheduler, Scheduler, SolverKind};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::path::Path;
use std::time::Instant;

/// Runs tasks on one [`DiffusionBackend`].
pub struct Generator<B: Backend> {
    /// The loaded models.
    pub backend: DiffusionBackend<B>,
    /// Check latents for NaN/Inf after every step (on by default).
    pub check_nan_enabled: bool,
    parallel: Option<Parallel<B>>,
    /// Told `(done, total)` after each latent frame the VAE decodes.
    on_decode: Option<Box<dyn Fn(usize, usize) + Send + Sync>>,
    /// Retry a stage that runs out of device memory once, at a higher memory level.
    oom_retry: bool,
    /// Simulated allocation failures still to come: (stage, how many).
    simulated_oom: std::sync::Mutex<Option<(Stage, usize)>>,
}

impl<B: Backend> Generator<B> {
    /// A generator over loaded models.
    pub fn new(backend: DiffusionBackend<B>) -> Self {
        Self {
            backend,
            check_nan_enabled: true,
            parallel: None,
            on_decode: None,
            oom_retry: false,
            simulated_oom: std::sync::Mutex::new(None),
        }
    }

    /// Retries a stage that runs out of device memory once, at the next memory level (the seed's
    /// error handling: raise `low_mem_level`, retry). The retry starts from the last completed
    /// step, which a failed stage leaves as it was, and the raised level holds for the rest of the
    /// task; [`DiffusionTask::oom_retries`] records it.
    pub fn with_oom_retry(mut self, on: bool) -> Self {
        self.oom_retry = on;
        self
    }

    /// Makes the next `times` runs of `stage` fail as a device allocation failure does: how the
    /// out-of-memory handling is tested on a machine whose allocations do not fail.
    #[doc(hidden)]
    pub fn simulate_oom(&self, stage: Stage, times: usize) {
        *self.simulated_oom.lock().unwrap_or_else(|e| e.into_inner()) = Some((stage, times));
    }

    /// Panics as cubecl does when an allocation fails, if a simulated failure of `stage` is due.
    fn simulated_failure(&self, stage: Stage) {
        let mut due = self.simulated_oom.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, n)) = due.as_mut() {
            if *s == stage && *n > 0 {
                *n -= 1;
                drop(due);
                panic!("simulated allocation failure: BufferTooBig");
            }
        }
    }

    /// Calls `f(done, total)` after each latent frame the VAE decodes (of each tile, when tiled):
    /// on a CPU the decode is the longest single stage, and this is how a caller shows it move.
    pub fn on_decode_progress(mut self, f: impl Fn(usize, usize) + Send + Sync + 'static) -> Self {
        self.on_decode = Some(Box::new(f));
        self
    }

    /// Loads a model folder (diffusers' layout or Wan's own, see [`DiffusionBackend::from_dir`]).
    pub fn from_dir(dir: impl AsRef<Path>, device: &B::Device, options: LoadOptions) -> Result<Self, GenError> {
        Ok(Self::new(DiffusionBackend::load(dir, device, options)?))
    }

    /// Runs as one rank of `mesh`: every rank of the mesh must build its own generator and run
    /// the same requests. With `cfg = 2` the two guidance branches run on the two ranks of each
    /// CFG pair; with `cp > 1` the DiT's tokens are split over the CP group (Ulysses). Latents
    /// stay identical on every rank; only the mesh's output rank decodes the video.
    pub fn with_mesh(mut self, mesh: Mesh) -> Self {
        self.parallel = Parallel::new(mesh);
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

    /// Generates one video for `params` (on the output rank; other ranks of a mesh get
    /// [`GenError::Task`] once their share of the work is done).
    pub fn generate(&self, params: DiffusionUserParams) -> Result<crate::Video, GenError> {
        let task = self.run(DiffusionTask::from_user_request(params)?)?;
        crate::Video::from_task(task, &self.backend)
    }

    /// Runs a task to the end and returns it.
    pub fn run(&self, mut task: DiffusionTask<B>) -> Result<DiffusionTask<B>, GenError> {
        while !task.is_finished() {
            self.generate_step(&mut task)?;
        }
        Ok(task)
    }

    /// Advances `task` by exactly one unit: text encoding, one denoise step, or the VAE decode.
    /// A failed denoise step leaves the task at the last completed step.
    ///
    /// A device allocation failure comes back as [`GenError::OutOfMemory`] naming the stage, or,
    /// with [`Generator::with_oom_retry`], is retried once at the next memory level.
    pub fn generate_step(&self, task: &mut DiffusionTask<B>) -> Result<(), GenError> {
        let (stage, step) = (task.stage(), task.step());
        let t0 = Instant::now();
        let measured = crate::video::start_stage_peak();
        let result = self.run_stage(task, stage, step);
        let result = match result {
            Err(GenError::OutOfMemory { stage: name, detail }) if self.oom_retry => {
                let from = self.backend.memory(task.params.low_mem);
                let Some(to) = next_level(stage, from) else {
                    return Err(GenError::OutOfMemory { stage: name, detail });
                };
                tracing::warn!(
                    "{name} ran out of device memory ({detail}); retrying at low-mem {}",
                    to.0
                );
                task.params.low_mem = to.0;
                task.oom_retries.push(crate::OomRetry {
                    stage: name,
                    detail,
                    from_level: from.0,
                    to_level: to.0,
                });
                self.backend.park_for(to)?;
                self.run_stage(task, stage, step)
            }
            other => other,
        };
        result?;
        if measured {
            let i = stage as usize;
            if let (Some(peak), Some(slot)) = (crate::video::stage_peak(), task.peaks.get_mut(i)) {
                *slot = Some(slot.map_or(peak, |p: u64| p.max(peak)));
            }
        }
        let elapsed = t0.elapsed().as_secs_f64();
        match stage {
            Stage::TextEncode => task.timings.text_encode += elapsed,
            Stage::Denoise => task.timings.denoise += elapsed,
            Stage::VaeDecode => task.timings.vae_decode += elapsed,
            Stage::Done => {}
        }
        Ok(())
    }

    /// One run of `stage`, with a device allocation failure as [`GenError::OutOfMemory`].
    fn run_stage(&self, task: &mut DiffusionTask<B>, stage: Stage, step: usize) -> Result<(), GenError> {
        let name = || match stage {
            Stage::TextEncode => "text encode".to_string(),
            Stage::Denoise => format!("denoise step {step}"),
            Stage::VaeDecode => "VAE decode".into(),
            Stage::Done => "done".into(),
        };
        crate::oom::guard(name, || {
            self.simulated_failure(stage);
            match stage {
                Stage::TextEncode => self.encode_stage(task),
                Stage::Denoise => self.denoise_stage(task),
                Stage::VaeDecode => self.decode_stage(task),
                Stage::Done => Ok(()),
            }
        })
    }

    /// Progress from 0 to 1: text encoding and decoding count as one step each.
    pub fn get_progress(&self, task: &DiffusionTask<B>) -> f64 {
        let total = task.params.num_inference_steps + 2;
        let done = match task.stage() {
            Stage::TextEncode => 0,
            Stage::Denoise => 1 + task.step(),
            Stage::VaeDecode => 1 + task.params.num_inference_steps,
            Stage::Done => total,
        };
        done as f64 / total as f64
    }

    /// Stage 1: the prompt embeddings, the scheduler and the starting latents.
    fn encode_stage(&self, task: &mut DiffusionTask<B>) -> Result<(), GenError> {
        let p = &task.params;
        self.backend.check_request(p)?;
        let memory = self.backend.memory(p.low_mem);
        if memory.parks_dits() {
            // No DiT is active while the prompt is encoded.
            self.backend.park_dits_except(None)?;
            crate::video::start_stage_peak();
        }
        // Under CFG parallelism each rank encodes only the prompt of its own branch.
        let branch = self.cfg_branch(p);
        let cond = match branch != Some(Branch::Uncond) {
            true => Some(self.encode_checked(&p.prompt, p.max_sequence_length, "prompt")?),
            false => None,
        };
        let uncond = match p.cfg() && branch != Some(Branch::Cond) {
            true => Some(self.encode_checked(&p.negative_prompt, p.max_sequence_length, "negative prompt")?),
            false => None,
        };
        if memory.parks_text() {
            self.backend.text.park()?;
        } else if self.backend.release_after_use {
            self.backend.text.release()?;
        }
        let scheduler = self.scheduler(p)?;
        let shape = p.latent_shape(self.backend.vae.config.z_dim, self.backend.vae.config.spatial_factor());
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
        // The pictures of image-to-video, through the VAE's encoder once for the whole loop.
        let condition = Condition::build(&self.backend, p)?;
        task.start_latents = Some(latents.clone());
        task.state = State::Denoising(Denoising {
            cond,
            uncond,
            latents,
            scheduler,
            step: 0,
            condition,
        });
        Ok(())
    }

    /// Prompt embeddings `[1, max_len, d]` as the pipeline gives the DiT (zero past the prompt).
    pub fn encode_text(&self, prompt: &str, max_len: usize) -> Result<Tensor<B, 3>, GenError> {
        let embeddings = self
            .backend
            .text
            .with(|text| text.encode_prompt(&[prompt], max_len))??;
        Ok(embeddings)
    }

    /// [`Generator::encode_text`], checked for NaN/Inf so that a broken text encoder is named as
    /// such rather than blamed on the first denoise step.
    fn encode_checked(&self, prompt: &str, max_len: usize, which: &str) -> Result<Tensor<B, 3>, GenError> {
        let embeddings = self.encode_text(prompt, max_len)?;
        if self.check_nan_enabled {
            self.check_nan(&embeddings, &format!("the {which} embeddings from the text encoder"))?;
        }
        Ok(embeddings)
    }

    /// Stage 2, one step of it; the last step hands the latents to the decode.
    fn denoise_stage(&self, task: &mut DiffusionTask<B>) -> Result<(), GenError> {
        let DiffusionTask {
            params,
            state,
            cache,
            expert_override,
            ..
        } = task;
        let State::Denoising(d) = state else {
            unreachable!("the stage is Denoise")
        };
        let t = d.scheduler.timesteps()[d.step];
        // Pick the expert: Wan2.2's boundary, or the one a stage plan pins.
        let (expert, guidance) = expert_override.unwrap_or_else(|| self.backend.expert(t, params));
        if self.backend.memory(params.low_mem).parks_dits() {
            // Only the active expert on the device: park the other one before this one returns.
            self.backend.park_dits_except(Some(expert))?;
        }
        let call = |branch| DitCall {
            step: d.step,
            num_steps: params.num_inference_steps,
            branch,
            expert,
        };
        // The DiT reads the latents with the request's pictures worked in (image-to-video).
        let (input, first_frame) = match &d.condition {
            Some(c) => c.model_input(&d.latents),
            None => (d.latents.clone(), None),
        };
        let mut calls = 0;
        let velocity = self.backend.dit(expert)?.with(|model| {
            let runner = self.runner(model);
            // The conditional and unconditional predictions (one of them per rank under CFG
            // parallelism), each through the request's cache policy when it has one.
            let mut predict = |ctx: &Tensor<B, 3>, branch| {
                calls += 1;
                let ctx = ctx.clone();
                match cache {
                    Some(policy) => {
                        let input = DitInput::new(input.clone(), t, ctx).with_first_frame(first_frame);
                        policy.forward(&runner, call(branch), input)
                    }
                    None => runner.forward_at(input.clone(), &[t], first_frame, ctx, &mut chitu_dit::NoHook),
                }
                .map_err(|source| GenError::Denoise { step: d.step, source })
            };
            match (self.cfg_branch(params), &d.cond, &d.uncond) {
                (Some(branch), cond, uncond) => {
                    let ctx = match branch {
                        Branch::Cond => cond.as_ref(),
                        Branch::Uncond => uncond.as_ref(),
                    };
                    let mine = predict(ctx.ok_or(GenError::Task("has no embeddings for its branch"))?, branch)?;
                    let (v_cond, v_uncond) = self.gather_cfg(mine, d.step)?;
                    Ok(guide(v_cond, v_uncond, guidance))
                }
                (None, Some(cond), Some(uncond)) => {
                    let v_cond = predict(cond, Branch::Cond)?;
                    let v_uncond = predict(uncond, Branch::Uncond)?;
                    Ok(guide(v_cond, v_uncond, guidance))
                }
                (None, Some(cond), None) => predict(cond, Branch::Cond),
                (None, None, _) => Err(GenError::Task("has no prompt embeddings")),
            }
        })??;
        task.dit_calls += calls;
        let next = d.scheduler.step(velocity, t, d.latents.clone())?;
        if self.check_nan_enabled {
            self.check_nan(&next, &format!("latents after denoise step {} (t={t})", d.step))?;
        }
        d.latents = next;
        d.step += 1;
        if d.step == params.num_inference_steps {
            let State::Denoising(d) = std::mem::replace(state, State::Encoding) else {
                unreachable!("matched above")
            };
            let latents = match &d.condition {
                Some(c) => c.finish(d.latents),
                None => d.latents,
            };
            *state = State::Decoding { latents };
        }
        Ok(())
    }

    /// Runs the whole denoise loop on `latents` with the given embeddings (Chitu's `denoise_loop`);
    /// `uncond` is needed when the request guides.
    pub fn denoise_loop(
        &self,
        latents: Tensor<B, 5>,
        cond: Tensor<B, 3>,
        uncond: Option<Tensor<B, 3>>,
        params: &DiffusionUserParams,
    ) -> Result<Tensor<B, 5>, GenError> {
        if params.cfg() && uncond.is_none() {
            return Err(GenError::Params("guidance_scale > 1 needs negative embeddings".into()));
        }
        self.backend.check_request(params)?;
        let denoising = Denoising {
            cond: Some(cond),
            uncond: if params.cfg() { uncond } else { None },
            latents,
            scheduler: self.scheduler(params)?,
            step: 0,
            condition: Condition::build(&self.backend, params)?,
        };
        self.denoise_from(DiffusionTask::denoising(params.clone(), denoising, None)?)
    }

    /// Steps a denoising task to its end; returns the final latents.
    pub(crate) fn denoise_from(&self, mut task: DiffusionTask<B>) -> Result<Tensor<B, 5>, GenError> {
        while task.stage() == Stage::Denoise {
            self.generate_step(&mut task)?;
        }
        task.into_latents()
    }

    /// Stage 3: the VAE decode, on the output rank only.
    fn decode_stage(&self, task: &mut DiffusionTask<B>) -> Result<(), GenError> {
        let State::Decoding { latents } = &task.state else {
            unreachable!("the stage is VaeDecode")
        };
        let video = match self.is_output_rank() {
            // The video is decoded and written once, by the output rank.
            false => None,
            true => {
                let memory = self.backend.memory(task.params.low_mem);
                self.backend.park_for(memory)?;
                if self.backend.release_after_use {
                    for dit in &self.backend.model_pool {
                        dit.release()?;
                    }
                }
                // The decode's own peak starts here, without the models it just let go.
                crate::video::start_stage_peak();
                let video = match memory.tiled_decode() {
                    true => self.decode_vae_tiled(latents.clone())?,
                    false => self.decode_vae(latents.clone())?,
                };
                if self.check_nan_enabled {
                    // A broken VAE would otherwise give a black video and exit 0.
                    self.check_nan(&video, "the decoded video from the VAE")?;
                }
                Some(video)
            }
        };
        let State::Decoding { latents } = std::mem::replace(&mut task.state, State::Encoding) else {
            unreachable!("matched above")
        };
        task.state = State::Done { latents, video };
        Ok(())
    }

    /// De-normalises latents and decodes them to video `[B, 3, F, H, W]` in [-1, 1].
    pub fn decode_vae(&self, latents: Tensor<B, 5>) -> Result<Tensor<B, 5>, GenError> {
        let vae = &self.backend.vae;
        let mut report = |done, total| self.report_decode(done, total);
        Ok(vae.decode_with_progress(vae.denormalize(latents), &mut report)?)
    }

    /// [`Generator::decode_vae`] in spatial tiles (diffusers' default 256-pixel tiles, stride 192),
    /// bounding decode memory to about one row of tiles.
    pub fn decode_vae_tiled(&self, latents: Tensor<B, 5>) -> Result<Tensor<B, 5>, GenError> {
        let vae = &self.backend.vae;
        let tiles = chitu_vae::TileConfig::default();
        let mut report = |done, total| self.report_decode(done, total);
        Ok(vae.decode_tiled_with_progress(vae.denormalize(latents), tiles, &mut report)?)
    }

    fn report_decode(&self, done: usize, total: usize) {
        if let Some(f) = &self.on_decode {
            f(done, total)
        }
    }

    /// The task's scheduler: the folder's, or the requested solver, with the requested shift.
    pub(crate) fn scheduler(&self, params: &DiffusionUserParams) -> Result<Box<dyn Scheduler<B>>, GenError> {
        let spec = &self.backend.scheduler;
        if let Some(list) = &params.step_list {
            // An explicit list is stepped as LightX2V steps its distilled models: Euler.
            if params.solver.is_some_and(|s| s != SolverKind::Euler) {
                return Err(GenError::Params(format!(
                    "an explicit {} list is stepped with the euler solver; {:?} cannot take one",
                    list.name(),
                    params.solver
                )));
            }
            let shift = params.shift.unwrap_or(spec.shift());
            let sigmas = list.sigmas(shift, spec.num_train_timesteps())?;
            let mut euler = FlowMatchEulerScheduler::new(FlowMatchEulerConfig {
                num_train_timesteps: spec.num_train_timesteps(),
                shift,
                ..FlowMatchEulerConfig::default()
            })?;
            Scheduler::<B, 5>::set_sigmas(&mut euler, &sigmas)?;
            return Ok(Box::new(euler));
        }
        let mut scheduler = spec.build::<B, 5>(params.solver, params.shift)?;
        scheduler.set_timesteps(params.num_inference_steps)?;
        Ok(scheduler)
    }

    /// The one guidance branch this rank runs under CFG parallelism, if any.
    fn cfg_branch(&self, params: &DiffusionUserParams) -> Option<Branch> {
        self.parallel.as_ref()?.cfg_branch(params)
    }

    /// The DiT runner of `model` on this rank: local, or sharded over the CP group.
    fn runner<'a>(&self, model: &'a WanTransformer<B>) -> DitRunner<'a, B> {
        match &self.parallel {
            Some(p) => p.runner(model),
            None => DitRunner::local(model),
        }
    }

    /// `(cond, uncond)` predictions on both ranks of a CFG pair, from this rank's one.
    fn gather_cfg(&self, mine: Tensor<B, 5>, step: usize) -> Result<(Tensor<B, 5>, Tensor<B, 5>), GenError> {
        let parallel = self
            .parallel
            .as_ref()
            .ok_or(GenError::Task("runs a CFG branch without a mesh"))?;
        parallel.gather_cfg(mine, step)
    }

    /// Fails if `tensor` holds NaN or Inf, naming where.
    pub fn check_nan<const D: usize>(&self, tensor: &Tensor<B, D>, name: &str) -> Result<(), GenError> {
        let any = |t: Tensor<B, 1, burn::tensor::Bool>| t.int().into_scalar().elem::<i64>() != 0;
        let bad = any(tensor.clone().is_nan().any()) || any(tensor.clone().is_inf().any());
        if bad {
            Err(GenError::NonFinite(name.to_string()))
        } else {
            Ok(())
        }
    }
}

/// Classifier-free guidance: `uncond + g * (cond - uncond)`.
fn guide<B: Backend>(v_cond: Tensor<B, 5>, v_uncond: Tensor<B, 5>, guidance: f64) -> Tensor<B, 5> {
    v_uncond.clone() + (v_cond - v_uncond).mul_scalar(guidance as f32)
}

/// Standard-normal latents from `seed`, drawn on the host with ChaCha8 so that a seed gives the
/// same noise on every machine and backend.
pub fn seeded_noise<B: Backend>(seed: u64, shape: [usize; 5], device: &B::Device) -> Tensor<B, 5> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// Frames as diffusers' `output_type="np"`: `(video / 2 + 0.5)` clamped to [0, 1], `[B, F, H, W, 3]`.
pub fn video_to_frames<B: Backend>(video: Tensor<B, 5>) -> Tensor<B, 5> {
    (video / 2.0 + 0.5).clamp(0.0, 1.0).permute([0, 2, 3, 4, 1])
}

/// The memory level a stage that ran out of device memory at `from` is retried at: the text
/// encoding with the DiTs off the device, a denoise step with the text encoder off it too (level
/// 2; then only the active DiT, level 3), the decode in tiles (level 1; then the higher levels,
/// which clear the device of the other models). `None` when nothing higher is left.
fn next_level(stage: Stage, from: MemoryLevel) -> Option<MemoryLevel> {
    let to = match stage {
        Stage::TextEncode => 3,
        Stage::Denoise => (from.0 + 1).max(2),
        Stage::VaeDecode | Stage::Done => from.0 + 1,
    };
    (to > from.0 && to <= 3).then_some(MemoryLevel(to))
}
