//! Ulysses sequence parallelism as an attention seam: a rank holding one share of the tokens
//! runs every self-attention through all-to-alls around the local kernel.

use crate::attention::{AttentionOp, SelfAttentionWrap};
use burn::tensor::{backend::Backend, Bool, Tensor, TensorData};
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
    pub(crate) failure: Arc<Mutex<Option<(&'static str, CollectiveError)>>>,
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

    pub(crate) fn fail(&self, during: &'static str, error: CollectiveError) {
        let mut slot = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert((during, error));
    }

    pub(crate) fn failed(&self) -> Option<(&'static str, CollectiveError)> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Ulysses attention: all-to-all from sequence shards to head shards, the local kernel over the
/// whole sequence with pad keys masked, and all-to-all back.
impl<B: Backend> SelfAttentionWrap<B> for SeqShard<B> {
    fn attend(&self, local: &dyn AttentionOp<B>, q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, s, heads, d] = q.dims();
        if self.failed().is_some() {
            return Tensor::zeros([b, s, heads, d], &q.device());
        }
        let n = self.group.size();
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
        let group = &self.group;
        let run = || -> Result<Tensor<B, 4>, CollectiveError> {
            // q, k and v travel in one all-to-all, side by side along the channels.
            let qkv = group.all_to_all(pad(Tensor::cat(vec![q.clone(), k, v], 3)), 2, 1)?;
            let (q, k, v) = (
                qkv.clone().narrow(3, 0, d),
                qkv.clone().narrow(3, d, d),
                qkv.narrow(3, 2 * d, d),
            );
            let total = q.dims()[1];
            let mask = (total > self.seq_len).then(|| {
                let flags: Vec<bool> = (0..total).map(|i| i >= self.seq_len).collect();
                Tensor::<B, 1, Bool>::from_data(TensorData::new(flags, [total]), &q.device())
                    .reshape([1, total])
                    .expand([b, total])
            });
            let out = local.attend(q, k, v, mask);
            Ok(group.all_to_all(out, 1, 2)?.narrow(2, 0, heads))
        };
        match run() {
            Ok(out) => out,
            Err(e) => {
                self.fail("context-parallel self-attention", e);
                Tensor::zeros([b, s, heads, d], &q.device())
            }
        }
    }
}
