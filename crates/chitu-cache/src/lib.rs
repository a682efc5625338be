//! FlexCache: feature-cache policies for the Wan DiT.
//!
//! A [`CachePolicy`] runs one DiT call and decides what to compute and what to reuse. It sees the
//! model in pieces through a [`DitRunner`] ([`DitRunner::embed`], [`DitRunner::blocks`],
//! [`DitRunner::head`]), on one device or sharded over a context-parallel group, and each
//! sub-layer through a [`chitu_dit::BlockHook`]. Every policy keeps
//! separate state per CFG branch and per expert ([`DitCall`]), always computes the steps of its
//! warmup and cooldown [`Window`], and counts its work in [`CacheStats`].
//!
//! | policy | skips | decided by |
//! |---|---|---|
//! | [`TeaCacheConfig`] | all blocks | accumulated rescaled change of `e0`/`temb` |
//! | [`PabConfig`] | attention outputs | fixed step ranges |
//! | [`FirstBlockCacheConfig`] | blocks 1.. | change of block 0's residual |
//! | [`TaylorSeerConfig`] | attention and FFN outputs (forecast) | fixed interval |
//!
//! ```no_run
//! # use burn_flex::Flex;
//! use chitu_cache::{Branch, CacheConfig, DitCall, DitInput};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let device = Default::default();
//! # let dit = chitu_dit::WanTransformer::<Flex>::from_dir("transformer", &device)?;
//! # let (latents, text) = (burn::tensor::Tensor::zeros([1, 16, 2, 4, 4], &device), burn::tensor::Tensor::zeros([1, 8, 32], &device));
//! let mut cache = chitu_cache::build::<Flex>(&CacheConfig::parse("teacache")?)?;
//! let call = DitCall { step: 0, num_steps: 50, branch: Branch::Cond, expert: 0 };
//! let input = DitInput::new(latents, 999.0, text);
//! let velocity = cache.forward(&chitu_dit::DitRunner::local(&dit), call, input)?;
//! println!("{:?}", cache.stats());
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod config;
mod first_block;
mod pab;
pub mod quality;
mod taylorseer;
mod teacache;

pub use config::{
    polyval, CacheConfig, FirstBlockCacheConfig, PabConfig, TaylorSeerConfig, TeaCacheConfig, TeaCacheMode, Window,
};
pub use first_block::FirstBlockCache;
pub use pab::{pab_computes, Pab};
pub use taylorseer::{taylorseer_computes, TaylorSeer};
pub use teacache::TeaCache;

use burn::tensor::{backend::Backend, ElementConversion, Tensor};
use chitu_dit::{DitError, DitRunner};
use std::collections::HashMap;

/// Errors of the cache crate.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The cache settings are invalid.
    #[error("invalid cache config: {0}")]
    Config(String),
}

/// The classifier-free-guidance branch a DiT call belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Branch {
    /// Conditioned on the prompt.
    Cond,
    /// Conditioned on the negative prompt.
    Uncond,
}

/// Where a DiT call sits in a run; policies key their state by `(branch, expert)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DitCall {
    /// The denoise step, from 0.
    pub step: usize,
    /// Steps in the run (for the cooldown).
    pub num_steps: usize,
    /// The guidance branch of the call.
    pub branch: Branch,
    /// Index of the model in the pool (Wan2.2's high-noise expert is 0, low-noise 1).
    pub expert: usize,
}

/// What a policy computed and what it reused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// DiT calls seen.
    pub calls: usize,
    /// Calls that computed every sub-layer of every block.
    pub full_computes: usize,
    /// Whole blocks skipped (TeaCache, First Block Cache).
    pub reused_blocks: usize,
    /// Single sub-layer outputs (self-attention, cross-attention, FFN) reused or forecast.
    pub reused_parts: usize,
    /// Blocks in the model.
    pub num_blocks: usize,
}

/// Sub-layers per block that a policy may reuse (self-attention, cross-attention, FFN).
pub const PARTS_PER_BLOCK: usize = 3;

impl CacheStats {
    /// Block evaluations without a cache.
    pub fn uncached_block_evals(&self) -> usize {
        self.calls * self.num_blocks
    }

    /// Block evaluations done, counting a reused sub-layer as a third of a block.
    pub fn block_evals(&self) -> f64 {
        self.uncached_block_evals() as f64
            - self.reused_blocks as f64
            - self.reused_parts as f64 / PARTS_PER_BLOCK as f64
    }

    /// Uncached over cached block evaluations (1 when nothing was reused).
    pub fn block_speedup(&self) -> f64 {
        let done = self.block_evals();
        if done > 0.0 {
            self.uncached_block_evals() as f64 / done
        } else {
            1.0
        }
    }

    fn record(&mut self, num_blocks: usize, reused_blocks: usize, reused_parts: usize) {
        self.calls += 1;
        self.num_blocks = num_blocks;
        self.reused_blocks += reused_blocks;
        self.reused_parts += reused_parts;
        if reused_blocks == 0 && reused_parts == 0 {
            self.full_computes += 1;
        }
    }
}

/// A feature-cache policy: runs DiT calls, reusing what it judges unchanged.
pub trait CachePolicy<B: Backend>: Send {
    /// The policy's name.
    fn name(&self) -> &'static str;

    /// The velocity of the model `dit` runs for `input`, computing only what the policy decides
    /// for `call`.
    fn forward(&mut self, dit: &DitRunner<B>, call: DitCall, input: DitInput<B>) -> Velocity<B>;

    /// Counters so far.
    fn stats(&self) -> CacheStats;

    /// Forgets all cached features and counters (a new run).
    fn reset(&mut self);
}

/// The policy `config` describes, validated.
pub fn build<B: Backend>(config: &CacheConfig) -> Result<Box<dyn CachePolicy<B>>, CacheError> {
    config.validate()?;
    Ok(match config {
        CacheConfig::TeaCache(c) => Box::new(TeaCache::new(c.clone())),
        CacheConfig::Pab(c) => Box::new(Pab::new(c.clone())),
        CacheConfig::FirstBlockCache(c) => Box::new(FirstBlockCache::new(c.clone())),
        CacheConfig::TaylorSeer(c) => Box::new(TaylorSeer::new(c.clone())),
    })
}

/// One DiT call's inputs: latents `[1, C, F, H, W]`, the timestep and the text states.
pub struct DitInput<B: Backend> {
    /// The latents.
    pub x: Tensor<B, 5>,
    /// The timestep.
    pub timestep: f64,
    /// The text states.
    pub context: Tensor<B, 3>,
    /// The timestep of latent frame 0's tokens when it differs (Wan2.2 TI2V with an image: 0).
    pub first_frame: Option<f64>,
}

impl<B: Backend> DitInput<B> {
    /// The inputs of one call.
    pub fn new(x: Tensor<B, 5>, timestep: f64, context: Tensor<B, 3>) -> Self {
        Self {
            x,
            timestep,
            context,
            first_frame: None,
        }
    }

    /// Gives latent frame 0's tokens their own timestep.
    pub fn with_first_frame(mut self, timestep: Option<f64>) -> Self {
        self.first_frame = timestep;
        self
    }
}

/// A DiT call's velocity prediction, or why it failed.
pub type Velocity<B> = Result<Tensor<B, 5>, DitError>;

/// What a rule may touch for one call: where the call sits, its context's state, the counters.
pub struct RuleContext<'a, S> {
    /// The call.
    pub call: DitCall,
    /// The state of the call's (branch, expert) context.
    pub state: &'a mut S,
    /// The counters to record the call in.
    pub stats: &'a mut CacheStats,
}

/// What makes one policy: its settings (the rule is the policy's config), the state it keeps per
/// (branch, expert) context, and how it runs a call. [`Policy`] adds the contexts and counters.
pub trait CacheRule<B: Backend>: Send {
    /// The policy's name.
    const NAME: &'static str;
    /// What the rule keeps per context.
    type State: Default + Send;
    /// The velocity for `input`, computing only what the rule decides for `ctx.call`.
    fn run(&self, dit: &DitRunner<B>, input: DitInput<B>, ctx: RuleContext<'_, Self::State>) -> Velocity<B>;
}

/// A cache policy: a rule, with its state per (branch, expert) context and its counters.
pub struct Policy<B: Backend, R: CacheRule<B>> {
    rule: R,
    core: Core<R::State>,
}

impl<B: Backend, R: CacheRule<B>> Policy<B, R> {
    /// The policy with its settings and empty state.
    pub fn new(rule: R) -> Self {
        Self {
            rule,
            core: Core::new(),
        }
    }
}

impl<B: Backend, R: CacheRule<B>> CachePolicy<B> for Policy<B, R> {
    fn name(&self) -> &'static str {
        R::NAME
    }

    fn forward(&mut self, dit: &DitRunner<B>, call: DitCall, input: DitInput<B>) -> Velocity<B> {
        let (state, stats) = self.core.context(&call);
        self.rule.run(dit, input, RuleContext { call, state, stats })
    }

    fn stats(&self) -> CacheStats {
        self.core.stats()
    }

    fn reset(&mut self) {
        self.core.reset()
    }
}

/// What every policy keeps: its state per (branch, expert) context, and its counters.
pub(crate) struct Core<S> {
    contexts: HashMap<(Branch, usize), S>,
    stats: CacheStats,
}

impl<S: Default> Core<S> {
    pub(crate) fn new() -> Self {
        Self {
            contexts: HashMap::new(),
            stats: CacheStats::default(),
        }
    }

    /// The state of `call`'s context, and the counters to record the call in.
    pub(crate) fn context(&mut self, call: &DitCall) -> (&mut S, &mut CacheStats) {
        let state = self.contexts.entry((call.branch, call.expert)).or_default();
        (state, &mut self.stats)
    }

    pub(crate) fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Forgets every context and zeroes the counters.
    pub(crate) fn reset(&mut self) {
        self.contexts.clear();
        self.stats = CacheStats::default();
    }
}

/// `mean|x - prev| / mean|prev|`, the relative L1 change both TeaCache and First Block Cache
/// measure; `None` when `prev` is (nearly) all zeros.
pub(crate) fn relative_l1<B: Backend, const D: usize>(x: Tensor<B, D>, prev: Tensor<B, D>) -> Option<f64> {
    let scale: f64 = prev.clone().abs().mean().into_scalar().elem();
    if scale < 1e-8 {
        return None;
    }
    let diff: f64 = (x - prev).abs().mean().into_scalar().elem();
    Some(diff / scale)
}
