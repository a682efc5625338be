//! Weight loading for both checkpoint layouts: diffusers' and Wan's own.
//!
//! The crate's modules are named after diffusers' keys; each layout has one remap table from its
//! checkpoint names to the module paths. Files may be one safetensors file or shards listed by a
//! `*.safetensors.index.json`; weights stored in bf16/f16 are cast to the model's float type.

use crate::{DitError, WanDitConfig, WanTransformer};
use burn::tensor::backend::Backend;
use burn::tensor::DType;
use burn_store::{KeyRemapper, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore, TensorSnapshot};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::rc::Rc;

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

/// The weight files of a model folder: the shards named by `<stem>.safetensors.index.json` if it
/// exists, else `<stem>.safetensors`.
pub fn weight_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>, DitError> {
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| DitError::Io(index.display().to_string(), e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| DitError::Weights(format!("{}: invalid JSON: {e}", index.display())))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| DitError::Weights(format!("{}: no weight_map object", index.display())))?;
        let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        let files: Vec<PathBuf> = names.into_iter().map(|n| dir.join(n)).collect();
        if let Some(missing) = files.iter().find(|f| !f.exists()) {
            return Err(DitError::Weights(format!(
                "{} lists shard {} which does not exist",
                index.display(),
                missing.display()
            )));
        }
        return Ok(files);
    }
    let single = dir.join(format!("{stem}.safetensors"));
    if single.exists() {
        Ok(vec![single])
    } else {
        Err(DitError::Weights(format!(
            "no weights in {}: expected {stem}.safetensors or {stem}.safetensors.index.json",
            dir.display()
        )))
    }
}

/// Casts float snapshots to one dtype (bf16 checkpoints into an f32 model, for instance).
#[derive(Clone)]
struct CastFloats(DType);

impl ModuleAdapter for CastFloats {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let target = self.0;
        let is_float = matches!(snapshot.dtype, DType::F64 | DType::F32 | DType::F16 | DType::BF16);
        if !is_float || snapshot.dtype == target {
            return snapshot.clone();
        }
        let data = snapshot.clone_data_fn();
        TensorSnapshot::from_closure(
            Rc::new(move || Ok(data()?.convert_dtype(target))),
            target,
            snapshot.shape.clone(),
            snapshot.path_stack.clone().unwrap_or_default(),
            snapshot.container_stack.clone().unwrap_or_default(),
            snapshot.tensor_id.unwrap_or_default(),
        )
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// What a load applied.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Tensors loaded.
    pub applied: usize,
    /// Files read.
    pub files: Vec<PathBuf>,
}

impl<B: Backend> WanTransformer<B> {
    /// Loads a transformer folder: `config.json` (either dialect) and its weights, one file or
    /// shards with an index. The layout is taken from the config's dialect.
    pub fn from_dir(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self, DitError> {
        let dir = dir.as_ref();
        let config_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| DitError::Io(config_path.display().to_string(), e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| DitError::Config(format!("{}: {e}", config_path.display())))?;
        let config =
            WanDitConfig::from_json(&json).map_err(|e| DitError::Config(format!("{}: {e}", config_path.display())))?;
        let layout = CheckpointLayout::of_config(&json);
        let files = weight_files(dir, "diffusion_pytorch_model")?;
        let mut model = Self::new(config, device)?;
        model.load_weights(&files, layout)?;
        Ok(model)
    }

    /// Loads weights from safetensors files in the given layout. Every module tensor must be
    /// found exactly once with the right shape, and every checkpoint tensor must be used;
    /// otherwise the error lists the offending keys.
    pub fn load_weights(&mut self, files: &[PathBuf], layout: CheckpointLayout) -> Result<LoadReport, DitError> {
        let remapper = KeyRemapper::from_patterns(layout.remap_table().to_vec())
            .map_err(|e| DitError::Weights(format!("bad remap table: {e}")))?;
        let expected: BTreeSet<String> = self.collect(None, None, false).iter().map(|s| s.full_path()).collect();
        let mut applied = BTreeSet::new();
        let mut unused = Vec::new();
        let mut errors = Vec::new();
        for file in files {
            if !file.exists() {
                return Err(DitError::Weights(format!(
                    "weight file {} does not exist",
                    file.display()
                )));
            }
            let mut store = SafetensorsStore::from_file(file)
                .with_from_adapter(PyTorchToBurnAdapter.chain(CastFloats(DType::F32)))
                .remap(remapper.clone())
                .allow_partial(true)
                .validate(false);
            let result = self
                .load_from(&mut store)
                .map_err(|e| DitError::Weights(format!("{}: {e}", file.display())))?;
            for key in result.applied {
                if !applied.insert(key.clone()) {
                    errors.push(format!("{key} appears in more than one shard"));
                }
            }
            unused.extend(
                result
                    .unused
                    .into_iter()
                    .map(|k| format!("{k} (in {})", file.display())),
            );
            errors.extend(result.errors.iter().map(|e| format!("{e:?}")));
        }
        let missing: Vec<&String> = expected.difference(&applied).collect();
        let mut problems = Vec::new();
        if !missing.is_empty() {
            problems.push(format!("missing keys: {}", join(&missing)));
        }
        if !unused.is_empty() {
            problems.push(format!("unexpected keys: {}", join(&unused)));
        }
        if !errors.is_empty() {
            problems.push(format!("bad tensors: {}", join(&errors)));
        }
        if !problems.is_empty() {
            return Err(DitError::Weights(format!(
                "{:?} checkpoint: {}",
                layout,
                problems.join("; ")
            )));
        }
        Ok(LoadReport {
            applied: applied.len(),
            files: files.to_vec(),
        })
    }
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    const SHOWN: usize = 12;
    let mut s: Vec<String> = items.iter().take(SHOWN).map(|i| i.to_string()).collect();
    if items.len() > SHOWN {
        s.push(format!("... and {} more", items.len() - SHOWN));
    }
    s.join(", ")
}
