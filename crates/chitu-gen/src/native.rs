//! Wan's own release folders (`Wan-AI/Wan2.1-T2V-*`, `Wan-AI/Wan2.2-T2V-A14B`), beside diffusers'.
//!
//! Such a folder holds the DiT in Wan's key layout (`config.json` plus
//! `diffusion_pytorch_model*.safetensors`, or `high_noise_model/` and `low_noise_model/` for
//! Wan2.2-A14B), the UMT5 encoder as `models_t5_umt5-xxl-enc-bf16.pth`, the VAE as
//! `Wan2.1_VAE.pth` and the tokenizer under `google/umt5-xxl/`. It carries no configs for the text
//! encoder, VAE or sampler: those come from Wan's code, and [`WanNativeConfig`] holds them.

use crate::offload::{parks_dits, parks_text};
use crate::{DiffusionBackend, GenError, Offloaded};
use burn::tensor::backend::Backend;
use chitu_dit::WanTransformer;
use chitu_text::{TextEncoder, Umt5Config};
use chitu_vae::{WanVae, WanVaeConfig};
use std::path::{Path, PathBuf};

/// What Wan's code fixes for a release folder: encoder and VAE shapes, sampler shift, expert
/// boundary.
#[derive(Debug, Clone, PartialEq)]
pub struct WanNativeConfig {
    pub text: Umt5Config,
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
fn find(dir: &Path, names: &[&str]) -> Result<PathBuf, GenError> {
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| GenError::Load(format!("{}: none of {} found", dir.display(), names.join(", "))))
}

/// A diffusers UniPC flow-matching scheduler config with `shift`, as Wan's own sampler runs.
pub fn unipc_flow_config(shift: f64) -> serde_json::Value {
    serde_json::json!({
        "_class_name": "UniPCMultistepScheduler",
        "prediction_type": "flow_prediction",
        "use_flow_sigmas": true,
        "flow_shift": shift,
        "num_train_timesteps": 1000
    })
}

impl<B: Backend> DiffusionBackend<B> {
    /// Loads a Wan release folder with the shapes and sampler settings of `config`.
    pub fn from_wan_dir(dir: impl AsRef<Path>, config: &WanNativeConfig, device: &B::Device) -> Result<Self, GenError> {
        Self::from_wan_dir_low_mem(dir, config, device, 0)
    }

    /// [`DiffusionBackend::from_wan_dir`], parking models as they load as
    /// [`DiffusionBackend::from_dir_low_mem`] does.
    pub fn from_wan_dir_low_mem(
        dir: impl AsRef<Path>,
        config: &WanNativeConfig,
        device: &B::Device,
        low_mem: u8,
    ) -> Result<Self, GenError> {
        let dir = dir.as_ref();
        let load = |e: &dyn std::fmt::Display| GenError::Load(e.to_string());
        let t5 = find(
            dir,
            &[
                "models_t5_umt5-xxl-enc-bf16.pth",
                "models_t5_umt5-xxl-enc-bf16.safetensors",
            ],
        )?;
        let tokenizer = find(&dir.join("google/umt5-xxl"), &["tokenizer.json"])?;
        let text = TextEncoder::from_wan_files(&t5, &tokenizer, config.text.clone(), device).map_err(|e| load(&e))?;
        let text = Offloaded::loaded("text encoder", text, device, parks_text(low_mem))?;

        let experts: Vec<PathBuf> = if dir.join("high_noise_model").is_dir() {
            vec![dir.join("high_noise_model"), dir.join("low_noise_model")]
        } else {
            vec![dir.to_path_buf()]
        };
        if (experts.len() == 2) != config.boundary_ratio.is_some() {
            return Err(GenError::Load(format!(
                "{}: {} expert folder(s) but boundary_ratio {:?}; two experts need a boundary and one needs none",
                dir.display(),
                experts.len(),
                config.boundary_ratio
            )));
        }
        let mut model_pool = Vec::new();
        for (i, d) in experts.iter().enumerate() {
            let dit = WanTransformer::from_dir(d, device).map_err(|e| load(&e))?;
            let name = ["transformer", "transformer_2"][i];
            model_pool.push(Offloaded::loaded(name, dit, device, parks_dits(low_mem))?);
        }

        let vae_file = find(dir, &["Wan2.1_VAE.pth", "Wan2.1_VAE.safetensors"])?;
        let vae = WanVae::from_wan_checkpoint(&vae_file, config.vae.clone(), device).map_err(|e| load(&e))?;
        Ok(Self {
            text,
            model_pool,
            boundary_ratio: config.boundary_ratio,
            vae,
            scheduler_config: unipc_flow_config(config.shift),
            device: device.clone(),
        })
    }
}
