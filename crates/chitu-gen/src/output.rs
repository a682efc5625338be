//! Writing a generated video: H.264 MP4, PNG contact sheet and frames, JSON sidecar.

use crate::{DiffusionUserParams, GenError, StageTimings};
use burn::tensor::{backend::Backend, Tensor};
use openh264::encoder::{Encoder, EncoderConfig};
use openh264::formats::{RgbSliceU8, YUVBuffer};
use openh264::OpenH264API;
use std::path::{Path, PathBuf};

/// Frames per second of written videos (Wan's rate).
pub const FPS: u32 = 16;

/// 8-bit RGB frames, row-major `[H, W, 3]` each.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbFrames {
    pub width: usize,
    pub height: usize,
    pub frames: Vec<Vec<u8>>,
}

impl RgbFrames {
    /// Converts frames `[1, F, H, W, 3]` in [0, 1] (see `video_to_frames`) to 8-bit RGB.
    pub fn from_tensor<B: Backend>(frames: Tensor<B, 5>) -> Result<Self, GenError> {
        let [b, f, h, w, c] = frames.dims();
        if b != 1 || c != 3 {
            return Err(GenError::Stage(format!(
                "expected frames [1, F, H, W, 3], got {:?}",
                frames.dims()
            )));
        }
        let data: Vec<f32> = frames
            .into_data()
            .convert::<f32>()
            .into_vec()
            .map_err(|e| GenError::Stage(format!("reading frames: {e:?}")))?;
        let per = h * w * 3;
        let frames = (0..f)
            .map(|i| {
                data[i * per..(i + 1) * per]
                    .iter()
                    .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
                    .collect()
            })
            .collect();
        Ok(Self {
            width: w,
            height: h,
            frames,
        })
    }
}

/// Chitu's file stem: `{slug(prompt)[:64]}_seed{seed}_step{steps}`.
pub fn output_stem(prompt: &str, seed: u64, steps: usize) -> String {
    let mut slug = String::new();
    for ch in prompt.chars() {
        if ch.is_ascii_alphanumeric() {
            slug.push(ch.to_ascii_lowercase());
        } else if !slug.ends_with('_') && !slug.is_empty() {
            slug.push('_');
        }
    }
    let slug: String = slug.trim_end_matches('_').chars().take(64).collect();
    let slug = if slug.is_empty() { "video".to_string() } else { slug };
    format!("{slug}_seed{seed}_step{steps}")
}

/// Splits an Annex B byte stream into NAL units (without start codes).
fn nal_units(stream: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= stream.len() {
        if stream[i] == 0 && stream[i + 1] == 0 && stream[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    starts
        .iter()
        .enumerate()
        .map(|(k, &s)| {
            let mut end = starts.get(k + 1).map_or(stream.len(), |&n| n - 3);
            // A 4-byte start code leaves one zero byte before the next 3-byte pattern.
            while end > s && stream[end - 1] == 0 && k + 1 < starts.len() {
                end -= 1;
            }
            &stream[s..end]
        })
        .collect()
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> GenError {
    GenError::Output(format!("{}: {e}", path.display()))
}

/// Encodes frames as H.264 (openh264, built from its vendored source) in an MP4 at [`FPS`].
pub fn write_mp4(path: &Path, video: &RgbFrames) -> Result<(), GenError> {
    let (w, h) = (video.width, video.height);
    if w % 2 != 0 || h % 2 != 0 || video.frames.is_empty() {
        return Err(GenError::Output(format!(
            "cannot encode {} frames of {w}x{h} (sizes must be even)",
            video.frames.len()
        )));
    }
    let config = EncoderConfig::new();
    let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), config).map_err(|e| io_err(path, e))?;
    let (mut sps, mut pps) = (None, None);
    let mut samples = Vec::new();
    for rgb in &video.frames {
        let yuv = YUVBuffer::from_rgb_source(RgbSliceU8::new(rgb, (w, h)));
        let stream = encoder.encode(&yuv).map_err(|e| io_err(path, e))?.to_vec();
        let mut sample = Vec::new();
        let mut sync = false;
        for nal in nal_units(&stream) {
            match nal.first().map(|b| b & 0x1f) {
                Some(7) => sps = Some(nal.to_vec()),
                Some(8) => pps = Some(nal.to_vec()),
                Some(t) => {
                    sync |= t == 5;
                    sample.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                    sample.extend_from_slice(nal);
                }
                None => {}
            }
        }
        samples.push((sample, sync));
    }
    let (sps, pps) = sps
        .zip(pps)
        .ok_or_else(|| GenError::Output("encoder gave no SPS/PPS".into()))?;
    let file = std::fs::File::create(path).map_err(|e| io_err(path, e))?;
    let config = mp4::Mp4Config {
        major_brand: str::parse("isom").expect("valid fourcc"),
        minor_version: 512,
        compatible_brands: ["isom", "iso2", "avc1", "mp41"]
            .iter()
            .map(|b| str::parse(b).expect("valid fourcc"))
            .collect(),
        timescale: 1000,
    };
    let mut writer =
        mp4::Mp4Writer::write_start(std::io::BufWriter::new(file), &config).map_err(|e| io_err(path, e))?;
    let timescale = FPS * 800;
    writer
        .add_track(&mp4::TrackConfig {
            track_type: mp4::TrackType::Video,
            timescale,
            language: "und".into(),
            media_conf: mp4::MediaConfig::AvcConfig(mp4::AvcConfig {
                width: w as u16,
                height: h as u16,
                seq_param_set: sps,
                pic_param_set: pps,
            }),
        })
        .map_err(|e| io_err(path, e))?;
    for (i, (bytes, is_sync)) in samples.into_iter().enumerate() {
        let sample = mp4::Mp4Sample {
            start_time: i as u64 * 800,
            duration: 800,
            rendering_offset: 0,
            is_sync,
            bytes: bytes::Bytes::from(bytes),
        };
        writer.write_sample(1, &sample).map_err(|e| io_err(path, e))?;
    }
    writer.write_end().map_err(|e| io_err(path, e))
}

/// Writes all frames side by side in a grid (about square) as one PNG.
pub fn write_contact_sheet(path: &Path, video: &RgbFrames) -> Result<(), GenError> {
    let n = video.frames.len();
    let cols = (n as f64).sqrt().ceil().max(1.0) as usize;
    let rows = n.div_ceil(cols);
    let (w, h) = (video.width, video.height);
    let mut sheet = image::RgbImage::new((cols * w) as u32, (rows * h) as u32);
    for (i, frame) in video.frames.iter().enumerate() {
        let (ox, oy) = ((i % cols) * w, (i / cols) * h);
        for y in 0..h {
            for x in 0..w {
                let p = (y * w + x) * 3;
                sheet.put_pixel(
                    (ox + x) as u32,
                    (oy + y) as u32,
                    image::Rgb([frame[p], frame[p + 1], frame[p + 2]]),
                );
            }
        }
    }
    sheet.save(path).map_err(|e| io_err(path, e))
}

/// Writes every frame as `{stem}_{index:04}.png` in `dir`; returns the paths.
pub fn write_frame_pngs(dir: &Path, stem: &str, video: &RgbFrames) -> Result<Vec<PathBuf>, GenError> {
    video
        .frames
        .iter()
        .enumerate()
        .map(|(i, frame)| {
            let path = dir.join(format!("{stem}_{i:04}.png"));
            image::save_buffer(
                &path,
                frame,
                video.width as u32,
                video.height as u32,
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| io_err(&path, e))?;
            Ok(path)
        })
        .collect()
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The JSON sidecar: request, per-stage timings, peak memory and the files written.
pub fn sidecar(
    params: &DiffusionUserParams,
    timings: &StageTimings,
    model: &str,
    files: &[PathBuf],
) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "params": {
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "seed": params.seed,
            "height": params.height,
            "width": params.width,
            "num_frames": params.num_frames,
            "num_inference_steps": params.num_inference_steps,
            "guidance_scale": params.guidance_scale,
            "guidance_scale_2": params.guidance_scale_2,
            "solver": params.solver.map(|s| format!("{s:?}")),
            "shift": params.shift,
            "max_sequence_length": params.max_sequence_length,
            "cache": params.cache,
        },
        "timings_s": {
            "text_encode": timings.text_encode,
            "denoise": timings.denoise,
            "vae_decode": timings.vae_decode,
        },
        "peak_rss_bytes": peak_rss_bytes(),
        "fps": FPS,
        "files": files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_follow_chitu() {
        assert_eq!(
            output_stem("A cat, walking on grass!", 42, 50),
            "a_cat_walking_on_grass_seed42_step50"
        );
        assert_eq!(output_stem("", 1, 2), "video_seed1_step2");
        assert_eq!(output_stem(&"x".repeat(100), 0, 1).len(), 64 + "_seed0_step1".len());
    }

    #[test]
    fn annex_b_splits_on_both_start_codes() {
        let s = [0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x65, 4, 5];
        let nals = nal_units(&s);
        assert_eq!(nals, vec![&[0x67u8, 1, 2][..], &[0x68, 3][..], &[0x65, 4, 5][..]]);
    }
}
