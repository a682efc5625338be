//! NCCL ranks: collectives between CUDA devices over NVLink/PCIe/InfiniBand.
//!
//! The unique id is shared over a bootstrap communicator (MPI or in-process ranks). Data enters
//! and leaves as host [`TensorData`] and crosses between GPUs through NCCL; handing burn-cuda's
//! device buffers to NCCL without the host copy is not done yet.

use crate::{decode, encode, CommError, Communicator};
use burn::tensor::TensorData;
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id};
use std::sync::{Arc, Mutex};

/// One rank of an NCCL communicator on one CUDA device.
pub struct NcclComm {
    comm: Mutex<Comm>,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
}

// SAFETY: the NCCL handle is only used under the mutex, one call at a time.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

fn err(what: &str, e: impl std::fmt::Debug) -> CommError {
    CommError::Transport(format!("NCCL {what}: {e:?}"))
}

impl NcclComm {
    /// Joins the ranks of `bootstrap` in an NCCL communicator on CUDA device `ordinal`
    /// (collective over `bootstrap`).
    pub fn new(bootstrap: &dyn Communicator, ordinal: usize) -> Result<Self, CommError> {
        let (rank, size) = (bootstrap.rank(), bootstrap.world_size());
        let id = if rank == 0 {
            let id = Id::new().map_err(|e| err("unique id", e))?;
            // c_char is i8 or u8 depending on the platform.
            #[allow(clippy::unnecessary_cast)]
            let bytes: Vec<i8> = id.internal().iter().map(|&c| c as i8).collect();
            bootstrap.broadcast_data(Some(TensorData::new(bytes, [128])), 0)?;
            id
        } else {
            let data = bootstrap.broadcast_data(None, 0)?;
            let bytes: Vec<i8> = data
                .to_vec()
                .map_err(|e| CommError::Mismatch(format!("NCCL unique id: {e:?}")))?;
            let mut internal = [0 as std::ffi::c_char; 128];
            for (slot, b) in internal.iter_mut().zip(bytes) {
                *slot = b as std::ffi::c_char;
            }
            Id::uninit(internal)
        };
        let ctx = CudaContext::new(ordinal).map_err(|e| err(&format!("CUDA device {ordinal}"), e))?;
        let stream = ctx.default_stream();
        let comm = Comm::from_rank(stream.clone(), rank, size, id).map_err(|e| err("communicator", e))?;
        Ok(Self {
            comm: Mutex::new(comm),
            stream,
            rank,
            size,
        })
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    /// NCCL has no tags: traffic between a pair is ordered, which the pairwise collectives keep.
    fn send(&self, dst: usize, _tag: u32, data: TensorData) -> Result<(), CommError> {
        let bytes = encode(&data);
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        // The receiver learns the length first.
        let len = self
            .stream
            .clone_htod(&[bytes.len() as u64])
            .map_err(|e| err("copy", e))?;
        comm.send(&len, dst as i32).map_err(|e| err("send", e))?;
        let payload = self.stream.clone_htod(&bytes).map_err(|e| err("copy", e))?;
        comm.send(&payload, dst as i32).map_err(|e| err("send", e))?;
        self.stream.synchronize().map_err(|e| err("synchronize", e))
    }

    fn recv(&self, src: usize, _tag: u32) -> Result<TensorData, CommError> {
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let mut len = self.stream.alloc_zeros::<u64>(1).map_err(|e| err("alloc", e))?;
        comm.recv(&mut len, src as i32).map_err(|e| err("recv", e))?;
        let len = self.stream.clone_dtoh(&len).map_err(|e| err("copy", e))?[0] as usize;
        let mut payload = self.stream.alloc_zeros::<u8>(len).map_err(|e| err("alloc", e))?;
        comm.recv(&mut payload, src as i32).map_err(|e| err("recv", e))?;
        let bytes = self.stream.clone_dtoh(&payload).map_err(|e| err("copy", e))?;
        decode(&bytes)
    }
}
