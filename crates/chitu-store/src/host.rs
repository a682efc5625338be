//! Module weights parked in host memory, so that a device can hold other models meanwhile.
//!
//! This is what diffusers calls model CPU offload. A parked module is a list of host tensors;
//! bringing it back builds a lazily initialised skeleton on the device (burn allocates nothing
//! for a parameter until it is read or replaced) and moves each tensor into it.

use crate::LoadError;
use burn::module::{Module, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_store::{ModuleSnapshot, TensorSnapshot, TensorSnapshotError};
use std::any::Any;
use std::cell::RefCell;
use std::rc::Rc;

/// Whether `B` is one of burn's CPU backends (`flex`, `ndarray`), whose device memory is host
/// memory: reading a tensor's data out costs nothing there, and CPU-specific kernels apply.
pub fn is_host_backend<B: Backend>(device: &B::Device) -> bool {
    let name = B::name(device);
    name == "flex" || name.starts_with("ndarray")
}

/// Whether `t` is an f32 tensor of a CPU backend: what the model crates' host kernels take.
pub fn is_host_f32<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
    is_host_backend::<B>(&t.device()) && t.dtype() == DType::F32
}

/// The f32 elements of a tensor, read in place where the backend allows it.
///
/// `Tensor::into_data` copies a tensor whose storage is shared, which a layer's weight always is
/// (the module keeps its own handle), so host kernels that took their weights that way copied
/// every weight on every call, into freshly faulted pages. On burn-flex this holds the tensor's
/// storage and lends it out; on any other backend, or for a strided view, it holds a copy.
pub struct HostF32(Held);

enum Held {
    Flex(burn_flex::FlexTensor),
    Copied(TensorData),
}

impl HostF32 {
    /// Takes `t`'s data. `t` must be f32 (see [`is_host_f32`]); any other dtype is converted.
    pub fn new<B: Backend, const D: usize>(t: Tensor<B, D>) -> Self {
        let t = if t.dtype() == DType::F32 { t } else { t.cast(DType::F32) };
        let prim: Box<dyn Any> = Box::new(t.into_primitive().tensor());
        match prim.downcast::<burn_flex::FlexTensor>() {
            Ok(flex) if flex.as_slice::<f32>().is_some() => Self(Held::Flex(*flex)),
            Ok(flex) => Self(Held::Copied(flex.into_data())),
            Err(prim) => {
                let prim = *prim
                    .downcast::<B::FloatTensorPrimitive>()
                    .unwrap_or_else(|_| unreachable!("the box holds what was just put in"));
                let t = Tensor::<B, D>::from_primitive(TensorPrimitive::Float(prim));
                Self(Held::Copied(t.into_data()))
            }
        }
    }

    /// The tensor's own buffer, when taking it needs no copy: it was a burn-flex tensor that
    /// nothing else shares, covering its whole buffer. Lets a kernel recycle an input it consumed.
    pub fn into_reusable(self) -> Option<Vec<f32>> {
        match self.0 {
            Held::Flex(t)
                if t.is_unique()
                    && t.as_slice::<f32>()
                        .is_some_and(|s| std::mem::size_of_val(s) == t.bytes().len()) =>
            {
                t.into_data().into_vec::<f32>().ok()
            }
            _ => None,
        }
    }

    /// The elements, in row-major order.
    pub fn as_slice(&self) -> &[f32] {
        match &self.0 {
            Held::Flex(t) => t.as_slice::<f32>().unwrap_or_else(|| unreachable!("checked in `new`")),
            Held::Copied(d) => d
                .as_slice::<f32>()
                .unwrap_or_else(|_| unreachable!("cast to f32 in `new`")),
        }
    }
}

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
    pub fn from_module<B: Backend, M: Module<B>>(module: &M) -> Result<Self, LoadError> {
        let mut entries = Vec::new();
        let mut bytes = 0;
        for snap in module.collect(None, None, false) {
            let data = snap
                .to_data()
                .map_err(|e| LoadError::Mismatch(format!("{}: cannot copy to the host: {e}", snap.full_path())))?;
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
    pub fn into_module<B: Backend, M: Module<B>>(self, skeleton: M) -> Result<M, LoadError> {
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
            Err(LoadError::Mismatch(format!(
                "parked weights do not fit the module: {}",
                problems.join("; ")
            )))
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
    fn host_f32_reads_in_place_and_copies_views() {
        let dev = Default::default();
        let data: Vec<f32> = (0..24).map(|v| v as f32).collect();
        let t = Tensor::<Flex, 2>::from_data(TensorData::new(data.clone(), [4, 6]), &dev);
        // A shared tensor (a layer's weight) is lent, not copied: two views share one buffer.
        let (a, b) = (HostF32::new(t.clone()), HostF32::new(t.clone()));
        assert_eq!(a.as_slice(), &data[..]);
        assert_eq!(a.as_slice().as_ptr(), b.as_slice().as_ptr());
        // Rows 1..3: contiguous at an offset, still in place.
        let rows = HostF32::new(t.clone().slice(1..3));
        assert_eq!(rows.as_slice(), &data[6..18]);
        // A transposed view is copied in its logical order.
        let tr = HostF32::new(t.clone().transpose());
        let want: Vec<f32> = (0..6).flat_map(|c| (0..4).map(move |r| (r * 6 + c) as f32)).collect();
        assert_eq!(tr.as_slice(), &want[..]);
        // Only a tensor nothing else holds gives up its buffer.
        assert!(a.into_reusable().is_none());
        drop(b);
        let own = HostF32::new(Tensor::<Flex, 2>::from_data(
            TensorData::new(data.clone(), [4, 6]),
            &dev,
        ));
        assert_eq!(own.into_reusable().as_deref(), Some(&data[..]));
        assert!(rows.into_reusable().is_none());
        // Other dtypes arrive as f32.
        let half = HostF32::new(t.cast(DType::F16));
        assert_eq!(half.as_slice(), &data[..]);
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
