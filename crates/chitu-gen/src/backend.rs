//! The loaded models of one pipeline (Chitu's `DiffusionBackend`).

use crate::{GenError, WanNativeConfig};
use burn::tensor::backend::Backend;
use chitu_dit::WanTransformer;
use chitu_text::TextEncoder;
use chitu_vae::WanVae;
use std::path::Path;

/// Text encoder, a pool of one or two DiTs, the VAE and the scheduler config of a model.
pub struct DiffusionBackend<B: Backend> {
    pub text: TextEncoder<B>,
    /// `transformer` then, for Wan2.2-A14B, `transformer_2` (the low-noise expert).
    pub model_pool: Vec<WanTransformer<B>>,
    /// The pool switches to its second model once `t < boundary_ratio * num_train_timesteps`.
    pub boundary_ratio: Option<f64>,
    pub vae: WanVae<B>,
    /// The folder's `scheduler/scheduler_config.json`.
    pub scheduler_config: serde_json::Value,
    pub device: B::Device,
}

fn read_json(path: &Path) -> Result<serde_json::Value, GenError> {
    chitu_store::read_json(path).map_err(|e| GenError::Load(e.to_string()))
}

impl<B: Backend> DiffusionBackend<B> {
    /// Loads a diffusers-layout Wan folder: `model_index.json`, `transformer/`, optional
    /// `transformer_2/` with `boundary_ratio`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`.
    /// A Wan release folder (no `model_index.json`) loads with [`DiffusionBackend::from_wan_dir`]
    /// and the preset [`WanNativeConfig::for_dir`] picks.
    pub fn from_dir(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self, GenError> {
        let dir = dir.as_ref();
        if crate::native::is_wan_native(dir) {
            return Self::from_wan_dir(dir, &WanNativeConfig::for_dir(dir), device);
        }
        let index = read_json(&dir.join("model_index.json"))?;
        let text = TextEncoder::from_pipeline_dir(dir, device).map_err(|e| GenError::Load(e.to_string()))?;
        let mut model_pool =
            vec![WanTransformer::from_dir(dir.join("transformer"), device).map_err(|e| GenError::Load(e.to_string()))?];
        let second = index
            .get("transformer_2")
            .and_then(|v| v.get(0))
            .is_some_and(|v| !v.is_null());
        if second {
            model_pool.push(
                WanTransformer::from_dir(dir.join("transformer_2"), device)
                    .map_err(|e| GenError::Load(e.to_string()))?,
            );
        }
        let boundary_ratio = index.get("boundary_ratio").and_then(|v| v.as_f64());
        if second != boundary_ratio.is_some() {
            return Err(GenError::Load(format!(
                "{}: transformer_2 and boundary_ratio must come together",
                dir.join("model_index.json").display()
            )));
        }
        let vae = WanVae::from_dir(dir.join("vae"), device).map_err(|e| GenError::Load(e.to_string()))?;
        let scheduler_config = read_json(&dir.join("scheduler/scheduler_config.json"))?;
        Ok(Self {
            text,
            model_pool,
            boundary_ratio,
            vae,
            scheduler_config,
            device: device.clone(),
        })
    }
}
