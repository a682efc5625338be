//! Host-kernel capability: whether chitu's own CPU kernels may run on a backend's tensors.
//!
//! The DiT's blocked attention, fused RoPE and GELU and the VAE's direct conv are written for
//! tensors in host memory that they can read in place. Whether a backend offers that is decided
//! here from the backend's tensor *type*, never from its name: [`host_kernels`] is true exactly
//! when `B`'s float tensor is a burn-flex tensor.
//!
//! Every other backend gets burn's generic tensor ops, which are correct everywhere. That is the
//! documented fallback, and it covers on purpose the backends that wrap burn-flex:
//! `Autodiff<Flex>` must record every op for its graph, so a kernel that reads memory behind its
//! back would break gradients, and a fusion or router backend decides its own kernels.

#![warn(missing_docs)]

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use std::any::{Any, TypeId};

pub mod attention;
pub mod gelu;
pub mod machine;
pub mod mixed;
pub mod rows;
pub mod sgemm;

pub use machine::Machine;

/// Whether `B`'s float tensors are burn-flex tensors in host memory, which chitu's CPU kernels
/// read in place. False for every other backend, including ones that wrap burn-flex.
pub fn host_kernels<B: Backend>() -> bool {
    TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<burn_flex::FlexTensor>()
}

/// Whether `t` is an f32 tensor of a backend with [`host_kernels`]: what the model crates' CPU
/// kernels take.
pub fn is_host_f32<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
    host_kernels::<B>() && t.dtype() == DType::F32
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

/// `e^x` in plain f32 arithmetic, within 3 ulp of `f32::exp` on [-87, 88] and saturating
/// outside it (to about 1.6e-38 and 1.7e38, which is all SiLU and a softmax need: a softmax's
/// largest term is e^0).
///
/// `f32::exp` is a libm call per element, which keeps a loop around it scalar (the VAE's fused
/// norm + SiLU, the DiT's softmax); this one vectorises. It is the usual reduction
/// `x = n ln2 + r`, `|r| <= ln2 / 2`, a degree-6 Taylor polynomial for `e^r` and `2^n` built in the exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `sum(f(x))` over `v`, in eight lanes: a sequential f32 sum cannot be vectorised (its order
/// is fixed), eight running sums can.
#[inline]
pub fn sum_of(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += f(x);
        }
    }
    lanes.iter().sum::<f32>() + rest
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_flex::Flex;

    #[test]
    fn exp_is_within_three_ulp_of_libm() {
        let mut worst = 0.0f32;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst <= 3.0 * f32::EPSILON, "max relative error {worst}");
        // Saturated, not infinite or zero, far outside.
        assert!(exp(-1000.0) > 0.0 && exp(1000.0).is_finite());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn the_capability_follows_the_tensor_type() {
        assert!(host_kernels::<Flex>());
        let t = Tensor::<Flex, 1>::from_floats([1.0, 2.0], &Default::default());
        assert!(is_host_f32(&t));
        assert!(!is_host_f32(&t.cast(DType::F16)));
        // Autodiff records every op: it must never reach a kernel that reads memory directly.
        assert!(!host_kernels::<burn_autodiff::Autodiff<Flex>>());
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
}
