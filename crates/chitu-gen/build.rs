//! Whether the trained demo model's files are in `assets/demo` (they are committed; only a tree
//! that is retraining them from scratch lacks them, and `examples/train_demo.rs` must still
//! build there).

use std::path::Path;

const FILES: [&str; 5] = [
    "tokenizer.json",
    "text_encoder.safetensors",
    "transformer.safetensors",
    "vae.safetensors",
    "vae_stats.json",
];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(chitu_demo_assets)");
    println!("cargo::rerun-if-changed=assets/demo");
    let dir = Path::new("assets/demo");
    if FILES.iter().all(|f| dir.join(f).is_file()) {
        println!("cargo::rustc-cfg=chitu_demo_assets");
    }
}
