//! A scheduler config parsed and checked once, when a model folder loads, instead of being read
//! key by key from JSON at every request.

use crate::{
    DpmSolverConfig, DpmSolverScheduler, FlowMatchEulerConfig, FlowMatchEulerScheduler, SchedError, Scheduler,
    SolverKind, UniPcConfig, UniPcScheduler,
};
use burn::tensor::backend::Backend;

/// The solver and settings of a diffusers `scheduler_config.json`.
#[derive(Debug, Clone)]
pub enum SchedulerConfig {
    /// `UniPCMultistepScheduler`.
    UniPc(UniPcConfig),
    /// `DPMSolverMultistepScheduler`.
    DpmSolver(DpmSolverConfig),
    /// `FlowMatchEulerDiscreteScheduler`.
    FlowMatchEuler(FlowMatchEulerConfig),
}

/// A model folder's scheduler: its config, checked, and the shift the file named.
#[derive(Debug, Clone)]
pub struct SchedulerSpec {
    /// The parsed config.
    pub config: SchedulerConfig,
    /// The file's `flow_shift` (or `shift`); a solver picked by name inherits only a named one,
    /// and Wan's 5.0 otherwise.
    pub named_shift: Option<f64>,
}

impl SchedulerSpec {
    /// Parses a diffusers scheduler config, dispatching on `_class_name`, and checks every option.
    pub fn from_json(config: &serde_json::Value) -> Result<Self, SchedError> {
        let class = config
            .get("_class_name")
            .and_then(|v| v.as_str())
            .ok_or_else(|| SchedError::UnknownClass("<missing _class_name>".into()))?;
        let parsed = match class {
            "UniPCMultistepScheduler" => {
                let c: UniPcConfig = serde_json::from_value(config.clone())?;
                c.validate()?;
                SchedulerConfig::UniPc(c)
            }
            "DPMSolverMultistepScheduler" => {
                let c: DpmSolverConfig = serde_json::from_value(config.clone())?;
                c.validate()?;
                SchedulerConfig::DpmSolver(c)
            }
            "FlowMatchEulerDiscreteScheduler" => {
                let c: FlowMatchEulerConfig = serde_json::from_value(config.clone())?;
                c.validate()?;
                SchedulerConfig::FlowMatchEuler(c)
            }
            other => return Err(SchedError::UnknownClass(other.to_string())),
        };
        let named_shift = config
            .get("flow_shift")
            .or_else(|| config.get("shift"))
            .and_then(|v| v.as_f64());
        Ok(Self {
            config: parsed,
            named_shift,
        })
    }

    /// UniPC with flow sigmas and `shift`, as Wan's own sampler runs (Wan release folders carry
    /// no scheduler config).
    pub fn unipc_flow(shift: f64) -> Self {
        Self {
            config: SchedulerConfig::UniPc(UniPcConfig {
                flow_shift: shift,
                ..UniPcConfig::wan()
            }),
            named_shift: Some(shift),
        }
    }

    /// The flow shift a run gets without one of its own: the file's named one, else the
    /// config's, as [`SchedulerSpec::build`] applies them.
    pub fn shift(&self) -> f64 {
        self.named_shift.unwrap_or(match &self.config {
            SchedulerConfig::UniPc(c) => c.flow_shift,
            SchedulerConfig::DpmSolver(c) => c.flow_shift,
            SchedulerConfig::FlowMatchEuler(c) => c.shift,
        })
    }

    /// Training timesteps (the scale of Wan2.2's expert boundary).
    pub fn num_train_timesteps(&self) -> usize {
        match &self.config {
            SchedulerConfig::UniPc(c) => c.num_train_timesteps,
            SchedulerConfig::DpmSolver(c) => c.num_train_timesteps,
            SchedulerConfig::FlowMatchEuler(c) => c.num_train_timesteps,
        }
    }

    /// A fresh scheduler: this config with `shift` when given, or the `solver` picked by name with
    /// `shift`, else the file's named shift, else 5.0.
    pub fn build<B: Backend, const D: usize>(
        &self,
        solver: Option<SolverKind>,
        shift: Option<f64>,
    ) -> Result<Box<dyn Scheduler<B, D>>, SchedError> {
        if let Some(kind) = solver {
            return crate::for_solver(kind, shift.or(self.named_shift).unwrap_or(5.0));
        }
        Ok(match self.config.clone() {
            SchedulerConfig::UniPc(mut c) => {
                c.flow_shift = shift.unwrap_or(c.flow_shift);
                Box::new(UniPcScheduler::new(c)?)
            }
            SchedulerConfig::DpmSolver(mut c) => {
                c.flow_shift = shift.unwrap_or(c.flow_shift);
                Box::new(DpmSolverScheduler::new(c)?)
            }
            SchedulerConfig::FlowMatchEuler(mut c) => {
                c.shift = shift.unwrap_or(c.shift);
                Box::new(FlowMatchEulerScheduler::new(c)?)
            }
        })
    }
}
