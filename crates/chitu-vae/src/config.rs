//! The Wan VAE hyper-parameters (diffusers' `AutoencoderKLWan` config).

use crate::VaeError;
use serde::Deserialize;

/// Shape of a Wan2.1 VAE. The Wan2.2-A14B experts use this same VAE.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WanVaeConfig {
    #[serde(default = "d_base")]
    /// Width of the first encoder stage (96 for Wan2.1).
    pub base_dim: usize,
    #[serde(default)]
    /// Width of the decoder's first stage; `base_dim` when unset.
    pub decoder_base_dim: Option<usize>,
    #[serde(default = "d_z")]
    /// Latent channels (16 for Wan2.1).
    pub z_dim: usize,
    #[serde(default = "d_mult")]
    /// Width multiplier of each stage.
    pub dim_mult: Vec<usize>,
    #[serde(default = "d_res")]
    /// Residual blocks per stage.
    pub num_res_blocks: usize,
    #[serde(default)]
    /// Scales with attention (none in Wan).
    pub attn_scales: Vec<f64>,
    #[serde(default = "d_temporal")]
    /// Whether each downsampling also halves time (diffusers' spelling).
    pub temperal_downsample: Vec<bool>,
    #[serde(default = "d_mean")]
    /// Per-channel latent mean the DiT's latents are normalised by.
    pub latents_mean: Vec<f64>,
    #[serde(default = "d_std")]
    /// Per-channel latent standard deviation.
    pub latents_std: Vec<f64>,
    #[serde(default)]
    /// The Wan2.2 residual blocks (not supported yet).
    pub is_residual: bool,
    #[serde(default = "d_rgb")]
    /// Pixel channels in (3).
    pub in_channels: usize,
    #[serde(default = "d_rgb")]
    /// Pixel channels out (3).
    pub out_channels: usize,
    #[serde(default)]
    /// Spatial patchify of the Wan2.2 VAE (not supported yet).
    pub patch_size: Option<usize>,
}

fn d_base() -> usize {
    96
}
fn d_z() -> usize {
    16
}
fn d_mult() -> Vec<usize> {
    vec![1, 2, 4, 4]
}
fn d_res() -> usize {
    2
}
fn d_temporal() -> Vec<bool> {
    vec![false, true, true]
}
fn d_rgb() -> usize {
    3
}
fn d_mean() -> Vec<f64> {
    vec![
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632, -0.1922,
        -0.9497, 0.2503, -0.2921,
    ]
}
fn d_std() -> Vec<f64> {
    vec![
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253,
        2.8251, 1.9160,
    ]
}

impl Default for WanVaeConfig {
    /// The Wan2.1 VAE (`Wan2.1_VAE.pth`, diffusers `vae/`).
    fn default() -> Self {
        Self {
            base_dim: d_base(),
            decoder_base_dim: None,
            z_dim: d_z(),
            dim_mult: d_mult(),
            num_res_blocks: d_res(),
            attn_scales: Vec::new(),
            temperal_downsample: d_temporal(),
            latents_mean: d_mean(),
            latents_std: d_std(),
            is_residual: false,
            in_channels: 3,
            out_channels: 3,
            patch_size: None,
        }
    }
}

impl WanVaeConfig {
    /// Spatial downsampling factor (8 for Wan2.1).
    pub fn spatial_factor(&self) -> usize {
        1 << (self.dim_mult.len() - 1)
    }

    /// Temporal downsampling factor (4 for Wan2.1).
    pub fn temporal_factor(&self) -> usize {
        1 << self.temperal_downsample.iter().filter(|&&t| t).count()
    }

    /// Parses a diffusers `vae/config.json` and checks it is supported.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, VaeError> {
        let c: Self = serde_json::from_value(value.clone()).map_err(|e| VaeError::Config(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// Checks the relations the model relies on.
    pub fn validate(&self) -> Result<(), VaeError> {
        let bad = |m: String| Err(VaeError::Config(m));
        if self.is_residual {
            return bad("is_residual (the Wan2.2 TI2V-5B VAE) is not supported".into());
        }
        if self.patch_size.is_some_and(|p| p != 1) {
            return bad(format!("patch_size {:?} is not supported", self.patch_size));
        }
        if self.dim_mult.len() < 2 || self.temperal_downsample.len() != self.dim_mult.len() - 1 {
            return bad(format!(
                "dim_mult {:?} needs one temperal_downsample flag per downsampling stage, got {:?}",
                self.dim_mult, self.temperal_downsample
            ));
        }
        if self.base_dim == 0 || self.z_dim == 0 || self.num_res_blocks == 0 || self.dim_mult.contains(&0) {
            return bad("base_dim, z_dim, num_res_blocks and dim_mult must be positive".into());
        }
        let dec = self.decoder_base_dim.unwrap_or(self.base_dim);
        if self.dim_mult.iter().any(|m| !(m * dec).is_multiple_of(2)) {
            return bad("decoder widths must be even (upsamplers halve them)".into());
        }
        if self.latents_mean.len() != self.z_dim || self.latents_std.len() != self.z_dim {
            return bad(format!(
                "latents_mean/latents_std must have z_dim = {} entries",
                self.z_dim
            ));
        }
        if self.latents_std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return bad("latents_std entries must be finite and non-zero".into());
        }
        Ok(())
    }
}
