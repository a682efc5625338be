//! Shared argument handling of the model examples.

use chitu::gen::output::{output_stem, write_mp4, RgbFrames};
use chitu::gen::{video_to_frames, DiffusionBackend, DiffusionTask, DiffusionUserParams, Generator};
use chitu::{default_device, DefaultBackend as B};
use std::path::PathBuf;

/// Reads `--model-dir DIR [--prompt TEXT] [--steps N] [--low-mem 0-3]`, runs the model and writes `out/<stem>.mp4`.
pub fn run(default_params: impl Fn(String) -> DiffusionUserParams) -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let dir = PathBuf::from(
        value("--model-dir").ok_or("usage: --model-dir DIR [--prompt TEXT] [--steps N] [--low-mem 0-3]")?,
    );
    let mut params = default_params(value("--prompt").unwrap_or_else(|| "A cat walking on grass".into()));
    if let Some(steps) = value("--steps") {
        params.num_inference_steps = steps.parse()?;
    }
    if let Some(level) = value("--low-mem") {
        params.low_mem = level.parse()?;
    }
    // Validated before loading, which the memory level already shapes.
    let task = DiffusionTask::<B>::from_user_request(params.clone())?;
    let device = default_device();
    let backend = DiffusionBackend::<B>::from_dir_low_mem(&dir, &device, params.low_mem)?;
    let task = Generator::new(backend).generate(task)?;
    let video = task.buffer.video.ok_or("no video")?;
    std::fs::create_dir_all("out")?;
    let path = PathBuf::from("out").join(format!(
        "{}.mp4",
        output_stem(&params.prompt, params.seed, params.num_inference_steps)
    ));
    write_mp4(&path, &RgbFrames::from_tensor(video_to_frames(video))?)?;
    println!("{}", path.display());
    Ok(())
}
