//! An embedded tiny Wan model with seeded random weights, built in code with no download.
//!
//! It shows the whole pipeline working (text → DiT loop → VAE → video file) in seconds on a CPU;
//! its videos are noise-like patterns, not a trained model's output.

use crate::{DiffusionBackend, DiffusionUserParams, GenError};
use burn::tensor::backend::Backend;
use chitu_dit::{WanDitConfig, WanTransformer};
use chitu_text::{T5Tokenizer, TextEncoder, Umt5Config, Umt5Encoder};
use chitu_vae::{WanVae, WanVaeConfig};

/// The tiny T5 tokenizer of the parity fixtures (a 120-piece unigram vocabulary).
const TOKENIZER: &str = include_str!("../assets/tiny_tokenizer.json");

/// Seed of the embedded model's weights.
pub const TINY_WEIGHT_SEED: u64 = 2024;

impl<B: Backend> DiffusionBackend<B> {
    /// The embedded tiny Wan2.1-shaped model: 2-layer UMT5 (d 32), 2-block DiT (dim 48),
    /// VAE of base width 8, UniPC with shift 3. Weights are random with a fixed seed.
    pub fn embedded_tiny(device: &B::Device) -> Result<Self, GenError> {
        B::seed(device, TINY_WEIGHT_SEED);
        let tokenizer =
            T5Tokenizer::from_json_bytes(TOKENIZER.as_bytes()).map_err(|e| GenError::Load(e.to_string()))?;
        let text_config = Umt5Config {
            vocab_size: tokenizer.vocab_size(),
            d_model: 32,
            d_kv: 8,
            d_ff: 64,
            num_heads: 4,
            num_layers: 2,
            ..Umt5Config::umt5_xxl()
        };
        let encoder = Umt5Encoder::new(text_config, device).map_err(|e| GenError::Load(e.to_string()))?;
        let dit_config = WanDitConfig {
            num_heads: 2,
            head_dim: 24,
            text_dim: 32,
            ffn_dim: 96,
            num_layers: 2,
            ..WanDitConfig::wan21_t2v_1_3b()
        };
        let dit = WanTransformer::new(dit_config, device).map_err(|e| GenError::Load(e.to_string()))?;
        let vae = WanVae::new(
            WanVaeConfig {
                base_dim: 8,
                ..WanVaeConfig::default()
            },
            device,
        )
        .map_err(|e| GenError::Load(e.to_string()))?;
        Ok(Self {
            text: crate::Offloaded::new(
                "text encoder",
                TextEncoder::new(tokenizer, encoder, device.clone()),
                device,
            ),
            model_pool: vec![crate::Offloaded::new("transformer", dit, device)],
            boundary_ratio: None,
            vae,
            scheduler_config: crate::unipc_flow_config(3.0),
            device: device.clone(),
        })
    }
}

impl DiffusionUserParams {
    /// Defaults sized for the embedded tiny model: 64x64, 9 frames, 10 steps.
    pub fn tiny(prompt: impl Into<String>) -> Self {
        Self {
            height: 64,
            width: 64,
            num_frames: 9,
            num_inference_steps: 10,
            max_sequence_length: 64,
            ..Self::new(prompt)
        }
    }
}
