//! What a user asks for, validated before any work starts.

use crate::{ConditionImage, GenError};
use chitu_cache::CacheConfig;
use chitu_sched::{SolverKind, StepList};

/// The most values (height x width x frames x 3) a request may ask for: a 16k x 16k video of
/// 1001 frames. Far beyond every Wan model; the model's own limits are checked at run time
/// (`DiffusionBackend::check_request`).
const MAX_VIDEO_ELEMENTS: usize = 16384 * 16384 * 1001 * 3;

/// One text-to-video request (Chitu's `DiffusionUserParams`).
#[derive(Debug, Clone, PartialEq)]
pub struct DiffusionUserParams {
    /// What to generate.
    pub prompt: String,
    /// The unconditional prompt; empty by default, as in diffusers.
    pub negative_prompt: String,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Video height in pixels, a multiple of 16 (32 for Wan2.2 TI2V-5B).
    pub height: usize,
    /// Video width in pixels, a multiple of 16 (32 for Wan2.2 TI2V-5B).
    pub width: usize,
    /// Must be `4k + 1`.
    pub num_frames: usize,
    /// Denoise steps.
    pub num_inference_steps: usize,
    /// Guidance of the (first) expert; classifier-free guidance runs when it is above 1.
    pub guidance_scale: f64,
    /// Guidance of the low-noise expert of a two-expert model; `guidance_scale` when unset.
    pub guidance_scale_2: Option<f64>,
    /// The solver; the model folder's scheduler config when unset.
    pub solver: Option<SolverKind>,
    /// The flow shift; the model folder's when unset.
    pub shift: Option<f64>,
    /// The steps as an explicit list (LightX2V's `denoising_step_list`, or noise levels), stepped
    /// with Euler, as few-step distilled models expect; `num_inference_steps` must equal its
    /// length. The folder's scheduler spaces `num_inference_steps` steps when unset.
    pub step_list: Option<StepList>,
    /// Text tokens the prompt is padded or cut to (diffusers' `max_sequence_length`).
    pub max_sequence_length: usize,
    /// Memory saving, as [`crate::MemoryLevel`]: 0 off; 1 tiled VAE decode; 2 also parks the
    /// text encoder in host memory between prompts; 3 also keeps only the active DiT on the
    /// device (the other expert, and every DiT outside denoising, is parked). A backend loaded at
    /// a higher level keeps its own.
    pub low_mem: u8,
    /// The FlexCache policy; none computes every block of every call.
    pub cache: Option<CacheConfig>,
    /// The picture to start the video from: image-to-video on Wan2.2 TI2V-5B (optional there)
    /// and I2V-A14B (required there). Fitted to `width x height` unless its resizing is off.
    pub image: Option<ConditionImage>,
    /// The picture to end the video on (diffusers' `last_image`, first-last-frame conditioning),
    /// on models that concatenate a condition video (I2V-A14B).
    pub last_image: Option<ConditionImage>,
}

impl Default for DiffusionUserParams {
    /// Wan2.1's defaults: 480x832, 81 frames, 50 steps, guidance 5.
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: 0,
            height: 480,
            width: 832,
            num_frames: 81,
            num_inference_steps: 50,
            guidance_scale: 5.0,
            guidance_scale_2: None,
            solver: None,
            shift: None,
            step_list: None,
            max_sequence_length: 512,
            low_mem: 0,
            cache: None,
            image: None,
            last_image: None,
        }
    }
}

impl DiffusionUserParams {
    /// A request for `prompt` with Wan2.1's defaults.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            ..Self::default()
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), GenError> {
        let bad = |m: String| Err(GenError::Params(m));
        if self.height == 0 || self.width == 0 || !self.height.is_multiple_of(16) || !self.width.is_multiple_of(16) {
            return bad(format!(
                "height {} and width {} must be positive multiples of 16",
                self.height, self.width
            ));
        }
        if self.num_frames == 0 || !(self.num_frames - 1).is_multiple_of(4) {
            return bad(format!("num_frames {} must be 4k+1 (1, 5, ..., 81)", self.num_frames));
        }
        // Every size product is checked, so an absurd request is an error, not an overflow.
        let pixels = [self.width, self.num_frames, 3]
            .iter()
            .try_fold(self.height, |acc, &d| acc.checked_mul(d));
        if pixels.is_none_or(|p| p > MAX_VIDEO_ELEMENTS) {
            return bad(format!(
                "{}x{} with {} frames is too large a video (more than {MAX_VIDEO_ELEMENTS} values)",
                self.height, self.width, self.num_frames
            ));
        }
        if self.num_inference_steps == 0 {
            return bad("num_inference_steps must be at least 1".into());
        }
        for (name, g) in [
            ("guidance_scale", Some(self.guidance_scale)),
            ("guidance_scale_2", self.guidance_scale_2),
        ] {
            if let Some(g) = g {
                if !g.is_finite() || g < 0.0 {
                    return bad(format!("{name} {g} must be finite and not negative"));
                }
            }
        }
        if let Some(s) = self.shift {
            if !s.is_finite() || s <= 0.0 {
                return bad(format!("shift {s} must be finite and positive"));
            }
        }
        if let Some(list) = &self.step_list {
            // Wan's models all train on 1000 timesteps.
            list.sigmas(self.shift.unwrap_or(5.0), 1000)
                .map_err(|e| GenError::Params(e.to_string()))?;
            if list.len() != self.num_inference_steps {
                return bad(format!(
                    "{} lists {} steps but num_inference_steps is {}",
                    list.name(),
                    list.len(),
                    self.num_inference_steps
                ));
            }
        }
        if self.low_mem > 3 {
            return bad(format!(
                "low_mem level {} does not exist: 0 (off), 1 (tiled VAE decode), 2 (also the text encoder in host memory), 3 (also only the active DiT on the device)",
                self.low_mem
            ));
        }
        if let Some(cache) = &self.cache {
            cache.validate().map_err(|e| GenError::Params(e.to_string()))?;
        }
        if self.max_sequence_length == 0 {
            return bad("max_sequence_length must be at least 1".into());
        }
        Ok(())
    }

    /// Whether classifier-free guidance runs (diffusers: `guidance_scale > 1`).
    pub fn cfg(&self) -> bool {
        self.guidance_scale > 1.0
    }

    /// The latent shape `[1, z, (F - 1) / 4 + 1, H / s, W / s]` for a VAE of `z_dim` channels.
    /// `spatial` is the VAE's pixels per latent (8 for Wan2.1's VAE, 16 for Wan2.2's).
    pub fn latent_shape(&self, z_dim: usize, spatial: usize) -> [usize; 5] {
        [
            1,
            z_dim,
            (self.num_frames - 1) / 4 + 1,
            self.height / spatial,
            self.width / spatial,
        ]
    }
}

impl DiffusionUserParams {
    /// Defaults for the embedded demo model ([`DiffusionBackend::embedded_demo_as`]): the 32x32,
    /// 9-frame clips it was trained on, 20 steps.
    ///
    /// [`DiffusionBackend::embedded_demo_as`]: crate::DiffusionBackend::embedded_demo_as
    pub fn demo(prompt: impl Into<String>) -> Self {
        Self {
            height: crate::demo::DEMO_SIZE,
            width: crate::demo::DEMO_SIZE,
            num_frames: crate::demo::DEMO_FRAMES,
            num_inference_steps: 20,
            max_sequence_length: crate::demo::DEMO_TEXT_LEN,
            ..Self::new(prompt)
        }
    }

    /// Defaults sized for the embedded tiny model: 64x64, 9 frames, 10 steps.
    pub fn tiny(prompt: impl Into<String>) -> Self {
        Self {
            height: 64,
            width: 64,
            num_frames: 9,
            num_inference_steps: 10,
            max_sequence_length: 64,
            ..Self::new(prompt)
        }
    }
}
