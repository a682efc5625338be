//! `dit_forward` cases: one transformer forward, for the diffusers layout and (`also_native`) Wan's own.

use super::tensors::HostTensor;
use super::{Case, ParityError};
use burn::tensor::backend::Backend;
use chitu_dit::WanTransformer;

/// Runs the case's inputs through the transformer in `model_dir` (relative to the parity root).
pub fn forward<B: Backend>(case: &Case, model_dir: &str, device: &B::Device) -> Result<HostTensor, ParityError> {
    let dit = WanTransformer::<B>::from_dir_as(case.root.join(model_dir), device, case.format())
        .map_err(|e| ParityError::Component(e.into()))?;
    let x = case
        .tensor("hidden_states")?
        .to_backend::<B, 5>("hidden_states", device)?;
    let ctx = case
        .tensor("encoder_hidden_states")?
        .to_backend::<B, 3>("encoder_hidden_states", device)?;
    let t: Vec<f64> = case
        .tensor("timestep")?
        .as_f32("timestep")?
        .iter()
        .map(|&v| v as f64)
        .collect();
    let out = dit.forward(x, &t, ctx).map_err(|e| ParityError::Component(e.into()))?;
    HostTensor::from_backend(out)
}

/// Runs a `dit_forward` case; returns the worst rel_l2 over its outputs.
pub fn run<B: Backend>(case: &Case, device: &B::Device) -> Result<f64, ParityError> {
    let model = case
        .field("model")?
        .as_str()
        .ok_or_else(|| ParityError::Case(format!("case {}: model is not a string", case.name)))?;
    let mut worst = case.compare_outputs(&[("output", forward::<B>(case, model, device)?)])?;
    if let Some(native) = case.json.get("also_native").and_then(|v| v.as_str()) {
        worst = worst.max(case.compare_outputs(&[("output", forward::<B>(case, native, device)?)])?);
    }
    Ok(worst)
}
