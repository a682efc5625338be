//! fp8 (e4m3fn) checkpoints, as the community publishes Wan's DiTs (`*_fp8_e4m3fn.safetensors`,
//! and ComfyUI's `*_fp8_scaled.safetensors`).
//!
//! A plain fp8 file holds each weight cast to e4m3fn. A scaled one marks itself with a
//! `scaled_fp8` entry and pairs each fp8 `NAME.weight` with an f32 `NAME.scale_weight` (the
//! weight is `fp8 * scale`; `NAME.scale_input`, for fp8 matmuls, is not needed here). Each fp8
//! tensor is read as its bytes and decoded to f32 (times its scale) as the module asks for it,
//! then held as the load's [`crate::Format`] says (bf16, or requantized to int8 blocks): one
//! tensor at a time, never a full-precision copy of the model.

use crate::file::Entry;
use crate::LoadError;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The marker entry of a scaled fp8 file.
const MARKER: &str = "scaled_fp8";

/// e4m3fn bits as f32: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, and
/// `S.1111.111` is NaN.
pub(crate) fn e4m3_to_f32(bits: u8) -> f32 {
    let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
    let (exp, man) = ((bits >> 3) & 0x0f, bits & 0x07);
    let magnitude = match (exp, man) {
        (0x0f, 0x07) => f32::NAN,
        (0, m) => m as f32 / 8.0 * 2f32.powi(-6),
        (e, m) => (1.0 + m as f32 / 8.0) * 2f32.powi(e as i32 - 7),
    };
    sign * magnitude
}

/// Every e4m3fn value, by its bits.
pub(crate) fn table() -> [f32; 256] {
    std::array::from_fn(|b| e4m3_to_f32(b as u8))
}

/// The entries of a header with each fp8 weight given its scale (1 in a plain fp8 file), and the
/// scale and marker entries taken out. A scaled file's fp8 weight without its scale is refused:
/// its values mean nothing without it.
pub(crate) fn resolve(path: &Path, file: &mut File, entries: Vec<Entry>) -> Result<Vec<Entry>, LoadError> {
    if !entries.iter().any(|e| e.fp8) {
        return Ok(entries);
    }
    let scaled = entries.iter().any(|e| e.name == MARKER);
    let is_scale = |name: &str| name.ends_with("scale_weight") || name.ends_with("scale_input");
    // `a.b.weight` pairs with `a.b.scale_weight` (a top-level `weight` with `scale_weight`).
    let stem = |name: &str, suffix: &str| name.strip_suffix(suffix).map(|s| s.trim_end_matches('.').to_string());
    let mut scales = std::collections::HashMap::new();
    for e in &entries {
        if let Some(s) = stem(&e.name, "scale_weight") {
            scales.insert(s, read_scale(path, file, e)?);
        }
    }
    let mut out = Vec::with_capacity(entries.len());
    for mut e in entries {
        if e.name == MARKER || (scaled && is_scale(&e.name)) {
            continue;
        }
        if e.fp8 {
            let stem = stem(&e.name, "weight").unwrap_or_else(|| e.name.clone());
            let scale_name = if stem.is_empty() {
                "scale_weight".to_string()
            } else {
                format!("{stem}.scale_weight")
            };
            e.fp8_scale = match (scales.get(&stem), scaled) {
                (Some(&s), _) => s,
                (None, false) => 1.0,
                (None, true) => {
                    return Err(LoadError::malformed(
                        path,
                        format!(
                            "tensor {} is fp8 (e4m3) in a scaled fp8 file (it has a \"{MARKER}\" entry), \
                             but the file has no {scale_name}: its values mean nothing without their scale",
                            e.name
                        ),
                    ))
                }
            };
        }
        out.push(e);
    }
    Ok(out)
}

/// The one value of a scale entry.
fn read_scale(path: &Path, file: &mut File, e: &Entry) -> Result<f32, LoadError> {
    let elements: usize = e.shape.iter().product();
    if elements != 1 {
        return Err(LoadError::malformed(
            path,
            format!(
                "{} has {elements} values; only one scale per fp8 tensor is supported",
                e.name
            ),
        ));
    }
    let mut bytes = vec![0u8; e.bytes as usize];
    file.seek(SeekFrom::Start(e.at))
        .and_then(|_| file.read_exact(&mut bytes))
        .map_err(|err| LoadError::io(path, err))?;
    let value = match (e.dtype, bytes.as_slice()) {
        (burn::tensor::DType::F32, &[a, b, c, d]) => f32::from_le_bytes([a, b, c, d]),
        (burn::tensor::DType::BF16, &[a, b]) => burn::tensor::bf16::from_le_bytes([a, b]).to_f32(),
        (burn::tensor::DType::F16, &[a, b]) => burn::tensor::f16::from_le_bytes([a, b]).to_f32(),
        (dtype, _) => {
            return Err(LoadError::malformed(
                path,
                format!("{} is {dtype:?}; a scale must be a float", e.name),
            ))
        }
    };
    if !value.is_finite() {
        return Err(LoadError::malformed(path, format!("{} is {value}", e.name)));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_e4m3fn() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0xb8), -1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x3c), 1.5);
        assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
    }

    #[derive(burn::module::Module, Debug)]
    struct Net<B: burn::tensor::backend::Backend> {
        proj: burn::nn::Linear<B>,
    }

    /// A safetensors file of `tensors` (name, dtype name, shape, bytes).
    fn file_of(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> tempfile::NamedTempFile {
        use std::io::Write;
        let (mut header, mut data) = (serde_json::Map::new(), Vec::new());
        for (name, dtype, shape, bytes) in tensors {
            let at = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [at, data.len()]}),
            );
        }
        let header = serde_json::Value::Object(header).to_string();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        f.write_all(&data).unwrap();
        f
    }

    fn load(file: &tempfile::NamedTempFile) -> Result<Vec<f32>, LoadError> {
        let dev = Default::default();
        let net = Net::<burn_flex::Flex> {
            proj: burn::nn::LinearConfig::new(3, 2).init(&dev),
        };
        let (net, _) = crate::load_strict(net, &[file.path().to_owned()], &[] as &[(&str, &str)], "test")?;
        Ok(net.proj.weight.val().into_data().to_vec::<f32>().unwrap())
    }

    #[test]
    fn scaled_and_plain_fp8_files_load_and_a_missing_scale_is_refused() {
        // PyTorch's [out 2, in 3]: 1, 1.5, -1 / 2, 0, 0.5.
        let weight = (
            "proj.weight",
            "F8_E4M3",
            vec![2, 3],
            vec![0x38, 0x3c, 0xb8, 0x40, 0x00, 0x30],
        );
        let bias = (
            "proj.bias",
            "F32",
            vec![2],
            [0.5f32, -0.5].iter().flat_map(|v| v.to_le_bytes()).collect(),
        );
        let scale = ("proj.scale_weight", "F32", vec![], 0.25f32.to_le_bytes().to_vec());
        let marker = ("scaled_fp8", "F8_E4M3", vec![0], vec![]);
        // burn holds the weight as [in, out].
        let want = |s: f32| [1.0, 2.0, 1.5, 0.0, -1.0, 0.5].map(|v| v * s).to_vec();
        let scaled = file_of(&[weight.clone(), bias.clone(), scale, marker.clone()]);
        assert_eq!(load(&scaled).unwrap(), want(0.25));
        let plain = file_of(&[weight.clone(), bias.clone()]);
        assert_eq!(load(&plain).unwrap(), want(1.0));
        let unscaled = file_of(&[weight, bias, marker]);
        let e = load(&unscaled).unwrap_err().to_string();
        assert!(
            e.contains("proj.weight") && e.contains("proj.scale_weight") && e.contains("scaled"),
            "{e}"
        );
    }
}
