//! `scheduler` cases: a schedule and a whole trajectory driven by recorded model outputs.

use super::tensors::HostTensor;
use super::{Case, ParityError};
use burn::tensor::backend::Backend;

/// The outputs of a scheduler run, in the order the case stores them.
pub struct SchedulerRun {
    /// The schedule's timesteps.
    pub timesteps: Vec<f64>,
    /// The schedule's sigmas.
    pub sigmas: Vec<f64>,
    /// The sample after every step.
    pub trajectory: HostTensor,
}

/// Replays the case's model outputs through the scheduler its config describes.
pub fn replay<B: Backend>(case: &Case, device: &B::Device) -> Result<SchedulerRun, ParityError> {
    let config = case.field("config")?;
    let steps = case
        .field("num_inference_steps")?
        .as_u64()
        .ok_or_else(|| ParityError::Case(format!("case {}: num_inference_steps is not an integer", case.name)))?
        as usize;
    let mut sched = chitu_sched::from_config_json::<B, 5>(config).map_err(|e| ParityError::Component(e.into()))?;
    sched
        .set_timesteps(steps)
        .map_err(|e| ParityError::Component(e.into()))?;

    let initial = case.tensor("initial")?;
    let outputs = case.tensor("model_outputs")?;
    let per_step: usize = initial.shape.iter().product();
    let all = outputs.as_f32("model_outputs")?;
    if outputs.shape.first() != Some(&steps) || all.len() != steps * per_step {
        return Err(ParityError::Case(format!(
            "case {}: model_outputs shape {:?} does not hold {steps} steps of {:?}",
            case.name, outputs.shape, initial.shape
        )));
    }

    let mut sample = initial.to_backend::<B, 5>("initial", device)?;
    let mut trajectory = Vec::with_capacity(steps * per_step);
    let timesteps = sched.timesteps().to_vec();
    for (i, &t) in timesteps.iter().enumerate() {
        let chunk = HostTensor::f32(initial.shape.clone(), all[i * per_step..(i + 1) * per_step].to_vec());
        let model_output = chunk.to_backend::<B, 5>("model_outputs", device)?;
        sample = sched
            .step(model_output, t, sample)
            .map_err(|e| ParityError::Component(e.into()))?;
        let host = HostTensor::from_backend(sample.clone())?;
        trajectory.extend_from_slice(host.as_f32("trajectory")?);
    }
    let mut shape = vec![steps];
    shape.extend(&initial.shape);
    Ok(SchedulerRun {
        timesteps,
        sigmas: sched.sigmas().to_vec(),
        trajectory: HostTensor::f32(shape, trajectory),
    })
}

/// Runs a `scheduler` case; returns the worst rel_l2 over its outputs.
pub fn run<B: Backend>(case: &Case, device: &B::Device) -> Result<f64, ParityError> {
    let run = replay::<B>(case, device)?;
    let as_host = |v: &[f64]| HostTensor::f32(vec![v.len()], v.iter().map(|&x| x as f32).collect());
    case.compare_outputs(&[
        ("timesteps", as_host(&run.timesteps)),
        ("sigmas", as_host(&run.sigmas)),
        ("trajectory", run.trajectory),
    ])
}
