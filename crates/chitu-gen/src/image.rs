//! The conditioning pictures of image-to-video: decoded from PNG or JPEG, fitted to the request
//! size, and turned into the `[-1, 1]` tensor diffusers' `VideoProcessor.preprocess` gives the VAE.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use image::imageops::FilterType;
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a conditioning picture could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read.
    #[error("image {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a PNG or JPEG the decoder accepts.
    #[error("image {}: not a readable PNG or JPEG: {source}", path.display())]
    Decode {
        /// The file (or `<memory>`).
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },
    /// Resizing is off and the picture is not the request's size.
    #[error(
        "image {} is {width}x{height}, the request is {req_width}x{req_height}, and resizing is off (drop --no-resize, or pass a picture of the request size)",
        path.display()
    )]
    Size {
        /// The file.
        path: PathBuf,
        /// Its width.
        width: u32,
        /// Its height.
        height: u32,
        /// The request's width.
        req_width: usize,
        /// The request's height.
        req_height: usize,
    },
    /// The picture has no pixels.
    #[error("image {} has no pixels", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// A decoded RGB picture to condition a video on (Wan2.2 TI2V-5B's first frame, I2V-A14B's first
/// and optional last frame).
#[derive(Debug, Clone, PartialEq)]
pub struct ConditionImage {
    /// Where it came from, for messages.
    pub source: PathBuf,
    /// The pixels.
    pixels: Arc<RgbImage>,
    /// Fit to the request size (scale to cover, then center-crop); when off, a picture of another
    /// size is refused.
    pub resize: bool,
}

impl ConditionImage {
    /// Reads and decodes a PNG or JPEG file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ImageError> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|source| ImageError::Read {
            path: path.clone(),
            source,
        })?;
        Self::decode(&bytes, path)
    }

    /// Decodes PNG or JPEG bytes; `source` names them in messages.
    pub fn decode(bytes: &[u8], source: PathBuf) -> Result<Self, ImageError> {
        let img = image::load_from_memory(bytes).map_err(|e| ImageError::Decode {
            path: source.clone(),
            source: e,
        })?;
        let pixels = img.to_rgb8();
        if pixels.width() == 0 || pixels.height() == 0 {
            return Err(ImageError::Empty { path: source });
        }
        Ok(Self {
            source,
            pixels: Arc::new(pixels),
            resize: true,
        })
    }

    /// Pixels given directly (no file), RGB rows of `width * 3` bytes.
    pub fn from_rgb(width: u32, height: u32, rgb: Vec<u8>) -> Option<Self> {
        let pixels = RgbImage::from_raw(width, height, rgb)?;
        (width > 0 && height > 0).then(|| Self {
            source: PathBuf::from("<pixels>"),
            pixels: Arc::new(pixels),
            resize: true,
        })
    }

    /// Turns resizing off or on.
    pub fn with_resize(mut self, resize: bool) -> Self {
        self.resize = resize;
        self
    }

    /// `(width, height)` of the picture as decoded.
    pub fn size(&self) -> (u32, u32) {
        self.pixels.dimensions()
    }

    /// Refuses a picture of another size than `width x height` when resizing is off.
    pub fn check_size(&self, width: usize, height: usize) -> Result<(), ImageError> {
        let (w, h) = self.size();
        if self.resize || (w as usize, h as usize) == (width, height) {
            return Ok(());
        }
        Err(ImageError::Size {
            path: self.source.clone(),
            width: w,
            height: h,
            req_width: width,
            req_height: height,
        })
    }

    /// The picture at `width x height`: unchanged when it has that size, else scaled (Lanczos) to
    /// cover it and center-cropped, or refused when resizing is off.
    pub fn fitted(&self, width: usize, height: usize) -> Result<RgbImage, ImageError> {
        let (w, h) = self.size();
        if (w as usize, h as usize) == (width, height) {
            return Ok((*self.pixels).clone());
        }
        self.check_size(width, height)?;
        // Scale so that both sides cover the target, then cut the middle out.
        let scale = (width as f64 / w as f64).max(height as f64 / h as f64);
        let (sw, sh) = (
            ((w as f64 * scale).round() as u32).max(width as u32),
            ((h as f64 * scale).round() as u32).max(height as u32),
        );
        let scaled = image::imageops::resize(&*self.pixels, sw, sh, FilterType::Lanczos3);
        let (x, y) = ((sw - width as u32) / 2, (sh - height as u32) / 2);
        Ok(image::imageops::crop_imm(&scaled, x, y, width as u32, height as u32).to_image())
    }

    /// `[1, 3, H, W]` in `[-1, 1]`: `2 * (value / 255) - 1` in f32, as diffusers' preprocessing.
    pub fn to_tensor<B: Backend>(
        &self,
        width: usize,
        height: usize,
        device: &B::Device,
    ) -> Result<Tensor<B, 4>, ImageError> {
        let img = self.fitted(width, height)?;
        let mut data = vec![0f32; 3 * width * height];
        for (i, px) in img.pixels().enumerate() {
            for c in 0..3 {
                data[c * width * height + i] = (px[c] as f32 / 255.0) * 2.0 - 1.0;
            }
        }
        Ok(Tensor::from_data(TensorData::new(data, [1, 3, height, width]), device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_flex::Flex;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 255]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn a_picture_of_the_request_size_is_taken_as_is() {
        let img = ConditionImage::decode(&png(4, 2), "a.png".into()).unwrap();
        let t = img.to_tensor::<Flex>(4, 2, &Default::default()).unwrap();
        let v: Vec<f32> = t.into_data().to_vec().unwrap();
        // Red is x, green y, blue 255: mapped to [-1, 1].
        assert_eq!(v[0], -1.0);
        assert_eq!(v[1], 1.0 / 255.0 * 2.0 - 1.0);
        assert_eq!(v[16], 1.0);
    }

    #[test]
    fn other_sizes_are_cropped_to_cover_or_refused() {
        let img = ConditionImage::decode(&png(40, 10), "wide.png".into()).unwrap();
        assert_eq!(img.fitted(16, 16).unwrap().dimensions(), (16, 16));
        let err = img.with_resize(false).fitted(16, 16).unwrap_err().to_string();
        assert!(
            err.contains("40x10") && err.contains("16x16") && err.contains("resizing is off"),
            "{err}"
        );
    }

    #[test]
    fn corrupt_and_missing_files_are_named() {
        let err = ConditionImage::decode(b"not a picture", "bad.png".into())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad.png") && err.contains("not a readable PNG or JPEG"),
            "{err}"
        );
        let err = ConditionImage::open("/nonexistent/x.png").unwrap_err().to_string();
        assert!(err.contains("/nonexistent/x.png"), "{err}");
    }
}
