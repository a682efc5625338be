//! Multi-stage refinement plans (the Chitu Generator page's "stage 1 low-res, stage 2 refine").
//!
//! Stage 1 denoises at a lower resolution with one pool model. Its latent is upsampled spatially
//! (nearest), re-noised along the flow path to the next stage's start sigma, and the next stage
//! continues with its own model from that point of its schedule. No reference model exists for
//! this; Wan2.2's own two-expert switch is the timestep boundary of a single stage.

use crate::task::Denoising;
use crate::{seeded_noise, DiffusionTask, DiffusionUserParams, GenError, Generator};
use burn::tensor::{backend::Backend, Tensor};

/// One stage of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanStage {
    /// Index into the backend's model pool.
    pub model: usize,
    /// Steps of this stage's schedule.
    pub steps: usize,
    /// Height of this stage's video, in pixels.
    pub height: usize,
    /// Width of this stage's video, in pixels.
    pub width: usize,
    /// Guidance of this stage.
    pub guidance_scale: f64,
    /// Where a later stage enters its schedule: the first step whose sigma is at most this
    /// (ignored for the first stage, which starts from noise at step 0).
    pub start_sigma: f64,
}

/// The latents of each stage's end, and the decoded video of the last.
pub struct PlanOutput<B: Backend> {
    /// Each stage's final latents.
    pub stage_latents: Vec<Tensor<B, 5>>,
    /// The last stage's video `[1, 3, F, H, W]` in [-1, 1].
    pub video: Tensor<B, 5>,
}

/// Nearest-neighbour upsampling of `[B, C, T, h, w]` to `[B, C, T, h * fy, w * fx]`.
fn upsample_nearest<B: Backend>(x: Tensor<B, 5>, fy: usize, fx: usize) -> Tensor<B, 5> {
    let [b, c, t, h, w] = x.dims();
    let x: Tensor<B, 7> = x.reshape([b, c, t, h, 1, w, 1]);
    x.expand([b, c, t, h, fy, w, fx]).reshape([b, c, t, h * fy, w * fx])
}

impl<B: Backend> Generator<B> {
    /// Runs `plan` for `params` (prompt, seed, frames, text length, solver; the plan sets sizes,
    /// steps, models and guidance) and decodes the last stage.
    pub fn generate_plan(
        &self,
        params: &DiffusionUserParams,
        plan: &[PlanStage],
        initial_latents: Option<Tensor<B, 5>>,
    ) -> Result<PlanOutput<B>, GenError> {
        if plan.is_empty() {
            return Err(GenError::Params("a stage plan needs at least one stage".into()));
        }
        let mut stage_latents: Vec<Tensor<B, 5>> = Vec::new();
        // The prompt is encoded once for all stages; the negative prompt only if a stage guides.
        let cond = self.encode_text(&params.prompt, params.max_sequence_length)?;
        let uncond = match plan.iter().any(|s| s.guidance_scale > 1.0) {
            true => Some(self.encode_text(&params.negative_prompt, params.max_sequence_length)?),
            false => None,
        };
        for (i, st) in plan.iter().enumerate() {
            let p = DiffusionUserParams {
                height: st.height,
                width: st.width,
                num_inference_steps: st.steps,
                guidance_scale: st.guidance_scale,
                guidance_scale_2: None,
                ..params.clone()
            };
            // Validates the stage's request before anything runs.
            p.validate()?;
            self.backend.check_request(&p)?;
            if st.model >= self.backend.model_pool.len() {
                return Err(GenError::Params(format!(
                    "stage {i} uses model {} of a pool of {}",
                    st.model,
                    self.backend.model_pool.len()
                )));
            }
            let uncond_here = if p.cfg() { uncond.clone() } else { None };
            let mut sched = self.scheduler(&p)?;
            let shape = p.latent_shape(self.backend.vae.config.z_dim, self.backend.vae.config.spatial_factor());
            let mut step = 0;
            let latents = match stage_latents.last() {
                None => match initial_latents.clone() {
                    Some(l) if l.dims() == shape => l,
                    Some(l) => return Err(GenError::Params(format!("initial latents {:?} != {shape:?}", l.dims()))),
                    None => seeded_noise(p.seed, shape, &self.backend.device),
                },
                Some(prev) => {
                    let [_, _, pt, ph, pw] = prev.dims();
                    let [_, _, t, h, w] = shape;
                    if pt != t || h % ph != 0 || w % pw != 0 {
                        return Err(GenError::Params(format!(
                            "stage {i} latent {shape:?} is not an integer spatial upscale of {:?}",
                            prev.dims()
                        )));
                    }
                    let start = sched
                        .sigmas()
                        .iter()
                        .position(|&s| s <= st.start_sigma)
                        .unwrap_or(0)
                        .min(st.steps - 1);
                    sched.set_begin_index(start)?;
                    let sigma = sched.sigmas()[start];
                    let up = upsample_nearest(prev.clone(), h / ph, w / pw);
                    let noise = seeded_noise(p.seed.wrapping_add(i as u64), shape, &self.backend.device);
                    step = start;
                    chitu_sched::scale_noise(up, noise, sigma)
                }
            };
            let denoising = Denoising {
                cond: Some(cond.clone()),
                uncond: uncond_here,
                latents,
                scheduler: sched,
                step,
                // A picture conditions every stage, fitted to the stage's size.
                condition: crate::condition::Condition::build(&self.backend, &p)?,
            };
            let task = DiffusionTask::denoising(p, denoising, Some((st.model, st.guidance_scale)))?;
            stage_latents.push(self.denoise_from(task)?);
        }
        let last = stage_latents
            .last()
            .cloned()
            .ok_or(GenError::Task("plan ran no stage"))?;
        let video = self.decode_vae(last)?;
        Ok(PlanOutput { stage_latents, video })
    }
}
