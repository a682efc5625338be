//! A 2-D checkpoint tensor left in its file, whose rows are read when they are looked up.
//!
//! An embedding table is read a few hundred rows at a time: UMT5-XXL's is 256,384 × 4,096
//! (4 GiB as f32, a fifth of the encoder) and a 512-token prompt touches at most 512 of its rows.
//! PyTorch gets the same saving from its memory map, whose untouched pages are never read. Plain
//! reads do it without `unsafe`, cost nothing in RSS (the file's pages sit in the OS page cache),
//! and a file truncated under us gives an error instead of a `SIGBUS`.

use crate::{file, is_pickle, remapper, LoadError};
use burn::tensor::{bf16, f16, DType};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Rows of one float matrix of a safetensors file, read on demand and returned as f32.
pub struct FileRows {
    path: PathBuf,
    name: String,
    file: Mutex<File>,
    at: u64,
    rows: usize,
    cols: usize,
    dtype: DType,
}

impl std::fmt::Debug for FileRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FileRows({} in {}, {:?} [{}, {}])",
            self.name,
            self.path.display(),
            self.dtype,
            self.rows,
            self.cols
        )
    }
}

impl FileRows {
    /// The tensor that `remap` renames to `module_path`, in whichever safetensors file of `files`
    /// holds it; `None` when none does (pickles are not searched: their tensors load whole).
    /// It must be a 2-D f32, f16 or bf16 tensor.
    pub fn find(
        files: &[PathBuf],
        remap: &[(impl AsRef<str>, impl AsRef<str>)],
        module_path: &str,
    ) -> Result<Option<Self>, LoadError> {
        let remapper = remapper(remap)?;
        for path in files {
            if is_pickle(path) {
                continue;
            }
            let (handle, entries) = file::header(path)?;
            // The remapper renames snapshots; these are never read.
            let reader = handle.try_clone().map_err(|e| LoadError::io(path, e))?;
            let (_, names) = remapper.remap(file::snapshots_of(reader, &entries));
            let Some((_, original)) = names.into_iter().find(|(new, _)| new == module_path) else {
                continue;
            };
            let entry = entries
                .into_iter()
                .find(|e| e.name == original)
                .expect("the header lists every tensor it made a snapshot of");
            let [rows, cols] = entry.shape[..] else {
                return Err(LoadError::malformed(
                    path,
                    format!("tensor {original} has shape {:?}, not a matrix", entry.shape),
                ));
            };
            if !matches!(entry.dtype, DType::F32 | DType::F16 | DType::BF16) {
                return Err(LoadError::malformed(
                    path,
                    format!("tensor {original} is {:?}, not f32, f16 or bf16", entry.dtype),
                ));
            }
            return Ok(Some(Self {
                path: path.clone(),
                name: original,
                file: Mutex::new(handle),
                at: entry.at,
                rows,
                cols,
                dtype: entry.dtype,
            }));
        }
        Ok(None)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Length of a row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The file the rows are read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The rows `ids` names, one after the other (`ids.len() * cols` values). A row wanted more
    /// than once (padding) is read once.
    pub fn gather(&self, ids: &[usize]) -> Result<Vec<f32>, LoadError> {
        if let Some(bad) = ids.iter().find(|&&i| i >= self.rows) {
            return Err(LoadError::malformed(
                &self.path,
                format!("row {bad} of {} asked for, which has {} rows", self.name, self.rows),
            ));
        }
        let cols = self.cols;
        let size = self.dtype.size();
        let mut out = vec![0f32; ids.len() * cols];
        let mut first: HashMap<usize, usize> = HashMap::new();
        let mut raw = vec![0u8; cols * size];
        let mut file = self
            .file
            .lock()
            .map_err(|_| LoadError::malformed(&self.path, "a reader panicked"))?;
        for (slot, &id) in ids.iter().enumerate() {
            let (done, dst) = out.split_at_mut(slot * cols);
            let dst = &mut dst[..cols];
            if let Some(&seen) = first.get(&id) {
                dst.copy_from_slice(&done[seen * cols..(seen + 1) * cols]);
                continue;
            }
            first.insert(id, slot);
            file.seek(SeekFrom::Start(self.at + (id * cols * size) as u64))
                .and_then(|_| file.read_exact(&mut raw))
                .map_err(|e| LoadError::io(&self.path, e))?;
            decode(self.dtype, &raw, dst);
        }
        Ok(out)
    }
}

/// Little-endian `raw` of `dtype` into f32 (exact for f16 and bf16).
fn decode(dtype: DType, raw: &[u8], dst: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (d, b) in dst.iter_mut().zip(raw.chunks_exact(4)) {
                *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::BF16 => {
            for (d, b) in dst.iter_mut().zip(raw.chunks_exact(2)) {
                *d = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        DType::F16 => {
            for (d, b) in dst.iter_mut().zip(raw.chunks_exact(2)) {
                *d = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        other => unreachable!("FileRows::find admits only float matrices, not {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(header: &str, data: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::with_suffix(".safetensors").unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        f.write_all(data).unwrap();
        f
    }

    const REMAP: &[(&str, &str)] = &[(r"^shared\.", "table.")];

    #[test]
    fn gathers_rows_of_each_float_type() {
        let table: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        let f32_bytes: Vec<u8> = table.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf16_bytes: Vec<u8> = table
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        let f16_bytes: Vec<u8> = table
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        for (dt, bytes) in [("F32", f32_bytes), ("BF16", bf16_bytes), ("F16", f16_bytes)] {
            let n = bytes.len();
            // Another tensor first, so that the table's offset is not zero.
            let header = format!(
                r#"{{"other":{{"dtype":"U8","shape":[3],"data_offsets":[0,3]}},"shared.weight":{{"dtype":"{dt}","shape":[4,3],"data_offsets":[3,{}]}}}}"#,
                3 + n
            );
            let mut data = vec![7u8; 3];
            data.extend_from_slice(&bytes);
            let f = write(&header, &data);
            let rows = FileRows::find(&[f.path().to_owned()], REMAP, "table.weight")
                .unwrap()
                .unwrap();
            assert_eq!((rows.rows(), rows.cols()), (4, 3));
            let got = rows.gather(&[2, 0, 2, 3]).unwrap();
            let want: Vec<f32> = [2, 0, 2, 3]
                .iter()
                .flat_map(|&r| table[r * 3..r * 3 + 3].to_vec())
                .collect();
            assert_eq!(got, want, "{dt}");
            let e = rows.gather(&[4]).unwrap_err().to_string();
            assert!(e.contains("row 4") && e.contains("4 rows"), "{e}");
        }
    }

    #[test]
    fn finds_only_float_matrices_under_the_remapped_name() {
        let f = write(
            r#"{"shared.weight":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            &[0; 16],
        );
        let files = [f.path().to_owned()];
        assert!(FileRows::find(&files, REMAP, "shared.weight").unwrap().is_none());
        let e = FileRows::find(&files, REMAP, "table.weight").unwrap_err().to_string();
        assert!(e.contains("not a matrix"), "{e}");
        let f = write(
            r#"{"shared.weight":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}}"#,
            &[0; 16],
        );
        let e = FileRows::find(&[f.path().to_owned()], REMAP, "table.weight")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not f32"), "{e}");
    }
}
