//! Safetensors files read tensor by tensor with plain reads.
//!
//! burn-store memory-maps a safetensors file and copies each tensor out of the map. Every page it
//! reads stays resident (and counted in the process's RSS) until the whole load ends, so loading
//! held the checkpoint twice: 5.7 GB of map plus 5.7 GB of tensors for the UMT5 benchmark model,
//! 28 GB plus 57 GB for a Wan2.1-14B DiT in bf16 loaded as f32. Reading each tensor into its own
//! buffer when the module asks for it keeps at most one tensor beyond the model; the file's pages
//! stay in the OS page cache, which RSS does not count.

use crate::LoadError;
use burn::module::ParamId;
use burn::tensor::{Bytes, DType, Shape, TensorData};
use burn_store::{TensorSnapshot, TensorSnapshotError};
use std::cell::RefCell;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::rc::Rc;

/// The largest header we accept (safetensors' own limit).
const MAX_HEADER: u64 = 100_000_000;

/// burn's dtype and the element size of a safetensors dtype name.
fn dtype(name: &str) -> Option<(DType, usize)> {
    Some(match name {
        "F64" => (DType::F64, 8),
        "F32" => (DType::F32, 4),
        "F16" => (DType::F16, 2),
        "BF16" => (DType::BF16, 2),
        "I64" => (DType::I64, 8),
        "I32" => (DType::I32, 4),
        "I16" => (DType::I16, 2),
        "I8" => (DType::I8, 1),
        "U64" => (DType::U64, 8),
        "U32" => (DType::U32, 4),
        "U8" => (DType::U8, 1),
        _ => return None,
    })
}

/// `len` bytes at `at`, in a buffer of `T`s. burn takes a `Vec<u8>` (`Bytes::from_bytes_vec`)
/// only after copying it to 16-byte alignment, which for a 4 GB embedding table meant 8 GB at
/// once; a buffer of the element's own width is taken as it is.
fn read_elems<T: bytemuck::Pod + Send + Sync>(f: &mut File, at: u64, len: usize) -> std::io::Result<Bytes> {
    let mut buf = vec![T::zeroed(); len / std::mem::size_of::<T>()];
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(bytemuck::cast_slice_mut(&mut buf))?;
    Ok(Bytes::from_elems(buf))
}

/// Where one tensor of a safetensors file lies.
pub(crate) struct Entry {
    pub name: String,
    pub dtype: DType,
    /// Bytes per element.
    pub size: usize,
    pub shape: Vec<usize>,
    /// Absolute offset of the first byte.
    pub at: u64,
    pub bytes: u64,
    /// Stored as fp8 e4m3fn bytes (`dtype` is then `U8`), read as f32 times `fp8_scale`
    /// (see `fp8.rs`).
    pub fp8: bool,
    pub fp8_scale: f32,
}

/// The open file and its tensors, with every entry checked to lie inside the file.
pub(crate) fn header(path: &Path) -> Result<(File, Vec<Entry>), LoadError> {
    let io = |e| LoadError::io(path, e);
    let bad = |why: String| LoadError::malformed(path, format!("not a valid safetensors file: {why}"));
    let mut file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| bad("shorter than its 8-byte header length".into()))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || 8 + n > file_len {
        return Err(bad(format!(
            "header length {n} does not fit the file's {file_len} bytes"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(io)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    let data_start = 8 + n;
    let mut out = Vec::with_capacity(header.len());
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let field = |k: &str| info.get(k).ok_or_else(|| bad(format!("tensor {name} has no {k}")));
        let dt_name = field("dtype")?.as_str().unwrap_or_default().to_owned();
        let fp8 = dt_name == "F8_E4M3";
        let (dtype, size) = match fp8 {
            true => (DType::U8, 1),
            false => dtype(&dt_name).ok_or_else(|| bad(format!("tensor {name} has unsupported dtype {dt_name:?}")))?,
        };
        let ints = |k: &str| -> Result<Vec<u64>, LoadError> {
            field(k)?
                .as_array()
                .and_then(|a| a.iter().map(|v| v.as_u64()).collect::<Option<Vec<_>>>())
                .ok_or_else(|| bad(format!("tensor {name}: {k} is not a list of integers")))
        };
        let shape: Vec<usize> = ints("shape")?.into_iter().map(|d| d as usize).collect();
        let offsets = ints("data_offsets")?;
        let [start, end] = offsets[..] else {
            return Err(bad(format!(
                "tensor {name}: data_offsets has {} entries",
                offsets.len()
            )));
        };
        // Checked: a hostile header must give an error, not an overflow.
        let bytes = shape.iter().try_fold(size as u64, |acc, &d| acc.checked_mul(d as u64));
        let fits = data_start.checked_add(end).is_some_and(|e| e <= file_len);
        let Some(bytes) = bytes.filter(|&b| end >= start && end - start == b && fits) else {
            let bytes = bytes.map_or("an overflowing number of".to_owned(), |b| b.to_string());
            return Err(bad(format!(
                "tensor {name} ({dt_name} {shape:?}) has data_offsets [{start}, {end}], \
                 which do not hold its {bytes} bytes inside the file"
            )));
        };
        out.push(Entry {
            name,
            dtype,
            size,
            shape,
            at: data_start + start,
            bytes,
            fp8,
            fp8_scale: 1.0,
        });
    }
    Ok((file, out))
}

/// One lazy snapshot per tensor of the safetensors file at `path`; reading a snapshot's data
/// reads that tensor's bytes from the file.
pub(crate) fn snapshots(path: &Path) -> Result<Vec<TensorSnapshot>, LoadError> {
    let (mut file, entries) = header(path)?;
    let entries = crate::fp8::resolve(path, &mut file, entries)?;
    Ok(snapshots_of(file, &entries))
}

/// One lazy snapshot per entry of a [`header`], reading from `file`.
pub(crate) fn snapshots_of(file: File, entries: &[Entry]) -> Vec<TensorSnapshot> {
    let file = Rc::new(RefCell::new(file));
    let mut out = Vec::with_capacity(entries.len());
    let lut = Rc::new(crate::fp8::table());
    for e in entries {
        let (file, name) = (file.clone(), e.name.clone());
        let (at, bytes, size, dtype, shape) = (e.at, e.bytes as usize, e.size, e.dtype, e.shape.clone());
        let (fp8, scale, lut) = (e.fp8, e.fp8_scale, lut.clone());
        let read = Rc::new(move || -> Result<TensorData, TensorSnapshotError> {
            let mut f = file.borrow_mut();
            if fp8 {
                let mut raw = vec![0u8; bytes];
                f.seek(SeekFrom::Start(at))
                    .and_then(|_| f.read_exact(&mut raw))
                    .map_err(|err| TensorSnapshotError::IoError(format!("reading tensor {name}: {err}")))?;
                let wide: Vec<f32> = raw.iter().map(|&b| lut[b as usize] * scale).collect();
                return Ok(TensorData::new(wide, shape.clone()));
            }
            let data = match size {
                8 => read_elems::<u64>(&mut f, at, bytes),
                4 => read_elems::<u32>(&mut f, at, bytes),
                2 => read_elems::<u16>(&mut f, at, bytes),
                _ => read_elems::<u8>(&mut f, at, bytes),
            }
            .map_err(|err| TensorSnapshotError::IoError(format!("reading tensor {name}: {err}")))?;
            Ok(TensorData {
                bytes: data,
                shape: Shape::from(shape.clone()),
                dtype,
            })
        });
        let path_parts = e.name.split('.').map(str::to_owned).collect();
        out.push(TensorSnapshot::from_closure(
            read,
            if e.fp8 { DType::F32 } else { e.dtype },
            Shape::from(e.shape.clone()),
            path_parts,
            Vec::new(),
            ParamId::new(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(bytes: &[u8]) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn file_with(header: &str, data: &[u8]) -> tempfile::NamedTempFile {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        write(&bytes)
    }

    #[test]
    fn reads_each_tensor_on_demand() {
        let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let f = file_with(
            r#"{"__metadata__":{"format":"pt"},"a.w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}"#,
            &data,
        );
        let snaps = snapshots(f.path()).unwrap();
        assert_eq!(snaps.len(), 2);
        let a = snaps.iter().find(|s| s.full_path() == "a.w").unwrap();
        assert_eq!(a.to_data().unwrap().to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        let b = snaps.iter().find(|s| s.full_path() == "b").unwrap();
        assert_eq!(b.to_data().unwrap().to_vec::<f32>().unwrap(), vec![5.0, 6.0]);
    }

    #[test]
    fn refuses_malformed_files() {
        let err = |f: tempfile::NamedTempFile| snapshots(f.path()).unwrap_err().to_string();
        assert!(err(write(&[1, 2, 3])).contains("shorter than"));
        assert!(err(write(&u64::MAX.to_le_bytes())).contains("header length"));
        assert!(err(file_with("[1]", &[])).contains("not a JSON object"));
        let e = err(file_with(
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            &[0; 8],
        ));
        assert!(e.contains("tensor a") && e.contains("inside the file"), "{e}");
        let e = err(file_with(
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#,
            &[0; 16],
        ));
        assert!(e.contains("12 bytes"), "{e}");
        let huge = format!(
            r#"{{"a":{{"dtype":"F32","shape":[{0},{0}],"data_offsets":[0,8]}}}}"#,
            u64::MAX / 2
        );
        let e = err(file_with(&huge, &[0; 8]));
        assert!(e.contains("overflowing"), "{e}");
        let e = err(file_with(
            r#"{"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}"#,
            &[0; 8],
        ));
        assert!(e.contains("unsupported dtype"), "{e}");
    }
}
