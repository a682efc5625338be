//! Wan's own release folders (`Wan-AI/Wan2.1-T2V-*`, `Wan-AI/Wan2.2-T2V-A14B`), beside diffusers'.
//!
//! Such a folder holds the DiT in Wan's key layout (`config.json` plus
//! `diffusion_pytorch_model*.safetensors`, or `high_noise_model/` and `low_noise_model/` for
//! Wan2.2-A14B), the UMT5 encoder as `models_t5_umt5-xxl-enc-bf16.pth`, the VAE as
//! `Wan2.1_VAE.pth` and the tokenizer under `google/umt5-xxl/`. It carries no configs for the text
//! encoder, VAE or sampler: those come from Wan's code, and [`WanNativeConfig`] holds them.

use crate::GenError;
use chitu_text::Umt5Config;
use chitu_vae::WanVaeConfig;
use std::path::{Path, PathBuf};

/// What Wan's code fixes for a release folder: encoder and VAE shapes, sampler shift, expert
/// boundary.
#[derive(Debug, Clone, PartialEq)]
pub struct WanNativeConfig {
    /// The UMT5 encoder's shape.
    pub text: Umt5Config,
    /// The VAE's shape.
    pub vae: WanVaeConfig,
    /// Flow shift of the UniPC sampler (Wan's `sample_shift`).
    pub shift: f64,
    /// Expert switch of a two-expert folder (Wan's `boundary`).
    pub boundary_ratio: Option<f64>,
}

impl WanNativeConfig {
    /// Wan2.1 text-to-video (1.3B and 14B): UMT5-XXL, the Wan2.1 VAE, shift 5.
    pub fn wan21_t2v() -> Self {
        Self {
            text: Umt5Config::umt5_xxl(),
            vae: WanVaeConfig::default(),
            shift: 5.0,
            boundary_ratio: None,
        }
    }

    /// Wan2.2-T2V-A14B: as Wan2.1, with shift 12 and the expert switch at 0.875.
    pub fn wan22_t2v_a14b() -> Self {
        Self {
            shift: 12.0,
            boundary_ratio: Some(0.875),
            ..Self::wan21_t2v()
        }
    }

    /// The preset for a folder: Wan2.2-A14B when it has `high_noise_model/`, else Wan2.1.
    pub fn for_dir(dir: &Path) -> Self {
        if dir.join("high_noise_model").is_dir() {
            Self::wan22_t2v_a14b()
        } else {
            Self::wan21_t2v()
        }
    }
}

/// Whether `dir` looks like a Wan release folder rather than a diffusers one.
pub fn is_wan_native(dir: &Path) -> bool {
    !dir.join("model_index.json").exists()
        && (dir.join("high_noise_model").is_dir() || dir.join("config.json").is_file())
}

/// The first of `names` present in `dir` (Wan ships `.pth`; converted `.safetensors` also load).
pub(crate) fn find(dir: &Path, names: &[&str]) -> Result<PathBuf, GenError> {
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| GenError::Folder {
            path: dir.to_path_buf(),
            message: format!("none of {} found", names.join(", ")),
        })
}
