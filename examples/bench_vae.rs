//! Decodes a real-width VAE with random weights, plainly or in tiles, and prints time per latent
//! frame and peak RSS: Wan2.1's (base_dim 96, z 16) at 480x832, 5 frames (latent 16x2x60x104),
//! or Wan2.2's (base 160, decoder 256, z 48, 2x2 patchify) at 704x1280, 5 frames (latent
//! 48x2x44x80). Run each mode in its own process so that peak RSS belongs to that mode:
//!
//! ```text
//! cargo run --release --example bench_vae -- plain [wan21|wan22]
//! cargo run --release --example bench_vae -- tiled [wan21|wan22]
//! ```

use burn::tensor::{Distribution, Tensor};
use chitu::vae::{TileConfig, WanVae, WanVaeConfig};
use chitu::{default_device, DefaultBackend as B};
use std::time::Instant;

/// Peak resident set size of this process, from /proc (Linux), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "plain".into());
    let model = std::env::args().nth(2).unwrap_or_else(|| "wan21".into());
    let dev = default_device();
    let (config, shape) = match model.as_str() {
        "wan21" => (WanVaeConfig::default(), [1, 16, 2, 60, 104]),
        "wan22" => (WanVaeConfig::wan22(), [1, 48, 2, 44, 80]),
        other => return Err(format!("model {other:?}: expected wan21 or wan22").into()),
    };
    let vae = WanVae::<B>::new(config, &dev)?;
    let z = Tensor::<B, 5>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
    let before = peak_rss_mib().unwrap_or(0.0);
    let t0 = Instant::now();
    let video = match mode.as_str() {
        "plain" => vae.decode(z)?,
        "tiled" => vae.decode_tiled(z, TileConfig::default())?,
        other => return Err(format!("mode {other:?}: expected plain or tiled").into()),
    };
    let _: f32 = video.clone().slice([0..1, 0..1, 0..1, 0..1, 0..1]).into_scalar();
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "Machine: {}; GEMM: {}\n",
        chitu_host::Machine::detect(),
        chitu_host::sgemm::Sgemm::get().kind().name()
    );
    println!("| VAE | mode | output | s per latent frame | peak RSS MiB (weights+input before) |");
    println!("|---|---|---|---|---|");
    println!(
        "| {model} | {mode} | {:?} | {:.1} | {:.0} ({:.0}) |",
        video.dims(),
        secs / 2.0,
        peak_rss_mib().unwrap_or(f64::NAN),
        before
    );
    Ok(())
}
