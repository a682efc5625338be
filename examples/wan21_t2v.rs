//! Wan2.1 text-to-video from a diffusers-layout folder (e.g. Wan2.1-T2V-1.3B-Diffusers):
//! `cargo run --release --example wan21_t2v -- --model-dir DIR --prompt "..."` (the flags of
//! `chitu generate`).

mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Wan2.1's defaults: 480x832, 81 frames, 50 steps, guidance 5.
    common::run(chitu::pipeline::DiffusionUserParams::new)
}
