//! LoRA benchmark: a few-step distilled run (LightX2V's 4-step list, guidance 1, a LoRA merged)
//! against the base schedule with CFG, and what merging costs: time and memory.
//!
//! ```text
//! cargo run --release --example bench_lora                        # the embedded default
//! cargo run --release --example bench_lora -- DIR LORA [H W F [BASE_STEPS]]
//! ```
//! Without arguments it runs the embedded tiny model with the fixtures' Wan-format LoRA at the
//! model's own size (64x64, 9 frames) and 50 base steps. With a folder (`make_fullsize.py`) and
//! a LoRA (`bench/make_lora.py`) it loads the DiT and the text encoder in `DTYPE` (bf16 unless
//! set) and keeps them resident, so that the merge is timed on a loaded DiT; `BASE_STEPS` 0
//! skips the base run (50 steps with CFG on a full-size model is most of an hour on 2 cores).
//! One markdown table per part.

use chitu::pipeline::video::{peak_rss_bytes, stage_peak, start_stage_peak};
use chitu::pipeline::{
    DiffusionBackend, DiffusionTask, DiffusionUserParams, Generator, LoadOptions, LoraSpec, Precision, StepList,
};
use chitu::{default_device, DefaultBackend as B};
use std::path::PathBuf;
use std::time::Instant;

/// Resident memory now, from `/proc/self/statm` (Linux).
fn rss_now() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn gb(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| format!("{:.3}", b as f64 / 1e9))
}

fn mb(bytes: u64) -> String {
    format!("{:.3}", bytes as f64 / 1e6)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let device = default_device();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity");
    let num = |i: usize, default: usize| args.get(i).map_or(Ok(default), |s| s.parse::<usize>());
    let (backend, lora, name) = match args.as_slice() {
        [] => (
            DiffusionBackend::<B>::embedded_tiny(&device)?,
            fixtures.join("loras/wan21_native.safetensors"),
            "embedded tiny".to_string(),
        ),
        [dir, lora, ..] => {
            let dtype: Precision = std::env::var("DTYPE").unwrap_or_else(|_| "bf16".into()).parse()?;
            let options = LoadOptions {
                dtype,
                ..LoadOptions::default()
            };
            let t0 = Instant::now();
            let backend = DiffusionBackend::<B>::load(dir, &device, options)?;
            eprintln!("loaded {dir} in {dtype} in {:.1}s", t0.elapsed().as_secs_f64());
            (backend, PathBuf::from(lora), dir.clone())
        }
        _ => return Err("usage: bench_lora [DIR LORA [H W F [BASE_STEPS]]]".into()),
    };
    let embedded = args.is_empty();
    let tiny = DiffusionUserParams::tiny("a red fox running through fresh snow at dawn");
    let (h, w, f) = match embedded {
        true => (tiny.height, tiny.width, tiny.num_frames),
        false => (num(2, 240)?, num(3, 416)?, num(4, 9)?),
    };
    let base_steps = num(5, 50)?;
    let base = DiffusionUserParams {
        height: h,
        width: w,
        num_frames: f,
        num_inference_steps: base_steps,
        max_sequence_length: if embedded { tiny.max_sequence_length } else { 512 },
        ..tiny
    };
    let lightning = DiffusionUserParams {
        num_inference_steps: 4,
        guidance_scale: 1.0,
        step_list: Some(StepList::Timesteps(vec![1000.0, 750.0, 500.0, 250.0])),
        shift: Some(5.0),
        ..base.clone()
    };

    // The merge, on a resident DiT.
    let file_bytes = std::fs::metadata(&lora)?.len();
    let before = rss_now();
    let measured = start_stage_peak();
    let t0 = Instant::now();
    let report = backend.apply_lora(&[LoraSpec::new(&lora)], false)?;
    let merge_s = t0.elapsed().as_secs_f64();
    let merge_peak = if measured { stage_peak() } else { None };
    let after = rss_now();
    println!("### LoRA merge: {name}, {}\n", lora.display());
    println!("| LoRA file MB | tensors merged | merge s | deltas held MB | base kept MB | RSS before GB | peak during merge GB | RSS after GB |");
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {merge_s:.3} | {} | {} | {} | {} | {} |\n",
        mb(file_bytes),
        report.applied.iter().map(|a| a.tensors).sum::<usize>(),
        mb(report.delta_bytes),
        mb(report.base_bytes),
        gb(before),
        gb(merge_peak),
        gb(after)
    );

    let generator = Generator::new(backend);
    let mut rows = Vec::new();
    let mut run = |label: &str, params: &DiffusionUserParams| -> Result<(), Box<dyn std::error::Error>> {
        let t0 = Instant::now();
        let task = generator.run(DiffusionTask::from_user_request(params.clone())?)?;
        let t = task.timings();
        rows.push(format!(
            "| {label} | {} | {} | {} | {:.3} | {:.4} | {:.3} |",
            params.num_inference_steps,
            params.guidance_scale,
            task.dit_calls(),
            t.denoise,
            t.denoise / task.dit_calls().max(1) as f64,
            t0.elapsed().as_secs_f64()
        ));
        Ok(())
    };
    run("LoRA, LightX2V's 4-step list, guidance 1", &lightning)?;
    let t0 = Instant::now();
    generator.backend.remove_lora()?;
    let unmerge_s = t0.elapsed().as_secs_f64();
    if base_steps > 0 {
        run("base schedule with CFG, no LoRA", &base)?;
    }
    println!("### Few-step against the base schedule: {name}, {w}x{h}, {f} frames\n");
    println!("| run | steps | guidance | DiT evaluations | denoise s | s per evaluation | wall s |");
    println!("|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    println!(
        "\nunmerge (base weights back): {unmerge_s:.3}s; process peak RSS {} GB",
        gb(peak_rss_bytes())
    );
    Ok(())
}
