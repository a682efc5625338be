//! The Wan VAE hyper-parameters (diffusers' `AutoencoderKLWan` config).

use crate::VaeError;
use serde::Deserialize;

/// Shape of a Wan VAE: Wan2.1's (which the Wan2.2-A14B experts use too) or Wan2.2's
/// (TI2V-5B: residual blocks, 2x2 patchify, 48 latent channels, 16x spatial).
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
    /// The Wan2.2 residual down/up blocks, with their parameter-free `avg_shortcut` paths.
    pub is_residual: bool,
    #[serde(default = "d_rgb")]
    /// Channels into the encoder: 3, or `3 * patch^2` with a patchify (12 for Wan2.2).
    pub in_channels: usize,
    #[serde(default = "d_rgb")]
    /// Channels out of the decoder, before the unpatchify.
    pub out_channels: usize,
    #[serde(default)]
    /// Spatial patchify of the Wan2.2 VAE (2): pixels are folded into channels before the
    /// encoder and unfolded after the decoder.
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
    /// The Wan2.2 VAE of TI2V-5B (`Wan2.2_VAE.pth`), as diffusers' conversion script
    /// (`convert_wan_to_diffusers.py`, `vae22_diffusers_config`) writes it.
    pub fn wan22() -> Self {
        Self {
            base_dim: 160,
            decoder_base_dim: Some(256),
            z_dim: 48,
            num_res_blocks: 2,
            latents_mean: WAN22_MEAN.to_vec(),
            latents_std: WAN22_STD.to_vec(),
            is_residual: true,
            in_channels: 12,
            out_channels: 12,
            patch_size: Some(2),
            ..Self::default()
        }
    }

    /// The 2x2 patchify (1 without one).
    pub fn patch(&self) -> usize {
        self.patch_size.unwrap_or(1)
    }

    /// Spatial factor of the encoder and decoder alone, without the patchify.
    pub fn conv_spatial_factor(&self) -> usize {
        1 << (self.dim_mult.len() - 1)
    }

    /// Pixels per latent along each spatial axis (8 for Wan2.1, 16 for Wan2.2).
    pub fn spatial_factor(&self) -> usize {
        self.conv_spatial_factor() * self.patch()
    }

    /// Video channels (3): the encoder's input channels before the patchify.
    pub fn video_channels(&self) -> usize {
        self.in_channels / (self.patch() * self.patch())
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
        let p2 = self.patch() * self.patch();
        if self.patch() == 0 || !self.in_channels.is_multiple_of(p2) || !self.out_channels.is_multiple_of(p2) {
            return bad(format!(
                "in_channels {} and out_channels {} must be multiples of patch_size^2 = {p2}",
                self.in_channels, self.out_channels
            ));
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
        if !self.is_residual && self.dim_mult.iter().any(|m| !(m * dec).is_multiple_of(2)) {
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
        if self.is_residual {
            self.validate_shortcuts()?;
        }
        Ok(())
    }

    /// The residual blocks' shortcuts fold space and time into channels and average groups of
    /// them (down), or repeat channels and unfold them (up): the widths must divide.
    fn validate_shortcuts(&self) -> Result<(), VaeError> {
        let enc: Vec<usize> = std::iter::once(1)
            .chain(self.dim_mult.iter().copied())
            .map(|m| m * self.base_dim)
            .collect();
        let dec_base = self.decoder_base_dim.unwrap_or(self.base_dim);
        let last = self.dim_mult.len() - 1;
        for i in 0..self.dim_mult.len() {
            let t = if i != last && self.temperal_downsample[i] { 2 } else { 1 };
            let factor = t * if i != last { 4 } else { 1 };
            if !(enc[i] * factor).is_multiple_of(enc[i + 1]) {
                return Err(VaeError::Config(format!(
                    "encoder stage {i}: {} channels times the downsampling factor {factor} must be a multiple of {}",
                    enc[i],
                    enc[i + 1]
                )));
            }
        }
        let dec = self.decoder_dims(dec_base);
        let up: Vec<bool> = self.temperal_downsample.iter().rev().copied().collect();
        for i in 0..last {
            let factor = if up[i] { 8 } else { 4 };
            if !(dec[i + 1] * factor).is_multiple_of(dec[i]) {
                return Err(VaeError::Config(format!(
                    "decoder stage {i}: {} channels times the upsampling factor {factor} must be a multiple of {}",
                    dec[i + 1],
                    dec[i]
                )));
            }
        }
        Ok(())
    }

    /// The decoder's stage widths: the top width, then one per stage.
    pub(crate) fn decoder_dims(&self, base: usize) -> Vec<usize> {
        std::iter::once(self.dim_mult[self.dim_mult.len() - 1])
            .chain(self.dim_mult.iter().rev().copied())
            .map(|m| m * base)
            .collect()
    }
}

/// `latents_mean` of the Wan2.2 VAE (diffusers' `vae22_diffusers_config`).
const WAN22_MEAN: [f64; 48] = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891, 0.1570,
    -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502, -0.2055, -0.0322,
    0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520,
    0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
];

/// `latents_std` of the Wan2.2 VAE.
const WAN22_STD: [f64; 48] = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165,
    0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659, 0.7069, 0.5338, 0.4889, 0.4917,
    0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600,
    0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
];
