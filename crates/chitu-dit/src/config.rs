//! The Wan DiT hyper-parameters, with presets and readers for both checkpoint dialects.

use crate::{AttentionKind, DitError};
use serde::Deserialize;
use std::path::Path;

/// Shape of a Wan transformer. One struct covers Wan2.1 T2V 1.3B/14B and both Wan2.2-A14B experts.
#[derive(Debug, Clone, PartialEq)]
pub struct WanDitConfig {
    /// Patch size (t, h, w) of the patch embedding; Wan uses (1, 2, 2).
    pub patch_size: [usize; 3],
    /// Attention heads.
    pub num_heads: usize,
    /// Channels per head; the model width is `num_heads * head_dim`.
    pub head_dim: usize,
    /// Latent channels in and out (16 for the Wan2.1 VAE).
    pub in_channels: usize,
    /// Latent channels out (16 for Wan2.1/2.2-A14B).
    pub out_channels: usize,
    /// Width of the text encoder states (4096 for UMT5-XXL).
    pub text_dim: usize,
    /// Width of the sinusoidal timestep embedding.
    pub freq_dim: usize,
    /// Hidden width of the feed-forward network.
    pub ffn_dim: usize,
    /// Transformer blocks.
    pub num_layers: usize,
    /// Affine LayerNorm in front of cross-attention.
    pub cross_attn_norm: bool,
    /// RMSNorm across heads on q and k.
    pub qk_norm: bool,
    /// Epsilon of every norm.
    pub eps: f64,
    /// Positions the RoPE tables cover per axis (after patching).
    pub rope_max_seq_len: usize,
    /// The attention kernel `forward` uses (not part of the checkpoint).
    pub attention: AttentionKind,
}

impl WanDitConfig {
    /// Model width.
    pub fn dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Wan2.1 T2V 1.3B: dim 1536, 12 heads, ffn 8960, 30 layers.
    pub fn wan21_t2v_1_3b() -> Self {
        Self {
            patch_size: [1, 2, 2],
            num_heads: 12,
            head_dim: 128,
            in_channels: 16,
            out_channels: 16,
            text_dim: 4096,
            freq_dim: 256,
            ffn_dim: 8960,
            num_layers: 30,
            cross_attn_norm: true,
            qk_norm: true,
            eps: 1e-6,
            rope_max_seq_len: 1024,
            attention: AttentionKind::Auto,
        }
    }

    /// Wan2.1 T2V 14B: dim 5120, 40 heads, ffn 13824, 40 layers.
    pub fn wan21_t2v_14b() -> Self {
        Self {
            num_heads: 40,
            ffn_dim: 13824,
            num_layers: 40,
            ..Self::wan21_t2v_1_3b()
        }
    }

    /// Each Wan2.2-A14B T2V expert has the 14B shape.
    pub fn wan22_t2v_a14b_expert() -> Self {
        Self::wan21_t2v_14b()
    }

    /// Checks the relations the model relies on.
    pub fn validate(&self) -> Result<(), DitError> {
        let bad = |msg: String| Err(DitError::Config(msg));
        if self.num_heads == 0 || self.head_dim == 0 || self.num_layers == 0 {
            return bad(format!(
                "num_heads ({}), head_dim ({}) and num_layers ({}) must be positive",
                self.num_heads, self.head_dim, self.num_layers
            ));
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim < 6 {
            return bad(format!(
                "head_dim {} must be even and at least 6 for 3-axis RoPE",
                self.head_dim
            ));
        }
        if !self.freq_dim.is_multiple_of(2) || self.freq_dim == 0 {
            return bad(format!("freq_dim {} must be even and positive", self.freq_dim));
        }
        if self.patch_size.contains(&0) {
            return bad(format!("patch_size {:?} has a zero", self.patch_size));
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return bad(format!("eps {} must be positive", self.eps));
        }
        Ok(())
    }

    /// Reads a `config.json` in either dialect: diffusers' (`_class_name: WanTransformer3DModel`,
    /// `num_attention_heads`, `attention_head_dim`) or Wan's own (`dim`, `num_heads`, `in_dim`, ...).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, DitError> {
        Ok(Self::read(path.as_ref())?.0)
    }

    /// The parsed config and the raw JSON (whose dialect also names the checkpoint layout).
    pub(crate) fn read(path: &Path) -> Result<(Self, serde_json::Value), DitError> {
        let json = chitu_store::read_json(path)?;
        let config = Self::from_json(&json).map_err(|e| DitError::Config(format!("{}: {e}", path.display())))?;
        Ok((config, json))
    }

    /// Parses either config dialect (see [`WanDitConfig::from_file`]).
    pub fn from_json(value: &serde_json::Value) -> Result<Self, DitError> {
        let config = if value.get("num_attention_heads").is_some() {
            let c: DiffusersConfig =
                serde_json::from_value(value.clone()).map_err(|e| DitError::Config(e.to_string()))?;
            if c.image_dim.is_some() || c.added_kv_proj_dim.is_some() {
                return Err(DitError::Config(
                    "image conditioning (image_dim / added_kv_proj_dim, the I2V models) is not supported".into(),
                ));
            }
            let qk_norm = match c.qk_norm.as_deref() {
                Some("rms_norm_across_heads") => true,
                None => false,
                Some(other) => return Err(DitError::Config(format!("unsupported qk_norm {other:?}"))),
            };
            Self {
                patch_size: c.patch_size,
                num_heads: c.num_attention_heads,
                head_dim: c.attention_head_dim,
                in_channels: c.in_channels,
                out_channels: c.out_channels.unwrap_or(c.in_channels),
                text_dim: c.text_dim,
                freq_dim: c.freq_dim,
                ffn_dim: c.ffn_dim,
                num_layers: c.num_layers,
                cross_attn_norm: c.cross_attn_norm,
                qk_norm,
                eps: c.eps,
                rope_max_seq_len: c.rope_max_seq_len,
                attention: AttentionKind::Auto,
            }
        } else if value.get("dim").is_some() {
            let c: NativeConfig = serde_json::from_value(value.clone()).map_err(|e| DitError::Config(e.to_string()))?;
            if c.model_type != "t2v" {
                return Err(DitError::Config(format!(
                    "model_type {:?} is not supported (only t2v)",
                    c.model_type
                )));
            }
            if c.window_size != [-1, -1] {
                return Err(DitError::Config(format!(
                    "local attention window {:?} is not supported",
                    c.window_size
                )));
            }
            if c.num_heads == 0 || !c.dim.is_multiple_of(c.num_heads) {
                return Err(DitError::Config(format!(
                    "dim {} is not divisible by num_heads {}",
                    c.dim, c.num_heads
                )));
            }
            Self {
                patch_size: c.patch_size,
                num_heads: c.num_heads,
                head_dim: c.dim / c.num_heads,
                in_channels: c.in_dim,
                out_channels: c.out_dim,
                text_dim: c.text_dim,
                freq_dim: c.freq_dim,
                ffn_dim: c.ffn_dim,
                num_layers: c.num_layers,
                cross_attn_norm: c.cross_attn_norm,
                qk_norm: c.qk_norm,
                eps: c.eps,
                rope_max_seq_len: 1024,
                attention: AttentionKind::Auto,
            }
        } else {
            return Err(DitError::Config(
                "neither a diffusers (num_attention_heads) nor a Wan (dim) transformer config".into(),
            ));
        };
        config.validate()?;
        Ok(config)
    }
}

/// diffusers' `WanTransformer3DModel` config.json.
#[derive(Deserialize)]
struct DiffusersConfig {
    #[serde(default = "default_patch")]
    patch_size: [usize; 3],
    num_attention_heads: usize,
    attention_head_dim: usize,
    #[serde(default = "default_channels")]
    in_channels: usize,
    out_channels: Option<usize>,
    #[serde(default = "default_text_dim")]
    text_dim: usize,
    #[serde(default = "default_freq_dim")]
    freq_dim: usize,
    ffn_dim: usize,
    num_layers: usize,
    #[serde(default = "yes")]
    cross_attn_norm: bool,
    #[serde(default = "default_qk_norm")]
    qk_norm: Option<String>,
    #[serde(default = "default_eps")]
    eps: f64,
    image_dim: Option<usize>,
    added_kv_proj_dim: Option<usize>,
    #[serde(default = "default_rope_len")]
    rope_max_seq_len: usize,
}

/// Wan's own config.json (as shipped with Wan2.1-T2V-1.3B and the Wan2.2 expert folders).
#[derive(Deserialize)]
struct NativeConfig {
    #[serde(default = "default_model_type")]
    model_type: String,
    #[serde(default = "default_patch")]
    patch_size: [usize; 3],
    #[serde(default = "default_channels")]
    in_dim: usize,
    dim: usize,
    ffn_dim: usize,
    #[serde(default = "default_freq_dim")]
    freq_dim: usize,
    #[serde(default = "default_text_dim")]
    text_dim: usize,
    #[serde(default = "default_channels")]
    out_dim: usize,
    num_heads: usize,
    num_layers: usize,
    #[serde(default = "default_window")]
    window_size: [i64; 2],
    #[serde(default = "yes")]
    qk_norm: bool,
    #[serde(default = "yes")]
    cross_attn_norm: bool,
    #[serde(default = "default_eps")]
    eps: f64,
}

fn default_patch() -> [usize; 3] {
    [1, 2, 2]
}
fn default_channels() -> usize {
    16
}
fn default_text_dim() -> usize {
    4096
}
fn default_freq_dim() -> usize {
    256
}
fn yes() -> bool {
    true
}
fn default_qk_norm() -> Option<String> {
    Some("rms_norm_across_heads".into())
}
fn default_eps() -> f64 {
    1e-6
}
fn default_rope_len() -> usize {
    1024
}
fn default_model_type() -> String {
    "t2v".into()
}
fn default_window() -> [i64; 2] {
    [-1, -1]
}
