//! TaylorSeer (diffusers' `hooks/taylorseer_cache.py`), on every attention and FFN output.

use crate::config::{TaylorSeerConfig, Window};
use crate::{CacheRule, DitInput, Policy, RuleContext, Velocity};
use burn::tensor::{backend::Backend, Tensor};
use chitu_dit::{BlockHook, BlockPart, DitRunner};
use std::collections::HashMap;

/// Whether TaylorSeer runs a full compute at `step` of `num_steps`: inside the warmup/cooldown
/// window, and then at steps `warmup + 1 + k * cache_interval`, as diffusers schedules it (so the
/// step right after the warmup is already forecast).
pub fn taylorseer_computes(config: &TaylorSeerConfig, step: usize, num_steps: usize) -> bool {
    let window = Window::new(config.warmup, config.cooldown);
    let phase = step as i64 - config.warmup as i64 - 1;
    window.forces(step, num_steps) || phase.rem_euclid(config.cache_interval as i64) == 0
}

/// Taylor factors of one (branch, expert) context: for each sub-layer, the output and its
/// divided differences up to `max_order`, as of `last_step`.
pub struct State<B: Backend> {
    last_step: Option<usize>,
    factors: HashMap<(usize, BlockPart), Vec<Tensor<B, 3>>>,
}

impl<B: Backend> Default for State<B> {
    fn default() -> Self {
        Self {
            last_step: None,
            factors: HashMap::new(),
        }
    }
}

/// TaylorSeer: computes everything on its schedule and, in between, forecasts each sub-layer
/// output as `sum_k f_k * offset^k / k!` from the factors of the last computes.
pub type TaylorSeer<B> = Policy<B, TaylorSeerConfig>;

struct Hook<'a, B: Backend> {
    state: &'a mut State<B>,
    max_order: usize,
    step: usize,
    compute: bool,
    forecast: usize,
}

impl<B: Backend> BlockHook<B> for Hook<'_, B> {
    fn part(&mut self, block: usize, part: BlockPart, compute: &mut dyn FnMut() -> Tensor<B, 3>) -> Tensor<B, 3> {
        let key = (block, part);
        let last = self.state.last_step;
        if !self.compute {
            if let (Some(last), Some(factors)) = (last, self.state.factors.get(&key)) {
                self.forecast += 1;
                let offset = (self.step - last) as f64;
                let mut coeff = 1.0;
                let mut out = factors[0].clone();
                for (k, f) in factors.iter().enumerate().skip(1) {
                    coeff *= offset / k as f64;
                    out = out + f.clone().mul_scalar(coeff as f32);
                }
                return out;
            }
        }
        let out = compute();
        let mut new = vec![out.clone()];
        if let (Some(last), Some(prev)) = (last, self.state.factors.get(&key)) {
            // Recomputing a step (delta 0) restarts the expansion instead of dividing by zero.
            let delta = self.step.saturating_sub(last);
            if delta > 0 {
                for j in 0..self.max_order.min(prev.len()) {
                    let next = (new[j].clone() - prev[j].clone()).div_scalar(delta as f32);
                    new.push(next);
                }
            }
        }
        self.state.factors.insert(key, new);
        out
    }
}

impl<B: Backend> CacheRule<B> for TaylorSeerConfig {
    const NAME: &'static str = "taylorseer";
    type State = State<B>;

    fn run(&self, dit: &DitRunner<B>, input: DitInput<B>, ctx: RuleContext<'_, State<B>>) -> Velocity<B> {
        let RuleContext { call, state, stats } = ctx;
        // A context's first call has nothing to forecast from (a later expert starting mid-run).
        let compute = taylorseer_computes(self, call.step, call.num_steps) || state.last_step.is_none();
        let mut hook = Hook {
            state: &mut *state,
            max_order: self.max_order,
            step: call.step,
            compute,
            forecast: 0,
        };
        let out = dit.forward_at(input.x, &[input.timestep], input.first_frame, input.context, &mut hook)?;
        let forecast = hook.forecast;
        if compute {
            state.last_step = Some(call.step);
        }
        stats.record(dit.num_blocks(), 0, forecast);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use burn_flex::Flex;

    fn computed(config: &TaylorSeerConfig, n: usize) -> Vec<usize> {
        (0..n).filter(|&s| taylorseer_computes(config, s, n)).collect()
    }

    #[test]
    fn diffusers_defaults_on_twelve_steps() {
        // Steps 0..3 compute; diffusers' phase `(step - 3 - 1) % 5` then forecasts step 3,
        // computes 4 and 9, and forecasts the rest.
        assert_eq!(computed(&TaylorSeerConfig::default(), 12), vec![0, 1, 2, 4, 9]);
    }

    #[test]
    fn interval_warmup_and_cooldown() {
        let c = TaylorSeerConfig {
            cache_interval: 2,
            max_order: 1,
            warmup: 1,
            cooldown: 3,
        };
        assert_eq!(computed(&c, 10), vec![0, 2, 4, 6, 7, 8, 9]);
        let every = TaylorSeerConfig {
            cache_interval: 1,
            warmup: 0,
            ..Default::default()
        };
        assert_eq!(computed(&every, 6), (0..6).collect::<Vec<_>>());
    }

    #[test]
    fn first_order_forecasts_a_linear_trajectory_exactly() {
        // An output that moves linearly with the step is what a first-order expansion captures:
        // every forecast must equal the value the sub-layer would have computed.
        let device = Default::default();
        let value = |step: usize| {
            let v: Vec<f32> = (0..6)
                .map(|i| 0.5 + i as f32 - 0.25 * step as f32 * (i as f32 + 1.0))
                .collect();
            Tensor::<Flex, 3>::from_data(TensorData::new(v, [1, 2, 3]), &device)
        };
        let config = TaylorSeerConfig {
            cache_interval: 4,
            max_order: 1,
            warmup: 2,
            cooldown: 0,
        };
        let mut state = State::default();
        let mut computed_at = Vec::new();
        for step in 0..12 {
            let compute = taylorseer_computes(&config, step, 12) || state.last_step.is_none();
            let mut hook = Hook {
                state: &mut state,
                max_order: 1,
                step,
                compute,
                forecast: 0,
            };
            let mut ran = false;
            let out = hook.part(0, BlockPart::Ffn, &mut || {
                ran = true;
                value(step)
            });
            assert_eq!(ran, compute, "step {step}");
            if ran {
                computed_at.push(step);
                state.last_step = Some(step);
            }
            out.into_data()
                .assert_approx_eq::<f32>(&value(step).into_data(), burn::tensor::Tolerance::absolute(1e-5));
        }
        assert_eq!(computed_at, vec![0, 1, 3, 7, 11]);
    }
}
