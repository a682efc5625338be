//! Loading a Wan VAE checkpoint.

use crate::{VaeError, WanVae, WanVaeConfig};
use burn::tensor::backend::Backend;
use chitu_store::{load_strict, weight_files};
use std::path::{Path, PathBuf};

/// Which naming scheme a VAE checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeLayout {
    /// diffusers' `AutoencoderKLWan` keys (`decoder.up_blocks.0.resnets.0.conv1.weight`, ...).
    Diffusers,
}

/// diffusers names → module paths: the per-frame conv of a resampler sits at index 1 of a
/// `Sequential` (after the padding or upsampling layer).
const DIFFUSERS_REMAP: &[(&str, &str)] = &[(r"\.resample\.1\.", ".resample.")];

impl VaeLayout {
    /// The remap table of this layout.
    pub fn remap_table(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Diffusers => DIFFUSERS_REMAP,
        }
    }
}

impl<B: Backend> WanVae<B> {
    /// Loads weights in the given layout.
    pub fn load_weights(self, files: &[PathBuf], layout: VaeLayout) -> Result<Self, VaeError> {
        load_strict(self, files, layout.remap_table(), &format!("{layout:?} VAE"))
            .map(|(m, _)| m)
            .map_err(|e| VaeError::Weights(e.to_string()))
    }

    /// Loads a diffusers `vae/` folder: `config.json` and `diffusion_pytorch_model.safetensors`.
    pub fn from_dir(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self, VaeError> {
        let dir = dir.as_ref();
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| VaeError::Io(path.display().to_string(), e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| VaeError::Config(format!("{}: {e}", path.display())))?;
        let config =
            WanVaeConfig::from_json(&json).map_err(|e| VaeError::Config(format!("{}: {e}", path.display())))?;
        let files = weight_files(dir, "diffusion_pytorch_model").map_err(|e| VaeError::Weights(e.to_string()))?;
        Self::new(config, device)?.load_weights(&files, VaeLayout::Diffusers)
    }
}
