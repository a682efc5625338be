//! The README's memory table: each Wan model's predicted peak at each weight format and memory
//! level, computed from the models' tensor shapes (the configs' presets; nothing is loaded or
//! allocated) and the estimate's working-memory model, for one request through the CLI.
//!
//! ```text
//! cargo run --release --example memory_table [-- HEIGHT WIDTH FRAMES]
//! ```
//! The request defaults to Wan's 480x832, 81 frames, CFG, 512 text tokens. Every model carries
//! the UMT5-XXL encoder (its token table stays in its file) and the Wan2.1 VAE in f32.

use chitu::dit::WanDitConfig;
use chitu::pipeline::{estimate::largest, estimate_stages, DiffusionUserParams, Format, MemoryLevel, ModelSizes};
use chitu::store::{Precision, Weights};
use chitu::text::Umt5Config;
use chitu::vae::WanVaeConfig;
use chitu::{default_device, DefaultBackend as B};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("usage: memory_table [HEIGHT WIDTH FRAMES]: {e}"))?;
    let params = match args[..] {
        [] => DiffusionUserParams::default(),
        [height, width, num_frames] => DiffusionUserParams {
            height,
            width,
            num_frames,
            ..DiffusionUserParams::default()
        },
        _ => return Err("usage: memory_table [HEIGHT WIDTH FRAMES]".into()),
    };
    params.validate()?;
    let models = [
        ("Wan2.1-T2V-1.3B", vec![WanDitConfig::wan21_t2v_1_3b()]),
        ("Wan2.1-T2V-14B", vec![WanDitConfig::wan21_t2v_14b()]),
        (
            "Wan2.2-T2V-A14B",
            vec![
                WanDitConfig::wan22_t2v_a14b_expert(),
                WanDitConfig::wan22_t2v_a14b_expert(),
            ],
        ),
    ];
    let formats = [
        Format::F32,
        Format::from(Precision::Bf16),
        Format::new(Precision::Bf16, Weights::Int8),
    ];
    let (text, vae) = (Umt5Config::umt5_xxl(), WanVaeConfig::default());
    let device = default_device();
    let gb = |b: u64| format!("{:.1}", b as f64 / 1e9);
    println!(
        "Predicted peak in GB for one request ({}x{}, {} frames, CFG, {} text tokens), VAE in f32; \
         `weights` is what the DiT(s) and UMT5 hold together.\n",
        params.width, params.height, params.num_frames, params.max_sequence_length
    );
    println!("| model | weights | DiT(s) + UMT5 | low-mem 0 | 1 | 2 | 3 |");
    println!("|---|---|---|---|---|---|---|");
    for (name, dits) in &models {
        for format in formats {
            let sizes = ModelSizes::of_configs::<B>(&text, dits, &vae, format, Precision::F32, &device)?;
            let held = sizes.text_weights + sizes.dit_weights.iter().sum::<u64>();
            let peaks: Vec<String> = (0..=3)
                .map(|level| gb(largest(&estimate_stages(&sizes, &params, MemoryLevel(level), true)).bytes))
                .collect();
            println!("| {name} | {} | {} | {} |", format.name(), gb(held), peaks.join(" | "));
        }
    }
    Ok(())
}
