//! The loaded models of one pipeline (Chitu's `DiffusionBackend`).

use crate::offload::{parks_dits, parks_text};
use crate::{GenError, Offloaded, WanNativeConfig};
use burn::tensor::backend::Backend;
use chitu_dit::WanTransformer;
use chitu_text::TextEncoder;
use chitu_vae::WanVae;
use std::path::Path;

/// Text encoder, a pool of one or two DiTs, the VAE and the scheduler config of a model.
///
/// The text encoder and the DiTs can be parked in host memory between uses (`low_mem` 2 and 3);
/// [`Offloaded::with`] brings them back.
pub struct DiffusionBackend<B: Backend> {
    pub text: Offloaded<B, TextEncoder<B>>,
    /// `transformer` then, for Wan2.2-A14B, `transformer_2` (the low-noise expert).
    pub model_pool: Vec<Offloaded<B, WanTransformer<B>>>,
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
        Self::from_dir_low_mem(dir, device, 0)
    }

    /// [`DiffusionBackend::from_dir`] for a memory level: from 2 the text encoder, and from 3
    /// each DiT, is parked in host memory as soon as it is loaded, so the device never holds more
    /// than one of them while loading.
    pub fn from_dir_low_mem(dir: impl AsRef<Path>, device: &B::Device, low_mem: u8) -> Result<Self, GenError> {
        let dir = dir.as_ref();
        if crate::native::is_wan_native(dir) {
            return Self::from_wan_dir_low_mem(dir, &WanNativeConfig::for_dir(dir), device, low_mem);
        }
        let index = read_json(&dir.join("model_index.json"))?;
        let second = index
            .get("transformer_2")
            .and_then(|v| v.get(0))
            .is_some_and(|v| !v.is_null());
        let boundary_ratio = index.get("boundary_ratio").and_then(|v| v.as_f64());
        if second != boundary_ratio.is_some() {
            return Err(GenError::Load(format!(
                "{}: transformer_2 and boundary_ratio must come together",
                dir.join("model_index.json").display()
            )));
        }
        let load = |e: &dyn std::fmt::Display| GenError::Load(e.to_string());
        let text = TextEncoder::from_pipeline_dir(dir, device).map_err(|e| load(&e))?;
        let text = Offloaded::loaded("text encoder", text, device, parks_text(low_mem))?;
        let names: &[&str] = if second {
            &["transformer", "transformer_2"]
        } else {
            &["transformer"]
        };
        let mut model_pool = Vec::new();
        for name in names {
            let dit = WanTransformer::from_dir(dir.join(name), device).map_err(|e| load(&e))?;
            model_pool.push(Offloaded::loaded(*name, dit, device, parks_dits(low_mem))?);
        }
        let vae = WanVae::from_dir(dir.join("vae"), device).map_err(|e| load(&e))?;
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

    /// Parks what `low_mem` keeps off the device: the text encoder from level 2, every DiT from
    /// level 3. Each comes back when it is next used.
    pub fn park_for(&self, low_mem: u8) -> Result<(), GenError> {
        if parks_text(low_mem) {
            self.text.park()?;
        }
        if parks_dits(low_mem) {
            self.park_dits_except(None)?;
        }
        Ok(())
    }

    /// Parks every DiT of the pool but `keep`.
    pub(crate) fn park_dits_except(&self, keep: Option<usize>) -> Result<(), GenError> {
        for (i, dit) in self.model_pool.iter().enumerate() {
            if Some(i) != keep {
                dit.park()?;
            }
        }
        Ok(())
    }
}
