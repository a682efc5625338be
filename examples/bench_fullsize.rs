//! The chitu side of the full-size memory benchmark (`WORKLOADS=fullsize bash bench/run.sh`): one
//! `chitu generate`-shaped run on a full-size Wan2.1-T2V-1.3B folder (`make_fullsize.py`), with
//! the weights in `DTYPE`, and one JSON line with the load time, each stage's and each DiT step's
//! time, and the process's peak RSS. One dtype per process, so that each peak is its own.
//!
//! ```text
//! cargo run --release --example bench_fullsize -- FULL_DIR DTYPE [HEIGHT WIDTH FRAMES STEPS]
//! ```
//! `DTYPE` is `f32`, `bf16` or `f16`, or `int8` (int8 linear layers, the rest bf16) or
//! `int8+f32`. With `SAVE_OUTPUT=PREFIX` it also writes the final latents (`PREFIX.latents.f32`)
//! and the frames in [-1, 1] (`PREFIX.frames.f32`), raw little-endian, for
//! `bench/fullsize_quality.py` to compare runs.
//! The defaults are the issue's request: 240x416, 9 frames, 2 steps, CFG (guidance 5), 512 text
//! tokens. The run loads and releases like the CLI: the text encoder goes after encoding, the
//! DiT before the decode.

use chitu::pipeline::video::peak_rss_bytes;
use chitu::pipeline::{DiffusionTask, DiffusionUserParams, Format, Generator, LoadOptions, Precision, Stage, Weights};
use chitu::{default_device, DefaultBackend as B};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, dtype, rest @ ..] = args.as_slice() else {
        return Err("usage: bench_fullsize FULL_DIR DTYPE [HEIGHT WIDTH FRAMES STEPS]".into());
    };
    let format = match dtype.strip_prefix("int8") {
        Some(rest) => {
            let precision = rest.strip_prefix('+').map_or(Ok(Precision::Bf16), str::parse)?;
            Format::new(precision, Weights::Int8)
        }
        None => Format::from(dtype.parse::<Precision>()?),
    };
    let num = |i: usize, default: usize| rest.get(i).map_or(Ok(default), |s| s.parse::<usize>());
    let (height, width, frames, steps) = (num(0, 240)?, num(1, 416)?, num(2, 9)?, num(3, 2)?);

    let t0 = Instant::now();
    let options = LoadOptions {
        dtype: format.precision,
        weights: format.weights,
        release_after_use: true,
        ..LoadOptions::default()
    };
    let generator = Generator::<B>::from_dir(dir, &default_device(), options)?;
    let load_s = t0.elapsed().as_secs_f64();
    let load_rss = peak_rss_bytes();

    let params = DiffusionUserParams {
        prompt: "a red fox running through fresh snow at dawn".into(),
        height,
        width,
        num_frames: frames,
        num_inference_steps: steps,
        ..DiffusionUserParams::default()
    };
    let estimate = generator
        .backend
        .estimate_memory(&params, generator.backend.memory(params.low_mem));
    let mut task = DiffusionTask::<B>::from_user_request(params)?;
    let (mut text_s, mut decode_s, mut step_s, mut reload_s) = (0.0, 0.0, Vec::new(), 0.0);
    while !task.is_finished() {
        let stage = task.stage();
        if stage == Stage::Denoise && step_s.is_empty() {
            // The DiT was released at load; bring it back outside the step's time.
            let t = Instant::now();
            generator.backend.dit(0)?.with(|_| ())?;
            reload_s = t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        generator.generate_step(&mut task)?;
        let s = t.elapsed().as_secs_f64();
        match stage {
            Stage::TextEncode => text_s += s,
            Stage::Denoise => step_s.push(s),
            Stage::VaeDecode => decode_s += s,
            Stage::Done => {}
        }
    }
    if let Ok(prefix) = std::env::var("SAVE_OUTPUT") {
        let raw = |t: burn::tensor::Tensor<B, 5>| -> Result<Vec<u8>, Box<dyn std::error::Error>> {
            let v = t
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .map_err(|e| format!("{e:?}"))?;
            Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
        };
        let latents = task.latents().cloned().ok_or("no latents")?;
        std::fs::write(format!("{prefix}.latents.f32"), raw(latents)?)?;
        std::fs::write(format!("{prefix}.frames.f32"), raw(task.into_video()?)?)?;
    }
    println!(
        "{}",
        serde_json::json!({
            "side": "chitu",
            "dtype": format.name(),
            "estimate_bytes": estimate.bytes,
            "estimate_stage": estimate.stage.to_string(),
            "vae_dtype": "f32",
            "request": format!("{width}x{height}, {frames} frames, {steps} steps, CFG"),
            "load_s": load_s,
            "text_s": text_s,
            "dit_reload_s": reload_s,
            "step_s": step_s,
            "decode_s": decode_s,
            "total_s": t0.elapsed().as_secs_f64(),
            "peak_rss_after_load_bytes": load_rss,
            "peak_rss_bytes": peak_rss_bytes(),
        })
    );
    Ok(())
}
