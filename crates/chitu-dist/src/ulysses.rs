//! A context-parallel group as the DiT's sequence-parallel seam.

use crate::{Communicator, TensorComm};
use burn::tensor::{backend::Backend, Tensor};
use chitu_dit::SeqParallel;
use std::marker::PhantomData;
use std::sync::Arc;

/// Ulysses sequence parallelism over a communicator: the DiT splits its tokens over the group's
/// ranks and calls these collectives around every self-attention and before the head.
pub struct UlyssesGroup<B> {
    comm: Arc<dyn Communicator>,
    _backend: PhantomData<fn() -> B>,
}

impl<B> UlyssesGroup<B> {
    /// The group of `comm`'s ranks.
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self {
            comm,
            _backend: PhantomData,
        }
    }
}

impl<B: Backend> SeqParallel<B> for UlyssesGroup<B> {
    fn size(&self) -> usize {
        self.comm.world_size()
    }
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn all_to_all(&self, x: Tensor<B, 4>, scatter_dim: usize, gather_dim: usize) -> Result<Tensor<B, 4>, String> {
        self.comm
            .all_to_all(x, scatter_dim, gather_dim)
            .map_err(|e| e.to_string())
    }
    fn all_gather(&self, x: Tensor<B, 3>, dim: usize) -> Result<Tensor<B, 3>, String> {
        self.comm.all_gather(x, dim).map_err(|e| e.to_string())
    }
    fn all_sum(&self, values: &[f64]) -> Result<Vec<f64>, String> {
        self.comm.all_sum(values).map_err(|e| e.to_string())
    }
}
