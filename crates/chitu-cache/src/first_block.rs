//! First Block Cache (diffusers' `hooks/first_block_cache.py`).

use crate::config::{FirstBlockCacheConfig, Window};
use crate::{relative_l1, CachePolicy, CacheStats, Core, DitCall};
use burn::tensor::{backend::Backend, Tensor};
use chitu_dit::{DitError, NoHook, WanTransformer};

/// State of one (branch, expert) context.
struct State<B: Backend> {
    /// Block 0's residual at the last full compute (the reference for the next decision).
    head_residual: Option<Tensor<B, 3>>,
    /// Output of the last block minus output of block 0, at the last full compute.
    tail_residual: Option<Tensor<B, 3>>,
}

impl<B: Backend> Default for State<B> {
    fn default() -> Self {
        Self {
            head_residual: None,
            tail_residual: None,
        }
    }
}

/// First Block Cache: always runs block 0; when the relative mean-absolute change of its
/// residual since the last full compute is at most the threshold, adds the stored residual of the
/// remaining blocks instead of running them.
pub struct FirstBlockCache<B: Backend> {
    config: FirstBlockCacheConfig,
    core: Core<State<B>>,
}

impl<B: Backend> FirstBlockCache<B> {
    pub fn new(config: FirstBlockCacheConfig) -> Self {
        Self {
            config,
            core: Core::new(),
        }
    }
}

impl<B: Backend> CachePolicy<B> for FirstBlockCache<B> {
    fn name(&self) -> &'static str {
        "first_block_cache"
    }

    fn forward(
        &mut self,
        model: &WanTransformer<B>,
        call: DitCall,
        x: Tensor<B, 5>,
        timestep: f64,
        context: Tensor<B, 3>,
    ) -> Result<Tensor<B, 5>, DitError> {
        let e = model.embed(x, &[timestep], context)?;
        let attn = &model.config.attention;
        let num_blocks = model.blocks.len();
        let window = Window::new(self.config.warmup, self.config.cooldown);
        let head_out = model.forward_blocks(e.tokens.clone(), &e.inputs, 0..1.min(num_blocks), attn, &mut NoHook);
        let head_residual = head_out.clone() - e.tokens;
        let (state, stats) = self.core.context(&call);

        let skip = !window.forces(call.step, call.num_steps)
            && self.config.threshold > 0.0
            && num_blocks > 1
            && match (&state.head_residual, &state.tail_residual) {
                (Some(prev), Some(_)) => {
                    relative_l1(head_residual.clone(), prev.clone()).is_some_and(|d| d <= self.config.threshold)
                }
                _ => false,
            };

        let tokens = match (&state.tail_residual, skip) {
            (Some(tail), true) => {
                stats.record(num_blocks, num_blocks - 1, 0);
                head_out + tail.clone()
            }
            _ => {
                let out = model.forward_blocks(head_out.clone(), &e.inputs, 1..num_blocks, attn, &mut NoHook);
                state.head_residual = Some(head_residual);
                state.tail_residual = Some(out.clone() - head_out);
                stats.record(num_blocks, 0, 0);
                out
            }
        };
        Ok(model.head(tokens, e.temb, e.grid))
    }

    fn stats(&self) -> CacheStats {
        self.core.stats()
    }

    fn reset(&mut self) {
        self.core.reset()
    }
}
