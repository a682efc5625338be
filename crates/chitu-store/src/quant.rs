//! 8-bit weights: the linear layers' matrices held as int8 with one f32 scale per block.
//!
//! Symmetric absmax blocks along the matrix's contiguous axis (burn's `[in, out]` rows), 64
//! values each, as burn's `QuantScheme` with `Q8S` values and `Block` level describes them, so
//! the tensor is an ordinary quantized burn tensor on any backend that holds that scheme.
//! 64 was chosen by measurement (`examples/bench_dit.rs`, BENCHMARKS.md "8-bit weights"): on a
//! full-width DiT block (std-0.02 weights), blocks of 32 move its update by 7.7e-3 from f32, 64 by
//! 7.8e-3 to 8.3e-3 and 128 by 8.9e-3 to 9.4e-3; 64 costs 6% over one byte a weight where 32 costs
//! 12%, and 64 ran the fastest of the three. A width that is not a multiple of 64 takes the largest power of
//! two that divides it, down to 8; narrower than that the matrix stays in the float precision.

use burn::tensor::quantization::{BlockSize, QuantLevel, QuantMode, QuantParam, QuantScheme, QuantStore, QuantValue};
use burn::tensor::{bf16, f16, Bytes, DType, TensorData};
use rayon::prelude::*;
use std::fmt;
use std::str::FromStr;

/// Values per scale.
pub const INT8_BLOCK: usize = 64;
/// The narrowest block a matrix is quantized with.
const MIN_BLOCK: usize = 8;

/// How the linear layers' weight matrices are held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Weights {
    /// In the load's float [`crate::Precision`].
    #[default]
    Float,
    /// int8, one f32 scale per block of 64 (see the module docs): 1.125 bytes a weight resident.
    Int8,
}

impl Weights {
    /// Every format, in the order the CLI lists them.
    pub const ALL: [Self; 2] = [Self::Float, Self::Int8];

    /// The name on the command line and in sidecars.
    pub fn name(self) -> &'static str {
        match self {
            Self::Float => "float",
            Self::Int8 => "int8",
        }
    }
}

impl fmt::Display for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A weight format name that is not one of `float`, `int8`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown weight format {0:?}: expected float or int8")]
pub struct UnknownWeights(pub String);

impl FromStr for Weights {
    type Err = UnknownWeights;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|w| w.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownWeights(s.to_string()))
    }
}

/// The block a matrix of `width` columns is quantized with, if any.
pub fn block_for(width: usize) -> Option<usize> {
    let block = (width & width.wrapping_neg()).min(INT8_BLOCK);
    (width > 0 && block >= MIN_BLOCK).then_some(block)
}

/// burn's scheme for int8 blocks of `block` values.
pub fn int8_scheme(block: usize) -> QuantScheme {
    QuantScheme {
        value: QuantValue::Q8S,
        param: QuantParam::F32,
        store: QuantStore::Native,
        level: QuantLevel::Block(BlockSize::new([block as u8])),
        mode: QuantMode::Symmetric,
    }
}

/// Bytes a quantized matrix of `elements` values in blocks of `block` keeps resident once
/// loaded: a byte a value, and each block's f32 scale twice (burn-flex unpacks the scales into a
/// list of their own and leaves their bytes after the values, in the buffer they were read in).
pub fn int8_bytes(elements: u64, block: usize) -> u64 {
    elements + 8 * elements / block as u64
}

/// Bytes a loaded tensor of `elements` values in `dtype` keeps resident: its element size, or
/// for int8 blocks [`int8_bytes`].
pub fn tensor_bytes(dtype: DType, elements: u64) -> u64 {
    match dtype {
        DType::QFloat(scheme) => match scheme.level {
            QuantLevel::Block(block) => int8_bytes(elements, block.num_elements()),
            QuantLevel::Tensor => elements + 4,
        },
        dtype => elements * dtype.size() as u64,
    }
}

/// `data` (a float matrix whose last axis is a multiple of `block`) as int8 blocks. A block with a
/// NaN or an infinity gets a NaN scale, so the fault shows in the output (and in `check_nan`)
/// rather than vanishing into zeros.
pub fn quantize_int8(data: &TensorData, block: usize) -> Option<TensorData> {
    // The values, then the scales' bytes, in one buffer of exactly that size: burn's layout of a
    // quantized tensor's data. Built as burn's `TensorData::quantized` does, the buffer grew by
    // reallocation when the scales were appended and was copied again when unpacked: 70% more
    // than the weights stayed resident after a load, which a 14B expert could not afford.
    fn each<T: bytemuck::Pod + Send + Sync>(src: &[T], block: usize, f: fn(T) -> f32) -> Vec<i8> {
        let n = src.len();
        let mut buffer = vec![0i8; n + 4 * (n / block)];
        let (values, tail) = buffer.split_at_mut(n);
        let mut scales = vec![0f32; n / block];
        // Enough blocks per task to amortise rayon's scheduling.
        let per_task = block * 1024;
        values
            .par_chunks_mut(per_task)
            .zip(scales.par_chunks_mut(per_task / block))
            .zip(src.par_chunks(per_task))
            .for_each(|((q, s), x)| {
                for ((q, s), x) in q.chunks_mut(block).zip(s.iter_mut()).zip(x.chunks(block)) {
                    let mut absmax = 0f32;
                    let mut finite = true;
                    for &v in x {
                        let v = f(v);
                        finite &= v.is_finite();
                        absmax = absmax.max(v.abs());
                    }
                    let scale = match (finite, absmax > 0.0) {
                        (false, _) => f32::NAN,
                        (true, true) => absmax / 127.0,
                        (true, false) => 1.0,
                    };
                    let inv = 1.0 / scale;
                    for (q, &v) in q.iter_mut().zip(x) {
                        // Adding and taking away 1.5 * 2^23 rounds to the nearest integer (ties to
                        // even) in plain f32 arithmetic, which vectorises where `round` is a call.
                        const MAGIC: f32 = 12_582_912.0;
                        *q = ((f(v) * inv + MAGIC) - MAGIC).clamp(-127.0, 127.0) as i8;
                    }
                    *s = scale;
                }
            });
        let tail: &mut [u8] = bytemuck::cast_slice_mut(tail);
        tail.copy_from_slice(bytemuck::cast_slice(&scales));
        buffer
    }
    let width = *data.shape.last()?;
    if block == 0 || !width.is_multiple_of(block) {
        return None;
    }
    let buffer = match data.dtype {
        DType::F32 => each(data.as_slice::<f32>().ok()?, block, |v| v),
        DType::BF16 => each(data.as_slice::<bf16>().ok()?, block, bf16::to_f32),
        DType::F16 => each(data.as_slice::<f16>().ok()?, block, f16::to_f32),
        _ => {
            let wide = data.clone().convert_dtype(DType::F32);
            each(wide.as_slice::<f32>().ok()?, block, |v| v)
        }
    };
    Some(TensorData::from_bytes(
        Bytes::from_elems(buffer),
        data.shape.clone(),
        DType::QFloat(int8_scheme(block)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_follow_the_width() {
        assert_eq!(block_for(1536), Some(64));
        assert_eq!(block_for(48), Some(16));
        assert_eq!(block_for(96), Some(32));
        assert_eq!(block_for(12), None);
        assert_eq!(block_for(0), None);
    }

    #[test]
    fn a_round_trip_is_within_half_a_step_of_each_block() {
        let x: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let data = TensorData::new(x.clone(), [4, 64]);
        let q = quantize_int8(&data, 64).unwrap();
        assert!(matches!(q.dtype, DType::QFloat(_)));
        let t = burn::tensor::Tensor::<burn_flex::Flex, 2>::from_data(q, &Default::default());
        let back = t.dequantize().into_data().to_vec::<f32>().unwrap();
        for (row, (x, y)) in x.chunks(64).zip(back.chunks(64)).enumerate() {
            let step = x.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in x.iter().zip(y) {
                assert!((a - b).abs() <= step / 2.0 + 1e-7, "row {row}: {a} vs {b}");
            }
        }
        // A width that the block does not divide is refused.
        assert!(quantize_int8(&TensorData::new(vec![0f32; 48], [1, 48]), 64).is_none());
    }

    #[test]
    fn a_nan_weight_poisons_its_block_instead_of_vanishing() {
        let mut x = vec![0.5f32; 128];
        x[70] = f32::NAN;
        let q = quantize_int8(&TensorData::new(x, [2, 64]), 64).unwrap();
        let t = burn::tensor::Tensor::<burn_flex::Flex, 2>::from_data(q, &Default::default());
        let back = t.dequantize().into_data().to_vec::<f32>().unwrap();
        assert!(back[..64].iter().all(|v| (v - 0.5).abs() < 1e-2));
        assert!(back[64..].iter().all(|v| v.is_nan()));
    }
}
