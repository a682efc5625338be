//! UMT5 encoder hyper-parameters.

use crate::TextError;
use serde::Deserialize;

/// Shape of a UMT5 encoder (transformers' `UMT5Config`, encoder part).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Umt5Config {
    /// Rows of the token table.
    pub vocab_size: usize,
    /// Hidden width.
    pub d_model: usize,
    /// Channels per head.
    pub d_kv: usize,
    /// Hidden width of the gated FFN.
    pub d_ff: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Encoder layers.
    pub num_layers: usize,
    #[serde(default = "default_buckets")]
    /// Buckets of the relative position bias.
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    /// Distance beyond which relative positions share a bucket.
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    /// Epsilon of the RMS norms.
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_ffn")]
    /// The feed-forward kind (`gated-gelu` for UMT5).
    pub feed_forward_proj: String,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ffn() -> String {
    "gated-gelu".into()
}

impl Umt5Config {
    /// `google/umt5-xxl`, the encoder of every Wan2.1/2.2 text-to-video model.
    pub fn umt5_xxl() -> Self {
        Self {
            vocab_size: 256384,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_heads: 64,
            num_layers: 24,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
        }
    }

    /// Attention width, `num_heads * d_kv`.
    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }

    /// Parses a transformers `config.json` and checks it describes a supported encoder.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, TextError> {
        let c: Self = serde_json::from_value(value.clone()).map_err(|e| TextError::Config(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// Checks the relations the encoder relies on.
    pub fn validate(&self) -> Result<(), TextError> {
        if self.feed_forward_proj != "gated-gelu" {
            return Err(TextError::Config(format!(
                "feed_forward_proj {:?} is not supported (UMT5 uses gated-gelu)",
                self.feed_forward_proj
            )));
        }
        if [
            self.vocab_size,
            self.d_model,
            self.d_kv,
            self.d_ff,
            self.num_heads,
            self.num_layers,
        ]
        .contains(&0)
        {
            return Err(TextError::Config(format!("a size is zero: {self:?}")));
        }
        if self.relative_attention_num_buckets < 4
            || self.relative_attention_max_distance < self.relative_attention_num_buckets / 4
        {
            return Err(TextError::Config(format!(
                "relative attention needs at least 4 buckets and max_distance >= buckets/4, got {} and {}",
                self.relative_attention_num_buckets, self.relative_attention_max_distance
            )));
        }
        Ok(())
    }
}
