//! LoRA adapters on a loaded backend: which experts each one targets, merged into the weights
//! (no per-step cost), and undone exactly.
//!
//! A merge adds every LoRA of a model at once, in f32, and rounds each touched tensor once to the
//! dtype it is held in (bf16, f16, int8 blocks). Undoing it puts the base tensors back bit for
//! bit: a model that can be read again from its files reads only the touched tensors again (no
//! memory kept for it); the embedded model, which has no files, keeps the replaced tensors
//! until then. A model released between stages (the CLI's one-request runs) is merged when it
//! is next read from its files.

use crate::{DiffusionBackend, GenError};
use burn::tensor::backend::Backend;
use chitu_dit::{lora_deltas, LoraFile, WanTransformer};
use chitu_store::{merge_deltas, param_table, restore_base, BaseWeights, DeltaSet, Format};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Which expert of Wan2.2-A14B a LoRA goes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Expert {
    /// The high-noise expert (`transformer/`).
    High,
    /// The low-noise expert (`transformer_2/`).
    Low,
    /// Every DiT of the model (the only one of a one-expert model).
    #[default]
    Both,
}

impl Expert {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Low => "low",
            Self::Both => "both",
        }
    }

    /// The pool models it names in a pool of `n`.
    fn models(self, n: usize) -> Result<Vec<usize>, String> {
        match (self, n) {
            (Self::Both, n) => Ok((0..n).collect()),
            (Self::High, 2) => Ok(vec![0]),
            (Self::Low, 2) => Ok(vec![1]),
            (e, n) => Err(format!(
                "expert {} names one of Wan2.2-A14B's two experts, and this model has {n} DiT; use both",
                e.name()
            )),
        }
    }
}

impl std::str::FromStr for Expert {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "high" => Ok(Self::High),
            "low" => Ok(Self::Low),
            "both" => Ok(Self::Both),
            _ => Err(format!("expert {s:?} is not high, low or both")),
        }
    }
}

/// One LoRA to apply: a safetensors file, its strength and the expert(s) it goes into.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoraSpec {
    /// The file.
    pub path: PathBuf,
    /// The factor on its deltas (1 as trained).
    pub strength: f32,
    /// Which DiT(s) it changes.
    pub expert: Expert,
}

impl LoraSpec {
    /// `path` at strength 1 into every DiT.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            strength: 1.0,
            expert: Expert::Both,
        }
    }
}

impl std::str::FromStr for LoraSpec {
    type Err = String;
    /// `PATH[:STRENGTH[:EXPERT]]` (or `PATH:EXPERT`), as `--lora` takes it.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            |why: String| format!("--lora {s:?}: {why}; expected PATH[:STRENGTH[:EXPERT]], EXPERT high, low or both");
        let mut parts: Vec<&str> = s.rsplitn(3, ':').collect();
        parts.reverse();
        let strength = |v: &str| -> Result<f32, String> {
            let x: f32 = v.parse().map_err(|_| bad(format!("strength {v:?} is not a number")))?;
            match x.is_finite() {
                true => Ok(x),
                false => Err(bad(format!("strength {v} is not finite"))),
            }
        };
        let (path, strength, expert) = match parts[..] {
            [path] => (path, 1.0, Expert::Both),
            [path, x] => match x.parse::<Expert>() {
                Ok(e) => (path, 1.0, e),
                Err(_) => (path, strength(x)?, Expert::Both),
            },
            [path, x, e] => (path, strength(x)?, e.parse().map_err(bad)?),
            _ => return Err(bad("empty".into())),
        };
        if path.is_empty() {
            return Err(bad("no path".into()));
        }
        Ok(Self {
            path: path.into(),
            strength,
            expert,
        })
    }
}

/// What applying LoRAs did, per LoRA and model.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoraReport {
    /// One entry per LoRA and DiT it went into.
    pub applied: Vec<LoraApplied>,
    /// Seconds the merge took, for the DiTs merged now; a released DiT merges when it is next
    /// read from its files ([`DiffusionBackend::lora_merge_seconds`] adds those).
    pub merge_seconds: f64,
    /// How many DiTs were merged now (the rest merge when next read).
    pub merged_now: usize,
    /// Bytes the LoRAs' deltas hold (kept to merge again after a reload), in f32.
    pub delta_bytes: u64,
    /// Bytes of base tensors kept to undo the merge (0 for a model that rereads its files).
    pub base_bytes: u64,
}

/// One LoRA in one DiT.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoraApplied {
    /// The LoRA.
    pub spec: LoraSpec,
    /// The DiT (`transformer`, `transformer_2`).
    pub model: String,
    /// Parameters it changes.
    pub tensors: usize,
    /// File keys it used.
    pub keys: usize,
    /// Keys a partial load skipped, each with why.
    pub skipped: Vec<String>,
    /// Keys dropped as diffusers drops them (norm layers' `diff`/`diff_b`).
    pub ignored: Vec<String>,
}

/// The LoRAs merged into one DiT.
struct Merged<B: Backend> {
    specs: Vec<LoraSpec>,
    deltas: Vec<Arc<DeltaSet>>,
    touched: BTreeSet<String>,
    base: Option<BaseWeights<B>>,
}

impl<B: Backend> Default for Merged<B> {
    fn default() -> Self {
        Self {
            specs: Vec::new(),
            deltas: Vec::new(),
            touched: BTreeSet::new(),
            base: None,
        }
    }
}

/// Per DiT of a backend's pool: its folder (to reread touched tensors) and its merged LoRAs.
pub(crate) struct LoraStack<B: Backend> {
    sources: Vec<Option<PathBuf>>,
    merged: Mutex<Vec<Merged<B>>>,
    /// Seconds of merges run when a released DiT was read again.
    deferred: Arc<Mutex<f64>>,
    /// What the last [`DiffusionBackend::apply_lora`] did.
    last: Mutex<LoraReport>,
}

impl<B: Backend> LoraStack<B> {
    /// For a pool whose DiTs come from `sources` (`None`: built in memory).
    pub(crate) fn new(sources: Vec<Option<PathBuf>>) -> Self {
        let merged = sources.iter().map(|_| Merged::default()).collect();
        Self {
            sources,
            merged: Mutex::new(merged),
            deferred: Arc::new(Mutex::new(0.0)),
            last: Mutex::new(LoraReport::default()),
        }
    }
}

/// Every term of `sets`, in order, as one set: a tensor touched by several LoRAs is rounded once.
fn combined(sets: &[Arc<DeltaSet>]) -> DeltaSet {
    let mut all = DeltaSet::new();
    for set in sets {
        for (path, terms) in set.iter() {
            all.entry(path.clone()).or_default().extend(terms.iter().cloned());
        }
    }
    all
}

impl<B: Backend> DiffusionBackend<B> {
    /// Merges `specs` into the DiTs they name, in order, on top of the LoRAs already merged.
    ///
    /// Strict unless `partial`: a LoRA key that matches no module of its DiT, or whose shape does
    /// not fit, fails the call before any weight changes, listing every such key. With `partial`
    /// those keys are skipped and listed in the report.
    pub fn apply_lora(&self, specs: &[LoraSpec], partial: bool) -> Result<LoraReport, GenError> {
        let mut report = LoraReport::default();
        if specs.is_empty() {
            return Ok(report);
        }
        let n = self.model_pool.len();
        // Every file is read and checked against every DiT it names before anything merges.
        let mut files: BTreeMap<PathBuf, LoraFile> = BTreeMap::new();
        let mut new: Vec<Vec<(LoraSpec, Arc<DeltaSet>)>> = vec![Vec::new(); n];
        // Each DiT's parameters, from an unallocated shell of its config (burn's parameters are lazy).
        let mut tables = Vec::with_capacity(n);
        for i in 0..n {
            let skeleton = WanTransformer::<B>::new(self.dit(i)?.shell().clone(), &self.device)?;
            tables.push(param_table(&skeleton));
        }
        for spec in specs {
            let models = spec
                .expert
                .models(n)
                .map_err(|m| GenError::Params(format!("LoRA {}: {m}", spec.path.display())))?;
            if !files.contains_key(&spec.path) {
                files.insert(spec.path.clone(), LoraFile::read(&spec.path)?);
            }
            let file = &files[&spec.path];
            for i in models {
                let deltas = lora_deltas(file, spec.strength, &tables[i], partial)?;
                for line in &deltas.skipped {
                    tracing::warn!(lora = %spec.path.display(), model = self.dit(i)?.name(), "skipped {line}");
                }
                for key in &deltas.ignored {
                    tracing::info!(lora = %spec.path.display(), "ignored {key}: diffusers drops diff/diff_b on norm layers");
                }
                report.delta_bytes += deltas.bytes();
                report.applied.push(LoraApplied {
                    spec: spec.clone(),
                    model: self.dit(i)?.name().to_string(),
                    tensors: deltas.deltas.len(),
                    keys: deltas.applied,
                    skipped: deltas.skipped,
                    ignored: deltas.ignored,
                });
                new[i].push((spec.clone(), Arc::new(deltas.deltas)));
            }
        }
        let mut merged = self.lora.merged.lock().unwrap_or_else(|p| p.into_inner());
        for (i, added) in new.into_iter().enumerate() {
            if added.is_empty() {
                continue;
            }
            let state = &mut merged[i];
            let mut sets = state.deltas.clone();
            sets.extend(added.iter().map(|(_, d)| d.clone()));
            let all = Arc::new(combined(&sets));
            let t0 = Instant::now();
            let result = self.remerge(i, state, all.clone());
            // Recorded even when the merge failed: the DiT's reloads merge these LoRAs now.
            state.deltas = sets;
            state.specs.extend(added.into_iter().map(|(s, _)| s));
            state.touched = all.keys().cloned().collect();
            if result? {
                report.merged_now += 1;
                report.merge_seconds += t0.elapsed().as_secs_f64();
            }
            report.base_bytes += state.base.as_ref().map_or(0, |b| b.bytes());
        }
        tracing::info!(
            loras = specs.len(),
            merged_now = report.merged_now,
            seconds = report.merge_seconds,
            delta_bytes = report.delta_bytes,
            base_bytes = report.base_bytes,
            "LoRAs merged"
        );
        *self.lora.last.lock().unwrap_or_else(|p| p.into_inner()) = report.clone();
        Ok(report)
    }

    /// What the last [`DiffusionBackend::apply_lora`] did (the load's, for
    /// [`crate::LoadOptions::loras`]).
    pub fn lora_report(&self) -> LoraReport {
        self.lora.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts every DiT's base weights back, bit for bit, and forgets its LoRAs.
    pub fn remove_lora(&self) -> Result<(), GenError> {
        let mut merged = self.lora.merged.lock().unwrap_or_else(|p| p.into_inner());
        for (i, state) in merged.iter_mut().enumerate() {
            if state.specs.is_empty() {
                continue;
            }
            let dit = self.dit(i)?;
            let restore = self.restorer(i, state);
            // Cleared first: whatever happens below, the model is no longer merged.
            let taken = std::mem::take(state);
            drop(taken);
            dit.modify(restore, None)?;
        }
        Ok(())
    }

    /// The LoRAs merged into each DiT of the pool, in order.
    pub fn loras(&self) -> Vec<Vec<LoraSpec>> {
        let merged = self.lora.merged.lock().unwrap_or_else(|p| p.into_inner());
        merged.iter().map(|m| m.specs.clone()).collect()
    }

    /// Seconds spent merging LoRAs into DiTs as they were read again from their files.
    pub fn lora_merge_seconds(&self) -> f64 {
        *self.lora.deferred.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Restores DiT `i` to its base weights and merges `all` into it, now if it is in memory;
    /// every later reload merges `all` too. Returns whether it merged now.
    fn remerge(&self, i: usize, state: &mut Merged<B>, all: Arc<DeltaSet>) -> Result<bool, GenError> {
        let dit = self.dit(i)?;
        let keep_base = !dit.is_reloadable();
        let restore = self.restorer(i, state);
        let mut base = None;
        let deltas = all.clone();
        let merge = |m: WanTransformer<B>| -> Result<WanTransformer<B>, GenError> {
            let m = restore(m)?;
            let (m, kept) = merge_deltas(m, &deltas, keep_base);
            base = kept;
            Ok(m)
        };
        let clock = self.lora.deferred.clone();
        let after_reload: crate::offload::Patch<WanTransformer<B>> = Arc::new(move |m| {
            let t0 = Instant::now();
            let (m, _) = merge_deltas(m, &all, false);
            *clock.lock().unwrap_or_else(|p| p.into_inner()) += t0.elapsed().as_secs_f64();
            m
        });
        let ran = dit.modify(merge, Some(after_reload))?;
        state.base = base;
        Ok(ran)
    }

    /// What puts DiT `i`'s base weights back from `state`: its kept tensors, or a reread of the
    /// touched ones from its folder. Takes the kept tensors out of `state`.
    fn restorer(
        &self,
        i: usize,
        state: &mut Merged<B>,
    ) -> impl FnOnce(WanTransformer<B>) -> Result<WanTransformer<B>, GenError> {
        let base = state.base.take();
        let touched = state.touched.clone();
        let source = self.lora.sources.get(i).cloned().flatten();
        let format = Format::new(self.dtype, self.weights);
        move |m: WanTransformer<B>| match (base, source) {
            (Some(base), _) => Ok(restore_base(m, base)),
            _ if touched.is_empty() => Ok(m),
            (None, Some(dir)) => Ok(m.reload_tensors(dir, format, &touched)?),
            (None, None) => Err(GenError::Task(
                "holds merged LoRA weights with neither their base tensors nor files to reread them from",
            )),
        }
    }
}
