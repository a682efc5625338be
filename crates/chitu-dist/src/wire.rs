//! Tensor data as bytes, for engines that move bytes (MPI, NCCL's host staging).
//!
//! Layout: a little-endian `u32` header length, a JSON header (shape and dtype), the raw values.

use crate::CommError;
use burn::tensor::{DType, TensorData};

#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    shape: Vec<usize>,
    dtype: DType,
}

/// `data` as one byte buffer.
pub fn encode(data: &TensorData) -> Vec<u8> {
    let header = serde_json::to_vec(&Header {
        shape: data.shape.to_vec(),
        dtype: data.dtype,
    })
    .expect("a shape and dtype always serialise");
    let values = data.as_bytes();
    let mut out = Vec::with_capacity(4 + header.len() + values.len());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(values);
    out
}

/// The tensor data [`encode`] wrote.
pub fn decode(bytes: &[u8]) -> Result<TensorData, CommError> {
    let bad = |why: &str| CommError::Transport(format!("malformed tensor message: {why}"));
    let len = bytes.get(..4).ok_or_else(|| bad("shorter than its header length"))?;
    let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
    let header = bytes.get(4..4 + len).ok_or_else(|| bad("truncated header"))?;
    let header: Header = serde_json::from_slice(header).map_err(|e| bad(&e.to_string()))?;
    let values = &bytes[4 + len..];
    let expected = header.shape.iter().product::<usize>() * header.dtype.size();
    if values.len() != expected {
        return Err(bad(&format!(
            "{} value bytes for shape {:?} of {:?}",
            values.len(),
            header.shape,
            header.dtype
        )));
    }
    Ok(TensorData::from_bytes_vec(values.to_vec(), header.shape, header.dtype))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_truncation() {
        let data = TensorData::new(vec![1.5f32, -2.0, 3.25, 0.0, 7.0, 8.0], [2, 3]);
        let bytes = encode(&data);
        assert_eq!(decode(&bytes).unwrap(), data);
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode(&bytes[..2]).is_err());
    }
}
