//! Running the DiT on one device or sharded over a sequence-parallel group (Ulysses).
//!
//! [`DitRunner`] is what the denoise loop and the FlexCache policies call: on one device it is
//! the plain model; given a [`SeqParallel`] group it splits the patch tokens across the ranks
//! after the patch embedding (padding the sequence to a multiple of the group size), gives each
//! rank the RoPE angles of its own tokens, turns every self-attention into Ulysses all-to-alls
//! around the local kernel with the pad keys masked, and gathers the tokens before the head.
//! Cross-attention stays local: the text is replicated on every rank.

use crate::block::{BlockHook, BlockInputs};
use crate::embed::RopeTables;
use crate::model::{Embedded, ROPE_THETA};
use crate::ulysses::{SeqParallel, SeqShard};
use crate::{DitError, WanDitConfig, WanTransformer};
use burn::tensor::{backend::Backend, ElementConversion, Tensor};
use std::ops::Range;
use std::sync::{Arc, Mutex};

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
        self.embed_at(x, timesteps, None, context)
    }

    /// [`WanTransformer::embed_at`] (latent frame 0 at its own timestep), keeping only this
    /// rank's tokens.
    pub fn embed_at(
        &self,
        x: Tensor<B, 5>,
        timesteps: &[f64],
        first_frame: Option<f64>,
        context: Tensor<B, 3>,
    ) -> Result<Embedded<B>, DitError> {
        let Some(group) = &self.group else {
            return self.model.embed_at(x, timesteps, first_frame, context);
        };
        let (tokens, mut e) = self.model.embed_without_rope(x, timesteps, first_frame, context)?;
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
        // Frame 0's tokens are a prefix of the sequence, so of this rank's share too.
        e.inputs.first = e.inputs.first.take().map(|(k, e0)| {
            let local = k.min(range.end).saturating_sub(range.start).min(local_len);
            (local, e0)
        });
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
        e.inputs.self_attention = Some(Arc::new(shard.clone()));
        e.shard = Some(shard);
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
        let x = match &e.shard {
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
        Ok(self.model.head_at(x, e.temb.clone(), e.first.clone(), e.grid))
    }

    /// The whole forward with `hook` deciding each sub-layer.
    pub fn forward(
        &self,
        x: Tensor<B, 5>,
        timesteps: &[f64],
        context: Tensor<B, 3>,
        hook: &mut dyn BlockHook<B>,
    ) -> Result<Tensor<B, 5>, DitError> {
        self.forward_at(x, timesteps, None, context, hook)
    }

    /// [`DitRunner::forward`] with latent frame 0 at its own timestep.
    pub fn forward_at(
        &self,
        x: Tensor<B, 5>,
        timesteps: &[f64],
        first_frame: Option<f64>,
        context: Tensor<B, 3>,
        hook: &mut dyn BlockHook<B>,
    ) -> Result<Tensor<B, 5>, DitError> {
        let e = self.embed_at(x, timesteps, first_frame, context)?;
        let out = self.blocks(e.tokens.clone(), &e.inputs, 0..self.num_blocks(), hook);
        self.head(out, &e)
    }

    /// `mean|x - prev| / mean|prev|` over the real tokens of the whole sequence, the same number
    /// on every rank (cache decisions must agree, or the ranks' collectives fall out of step);
    /// `None` when `prev` is (nearly) all zeros.
    pub fn relative_l1(&self, x: Tensor<B, 3>, prev: Tensor<B, 3>, e: &Embedded<B>) -> Result<Option<f64>, DitError> {
        let real = e.shard.as_ref().map_or(x.dims()[1], |s| s.real_local_len());
        let sum = |t: Tensor<B, 3>| -> f64 { t.abs().sum().into_scalar().elem() };
        // A rank holding only padding contributes nothing.
        let local = if real == 0 {
            [0.0, 0.0]
        } else {
            let (x, prev) = (x.narrow(1, 0, real), prev.narrow(1, 0, real));
            [sum(x - prev.clone()), sum(prev)]
        };
        let [diff, scale] = match &e.shard {
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
