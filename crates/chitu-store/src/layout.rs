//! PyTorch's tensor layout to burn's, as a checkpoint is read.
//!
//! The same conversion as burn-store's `PyTorchToBurnAdapter` (a `Linear` weight is stored
//! `[out, in]` by PyTorch and `[in, out]` by burn; PyTorch's norms call their affine parameters
//! `weight`/`bias`, burn's `gamma`/`beta`), with a faster transpose. burn-store's walks the
//! destination a column at a time, byte by byte, on one thread: it measured about a minute for
//! the 7 GB of matrices of a full-size Wan2.1-1.3B folder, most of the load. This one moves
//! whole elements in cache-sized tiles, in parallel.

use burn::tensor::{Bytes, TensorData};
use burn_store::{ModuleAdapter, TensorSnapshot};
use rayon::prelude::*;
use std::rc::Rc;

/// The PyTorch-to-burn layout adapter.
#[derive(Clone)]
pub(crate) struct PyTorchLayout;

const LINEAR: &str = "Struct:Linear";
const NORMS: [&str; 3] = ["Struct:BatchNorm", "Struct:LayerNorm", "Struct:GroupNorm"];

impl ModuleAdapter for PyTorchLayout {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let Some(path) = snapshot.path_stack.as_ref() else {
            return snapshot.clone();
        };
        let (Some(param), Some(module)) = (path.last(), snapshot.module_type()) else {
            return snapshot.clone();
        };
        let containers = snapshot.container_stack.clone().unwrap_or_default();
        let id = snapshot.tensor_id.unwrap_or_default();
        if module == LINEAR && param == "weight" && snapshot.shape.len() == 2 {
            let data = snapshot.clone_data_fn();
            let shape = [snapshot.shape[1], snapshot.shape[0]];
            return TensorSnapshot::from_closure(
                Rc::new(move || Ok(transpose(data()?))),
                snapshot.dtype,
                shape.to_vec().into(),
                path.clone(),
                containers,
                id,
            );
        }
        let renamed = match param.as_str() {
            "weight" => "gamma",
            "bias" => "beta",
            _ => return snapshot.clone(),
        };
        if !NORMS.contains(&module.as_str()) {
            return snapshot.clone();
        }
        let mut path = path.clone();
        *path
            .last_mut()
            .unwrap_or_else(|| unreachable!("checked non-empty above")) = renamed.into();
        TensorSnapshot::from_closure(
            snapshot.clone_data_fn(),
            snapshot.dtype,
            snapshot.shape.clone(),
            path,
            containers,
            id,
        )
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// A `[rows, cols]` tensor as `[cols, rows]`, in its own dtype.
fn transpose(data: TensorData) -> TensorData {
    let (rows, cols) = (data.shape[0], data.shape[1]);
    let dtype = data.dtype;
    let bytes = match dtype.size() {
        8 => Bytes::from_elems(transpose_elems::<u64>(data.as_bytes(), rows, cols)),
        4 => Bytes::from_elems(transpose_elems::<u32>(data.as_bytes(), rows, cols)),
        2 => Bytes::from_elems(transpose_elems::<u16>(data.as_bytes(), rows, cols)),
        _ => Bytes::from_elems(transpose_elems::<u8>(data.as_bytes(), rows, cols)),
    };
    TensorData {
        bytes,
        shape: vec![cols, rows].into(),
        dtype,
    }
}

/// Side of the square tiles: 64 elements of up to 8 bytes keep a source and a destination
/// tile in a 64 KiB L1-and-L2 working set.
const TILE: usize = 64;

fn transpose_elems<T: bytemuck::Pod + Send + Sync>(raw: &[u8], rows: usize, cols: usize) -> Vec<T> {
    // The bytes may not be aligned for `T`; one aligned copy is cheaper than unaligned reads.
    let src: Vec<T> = match bytemuck::try_cast_slice::<u8, T>(raw) {
        Ok(s) => return transpose_aligned(s, rows, cols),
        Err(_) => bytemuck::pod_collect_to_vec(raw),
    };
    transpose_aligned(&src, rows, cols)
}

fn transpose_aligned<T: bytemuck::Pod + Send + Sync>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut dst = vec![T::zeroed(); rows * cols];
    // Each task writes TILE whole rows of the destination (TILE columns of the source).
    dst.par_chunks_mut(TILE * rows.max(1))
        .enumerate()
        .for_each(|(band, out)| {
            let c0 = band * TILE;
            let width = out.len() / rows.max(1);
            for r0 in (0..rows).step_by(TILE) {
                for c in c0..c0 + width {
                    let line = &mut out[(c - c0) * rows..(c - c0 + 1) * rows];
                    for r in r0..(r0 + TILE).min(rows) {
                        line[r] = src[r * cols + c];
                    }
                }
            }
        });
    dst
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::DType;

    #[test]
    fn transposes_every_element_width_and_odd_shapes() {
        for (rows, cols) in [(1, 1), (3, 5), (70, 130), (129, 64), (1, 200)] {
            // Below 251, so that every element width (u8 too) holds every value.
            let value = |i: usize| (i % 251) as f32;
            let values: Vec<f32> = (0..rows * cols).map(value).collect();
            for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16, DType::U8] {
                let data = TensorData::new(values.clone(), [rows, cols]).convert_dtype(dtype);
                let got = transpose(data.clone());
                assert_eq!(got.shape.to_vec(), vec![cols, rows]);
                assert_eq!(got.dtype, dtype);
                let want: Vec<f32> = (0..cols)
                    .flat_map(|c| (0..rows).map(move |r| value(r * cols + c)))
                    .collect();
                let want = TensorData::new(want, [cols, rows]).convert_dtype(dtype);
                assert_eq!(got.as_bytes(), want.as_bytes(), "{rows}x{cols} {dtype:?}");
            }
        }
    }
}
