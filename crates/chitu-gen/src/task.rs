//! One generation request moving through the stages (Chitu's `DiffusionTask`).
//!
//! The stage owns its data: a denoising task holds its embeddings, latents and scheduler, a
//! decoding task only its final latents, a finished one its video. Nothing can be read in a stage
//! that does not have it, so the pipeline needs no "no latents" checks.

use crate::{DiffusionUserParams, GenError};
use burn::tensor::{backend::Backend, Tensor};
use chitu_cache::{CachePolicy, CacheStats};
use chitu_sched::Scheduler;

/// Where a task is in the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The prompts are encoded next.
    TextEncode,
    /// One scheduler step per `generate_step` call.
    Denoise,
    /// The final latents are decoded next.
    VaeDecode,
    /// The video is decoded (on the output rank).
    Done,
}

/// Wall time per stage, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimings {
    /// Encoding the prompt and the negative prompt.
    pub text_encode: f64,
    /// Every denoise step together.
    pub denoise: f64,
    /// The VAE decode.
    pub vae_decode: f64,
}

/// What the denoise loop carries from step to step.
pub(crate) struct Denoising<B: Backend> {
    /// Prompt embeddings `[1, L, d]`; `None` on the unconditional rank of a CFG pair.
    pub cond: Option<Tensor<B, 3>>,
    /// Negative-prompt embeddings, when guidance is on (and this rank runs that branch).
    pub uncond: Option<Tensor<B, 3>>,
    /// Current latents `[1, z, T, h, w]`.
    pub latents: Tensor<B, 5>,
    pub scheduler: Box<dyn Scheduler<B>>,
    /// Steps taken.
    pub step: usize,
    /// What the request's pictures add to every DiT call.
    pub condition: Option<crate::condition::Condition<B>>,
}

/// The stage and the data only that stage has.
pub(crate) enum State<B: Backend> {
    Encoding,
    Denoising(Denoising<B>),
    Decoding {
        latents: Tensor<B, 5>,
    },
    /// `video` is `None` on ranks that do not decode.
    Done {
        latents: Tensor<B, 5>,
        video: Option<Tensor<B, 5>>,
    },
}

/// One generation request moving through the stages.
pub struct DiffusionTask<B: Backend> {
    pub(crate) params: DiffusionUserParams,
    pub(crate) state: State<B>,
    pub(crate) timings: StageTimings,
    /// Where denoising starts instead of seeded noise (how the parity cases run).
    pub(crate) initial_latents: Option<Tensor<B, 5>>,
    /// The latents denoising started from (the cache check reruns from them).
    pub(crate) start_latents: Option<Tensor<B, 5>>,
    /// Pins the pool model and guidance (stage plans); the timestep boundary decides otherwise.
    pub(crate) expert_override: Option<(usize, f64)>,
    /// The request's FlexCache policy, with its state for this run.
    pub(crate) cache: Option<Box<dyn CachePolicy<B>>>,
    /// Each stage's peak resident memory (text encoding, denoising, the decode), where measured.
    pub(crate) peaks: [Option<u64>; 3],
    /// The stages retried after running out of device memory.
    pub(crate) oom_retries: Vec<OomRetry>,
    /// Transformer evaluations so far (two a step under guidance, one without).
    pub(crate) dit_calls: usize,
}

/// A stage that ran out of device memory and was retried at a higher memory level
/// ([`crate::Generator::with_oom_retry`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OomRetry {
    /// The stage (`denoise step 3`).
    pub stage: String,
    /// What the device said.
    pub detail: String,
    /// The level it failed at.
    pub from_level: u8,
    /// The level it was retried at.
    pub to_level: u8,
}

impl<B: Backend> DiffusionTask<B> {
    /// A task for validated `params`, starting from seeded noise.
    pub fn from_user_request(params: DiffusionUserParams) -> Result<Self, GenError> {
        params.validate()?;
        let cache = match &params.cache {
            Some(config) => Some(chitu_cache::build::<B>(config)?),
            None => None,
        };
        Ok(Self {
            params,
            state: State::Encoding,
            timings: StageTimings::default(),
            initial_latents: None,
            start_latents: None,
            expert_override: None,
            cache,
            peaks: [None; 3],
            oom_retries: Vec::new(),
            dit_calls: 0,
        })
    }

    /// A task that starts denoising at `step` from `latents`, with the prompts already encoded
    /// (the denoise loop on its own, and the later stages of a plan).
    pub(crate) fn denoising(
        params: DiffusionUserParams,
        denoising: Denoising<B>,
        expert_override: Option<(usize, f64)>,
    ) -> Result<Self, GenError> {
        let mut task = Self::from_user_request(params)?;
        task.start_latents = Some(denoising.latents.clone());
        task.state = State::Denoising(denoising);
        task.expert_override = expert_override;
        Ok(task)
    }

    /// Starts from the given latents instead of seeded noise (how the parity cases run).
    pub fn with_initial_latents(mut self, latents: Tensor<B, 5>) -> Self {
        self.initial_latents = Some(latents);
        self
    }

    /// The request.
    pub fn params(&self) -> &DiffusionUserParams {
        &self.params
    }

    /// The stage the next `generate_step` runs.
    pub fn stage(&self) -> Stage {
        match self.state {
            State::Encoding => Stage::TextEncode,
            State::Denoising(_) => Stage::Denoise,
            State::Decoding { .. } => Stage::VaeDecode,
            State::Done { .. } => Stage::Done,
        }
    }

    /// Denoise steps taken so far.
    pub fn step(&self) -> usize {
        match &self.state {
            State::Encoding => 0,
            State::Denoising(d) => d.step,
            State::Decoding { .. } | State::Done { .. } => self.params.num_inference_steps,
        }
    }

    /// The current latents: once text encoding has drawn them, through the end.
    pub fn latents(&self) -> Option<&Tensor<B, 5>> {
        match &self.state {
            State::Encoding => None,
            State::Denoising(d) => Some(&d.latents),
            State::Decoding { latents } | State::Done { latents, .. } => Some(latents),
        }
    }

    /// The decoded video `[1, 3, F, H, W]` in [-1, 1], once done (on the output rank).
    pub fn video(&self) -> Option<&Tensor<B, 5>> {
        match &self.state {
            State::Done { video, .. } => video.as_ref(),
            _ => None,
        }
    }

    /// Takes the decoded video out of a finished task.
    pub fn into_video(self) -> Result<Tensor<B, 5>, GenError> {
        match self.state {
            State::Done { video: Some(v), .. } => Ok(v),
            State::Done { video: None, .. } => Err(GenError::Task("decodes no video on this rank")),
            _ => Err(GenError::Task("has not finished")),
        }
    }

    /// Takes the latents out of a task that has finished denoising.
    pub fn into_latents(self) -> Result<Tensor<B, 5>, GenError> {
        match self.state {
            State::Decoding { latents } | State::Done { latents, .. } => Ok(latents),
            _ => Err(GenError::Task("has not finished denoising")),
        }
    }

    /// Seconds spent per stage so far.
    pub fn timings(&self) -> StageTimings {
        self.timings
    }

    /// Each stage's peak resident memory (text encoding, denoising, the decode) where the
    /// platform measures it (Linux), for the stages run so far.
    pub fn stage_peaks(&self) -> [Option<u64>; 3] {
        self.peaks
    }

    /// Transformer evaluations this rank has run so far: two a step under classifier-free
    /// guidance, one without (guidance 1), whatever a cache then skipped inside them.
    pub fn dit_calls(&self) -> usize {
        self.dit_calls
    }

    /// The stages retried after running out of device memory.
    pub fn oom_retries(&self) -> &[OomRetry] {
        &self.oom_retries
    }

    /// The latents denoising started from, once text encoding has set them.
    pub fn start_latents(&self) -> Option<Tensor<B, 5>> {
        self.start_latents.clone()
    }

    /// The cache policy's counters, when the request uses one.
    pub fn cache_stats(&self) -> Option<CacheStats> {
        self.cache.as_ref().map(|c| c.stats())
    }

    /// Whether the video is decoded.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Done { .. })
    }
}
