//! Wan2.2 I2V-A14B, image-to-video with two experts switched at the folder's `boundary_ratio`
//! (0.9), optionally ending on a second picture:
//! `cargo run --release --example wan22_i2v_a14b -- --model-dir DIR --image PATH --prompt "..." [--last-image PATH]`.

mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Wan2.2's `wan_i2v_A14B.py`: 40 steps, guidance 3.5 for both experts, 81 frames (shift 5.0
    // is the folder's scheduler config).
    common::run_checked(
        |prompt| chitu::pipeline::DiffusionUserParams {
            num_inference_steps: 40,
            guidance_scale: 3.5,
            guidance_scale_2: Some(3.5),
            num_frames: 81,
            ..chitu::pipeline::DiffusionUserParams::new(prompt)
        },
        |args| match args.request.image {
            Some(_) => Ok(()),
            None => Err("I2V-A14B starts from a picture: pass --image PATH".into()),
        },
    )
}
