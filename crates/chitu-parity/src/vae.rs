//! `vae_decode`, `vae_encode` and `vae_decode_tiled` cases.

use super::tensors::HostTensor;
use super::{Case, ParityError};
use burn::tensor::backend::Backend;
use chitu_vae::{TileConfig, WanVae};

fn load<B: Backend>(case: &Case, device: &B::Device) -> Result<WanVae<B>, ParityError> {
    let model = case
        .field("model")?
        .as_str()
        .ok_or_else(|| ParityError::Case(format!("case {}: model is not a string", case.name)))?;
    WanVae::<B>::from_dir_as(case.root.join(model), device, case.precision)
        .map_err(|e| ParityError::Component(e.into()))
}

fn usize_field(case: &Case, key: &str) -> Result<usize, ParityError> {
    case.field(key)?
        .as_u64()
        .map(|v| v as usize)
        .ok_or_else(|| ParityError::Case(format!("case {}: {key} is not an integer", case.name)))
}

fn component<T>(r: Result<T, chitu_vae::VaeError>) -> Result<T, ParityError> {
    r.map_err(|e| ParityError::Component(e.into()))
}

/// The outputs of a VAE case of any of the three kinds.
pub fn outputs<B: Backend>(case: &Case, device: &B::Device) -> Result<Vec<(&'static str, HostTensor)>, ParityError> {
    let vae = load::<B>(case, device)?;
    Ok(match case.kind()? {
        "vae_encode" => {
            let video = case.tensor("video")?.to_backend::<B, 5>("video", device)?;
            let post = component(vae.encode(video))?;
            vec![
                ("mean", HostTensor::from_backend(post.mean)?),
                ("logvar", HostTensor::from_backend(post.logvar)?),
            ]
        }
        "vae_decode" => {
            let z = case.tensor("latents")?.to_backend::<B, 5>("latents", device)?;
            vec![("video", HostTensor::from_backend(component(vae.decode(z))?)?)]
        }
        "vae_decode_tiled" => {
            let z = case.tensor("latents")?.to_backend::<B, 5>("latents", device)?;
            let tiles = TileConfig {
                min_height: usize_field(case, "tile_sample_min_height")?,
                min_width: usize_field(case, "tile_sample_min_width")?,
                stride_height: usize_field(case, "tile_sample_stride_height")?,
                stride_width: usize_field(case, "tile_sample_stride_width")?,
            };
            let tiled = component(vae.decode_tiled(z.clone(), tiles))?;
            let plain = component(vae.decode(z))?;
            vec![
                ("video", HostTensor::from_backend(tiled)?),
                ("video_untiled", HostTensor::from_backend(plain)?),
            ]
        }
        other => return Err(ParityError::Case(format!("not a VAE kind: {other}"))),
    })
}

/// Runs a VAE case (`vae_decode`, `vae_encode`, `vae_decode_tiled`); returns the worst rel_l2.
pub fn run<B: Backend>(case: &Case, device: &B::Device) -> Result<f64, ParityError> {
    let outs = outputs::<B>(case, device)?;
    case.compare_outputs(&outs)
}
