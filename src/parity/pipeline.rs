//! `pipeline` cases: a whole text-to-video run from given initial latents.

use super::tensors::HostTensor;
use super::{Case, ParityError};
use burn::tensor::backend::Backend;
use chitu_gen::{video_to_frames, DiffusionBackend, DiffusionTask, DiffusionUserParams, Generator};

fn params(case: &Case) -> Result<DiffusionUserParams, ParityError> {
    let p = case.field("params")?;
    let get_u = |k: &str| {
        p.get(k)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| ParityError::Case(format!("case {}: params.{k} missing or not an integer", case.name)))
    };
    let get_f = |k: &str| {
        p.get(k)
            .and_then(|v| v.as_f64())
            .ok_or_else(|| ParityError::Case(format!("case {}: params.{k} missing or not a number", case.name)))
    };
    let get_s = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
    Ok(DiffusionUserParams {
        prompt: get_s("prompt"),
        negative_prompt: get_s("negative_prompt"),
        height: get_u("height")?,
        width: get_u("width")?,
        num_frames: get_u("num_frames")?,
        num_inference_steps: get_u("num_inference_steps")?,
        guidance_scale: get_f("guidance_scale")?,
        guidance_scale_2: p.get("guidance_scale_2").and_then(|v| v.as_f64()),
        max_sequence_length: get_u("max_sequence_length")?,
        ..DiffusionUserParams::default()
    })
}

/// Runs the case's pipeline; returns the outputs the case's tensor file holds references for.
pub fn outputs<B: Backend>(case: &Case, device: &B::Device) -> Result<Vec<(&'static str, HostTensor)>, ParityError> {
    if let Some(cache) = case.json.get("cache") {
        let policy = cache.get("policy").and_then(|v| v.as_str()).unwrap_or("?");
        return Err(ParityError::Component(format!(
            "cache policy {policy} is not implemented yet"
        )));
    }
    let model = case
        .field("model")?
        .as_str()
        .ok_or_else(|| ParityError::Case(format!("case {}: model is not a string", case.name)))?;
    let backend = DiffusionBackend::<B>::from_dir(case.root.join(model), device)
        .map_err(|e| ParityError::Component(e.to_string()))?;
    let generator = Generator::new(backend);
    let initial = case
        .tensor("initial_latents")?
        .to_backend::<B, 5>("initial_latents", device)?;
    let task = DiffusionTask::from_user_request(params(case)?)
        .map_err(|e| ParityError::Component(e.to_string()))?
        .with_initial_latents(initial);
    let component = |e: chitu_gen::GenError| ParityError::Component(e.to_string());
    let mut task = task;
    // Decode only when the case has reference frames.
    let want_frames = case.tensors.contains_key("frames");
    while task.stage != chitu_gen::Stage::VaeDecode {
        generator.generate_step(&mut task).map_err(component)?;
    }
    let latents = task
        .buffer
        .latents
        .clone()
        .ok_or_else(|| ParityError::Component("no latents".into()))?;
    let mut outs = vec![("final_latents", HostTensor::from_backend(latents)?)];
    if want_frames {
        generator.generate_step(&mut task).map_err(component)?;
        let video = task
            .buffer
            .video
            .clone()
            .ok_or_else(|| ParityError::Component("no video".into()))?;
        outs.push(("frames", HostTensor::from_backend(video_to_frames(video))?));
    }
    Ok(outs)
}

pub fn run<B: Backend>(case: &Case, device: &B::Device) -> Result<f64, ParityError> {
    let outs = outputs::<B>(case, device)?;
    case.compare_outputs(&outs)
}
