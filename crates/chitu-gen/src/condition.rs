//! Image conditioning of the denoise loop, as diffusers' `WanImageToVideoPipeline` builds it:
//! Wan2.2 TI2V-5B puts the picture's latent in place of latent frame 0 (`expand_timesteps`), and
//! I2V-A14B concatenates a frame mask and the VAE-encoded condition video to the latents.

use crate::{DiffusionBackend, DiffusionUserParams, GenError, PipelineKind};
use burn::tensor::{backend::Backend, Tensor, TensorData};

/// What a request's pictures add to every DiT call of its denoise loop.
#[derive(Debug, Clone)]
pub(crate) enum Condition<B: Backend> {
    /// TI2V: the picture's normalised latent `[1, z, 1, h, w]`, which replaces latent frame 0 of
    /// every DiT input (whose tokens then get timestep 0) and of the final latents.
    FirstFrame(Tensor<B, 5>),
    /// I2V: `[1, 4 + z, T, h, w]`, the frame mask then the normalised condition latents,
    /// concatenated after the latents' channels.
    Concat(Tensor<B, 5>),
}

impl<B: Backend> Condition<B> {
    /// The conditioning `params` asks of `backend`'s pipeline, encoding its pictures with the VAE;
    /// `None` for a text-only request.
    pub(crate) fn build(backend: &DiffusionBackend<B>, params: &DiffusionUserParams) -> Result<Option<Self>, GenError> {
        let Some(image) = &params.image else {
            return Ok(None);
        };
        let (w, h) = (params.width, params.height);
        let device = &backend.device;
        let first: Tensor<B, 5> = image.to_tensor::<B>(w, h, device)?.unsqueeze_dim(2);
        let vae = &backend.vae;
        match backend.pipeline {
            PipelineKind::TextImageToVideo => {
                let latent = vae.encode(first)?.mean;
                Ok(Some(Self::FirstFrame(vae.normalize(latent))))
            }
            PipelineKind::ImageToVideo => {
                let frames = params.num_frames;
                let mut parts = vec![first];
                let last = match &params.last_image {
                    Some(img) => Some(img.to_tensor::<B>(w, h, device)?.unsqueeze_dim::<5>(2)),
                    None => None,
                };
                let zeros = frames - 1 - usize::from(last.is_some());
                if zeros > 0 {
                    parts.push(Tensor::zeros([1, 3, zeros, h, w], device));
                }
                parts.extend(last);
                let latent = vae.normalize(vae.encode(Tensor::cat(parts, 2))?.mean);
                let [_, _, t, lh, lw] = latent.dims();
                let mask = frame_mask::<B>(
                    t,
                    lh,
                    lw,
                    vae.config.temporal_factor(),
                    params.last_image.is_some(),
                    device,
                );
                Ok(Some(Self::Concat(Tensor::cat(vec![mask, latent], 1))))
            }
            PipelineKind::TextToVideo => Err(GenError::Params(
                "this model is text-to-video and takes no image".into(),
            )),
        }
    }

    /// The DiT's input for `latents`, and the timestep of latent frame 0's tokens when it has
    /// its own.
    pub(crate) fn model_input(&self, latents: &Tensor<B, 5>) -> (Tensor<B, 5>, Option<f64>) {
        match self {
            Self::FirstFrame(_) => (self.finish(latents.clone()), Some(0.0)),
            Self::Concat(cond) => (Tensor::cat(vec![latents.clone(), cond.clone()], 1), None),
        }
    }

    /// The final latents: TI2V's frame 0 is the picture's latent.
    pub(crate) fn finish(&self, latents: Tensor<B, 5>) -> Tensor<B, 5> {
        match self {
            Self::FirstFrame(image) => {
                let t = latents.dims()[2];
                if t == 1 {
                    return image.clone();
                }
                Tensor::cat(vec![image.clone(), latents.narrow(2, 1, t - 1)], 2)
            }
            Self::Concat(_) => latents,
        }
    }
}

/// diffusers' I2V frame mask `[1, tf, T, h, w]`: the pixel frames that are given (the first, and
/// the last with a last image) are 1, the first repeated `tf` times so that each latent frame
/// covers `tf` mask frames, which become the mask's channels.
fn frame_mask<B: Backend>(t: usize, h: usize, w: usize, tf: usize, last: bool, device: &B::Device) -> Tensor<B, 5> {
    let frames = 1 + tf * (t - 1);
    let mut data = vec![0f32; tf * t * h * w];
    for c in 0..tf {
        for i in 0..t {
            // Mask frame `tf * i + c` of the first frame repeated `tf` times, then frames 1.. .
            let pixel = if i == 0 { 0 } else { tf * i + c + 1 - tf };
            let given = pixel == 0 || (last && pixel == frames - 1);
            if given {
                let at = (c * t + i) * h * w;
                data[at..at + h * w].fill(1.0);
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [1, tf, t, h, w]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_flex::Flex;

    fn mask(t: usize, last: bool) -> Vec<Vec<f32>> {
        let m = frame_mask::<Flex>(t, 1, 1, 4, last, &Default::default());
        let v: Vec<f32> = m.into_data().to_vec().unwrap();
        v.chunks(t).map(|c| c.to_vec()).collect()
    }

    #[test]
    fn the_mask_marks_the_given_frames() {
        // Channels are the four mask frames of each latent frame.
        assert_eq!(mask(3, false), vec![vec![1.0, 0.0, 0.0]; 4]);
        let with_last = mask(3, true);
        assert_eq!(with_last[3], vec![1.0, 0.0, 1.0]);
        assert_eq!(with_last[0], vec![1.0, 0.0, 0.0]);
    }
}
