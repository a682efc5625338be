//! GELU with the tanh approximation, shared by the DiT's FFN and UMT5's gated FFN.

use crate::is_host_f32;
use burn::tensor::activation::sigmoid;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use rayon::prelude::*;

/// GELU with the tanh approximation (PyTorch's `approximate="tanh"`), written as `x * sigmoid(2u)`
/// with `u = sqrt(2/pi) (x + 0.044715 x^3)`: the same function as `0.5 x (1 + tanh u)`, in about a
/// fifth of the time on burn-flex, whose `powf` and `tanh` are scalar (see BENCHMARKS.md).
/// On CPU backends in f32 it runs as one parallel, vectorised pass (burn-flex's elementwise ops
/// run on one thread, and this is six of them over the FFN's widest tensor).
pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if is_host_f32(&x) {
        return gelu_tanh_host(x);
    }
    gelu_tanh_tensor(x)
}

const TWO_SQRT_2_OVER_PI: f64 = 1.595_769_121_605_730_8;

fn gelu_tanh_tensor<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let u = (x.clone() * x.clone())
        .mul_scalar(TWO_SQRT_2_OVER_PI * 0.044715)
        .add_scalar(TWO_SQRT_2_OVER_PI)
        * x.clone();
    x * sigmoid(u)
}

/// The tensor form's f32 operations in its order, burn-flex's two-branch sigmoid included, with
/// [`crate::exp`] (within 3 ulp of libm's, and vectorised) for its `exp`.
fn gelu_tanh_host<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let (shape, device) = (x.shape(), x.device());
    let mut v = x.into_data().into_vec::<f32>().expect("dtype checked by gelu_tanh");
    let (a, c) = ((TWO_SQRT_2_OVER_PI * 0.044715) as f32, TWO_SQRT_2_OVER_PI as f32);
    v.par_chunks_mut(1 << 14).for_each(|chunk| {
        for x in chunk {
            let u = (*x * *x * a + c) * *x;
            let e = crate::exp(-u.abs());
            let s = if u >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
            *x *= s;
        }
    });
    Tensor::from_data(TensorData::new(v, shape), &device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn_flex::Flex;

    #[test]
    fn host_gelu_gives_the_tensor_form() {
        let dev = Default::default();
        // Wide enough to reach both sigmoid branches and saturation.
        let x = Tensor::<Flex, 2>::random([37, 1000], Distribution::Normal(0.0, 4.0), &dev);
        let host = gelu_tanh(x.clone());
        // The host `exp` is within 3 ulp of libm's.
        host.to_data().assert_approx_eq::<f32>(
            &gelu_tanh_tensor(x.clone()).to_data(),
            burn::tensor::Tolerance::rel_abs(1e-6, 1e-6),
        );
        let v: Vec<f32> = host.into_data().to_vec().unwrap();
        let x: Vec<f32> = x.into_data().to_vec().unwrap();
        // GELU is close to x for large x and to 0 for very negative x.
        assert!(x.iter().zip(&v).all(|(x, g)| *x < 8.0 || (g - x).abs() < 1e-3));
        assert!(x.iter().zip(&v).all(|(x, g)| *x > -8.0 || g.abs() < 1e-3));
    }
}
