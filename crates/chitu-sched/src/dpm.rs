//! DPM-Solver++ (orders 1 and 2) on flow-matching sigmas, as diffusers' `DPMSolverMultistepScheduler`
//! with `algorithm_type="dpmsolver++"`, `prediction_type="flow_prediction"` and `use_flow_sigmas=True`.

use crate::config::{DpmSolverConfig, FinalSigmas};
use crate::math::{flow_alpha_sigma, flow_sigmas, lambda};
use crate::{schedule_accessors, SchedError, Schedule, Scheduler, Stepped};
use burn::tensor::{backend::Backend, Tensor};

const CLASS: &str = "DPMSolverMultistepScheduler";

/// diffusers' `DPMSolverMultistepScheduler` for flow-prediction models (Wan's "dpm++").
pub struct DpmSolverScheduler<B: Backend, const D: usize = 5> {
    config: DpmSolverConfig,
    schedule: Schedule,
    /// Converted (x0) model outputs, oldest first.
    model_outputs: Vec<Option<Tensor<B, D>>>,
    lower_order_nums: usize,
}

impl<B: Backend, const D: usize> DpmSolverScheduler<B, D> {
    /// Builds the scheduler after checking every option is supported.
    pub fn new(config: DpmSolverConfig) -> Result<Self, SchedError> {
        config.validate()?;
        let order = config.solver_order;
        Ok(Self {
            config,
            schedule: Schedule::default(),
            model_outputs: vec![None; order],
            lower_order_nums: 0,
        })
    }

    /// The validated config.
    pub fn config(&self) -> &DpmSolverConfig {
        &self.config
    }

    fn first_order(&self, sample: Tensor<B, D>, idx: usize) -> Tensor<B, D> {
        let sig = &self.schedule.sigmas;
        let (alpha_t, sigma_t) = flow_alpha_sigma(sig[idx + 1]);
        let (_, sigma_s) = flow_alpha_sigma(sig[idx]);
        let h = lambda(sig[idx + 1]) - lambda(sig[idx]);
        let m0 = self.newest(0);
        sample.mul_scalar((sigma_t / sigma_s) as f32) - m0.mul_scalar((alpha_t * ((-h).exp() - 1.0)) as f32)
    }

    fn second_order(&self, sample: Tensor<B, D>, idx: usize) -> Tensor<B, D> {
        let sig = &self.schedule.sigmas;
        let (alpha_t, sigma_t) = flow_alpha_sigma(sig[idx + 1]);
        let (_, sigma_s0) = flow_alpha_sigma(sig[idx]);
        let (lambda_t, lambda_s0, lambda_s1) = (lambda(sig[idx + 1]), lambda(sig[idx]), lambda(sig[idx - 1]));
        let (m0, m1) = (self.newest(0), self.newest(1));
        let h = lambda_t - lambda_s0;
        let r0 = (lambda_s0 - lambda_s1) / h;
        let d1 = (m0.clone() - m1).mul_scalar((1.0 / r0) as f32);
        let phi = alpha_t * ((-h).exp() - 1.0);
        let d1_coef = if self.config.solver_type == "heun" {
            alpha_t * (((-h).exp() - 1.0) / h + 1.0)
        } else {
            -0.5 * phi
        };
        sample.mul_scalar((sigma_t / sigma_s0) as f32) - m0.mul_scalar(phi as f32) + d1.mul_scalar(d1_coef as f32)
    }

    /// The `k`-th newest converted output (0 = this step's).
    fn newest(&self, k: usize) -> Tensor<B, D> {
        let n = self.model_outputs.len();
        self.model_outputs[n - 1 - k]
            .clone()
            .expect("the solver order never exceeds the stored history")
    }
}

impl<B: Backend, const D: usize> Scheduler<B, D> for DpmSolverScheduler<B, D> {
    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn set_timesteps(&mut self, n: usize) -> Result<(), SchedError> {
        Schedule::check_steps(CLASS, n)?;
        let t = self.config.num_train_timesteps;
        // `validate` only admits a zero final sigma.
        self.schedule = Schedule::from_flow_sigmas(&flow_sigmas(n, t, self.config.flow_shift), 0.0, t);
        self.reset();
        Ok(())
    }

    schedule_accessors!();

    fn order(&self) -> usize {
        self.config.solver_order
    }

    fn step(&mut self, model_output: Tensor<B, D>, timestep: f64, sample: Tensor<B, D>) -> Stepped<B, D> {
        let idx = self.schedule.begin_step(CLASS, timestep)?;
        let n = self.schedule.timesteps.len();
        let c = &self.config;
        let lower_order_final = idx == n - 1
            && (c.euler_at_final || (c.lower_order_final && n < 15) || c.final_sigmas_type == FinalSigmas::Zero);

        let x0 = sample.clone() - model_output.mul_scalar(self.schedule.sigmas[idx] as f32);
        self.model_outputs.rotate_left(1);
        let last = self.model_outputs.len() - 1;
        self.model_outputs[last] = Some(x0);

        let prev = if c.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(sample, idx)
        } else {
            self.second_order(sample, idx)
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.config.solver_order);
        self.schedule.step_index += 1;
        Ok(prev)
    }

    fn reset(&mut self) {
        self.model_outputs = vec![None; self.config.solver_order];
        self.lower_order_nums = 0;
        self.schedule.step_index = 0;
    }

    fn set_begin_index(&mut self, index: usize) -> Result<(), SchedError> {
        self.schedule.set_begin_index(CLASS, index)
    }
}
