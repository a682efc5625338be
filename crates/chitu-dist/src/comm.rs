//! The communicator trait, its default collectives, and subgroups.

use crate::CommError;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use std::sync::Arc;

/// Moves host tensor data between the ranks of a group.
///
/// An engine implements `send` and `recv`; the collectives have default implementations as
/// pairwise exchanges (ascending peer order, the lower rank sending first), which cannot deadlock
/// even where a send waits for its receiver. Every rank of a group must call the same collectives
/// in the same order.
pub trait Communicator: Send + Sync {
    /// This rank's index in the group.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// Sends `data` to rank `dst`; `tag` keeps the traffic of different groups apart.
    fn send(&self, dst: usize, tag: u32, data: TensorData) -> Result<(), CommError>;
    /// Receives the next message from rank `src` with `tag`.
    fn recv(&self, src: usize, tag: u32) -> Result<TensorData, CommError>;
    /// The tag of this group's collectives.
    fn tag(&self) -> u32 {
        0
    }

    /// Every rank's `data`, in rank order.
    fn all_gather_data(&self, data: TensorData) -> Result<Vec<TensorData>, CommError> {
        exchange(self, |_| data.clone())
    }

    /// Sends `parts[j]` to rank `j`; returns what rank `i` sent here at index `i`.
    fn all_to_all_data(&self, parts: Vec<TensorData>) -> Result<Vec<TensorData>, CommError> {
        if parts.len() != self.world_size() {
            return Err(CommError::Mismatch(format!(
                "all_to_all with {} parts in a group of {}",
                parts.len(),
                self.world_size()
            )));
        }
        exchange(self, |peer| parts[peer].clone())
    }

    /// `root`'s data on every rank (`data` is read on the root only).
    fn broadcast_data(&self, data: Option<TensorData>, root: usize) -> Result<TensorData, CommError> {
        let me = self.rank();
        if root >= self.world_size() {
            return Err(CommError::Layout(format!(
                "broadcast root {root} in a group of {}",
                self.world_size()
            )));
        }
        if me == root {
            let data = data.ok_or_else(|| CommError::Mismatch("broadcast root passed no data".into()))?;
            for peer in (0..self.world_size()).filter(|&p| p != me) {
                self.send(peer, self.tag(), data.clone())?;
            }
            Ok(data)
        } else {
            self.recv(root, self.tag())
        }
    }

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), CommError> {
        self.all_gather_data(TensorData::new(Vec::<f32>::new(), [0]))
            .map(|_| ())
    }
}

/// Pairwise exchange with every peer: `outgoing(peer)` goes to `peer`, in ascending peer order,
/// the lower rank of each pair sending first.
fn exchange<C: Communicator + ?Sized>(
    comm: &C,
    mut outgoing: impl FnMut(usize) -> TensorData,
) -> Result<Vec<TensorData>, CommError> {
    let (me, tag) = (comm.rank(), comm.tag());
    let mut received = Vec::with_capacity(comm.world_size());
    for peer in 0..comm.world_size() {
        let data = if peer == me {
            outgoing(me)
        } else if me < peer {
            comm.send(peer, tag, outgoing(peer))?;
            comm.recv(peer, tag)?
        } else {
            let got = comm.recv(peer, tag)?;
            comm.send(peer, tag, outgoing(peer))?;
            got
        };
        received.push(data);
    }
    Ok(received)
}

/// Tensor collectives for every [`Communicator`]; data travels through host memory.
pub trait TensorComm: Communicator {
    /// Concatenates every rank's `x` along `dim`, in rank order.
    fn all_gather<B: Backend, const D: usize>(&self, x: Tensor<B, D>, dim: usize) -> Result<Tensor<B, D>, CommError> {
        let (device, dims) = (x.device(), x.dims());
        let parts = self.all_gather_data(x.into_data())?;
        concat(parts, dims, dim, &device, &format!("all_gather along {dim}"))
    }

    /// Splits `x` in equal chunks along `scatter_dim`, chunk `j` to rank `j`, and concatenates the
    /// chunks received along `gather_dim`, in rank order.
    fn all_to_all<B: Backend, const D: usize>(
        &self,
        x: Tensor<B, D>,
        scatter_dim: usize,
        gather_dim: usize,
    ) -> Result<Tensor<B, D>, CommError> {
        let n = self.world_size();
        let (device, dims) = (x.device(), x.dims());
        if dims[scatter_dim] % n != 0 {
            return Err(CommError::Layout(format!(
                "all_to_all: dimension {scatter_dim} of {dims:?} does not split into {n} equal parts"
            )));
        }
        let parts = x.chunk(n, scatter_dim).into_iter().map(|c| c.into_data()).collect();
        let got = self.all_to_all_data(parts)?;
        let mut expected = dims;
        expected[scatter_dim] /= n;
        concat(got, expected, gather_dim, &device, "all_to_all")
    }

    /// `root`'s `x` on every rank (other ranks' `x` only names the device and shape).
    fn broadcast<B: Backend, const D: usize>(&self, x: Tensor<B, D>, root: usize) -> Result<Tensor<B, D>, CommError> {
        let (device, dims) = (x.device(), x.dims());
        let data = (self.rank() == root).then(|| x.into_data());
        let got = self.broadcast_data(data, root)?;
        if got.shape.as_slice() != dims.as_slice() {
            return Err(CommError::Mismatch(format!(
                "broadcast from {root}: got {:?}, this rank expected {dims:?}",
                got.shape
            )));
        }
        Ok(Tensor::from_data(got, &device))
    }

    /// Element-wise sums of `values` over the group, added in rank order (the same bits on every rank).
    fn all_sum(&self, values: &[f64]) -> Result<Vec<f64>, CommError> {
        let parts = self.all_gather_data(TensorData::new(values.to_vec(), [values.len()]))?;
        let mut sum = vec![0.0; values.len()];
        for part in parts {
            let v: Vec<f64> = part
                .to_vec()
                .map_err(|e| CommError::Mismatch(format!("all_sum: {e:?}")))?;
            if v.len() != sum.len() {
                return Err(CommError::Mismatch(format!(
                    "all_sum of {} values met {}",
                    sum.len(),
                    v.len()
                )));
            }
            sum.iter_mut().zip(v).for_each(|(s, x)| *s += x);
        }
        Ok(sum)
    }
}

impl<C: Communicator + ?Sized> TensorComm for C {}

/// Concatenates the ranks' parts along `dim` on `device`, after checking that every part has the
/// `expected` shape except along `dim`.
fn concat<B: Backend, const D: usize>(
    parts: Vec<TensorData>,
    expected: [usize; D],
    dim: usize,
    device: &B::Device,
    op: &str,
) -> Result<Tensor<B, D>, CommError> {
    for (rank, part) in parts.iter().enumerate() {
        let same = part.shape.len() == D && (0..D).all(|d| d == dim || part.shape[d] == expected[d]);
        if !same {
            return Err(CommError::Mismatch(format!(
                "{op}: rank {rank} sent {:?}, expected {expected:?} (any size along {dim})",
                part.shape
            )));
        }
    }
    let tensors = parts.into_iter().map(|p| Tensor::from_data(p, device)).collect();
    Ok(Tensor::cat(tensors, dim))
}

/// Some ranks of a parent communicator, renumbered from 0, with their own tag.
pub struct SubGroup {
    parent: Arc<dyn Communicator>,
    members: Vec<usize>,
    rank: usize,
    tag: u32,
}

impl SubGroup {
    /// The group of parent ranks `members` (in that order); this rank must be one of them.
    pub fn new(parent: Arc<dyn Communicator>, members: Vec<usize>, tag: u32) -> Result<Self, CommError> {
        let me = parent.rank();
        let rank = members
            .iter()
            .position(|&m| m == me)
            .ok_or_else(|| CommError::Layout(format!("rank {me} is not in the group {members:?}")))?;
        if let Some(&bad) = members.iter().find(|&&m| m >= parent.world_size()) {
            return Err(CommError::Layout(format!(
                "group member {bad} outside a world of {}",
                parent.world_size()
            )));
        }
        Ok(Self {
            parent,
            members,
            rank,
            tag,
        })
    }

    /// The parent ranks of the group.
    pub fn members(&self) -> &[usize] {
        &self.members
    }
}

impl Communicator for SubGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.members.len()
    }
    fn send(&self, dst: usize, tag: u32, data: TensorData) -> Result<(), CommError> {
        self.parent.send(self.members[dst], tag, data)
    }
    fn recv(&self, src: usize, tag: u32) -> Result<TensorData, CommError> {
        self.parent.recv(self.members[src], tag)
    }
    fn tag(&self) -> u32 {
        self.tag
    }
}
