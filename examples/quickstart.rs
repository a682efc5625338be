//! The shortest program: a model folder in, `cat.mp4` out (Wan's defaults: 480x832, 81 frames,
//! 50 steps), `cargo run --release --example quickstart -- Wan2.1-T2V-1.3B-Diffusers`.

use chitu::pipeline::{DiffusionUserParams, Generator, LoadOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: quickstart MODEL_DIR")?;
    let generator =
        Generator::<chitu::DefaultBackend>::from_dir(dir, &chitu::default_device(), LoadOptions::default())?;
    let video = generator.generate(DiffusionUserParams::new("A cat walking on grass"))?;
    video.save_mp4("cat.mp4")?;
    Ok(())
}
