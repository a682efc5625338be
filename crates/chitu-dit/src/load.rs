//! Weight loading for both checkpoint layouts: diffusers' and Wan's own.
//!
//! The crate's modules are named after diffusers' keys; each layout has one remap table from its
//! checkpoint names to the module paths. Files may be one safetensors file or shards listed by a
//! `*.safetensors.index.json`. Weights are held in the load's [`Precision`] (f32 by default),
//! converted tensor by tensor as they are read, except [`KEEP_F32`].

use crate::{DitError, WanDitConfig, WanTransformer};
use burn::tensor::backend::Backend;
use chitu_store::{load_strict_as, reload_tensors_as, weight_files, Cast, Format, LoadReport, Precision};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Which naming scheme a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointLayout {
    /// diffusers' `WanTransformer3DModel` keys (`blocks.0.attn1.to_q.weight`, `scale_shift_table`, ...).
    Diffusers,
    /// Wan's original keys (`blocks.0.self_attn.q.weight`, `head.modulation`, `time_projection.1`, ...).
    Wan,
}

/// Checkpoint name → module path, for diffusers checkpoints. Patterns apply in order.
const DIFFUSERS_REMAP: &[(&str, &str)] = &[
    (r"\.ffn\.net\.0\.proj\.", ".ffn.fc1."),
    (r"\.ffn\.net\.2\.", ".ffn.fc2."),
    (r"\.norm_(q|k)\.weight$", ".norm_$1.gamma"),
    (r"\.norm2\.weight$", ".norm2.gamma"),
    (r"\.norm2\.bias$", ".norm2.beta"),
];

/// Checkpoint name → module path, for Wan's own checkpoints. Wan's `norm3` is diffusers' `norm2`
/// (Wan applies its norms in the order norm1, norm3, norm2). Block modulation is
/// `blocks.N.modulation` in Wan's releases; `blocks.N.head.modulation` is accepted too, as written
/// by tools that invert diffusers' conversion table.
const WAN_REMAP: &[(&str, &str)] = &[
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"^blocks\.(\d+)\.(?:head\.)?modulation$", "blocks.$1.scale_shift_table"),
    (r"\.self_attn\.(q|k|v)\.", ".attn1.to_$1."),
    (r"\.self_attn\.o\.", ".attn1.to_out.0."),
    (r"\.self_attn\.norm_(q|k)\.weight$", ".attn1.norm_$1.gamma"),
    (r"\.cross_attn\.(q|k|v)\.", ".attn2.to_$1."),
    (r"\.cross_attn\.o\.", ".attn2.to_out.0."),
    (r"\.cross_attn\.norm_(q|k)\.weight$", ".attn2.norm_$1.gamma"),
    (r"\.ffn\.0\.", ".ffn.fc1."),
    (r"\.ffn\.2\.", ".ffn.fc2."),
    (r"\.norm3\.weight$", ".norm2.gamma"),
    (r"\.norm3\.bias$", ".norm2.beta"),
];

impl CheckpointLayout {
    /// The remap table of this layout.
    pub fn remap_table(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Diffusers => DIFFUSERS_REMAP,
            Self::Wan => WAN_REMAP,
        }
    }

    /// Guesses the layout from a config.json: diffusers configs name `num_attention_heads`.
    pub fn of_config(config: &serde_json::Value) -> Self {
        if config.get("num_attention_heads").is_some() {
            Self::Diffusers
        } else {
            Self::Wan
        }
    }
}

/// Module-path segments held in f32 at every precision, as diffusers' `_keep_in_fp32_modules` and
/// Wan's `autocast(dtype=float32)` keep them: the timestep and text embedders with the
/// modulation projection, and the modulation tables. Vectors (biases, norm gains) stay f32 too.
pub const KEEP_F32: &[&str] = &["condition_embedder", "scale_shift_table"];

impl<B: Backend> WanTransformer<B> {
    /// Loads a transformer folder: `config.json` (either dialect) and its weights, one file or
    /// shards with an index. The layout is taken from the config's dialect. Weights are f32.
    pub fn from_dir(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self, DitError> {
        Self::from_dir_as(dir, device, Precision::F32)
    }

    /// [`WanTransformer::from_dir`], holding the weight matrices in `format` (a [`Precision`], or
    /// one with int8 linear layers).
    pub fn from_dir_as(dir: impl AsRef<Path>, device: &B::Device, format: impl Into<Format>) -> Result<Self, DitError> {
        let (config, layout, files) = transformer_folder(dir.as_ref())?;
        let (model, _) = Self::new(config, device)?.load_weights_as(&files, layout, format)?;
        Ok(model)
    }

    /// Loads weights from safetensors files (or shards) in the given layout. Every module tensor
    /// must be found exactly once with the right shape, and every checkpoint tensor must be used;
    /// otherwise the error lists the offending keys.
    pub fn load_weights(self, files: &[PathBuf], layout: CheckpointLayout) -> Result<(Self, LoadReport), DitError> {
        self.load_weights_as(files, layout, Precision::F32)
    }

    /// [`WanTransformer::load_weights`], holding the weight matrices in `format`.
    pub fn load_weights_as(
        self,
        files: &[PathBuf],
        layout: CheckpointLayout,
        format: impl Into<Format>,
    ) -> Result<(Self, LoadReport), DitError> {
        let cast = Cast::new(format, KEEP_F32);
        Ok(load_strict_as(
            self,
            files,
            layout.remap_table(),
            &format!("{layout:?}"),
            cast,
        )?)
    }

    /// Reads the tensors at module paths `only` again from the transformer folder `dir`, held in
    /// `format` as [`WanTransformer::from_dir_as`] holds them: the base weights back, bit for bit,
    /// after a merge (a LoRA) changed them.
    pub fn reload_tensors(
        self,
        dir: impl AsRef<Path>,
        format: impl Into<Format>,
        only: &BTreeSet<String>,
    ) -> Result<Self, DitError> {
        let (_, layout, files) = transformer_folder(dir.as_ref())?;
        let cast = Cast::new(format, KEEP_F32);
        Ok(reload_tensors_as(
            self,
            &files,
            layout.remap_table(),
            &format!("{layout:?}"),
            cast,
            only,
        )?)
    }
}

/// A transformer folder's config, the layout its dialect names, and its weight files.
fn transformer_folder(dir: &Path) -> Result<(WanDitConfig, CheckpointLayout, Vec<PathBuf>), DitError> {
    let (config, json) = WanDitConfig::read(&dir.join("config.json"))?;
    let layout = CheckpointLayout::of_config(&json);
    let files = weight_files(dir, "diffusion_pytorch_model")?;
    Ok((config, layout, files))
}
