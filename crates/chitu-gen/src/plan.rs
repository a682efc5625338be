//! Multi-stage refinement plans (the Chitu Generator page's "stage 1 low-res, stage 2 refine").
//!
//! Stage 1 denoises at a lower resolution with one pool model. Its latent is upsampled spatially
//! (nearest), re-noised along the flow path to the next stage's start sigma, and the next stage
//! continues with its own model from that point of its schedule. No reference model exists for
//! this; Wan2.2's own two-expert switch is the timestep boundary of a single stage.

use crate::generator::{seeded_noise, Stage};
use crate::{DiffusionTask, DiffusionUserParams, GenError, Generator};
use burn::tensor::{backend::Backend, Tensor};

/// One stage of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanStage {
    /// Index into the backend's model pool.
    pub model: usize,
    /// Steps of this stage's schedule.
    pub steps: usize,
    pub height: usize,
    pub width: usize,
    pub guidance_scale: f64,
    /// Where a later stage enters its schedule: the first step whose sigma is at most this
    /// (ignored for the first stage, which starts from noise at step 0).
    pub start_sigma: f64,
}

/// The latents of each stage's end, and the decoded video of the last.
pub struct PlanOutput<B: Backend> {
    pub stage_latents: Vec<Tensor<B, 5>>,
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
            let mut task = DiffusionTask::from_user_request(p.clone())?;
            if st.model >= self.backend.model_pool.len() {
                return Err(GenError::Params(format!(
                    "stage {i} uses model {} of a pool of {}",
                    st.model,
                    self.backend.model_pool.len()
                )));
            }
            task.expert_override = Some((st.model, st.guidance_scale));
            let uncond_here = if p.cfg() { uncond.clone() } else { None };
            let mut sched = self.scheduler(&p)?;
            let shape = p.latent_shape(self.backend.vae.config.z_dim);
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
                    sched
                        .set_begin_index(start)
                        .map_err(|e| GenError::Stage(e.to_string()))?;
                    let sigma = sched.sigmas()[start];
                    let up = upsample_nearest(prev.clone(), h / ph, w / pw);
                    let noise = seeded_noise(p.seed.wrapping_add(i as u64), shape, &self.backend.device);
                    task.buffer.current_step = start;
                    chitu_sched::scale_noise(up, noise, sigma)
                }
            };
            task.buffer.cond = Some(cond.clone());
            task.buffer.uncond = uncond_here;
            task.buffer.scheduler = Some(sched);
            task.buffer.latents = Some(latents);
            task.stage = Stage::Denoise;
            while task.stage == Stage::Denoise {
                self.generate_step(&mut task)?;
            }
            stage_latents.push(
                task.buffer
                    .latents
                    .take()
                    .ok_or_else(|| GenError::Stage("no latents".into()))?,
            );
        }
        let last = stage_latents
            .last()
            .cloned()
            .ok_or_else(|| GenError::Stage("no latents".into()))?;
        let video = self.decode_vae(last)?;
        Ok(PlanOutput { stage_latents, video })
    }
}
