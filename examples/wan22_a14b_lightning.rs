//! Wan2.2-A14B in 4 steps without guidance, with lightx2v's step-distillation LoRAs (one per
//! expert), as LightX2V samples them: the timesteps 1000, 750, 500, 250 shifted by 5 and
//! stepped with Euler, guidance 1 (one DiT evaluation a step instead of two):
//!
//! ```text
//! cargo run --release --example wan22_a14b_lightning -- --model-dir Wan2.2-T2V-A14B-Diffusers \
//!     --lora wan2.2_t2v_A14b_high_noise_lora_rank64_lightx2v_4step.safetensors:1:high \
//!     --lora wan2.2_t2v_A14b_low_noise_lora_rank64_lightx2v_4step.safetensors:1:low \
//!     --prompt "A cat walking on grass"
//! ```
//!
//! Every default can be overridden with `chitu generate`'s flags (`--timesteps`, `--shift`,
//! `--steps`, `--guidance`).

mod common;

use chitu::pipeline::{DiffusionUserParams, StepList};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::run_checked(
        |prompt| DiffusionUserParams {
            num_inference_steps: 4,
            step_list: Some(StepList::Timesteps(vec![1000.0, 750.0, 500.0, 250.0])),
            shift: Some(5.0),
            guidance_scale: 1.0,
            guidance_scale_2: Some(1.0),
            ..DiffusionUserParams::new(prompt)
        },
        |args| match args.model.loras.is_empty() {
            // Four unguided steps of the base model make a blur: the LoRAs are the point.
            true => {
                Err("pass the distillation LoRAs: --lora HIGH.safetensors:1:high --lora LOW.safetensors:1:low".into())
            }
            false => Ok(()),
        },
    )
}
