//! Host-side tensors read from a case's safetensors file, and the comparison metric.

use super::ParityError;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

/// Values of one stored tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    /// Float data (f32, or f16/bf16/f64 widened or narrowed to f32).
    F32(Vec<f32>),
    /// Integer data (token ids, masks), compared exactly.
    I64(Vec<i64>),
}

/// One stored tensor: shape plus values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// The tensor's shape.
    pub shape: Vec<usize>,
    /// Its elements, in the file's dtype.
    pub values: Values,
}

impl HostTensor {
    /// A float tensor.
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        Self {
            shape,
            values: Values::F32(data),
        }
    }

    /// The float values, or an error naming the tensor if it holds integers.
    pub fn as_f32(&self, name: &str) -> Result<&[f32], ParityError> {
        match &self.values {
            Values::F32(v) => Ok(v),
            Values::I64(_) => Err(ParityError::Case(format!("tensor {name} is integer, expected float"))),
        }
    }

    /// Moves the tensor to a backend as rank `D`, folding extra leading axes into the first or
    /// adding leading axes of size 1. Elementwise code (schedulers) accepts any such view.
    pub fn to_backend<B: Backend, const D: usize>(
        &self,
        name: &str,
        device: &B::Device,
    ) -> Result<Tensor<B, D>, ParityError> {
        let data = self.as_f32(name)?.to_vec();
        let shape = fold_shape::<D>(&self.shape);
        Ok(Tensor::from_data(TensorData::new(data, shape), device))
    }

    /// Reads a backend tensor back to the host.
    pub fn from_backend<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Self, ParityError> {
        let shape = t.dims().to_vec();
        let data = t
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| ParityError::Case(format!("reading tensor back: {e:?}")))?;
        Ok(Self::f32(shape, data))
    }
}

/// Reshapes `shape` to rank `D` without moving data.
pub fn fold_shape<const D: usize>(shape: &[usize]) -> [usize; D] {
    let mut out = [1usize; D];
    if shape.len() <= D {
        out[D - shape.len()..].copy_from_slice(shape);
    } else {
        let extra = shape.len() - D;
        out[0] = shape[..=extra].iter().product();
        out[1..].copy_from_slice(&shape[extra + 1..]);
    }
    out
}

/// Loads every tensor of a safetensors file.
pub fn load_safetensors(path: &Path) -> Result<HashMap<String, HostTensor>, ParityError> {
    let bytes = std::fs::read(path).map_err(|e| ParityError::Io(path.display().to_string(), e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| ParityError::Case(format!("{}: not a valid safetensors file: {e}", path.display())))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let values = match view.dtype() {
            Dtype::F32 => Values::F32(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            Dtype::F64 => Values::F32(
                raw.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                    .collect(),
            ),
            Dtype::BF16 => Values::F32(
                raw.chunks_exact(2)
                    .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                    .collect(),
            ),
            Dtype::F16 => Values::F32(
                raw.chunks_exact(2)
                    .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                    .collect(),
            ),
            Dtype::I64 => Values::I64(
                raw.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ),
            Dtype::I32 => Values::I64(
                raw.chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                    .collect(),
            ),
            other => {
                return Err(ParityError::Case(format!(
                    "{}: tensor {name} has unsupported dtype {other:?}",
                    path.display()
                )))
            }
        };
        out.insert(
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                values,
            },
        );
    }
    Ok(out)
}

/// `||out - ref|| / ||ref||` (plain `||out - ref||` when the reference is all zeros).
pub fn rel_l2(out: &[f32], reference: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        let d = o as f64 - r as f64;
        num += d * d;
        den += (r as f64) * (r as f64);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Compares an output with its reference: shape and dtype must agree, integers exactly,
/// floats by [`rel_l2`]. Returns the rel_l2 (0 for exact integer equality, +inf for any mismatch).
pub fn compare(name: &str, out: &HostTensor, reference: &HostTensor) -> Result<f64, ParityError> {
    // Shapes first, ignoring only unit axes (a batch of one stored with or without its axis,
    // which moves no element): the same elements in another layout are a different tensor.
    let core = |s: &[usize]| s.iter().filter(|&&d| d != 1).copied().collect::<Vec<_>>();
    if core(&out.shape) != core(&reference.shape) {
        return Err(ParityError::Case(format!(
            "output {name}: shape {:?} differs from reference {:?}",
            out.shape, reference.shape
        )));
    }
    match (&out.values, &reference.values) {
        (Values::F32(o), Values::F32(r)) => {
            let e = rel_l2(o, r);
            Ok(if e.is_nan() { f64::INFINITY } else { e })
        }
        (Values::I64(o), Values::I64(r)) => Ok(if o == r { 0.0 } else { f64::INFINITY }),
        _ => Err(ParityError::Case(format!(
            "output {name}: float/integer type differs from reference"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_shape_pads_and_folds() {
        assert_eq!(fold_shape::<5>(&[2, 3]), [1, 1, 1, 2, 3]);
        assert_eq!(fold_shape::<5>(&[10, 1, 16, 2, 4, 4]), [10, 16, 2, 4, 4]);
        assert_eq!(fold_shape::<2>(&[2, 3, 4]), [6, 4]);
    }

    #[test]
    fn rel_l2_is_relative_and_handles_zero_reference() {
        assert_eq!(rel_l2(&[1.0, 1.0], &[1.0, 1.0]), 0.0);
        assert!((rel_l2(&[1.1, 0.0], &[1.0, 0.0]) - 0.1).abs() < 1e-6);
        assert_eq!(rel_l2(&[3.0, 4.0], &[0.0, 0.0]), 5.0);
    }

    #[test]
    fn a_reference_of_another_shape_is_refused_even_with_the_same_count() {
        let video = |shape: Vec<usize>| HostTensor::f32(shape, vec![0.5; 5 * 32 * 32 * 3]);
        let out = video(vec![1, 5, 32, 32, 3]);
        let e = compare("frames", &out, &video(vec![1, 3, 5, 16, 64]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("shape") && e.contains("frames"), "{e}");
        // Unit axes move no element: with or without the batch axis is the same tensor.
        assert_eq!(compare("frames", &out, &video(vec![5, 32, 32, 3])).unwrap(), 0.0);
    }

    #[test]
    fn integer_mismatch_is_infinite() {
        let a = HostTensor {
            shape: vec![2],
            values: Values::I64(vec![1, 2]),
        };
        let b = HostTensor {
            shape: vec![2],
            values: Values::I64(vec![1, 3]),
        };
        assert_eq!(compare("x", &a, &a).unwrap(), 0.0);
        assert!(compare("x", &a, &b).unwrap().is_infinite());
    }
}
