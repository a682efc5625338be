//! Pyramid Attention Broadcast (Chitu's `flexcache/strategy/pab.py`).

use crate::config::{PabConfig, Window};
use crate::{CacheRule, DitCall, DitInput, Policy, RuleContext, Velocity};
use burn::tensor::{backend::Backend, Tensor};
use chitu_dit::{BlockHook, BlockPart, DitRunner};
use std::collections::HashMap;

/// Whether PAB computes `part` at `step` of `num_steps`: always inside the warmup/cooldown window,
/// else self-attention every `skip_self_range` and cross-attention every `skip_cross_range` steps
/// counted from the end of the warmup. The FFN is always computed.
pub fn pab_computes(config: &PabConfig, part: BlockPart, step: usize, num_steps: usize) -> bool {
    let range = match part {
        BlockPart::SelfAttn => config.skip_self_range,
        BlockPart::CrossAttn => config.skip_cross_range,
        BlockPart::Ffn => return true,
    };
    let window = Window::new(config.warmup, config.cooldown);
    window.forces(step, num_steps) || range <= 1 || (step - config.warmup).is_multiple_of(range)
}

/// Attention outputs of one (branch, expert) context, by block and kind.
type Stored<B> = HashMap<(usize, BlockPart), Tensor<B, 3>>;

/// PAB: reuses each block's self- and cross-attention output between scheduled recomputes.
pub type Pab<B> = Policy<B, PabConfig>;

struct Hook<'a, B: Backend> {
    config: &'a PabConfig,
    stored: &'a mut Stored<B>,
    call: DitCall,
    reused: usize,
}

impl<B: Backend> BlockHook<B> for Hook<'_, B> {
    fn part(&mut self, block: usize, part: BlockPart, compute: &mut dyn FnMut() -> Tensor<B, 3>) -> Tensor<B, 3> {
        if !pab_computes(self.config, part, self.call.step, self.call.num_steps) {
            if let Some(out) = self.stored.get(&(block, part)) {
                self.reused += 1;
                return out.clone();
            }
        }
        let out = compute();
        if part != BlockPart::Ffn {
            self.stored.insert((block, part), out.clone());
        }
        out
    }
}

impl<B: Backend> CacheRule<B> for PabConfig {
    const NAME: &'static str = "pab";
    type State = Stored<B>;

    fn run(&self, dit: &DitRunner<B>, input: DitInput<B>, ctx: RuleContext<'_, Stored<B>>) -> Velocity<B> {
        let RuleContext {
            call,
            state: stored,
            stats,
        } = ctx;
        let mut hook = Hook {
            config: self,
            stored,
            call,
            reused: 0,
        };
        let out = dit.forward_at(input.x, &[input.timestep], input.first_frame, input.context, &mut hook)?;
        let reused = hook.reused;
        stats.record(dit.num_blocks(), 0, reused);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn computed(config: &PabConfig, part: BlockPart, n: usize) -> Vec<usize> {
        (0..n).filter(|&s| pab_computes(config, part, s, n)).collect()
    }

    #[test]
    fn chitu_defaults_on_twenty_steps() {
        // Window 0..5 and 15..20; in between self-attention every 2nd, cross-attention every 3rd
        // step counted from step 5.
        let c = PabConfig::default();
        let window: Vec<usize> = (0..5).chain(15..20).collect();
        let with = |mid: &[usize]| {
            let mut v = window.clone();
            v.extend_from_slice(mid);
            v.sort();
            v
        };
        assert_eq!(computed(&c, BlockPart::SelfAttn, 20), with(&[5, 7, 9, 11, 13]));
        assert_eq!(computed(&c, BlockPart::CrossAttn, 20), with(&[5, 8, 11, 14]));
        assert_eq!(computed(&c, BlockPart::Ffn, 20), (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn a_window_wider_than_the_run_computes_everything() {
        let c = PabConfig::default();
        assert_eq!(computed(&c, BlockPart::SelfAttn, 10), (0..10).collect::<Vec<_>>());
        assert_eq!(computed(&c, BlockPart::CrossAttn, 3), vec![0, 1, 2]);
    }

    #[test]
    fn ranges_of_one_compute_every_step() {
        let c = PabConfig {
            warmup: 0,
            cooldown: 0,
            skip_self_range: 1,
            skip_cross_range: 1,
        };
        assert_eq!(computed(&c, BlockPart::SelfAttn, 7), (0..7).collect::<Vec<_>>());
        assert_eq!(computed(&c, BlockPart::CrossAttn, 7), (0..7).collect::<Vec<_>>());
    }
}
