//! Module weights parked in host memory, so that a device can hold other models meanwhile.
//!
//! This is what diffusers calls model CPU offload. A parked module is a list of host tensors;
//! bringing it back builds a lazily initialised skeleton on the device (burn allocates nothing
//! for a parameter until it is read or replaced) and moves each tensor into it.

use crate::offload::OffloadError;
use burn::module::{Module, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::TensorData;
use burn_store::{ModuleSnapshot, TensorSnapshot, TensorSnapshotError};
use std::cell::RefCell;
use std::rc::Rc;

struct Entry {
    data: TensorData,
    path: Vec<String>,
    containers: Vec<String>,
    id: ParamId,
}

/// Every tensor of one module, copied off its device.
pub struct HostWeights {
    entries: Vec<Entry>,
    bytes: usize,
}

impl std::fmt::Debug for HostWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostWeights")
            .field("tensors", &self.entries.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl HostWeights {
    /// Copies every tensor of `module` to host memory. Dropping the module afterwards frees its
    /// device memory.
    pub fn from_module<B: Backend, M: Module<B>>(module: &M) -> Result<Self, OffloadError> {
        let mut entries = Vec::new();
        let mut bytes = 0;
        for snap in module.collect(None, None, false) {
            let data = snap.to_data().map_err(|e| OffloadError::ToHost {
                tensor: snap.full_path(),
                message: e.to_string(),
            })?;
            bytes += data.bytes.len();
            entries.push(Entry {
                data,
                path: snap.path_stack.clone().unwrap_or_default(),
                containers: snap.container_stack.clone().unwrap_or_default(),
                id: snap.tensor_id.unwrap_or_default(),
            });
        }
        Ok(Self { entries, bytes })
    }

    /// Host bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Number of tensors held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no tensor is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Moves the tensors into `skeleton`, a freshly built module of the same structure on the
    /// target device. Each host tensor is handed over once, so host and device never both hold
    /// the whole module. Every tensor of the skeleton must be supplied with its shape.
    pub fn into_module<B: Backend, M: Module<B>>(self, skeleton: M) -> Result<M, OffloadError> {
        let snapshots = self
            .entries
            .into_iter()
            .map(|e| {
                let dtype = e.data.dtype;
                let shape = e.data.shape.clone();
                let cell = Rc::new(RefCell::new(Some(e.data)));
                let take = move || {
                    cell.borrow_mut()
                        .take()
                        .ok_or_else(|| TensorSnapshotError::DataError("tensor already moved to the device".into()))
                };
                TensorSnapshot::from_closure(Rc::new(take), dtype, shape, e.path, e.containers, e.id)
            })
            .collect();
        let mut module = skeleton;
        let result = module.apply(snapshots, None, None, false);
        let mut problems = Vec::new();
        if !result.missing.is_empty() {
            let missing: Vec<&str> = result.missing.iter().map(|(p, _)| p.as_str()).collect();
            problems.push(format!("missing: {}", missing.join(", ")));
        }
        if !result.unused.is_empty() {
            problems.push(format!("unexpected: {}", result.unused.join(", ")));
        }
        if !result.errors.is_empty() {
            let errors: Vec<String> = result.errors.iter().map(|e| format!("{e:?}")).collect();
            problems.push(format!("bad tensors: {}", errors.join(", ")));
        }
        if problems.is_empty() {
            Ok(module)
        } else {
            Err(OffloadError::Mismatch(problems.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::Tensor;
    use burn_flex::Flex;

    #[derive(Module, Debug)]
    struct Net<B: Backend> {
        a: Linear<B>,
        b: Vec<Linear<B>>,
    }

    fn net(width: usize) -> Net<Flex> {
        let dev = Default::default();
        Net {
            a: LinearConfig::new(4, width).init(&dev),
            b: vec![
                LinearConfig::new(width, 3).init(&dev),
                LinearConfig::new(3, 2).init(&dev),
            ],
        }
    }

    fn run(n: &Net<Flex>) -> Vec<f32> {
        let x = Tensor::<Flex, 2>::from_floats([[0.5, -1.0, 2.0, 0.25]], &Default::default());
        let y = n.b.iter().fold(n.a.forward(x), |x, l| l.forward(x));
        y.into_data().to_vec().unwrap()
    }

    #[test]
    fn parked_weights_come_back_exactly() {
        let original = net(5);
        let expected = run(&original);
        let host = HostWeights::from_module(&original).unwrap();
        drop(original);
        assert_eq!(host.len(), 6);
        assert_eq!(host.bytes(), (4 * 5 + 5 + 5 * 3 + 3 + 3 * 2 + 2) * 4);
        // A fresh skeleton has other random weights; the parked ones replace them all.
        let restored = host.into_module(net(5)).unwrap();
        assert_eq!(run(&restored), expected);
    }

    #[test]
    fn a_skeleton_of_another_shape_is_refused() {
        let host = HostWeights::from_module(&net(5)).unwrap();
        let e = host.into_module(net(7)).unwrap_err().to_string();
        assert!(e.contains("a.weight") && e.contains("do not fit"), "{e}");
    }
}
