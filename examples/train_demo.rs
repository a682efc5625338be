//! Trains the embedded demo model from scratch (`chitu::demo::train`) and writes the files the
//! binary embeds:
//!
//! ```sh
//! cargo run --release --example train_demo                   # every stage, into crates/chitu-gen/assets/demo
//! cargo run --release --example train_demo -- --stage dit    # one stage (the earlier ones' files must exist)
//! ```
//!
//! A stopped run resumes from its last checkpoint in `--work`.

use chitu::demo::train::{train, Stage, TrainError, TrainOptions};
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
struct Args {
    /// Where the trained model's files go (the binary embeds them from the default).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Checkpoints and intermediate files.
    #[arg(long)]
    work: Option<PathBuf>,
    /// The stages to run.
    #[arg(long, value_enum, default_value = "all")]
    stage: Stage,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    vae_steps: Option<usize>,
    /// VAE steps on whole clips, after the window steps.
    #[arg(long)]
    vae_clip_steps: Option<usize>,
    #[arg(long)]
    dit_steps: Option<usize>,
    /// Clips whose latents the DiT trains on.
    #[arg(long)]
    dit_clips: Option<usize>,
    /// Adam's peak learning rate for the VAE.
    #[arg(long)]
    vae_lr: Option<f64>,
    /// Adam's peak learning rate for the VAE's whole-clip steps.
    #[arg(long)]
    vae_clip_lr: Option<f64>,
    /// Extra reconstruction weight of pixels that show an object.
    #[arg(long)]
    vae_object_weight: Option<f32>,
    /// Adam's peak learning rate for the DiT.
    #[arg(long)]
    dit_lr: Option<f64>,
    /// Extra loss weight of latent cells that show an object.
    #[arg(long)]
    dit_object_weight: Option<f32>,
}

fn main() -> Result<(), TrainError> {
    let args = Args::parse();
    let d = TrainOptions::default();
    train(&TrainOptions {
        out: args.out.unwrap_or(d.out),
        work: args.work.unwrap_or(d.work),
        stage: args.stage,
        seed: args.seed.unwrap_or(d.seed),
        vae_steps: args.vae_steps.unwrap_or(d.vae_steps),
        vae_clip_steps: args.vae_clip_steps.unwrap_or(d.vae_clip_steps),
        vae_clip_lr: args.vae_clip_lr.unwrap_or(d.vae_clip_lr),
        vae_object_weight: args.vae_object_weight.unwrap_or(d.vae_object_weight),
        dit_steps: args.dit_steps.unwrap_or(d.dit_steps),
        dit_clips: args.dit_clips.unwrap_or(d.dit_clips),
        vae_lr: args.vae_lr.unwrap_or(d.vae_lr),
        dit_lr: args.dit_lr.unwrap_or(d.dit_lr),
        dit_object_weight: args.dit_object_weight.unwrap_or(d.dit_object_weight),
    })
}
