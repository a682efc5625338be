//! Wan2.2-A14B text-to-video (two experts switched at the folder's `boundary_ratio`):
//! `cargo run --release --example wan22_a14b_t2v -- --model-dir DIR --prompt "..." [--low-mem 3]`.

mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Wan2.2-A14B's T2V settings: 40 steps, guidance 4.0 for the high-noise expert, 3.0 after the switch.
    common::run(|prompt| chitu::pipeline::DiffusionUserParams {
        num_inference_steps: 40,
        guidance_scale: 4.0,
        guidance_scale_2: Some(3.0),
        ..chitu::pipeline::DiffusionUserParams::new(prompt)
    })
}
