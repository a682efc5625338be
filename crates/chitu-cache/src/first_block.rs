//! First Block Cache (diffusers' `hooks/first_block_cache.py`).

use crate::config::{FirstBlockCacheConfig, Window};
use crate::{CacheRule, DitInput, Policy, RuleContext, Velocity};
use burn::tensor::{backend::Backend, Tensor};
use chitu_dit::{DitRunner, NoHook};

/// State of one (branch, expert) context.
pub struct State<B: Backend> {
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
pub type FirstBlockCache<B> = Policy<B, FirstBlockCacheConfig>;

impl<B: Backend> CacheRule<B> for FirstBlockCacheConfig {
    const NAME: &'static str = "first_block_cache";
    type State = State<B>;

    fn run(&self, dit: &DitRunner<B>, input: DitInput<B>, ctx: RuleContext<'_, State<B>>) -> Velocity<B> {
        let RuleContext { call, state, stats } = ctx;
        let e = dit.embed_at(input.x, &[input.timestep], input.first_frame, input.context)?;
        let num_blocks = dit.num_blocks();
        let window = Window::new(self.warmup, self.cooldown);
        let head_out = dit.blocks(e.tokens.clone(), &e.inputs, 0..1.min(num_blocks), &mut NoHook);
        let head_residual = head_out.clone() - e.tokens.clone();

        // Every rank of a sharded run measures the whole sequence, so all take the same branch.
        let skip = !window.forces(call.step, call.num_steps)
            && self.threshold > 0.0
            && num_blocks > 1
            && match (&state.head_residual, &state.tail_residual) {
                (Some(prev), Some(_)) => dit
                    .relative_l1(head_residual.clone(), prev.clone(), &e)?
                    .is_some_and(|d| d <= self.threshold),
                _ => false,
            };

        let tokens = match (&state.tail_residual, skip) {
            (Some(tail), true) => {
                stats.record(num_blocks, num_blocks - 1, 0);
                head_out + tail.clone()
            }
            _ => {
                let out = dit.blocks(head_out.clone(), &e.inputs, 1..num_blocks, &mut NoHook);
                state.head_residual = Some(head_residual);
                state.tail_residual = Some(out.clone() - head_out);
                stats.record(num_blocks, 0, 0);
                out
            }
        };
        dit.head(tokens, &e)
    }
}
