//! Decodes a Wan2.1-width VAE (base_dim 96, z 16, random weights) at 480x832, 5 frames
//! (latent 16x2x60x104), plainly or in tiles, and prints time per latent frame and peak RSS.
//! Run each mode in its own process so that peak RSS belongs to that mode:
//!
//! ```text
//! cargo run --release --example bench_vae -- plain
//! cargo run --release --example bench_vae -- tiled
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
    let dev = default_device();
    let vae = WanVae::<B>::new(WanVaeConfig::default(), &dev)?;
    let z = Tensor::<B, 5>::random([1, 16, 2, 60, 104], Distribution::Normal(0.0, 1.0), &dev);
    let before = peak_rss_mib().unwrap_or(0.0);
    let t0 = Instant::now();
    let video = match mode.as_str() {
        "plain" => vae.decode(z)?,
        "tiled" => vae.decode_tiled(z, TileConfig::default())?,
        other => return Err(format!("mode {other:?}: expected plain or tiled").into()),
    };
    let _: f32 = video.clone().slice([0..1, 0..1, 0..1, 0..1, 0..1]).into_scalar();
    let secs = t0.elapsed().as_secs_f64();
    println!("| mode | output | s per latent frame | peak RSS MiB (weights+input before) |");
    println!("|---|---|---|---|");
    println!(
        "| {mode} | {:?} | {:.1} | {:.0} ({:.0}) |",
        video.dims(),
        secs / 2.0,
        peak_rss_mib().unwrap_or(f64::NAN),
        before
    );
    Ok(())
}
