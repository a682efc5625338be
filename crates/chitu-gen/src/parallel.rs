//! A context-parallel group as the DiT's sequence-parallel seam: the one place where the models
//! meet the communicators, so that chitu-dist depends on no model crate.

use crate::{DiffusionUserParams, GenError};
use burn::tensor::{backend::Backend, Tensor};
use chitu_cache::Branch;
use chitu_dist::{Communicator, Mesh, TensorComm};
use chitu_dit::{CollectiveError, DitRunner, SeqParallel, WanTransformer};
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

fn shared(e: chitu_dist::CommError) -> CollectiveError {
    Arc::new(e)
}

impl<B: Backend> SeqParallel<B> for UlyssesGroup<B> {
    fn size(&self) -> usize {
        self.comm.world_size()
    }
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn all_to_all(
        &self,
        x: Tensor<B, 4>,
        scatter_dim: usize,
        gather_dim: usize,
    ) -> Result<Tensor<B, 4>, CollectiveError> {
        self.comm.all_to_all(x, scatter_dim, gather_dim).map_err(shared)
    }
    fn all_gather(&self, x: Tensor<B, 3>, dim: usize) -> Result<Tensor<B, 3>, CollectiveError> {
        self.comm.all_gather(x, dim).map_err(shared)
    }
    fn all_sum(&self, values: &[f64]) -> Result<Vec<f64>, CollectiveError> {
        self.comm.all_sum(values).map_err(shared)
    }
}

/// This rank's place in a parallel run, and what the pipeline asks of it.
pub(crate) struct Parallel<B: Backend> {
    pub mesh: Mesh,
    /// The context-parallel group as the DiT's sequence-parallel seam.
    seq: Arc<dyn SeqParallel<B>>,
}

impl<B: Backend> Parallel<B> {
    /// The rank's parallel state; `None` for a world of one.
    pub fn new(mesh: Mesh) -> Option<Self> {
        let seq: Arc<dyn SeqParallel<B>> = Arc::new(UlyssesGroup::<B>::new(mesh.cp.clone()));
        (mesh.layout.world() > 1).then_some(Self { mesh, seq })
    }

    /// The one guidance branch this rank runs under CFG parallelism, for a request with guidance.
    pub fn cfg_branch(&self, params: &DiffusionUserParams) -> Option<Branch> {
        (self.mesh.layout.cfg == 2 && params.cfg()).then(|| match self.mesh.cfg.rank() {
            0 => Branch::Cond,
            _ => Branch::Uncond,
        })
    }

    /// The DiT runner of `model` on this rank: sharded over the CP group, or local.
    pub fn runner<'a>(&self, model: &'a WanTransformer<B>) -> DitRunner<'a, B> {
        match self.mesh.layout.cp > 1 {
            true => DitRunner::sharded(model, self.seq.clone()),
            false => DitRunner::local(model),
        }
    }

    /// Both branches' predictions from this rank's one: `(cond, uncond)` on both ranks of the pair.
    pub fn gather_cfg(&self, mine: Tensor<B, 5>, step: usize) -> Result<(Tensor<B, 5>, Tensor<B, 5>), GenError> {
        let both = self.mesh.cfg.all_gather(mine, 0).map_err(|source| GenError::Parallel {
            during: format!("denoise step {step}: gathering the CFG branches"),
            source,
        })?;
        Ok((both.clone().narrow(0, 0, 1), both.narrow(0, 1, 1)))
    }
}
