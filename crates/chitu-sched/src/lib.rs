//! Flow-matching noise schedulers for Wan video diffusion, reproducing diffusers exactly.
//!
//! Three schedulers sit behind one object-safe trait, [`Scheduler`]:
//! - [`UniPcScheduler`] is diffusers' `UniPCMultistepScheduler` with flow sigmas (Wan's default "unipc");
//! - [`DpmSolverScheduler`] is `DPMSolverMultistepScheduler` with flow sigmas (Wan's "dpm++");
//! - [`FlowMatchEulerScheduler`] is `FlowMatchEulerDiscreteScheduler`.
//!
//! Build one from a diffusers `scheduler_config.json` with [`from_config_file`] or [`from_config_json`].
//! Options that diffusers supports but these schedulers do not (Karras sigmas, thresholding, ...) are
//! rejected with [`SchedError::Unsupported`] rather than silently ignored.
//!
//! ```no_run
//! use burn::tensor::Tensor;
//! use burn_flex::Flex;
//! # fn main() -> Result<(), chitu_sched::SchedError> {
//! let mut sched = chitu_sched::from_config_file::<Flex, 5>("scheduler/scheduler_config.json")?;
//! sched.set_timesteps(50)?;
//! # let device = Default::default();
//! let mut latents = Tensor::<Flex, 5>::zeros([1, 16, 21, 60, 104], &device);
//! for t in sched.timesteps().to_vec() {
//!     let velocity = latents.clone(); // the DiT's prediction at `t`
//!     latents = sched.step(velocity, t, latents)?;
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod config;
mod dpm;
mod euler;
mod explicit;
mod math;
mod spec;
mod unipc;

use burn::tensor::{backend::Backend, Tensor};
use std::path::Path;

pub use config::{parse_python_json, DpmSolverConfig, FinalSigmas, FlowMatchEulerConfig, UniPcConfig};
pub use dpm::DpmSolverScheduler;
pub use euler::FlowMatchEulerScheduler;
pub use explicit::{step_distill_sigmas, StepList};
pub use math::{flow_sigmas, numpy_linspace, shift_sigmas, unipc_flow_sigmas};
pub use spec::{SchedulerConfig, SchedulerSpec};
pub use unipc::UniPcScheduler;

/// Errors from building or stepping a scheduler.
#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    /// The config file could not be read.
    #[error("cannot read scheduler config {path}: {source}")]
    Io {
        /// The file.
        path: String,
        #[source]
        /// What the OS said.
        source: std::io::Error,
    },
    /// The config is not valid JSON or has a field of the wrong type.
    #[error("invalid scheduler config: {0}")]
    Json(#[from] serde_json::Error),
    /// `_class_name` names a scheduler this crate does not implement.
    #[error("unknown scheduler class {0:?} (supported: UniPCMultistepScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler)")]
    UnknownClass(String),
    /// A config option is set to a value this crate does not implement.
    #[error("{class}: unsupported option {option} = {value}")]
    Unsupported {
        /// The scheduler class.
        class: &'static str,
        /// The config option.
        option: &'static str,
        /// Its value.
        value: String,
    },
    /// A config value is out of its valid range.
    #[error("{class}: invalid {option}: {reason}")]
    Invalid {
        /// The scheduler class.
        class: &'static str,
        /// The config option.
        option: &'static str,
        /// Why it is out of range.
        reason: String,
    },
    /// `step` was called before `set_timesteps`.
    #[error("{0}: call set_timesteps before step")]
    NotInitialised(&'static str),
    /// `step` was called more times than the schedule has steps.
    #[error("{class}: schedule of {steps} steps is already finished")]
    Finished {
        /// The scheduler class.
        class: &'static str,
        /// Steps in the schedule.
        steps: usize,
    },
    /// The timestep passed to `step` is not the one the schedule is at.
    #[error("{class}: step {index} expects timestep {expected}, got {got}")]
    TimestepMismatch {
        /// The scheduler class.
        class: &'static str,
        /// The step the schedule is at.
        index: usize,
        /// That step's timestep.
        expected: f64,
        /// The timestep passed.
        got: f64,
    },
}

/// The sample after a step, or why the step was refused.
pub type Stepped<B, const D: usize> = Result<Tensor<B, D>, SchedError>;

/// A noise scheduler for flow-matching diffusion, over latents of rank `D` (5 for Wan video latents).
///
/// The trait is object safe: pipelines hold a `Box<dyn Scheduler<B>>`.
pub trait Scheduler<B: Backend, const D: usize = 5>: Send {
    /// The diffusers class this scheduler reproduces.
    fn class_name(&self) -> &'static str;
    /// Computes the schedule for `num_inference_steps` steps and resets all solver state.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedError>;
    /// The timesteps the model is called at, one per step, as diffusers gives them
    /// (integers for UniPC and DPM-Solver, floats for Euler).
    fn timesteps(&self) -> &[f64];
    /// The noise levels, one per step plus the final one (0 or the configured minimum).
    /// They are the float32 values diffusers stores, widened to f64.
    fn sigmas(&self) -> &[f64];
    /// The solver's configured order (1 for Euler).
    fn order(&self) -> usize;
    /// How many steps have been taken since the last `set_timesteps` or `reset`.
    fn step_index(&self) -> usize;
    /// Advances `sample` by one step given the model's prediction at `timestep`.
    ///
    /// `timestep` must be `timesteps()[step_index()]`: the step position comes from an internal
    /// counter (as in diffusers), and a mismatched timestep is an error rather than silent wrong math.
    fn step(&mut self, model_output: Tensor<B, D>, timestep: f64, sample: Tensor<B, D>) -> Stepped<B, D>;
    /// Clears the multistep history and returns to step 0, keeping the schedule.
    fn reset(&mut self);
    /// Starts the next `step` at position `index` of the schedule (diffusers' `set_begin_index`),
    /// for pipelines that enter a schedule part-way, such as a refinement stage.
    fn set_begin_index(&mut self, index: usize) -> Result<(), SchedError>;
    /// Takes the schedule as given noise levels, one per step, ending at 0 (a [`StepList`]'s
    /// sigmas), and resets all solver state. Only first-order Euler takes one: the multistep
    /// solvers' coefficients assume their own spacing.
    fn set_sigmas(&mut self, sigmas: &[f64]) -> Result<(), SchedError> {
        Err(SchedError::Unsupported {
            class: self.class_name(),
            option: "an explicit list of steps",
            value: format!("{} sigmas (use the euler solver)", sigmas.len()),
        })
    }
}

/// Builds a scheduler from a diffusers `scheduler_config.json` file.
pub fn from_config_file<B: Backend, const D: usize>(
    path: impl AsRef<Path>,
) -> Result<Box<dyn Scheduler<B, D>>, SchedError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| SchedError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let value: serde_json::Value = serde_json::from_str(&text)?;
    from_config_json(&value)
}

/// Builds a scheduler from a parsed diffusers scheduler config, dispatching on `_class_name`.
pub fn from_config_json<B: Backend, const D: usize>(
    config: &serde_json::Value,
) -> Result<Box<dyn Scheduler<B, D>>, SchedError> {
    SchedulerSpec::from_json(config)?.build(None, None)
}

/// The solvers a Wan user picks by name, as Wan's own scripts and Chitu name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverKind {
    /// UniPC, bh2, order 2 (Wan's default).
    UniPc,
    /// DPM-Solver++ order 2, midpoint.
    DpmPlusPlus,
    /// First-order flow-matching Euler.
    Euler,
}

impl std::str::FromStr for SolverKind {
    type Err = SchedError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "unipc" => Ok(Self::UniPc),
            "dpm++" | "dpmpp" | "dpm" => Ok(Self::DpmPlusPlus),
            "euler" => Ok(Self::Euler),
            _ => Err(SchedError::UnknownClass(format!(
                "solver {s:?} (expected unipc, dpm++ or euler)"
            ))),
        }
    }
}

/// Builds the named solver with Wan's settings and the given flow shift.
pub fn for_solver<B: Backend, const D: usize>(
    kind: SolverKind,
    shift: f64,
) -> Result<Box<dyn Scheduler<B, D>>, SchedError> {
    Ok(match kind {
        SolverKind::UniPc => Box::new(UniPcScheduler::new(UniPcConfig {
            flow_shift: shift,
            ..UniPcConfig::wan()
        })?),
        SolverKind::DpmPlusPlus => Box::new(DpmSolverScheduler::new(DpmSolverConfig {
            flow_shift: shift,
            ..DpmSolverConfig::wan()
        })?),
        SolverKind::Euler => Box::new(FlowMatchEulerScheduler::new(FlowMatchEulerConfig {
            shift,
            ..FlowMatchEulerConfig::default()
        })?),
    })
}

/// Re-noises a clean latent to noise level `sigma` along the flow-matching path:
/// `(1 - sigma) * x0 + sigma * noise` (diffusers' `scale_noise`).
pub fn scale_noise<B: Backend, const D: usize>(x0: Tensor<B, D>, noise: Tensor<B, D>, sigma: f64) -> Tensor<B, D> {
    x0.mul_scalar((1.0 - sigma) as f32) + noise.mul_scalar(sigma as f32)
}

/// The `Scheduler` methods every scheduler answers from its `schedule` field.
macro_rules! schedule_accessors {
    () => {
        fn timesteps(&self) -> &[f64] {
            &self.schedule.timesteps
        }

        fn sigmas(&self) -> &[f64] {
            &self.schedule.sigmas
        }

        fn step_index(&self) -> usize {
            self.schedule.step_index
        }
    };
}
pub(crate) use schedule_accessors;

/// Shared bookkeeping for the step counter and timestep check.
#[derive(Debug, Clone, Default)]
pub(crate) struct Schedule {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f64>,
    pub step_index: usize,
    pub ready: bool,
}

impl Schedule {
    /// Refuses an empty schedule.
    pub fn check_steps(class: &'static str, n: usize) -> Result<(), SchedError> {
        if n == 0 {
            return Err(SchedError::Invalid {
                class,
                option: "num_inference_steps",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }

    /// The schedule UniPC and DPM-Solver build from f64 flow sigmas: timesteps `sigma * T`
    /// truncated to integers (diffusers casts to int64), sigmas rounded to float32 with `last`
    /// appended.
    pub fn from_flow_sigmas(sigmas64: &[f64], last: f64, num_train_timesteps: usize) -> Self {
        Self {
            timesteps: sigmas64
                .iter()
                .map(|s| (s * num_train_timesteps as f64).trunc())
                .collect(),
            sigmas: sigmas64
                .iter()
                .chain(std::iter::once(&last))
                .map(|&s| math::f32_round(s))
                .collect(),
            step_index: 0,
            ready: true,
        }
    }

    /// Validates the call and returns the index of the step about to run.
    pub fn begin_step(&self, class: &'static str, timestep: f64) -> Result<usize, SchedError> {
        if !self.ready {
            return Err(SchedError::NotInitialised(class));
        }
        let index = self.step_index;
        let expected = *self.timesteps.get(index).ok_or(SchedError::Finished {
            class,
            steps: self.timesteps.len(),
        })?;
        // Exact float equality is intended: callers pass back the values `timesteps()` gave them.
        if expected != timestep {
            return Err(SchedError::TimestepMismatch {
                class,
                index,
                expected,
                got: timestep,
            });
        }
        Ok(index)
    }

    pub fn set_begin_index(&mut self, class: &'static str, index: usize) -> Result<(), SchedError> {
        if !self.ready {
            return Err(SchedError::NotInitialised(class));
        }
        if index >= self.timesteps.len() {
            return Err(SchedError::Finished {
                class,
                steps: self.timesteps.len(),
            });
        }
        self.step_index = index;
        Ok(())
    }
}

impl<B: Backend, const D: usize> std::fmt::Debug for dyn Scheduler<B, D> + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(self.class_name())
            .field("order", &self.order())
            .field("steps", &self.timesteps().len())
            .field("step_index", &self.step_index())
            .finish()
    }
}
