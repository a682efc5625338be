//! The chitu side of `bench/run.sh`: times one workload on the weights and inputs that
//! `bench/torch_side.py make` wrote, and prints one JSON line (times, median, peak RSS).
//!
//! ```text
//! cargo run --release --example bench_compare -- WORKLOAD DIR RUNS
//! ```
//! Workloads: `dit` (2 blocks at Wan2.1-1.3B width, 1,950 tokens), `vae` (decode at real width,
//! latent 2x30x52), `umt5` (UMT5-XXL width, 2 layers, 512 tokens), `pipeline` (the parity
//! model, 10 steps with CFG). Threads follow `RAYON_NUM_THREADS`.

use chitu::dit::WanTransformer;
use chitu::pipeline::video::peak_rss_bytes;
use chitu::pipeline::{DiffusionBackend, DiffusionTask, DiffusionUserParams, Generator};
use chitu::text::Umt5Encoder;
use chitu::vae::WanVae;
use chitu::{default_device, DefaultBackend as B};
use chitu_parity::tensors::{load_safetensors, Values};
use std::path::{Path, PathBuf};
use std::time::Instant;

type Run = Box<dyn FnMut() -> Result<(), Box<dyn std::error::Error>>>;

fn input(dir: &Path, name: &str) -> Result<chitu_parity::tensors::HostTensor, Box<dyn std::error::Error>> {
    let mut all = load_safetensors(&dir.join("inputs.safetensors"))?;
    Ok(all.remove(name).ok_or(format!("{}: no input {name}", dir.display()))?)
}

fn workload(name: &str, root: &Path) -> Result<Run, Box<dyn std::error::Error>> {
    let dev = default_device();
    Ok(match name {
        "dit" => {
            let dir = root.join("dit");
            let model = WanTransformer::<B>::from_dir(&dir, &dev)?;
            let x = input(&dir, "latents")?.to_backend::<B, 5>("latents", &dev)?;
            let ctx = input(&dir, "context")?.to_backend::<B, 3>("context", &dev)?;
            Box::new(move || {
                let out = model.forward(x.clone(), &[500.0], ctx.clone())?;
                // Reading the result forces lazy backends to finish.
                let _ = out.into_data();
                Ok(())
            })
        }
        "vae" => {
            let dir = root.join("vae");
            let vae = WanVae::<B>::from_dir(&dir, &dev)?;
            let z = input(&dir, "latents")?.to_backend::<B, 5>("latents", &dev)?;
            Box::new(move || {
                let _ = vae.decode(z.clone())?.into_data();
                Ok(())
            })
        }
        "umt5" => {
            let dir = root.join("umt5");
            let enc = Umt5Encoder::<B>::from_dir(&dir, &dev)?;
            let ids = match input(&dir, "ids")?.values {
                Values::I64(v) => v,
                _ => return Err("umt5 ids must be integers".into()),
            };
            let mask = vec![1i64; ids.len()];
            Box::new(move || {
                let _ = enc.forward(&ids, &mask, 1, &dev)?.into_data();
                Ok(())
            })
        }
        "pipeline" => {
            // The pipeline_t2v_wan21 case's request at 10 steps (bench/torch_side.py reads the same).
            let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity");
            let generator = Generator::new(DiffusionBackend::<B>::from_dir(fixtures.join("models/wan21"), &dev)?);
            let case = chitu_parity::Case::load(&fixtures, "pipeline_t2v_wan21")?;
            let params = DiffusionUserParams {
                num_inference_steps: 10,
                ..chitu_parity::pipeline::params(&case)?
            };
            Box::new(move || {
                let task = generator.run(DiffusionTask::<B>::from_user_request(params.clone())?)?;
                let _ = task.video().cloned().ok_or("no video")?.into_data();
                Ok(())
            })
        }
        other => return Err(format!("unknown workload {other}; expected dit, vae, umt5 or pipeline").into()),
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [name, root, runs] = args.as_slice() else {
        return Err("usage: bench_compare WORKLOAD DIR RUNS".into());
    };
    let runs: usize = runs.parse()?;
    let mut run = workload(name, Path::new(root))?;
    let load_rss = peak_rss_bytes();
    run()?; // warm-up
    let mut times = Vec::new();
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        run()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!(
        "{}",
        serde_json::json!({
            "impl": "chitu",
            "workload": name,
            "threads": threads,
            "times_s": times,
            "median_s": median,
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_rss_after_load_bytes": load_rss,
            "machine": chitu_host::Machine::detect().to_string(),
            "gemm": chitu_host::sgemm::Sgemm::get().kind().name(),
        })
    );
    Ok(())
}
