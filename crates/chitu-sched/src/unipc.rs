//! UniPC (predictor UniP + corrector UniC, B(h) variants) on flow-matching sigmas, as diffusers'
//! `UniPCMultistepScheduler` with `prediction_type="flow_prediction"` and `use_flow_sigmas=True`.

use crate::config::{FinalSigmas, UniPcConfig};
use crate::math::{flow_alpha_sigma, lambda, solve, unipc_flow_sigmas};
use crate::{schedule_accessors, SchedError, Schedule, Scheduler, Stepped};
use burn::tensor::{backend::Backend, Tensor};

const CLASS: &str = "UniPCMultistepScheduler";

/// diffusers' `UniPCMultistepScheduler` for flow-prediction models (Wan's default solver).
pub struct UniPcScheduler<B: Backend, const D: usize = 5> {
    config: UniPcConfig,
    schedule: Schedule,
    /// Converted (x0) model outputs, oldest first; `None` until filled.
    model_outputs: Vec<Option<Tensor<B, D>>>,
    lower_order_nums: usize,
    last_sample: Option<Tensor<B, D>>,
    this_order: usize,
}

/// The B(h) coefficient tables shared by predictor and corrector.
struct BhCoefficients {
    h_phi_1: f64,
    b_h: f64,
    rks: Vec<f64>,
    b: Vec<f64>,
}

impl<B: Backend, const D: usize> UniPcScheduler<B, D> {
    /// Builds the scheduler after checking every option is supported.
    pub fn new(config: UniPcConfig) -> Result<Self, SchedError> {
        config.validate()?;
        let order = config.solver_order;
        Ok(Self {
            config,
            schedule: Schedule::default(),
            model_outputs: vec![None; order],
            lower_order_nums: 0,
            last_sample: None,
            this_order: 1,
        })
    }

    /// The validated config.
    pub fn config(&self) -> &UniPcConfig {
        &self.config
    }

    /// `rks` are the ratios of earlier log-SNR gaps to `h`; the last entry is 1.
    fn coefficients(&self, h: f64, mut rks: Vec<f64>, order: usize) -> BhCoefficients {
        rks.push(1.0);
        // predict_x0 is always on for flow prediction, so the exponent runs on -h.
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let b_h = if self.config.is_bh1() { hh } else { hh.exp_m1() };
        let mut factorial = 1.0;
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        BhCoefficients { h_phi_1, b_h, rks, b }
    }

    /// The Vandermonde-like matrix `R[i][k] = rks[k]^i` of the first `n` rows and columns.
    fn r_matrix(rks: &[f64], n: usize) -> Vec<Vec<f64>> {
        (0..n)
            .map(|i| rks[..n].iter().map(|r| r.powi(i as i32)).collect())
            .collect()
    }

    /// Differences `(m_i - m0) / rk` with their log-SNR ratios, for the `order - 1` earlier outputs,
    /// taking the sigma of output `i` from `sigma_index(i)`.
    fn history(
        &self,
        order: usize,
        lambda_s0: f64,
        h: f64,
        sigma_index: impl Fn(usize) -> usize,
    ) -> (Vec<f64>, Vec<Tensor<B, D>>) {
        let n = self.model_outputs.len();
        let m0 = self.model_outputs[n - 1].clone().expect("newest output is set");
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for i in 1..order {
            let mi = self.model_outputs[n - 1 - i]
                .clone()
                .expect("order never exceeds the stored history");
            let rk = (lambda(self.schedule.sigmas[sigma_index(i)]) - lambda_s0) / h;
            rks.push(rk);
            d1s.push((mi - m0.clone()).div_scalar(rk as f32));
        }
        (rks, d1s)
    }

    /// What UniP and UniC both start from for the step from sigma[`from`] to sigma[`to`]: the
    /// flow alphas and sigmas, the history's differences, the B(h) coefficients and the newest
    /// output. Earlier output `i` sits at sigma[`from` - i].
    fn terms(&self, from: usize, to: usize, order: usize) -> Terms<B, D> {
        let sig = &self.schedule.sigmas;
        let (alpha_t, sigma_t) = flow_alpha_sigma(sig[to]);
        let (_, sigma_s0) = flow_alpha_sigma(sig[from]);
        let lambda_s0 = lambda(sig[from]);
        let h = lambda(sig[to]) - lambda_s0;
        let (rks, d1s) = self.history(order, lambda_s0, h, |i| from - i);
        let c = self.coefficients(h, rks, order);
        let m0 = self
            .model_outputs
            .last()
            .cloned()
            .flatten()
            .expect("newest output is set");
        Terms {
            alpha_t,
            sigma_t,
            sigma_s0,
            d1s,
            c,
            m0,
        }
    }

    /// UniP: the predictor from sigma[idx] to sigma[idx + 1].
    fn predict(&self, x: Tensor<B, D>, order: usize, idx: usize) -> Tensor<B, D> {
        let terms = self.terms(idx, idx + 1, order);

        let mut x_t = x.mul_scalar((terms.sigma_t / terms.sigma_s0) as f32)
            - terms.m0.mul_scalar((terms.alpha_t * terms.c.h_phi_1) as f32);
        // With no history the correction term is exactly zero. diffusers still multiplies it by
        // B(h), which is -inf for bh1 at a zero final sigma and turns the sample into NaN.
        if !terms.d1s.is_empty() {
            let rhos_p = if order == 2 {
                vec![0.5]
            } else {
                solve(Self::r_matrix(&terms.c.rks, order - 1), terms.c.b[..order - 1].to_vec())
            };
            let pred_res = weighted_sum(&rhos_p, terms.d1s);
            x_t = x_t - pred_res.mul_scalar((terms.alpha_t * terms.c.b_h) as f32);
        }
        x_t
    }

    /// UniC: corrects the sample at sigma[idx] using the model's output there.
    fn correct(&self, model_t: Tensor<B, D>, last_sample: Tensor<B, D>, order: usize, idx: usize) -> Tensor<B, D> {
        let terms = self.terms(idx - 1, idx, order);

        let rhos_c = if order == 1 {
            vec![0.5]
        } else {
            solve(Self::r_matrix(&terms.c.rks, order), terms.c.b.clone())
        };
        let x_t_ = last_sample.mul_scalar((terms.sigma_t / terms.sigma_s0) as f32)
            - terms.m0.clone().mul_scalar((terms.alpha_t * terms.c.h_phi_1) as f32);
        let d1_t = (model_t - terms.m0).mul_scalar(rhos_c[order - 1] as f32);
        let corr = if terms.d1s.is_empty() {
            d1_t
        } else {
            weighted_sum(&rhos_c[..order - 1], terms.d1s) + d1_t
        };
        x_t_ - corr.mul_scalar((terms.alpha_t * terms.c.b_h) as f32)
    }
}

/// The shared start of a UniP or UniC update (see `UniPcScheduler::terms`).
struct Terms<B: Backend, const D: usize> {
    alpha_t: f64,
    sigma_t: f64,
    sigma_s0: f64,
    d1s: Vec<Tensor<B, D>>,
    c: BhCoefficients,
    m0: Tensor<B, D>,
}

/// `sum_k w[k] * t[k]` (diffusers' `einsum("k,bkc...->bc...")`).
pub(crate) fn weighted_sum<B: Backend, const D: usize>(w: &[f64], ts: Vec<Tensor<B, D>>) -> Tensor<B, D> {
    ts.into_iter()
        .zip(w)
        .map(|(t, &wk)| t.mul_scalar(wk as f32))
        .reduce(|a, b| a + b)
        .expect("at least one term")
}

impl<B: Backend, const D: usize> Scheduler<B, D> for UniPcScheduler<B, D> {
    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn set_timesteps(&mut self, n: usize) -> Result<(), SchedError> {
        Schedule::check_steps(CLASS, n)?;
        let t = self.config.num_train_timesteps;
        let sigmas64 = unipc_flow_sigmas(n, t, self.config.flow_shift, self.config.shift_terminal);
        let last = match self.config.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => sigmas64[n - 1],
        };
        self.schedule = Schedule::from_flow_sigmas(&sigmas64, last, t);
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
        let order = self.config.solver_order;

        // Flow prediction: x0 = x - sigma * v.
        let x0 = sample.clone() - model_output.mul_scalar(self.schedule.sigmas[idx] as f32);

        let use_corrector = idx > 0 && !self.config.disable_corrector.contains(&(idx - 1));
        let sample = match (use_corrector, self.last_sample.take()) {
            (true, Some(last)) => self.correct(x0.clone(), last, self.this_order, idx),
            _ => sample,
        };

        self.model_outputs.rotate_left(1);
        self.model_outputs[order - 1] = Some(x0);

        let this_order = if self.config.lower_order_final {
            order.min(n - idx)
        } else {
            order
        };
        self.this_order = this_order.min(self.lower_order_nums + 1);

        self.last_sample = Some(sample.clone());
        let prev = self.predict(sample, self.this_order, idx);

        self.lower_order_nums = (self.lower_order_nums + 1).min(order);
        self.schedule.step_index += 1;
        Ok(prev)
    }

    fn reset(&mut self) {
        self.model_outputs = vec![None; self.config.solver_order];
        self.lower_order_nums = 0;
        self.last_sample = None;
        self.this_order = 1;
        self.schedule.step_index = 0;
    }

    fn set_begin_index(&mut self, index: usize) -> Result<(), SchedError> {
        self.schedule.set_begin_index(CLASS, index)
    }
}
