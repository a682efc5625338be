//! How far reduced-precision and 8-bit weights move a whole generation from the f32 one, on the
//! parity fixtures' tiny Wan2.1 and Wan2.2 models: the final latents' rel-L2 and the decoded
//! frames' PSNR (on the 0..1 scale the video is written from), each against the same request
//! run with f32 weights.
//!
//! ```text
//! cargo run --release --example quant_quality [-- FIXTURES_DIR]
//! ```
//! The full-size counterpart is `bench/fullsize_quality.py` on `examples/bench_fullsize` outputs.

use burn::tensor::Tensor;
use chitu::pipeline::{DiffusionTask, DiffusionUserParams, Format, Generator, LoadOptions, Precision, Weights};
use chitu::{default_device, DefaultBackend as B};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::env::args()
        .nth(1)
        .map_or_else(|| PathBuf::from("tests/fixtures/parity"), PathBuf::from);
    let device = default_device();
    let params = DiffusionUserParams {
        height: 64,
        width: 64,
        num_frames: 9,
        num_inference_steps: 10,
        max_sequence_length: 64,
        ..DiffusionUserParams::new("a red fox running through fresh snow at dawn")
    };
    let run = |model: &str, format: Format| -> Result<(Tensor<B, 5>, Tensor<B, 5>), Box<dyn std::error::Error>> {
        let options = LoadOptions {
            dtype: format.precision,
            weights: format.weights,
            ..LoadOptions::default()
        };
        let generator = Generator::<B>::from_dir(root.join("models").join(model), &device, options)?;
        let task = generator.run(DiffusionTask::from_user_request(params.clone())?)?;
        let latents = task.latents().cloned().ok_or("no latents")?;
        Ok((latents, task.into_video()?))
    };
    let norm = |t: Tensor<B, 5>| -> f64 { t.powf_scalar(2.0).sum().sqrt().into_scalar() as f64 };
    println!(
        "{}x{}, {} frames, {} steps, CFG; against the same run with f32 weights\n",
        params.width, params.height, params.num_frames, params.num_inference_steps
    );
    println!("| model | weights | latent rel_l2 | frame PSNR dB |");
    println!("|---|---|---|---|");
    for model in ["wan21", "wan22"] {
        let (ref_latents, ref_video) = run(model, Format::F32)?;
        for format in [
            Format::from(Precision::Bf16),
            Format::new(Precision::F32, Weights::Int8),
            Format::new(Precision::Bf16, Weights::Int8),
        ] {
            let (latents, video) = run(model, format)?;
            let rel = norm(latents - ref_latents.clone()) / norm(ref_latents.clone());
            // Frames are in [-1, 1]: halve the difference for the 0..1 scale.
            let diff = (video - ref_video.clone()) / 2.0;
            let mse: f64 = diff.powf_scalar(2.0).mean().into_scalar() as f64;
            let psnr = if mse > 0.0 {
                10.0 * (1.0 / mse).log10()
            } else {
                f64::INFINITY
            };
            println!("| {model} | {} | {rel:.3e} | {psnr:.1} |", format.name());
        }
    }
    Ok(())
}
