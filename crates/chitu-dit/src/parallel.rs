//! Running the DiT on one device or sharded over a sequence-parallel group (Ulysses).
//!
//! [`DitRunner`] is what the denoise loop and the FlexCache policies call: on one device it is
//! the plain model; given a [`SeqParallel`] group it splits the patch tokens across the ranks
//! after the patch embedding (padding the sequence to a multiple of the group size), gives each
//! rank the RoPE angles of its own tokens, turns every self-attention into Ulysses all-to-alls
//! around the local kernel with the pad keys masked, and gathers the tokens before the head.
//! Cross-attention stays local: the text is replicated on every rank.

use crate::attention::AttentionOp;
use crate::block::{BlockHook, BlockInputs};
use crate::embed::RopeTables;
use crate::model::{Embedded, ROPE_THETA};
use crate::{DitError, WanDitConfig, WanTransformer};
use burn::tensor::{backend::Backend, Bool, ElementConversion, Tensor, TensorData};
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Why a collective failed (a dead or stuck rank, a transport failure): the communicator's own
/// error, shared so that every later use of a failed forward reports the same one.
pub type CollectiveError = Arc<dyn std::error::Error + Send + Sync>;

/// A sequence-parallel group as the DiT sees it; chitu-gen implements it over a communicator.
pub trait SeqParallel<B: Backend>: Send + Sync {
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// This rank's index in the group.
    fn rank(&self) -> usize;
    /// Splits `x` in `size()` equal chunks along `scatter_dim`, sends chunk `j` to rank `j`, and
    /// concatenates what every rank sent here along `gather_dim`, in rank order.
    fn all_to_all(
        &self,
        x: Tensor<B, 4>,
        scatter_dim: usize,
        gather_dim: usize,
    ) -> Result<Tensor<B, 4>, CollectiveError>;
    /// Concatenates every rank's `x` along `dim`, in rank order.
    fn all_gather(&self, x: Tensor<B, 3>, dim: usize) -> Result<Tensor<B, 3>, CollectiveError>;
    /// Element-wise sums of small host vectors over the group.
    fn all_sum(&self, values: &[f64]) -> Result<Vec<f64>, CollectiveError>;
}

/// Which tokens of the sequence this rank holds, and the group it shares them with.
#[derive(Clone)]
pub struct SeqShard<B: Backend> {
    /// The group.
    pub group: Arc<dyn SeqParallel<B>>,
    /// Real tokens of the whole sequence.
    pub seq_len: usize,
    /// Tokens per rank after padding the sequence to a multiple of the group size.
    pub local_len: usize,
    /// The first communication failure of this forward; later collectives are skipped so that a
    /// dead peer costs one timeout, not one per layer.
    failure: Arc<Mutex<Option<(&'static str, CollectiveError)>>>,
}

impl<B: Backend> std::fmt::Debug for SeqShard<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqShard")
            .field("rank", &self.group.rank())
            .field("size", &self.group.size())
            .field("seq_len", &self.seq_len)
            .field("local_len", &self.local_len)
            .finish()
    }
}

impl<B: Backend> SeqShard<B> {
    /// Global token indices of this rank (pad positions included).
    pub fn range(&self) -> Range<usize> {
        let start = self.group.rank() * self.local_len;
        start..start + self.local_len
    }

    /// How many of this rank's tokens are real (the rest are padding at the sequence end).
    pub fn real_local_len(&self) -> usize {
        self.seq_len.saturating_sub(self.range().start).min(self.local_len)
    }

    fn fail(&self, during: &'static str, error: CollectiveError) {
        let mut slot = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert((during, error));
    }

    fn failed(&self) -> Option<(&'static str, CollectiveError)> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The self-attention of a block under this shard.
    pub(crate) fn ulysses<'a>(&'a self, local: &'a dyn AttentionOp<B>) -> Ulysses<'a, B> {
        Ulysses { shard: self, local }
    }
}

/// Ulysses attention: all-to-all from sequence shards to head shards, the local kernel over the
/// whole sequence with pad keys masked, and all-to-all back.
pub(crate) struct Ulysses<'a, B: Backend> {
    shard: &'a SeqShard<B>,
    local: &'a dyn AttentionOp<B>,
}

impl<B: Backend> AttentionOp<B> for Ulysses<'_, B> {
    fn attend(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        _key_padding: Option<Tensor<B, 2, Bool>>,
    ) -> Tensor<B, 4> {
        let [b, s, heads, d] = q.dims();
        if self.shard.failed().is_some() {
            return Tensor::zeros([b, s, heads, d], &q.device());
        }
        let n = self.shard.group.size();
        // Heads that the group does not divide get zero heads appended; their outputs are dropped.
        let padded_heads = heads.div_ceil(n) * n;
        let pad = |t: Tensor<B, 4>| {
            if padded_heads == heads {
                t
            } else {
                let zeros = Tensor::zeros([b, s, padded_heads - heads, t.dims()[3]], &t.device());
                Tensor::cat(vec![t, zeros], 2)
            }
        };
        let group = &self.shard.group;
        let run = || -> Result<Tensor<B, 4>, CollectiveError> {
            // q, k and v travel in one all-to-all, side by side along the channels.
            let qkv = group.all_to_all(pad(Tensor::cat(vec![q.clone(), k, v], 3)), 2, 1)?;
            let (q, k, v) = (
                qkv.clone().narrow(3, 0, d),
                qkv.clone().narrow(3, d, d),
                qkv.narrow(3, 2 * d, d),
            );
            let total = q.dims()[1];
            let mask = (total > self.shard.seq_len).then(|| {
                let flags: Vec<bool> = (0..total).map(|i| i >= self.shard.seq_len).collect();
                Tensor::<B, 1, Bool>::from_data(TensorData::new(flags, [total]), &q.device())
                    .reshape([1, total])
                    .expand([b, total])
            });
            let out = self.local.attend(q, k, v, mask);
            Ok(group.all_to_all(out, 1, 2)?.narrow(2, 0, heads))
        };
        match run() {
            Ok(out) => out,
            Err(e) => {
                self.shard.fail("context-parallel self-attention", e);
                Tensor::zeros([b, s, heads, d], &q.device())
            }
        }
    }
}

/// Runs a [`WanTransformer`] in pieces, on one device or sharded over a sequence-parallel group.
pub struct DitRunner<'a, B: Backend> {
    /// The model.
    pub model: &'a WanTransformer<B>,
    group: Option<Arc<dyn SeqParallel<B>>>,
}

impl<'a, B: Backend> DitRunner<'a, B> {
    /// The model on one device.
    pub fn local(model: &'a WanTransformer<B>) -> Self {
        Self { model, group: None }
    }

    /// The model with its tokens split over `group` (a group of one is the local run).
    pub fn sharded(model: &'a WanTransformer<B>, group: Arc<dyn SeqParallel<B>>) -> Self {
        let group = (group.size() > 1).then_some(group);
        Self { model, group }
    }

    /// The model's config.
    pub fn config(&self) -> &WanDitConfig {
        &self.model.config
    }

    /// Transformer blocks in the model.
    pub fn num_blocks(&self) -> usize {
        self.model.blocks.len()
    }

    /// [`WanTransformer::embed`], keeping only this rank's tokens (and their RoPE angles).
    pub fn embed(&self, x: Tensor<B, 5>, timesteps: &[f64], context: Tensor<B, 3>) -> Result<Embedded<B>, DitError> {
        let Some(group) = &self.group else {
            return self.model.embed(x, timesteps, context);
        };
        let (tokens, mut e) = self.model.embed_without_rope(x, timesteps, context)?;
        let [b, seq_len, dim] = tokens.dims();
        let n = group.size();
        let local_len = seq_len.div_ceil(n);
        let shard = SeqShard {
            group: group.clone(),
            seq_len,
            local_len,
            failure: Arc::new(Mutex::new(None)),
        };
        let range = shard.range();
        let padded = local_len * n;
        let tokens = if padded > seq_len {
            Tensor::cat(
                vec![tokens, Tensor::zeros([b, padded - seq_len, dim], &e.temb.device())],
                1,
            )
        } else {
            tokens
        };
        e.tokens = tokens.narrow(1, range.start, local_len);
        e.inputs.rope = RopeTables::new(e.grid, self.model.config.head_dim, ROPE_THETA, range, &e.temb.device());
        e.inputs.shard = Some(shard);
        Ok(e)
    }

    /// Blocks `range` on this rank's tokens, with the model's attention kernel.
    pub fn blocks(
        &self,
        x: Tensor<B, 3>,
        inputs: &BlockInputs<B>,
        range: Range<usize>,
        hook: &mut dyn BlockHook<B>,
    ) -> Tensor<B, 3> {
        self.model
            .forward_blocks(x, inputs, range, &self.model.config.attention, hook)
    }

    /// Gathers the tokens of every rank (dropping the padding) and runs the output head.
    pub fn head(&self, x: Tensor<B, 3>, e: &Embedded<B>) -> Result<Tensor<B, 5>, DitError> {
        let x = match &e.inputs.shard {
            None => x,
            Some(shard) => {
                if let Some((during, source)) = shard.failed() {
                    return Err(DitError::Parallel { during, source });
                }
                let all = shard.group.all_gather(x, 1).map_err(|source| DitError::Parallel {
                    during: "gathering the tokens before the head",
                    source,
                })?;
                all.narrow(1, 0, shard.seq_len)
            }
        };
        Ok(self.model.head(x, e.temb.clone(), e.grid))
    }

    /// The whole forward with `hook` deciding each sub-layer.
    pub fn forward(
        &self,
        x: Tensor<B, 5>,
        timesteps: &[f64],
        context: Tensor<B, 3>,
        hook: &mut dyn BlockHook<B>,
    ) -> Result<Tensor<B, 5>, DitError> {
        let e = self.embed(x, timesteps, context)?;
        let out = self.blocks(e.tokens.clone(), &e.inputs, 0..self.num_blocks(), hook);
        self.head(out, &e)
    }

    /// `mean|x - prev| / mean|prev|` over the real tokens of the whole sequence, the same number
    /// on every rank (cache decisions must agree, or the ranks' collectives fall out of step);
    /// `None` when `prev` is (nearly) all zeros.
    pub fn relative_l1(&self, x: Tensor<B, 3>, prev: Tensor<B, 3>, e: &Embedded<B>) -> Result<Option<f64>, DitError> {
        let real = e.inputs.shard.as_ref().map_or(x.dims()[1], |s| s.real_local_len());
        let sum = |t: Tensor<B, 3>| -> f64 { t.abs().sum().into_scalar().elem() };
        // A rank holding only padding contributes nothing.
        let local = if real == 0 {
            [0.0, 0.0]
        } else {
            let (x, prev) = (x.narrow(1, 0, real), prev.narrow(1, 0, real));
            [sum(x - prev.clone()), sum(prev)]
        };
        let [diff, scale] = match &e.inputs.shard {
            Some(shard) => {
                let total = shard.group.all_sum(&local).map_err(|source| DitError::Parallel {
                    during: "agreeing on a cache decision",
                    source,
                })?;
                [total[0], total[1]]
            }
            None => local,
        };
        let count = e.grid.iter().product::<usize>() * self.model.config.dim() * e.temb.dims()[0];
        Ok((scale / count as f64 >= 1e-8).then(|| diff / scale))
    }
}
