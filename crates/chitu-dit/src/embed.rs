//! Sampling-side math of the DiT: the sinusoidal timestep embedding, 3-axis RoPE tables, and the
//! patch/unpatch index shuffles. Free functions, reproducing diffusers' float arithmetic.

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use chitu_host::is_host_f32;
use rayon::prelude::*;

/// diffusers' `get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)`,
/// evaluated on the host in float32 as torch does: `[cos(t * f), sin(t * f)]` with
/// `f_i = exp(-ln(10000) * i / (dim / 2))`.
pub fn timestep_embedding<B: Backend>(timesteps: &[f64], dim: usize, device: &B::Device) -> Tensor<B, 2> {
    let half = dim / 2;
    let neg_log = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| (neg_log * i as f32 / half as f32).exp()).collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let t = t as f32;
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        data.extend(args.iter().map(|a| a.cos()));
        data.extend(args.iter().map(|a| a.sin()));
    }
    Tensor::from_data(TensorData::new(data, [timesteps.len(), dim]), device)
}

/// Splits a head dim into the (t, h, w) RoPE axes as Wan does: `h = w = 2 * (d / 6)`, `t = d - h - w`.
pub fn rope_axes(head_dim: usize) -> [usize; 3] {
    let hw = 2 * (head_dim / 6);
    [head_dim - 2 * hw, hw, hw]
}

/// Cos/sin tables of Wan's 3-axis rotary embedding for a token sequence, each `[S, head_dim / 2]`
/// (one angle per interleaved channel pair).
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    /// Cosines of the rotation angles, `[S, head_dim / 2]`.
    pub cos: Tensor<B, 2>,
    /// Sines of the rotation angles, `[S, head_dim / 2]`.
    pub sin: Tensor<B, 2>,
}

impl<B: Backend> RopeTables<B> {
    /// Tables for the patched grid `(f, h, w)`, tokens in row-major (f, h, w) order, keeping only
    /// tokens `range` of the flattened sequence: a context-parallel rank holding tokens `s0..s1`
    /// passes `s0..s1` and gets their angles. Angles are computed in f64 and rounded to f32, as
    /// diffusers does.
    pub fn new(
        grid: [usize; 3],
        head_dim: usize,
        theta: f64,
        range: std::ops::Range<usize>,
        device: &B::Device,
    ) -> Self {
        let axes = rope_axes(head_dim);
        let freqs: Vec<Vec<f64>> = axes
            .iter()
            .map(|&d| {
                (0..d / 2)
                    .map(|j| 1.0 / theta.powf((2 * j) as f64 / d as f64))
                    .collect()
            })
            .collect();
        let [_, gh, gw] = grid;
        let pairs = head_dim / 2;
        let n = range.len();
        let (mut cos, mut sin) = (Vec::with_capacity(n * pairs), Vec::with_capacity(n * pairs));
        for s in range {
            let pos = [s / (gh * gw), (s / gw) % gh, s % gw];
            for (axis, f) in freqs.iter().enumerate() {
                for &fj in f {
                    let angle = pos[axis] as f64 * fj;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        Self {
            cos: Tensor::from_data(TensorData::new(cos, [n, pairs]), device),
            sin: Tensor::from_data(TensorData::new(sin, [n, pairs]), device),
        }
    }

    /// Tokens of the sequence.
    pub fn len(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Whether the tables are empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rotates interleaved channel pairs of `x` `[B, S, H, D]`:
    /// `(x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)`.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        if is_host_f32(&x) && self.cos.dtype() == DType::F32 {
            return self.apply_host(x);
        }
        self.apply_tensor(x)
    }

    /// [`RopeTables::apply`] in tensor ops, for every backend.
    fn apply_tensor(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, s, h, d] = x.dims();
        let pairs = x.reshape([b, s, h, d / 2, 2]);
        let x0 = pairs.clone().narrow(4, 0, 1);
        let x1 = pairs.narrow(4, 1, 1);
        let cos: Tensor<B, 5> = self.cos.clone().reshape([1, s, 1, d / 2, 1]);
        let sin: Tensor<B, 5> = self.sin.clone().reshape([1, s, 1, d / 2, 1]);
        let r0 = x0.clone() * cos.clone() - x1.clone() * sin.clone();
        let r1 = x0 * sin + x1 * cos;
        Tensor::cat(vec![r0, r1], 4).reshape([b, s, h, d])
    }

    /// [`RopeTables::apply`] in one pass over host memory, for f32 on CPU backends. burn-flex
    /// runs the tensor form as strided loops over the stride-2 pair views, 7% of a DiT forward.
    /// Same f32 operations in the same order, so the same bits.
    fn apply_host(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, s, h, d] = x.dims();
        let device = x.device();
        let host = |t: TensorData| t.into_vec::<f32>().expect("dtype checked by apply");
        let (cos, sin) = (host(self.cos.to_data()), host(self.sin.to_data()));
        let mut v = host(x.into_data());
        let pairs = d / 2;
        v.par_chunks_mut(h * d).enumerate().for_each(|(token, heads)| {
            let at = (token % s) * pairs;
            let (cos, sin) = (&cos[at..at + pairs], &sin[at..at + pairs]);
            for head in heads.chunks_exact_mut(d) {
                for ((pair, &c), &sn) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                    let (x0, x1) = (pair[0], pair[1]);
                    pair[0] = x0 * c - x1 * sn;
                    pair[1] = x0 * sn + x1 * c;
                }
            }
        });
        Tensor::from_data(TensorData::new(v, [b, s, h, d]), &device)
    }
}

/// Cuts `[B, C, F, H, W]` into patches `[B, F/pt * H/ph * W/pw, C * pt * ph * pw]`, tokens in
/// (f, h, w) order and features in (c, pt, ph, pw) order: the layout of a Conv3d's flattened kernel.
pub fn patchify<B: Backend>(x: Tensor<B, 5>, patch: [usize; 3]) -> Tensor<B, 3> {
    let [b, c, f, h, w] = x.dims();
    let [pt, ph, pw] = patch;
    let (gf, gh, gw) = (f / pt, h / ph, w / pw);
    let x: Tensor<B, 8> = x.reshape([b, c, gf, pt, gh, ph, gw, pw]);
    x.permute([0, 2, 4, 6, 1, 3, 5, 7])
        .reshape([b, gf * gh * gw, c * pt * ph * pw])
}

/// Inverse of the head's projection layout: `[B, S, pt * ph * pw * C]` (features in (pt, ph, pw, c)
/// order, as diffusers' unpatchify reads them) to `[B, C, F, H, W]`.
pub fn unpatchify<B: Backend>(x: Tensor<B, 3>, grid: [usize; 3], patch: [usize; 3], channels: usize) -> Tensor<B, 5> {
    let [b, _, _] = x.dims();
    let [gf, gh, gw] = grid;
    let [pt, ph, pw] = patch;
    let x: Tensor<B, 8> = x.reshape([b, gf, gh, gw, pt, ph, pw, channels]);
    x.permute([0, 7, 1, 4, 2, 5, 3, 6])
        .reshape([b, channels, gf * pt, gh * ph, gw * pw])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_flex::Flex;

    #[test]
    fn rope_axes_follow_wan() {
        assert_eq!(rope_axes(128), [44, 42, 42]);
        assert_eq!(rope_axes(24), [8, 8, 8]);
    }

    #[test]
    fn host_rope_gives_the_tensor_form_bit_for_bit() {
        use burn::tensor::Distribution;
        let dev = Default::default();
        let rope = RopeTables::<Flex>::new([2, 3, 4], 24, 10000.0, 3..20, &dev);
        let x = Tensor::<Flex, 4>::random([2, 17, 3, 24], Distribution::Normal(0.0, 1.0), &dev);
        let host = rope.apply(x.clone());
        let tensor = rope.apply_tensor(x.clone());
        host.to_data().assert_eq(&tensor.to_data(), true);
        // And it rotates: position 0 of the full table is the identity, others are not.
        assert!(host.to_data() != x.to_data());
    }

    #[test]
    fn rope_tables_slice_by_offset() {
        let dev = Default::default();
        let full = RopeTables::<Flex>::new([2, 3, 4], 24, 10000.0, 0..24, &dev);
        let part = RopeTables::<Flex>::new([2, 3, 4], 24, 10000.0, 10..17, &dev);
        let a: Vec<f32> = full.cos.slice(10..17).into_data().to_vec().unwrap();
        let b: Vec<f32> = part.cos.into_data().to_vec().unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn rope_at_position_zero_is_identity() {
        let dev = Default::default();
        let r = RopeTables::<Flex>::new([1, 1, 1], 24, 10000.0, 0..1, &dev);
        let x = Tensor::<Flex, 4>::random([1, 1, 2, 24], burn::tensor::Distribution::Default, &dev);
        let y = r.apply(x.clone());
        x.into_data()
            .assert_approx_eq::<f32>(&y.into_data(), burn::tensor::Tolerance::absolute(1e-7));
    }

    #[test]
    fn patchify_and_unpatchify_are_inverse_for_matching_layouts() {
        let dev = Default::default();
        let x = Tensor::<Flex, 5>::random([2, 3, 2, 4, 6], burn::tensor::Distribution::Default, &dev);
        let p = patchify(x.clone(), [1, 2, 2]);
        assert_eq!(p.dims(), [2, 2 * 2 * 3, 12]);
        // Reorder features (c, pt, ph, pw) -> (pt, ph, pw, c) to feed unpatchify.
        let p = p
            .reshape([2, 12, 3, 1, 2, 2])
            .permute([0, 1, 3, 4, 5, 2])
            .reshape([2, 12, 12]);
        let y = unpatchify(p, [2, 2, 3], [1, 2, 2], 3);
        x.into_data().assert_eq(&y.into_data(), true);
    }
}
