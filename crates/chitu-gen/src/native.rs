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
    /// What the model is conditioned on.
    pub pipeline: crate::PipelineKind,
    /// Wan's defaults for a request: steps, guidance (high-noise expert, low-noise expert), frames.
    pub defaults: NativeDefaults,
}

/// A Wan config's `sample_steps`, `sample_guide_scale` and `frame_num`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NativeDefaults {
    /// Denoise steps.
    pub steps: usize,
    /// Guidance of the (high-noise) expert.
    pub guidance: f64,
    /// Guidance of the low-noise expert.
    pub guidance_2: Option<f64>,
    /// Frames.
    pub frames: usize,
    /// `(height, width)` of the config's main size.
    pub size: (usize, usize),
}

impl WanNativeConfig {
    /// Wan2.1 text-to-video (1.3B and 14B): UMT5-XXL, the Wan2.1 VAE, shift 5.
    pub fn wan21_t2v() -> Self {
        Self {
            text: Umt5Config::umt5_xxl(),
            vae: WanVaeConfig::default(),
            shift: 5.0,
            boundary_ratio: None,
            pipeline: crate::PipelineKind::TextToVideo,
            defaults: NativeDefaults {
                steps: 50,
                guidance: 5.0,
                guidance_2: None,
                frames: 81,
                size: (480, 832),
            },
        }
    }

    /// Wan2.2-T2V-A14B: as Wan2.1, with shift 12 and the expert switch at 0.875 (Wan2.2's
    /// `wan_t2v_A14B.py`: 40 steps, guidance 4.0 high-noise and 3.0 low-noise).
    pub fn wan22_t2v_a14b() -> Self {
        Self {
            shift: 12.0,
            boundary_ratio: Some(0.875),
            defaults: NativeDefaults {
                steps: 40,
                guidance: 4.0,
                guidance_2: Some(3.0),
                frames: 81,
                size: (720, 1280),
            },
            ..Self::wan21_t2v()
        }
    }

    /// Wan2.2 TI2V-5B (`ti2v-5B`, Wan2.2's `wan_ti2v_5B.py`): the Wan2.2 VAE, shift 5, 50 steps,
    /// guidance 5, 121 frames at 704x1280.
    pub fn wan22_ti2v_5b() -> Self {
        Self {
            vae: WanVaeConfig::wan22(),
            pipeline: crate::PipelineKind::TextImageToVideo,
            defaults: NativeDefaults {
                steps: 50,
                guidance: 5.0,
                guidance_2: None,
                frames: 121,
                size: (704, 1280),
            },
            ..Self::wan21_t2v()
        }
    }

    /// Wan2.2 I2V-A14B (`i2v-A14B`, Wan2.2's `wan_i2v_A14B.py`): the Wan2.1 VAE, shift 5, the
    /// expert switch at 0.9, 40 steps, guidance 3.5 for both experts.
    pub fn wan22_i2v_a14b() -> Self {
        Self {
            shift: 5.0,
            boundary_ratio: Some(0.9),
            pipeline: crate::PipelineKind::ImageToVideo,
            defaults: NativeDefaults {
                steps: 40,
                guidance: 3.5,
                guidance_2: Some(3.5),
                frames: 81,
                size: (720, 1280),
            },
            ..Self::wan21_t2v()
        }
    }

    /// The preset Wan names `task` (`t2v-1.3B`, `t2v-14B`, `t2v-A14B`, `ti2v-5B`, `i2v-A14B`).
    pub fn by_name(task: &str) -> Option<Self> {
        Some(match task {
            "t2v-1.3B" | "t2v-14B" => Self::wan21_t2v(),
            "t2v-A14B" => Self::wan22_t2v_a14b(),
            "ti2v-5B" => Self::wan22_ti2v_5b(),
            "i2v-A14B" => Self::wan22_i2v_a14b(),
            _ => return None,
        })
    }

    /// The preset for a folder: TI2V-5B when it holds `Wan2.2_VAE.pth`; with `high_noise_model/`,
    /// I2V-A14B when the expert's `config.json` says `model_type: i2v` (or 36 input channels),
    /// else T2V-A14B; else Wan2.1.
    pub fn for_dir(dir: &Path) -> Self {
        if dir.join("Wan2.2_VAE.pth").is_file() || dir.join("Wan2.2_VAE.safetensors").is_file() {
            return Self::wan22_ti2v_5b();
        }
        if dir.join("high_noise_model").is_dir() {
            let config = chitu_store::read_json(&dir.join("high_noise_model/config.json")).ok();
            let i2v = config.is_some_and(|c| {
                c.get("model_type").and_then(|v| v.as_str()) == Some("i2v")
                    || c.get("in_dim").and_then(|v| v.as_u64()) == Some(36)
            });
            return if i2v {
                Self::wan22_i2v_a14b()
            } else {
                Self::wan22_t2v_a14b()
            };
        }
        Self::wan21_t2v()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each Wan2.2 release is told apart by what its folder holds, as Wan's own `generate.py`
    /// is told by `--task`.
    #[test]
    fn release_folders_pick_their_wan_config() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(WanNativeConfig::for_dir(d), WanNativeConfig::wan21_t2v());
        std::fs::create_dir(d.join("high_noise_model")).unwrap();
        assert_eq!(WanNativeConfig::for_dir(d), WanNativeConfig::wan22_t2v_a14b());
        std::fs::write(
            d.join("high_noise_model/config.json"),
            r#"{"model_type": "i2v", "in_dim": 36}"#,
        )
        .unwrap();
        let i2v = WanNativeConfig::for_dir(d);
        assert_eq!(i2v, WanNativeConfig::wan22_i2v_a14b());
        assert_eq!(
            (i2v.shift, i2v.boundary_ratio, i2v.defaults.steps),
            (5.0, Some(0.9), 40)
        );
        std::fs::write(d.join("Wan2.2_VAE.pth"), b"").unwrap();
        let ti2v = WanNativeConfig::for_dir(d);
        assert_eq!(ti2v.pipeline, crate::PipelineKind::TextImageToVideo);
        assert_eq!(
            (ti2v.vae.z_dim, ti2v.vae.spatial_factor(), ti2v.defaults.frames),
            (48, 16, 121)
        );
        assert_eq!(WanNativeConfig::by_name("ti2v-5B"), Some(ti2v));
        assert_eq!(WanNativeConfig::by_name("x"), None);
    }
}
