//! MPI ranks (rsmpi over the system's MPI): one process per rank, launched with `mpirun`.

use crate::{decode, encode, CommError, Communicator};
use burn::tensor::TensorData;
use mpi::point_to_point::{Destination, MatchedReceiveVec, Source};
use mpi::topology::{Communicator as _, SimpleCommunicator};
use mpi::Threading;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The world of an MPI job. Data travels through host memory.
pub struct MpiComm {
    // Field order: the world handle drops before the universe finalises MPI.
    world: Mutex<SimpleCommunicator>,
    _universe: mpi::environment::Universe,
    rank: usize,
    size: usize,
    timeout: Duration,
}

// SAFETY: every MPI call goes through the mutex, so at most one thread is inside MPI at a time,
// which `Threading::Serialized` (checked at start) permits.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

impl MpiComm {
    /// Initialises MPI and returns this process's rank of the world; `None` when MPI was already
    /// initialised in this process.
    pub fn init(timeout: Duration) -> Result<Self, CommError> {
        let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| CommError::Transport("MPI is already initialised in this process".into()))?;
        if level < Threading::Serialized {
            return Err(CommError::Transport(format!(
                "the MPI library offers thread level {level:?}; chitu needs Serialized"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Self {
            world: Mutex::new(world),
            _universe: universe,
            rank,
            size,
            timeout,
        })
    }

    /// Whether this process looks launched by `mpirun` (OpenMPI, MPICH or a PMI launcher).
    pub fn launched() -> bool {
        ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"]
            .iter()
            .any(|v| std::env::var_os(v).is_some())
    }

    /// Ends every rank of the job: after a failure on one rank, the others must not wait.
    pub fn abort(&self, code: i32) -> ! {
        let world = self.world.lock().unwrap_or_else(|e| e.into_inner());
        world.abort(code)
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn send(&self, dst: usize, tag: u32, data: TensorData) -> Result<(), CommError> {
        let bytes = encode(&data);
        let world = self.world.lock().unwrap_or_else(|e| e.into_inner());
        world.process_at_rank(dst as i32).send_with_tag(&bytes[..], tag as i32);
        Ok(())
    }

    fn recv(&self, src: usize, tag: u32) -> Result<TensorData, CommError> {
        let start = Instant::now();
        loop {
            {
                let world = self.world.lock().unwrap_or_else(|e| e.into_inner());
                let probe = world
                    .process_at_rank(src as i32)
                    .immediate_matched_probe_with_tag(tag as i32);
                if let Some(matched) = probe {
                    let (bytes, _) = matched.matched_receive_vec::<u8>();
                    return decode(&bytes);
                }
            }
            if start.elapsed() > self.timeout {
                return Err(CommError::Timeout {
                    rank: self.rank,
                    peer: src,
                    secs: self.timeout.as_secs_f64(),
                    op: "MPI recv",
                });
            }
            // Polling keeps a timeout possible; the sleep bounds the added latency.
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}
