//! `--low-mem auto`: the cheapest way to hold a model that fits a memory budget, chosen before
//! anything loads.
//!
//! The model's sizes come from its folder's configs: each model is built as a shell (burn's
//! parameters stay unallocated until loaded) and its tensors' shapes are summed in the bytes each
//! would be held in ([`chitu_store::held_bytes`]); the strict loader later holds every file to
//! those shapes. The working memory per stage is the estimate's ([`estimate_stages`]). Plans are
//! tried from the least costly to the most: the float weights at each memory level, then int8
//! weights at each level. A plan is the first whose largest stage fits.

use crate::estimate::{estimate_stages, largest, smaller_requests, too_big, ModelSizes, StageEstimate};
use crate::{DiffusionUserParams, GenError, LoadOptions, MemoryEstimate, MemoryLevel};
use burn::tensor::backend::Backend;
use chitu_dit::{WanDitConfig, WanTransformer};
use chitu_store::{held_bytes, Cast, Format, Precision, Weights};
use chitu_text::{Umt5Config, Umt5Encoder};
use chitu_vae::{WanVae, WanVaeConfig};
use std::fmt::Write as _;
use std::path::Path;

/// Where a plan's budget came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetSource {
    /// `--memory-budget`.
    Given,
    /// The memory available to the process now (the CPU backend).
    Available,
    /// Neither: the device's memory is not known (pass a budget on a GPU).
    Unknown,
}

/// What a plan may choose, and within what.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanLimits {
    /// The float precision (`--dtype`): plans keep it.
    pub precision: Precision,
    /// The VAE's precision (`--vae-dtype`).
    pub vae_dtype: Precision,
    /// The linear layers' format when the user chose one (`--weights`); `None` lets the plan
    /// choose.
    pub weights: Option<Weights>,
    /// The lowest memory level the plan may take.
    pub min_level: u8,
    /// Bytes the run may use; `None` when not known.
    pub budget: Option<u64>,
    /// Where `budget` came from.
    pub source: BudgetSource,
    /// Whether each model goes when its stage ends (one request; see [`LoadOptions`]).
    pub release_after_use: bool,
}

/// A chosen way to run a request.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// How the DiTs and the text encoder are held.
    pub format: Format,
    /// The VAE's precision.
    pub vae_dtype: Precision,
    /// The memory level.
    pub level: MemoryLevel,
    /// Each stage's predicted peak.
    pub stages: [StageEstimate; 3],
    /// The limits it was chosen within.
    pub limits: PlanLimits,
}

impl MemoryPlan {
    /// The largest stage's prediction.
    pub fn peak(&self) -> MemoryEstimate {
        largest(&self.stages)
    }

    /// The load options that run this plan.
    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            low_mem: self.level.0,
            dtype: self.format.precision,
            vae_dtype: self.vae_dtype,
            weights: self.format.weights,
            release_after_use: self.limits.release_after_use,
            ..LoadOptions::default()
        }
    }

    /// The plan as a markdown table, one row per stage, with each stage's `measured` peak beside
    /// the prediction once the run has them.
    pub fn table(&self, measured: Option<[Option<u64>; 3]>) -> String {
        let gb = |b: u64| format!("{:.2} GB", b as f64 / 1e9);
        let budget = match (self.limits.budget, self.limits.source) {
            (Some(b), BudgetSource::Given) => format!("a budget of {} (--memory-budget)", gb(b)),
            (Some(b), _) => format!("{} available", gb(b)),
            (None, _) => "an unknown budget (pass --memory-budget on a GPU)".into(),
        };
        let mut out = format!(
            "memory plan for {budget}: {} weights, VAE in {}, low-mem {}{}\n",
            self.format.name(),
            self.vae_dtype,
            self.level.0,
            if self.level.tiled_decode() {
                " (tiled decode)"
            } else {
                ""
            }
        );
        let head = match measured {
            Some(_) => "| stage | weights held | predicted peak | measured peak |\n|---|---|---|---|\n",
            None => "| stage | weights held | predicted peak |\n|---|---|---|\n",
        };
        out.push_str(head);
        for (i, s) in self.stages.iter().enumerate() {
            let _ = write!(out, "| {} | {} | {} |", s.stage, gb(s.weights), gb(s.bytes));
            if let Some(m) = measured {
                let _ = write!(out, " {} |", m[i].map_or("-".into(), gb));
            }
            out.push('\n');
        }
        out
    }
}

impl ModelSizes {
    /// The sizes of models of these shapes held in `format` (the VAE in `vae_dtype`), one DiT per
    /// entry of `dits` (two for Wan2.2-A14B's experts); nothing is allocated.
    pub fn of_configs<B: Backend>(
        text: &Umt5Config,
        dits: &[WanDitConfig],
        vae: &WanVaeConfig,
        format: Format,
        vae_dtype: Precision,
        device: &B::Device,
    ) -> Result<Self, GenError> {
        let mut dit_weights = Vec::new();
        for config in dits {
            let shell = WanTransformer::<B>::new(config.clone(), device)?;
            dit_weights.push(held_bytes(&shell, Cast::new(format, chitu_dit::KEEP_F32)));
        }
        let mut text_shell = Umt5Encoder::<B>::new(text.clone(), device)?;
        // The token table is read from its file row by row, never held.
        text_shell.token_embedding = None;
        let vae_shell = WanVae::<B>::new(vae.clone(), device)?;
        Ok(Self {
            text_weights: held_bytes(&text_shell, Cast::new(format, chitu_text::KEEP_F32)),
            dit_weights,
            vae_weights: held_bytes(&vae_shell, Cast::new(vae_dtype, chitu_vae::KEEP_F32)),
            text: text.clone(),
            dit: dits.first().cloned(),
            vae_base_dim: vae.decoder_base_dim.unwrap_or(0).max(vae.base_dim),
            vae_z_dim: vae.z_dim,
            vae_spatial: vae.spatial_factor(),
            narrow: format != Format::F32,
            lora_bytes: 0,
        })
    }

    /// These sizes with the LoRA files `loras` held as well: each DiT a LoRA goes into keeps its
    /// tensors, in the file's dtype, for as long as it is merged.
    pub fn with_loras(mut self, loras: &[crate::LoraSpec]) -> Self {
        let experts = self.dit_weights.len() as u64;
        self.lora_bytes = loras
            .iter()
            .filter_map(|l| {
                let copies = if l.expert == crate::Expert::Both { experts } else { 1 };
                Some(std::fs::metadata(&l.path).ok()?.len() * copies)
            })
            .sum();
        self
    }

    /// The sizes of the models of folder `dir` (diffusers' layout or Wan's own, as
    /// [`crate::DiffusionBackend::load`] takes) held in `format` (the VAE in `vae_dtype`), from its
    /// configs alone. A folder the loader would refuse is refused with the loader's error.
    pub fn of_folder<B: Backend>(
        dir: &Path,
        format: Format,
        vae_dtype: Precision,
        device: &B::Device,
    ) -> Result<Self, GenError> {
        if crate::is_wan_native(dir) {
            let native = crate::WanNativeConfig::for_dir(dir);
            let experts = match dir.join("high_noise_model").is_dir() {
                true => vec![dir.join("high_noise_model"), dir.join("low_noise_model")],
                false => vec![dir.to_path_buf()],
            };
            let dits = experts
                .iter()
                .map(|d| WanDitConfig::from_file(d.join("config.json")))
                .collect::<Result<Vec<_>, _>>()?;
            return Self::of_configs::<B>(&native.text, &dits, &native.vae, format, vae_dtype, device);
        }
        let index = chitu_store::read_json(&dir.join("model_index.json"))?;
        let second = index
            .get("transformer_2")
            .and_then(|v| v.get(0))
            .is_some_and(|v| !v.is_null());
        let names: &[&str] = if second {
            &["transformer", "transformer_2"]
        } else {
            &["transformer"]
        };
        let dits = names
            .iter()
            .map(|name| WanDitConfig::from_file(dir.join(name).join("config.json")))
            .collect::<Result<Vec<_>, _>>()?;
        let text_path = dir.join("text_encoder/config.json");
        let text = Umt5Config::from_json(&chitu_store::read_json(&text_path)?).map_err(|e| GenError::Folder {
            path: text_path.clone(),
            message: e.to_string(),
        })?;
        let vae = WanVaeConfig::from_json(&chitu_store::read_json(&dir.join("vae/config.json"))?)?;
        Self::of_configs::<B>(&text, &dits, &vae, format, vae_dtype, device)
    }
}

/// The first plan, from the least costly, whose largest stage fits `limits.budget`, for
/// `params` on the folder whose sizes `sizes_for` gives per format. With no budget known, the
/// least costly plan. When none fits, the error says what would: a smaller request, int8
/// weights if the limits ruled them out, or how much memory the most frugal plan needs.
pub fn plan_memory(
    sizes_for: impl Fn(Format) -> Result<ModelSizes, GenError>,
    params: &DiffusionUserParams,
    limits: PlanLimits,
) -> Result<MemoryPlan, GenError> {
    let formats: Vec<Weights> = match limits.weights {
        Some(w) => vec![w],
        None => vec![Weights::Float, Weights::Int8],
    };
    let levels = || (limits.min_level..=3).map(MemoryLevel);
    let mut last = None;
    for weights in formats {
        let format = Format::new(limits.precision, weights);
        let sizes = sizes_for(format)?;
        for level in levels() {
            let stages = estimate_stages(&sizes, params, level, limits.release_after_use);
            let plan = MemoryPlan {
                format,
                vae_dtype: limits.vae_dtype,
                level,
                stages,
                limits,
            };
            match limits.budget {
                Some(budget) if plan.peak().bytes > budget => last = Some((plan, sizes.clone())),
                _ => return Ok(plan),
            }
        }
    }
    let (frugal, sizes) = last.ok_or(GenError::Task("has no memory plan to try"))?;
    let budget = limits.budget.unwrap_or_default();
    let mut ways = Vec::new();
    if limits.weights == Some(Weights::Float) {
        let int8 = sizes_for(Format::new(limits.precision, Weights::Int8))?;
        let fits = estimate_stages(&int8, params, frugal.level, limits.release_after_use);
        if largest(&fits).bytes <= budget {
            ways.push("--weights int8 would fit".to_string());
        }
    }
    let fits = |p: &DiffusionUserParams, m: MemoryLevel| {
        largest(&estimate_stages(&sizes, p, m, limits.release_after_use)).bytes <= budget
    };
    ways.extend(smaller_requests(fits, params, frugal.level));
    ways.push(format!(
        "or {:.1} GB of memory for this request with {} weights at low-mem {}",
        frugal.peak().bytes as f64 / 1e9,
        frugal.format.name(),
        frugal.level.0
    ));
    let what = match limits.source {
        BudgetSource::Given => format!("the budget is {:.2} GB", budget as f64 / 1e9),
        _ => format!("{:.1} GB of memory is available", budget as f64 / 1e9),
    };
    Err(too_big(params, frugal.peak(), &what, &ways))
}
