//! Peak memory and time of loading a UMT5 checkpoint in Wan's key layout, one load per process
//! so that the peak RSS is the load's own.
//!
//! ```text
//! python bench/torch_side.py wan_t5 ~/.cache/chitu-bench/work   # once: bf16 .pth and .safetensors
//! cargo run --release --example bench_load -- CONFIG.json CHECKPOINT [in-file|on-device]
//! ```
//! Prints one JSON line: the file, where the token table went, load seconds, peak RSS bytes.

use chitu::pipeline::video::peak_rss_bytes;
use chitu::text::{TextLayout, TokenTable, Umt5Config, Umt5Encoder};
use chitu::{default_device, DefaultBackend as B};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (config, checkpoint, table) = match args.as_slice() {
        [c, f] => (c, f, TokenTable::InFile),
        [c, f, t] if t == "in-file" => (c, f, TokenTable::InFile),
        [c, f, t] if t == "on-device" => (c, f, TokenTable::OnDevice),
        _ => return Err("usage: bench_load CONFIG.json CHECKPOINT [in-file|on-device]".into()),
    };
    let config: Umt5Config = serde_json::from_str(&std::fs::read_to_string(config)?)?;
    let t0 = Instant::now();
    let encoder = Umt5Encoder::<B>::new(config, &default_device())?.load_weights_with(
        &[checkpoint.into()],
        TextLayout::Wan,
        table,
        chitu::text::Precision::F32,
    )?;
    let seconds = t0.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "checkpoint": checkpoint,
            "token_table": if encoder.token_rows.is_some() { "in file" } else { "on device" },
            "load_s": seconds,
            "peak_rss_bytes": peak_rss_bytes(),
        })
    );
    Ok(())
}
