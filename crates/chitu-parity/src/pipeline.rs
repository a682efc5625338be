//! `pipeline` cases: a whole text-to-video run from given initial latents.

use super::tensors::HostTensor;
use super::{Case, ParityError};
use burn::tensor::backend::Backend;
use chitu_gen::{
    video_to_frames, ConditionImage, DiffusionBackend, DiffusionTask, DiffusionUserParams, Expert, Generator,
    LoadOptions, LoraSpec,
};

/// The request a `pipeline` case describes: its `params`, and its `cache` when it has one.
pub fn params(case: &Case) -> Result<DiffusionUserParams, ParityError> {
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
    // Pictures are PNG paths relative to the fixture root.
    let picture = |k: &str| -> Result<Option<ConditionImage>, ParityError> {
        match p.get(k).and_then(|v| v.as_str()) {
            None => Ok(None),
            Some(path) => ConditionImage::open(case.root.join(path))
                .map(Some)
                .map_err(|e| ParityError::Case(format!("case {}: params.{k}: {e}", case.name))),
        }
    };
    Ok(DiffusionUserParams {
        image: picture("image")?,
        last_image: picture("last_image")?,
        prompt: get_s("prompt"),
        negative_prompt: get_s("negative_prompt"),
        height: get_u("height")?,
        width: get_u("width")?,
        num_frames: get_u("num_frames")?,
        num_inference_steps: get_u("num_inference_steps")?,
        guidance_scale: get_f("guidance_scale")?,
        guidance_scale_2: p.get("guidance_scale_2").and_then(|v| v.as_f64()),
        max_sequence_length: get_u("max_sequence_length")?,
        cache: case
            .json
            .get("cache")
            .map(chitu_cache::CacheConfig::from_json)
            .transpose()
            .map_err(|e| ParityError::Case(format!("case {}: {e}", case.name)))?,
        ..DiffusionUserParams::default()
    })
}

/// The case's `loras` (`{path, strength, expert}`, paths relative to the fixture root).
pub fn loras(case: &Case) -> Result<Vec<LoraSpec>, ParityError> {
    let Some(list) = case.json.get("loras") else {
        return Ok(Vec::new());
    };
    let bad = |m: String| ParityError::Case(format!("case {}: loras: {m}", case.name));
    let list = list.as_array().ok_or_else(|| bad("not a list".into()))?;
    list.iter()
        .map(|entry| {
            let path = entry
                .get("path")
                .and_then(|v| v.as_str())
                .ok_or_else(|| bad(format!("{entry} has no path")))?;
            let strength = entry.get("strength").map_or(Some(1.0), |v| v.as_f64());
            let strength = strength.ok_or_else(|| bad(format!("{entry}: strength is not a number")))?;
            let expert = match entry.get("expert").and_then(|v| v.as_str()) {
                Some(e) => e.parse().map_err(bad)?,
                None => Expert::Both,
            };
            Ok(LoraSpec {
                path: case.root.join(path),
                strength: strength as f32,
                expert,
            })
        })
        .collect()
}

/// Runs the case's pipeline; returns the outputs the case's tensor file holds references for.
///
/// A case with a `cache` runs with that policy; when it also holds `uncached_final_latents`, the
/// same run without the cache is checked against those. A case with `loras` runs with them
/// merged; when it also holds `no_lora_final_latents`, the run is repeated after they are taken
/// out again.
pub fn outputs<B: Backend>(case: &Case, device: &B::Device) -> Result<Vec<(&'static str, HostTensor)>, ParityError> {
    let model = case
        .field("model")?
        .as_str()
        .ok_or_else(|| ParityError::Case(format!("case {}: model is not a string", case.name)))?;
    // Every component at the case's precision, the VAE included: the run checks each of them.
    let options = LoadOptions {
        dtype: case.precision,
        vae_dtype: case.precision,
        weights: case.weights,
        loras: loras(case)?,
        ..LoadOptions::default()
    };
    let backend = DiffusionBackend::<B>::load(case.root.join(model), device, options)
        .map_err(|e| ParityError::Component(e.into()))?;
    let generator = Generator::new(backend);
    let params = params(case)?;
    // Decode only when the case has reference frames.
    let want_frames = case.tensors.contains_key("frames");
    let (latents, frames) = run_pipeline(case, &generator, params.clone(), want_frames, device)?;
    let mut outs = vec![("final_latents", latents)];
    outs.extend(frames.map(|f| ("frames", f)));
    if case.tensors.contains_key("no_lora_final_latents") {
        // The same run with the LoRAs taken out again: unmerging must give the base model back.
        generator
            .backend
            .remove_lora()
            .map_err(|e| ParityError::Component(e.into()))?;
        let (latents, _) = run_pipeline(case, &generator, params.clone(), false, device)?;
        outs.push(("no_lora_final_latents", latents));
    }
    if params.cache.is_some() && case.tensors.contains_key("uncached_final_latents") {
        let uncached = DiffusionUserParams { cache: None, ..params };
        let (latents, _) = run_pipeline(case, &generator, uncached, false, device)?;
        outs.push(("uncached_final_latents", latents));
    }
    Ok(outs)
}

/// One run from the case's initial latents: the final latents, and the frames when asked.
fn run_pipeline<B: Backend>(
    case: &Case,
    generator: &Generator<B>,
    params: DiffusionUserParams,
    want_frames: bool,
    device: &B::Device,
) -> Result<(HostTensor, Option<HostTensor>), ParityError> {
    let component = |e: chitu_gen::GenError| ParityError::Component(e.into());
    let initial = case
        .tensor("initial_latents")?
        .to_backend::<B, 5>("initial_latents", device)?;
    let mut task = DiffusionTask::from_user_request(params)
        .map_err(component)?
        .with_initial_latents(initial);
    while task.stage() != chitu_gen::Stage::VaeDecode {
        generator.generate_step(&mut task).map_err(component)?;
    }
    if let Some(stats) = task.cache_stats() {
        tracing::info!(case = %case.name, ?stats, "cache");
    }
    let latents = task
        .latents()
        .cloned()
        .ok_or(ParityError::Component("no latents".into()))?;
    let latents = HostTensor::from_backend(latents)?;
    if !want_frames {
        return Ok((latents, None));
    }
    generator.generate_step(&mut task).map_err(component)?;
    let video = task.into_video().map_err(component)?;
    Ok((latents, Some(HostTensor::from_backend(video_to_frames(video))?)))
}

/// Runs a `pipeline` case; returns the worst rel_l2 over its outputs.
pub fn run<B: Backend>(case: &Case, device: &B::Device) -> Result<f64, ParityError> {
    let outs = outputs::<B>(case, device)?;
    case.compare_outputs(&outs)
}
