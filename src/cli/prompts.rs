//! Where the requests of one `chitu generate` come from: `--prompt`, `--prompt-file`, or one
//! request per line of `--prompts-file`.

use super::{CliError, RequestArgs, SolverArg};
use clap::ValueEnum;
use serde_json::Value;
use std::path::Path;

/// One request of a run: its label in messages and file names, and the arguments, or why its
/// line is not a request.
pub struct Request {
    /// `None` for a single request; the line number (from 1) in a prompts file.
    pub line: Option<usize>,
    /// The request, or what is wrong with its line.
    pub args: Result<RequestArgs, CliError>,
}

impl RequestArgs {
    /// The requests these arguments describe, in order.
    pub fn requests(&self) -> Result<Vec<Request>, CliError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CliError::PromptFile {
                path: path.to_path_buf(),
                source,
            })
        };
        if let Some(path) = &self.prompt_file {
            let prompt = read(path)?.trim_end_matches(['\n', '\r']).to_string();
            let args = RequestArgs {
                prompt: Some(prompt),
                prompt_file: None,
                ..self.clone()
            };
            return Ok(vec![Request {
                line: None,
                args: Ok(args),
            }]);
        }
        let Some(path) = &self.prompts_file else {
            return Ok(vec![Request {
                line: None,
                args: Ok(self.clone()),
            }]);
        };
        let text = read(path)?;
        let base = RequestArgs {
            prompts_file: None,
            ..self.clone()
        };
        Ok(text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| Request {
                line: Some(i + 1),
                args: base.with_line(l).map_err(|message| CliError::Line {
                    path: path.clone(),
                    line: i + 1,
                    message,
                }),
            })
            .collect())
    }

    /// These arguments with one line of a prompts file applied: a JSON object's fields, or the
    /// line as the prompt.
    fn with_line(&self, line: &str) -> Result<RequestArgs, String> {
        let line = line.trim();
        if !line.starts_with('{') {
            return Ok(RequestArgs {
                prompt: Some(line.to_string()),
                ..self.clone()
            });
        }
        let fields: serde_json::Map<String, Value> =
            serde_json::from_str(line).map_err(|e| format!("not a JSON object: {e}"))?;
        self.with_json(&fields, &[]).map_err(|e| e.to_string())
    }

    /// These arguments with a JSON request's fields applied, named as this command's flags
    /// (`{"prompt": "...", "seed": 3}`); `prompt` is required. Keys in `skip` are left to the
    /// caller (the server's `loras`); any other key is an unknown field.
    pub fn with_json(&self, fields: &serde_json::Map<String, Value>, skip: &[&str]) -> Result<RequestArgs, FieldError> {
        let mut r = RequestArgs {
            prompt: None,
            prompt_file: None,
            prompts_file: None,
            ..self.clone()
        };
        for (key, v) in fields {
            if skip.contains(&key.as_str()) {
                continue;
            }
            let bad = |what: &str| FieldError::new(key, format!("expected {what}, got {v}"));
            let text = || v.as_str().map(str::to_string).ok_or_else(|| bad("a string"));
            let count = || {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| bad("a whole number"))
            };
            let number = || v.as_f64().ok_or_else(|| bad("a number"));
            let numbers = || {
                v.as_array()
                    .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
                    .ok_or_else(|| bad("a list of numbers"))
            };
            match key.as_str() {
                "prompt" => r.prompt = Some(text()?),
                "negative_prompt" => r.negative_prompt = text()?,
                "steps" => r.steps = Some(count()?),
                "height" => r.height = Some(count()?),
                "width" => r.width = Some(count()?),
                "frames" => r.frames = Some(count()?),
                "guidance" => r.guidance = Some(number()?),
                "guidance_2" => r.guidance_2 = Some(number()?),
                "seed" => r.seed = v.as_u64().ok_or_else(|| bad("a whole number"))?,
                "solver" => {
                    let name = text()?;
                    r.solver = Some(SolverArg::from_str(&name, true).map_err(|_| bad("unipc, dpm++ or euler"))?);
                }
                "shift" => r.shift = Some(number()?),
                // One list per request: its own replaces the base's, of either kind.
                "timesteps" => (r.timesteps, r.sigmas) = (Some(numbers()?), None),
                "sigmas" => (r.sigmas, r.timesteps) = (Some(numbers()?), None),
                "max_sequence_length" => r.max_sequence_length = Some(count()?),
                "cache" => r.cache = Some(if v.is_object() { v.to_string() } else { text()? }),
                "cache_threshold" => r.cache_threshold = Some(number()?),
                "image" => r.image = Some(text()?.into()),
                "last_image" => r.last_image = Some(text()?.into()),
                "no_resize" => r.no_resize = v.as_bool().ok_or_else(|| bad("true or false"))?,
                other => return Err(FieldError::new(other, format!("unknown field {other:?}"))),
            }
        }
        if r.prompt.is_none() {
            return Err(FieldError::new("prompt", "no \"prompt\" field"));
        }
        Ok(r)
    }
}

/// A field of a JSON request that is not what it should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FieldError {
    /// The field, by its flag name.
    pub field: String,
    /// What is wrong, naming the field.
    pub message: String,
}

impl FieldError {
    /// An error of `field`; a message that does not start with the field's name gets it in front.
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        let message = match message.contains(field) {
            true => message,
            false => format!("{field}: {message}"),
        };
        Self {
            field: field.to_string(),
            message,
        }
    }
}
