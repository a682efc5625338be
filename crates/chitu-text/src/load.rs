//! Loading the text side of a Wan model: the key tables of both layouts and the folder loaders.

use crate::{T5Tokenizer, TextEncoder, TextError, Umt5Config, Umt5Encoder};
use burn::nn::EmbeddingConfig;
use burn::tensor::backend::Backend;
use chitu_store::{load_strict_leaving, read_json, weight_files, Cast, FileRows, Format, Precision};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which naming scheme an encoder checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextLayout {
    /// transformers' `UMT5EncoderModel` (`encoder.block.0.layer.0.SelfAttention.q.weight`, `shared.weight`).
    Transformers,
    /// Wan's `models_t5_umt5-xxl-enc-bf16.pth` (`blocks.0.attn.q.weight`, `token_embedding.weight`).
    Wan,
}

/// transformers names → module paths. `encoder.embed_tokens` is tied to `shared`; either may be stored.
const TRANSFORMERS_REMAP: &[(&str, &str)] = &[
    (r"^shared\.weight$", "token_embedding.weight"),
    (r"^encoder\.embed_tokens\.weight$", "token_embedding.weight"),
    (
        r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.",
        "blocks.$1.pos_embedding.",
    ),
    (
        r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(q|k|v|o)\.",
        "blocks.$1.attn.$2.",
    ),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", "blocks.$1.norm1."),
    (
        r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi_0|wi_1|wo)\.",
        "blocks.$1.ffn.$2.",
    ),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", "blocks.$1.norm2."),
    (r"^encoder\.final_layer_norm\.", "norm."),
];

/// Wan's `t5.py` names → module paths: its `ffn.gate.0` (GELU branch) is `wi_0` and `fc1` is `wi_1`.
const WAN_REMAP: &[(&str, &str)] = &[
    (r"\.ffn\.gate\.0\.", ".ffn.wi_0."),
    (r"\.ffn\.fc1\.", ".ffn.wi_1."),
    (r"\.ffn\.fc2\.", ".ffn.wo."),
    (r"\.pos_embedding\.embedding\.", ".pos_embedding."),
];

impl TextLayout {
    /// The remap table of this layout.
    pub fn remap_table(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Transformers => TRANSFORMERS_REMAP,
            Self::Wan => WAN_REMAP,
        }
    }
}

/// Where a loaded encoder keeps its token table, at 256,384 × 4,096 the largest weight of
/// UMT5-XXL (4 GiB as f32, 2 GiB in bf16) and one of which a prompt reads at most 512 rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TokenTable {
    /// Left in its safetensors file; each prompt reads the rows it uses (bf16 and f16 rows
    /// become f32 exactly). The file must stay in place while the encoder lives. A `.pth`
    /// checkpoint loads its table on the device instead.
    #[default]
    InFile,
    /// Loaded on the device with the other weights.
    OnDevice,
}

/// The module path of the token table.
const TABLE: &str = "token_embedding.weight";

/// Module-path segments held in f32 at every precision: the relative-position bias tables, which
/// add straight onto the attention scores. Vectors (the RMS norm gains) stay f32 too.
pub const KEEP_F32: &[&str] = &["pos_embedding"];

impl<B: Backend> Umt5Encoder<B> {
    /// Loads f32 weights (safetensors files or shards, or a `.pth`) in the given layout, leaving
    /// the token table in its file ([`TokenTable::InFile`]).
    pub fn load_weights(self, files: &[PathBuf], layout: TextLayout) -> Result<Self, TextError> {
        self.load_weights_with(files, layout, TokenTable::default(), Precision::F32)
    }

    /// Loads weights in the given layout, keeping the token table where `table` says and the
    /// weight matrices in `format` (a table left in its file is read as f32 rows).
    pub fn load_weights_with(
        mut self,
        files: &[PathBuf],
        layout: TextLayout,
        table: TokenTable,
        format: impl Into<Format>,
    ) -> Result<Self, TextError> {
        let label = format!("{layout:?} UMT5");
        let (vocab, d) = (self.config.vocab_size, self.config.d_model);
        let rows = match table {
            TokenTable::InFile => FileRows::find(files, layout.remap_table(), TABLE)?,
            TokenTable::OnDevice => None,
        }
        // A table of the wrong shape goes to the strict loader, which reports it with the rest.
        .filter(|rows| (rows.rows(), rows.cols()) == (vocab, d));
        if rows.is_some() {
            self.token_embedding = None;
        } else if self.token_embedding.is_none() {
            let device = self.norm.weight.device();
            self.token_embedding = Some(EmbeddingConfig::new(vocab, d).init(&device));
        }
        let left: &[&str] = if rows.is_some() { &[TABLE] } else { &[] };
        let cast = Cast::new(format, KEEP_F32);
        let (mut encoder, _) = load_strict_leaving(self, files, layout.remap_table(), &label, left, cast)?;
        encoder.token_rows = rows.map(Arc::new);
        Ok(encoder)
    }

    /// Loads a transformers `text_encoder/` folder: `config.json` plus `model.safetensors` or
    /// shards with `model.safetensors.index.json`.
    pub fn from_dir(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self, TextError> {
        Self::from_dir_as(dir, device, Precision::F32)
    }

    /// [`Umt5Encoder::from_dir`], holding the weight matrices in `format` (a [`Precision`], or
    /// one with int8 linear layers).
    pub fn from_dir_as(
        dir: impl AsRef<Path>,
        device: &B::Device,
        format: impl Into<Format>,
    ) -> Result<Self, TextError> {
        let dir = dir.as_ref();
        let path = dir.join("config.json");
        let json = read_json(&path)?;
        let config = Umt5Config::from_json(&json).map_err(|e| TextError::Config(format!("{}: {e}", path.display())))?;
        let files = weight_files(dir, "model")?;
        Self::new(config, device)?.load_weights_with(&files, TextLayout::Transformers, TokenTable::default(), format)
    }
}

impl<B: Backend> TextEncoder<B> {
    /// Loads `tokenizer/tokenizer.json` and `text_encoder/` of a diffusers pipeline folder.
    pub fn from_pipeline_dir(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self, TextError> {
        Self::from_pipeline_dir_as(dir, device, Precision::F32)
    }

    /// [`TextEncoder::from_pipeline_dir`], holding the weight matrices in `format`.
    pub fn from_pipeline_dir_as(
        dir: impl AsRef<Path>,
        device: &B::Device,
        format: impl Into<Format>,
    ) -> Result<Self, TextError> {
        let dir = dir.as_ref();
        let tokenizer = T5Tokenizer::from_file(dir.join("tokenizer/tokenizer.json"))?;
        let encoder = Umt5Encoder::from_dir_as(dir.join("text_encoder"), device, format)?;
        Ok(Self::new(tokenizer, encoder, device.clone()))
    }

    /// Loads Wan's own release files: the UMT5-XXL encoder checkpoint (`.pth` or `.safetensors`
    /// in Wan's key layout) and a `tokenizer.json` (Wan ships it under `google/umt5-xxl/`).
    pub fn from_wan_files(
        checkpoint: impl AsRef<Path>,
        tokenizer: impl AsRef<Path>,
        config: Umt5Config,
        device: &B::Device,
    ) -> Result<Self, TextError> {
        Self::from_wan_files_as(checkpoint, tokenizer, config, device, Precision::F32)
    }

    /// [`TextEncoder::from_wan_files`], holding the weight matrices in `format`.
    pub fn from_wan_files_as(
        checkpoint: impl AsRef<Path>,
        tokenizer: impl AsRef<Path>,
        config: Umt5Config,
        device: &B::Device,
        format: impl Into<Format>,
    ) -> Result<Self, TextError> {
        let tokenizer = T5Tokenizer::from_file(tokenizer)?;
        let files = [checkpoint.as_ref().to_owned()];
        let encoder = Umt5Encoder::new(config, device)?.load_weights_with(
            &files,
            TextLayout::Wan,
            TokenTable::default(),
            format,
        )?;
        Ok(Self::new(tokenizer, encoder, device.clone()))
    }
}
