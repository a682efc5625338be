//! The file encoders behind the default `video` feature: H.264 in MP4 (openh264, built from its
//! vendored C source) and PNG (image).

use crate::video::{write_atomically, RgbFrames, VideoError, FPS};
use image::ImageEncoder;
use openh264::encoder::{Encoder, EncoderConfig};
use openh264::formats::{RgbSliceU8, YUVBuffer};
use openh264::OpenH264API;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

fn encode_err(path: &Path, e: impl std::fmt::Display) -> VideoError {
    VideoError::Encode {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
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

/// Encodes frames as H.264 (openh264, built from its vendored source) in an MP4 at [`FPS`].
pub fn write_mp4(path: &Path, video: &RgbFrames) -> Result<(), VideoError> {
    let (w, h) = (video.width, video.height);
    if w % 2 != 0 || h % 2 != 0 || video.frames.is_empty() {
        return Err(encode_err(
            path,
            format!(
                "cannot encode {} frames of {w}x{h} (sizes must be even)",
                video.frames.len()
            ),
        ));
    }
    let config = EncoderConfig::new();
    let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), config).map_err(|e| encode_err(path, e))?;
    let (mut sps, mut pps) = (None, None);
    let mut samples = Vec::new();
    for rgb in &video.frames {
        let yuv = YUVBuffer::from_rgb_source(RgbSliceU8::new(rgb, (w, h)));
        let stream = encoder.encode(&yuv).map_err(|e| encode_err(path, e))?.to_vec();
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
        .ok_or_else(|| encode_err(path, "the encoder gave no SPS/PPS"))?;
    let config = mp4::Mp4Config {
        major_brand: str::parse("isom").expect("valid fourcc"),
        minor_version: 512,
        compatible_brands: ["isom", "iso2", "avc1", "mp41"]
            .iter()
            .map(|b| str::parse(b).expect("valid fourcc"))
            .collect(),
        timescale: 1000,
    };
    write_atomically(path, |file| {
        let writer = mp4::Mp4Writer::write_start(BufWriter::new(file), &config).map_err(|e| encode_err(path, e))?;
        write_samples(path, writer, w, h, sps, pps, samples)
    })
}

/// The track and its samples, then the MP4's index; flushed, so that errors surface here.
fn write_samples(
    path: &Path,
    mut writer: mp4::Mp4Writer<BufWriter<&mut std::fs::File>>,
    w: usize,
    h: usize,
    sps: Vec<u8>,
    pps: Vec<u8>,
    samples: Vec<(Vec<u8>, bool)>,
) -> Result<(), VideoError> {
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
        .map_err(|e| encode_err(path, e))?;
    for (i, (bytes, is_sync)) in samples.into_iter().enumerate() {
        let sample = mp4::Mp4Sample {
            start_time: i as u64 * 800,
            duration: 800,
            rendering_offset: 0,
            is_sync,
            bytes: bytes::Bytes::from(bytes),
        };
        writer.write_sample(1, &sample).map_err(|e| encode_err(path, e))?;
    }
    writer.write_end().map_err(|e| encode_err(path, e))?;
    writer.into_writer().flush().map_err(|e| VideoError::io(path, e))
}

/// Writes all frames side by side in a grid (about square) as one PNG.
pub fn write_contact_sheet(path: &Path, video: &RgbFrames) -> Result<(), VideoError> {
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
    write_png(path, sheet.as_raw(), (cols * w) as u32, (rows * h) as u32)
}

/// Encodes an RGB image as PNG in memory, then writes it whole or not at all.
fn write_png(path: &Path, rgb: &[u8], width: u32, height: u32) -> Result<(), VideoError> {
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(rgb, width, height, image::ExtendedColorType::Rgb8)
        .map_err(|e| encode_err(path, e))?;
    write_atomically(path, |file| file.write_all(&png).map_err(|e| VideoError::io(path, e)))
}

/// Writes every frame as `{stem}_{index:04}.png` in `dir`; returns the paths.
pub fn write_frame_pngs(dir: &Path, stem: &str, video: &RgbFrames) -> Result<Vec<PathBuf>, VideoError> {
    video
        .frames
        .iter()
        .enumerate()
        .map(|(i, frame)| {
            let path = dir.join(format!("{stem}_{i:04}.png"));
            write_png(&path, frame, video.width as u32, video.height as u32)?;
            Ok(path)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annex_b_splits_on_both_start_codes() {
        let s = [0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x65, 4, 5];
        let nals = nal_units(&s);
        assert_eq!(nals, vec![&[0x67u8, 1, 2][..], &[0x68, 3][..], &[0x65, 4, 5][..]]);
    }
}
