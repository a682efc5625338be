//! Loading a Wan VAE checkpoint.

use crate::{VaeError, WanVae, WanVaeConfig};
use burn::tensor::backend::Backend;
use chitu_store::{load_strict_as, read_json, weight_files, Cast, Precision};
use std::path::{Path, PathBuf};

/// Which naming scheme a VAE checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeLayout {
    /// diffusers' `AutoencoderKLWan` keys (`decoder.up_blocks.0.resnets.0.conv1.weight`, ...).
    Diffusers,
    /// Wan's own `Wan2.1_VAE.pth` and `Wan2.2_VAE.pth` keys (`decoder.upsamples.4.residual.2.weight`,
    /// `encoder.downsamples.0.downsamples.1.resample.1.weight`, `conv1.weight`, ...).
    Wan,
}

/// diffusers names → module paths: the per-frame conv of a resampler sits at index 1 of a
/// `Sequential` (after the padding or upsampling layer).
const DIFFUSERS_REMAP: &[(&str, &str)] = &[(r"\.resample\.1\.", ".resample.")];

/// Wan names → module paths that do not depend on the config. Wan's residual blocks are a
/// `Sequential` (norm at 0, conv at 2, norm at 3, conv at 6); its middle is [res, attn, res].
const WAN_REMAP: &[(&str, &str)] = &[
    (r"^encoder\.conv1\.", "encoder.conv_in."),
    (r"^decoder\.conv1\.", "decoder.conv_in."),
    (r"^conv1\.", "quant_conv."),
    (r"^conv2\.", "post_quant_conv."),
    (r"^(encoder|decoder)\.middle\.0\.", "$1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.middle\.1\.", "$1.mid_block.attentions.0."),
    (r"^(encoder|decoder)\.middle\.2\.", "$1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.head\.0\.", "$1.norm_out."),
    (r"^(encoder|decoder)\.head\.2\.", "$1.conv_out."),
    (r"^encoder\.downsamples\.", "encoder.down_blocks."),
    (r"\.residual\.0\.", ".norm1."),
    (r"\.residual\.2\.", ".conv1."),
    (r"\.residual\.3\.", ".norm2."),
    (r"\.residual\.6\.", ".conv2."),
    (r"\.shortcut\.", ".conv_shortcut."),
    (r"\.resample\.1\.", ".resample."),
];

impl VaeLayout {
    /// The remap table of this layout for a VAE of shape `config`. Wan's decoder keeps its up
    /// blocks as one flat list, so where each entry lands depends on the number of stages and
    /// residual blocks.
    pub fn remap_table(self, config: &WanVaeConfig) -> Vec<(String, String)> {
        let own = |t: &[(&str, &str)]| {
            t.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        match self {
            Self::Diffusers => own(DIFFUSERS_REMAP),
            Self::Wan if config.is_residual => {
                // Wan2.2 nests each stage's layers (`downsamples.S.downsamples.N`): the residual
                // blocks come first, the resampler last.
                let mut table = own(WAN22_STAGES);
                table.extend(own(WAN_REMAP));
                table
            }
            Self::Wan => {
                let mut table = Vec::new();
                let mut flat = 0;
                let stages = config.dim_mult.len();
                for block in 0..stages {
                    for res in 0..=config.num_res_blocks {
                        table.push((
                            format!(r"^decoder\.upsamples\.{flat}\."),
                            format!("decoder.up_blocks.{block}.resnets.{res}."),
                        ));
                        flat += 1;
                    }
                    if block + 1 != stages {
                        table.push((
                            format!(r"^decoder\.upsamples\.{flat}\."),
                            format!("decoder.up_blocks.{block}.upsamplers.0."),
                        ));
                        flat += 1;
                    }
                }
                table.extend(own(WAN_REMAP));
                table
            }
        }
    }
}

/// Wan2.2's nested stages → module paths, applied before [`WAN_REMAP`].
const WAN22_STAGES: &[(&str, &str)] = &[
    (
        r"^encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.(residual|shortcut)\.",
        "encoder.down_blocks.$1.resnets.$2.$3.",
    ),
    (
        r"^encoder\.downsamples\.(\d+)\.downsamples\.\d+\.",
        "encoder.down_blocks.$1.downsampler.",
    ),
    (
        r"^decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\.(residual|shortcut)\.",
        "decoder.up_blocks.$1.resnets.$2.$3.",
    ),
    (
        r"^decoder\.upsamples\.(\d+)\.upsamples\.\d+\.",
        "decoder.up_blocks.$1.upsampler.",
    ),
];

/// Module-path segments held in f32 at every precision: the RMS norms' gains (which the VAE
/// stores as `[C, 1, 1, 1]`, so the rank rule alone would not keep them).
pub const KEEP_F32: &[&str] = &["gamma"];

impl<B: Backend> WanVae<B> {
    /// Loads f32 weights in the given layout.
    pub fn load_weights(self, files: &[PathBuf], layout: VaeLayout) -> Result<Self, VaeError> {
        self.load_weights_as(files, layout, Precision::F32)
    }

    /// Loads weights in the given layout, holding the conv kernels in `precision`.
    pub fn load_weights_as(self, files: &[PathBuf], layout: VaeLayout, precision: Precision) -> Result<Self, VaeError> {
        let table = layout.remap_table(&self.config);
        let cast = Cast::new(precision, KEEP_F32);
        load_strict_as(self, files, &table, &format!("{layout:?} VAE"), cast)
            .map(|(m, _)| m)
            .map_err(VaeError::from)
    }

    /// Loads a diffusers `vae/` folder: `config.json` and `diffusion_pytorch_model.safetensors`.
    pub fn from_dir(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self, VaeError> {
        Self::from_dir_as(dir, device, Precision::F32)
    }

    /// [`WanVae::from_dir`], holding the conv kernels in `precision`.
    pub fn from_dir_as(dir: impl AsRef<Path>, device: &B::Device, precision: Precision) -> Result<Self, VaeError> {
        let dir = dir.as_ref();
        let path = dir.join("config.json");
        let json = read_json(&path)?;
        let config =
            WanVaeConfig::from_json(&json).map_err(|e| VaeError::Config(format!("{}: {e}", path.display())))?;
        let files = weight_files(dir, "diffusion_pytorch_model")?;
        Self::new(config, device)?.load_weights_as(&files, VaeLayout::Diffusers, precision)
    }

    /// Loads Wan's own VAE checkpoint (`Wan2.1_VAE.pth`, `Wan2.2_VAE.pth`, or the same keys in
    /// safetensors) for a VAE of shape `config` (`WanVaeConfig::default()` for Wan2.1 and
    /// Wan2.2-A14B, [`WanVaeConfig::wan22`] for TI2V-5B).
    pub fn from_wan_checkpoint(
        path: impl AsRef<Path>,
        config: WanVaeConfig,
        device: &B::Device,
    ) -> Result<Self, VaeError> {
        Self::from_wan_checkpoint_as(path, config, device, Precision::F32)
    }

    /// [`WanVae::from_wan_checkpoint`], holding the conv kernels in `precision`.
    pub fn from_wan_checkpoint_as(
        path: impl AsRef<Path>,
        config: WanVaeConfig,
        device: &B::Device,
        precision: Precision,
    ) -> Result<Self, VaeError> {
        Self::new(config, device)?.load_weights_as(&[path.as_ref().to_owned()], VaeLayout::Wan, precision)
    }
}
