//! The VAE's convolutions, with a direct kernel for CPU backends.
//!
//! burn-flex runs a conv as one serial NCDHW -> NDHWC transpose plus a freshly zeroed im2col
//! buffer (27 x C_in x 512 floats, 21 MB at 384 channels) per tile of 512 output pixels. On the
//! Wan VAE decode that overhead cost as much time as the GEMMs themselves (BENCHMARKS.md).
//!
//! [`conv3d_host`] avoids both: it pads the input once, then computes every output frame on the
//! padded grid, where each kernel tap is a *constant shift* of the flattened input. Each tap is
//! therefore one GEMM over a strided view of the input (no im2col), accumulated into a small
//! per-tile buffer that stays in cache; the columns that fall in the padding are dropped when
//! the tile is written out.

use crate::scratch::{self, par_zeroed, par_zeroed_in};
use burn::tensor::module::{conv2d, conv3d};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use chitu_host::{exp, HostF32};
use rayon::prelude::*;

/// Output columns (pixels of the padded grid) per tile: enough for the GEMM to run at full
/// speed, small enough that a tile's accumulator (`c_out` x this) stays in L2. 1024 measured
/// 7% faster than 512 and 4% faster than 2048 on the VAE benchmark (BENCHMARKS.md).
const TILE: usize = 1024;

/// Whether the host kernels serve a conv of `x` with `weight`: both f32 on a CPU backend, where a
/// tensor's data already is host memory and reading it out costs nothing.
pub(crate) fn on_host<B: Backend, const D: usize, const E: usize>(x: &Tensor<B, D>, weight: &Tensor<B, E>) -> bool {
    #[cfg(test)]
    if tests::GENERIC_ONLY.with(|g| g.get()) {
        return false;
    }
    chitu_host::is_host_f32(x) && weight.dtype() == DType::F32
}

/// What the host path applies to `x` while it writes the padded conv input.
pub(crate) enum Prologue<'a> {
    /// Copies `x` as it is.
    Copy,
    /// Wan's channel RMS norm (gamma already times `sqrt(C)`), then SiLU.
    NormSilu(&'a [f32]),
    /// Nearest 2x upsampling in space.
    Upsample2x,
}

/// A conv input on the host, zero-padded: `[N, C, D, H + 2 pad, W + 2 pad]`.
pub(crate) struct Padded {
    data: Vec<f32>,
    shape: [usize; 5],
    pad: usize,
}

/// A raw pointer that parallel tasks may share because each writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: only used to write disjoint elements of one buffer from parallel tasks.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Writes `v` at `i`.
    ///
    /// # Safety
    /// `i` is inside the buffer, and no other task reads or writes element `i`.
    unsafe fn write(self, i: usize, v: f32) {
        unsafe { *self.0.add(i) = v }
    }

    /// The `len` elements from `i` on, to write as a slice.
    ///
    /// # Safety
    /// The run is inside the buffer, and no other task reads or writes it while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn run<'a>(self, i: usize, len: usize) -> &'a mut [f32] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(i), len) }
    }
}

/// Pixels per norm task: a chunk's channel sums stay in L1.
const NORM_CHUNK: usize = 2048;

/// Builds the padded input of a causal conv along time: `zero_t` zero frames, then the frames of
/// `prev` (`[N, C, Tp, H, W]`, taken as they are), then `prologue(x)` (`x` is `[N, C, T, h, w]`),
/// all padded by `pad` zeros on each side in space.
pub(crate) fn assemble(
    x: &[f32],
    xs: [usize; 5],
    prev: Option<(&[f32], usize)>,
    zero_t: usize,
    pad: usize,
    prologue: Prologue,
) -> Padded {
    let [n, c, t, h, w] = xs;
    let (oh, ow) = match prologue {
        Prologue::Upsample2x => (2 * h, 2 * w),
        _ => (h, w),
    };
    let tp = prev.map_or(0, |p| p.1);
    let (d, hp, wp) = (zero_t + tp + t, oh + 2 * pad, ow + 2 * pad);
    let plane = hp * wp;
    let mut data = scratch::zeroed(n * c * d * plane);
    let out = OutPtr(data.as_mut_ptr());
    // Index of padded element (b, ch, frame, y, x) with (y, x) in unpadded coordinates.
    let at = move |b: usize, ch: usize, f: usize, y: usize, xx: usize| {
        ((b * c + ch) * d + f) * plane + (y + pad) * wp + xx + pad
    };
    // SAFETY (all writes below): every task writes the interior of its own frames, pixels or
    // rows, which no other task touches, and `at` stays inside `data`.
    if let Some((p, _)) = prev {
        (0..n * c).into_par_iter().for_each(|bc| {
            let (b, ch) = (bc / c, bc % c);
            for f in 0..tp {
                for y in 0..h {
                    let src = &p[((bc * tp + f) * h + y) * w..][..w];
                    for (xx, &v) in src.iter().enumerate() {
                        unsafe { out.write(at(b, ch, zero_t + f, y, xx), v) };
                    }
                }
            }
        });
    }
    let f0 = zero_t + tp;
    match prologue {
        Prologue::Copy | Prologue::Upsample2x => {
            let up = matches!(prologue, Prologue::Upsample2x);
            (0..n * c * t).into_par_iter().for_each(|bcf| {
                let (b, ch, f) = (bcf / (c * t), bcf / t % c, bcf % t);
                for y in 0..h {
                    let src = &x[(bcf * h + y) * w..][..w];
                    for (xx, &v) in src.iter().enumerate() {
                        if up {
                            for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                                unsafe { out.write(at(b, ch, f0 + f, 2 * y + dy, 2 * xx + dx), v) };
                            }
                        } else {
                            unsafe { out.write(at(b, ch, f0 + f, y, xx), v) };
                        }
                    }
                }
            });
        }
        Prologue::NormSilu(gamma) => {
            let hw = h * w;
            let chunks = hw.div_ceil(NORM_CHUNK);
            (0..n * t * chunks).into_par_iter().for_each(|task| {
                let (b, f, k) = (task / (t * chunks), task / chunks % t, task % chunks);
                let (p0, p1) = (k * NORM_CHUNK, (k * NORM_CHUNK + NORM_CHUNK).min(hw));
                let src = |ch: usize| &x[((b * c + ch) * t + f) * hw..][p0..p1];
                let mut norm = vec![0.0f32; p1 - p0];
                for ch in 0..c {
                    for (s, &v) in norm.iter_mut().zip(src(ch)) {
                        *s += v * v;
                    }
                }
                for s in &mut norm {
                    *s = s.sqrt().max(1e-12);
                }
                for (ch, &g) in gamma.iter().enumerate() {
                    // Row by row, so that the destination is a plain run (no index division
                    // per element).
                    let (src, mut p) = (src(ch), p0);
                    while p < p1 {
                        let (y, x0) = (p / w, p % w);
                        let end = p1.min((y + 1) * w);
                        // SAFETY: the run is inside `data`, and this task alone writes it.
                        let dst = unsafe { out.run(at(b, ch, f0 + f, y, x0), end - p) };
                        let (src, norm) = (&src[p - p0..end - p0], &norm[p - p0..end - p0]);
                        for ((d, &v), &s) in dst.iter_mut().zip(src).zip(norm) {
                            let y = v / s * g;
                            *d = y / (1.0 + exp(-y));
                        }
                        p = end;
                    }
                }
            });
        }
    }
    Padded {
        data,
        shape: [n, c, d, hp, wp],
        pad,
    }
}

impl Drop for Padded {
    fn drop(&mut self) {
        scratch::give(std::mem::take(&mut self.data));
    }
}

impl Padded {
    /// The last `count` frames, unpadded: `[N, C, count, H, W]`, written into `spent` (a spent
    /// buffer of the same size, when there is one: these are what a layer's feature cache holds,
    /// tens of MB at the top of a decode, and fresh pages cost more than the copy).
    fn last_frames(&self, count: usize, spent: Vec<f32>) -> (Vec<f32>, [usize; 5]) {
        let [n, c, d, hp, wp] = self.shape;
        let (h, w) = (hp - 2 * self.pad, wp - 2 * self.pad);
        let mut out = par_zeroed_in(spent, n * c * count * h * w);
        out.par_chunks_mut(count * h * w).enumerate().for_each(|(bc, dst)| {
            for (k, f) in (d - count..d).enumerate() {
                for y in 0..h {
                    let row = ((bc * d + f) * hp + y + self.pad) * wp + self.pad;
                    dst[(k * h + y) * w..][..w].copy_from_slice(&self.data[row..row + w]);
                }
            }
        });
        (out, [n, c, count, h, w])
    }
}

/// Direct 3-D convolution of a padded host input with `w` (`[C_out, C_in, kD, kH, kW]`,
/// contiguous): stride `stride_d` in time, 1 in space, no dilation, one group. Returns the
/// output and its shape.
///
/// Panics if the channel counts disagree or the kernel is larger than the padded input; the
/// callers are the VAE's own layers, whose shapes are fixed when the model is built.
pub(crate) fn conv3d_padded(
    xp: &Padded,
    w: &[f32],
    ws: [usize; 5],
    bias: Option<&[f32]>,
    stride_d: usize,
) -> (Vec<f32>, [usize; 5]) {
    let [n, ci, dp, hp, wp] = xp.shape;
    let [co, wci, kd, kh, kw] = ws;
    assert_eq!(ci, wci, "conv3d: input has {ci} channels, weight expects {wci}");
    assert_eq!(w.len(), ws.iter().product::<usize>(), "conv3d: weight length");
    assert!(
        kd <= dp && kh <= hp && kw <= wp && stride_d > 0,
        "conv3d: kernel {ws:?} larger than padded input {:?}",
        xp.shape
    );
    let (od, oh, ow) = ((dp - kd) / stride_d + 1, hp - kh + 1, wp - kw + 1);
    let xp = &xp.data[..];
    let plane = hp * wp;
    let chan = dp * plane;
    // Frame `f` of the output, column `j` (= y * wp + x on the padded grid) reads tap
    // (a, b, c) at input offset `f * stride_d * plane + j + (a * plane + b * wp + c)`. Columns
    // with x >= ow wrap into the next row; they are computed and dropped.
    let cols = (oh - 1) * wp + ow;
    let taps: Vec<usize> = (0..kd)
        .flat_map(|a| (0..kh).flat_map(move |b| (0..kw).map(move |c| a * plane + b * wp + c)))
        .collect();
    let k_vol = taps.len();
    // A constant width: narrower tiles for small layers, to give more threads work, measured
    // slower, as every tile packs the whole weight again.
    let tile = TILE;
    let tiles: Vec<(usize, usize, usize)> = (0..n)
        .flat_map(|b| (0..od).map(move |f| (b, f)))
        .flat_map(|(b, f)| (0..cols.div_ceil(tile)).map(move |t| (b, f, t * tile)))
        .collect();

    let mut out = par_zeroed(n * co * od * oh * ow);
    let dst = OutPtr(out.as_mut_ptr());
    tiles.par_iter().for_each_init(
        || vec![0.0f32; co * tile],
        |acc, &(b, f, j0)| {
            let nt = tile.min(cols - j0);
            let base = b * ci * chan + f * stride_d * plane + j0;
            for (t, &off) in taps.iter().enumerate() {
                // SAFETY: `acc` holds co x tile >= co x nt; tap t of weight row (o, i) is at
                // o * ci * k_vol + i * k_vol + t < w.len(); the input view's last element is at
                // base + off + (ci - 1) * chan + nt - 1 <= (b + 1) * ci * chan - 1, since the
                // last column of the last frame under the last tap is the padded input's last
                // element.
                unsafe {
                    gemm::gemm(
                        co,
                        nt,
                        ci,
                        acc.as_mut_ptr(),
                        1,
                        nt as isize,
                        t > 0,
                        w.as_ptr().add(t),
                        k_vol as isize,
                        (ci * k_vol) as isize,
                        xp.as_ptr().add(base + off),
                        1,
                        chan as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
            // Copy the valid columns out, one row segment at a time.
            for c in 0..co {
                let row = &acc[c * nt..(c + 1) * nt];
                let bias_c = bias.map_or(0.0, |bs| bs[c]);
                let frame = ((b * co + c) * od + f) * oh * ow;
                let mut j = j0;
                while j < j0 + nt {
                    let (y, x0) = (j / wp, j % wp);
                    for jj in j..(j - x0 + ow).min(j0 + nt) {
                        // SAFETY: (b, c, f, y, jj - row start) is inside the output, and each
                        // output element belongs to exactly one tile.
                        unsafe { dst.write(frame + y * ow + jj - (j - x0), row[jj - j0] + bias_c) };
                    }
                    j = j - x0 + wp;
                }
            }
        },
    );
    (out, [n, co, od, oh, ow])
}

/// A causal conv on the host: input `[zero_t zero frames | prev | prologue(x)]`, padded by `pad`
/// in space. Returns the output and, when `keep > 0`, the last `keep` frames of the input (what
/// the feature cache holds for the next chunk).
#[allow(clippy::too_many_arguments)]
pub(crate) fn causal_conv_host<B: Backend>(
    x: Tensor<B, 5>,
    prev: Option<Tensor<B, 5>>,
    zero_t: usize,
    pad: usize,
    prologue: Prologue,
    weight: Tensor<B, 5>,
    bias: Tensor<B, 1>,
    stride_d: usize,
    keep: usize,
) -> (Tensor<B, 5>, Option<Tensor<B, 5>>) {
    let device = x.device();
    let xs = x.dims();
    let ws = weight.dims();
    // In place: the weights are shared with the layer, so `into_data` would copy them on every
    // call.
    let prev = prev.map(|p| (p.dims()[2], HostF32::new(p)));
    let (x, w, b) = (HostF32::new(x), HostF32::new(weight), HostF32::new(bias));
    let padded = assemble(
        x.as_slice(),
        xs,
        prev.as_ref().map(|(tp, d)| (d.as_slice(), *tp)),
        zero_t,
        pad,
        prologue,
    );
    drop(x);
    // The cached frames just read make room for the ones kept now.
    let spent = prev.and_then(|(_, p)| p.into_reusable()).unwrap_or_default();
    let (out, shape) = conv3d_padded(&padded, w.as_slice(), ws, Some(b.as_slice()), stride_d);
    let tensor = |v: Vec<f32>, s: [usize; 5]| Tensor::from_data(TensorData::new(v, s), &device);
    let kept = (keep > 0).then(|| {
        let (v, s) = padded.last_frames(keep, spent);
        tensor(v, s)
    });
    (tensor(out, shape), kept)
}

/// A 3-D convolution `[N, C_in, D, H, W] -> [N, C_out, D', H', W']`: stride only in time, zero
/// padding `pad` in space only. On CPU backends it runs the host kernel.
pub(crate) fn conv3d_t<B: Backend>(
    x: Tensor<B, 5>,
    weight: Tensor<B, 5>,
    bias: Tensor<B, 1>,
    stride_d: usize,
    pad: usize,
) -> Tensor<B, 5> {
    if on_host(&x, &weight) {
        return causal_conv_host(x, None, 0, pad, Prologue::Copy, weight, bias, stride_d, 0).0;
    }
    conv3d(
        x,
        weight,
        Some(bias),
        ConvOptions::new([stride_d, 1, 1], [0, pad, pad], [1, 1, 1], 1),
    )
}

/// A 2-D convolution `[N, C_in, H, W] -> [N, C_out, H', W']` with stride `stride` and zero
/// padding `padding` on both sides. Stride 1 on CPU backends runs the host kernel.
pub(crate) fn conv2d_s<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Tensor<B, 1>,
    stride: usize,
    padding: usize,
) -> Tensor<B, 4> {
    if stride == 1 && on_host(&x, &weight) {
        return conv3d_t(x.unsqueeze_dim(2), weight.unsqueeze_dim(2), bias, 1, padding).squeeze_dim(2);
    }
    conv2d(
        x,
        weight,
        Some(bias),
        ConvOptions::new([stride, stride], [padding, padding], [1, 1], 1),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use burn::tensor::activation::silu;
    use burn::tensor::ops::PadMode;
    use burn::tensor::Distribution;
    use burn_flex::Flex;

    type B = Flex;

    thread_local! {
        /// Set by tests that compare the host kernels with the generic tensor path on the same
        /// CPU backend: [`on_host`] then answers no on this thread.
        pub(crate) static GENERIC_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn rand<const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    fn max_err<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b).abs().max().into_scalar()
    }

    /// The host kernel against burn's conv3d on the same data.
    fn check(xs: [usize; 5], ws: [usize; 5], stride_d: usize, pad: usize) {
        let (x, w, bias) = (rand(xs), rand(ws), rand([ws[0]]));
        let want = conv3d(
            x.clone(),
            w.clone(),
            Some(bias.clone()),
            ConvOptions::new([stride_d, 1, 1], [0, pad, pad], [1, 1, 1], 1),
        );
        let err = max_err(conv3d_t(x, w, bias, stride_d, pad), want);
        assert!(
            err < 1e-3,
            "x {xs:?} w {ws:?} stride {stride_d} pad {pad}: max err {err}"
        );
    }

    #[test]
    fn matches_burn_conv3d() {
        // 3x3x3 with spatial padding, wide enough for several tiles with ragged rows.
        check([1, 5, 4, 21, 37], [7, 5, 3, 3, 3], 1, 1);
        // A batch of two.
        check([2, 3, 3, 6, 5], [4, 3, 3, 3, 3], 1, 1);
        // The time conv of a downsampler: kernel 3x1x1, stride 2 in time.
        check([1, 6, 5, 7, 9], [6, 6, 3, 1, 1], 2, 0);
        // 1x1x1 shortcut and a single output channel.
        check([1, 8, 3, 4, 4], [1, 8, 1, 1, 1], 1, 0);
        // A 2-D conv as a kD = 1 conv over frames.
        check([1, 4, 3, 10, 11], [5, 4, 1, 3, 3], 1, 1);
    }

    #[test]
    fn conv2d_matches_burn() {
        let (x, w, bias) = (rand([2, 3, 9, 8]), rand([4, 3, 3, 3]), rand([4]));
        let want = conv2d(
            x.clone(),
            w.clone(),
            Some(bias.clone()),
            ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
        );
        let err = max_err(conv2d_s(x, w, bias, 1, 1), want);
        assert!(err < 1e-4, "conv2d max err {err}");
    }

    /// Cached frames, zero frames, the fused norm + SiLU and the kept frames against the
    /// generic tensor ops.
    #[test]
    fn causal_norm_silu_matches_tensor_ops() {
        let (c, h, w) = (6, 45, 50); // 2,250 pixels: two norm chunks.
        let (x, prev, gamma) = (rand([1, c, 2, h, w]), rand([1, c, 1, h, w]), rand([c]));
        let (wt, bias) = (rand([5, c, 3, 3, 3]), rand([5]));
        let g = gamma.clone() * (c as f64).sqrt();
        let g_host = g.clone().into_data();

        let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
        let y = silu(x.clone() / norm * g.reshape([1, c, 1, 1, 1]));
        let input = Tensor::cat(vec![prev.clone(), y.clone()], 2).pad([(1, 0), (0, 0), (0, 0)], PadMode::Constant(0.0));
        let want = conv3d(
            input,
            wt.clone(),
            Some(bias.clone()),
            ConvOptions::new([1, 1, 1], [0, 1, 1], [1, 1, 1], 1),
        );
        let (got, kept) = causal_conv_host(
            x,
            Some(prev.clone()),
            1,
            1,
            Prologue::NormSilu(g_host.as_slice().unwrap()),
            wt,
            bias,
            1,
            2,
        );
        let err = max_err(got, want);
        assert!(err < 1e-3, "conv after norm + silu: max err {err}");
        let err = max_err(kept.unwrap(), y);
        assert!(err < 1e-5, "kept frames: max err {err}");
    }

    #[test]
    fn upsample_matches_tensor_ops() {
        let (x, wt, bias) = (rand([1, 3, 2, 5, 7]), rand([4, 3, 1, 3, 3]), rand([4]));
        let up: Tensor<B, 7> = x.clone().reshape([1, 3, 2, 5, 1, 7, 1]);
        let up: Tensor<B, 5> = up.expand([1, 3, 2, 5, 2, 7, 2]).reshape([1, 3, 2, 10, 14]);
        let want = conv3d_t(up, wt.clone(), bias.clone(), 1, 1);
        let (got, _) = causal_conv_host(x, None, 0, 1, Prologue::Upsample2x, wt, bias, 1, 0);
        let err = max_err(got, want);
        assert!(err < 1e-4, "upsample conv: max err {err}");
    }
}
