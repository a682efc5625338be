//! Wan2.2 TI2V-5B, text-to-video or (with `--image`) image-to-video on one 24 GB GPU's model:
//! `cargo run --release --example wan22_ti2v_5b -- --model-dir DIR --prompt "..." [--image PATH]`.
//! Sizes are multiples of 32 (the Wan2.2 VAE's 16x, times the 2x2 patch).

mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Wan2.2's `wan_ti2v_5B.py`: 50 steps, guidance 5.0, 121 frames at 704x1280 (shift 5.0 is
    // the folder's scheduler config).
    common::run(|prompt| chitu::pipeline::DiffusionUserParams {
        num_inference_steps: 50,
        guidance_scale: 5.0,
        num_frames: 121,
        height: 704,
        width: 1280,
        ..chitu::pipeline::DiffusionUserParams::new(prompt)
    })
}
