//! TeaCache (Chitu's `flexcache/strategy/teacache.py`, after TeaCache4Wan2.1).

use crate::config::{polyval, TeaCacheConfig, TeaCacheMode, Window};
use crate::{relative_l1, CachePolicy, CacheStats, Core, DitCall};
use burn::tensor::{backend::Backend, Tensor};
use chitu_dit::{DitError, DitRunner, NoHook};

/// State of one (branch, expert) context.
struct State<B: Backend> {
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
pub struct TeaCache<B: Backend> {
    config: TeaCacheConfig,
    core: Core<State<B>>,
}

impl<B: Backend> TeaCache<B> {
    /// The policy with its settings and empty state.
    pub fn new(config: TeaCacheConfig) -> Self {
        Self {
            config,
            core: Core::new(),
        }
    }
}

impl<B: Backend> CachePolicy<B> for TeaCache<B> {
    fn name(&self) -> &'static str {
        "teacache"
    }

    fn forward(
        &mut self,
        dit: &DitRunner<B>,
        call: DitCall,
        x: Tensor<B, 5>,
        timestep: f64,
        context: Tensor<B, 3>,
    ) -> Result<Tensor<B, 5>, DitError> {
        let e = dit.embed(x, &[timestep], context)?;
        let signal: Tensor<B, 2> = match self.config.mode {
            TeaCacheMode::RetSteps => e.inputs.e0.clone().flatten(1, 2),
            TeaCacheMode::Default => e.temb.clone(),
        };
        let window = Window::new(self.config.warmup, self.config.cooldown);
        let forced = window.forces(call.step, call.num_steps);
        let coefficients = self.config.coefficients_for(dit.config());
        let threshold = self.config.threshold;
        let (state, stats) = self.core.context(&call);

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

    fn stats(&self) -> CacheStats {
        self.core.stats()
    }

    fn reset(&mut self) {
        self.core.reset()
    }
}
