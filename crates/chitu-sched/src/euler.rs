//! First-order flow-matching Euler, as diffusers' `FlowMatchEulerDiscreteScheduler` (static shift).

use crate::config::FlowMatchEulerConfig;
use crate::math::{numpy_linspace, shift_sigmas};
use crate::{schedule_accessors, SchedError, Schedule, Scheduler, Stepped};
use burn::tensor::{backend::Backend, Tensor};

const CLASS: &str = "FlowMatchEulerDiscreteScheduler";

/// diffusers' `FlowMatchEulerDiscreteScheduler`: `x <- x + (sigma_next - sigma) * v`.
pub struct FlowMatchEulerScheduler<B: Backend, const D: usize = 5> {
    config: FlowMatchEulerConfig,
    schedule: Schedule,
    /// The shifted training sigmas' ends, in float32 as diffusers stores them at construction.
    sigma_max: f64,
    sigma_min: f64,
    _backend: std::marker::PhantomData<fn() -> Tensor<B, D>>,
}

impl<B: Backend, const D: usize> FlowMatchEulerScheduler<B, D> {
    /// Builds the scheduler after checking every option is supported.
    pub fn new(config: FlowMatchEulerConfig) -> Result<Self, SchedError> {
        config.validate()?;
        // The constructor shifts the training sigmas t/T in float32; only the two ends are kept.
        let t = config.num_train_timesteps as f32;
        let shift = config.shift as f32;
        let shifted = |s: f32| shift * s / (1.0 + (shift - 1.0) * s);
        Ok(Self {
            // The largest training sigma is T/T = 1.
            sigma_max: shifted(1.0) as f64,
            sigma_min: shifted(1.0 / t) as f64,
            config,
            schedule: Schedule::default(),
            _backend: std::marker::PhantomData,
        })
    }

    /// The validated config.
    pub fn config(&self) -> &FlowMatchEulerConfig {
        &self.config
    }
}

impl<B: Backend, const D: usize> Scheduler<B, D> for FlowMatchEulerScheduler<B, D> {
    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn set_timesteps(&mut self, n: usize) -> Result<(), SchedError> {
        Schedule::check_steps(CLASS, n)?;
        let t = self.config.num_train_timesteps as f64;
        // diffusers spaces the already-shifted ends linearly and then shifts again: the shift is
        // applied twice. This is its actual behaviour, reproduced on purpose.
        let ts = numpy_linspace(self.sigma_max * t, self.sigma_min * t, n);
        let base: Vec<f64> = ts.iter().map(|x| x / t).collect();
        let sigmas32: Vec<f32> = shift_sigmas(&base, self.config.shift)
            .into_iter()
            .map(|s| s as f32)
            .collect();
        let timesteps = sigmas32.iter().map(|&s| (s * t as f32) as f64).collect();
        let sigmas = sigmas32.iter().map(|&s| s as f64).chain(std::iter::once(0.0)).collect();
        self.schedule = Schedule {
            timesteps,
            sigmas,
            step_index: 0,
            ready: true,
        };
        Ok(())
    }

    schedule_accessors!();

    fn order(&self) -> usize {
        1
    }

    fn step(&mut self, model_output: Tensor<B, D>, timestep: f64, sample: Tensor<B, D>) -> Stepped<B, D> {
        let idx = self.schedule.begin_step(CLASS, timestep)?;
        // dt is formed in float32, as diffusers subtracts two float32 sigmas.
        let dt = self.schedule.sigmas[idx + 1] as f32 - self.schedule.sigmas[idx] as f32;
        self.schedule.step_index += 1;
        Ok(sample + model_output.mul_scalar(dt))
    }

    fn reset(&mut self) {
        self.schedule.step_index = 0;
    }

    fn set_begin_index(&mut self, index: usize) -> Result<(), SchedError> {
        self.schedule.set_begin_index(CLASS, index)
    }

    fn set_sigmas(&mut self, sigmas: &[f64]) -> Result<(), SchedError> {
        Schedule::check_steps(CLASS, sigmas.len())?;
        let t = self.config.num_train_timesteps as f32;
        let sigmas32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        self.schedule = Schedule {
            timesteps: sigmas32.iter().map(|&s| (s * t) as f64).collect(),
            sigmas: sigmas32.iter().map(|&s| s as f64).chain(std::iter::once(0.0)).collect(),
            step_index: 0,
            ready: true,
        };
        Ok(())
    }
}
