//! The parity runner: reproduces reference outputs made with diffusers/transformers.
//!
//! A parity folder holds `cases/NAME.json` (what to run, the tolerance, non-tensor inputs) and
//! `cases/NAME.safetensors` (tensor inputs and reference outputs), plus the models under
//! `models/`. Each case is run from what its JSON says alone, so any folder with this layout works.
//!
//! This is a dev-only crate (`publish = false`): the facade's `parity` and `dist_check` examples
//! and the tests use it, and the model crates run their own kinds with it in their tests.

#![warn(missing_docs)]

pub mod dit;
pub mod pipeline;
pub mod scheduler;
pub mod tensors;
pub mod text;
pub mod vae;

use burn::tensor::backend::Backend;
pub use chitu_gen::{Format, Precision, Weights};
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use tensors::HostTensor;

/// Why a case could not be run.
#[derive(Debug, thiserror::Error)]
pub enum ParityError {
    /// A file could not be read.
    #[error("cannot read {0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// A case file is malformed or lacks a field or tensor.
    #[error("{0}")]
    Case(String),
    /// The component under test returned an error.
    #[error("{0}")]
    Component(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// One loaded case: its JSON and its tensors.
pub struct Case {
    /// The case name (file stem).
    pub name: String,
    /// The parity folder the case belongs to; model paths in the JSON are relative to it.
    pub root: PathBuf,
    /// The parsed case JSON.
    pub json: Value,
    /// The tensors of `cases/NAME.safetensors` (or the file the JSON's `tensors` names).
    pub tensors: HashMap<String, HostTensor>,
    /// The dtype the case's models are loaded in; f32 unless a run asks otherwise. The
    /// references stay f32 whatever it is.
    pub precision: Precision,
    /// How the DiT's and the text encoder's linear layers are loaded (int8 with `--weights int8`).
    pub weights: Weights,
}

/// The rel-L2 bound at reduced precision (bf16 or f16): diffusers itself, run in bf16 on these
/// fixtures, is 6e-3 (DiT forward) to 1.1e-2 (pipelines) from its own f32 results.
pub const REDUCED_TOLERANCE: f64 = 2e-2;

/// The bound at reduced precision for a case with a feature cache, where a skip decision may
/// flip between precisions.
pub const REDUCED_CACHE_TOLERANCE: f64 = 1e-1;

/// The rel-L2 bound with int8 linear layers (`--weights int8`); see the README's "8-bit
/// weights" for the measurement it comes from.
pub const INT8_TOLERANCE: f64 = 5e-2;

/// The int8 bound for a case with a feature cache.
pub const INT8_CACHE_TOLERANCE: f64 = 1e-1;

impl Case {
    /// Loads `root/cases/name.json` and its tensor file.
    pub fn load(root: &Path, name: &str) -> Result<Self, ParityError> {
        let json_path = root.join("cases").join(format!("{name}.json"));
        let text =
            std::fs::read_to_string(&json_path).map_err(|e| ParityError::Io(json_path.display().to_string(), e))?;
        let json = chitu_sched::parse_python_json(&text)
            .map_err(|e| ParityError::Case(format!("{}: invalid JSON: {e}", json_path.display())))?;
        let tensor_file = json
            .get("tensors")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{name}.safetensors"));
        let tensors = tensors::load_safetensors(&root.join("cases").join(tensor_file))?;
        Ok(Self {
            name: name.to_owned(),
            root: root.to_owned(),
            json,
            tensors,
            precision: Precision::F32,
            weights: Weights::Float,
        })
    }

    /// The format the DiT and the text encoder are loaded in.
    pub fn format(&self) -> Format {
        Format::new(self.precision, self.weights)
    }

    /// The case's `kind`.
    pub fn kind(&self) -> Result<&str, ParityError> {
        self.json
            .get("kind")
            .and_then(Value::as_str)
            .ok_or_else(|| ParityError::Case(format!("case {}: no \"kind\" field", self.name)))
    }

    /// The case's `tolerance.rel_l2` at f32; at a reduced precision, [`REDUCED_TOLERANCE`], or
    /// [`REDUCED_CACHE_TOLERANCE`] for a case with a `cache`; with int8 linear layers (in a
    /// case that runs a DiT or a text encoder), [`INT8_TOLERANCE`] or [`INT8_CACHE_TOLERANCE`].
    pub fn tolerance(&self) -> Result<f64, ParityError> {
        let f32_tol = self
            .json
            .pointer("/tolerance/rel_l2")
            .and_then(Value::as_f64)
            .ok_or_else(|| ParityError::Case(format!("case {}: no tolerance.rel_l2", self.name)))?;
        let cached = self.json.get("cache").is_some_and(|c| !c.is_null());
        // Only the DiT and the text encoder have linear layers to quantize.
        let int8 = match self.kind()? {
            "dit_forward" | "text_encode" | "pipeline" => self.weights,
            _ => Weights::Float,
        };
        Ok(match (int8, self.precision, cached) {
            (Weights::Int8, _, false) => f32_tol.max(INT8_TOLERANCE),
            (Weights::Int8, _, true) => f32_tol.max(INT8_CACHE_TOLERANCE),
            (_, Precision::F32, _) => f32_tol,
            (_, _, false) => f32_tol.max(REDUCED_TOLERANCE),
            (_, _, true) => f32_tol.max(REDUCED_CACHE_TOLERANCE),
        })
    }

    /// A tensor of the case, or an error naming it.
    pub fn tensor(&self, key: &str) -> Result<&HostTensor, ParityError> {
        self.tensors
            .get(key)
            .ok_or_else(|| ParityError::Case(format!("case {}: tensor file has no {key:?}", self.name)))
    }

    /// A JSON field of the case, or an error naming it.
    pub fn field(&self, key: &str) -> Result<&Value, ParityError> {
        self.json
            .get(key)
            .ok_or_else(|| ParityError::Case(format!("case {}: no {key:?} field", self.name)))
    }

    /// Compares named outputs with the case's reference tensors; returns the worst rel_l2.
    pub fn compare_outputs(&self, outputs: &[(&str, HostTensor)]) -> Result<f64, ParityError> {
        let mut worst = 0.0f64;
        for (name, out) in outputs {
            let e = tensors::compare(name, out, self.tensor(name)?)?;
            tracing::debug!(case = %self.name, output = name, rel_l2 = e);
            worst = worst.max(e);
        }
        Ok(worst)
    }
}

/// The result of one case.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The case ran; `rel_l2` is the worst over its outputs.
    Ran {
        /// The worst relative L2 error.
        rel_l2: f64,
        /// The case's tolerance.
        tol: f64,
    },
    /// No implementation exists yet for the case's kind.
    Unsupported(String),
    /// The case could not be loaded or the component failed.
    Error(String),
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct CaseReport {
    /// The case.
    pub name: String,
    /// How it went.
    pub outcome: Outcome,
}

impl CaseReport {
    /// Whether the case passed.
    pub fn passed(&self) -> bool {
        matches!(self.outcome, Outcome::Ran { rel_l2, tol } if rel_l2 <= tol)
    }
}

impl fmt::Display for CaseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Ran { rel_l2, tol } => write!(
                f,
                "case {}: rel_l2={rel_l2:.3e} tol={tol:e} {}",
                self.name,
                if self.passed() { "ok" } else { "FAIL" }
            ),
            Outcome::Unsupported(kind) => write!(f, "case {}: unsupported kind {kind}", self.name),
            Outcome::Error(msg) => write!(f, "case {}: error: {msg} FAIL", self.name),
        }
    }
}

/// The committed fixture folder (`tests/fixtures/parity` at the workspace root).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity")
}

/// Runs every committed fixture case whose name starts with one of `prefixes` on burn-flex, and
/// panics with the report of each one that fails: how each crate's own tests check its kinds.
pub fn assert_cases_pass(prefixes: &[&str]) {
    assert_cases_pass_as(prefixes, Precision::F32)
}

/// [`assert_cases_pass`] at bf16 and at f16, each at the reduced-precision tolerance.
pub fn assert_cases_pass_at_reduced_precision(prefixes: &[&str]) {
    for precision in [Precision::Bf16, Precision::F16] {
        assert_cases_pass_as(prefixes, precision);
    }
}

/// [`assert_cases_pass`] with the models' weights in `precision`, at its tolerance.
pub fn assert_cases_pass_as(prefixes: &[&str], format: impl Into<Format>) {
    let format = format.into();
    let prefixes: Vec<String> = prefixes.iter().map(|p| p.to_string()).collect();
    let names = list_cases(&fixtures(), &prefixes).unwrap_or_else(|e| panic!("listing the fixture cases: {e}"));
    let device = Default::default();
    let failed: Vec<String> = names
        .iter()
        .map(|name| run_case_as::<burn_flex::Flex>(&fixtures(), name, &device, format))
        .filter(|report| !report.passed())
        .map(|report| report.to_string())
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// The names of the cases under `root/cases` that start with one of `prefixes` (all if empty),
/// sorted; an error when there are none, saying why.
pub fn list_cases(root: &Path, prefixes: &[String]) -> Result<Vec<String>, ParityError> {
    let dir = root.join("cases");
    let entries = std::fs::read_dir(&dir).map_err(|e| ParityError::Io(dir.display().to_string(), e))?;
    let mut names = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| ParityError::Io(dir.display().to_string(), e))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if prefixes.is_empty() || prefixes.iter().any(|p| stem.starts_with(p.as_str())) {
            names.push(stem.to_owned());
        }
    }
    names.sort();
    if names.is_empty() {
        // "0 passed, 0 failed" says nothing; say why there is nothing to run.
        return Err(ParityError::Case(match prefixes.is_empty() {
            true => format!("{} holds no case (no NAME.json)", dir.display()),
            false => format!("no case in {} starts with {prefixes:?}", dir.display()),
        }));
    }
    Ok(names)
}

/// Runs one case on backend `B`, at f32.
pub fn run_case<B: Backend>(root: &Path, name: &str, device: &B::Device) -> CaseReport {
    run_case_as::<B>(root, name, device, Precision::F32)
}

/// Runs one case on backend `B` with its models' weights in `format` (a [`Precision`], or one
/// with int8 linear layers), against the same f32 references, at the tolerance
/// [`Case::tolerance`] gives that format.
pub fn run_case_as<B: Backend>(root: &Path, name: &str, device: &B::Device, format: impl Into<Format>) -> CaseReport {
    let Format { precision, weights } = format.into();
    let load = |root, name| {
        Case::load(root, name).map(|case| Case {
            precision,
            weights,
            ..case
        })
    };
    let outcome = match load(root, name).and_then(|case| run_loaded::<B>(&case, device)) {
        Ok(o) => o,
        Err(e) => Outcome::Error(e.to_string()),
    };
    CaseReport {
        name: name.to_owned(),
        outcome,
    }
}

fn run_loaded<B: Backend>(case: &Case, device: &B::Device) -> Result<Outcome, ParityError> {
    let kind = case.kind()?;
    let tol = case.tolerance()?;
    let rel_l2 = match kind {
        "scheduler" => scheduler::run::<B>(case, device)?,
        "dit_forward" => dit::run::<B>(case, device)?,
        "text_encode" => text::run::<B>(case, device)?,
        "pipeline" => pipeline::run::<B>(case, device)?,
        "vae_decode" | "vae_encode" | "vae_decode_tiled" => vae::run::<B>(case, device)?,
        other => return Ok(Outcome::Unsupported(other.to_owned())),
    };
    Ok(Outcome::Ran { rel_l2, tol })
}
