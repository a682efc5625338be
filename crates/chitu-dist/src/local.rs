//! In-process ranks: one thread per rank, exchanging host data through channels.

use crate::{CommError, Communicator};
use burn::tensor::TensorData;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a rank waits for a peer before giving up (a stuck or dead peer must not hang the
/// others forever).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

type Message = (u32, TensorData);

/// One rank of an in-process group.
pub struct LocalComm {
    rank: usize,
    senders: Vec<Sender<Message>>,
    /// `receivers[src]`: messages from `src`, in order.
    receivers: Vec<Mutex<Receiver<Message>>>,
    timeout: Duration,
}

impl LocalComm {
    /// The `n` ranks of a new group, to hand one to each thread.
    pub fn group(n: usize, timeout: Duration) -> Vec<LocalComm> {
        // links[src][dst]
        let mut senders: Vec<Vec<Sender<Message>>> = (0..n).map(|_| Vec::with_capacity(n)).collect();
        let mut receivers: Vec<Vec<Mutex<Receiver<Message>>>> = (0..n).map(|_| Vec::with_capacity(n)).collect();
        for sender_row in senders.iter_mut() {
            for receiver_row in receivers.iter_mut() {
                let (tx, rx) = channel();
                sender_row.push(tx);
                receiver_row.push(Mutex::new(rx));
            }
        }
        senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(rank, (senders, receivers))| LocalComm {
                rank,
                senders,
                receivers,
                timeout,
            })
            .collect()
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.senders.len()
    }

    fn send(&self, dst: usize, tag: u32, data: TensorData) -> Result<(), CommError> {
        self.senders[dst].send((tag, data)).map_err(|_| CommError::PeerGone {
            rank: self.rank,
            peer: dst,
            op: "send",
        })
    }

    fn recv(&self, src: usize, tag: u32) -> Result<TensorData, CommError> {
        let rx = self.receivers[src].lock().unwrap_or_else(|e| e.into_inner());
        match rx.recv_timeout(self.timeout) {
            Ok((got, data)) if got == tag => Ok(data),
            Ok((got, _)) => Err(CommError::Mismatch(format!(
                "rank {} expected a message of group {tag} from rank {src}, got group {got}",
                self.rank
            ))),
            Err(RecvTimeoutError::Timeout) => Err(CommError::Timeout {
                rank: self.rank,
                peer: src,
                secs: self.timeout.as_secs_f64(),
                op: "recv",
            }),
            Err(RecvTimeoutError::Disconnected) => Err(CommError::PeerGone {
                rank: self.rank,
                peer: src,
                op: "recv",
            }),
        }
    }
}

/// Runs `f` on `n` in-process ranks (one thread each) with [`DEFAULT_TIMEOUT`]; returns every
/// rank's result in rank order, or the error that started a failure.
pub fn run_local<T, F>(n: usize, f: F) -> Result<Vec<T>, CommError>
where
    T: Send,
    F: Fn(Arc<dyn Communicator>) -> Result<T, Box<dyn std::error::Error + Send + Sync>> + Sync,
{
    run_local_with(n, DEFAULT_TIMEOUT, f)
}

/// [`run_local`] with a timeout for every receive.
pub fn run_local_with<T, F>(n: usize, timeout: Duration, f: F) -> Result<Vec<T>, CommError>
where
    T: Send,
    F: Fn(Arc<dyn Communicator>) -> Result<T, Box<dyn std::error::Error + Send + Sync>> + Sync,
{
    if n == 0 {
        return Err(CommError::Layout("a group needs at least one rank".into()));
    }
    let results: Vec<Result<T, CommError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = LocalComm::group(n, timeout)
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let f = &f;
                std::thread::Builder::new()
                    .name(format!("chitu-rank-{rank}"))
                    .spawn_scoped(scope, move || {
                        // The communicator drops when the rank ends, so peers see it gone at once.
                        f(Arc::new(comm)).map_err(|e| CommError::Rank {
                            rank,
                            message: e.to_string(),
                        })
                    })
                    .expect("spawning a rank thread")
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|panic| {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panicked".into());
                    Err(CommError::Rank { rank, message })
                })
            })
            .collect()
    });
    let mut values = Vec::with_capacity(n);
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(v) => values.push(v),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        return Ok(values);
    }
    // Report the cause, not the peers that noticed it.
    let consequence = |e: &CommError| matches!(e, CommError::Rank { message, .. } if message.contains("is gone") || message.contains("within"));
    let first_cause = errors.iter().position(|e| !consequence(e)).unwrap_or(0);
    Err(errors.swap_remove(first_cause))
}
