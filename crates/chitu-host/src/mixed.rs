//! Weights held in a narrower dtype than the activations they meet, and the linear layer that
//! every model crate calls on the host.
//!
//! With `--dtype bf16` a model's matrices are held in bf16 while activations stay f32 (see
//! chitu-store's `Precision`). burn's ops want one dtype on both sides, so every use of a weight
//! goes through [`like`], which widens it for that one op: memory holds the narrow copy, and one
//! layer's f32 copy at a time. On burn-flex the widening runs in parallel, straight from the
//! narrow bits (burn-flex's own cast runs on one thread through f64), and a [`linear`] widens
//! into a buffer each thread keeps, then calls the GEMM itself: a fresh f32 weight per call
//! faulted in 5.7 GB of new pages per full-size DiT forward, which made bf16 20% slower than f32.

use crate::host_kernels;
use crate::sgemm::row_major;
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::quantization::{QTensorPrimitive, QuantLevel, QuantValue};
use burn::tensor::{bf16, f16, DType, Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;
use std::any::Any;

/// `t` in `dtype`; a no-op when it is already. A quantized `t` (int8 weights) is dequantized.
pub fn cast<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype {
        return t;
    }
    if matches!(t.dtype(), DType::QFloat(_)) {
        if host_kernels::<B>() && dtype == DType::F32 {
            if let Some(wide) = widen_host(&t) {
                return wide;
            }
        }
        return cast(t.dequantize(), dtype);
    }
    if host_kernels::<B>() && dtype == DType::F32 {
        if let Some(wide) = widen_host(&t) {
            return wide;
        }
    }
    t.cast(dtype)
}

/// `t` in `other`'s dtype: a weight brought to its activation's.
pub fn like<B: Backend, const D: usize, const E: usize>(t: Tensor<B, D>, other: &Tensor<B, E>) -> Tensor<B, D> {
    cast(t, other.dtype())
}

/// burn's `Linear::forward` with the weight and bias in `x`'s dtype.
///
/// On burn-flex with f32 activations it calls the process's GEMM ([`crate::sgemm::Sgemm::get`])
/// itself, on an f32 weight in place or a narrow one widened, with the bias written into the
/// output first and accumulated onto: burn's `linear` adds the bias in a separate pass, on one
/// thread.
pub fn linear<B: Backend, const D: usize>(layer: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let weight = layer.weight.val();
    if crate::is_host_f32(&x) && matches!(weight.dtype(), DType::F32 | DType::BF16 | DType::F16 | DType::QFloat(_)) {
        if let Some(y) = linear_host(&weight, layer.bias.as_ref().map(|b| b.val()), &x) {
            return y;
        }
    }
    let weight = like(weight, &x);
    let bias = layer.bias.as_ref().map(|b| like(b.val(), &x));
    burn::tensor::module::linear(x, weight, bias)
}

thread_local! {
    /// The widened weight of this thread's last [`linear`]; it grows to the largest layer
    /// (168 MB for UMT5-XXL's FFN) and is reused, in cache, by every later call.
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A burn-flex weight held narrower than f32.
enum Narrow {
    /// bf16 or f16.
    Float(burn_flex::FlexTensor),
    /// int8 values with one scale per block.
    Int8(burn_flex::FlexQTensor),
}

/// The narrow bits of a burn-flex tensor that covers its whole contiguous buffer.
fn flex_of<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<Narrow> {
    let whole = |flex: &burn_flex::FlexTensor| flex.layout().is_contiguous() && flex.layout().start_offset() == 0;
    match t.clone().into_primitive() {
        TensorPrimitive::Float(p) => {
            let prim: Box<dyn Any> = Box::new(p);
            let flex = *prim.downcast::<burn_flex::FlexTensor>().ok()?;
            whole(&flex).then_some(Narrow::Float(flex))
        }
        TensorPrimitive::QFloat(q) => {
            let prim: Box<dyn Any> = Box::new(q);
            let q = *prim.downcast::<burn_flex::FlexQTensor>().ok()?;
            whole(q.tensor()).then_some(Narrow::Int8(q))
        }
    }
}

/// Widens `narrow` into `dst`, in parallel; `None` for another dtype, another quantization
/// scheme or a short buffer.
fn widen_into(narrow: &Narrow, dst: &mut [f32]) -> Option<()> {
    const CHUNK: usize = 1 << 16;
    fn each<T: bytemuck::Pod + Send + Sync>(src: &[T], dst: &mut [f32], f: fn(T) -> f32) -> Option<()> {
        let src = src.get(..dst.len())?;
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(o, s)| o.iter_mut().zip(s).for_each(|(o, s)| *o = f(*s)));
        Some(())
    }
    match narrow {
        Narrow::Float(flex) => match flex.dtype() {
            DType::BF16 => each(flex.as_slice::<bf16>()?, dst, bf16::to_f32),
            DType::F16 => each(flex.as_slice::<f16>()?, dst, f16::to_f32),
            _ => None,
        },
        Narrow::Int8(q) => {
            let scheme = q.scheme();
            let QuantLevel::Block(block) = scheme.level else {
                return None;
            };
            let block = block.num_elements();
            let symmetric = matches!(scheme.value, QuantValue::Q8S | QuantValue::Q8F);
            let (values, scales) = (q.tensor().as_slice::<i8>()?, q.scales());
            if !symmetric || block == 0 || !CHUNK.is_multiple_of(block) || scales.len() * block < dst.len() {
                return None;
            }
            let values = values.get(..dst.len())?;
            dst.par_chunks_mut(CHUNK)
                .zip(values.par_chunks(CHUNK))
                .zip(scales.par_chunks(CHUNK / block))
                .for_each(|((o, v), s)| {
                    for ((o, v), s) in o.chunks_mut(block).zip(v.chunks(block)).zip(s) {
                        o.iter_mut().zip(v).for_each(|(o, v)| *o = *v as f32 * s);
                    }
                });
            Some(())
        }
    }
}

/// `x @ weight + bias` on burn-flex for an f32, bf16, f16 or int8 `weight` `[in, out]` and f32
/// `x`; `None` when a tensor is not laid out for it (the generic path then runs).
fn linear_host<B: Backend, const D: usize>(
    weight: &Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    x: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    let [k, n] = weight.dims();
    let dims = x.dims();
    if dims[D - 1] != k {
        return None;
    }
    let m: usize = dims[..D - 1].iter().product();
    let bias = match bias {
        Some(b) if b.dtype() == DType::F32 => Some(crate::HostF32::new(b)),
        Some(_) => return None,
        None => None,
    };
    let xs = crate::HostF32::new(x.clone());
    // The bias first, written on all threads (which also spreads the fresh pages' faults); the
    // GEMM then adds the product onto it.
    let mut out = vec![0f32; m * n];
    if let Some(b) = &bias {
        let b = b.as_slice();
        out.par_chunks_mut(n).for_each(|row| row.copy_from_slice(b));
    }
    let mut gemm = |w: &[f32]| {
        // SAFETY: the three matrices are row-major and hold m*k, k*n and m*n elements.
        unsafe {
            crate::sgemm::Sgemm::get().run(
                m,
                n,
                k,
                row_major(out.as_mut_ptr(), n),
                row_major(xs.as_slice().as_ptr(), k),
                row_major(w.as_ptr(), n),
                bias.is_some(),
                m * n * k > 1 << 18,
            )
        }
    };
    if weight.dtype() == DType::F32 {
        gemm(crate::HostF32::new(weight.clone()).as_slice());
    } else {
        let w = flex_of(weight)?;
        WIDE.with(|wide| {
            let mut wide = wide.borrow_mut();
            if wide.len() < k * n {
                wide.resize(k * n, 0.0);
            }
            let wide = &mut wide[..k * n];
            widen_into(&w, wide)?;
            gemm(wide);
            Some(())
        })?;
    }
    let mut shape = dims.to_vec();
    shape[D - 1] = n;
    Some(Tensor::from_data(TensorData::new(out, shape), &x.device()))
}

/// A burn-flex bf16 or f16 tensor as f32, converted in parallel; `None` for anything else.
fn widen_host<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<Tensor<B, D>> {
    let flex = flex_of(t)?;
    let mut wide = vec![0f32; t.shape().num_elements()];
    widen_into(&flex, &mut wide)?;
    Some(Tensor::from_data(TensorData::new(wide, t.shape()), &t.device()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LinearConfig;
    use burn::tensor::Distribution;
    use burn_flex::Flex;

    #[test]
    fn widening_matches_burns_cast_exactly() {
        let dev = Default::default();
        let x = Tensor::<Flex, 2>::random([300, 700], Distribution::Normal(0.0, 3.0), &dev);
        for dtype in [DType::BF16, DType::F16] {
            let narrow = x.clone().cast(dtype);
            let ours = cast(narrow.clone(), DType::F32);
            assert_eq!(ours.dtype(), DType::F32);
            ours.into_data()
                .assert_eq(&narrow.clone().cast(DType::F32).into_data(), true);
            // A strided view is not read in place; it takes burn's path, with the same values.
            let view = cast(narrow.clone().transpose(), DType::F32);
            view.into_data()
                .assert_eq(&narrow.transpose().cast(DType::F32).into_data(), true);
        }
    }

    #[test]
    fn int8_weights_widen_to_burns_own_dequantization() {
        use burn::tensor::quantization::{BlockSize, QuantLevel, QuantScheme, QuantStore, QuantValue};
        let dev = Default::default();
        let scheme = QuantScheme::default()
            .with_value(QuantValue::Q8S)
            .with_store(QuantStore::Native)
            .with_level(QuantLevel::Block(BlockSize::new([64])));
        let w = Tensor::<Flex, 2>::random([96, 128], Distribution::Normal(0.0, 1.0), &dev).quantize_dynamic(&scheme);
        let ours = cast(w.clone(), DType::F32);
        ours.into_data().assert_eq(&w.clone().dequantize().into_data(), true);
        let mut layer = LinearConfig::new(96, 128).init::<Flex>(&dev);
        layer.weight = burn::module::Param::from_tensor(w.clone());
        let x = Tensor::<Flex, 2>::random([5, 96], Distribution::Normal(0.0, 1.0), &dev);
        let want = x.clone().matmul(w.dequantize()) + layer.bias.as_ref().unwrap().val().unsqueeze();
        linear(&layer, x)
            .into_data()
            .assert_approx_eq::<f32>(&want.into_data(), burn::tensor::Tolerance::default());
    }

    #[test]
    fn a_narrow_linear_runs_on_wide_inputs() {
        let dev = Default::default();
        let mut wide = LinearConfig::new(8, 5).init::<Flex>(&dev);
        // Drawn once: a lazy parameter's clones would each draw their own.
        let w = Tensor::<Flex, 2>::random([8, 5], Distribution::Normal(0.0, 1.0), &dev);
        wide.weight = burn::module::Param::from_tensor(w);
        wide.bias = Some(burn::module::Param::from_tensor(Tensor::ones([5], &dev)));
        let x = Tensor::<Flex, 3>::random([2, 3, 8], Distribution::Normal(0.0, 1.0), &dev);
        let mut narrow = wide.clone();
        narrow.weight = narrow.weight.map(|w| w.cast(DType::BF16));
        let got = linear(&narrow, x.clone());
        assert_eq!(got.dtype(), DType::F32);
        let mut rounded = wide.clone();
        rounded.weight = rounded.weight.map(|w| w.cast(DType::BF16).cast(DType::F32));
        // The same product as burn's; the process's GEMM may be another kernel (CHITU_GEMM), so
        // to rounding, not bit for bit.
        let tol = burn::tensor::Tolerance::rel_abs(1e-6, 1e-6);
        got.into_data()
            .assert_approx_eq::<f32>(&rounded.forward(x.clone()).into_data(), tol);
        // f32 weights take the same path, read in place.
        linear(&wide, x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&wide.forward(x.clone()).into_data(), tol);
        // A layer without a bias.
        let mut bare = wide.clone();
        bare.bias = None;
        linear(&bare, x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&bare.forward(x).into_data(), tol);
    }
}
