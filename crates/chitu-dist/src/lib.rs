//! Parallelism for chitu: CFG parallelism and Ulysses context parallelism over real
//! communication engines.
//!
//! One object-safe [`Communicator`] trait moves [`TensorData`] between ranks; [`TensorComm`] adds
//! the tensor collectives (`all_gather`, `all_to_all`, `broadcast`) to every communicator. The
//! engines:
//! - [`LocalComm`]: in-process ranks, one thread each, exchanging host data through channels; the
//!   single-node path (one burn device per thread), tested on CPU.
//! - `MpiComm` (feature `mpi`): one process per rank over the system's MPI, launched with `mpirun`.
//! - `NcclComm` (feature `nccl`): NCCL collectives on CUDA devices.
//!
//! [`Mesh`] splits a world the way Chitu does: ranks `i` and `i + W/2` form a CFG pair, and each
//! half is a context-parallel group. The crate knows nothing of models: chitu-gen's
//! `UlyssesGroup` turns a CP group into the DiT's sequence-parallel seam.
//!
//! ```
//! use chitu_dist::{run_local, Communicator, TensorComm};
//! use burn::tensor::Tensor;
//! type B = burn_flex::Flex;
//! let sums = run_local(2, |comm| {
//!     let dev = Default::default();
//!     let mine = Tensor::<B, 1>::from_floats([comm.rank() as f32], &dev);
//!     let all = comm.all_gather(mine, 0)?;
//!     Ok(all.sum().into_scalar())
//! })
//! .unwrap();
//! assert_eq!(sums, vec![1.0, 1.0]);
//! ```

#![warn(missing_docs)]

mod comm;
mod local;
mod mesh;
#[cfg(feature = "mpi")]
mod mpi_comm;
#[cfg(feature = "nccl")]
mod nccl_comm;
mod wire;

pub use comm::{Communicator, SubGroup, TensorComm};
pub use local::{run_local, run_local_with, LocalComm, DEFAULT_TIMEOUT};
pub use mesh::{Layout, Mesh};
#[cfg(feature = "mpi")]
pub use mpi_comm::MpiComm;
#[cfg(feature = "nccl")]
pub use nccl_comm::NcclComm;
pub use wire::{decode, encode};

pub use burn::tensor::TensorData;

/// Errors of communication and of parallel layouts.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommError {
    /// A peer sent nothing within the timeout (stuck, or far behind).
    #[error("rank {rank}: no message from rank {peer} within {secs:.0} s ({op}); a peer may be stuck or dead")]
    Timeout {
        /// The waiting rank.
        rank: usize,
        /// The rank it waited for.
        peer: usize,
        /// The timeout, in seconds.
        secs: f64,
        /// The collective it was in.
        op: &'static str,
    },
    /// A peer is gone (its thread or process ended).
    #[error("rank {rank}: rank {peer} is gone ({op}); it stopped or failed mid-run")]
    PeerGone {
        /// The rank that noticed.
        rank: usize,
        /// The rank that is gone.
        peer: usize,
        /// The collective it was in.
        op: &'static str,
    },
    /// The ranks called different collectives, or sent data of unexpected shape.
    #[error("collectives out of step: {0}")]
    Mismatch(String),
    /// The world does not factor into the requested layout, or a group is invalid.
    #[error("invalid parallel layout: {0}")]
    Layout(String),
    /// The transport (MPI, NCCL, encoding) failed.
    #[error("transport: {0}")]
    Transport(String),
    /// A rank's own work failed (in-process ranks report it to the caller).
    #[error("rank {rank} failed: {message}")]
    Rank {
        /// The failed rank.
        rank: usize,
        /// Its error.
        message: String,
    },
}
