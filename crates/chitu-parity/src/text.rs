//! `text_encode` cases: tokenizer ids/mask (exact), UMT5 states and the pipeline's prompt embeddings.

use super::tensors::{HostTensor, Values};
use super::{Case, ParityError};
use burn::tensor::backend::Backend;
use chitu_text::TextEncoder;

/// The four outputs of a text case, named as the case stores them.
pub fn encode<B: Backend>(case: &Case, device: &B::Device) -> Result<Vec<(&'static str, HostTensor)>, ParityError> {
    let model = case
        .field("model")?
        .as_str()
        .ok_or_else(|| ParityError::Case(format!("case {}: model is not a string", case.name)))?;
    let prompts: Vec<String> = serde_json::from_value(case.field("prompts")?.clone())
        .map_err(|e| ParityError::Case(format!("case {}: prompts: {e}", case.name)))?;
    let max_len = case
        .field("max_sequence_length")?
        .as_u64()
        .ok_or_else(|| ParityError::Case(format!("case {}: max_sequence_length is not an integer", case.name)))?
        as usize;
    let text = TextEncoder::<B>::from_pipeline_dir_as(case.root.join(model), device, case.format())
        .map_err(|e| ParityError::Component(e.into()))?;
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let (enc, hidden) = text
        .encode(&refs, max_len)
        .map_err(|e| ParityError::Component(e.into()))?;
    let embeds = text
        .encode_prompt(&refs, max_len)
        .map_err(|e| ParityError::Component(e.into()))?;
    let ints = |v: Vec<i64>| HostTensor {
        shape: vec![enc.batch, enc.max_len],
        values: Values::I64(v),
    };
    Ok(vec![
        ("input_ids", ints(enc.ids.clone())),
        ("attention_mask", ints(enc.mask.clone())),
        ("last_hidden_state", HostTensor::from_backend(hidden)?),
        ("prompt_embeds", HostTensor::from_backend(embeds)?),
    ])
}

/// Runs a `text_encode` case; returns the worst rel_l2 over its outputs.
pub fn run<B: Backend>(case: &Case, device: &B::Device) -> Result<f64, ParityError> {
    let outputs = encode::<B>(case, device)?;
    case.compare_outputs(&outputs)
}
