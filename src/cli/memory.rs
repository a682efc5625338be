//! `--low-mem auto` and `--memory-budget`: the memory plan a run loads under.

use super::ModelArgs;
use crate::pipeline::estimate::reachable_memory;
use crate::pipeline::{plan_memory, BudgetSource, DiffusionUserParams, GenError, MemoryPlan, ModelSizes, PlanLimits};
use burn::tensor::backend::Backend;
use std::fmt;
use std::str::FromStr;

/// `--low-mem`: a memory level, or `auto` to choose one (with the weight format) for the
/// machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LowMem {
    /// Choose the plan before loading ([`ModelArgs::plan`]).
    #[default]
    Auto,
    /// A fixed level, 0 to 3.
    Level(u8),
}

impl LowMem {
    /// The fixed level; 0 under `auto`, whose level the loaded backend keeps.
    pub fn level(self) -> u8 {
        match self {
            Self::Auto => 0,
            Self::Level(l) => l,
        }
    }
}

impl fmt::Display for LowMem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Level(l) => write!(f, "{l}"),
        }
    }
}

impl FromStr for LowMem {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            other => match other.parse::<u8>() {
                Ok(l @ 0..=3) => Ok(Self::Level(l)),
                _ => Err(format!("{s:?} is not a memory level: expected auto, 0, 1, 2 or 3")),
            },
        }
    }
}

/// `--memory-budget`: gigabytes (10^9 bytes), positive and finite.
pub(super) fn budget_gb(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(gb) if gb.is_finite() && gb > 0.0 => Ok(gb),
        _ => Err(format!(
            "{s:?} is not a memory budget: expected a positive number of GB, such as 24"
        )),
    }
}

impl ModelArgs {
    /// The plan `--low-mem auto` loads a model folder under: the cheapest one that fits the
    /// budget (`--memory-budget`, else on the CPU the memory available now) for the most
    /// demanding of `requests`. `None` under a fixed level or without a folder. An error, naming
    /// what would fit, when no plan does.
    pub fn plan<B: Backend>(
        &self,
        device: &B::Device,
        requests: &[DiffusionUserParams],
        one_request: bool,
    ) -> Result<Option<MemoryPlan>, GenError> {
        let (LowMem::Auto, Some(dir)) = (self.low_mem, &self.model_dir) else {
            return Ok(None);
        };
        let (budget, source) = match self.memory_budget {
            Some(gb) => (Some((gb * 1e9) as u64), BudgetSource::Given),
            None if chitu_host::host_kernels::<B>() => match reachable_memory() {
                Some(b) => (Some(b), BudgetSource::Available),
                None => (None, BudgetSource::Unknown),
            },
            None => (None, BudgetSource::Unknown),
        };
        let limits = PlanLimits {
            precision: self.dtype,
            vae_dtype: self.vae_dtype,
            weights: self.weights,
            min_level: 0,
            budget,
            source,
            release_after_use: one_request,
        };
        let sizes =
            |format| ModelSizes::of_folder::<B>(dir, format, self.vae_dtype, device).map(|s| s.with_loras(&self.loras));
        let mut chosen: Option<MemoryPlan> = None;
        for params in requests {
            let plan = plan_memory(sizes, params, limits)?;
            // Plans run from the least costly; the most costly any request needs serves them all.
            let cost = |p: &MemoryPlan| (p.format.weights as u8, p.level);
            if chosen.as_ref().is_none_or(|c| cost(&plan) > cost(c)) {
                chosen = Some(plan);
            }
        }
        Ok(chosen)
    }
}
