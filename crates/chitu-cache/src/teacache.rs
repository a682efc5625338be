//! TeaCache (Chitu's `flexcache/strategy/teacache.py`, after TeaCache4Wan2.1).

use crate::config::{polyval, TeaCacheConfig, TeaCacheMode, Window};
use crate::{relative_l1, CacheRule, DitInput, Policy, RuleContext, Velocity};
use burn::tensor::{backend::Backend, Tensor};
use chitu_dit::{DitRunner, NoHook};

/// State of one (branch, expert) context.
pub struct State<B: Backend> {
    accumulated: f64,
    previous_signal: Option<Tensor<B, 2>>,
    /// Output minus input of the block stack at the last full compute.
    residual: Option<Tensor<B, 3>>,
}

impl<B: Backend> Default for State<B> {
    fn default() -> Self {
        Self {
            accumulated: 0.0,
            previous_signal: None,
            residual: None,
        }
    }
}

/// TeaCache: skips every block while the accumulated, polynomial-rescaled relative L1 change of
/// the timestep signal stays below the threshold, adding the last stored residual instead.
pub type TeaCache<B> = Policy<B, TeaCacheConfig>;

impl<B: Backend> CacheRule<B> for TeaCacheConfig {
    const NAME: &'static str = "teacache";
    type State = State<B>;

    fn run(&self, dit: &DitRunner<B>, input: DitInput<B>, ctx: RuleContext<'_, State<B>>) -> Velocity<B> {
        let RuleContext { call, state, stats } = ctx;
        let e = dit.embed_at(input.x, &[input.timestep], input.first_frame, input.context)?;
        let signal: Tensor<B, 2> = match self.mode {
            TeaCacheMode::RetSteps => e.inputs.e0.clone().flatten(1, 2),
            TeaCacheMode::Default => e.temb.clone(),
        };
        let window = Window::new(self.warmup, self.cooldown);
        let forced = window.forces(call.step, call.num_steps);
        let coefficients = self.coefficients_for(dit.config());
        let threshold = self.threshold;

        let reuse = if forced {
            state.accumulated = 0.0;
            None
        } else {
            let distance = state
                .previous_signal
                .clone()
                .and_then(|prev| relative_l1(signal.clone(), prev));
            match distance {
                // A first call in this context, or a vanishing signal: nothing to compare.
                None => None,
                Some(d) => {
                    let accumulated = state.accumulated + polyval(&coefficients, d);
                    // A threshold of 0 never reuses, even where the polynomial dips below zero.
                    match state.residual.clone() {
                        Some(residual) if threshold > 0.0 && accumulated < threshold => {
                            state.accumulated = accumulated;
                            Some(residual)
                        }
                        _ => {
                            state.accumulated = 0.0;
                            None
                        }
                    }
                }
            }
        };
        state.previous_signal = Some(signal);

        let num_blocks = dit.num_blocks();
        let tokens = if let Some(residual) = reuse {
            stats.record(num_blocks, num_blocks, 0);
            e.tokens.clone() + residual
        } else {
            let out = dit.blocks(e.tokens.clone(), &e.inputs, 0..num_blocks, &mut NoHook);
            state.residual = Some(out.clone() - e.tokens.clone());
            stats.record(num_blocks, 0, 0);
            out
        };
        dit.head(tokens, &e)
    }
}
