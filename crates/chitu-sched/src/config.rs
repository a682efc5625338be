//! diffusers scheduler configs, with diffusers' defaults, and their validation.
//!
//! Fields that exist only for non-flow (VP) schedules are accepted when they cannot change the flow
//! schedule; options that would change the math and are not implemented are rejected.

use crate::SchedError;
use serde::{Deserialize, Deserializer};

/// Reads a float that Python's `json` may have written as `Infinity`, `-Infinity` or `NaN`
/// (after [`parse_python_json`] has turned those into strings).
fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        F(f64),
        S(String),
    }
    match Num::deserialize(d)? {
        Num::F(x) => Ok(x),
        Num::S(s) => match s.as_str() {
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            "NaN" => Ok(f64::NAN),
            _ => Err(serde::de::Error::custom(format!("not a number: {s:?}"))),
        },
    }
}

/// Parses JSON as Python's `json` module writes it: bare `Infinity`, `-Infinity` and `NaN` tokens
/// (outside strings) become the strings `"Infinity"`, `"-Infinity"` and `"NaN"`.
pub fn parse_python_json(text: &str) -> Result<serde_json::Value, serde_json::Error> {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_string {
            if let Some(tok) = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|t| rest.starts_with(t))
            {
                out.push('"');
                out.push_str(tok);
                out.push('"');
                rest = &rest[tok.len()..];
                continue;
            }
            in_string = c == '"';
        } else if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            in_string = false;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    serde_json::from_str(&out)
}

fn unsupported(class: &'static str, option: &'static str, value: impl ToString) -> SchedError {
    SchedError::Unsupported {
        class,
        option,
        value: value.to_string(),
    }
}

fn require(cond: bool, class: &'static str, option: &'static str, value: impl ToString) -> Result<(), SchedError> {
    if cond {
        Ok(())
    } else {
        Err(unsupported(class, option, value))
    }
}

fn check_shift(class: &'static str, option: &'static str, shift: f64) -> Result<(), SchedError> {
    if shift.is_finite() && shift > 0.0 {
        Ok(())
    } else {
        Err(SchedError::Invalid {
            class,
            option,
            reason: format!("{shift} must be finite and positive"),
        })
    }
}

fn check_train_steps(class: &'static str, n: usize) -> Result<(), SchedError> {
    if n >= 2 {
        Ok(())
    } else {
        Err(SchedError::Invalid {
            class,
            option: "num_train_timesteps",
            reason: format!("{n} must be at least 2"),
        })
    }
}

fn check_spacing(class: &'static str, spacing: &str) -> Result<(), SchedError> {
    // The flow-sigma branch ignores the spacing, but diffusers still rejects unknown values.
    require(
        matches!(spacing, "linspace" | "leading" | "trailing"),
        class,
        "timestep_spacing",
        spacing,
    )
}

fn check_no_alt_sigmas(class: &'static str, karras: bool, exp: bool, beta: bool) -> Result<(), SchedError> {
    require(!karras, class, "use_karras_sigmas", karras)?;
    require(!exp, class, "use_exponential_sigmas", exp)?;
    require(!beta, class, "use_beta_sigmas", beta)
}

/// Where the final sigma of a schedule lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmas {
    /// The last sigma is 0: the final step returns the model's clean prediction.
    Zero,
    /// The last sigma is the smallest training sigma.
    SigmaMin,
}

/// diffusers' `UniPCMultistepScheduler` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UniPcConfig {
    /// Timesteps the model was trained with (1000).
    pub num_train_timesteps: usize,
    /// Multistep order of the solver.
    pub solver_order: usize,
    /// What the model predicts; chitu supports `flow_prediction`.
    pub prediction_type: String,
    /// Dynamic thresholding (unsupported; must be false).
    pub thresholding: bool,
    /// Whether UniPC updates the predicted clean sample (diffusers' default).
    pub predict_x0: bool,
    /// The solver variant (`bh1`/`bh2` for UniPC, `midpoint`/`heun` for DPM-Solver).
    pub solver_type: String,
    /// Lower the order on the last steps, as diffusers does for short schedules.
    pub lower_order_final: bool,
    /// Steps whose UniPC corrector is skipped.
    pub disable_corrector: Vec<usize>,
    /// An alternative predictor solver (unsupported; must be null).
    pub solver_p: Option<serde_json::Value>,
    /// Karras sigmas (unsupported; must be false).
    pub use_karras_sigmas: bool,
    /// Exponential sigmas (unsupported; must be false).
    pub use_exponential_sigmas: bool,
    /// Beta sigmas (unsupported; must be false).
    pub use_beta_sigmas: bool,
    /// Flow-matching sigmas; Wan's configs set it.
    pub use_flow_sigmas: bool,
    /// The flow shift applied to the sigmas (Wan: 3.0 to 12.0).
    #[serde(deserialize_with = "lenient_f64")]
    pub flow_shift: f64,
    /// How timesteps are spaced (`linspace`, `leading`, `trailing`).
    pub timestep_spacing: String,
    /// The last sigma: zero or the schedule's minimum.
    pub final_sigmas_type: FinalSigmas,
    /// Resolution-dependent shifting (unsupported; must be false).
    pub use_dynamic_shifting: bool,
    /// Bound of the Karras/exponential/beta tables; the flow sigmas do not read it.
    pub sigma_min: Option<f64>,
    /// Bound of the Karras/exponential/beta tables; the flow sigmas do not read it.
    pub sigma_max: Option<f64>,
    /// Stretches the shifted schedule so that its last sigma equals this value.
    pub shift_terminal: Option<f64>,
}

impl Default for UniPcConfig {
    /// diffusers' constructor defaults (epsilon prediction, no flow sigmas): not usable as is.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            solver_order: 2,
            prediction_type: "epsilon".into(),
            thresholding: false,
            predict_x0: true,
            solver_type: "bh2".into(),
            lower_order_final: true,
            disable_corrector: Vec::new(),
            solver_p: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            timestep_spacing: "linspace".into(),
            final_sigmas_type: FinalSigmas::Zero,
            use_dynamic_shifting: false,
            sigma_min: None,
            sigma_max: None,
            shift_terminal: None,
        }
    }
}

/// What both multistep solvers require: a valid training length, flow prediction, flow sigmas.
fn check_flow_multistep(
    class: &'static str,
    train_steps: usize,
    prediction_type: &str,
    use_flow_sigmas: bool,
) -> Result<(), SchedError> {
    check_train_steps(class, train_steps)?;
    require(
        prediction_type == "flow_prediction",
        class,
        "prediction_type",
        prediction_type,
    )?;
    require(use_flow_sigmas, class, "use_flow_sigmas", use_flow_sigmas)
}

impl UniPcConfig {
    /// The config Wan2.1/2.2 diffusers folders ship (flow prediction, bh2, order 2); shift 5.0 by default.
    pub fn wan() -> Self {
        Self {
            prediction_type: "flow_prediction".into(),
            use_flow_sigmas: true,
            flow_shift: 5.0,
            ..Self::default()
        }
    }

    /// Checks that every option is one this crate implements; returns the effective solver type.
    pub(crate) fn validate(&self) -> Result<(), SchedError> {
        const C: &str = "UniPCMultistepScheduler";
        check_flow_multistep(C, self.num_train_timesteps, &self.prediction_type, self.use_flow_sigmas)?;
        // diffusers rejects flow_prediction without predict_x0 as well.
        require(self.predict_x0, C, "predict_x0", self.predict_x0)?;
        require(!self.thresholding, C, "thresholding", self.thresholding)?;
        require(
            self.solver_p.as_ref().is_none_or(|v| v.is_null()),
            C,
            "solver_p",
            "a scheduler",
        )?;
        require(
            (1..=3).contains(&self.solver_order),
            C,
            "solver_order",
            self.solver_order,
        )?;
        require(
            matches!(
                self.solver_type.as_str(),
                "bh1" | "bh2" | "midpoint" | "heun" | "logrho"
            ),
            C,
            "solver_type",
            &self.solver_type,
        )?;
        check_no_alt_sigmas(
            C,
            self.use_karras_sigmas,
            self.use_exponential_sigmas,
            self.use_beta_sigmas,
        )?;
        require(!self.use_dynamic_shifting, C, "use_dynamic_shifting", true)?;
        // sigma_min/sigma_max only feed the Karras/exponential/beta tables, which are rejected above.
        if let Some(t) = self.shift_terminal {
            if !(t.is_finite() && t < 1.0) {
                return Err(SchedError::Invalid {
                    class: C,
                    option: "shift_terminal",
                    reason: format!("{t} must be finite and below 1"),
                });
            }
        }
        check_spacing(C, &self.timestep_spacing)?;
        check_shift(C, "flow_shift", self.flow_shift)?;
        // With a zero final sigma, a multistep update at the last step divides by log(0) terms:
        // diffusers returns inf/NaN there. Refuse the combination instead.
        if !self.lower_order_final && self.final_sigmas_type == FinalSigmas::Zero && self.solver_order > 1 {
            return Err(SchedError::Invalid {
                class: C,
                option: "lower_order_final",
                reason: "false with final_sigmas_type=zero and solver_order>1 makes the last step non-finite (as in diffusers)".into(),
            });
        }
        Ok(())
    }

    /// `bh1` or `bh2`; diffusers maps the DPM names midpoint/heun/logrho to bh2.
    pub(crate) fn is_bh1(&self) -> bool {
        self.solver_type == "bh1"
    }
}

/// diffusers' `DPMSolverMultistepScheduler` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DpmSolverConfig {
    /// Timesteps the model was trained with (1000).
    pub num_train_timesteps: usize,
    /// Multistep order of the solver.
    pub solver_order: usize,
    /// What the model predicts; chitu supports `flow_prediction`.
    pub prediction_type: String,
    /// Dynamic thresholding (unsupported; must be false).
    pub thresholding: bool,
    /// `dpmsolver++` (or `sde-dpmsolver++`, unsupported).
    pub algorithm_type: String,
    /// The solver variant (`bh1`/`bh2` for UniPC, `midpoint`/`heun` for DPM-Solver).
    pub solver_type: String,
    /// Lower the order on the last steps, as diffusers does for short schedules.
    pub lower_order_final: bool,
    /// Take a first-order step at the end.
    pub euler_at_final: bool,
    /// Karras sigmas (unsupported; must be false).
    pub use_karras_sigmas: bool,
    /// Exponential sigmas (unsupported; must be false).
    pub use_exponential_sigmas: bool,
    /// Beta sigmas (unsupported; must be false).
    pub use_beta_sigmas: bool,
    /// Uniform-lambda steps (unsupported; must be false).
    pub use_lu_lambdas: bool,
    /// Flow-matching sigmas; Wan's configs set it.
    pub use_flow_sigmas: bool,
    /// The flow shift applied to the sigmas (Wan: 3.0 to 12.0).
    #[serde(deserialize_with = "lenient_f64")]
    pub flow_shift: f64,
    /// The last sigma: zero or the schedule's minimum.
    pub final_sigmas_type: FinalSigmas,
    /// Learned variance (unsupported; must be null).
    pub variance_type: Option<String>,
    /// How timesteps are spaced (`linspace`, `leading`, `trailing`).
    pub timestep_spacing: String,
    /// Resolution-dependent shifting (unsupported; must be false).
    pub use_dynamic_shifting: bool,
}

impl Default for DpmSolverConfig {
    /// diffusers' constructor defaults (epsilon prediction, no flow sigmas): not usable as is.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            solver_order: 2,
            prediction_type: "epsilon".into(),
            thresholding: false,
            algorithm_type: "dpmsolver++".into(),
            solver_type: "midpoint".into(),
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            final_sigmas_type: FinalSigmas::Zero,
            variance_type: None,
            timestep_spacing: "linspace".into(),
            use_dynamic_shifting: false,
        }
    }
}

impl DpmSolverConfig {
    /// Wan's "dpm++": flow prediction, dpmsolver++ order 2, midpoint; shift 5.0 by default.
    pub fn wan() -> Self {
        Self {
            prediction_type: "flow_prediction".into(),
            use_flow_sigmas: true,
            flow_shift: 5.0,
            ..Self::default()
        }
    }

    pub(crate) fn validate(&self) -> Result<(), SchedError> {
        const C: &str = "DPMSolverMultistepScheduler";
        check_flow_multistep(C, self.num_train_timesteps, &self.prediction_type, self.use_flow_sigmas)?;
        require(
            self.algorithm_type == "dpmsolver++",
            C,
            "algorithm_type",
            &self.algorithm_type,
        )?;
        require(
            matches!(self.solver_type.as_str(), "midpoint" | "heun"),
            C,
            "solver_type",
            &self.solver_type,
        )?;
        require(
            (1..=2).contains(&self.solver_order),
            C,
            "solver_order",
            self.solver_order,
        )?;
        require(!self.thresholding, C, "thresholding", true)?;
        require(!self.use_lu_lambdas, C, "use_lu_lambdas", true)?;
        require(
            self.variance_type.is_none(),
            C,
            "variance_type",
            format!("{:?}", self.variance_type),
        )?;
        check_no_alt_sigmas(
            C,
            self.use_karras_sigmas,
            self.use_exponential_sigmas,
            self.use_beta_sigmas,
        )?;
        require(!self.use_dynamic_shifting, C, "use_dynamic_shifting", true)?;
        check_spacing(C, &self.timestep_spacing)?;
        check_shift(C, "flow_shift", self.flow_shift)?;
        // diffusers takes this final sigma from the VP beta table (about 0.01), which can lie above
        // the last flow sigma and re-noise the sample at the final step. Refuse it.
        if self.final_sigmas_type == FinalSigmas::SigmaMin {
            return Err(SchedError::Invalid {
                class: C,
                option: "final_sigmas_type",
                reason: "sigma_min with flow sigmas uses the VP table's minimum and re-noises the last step; use zero"
                    .into(),
            });
        }
        Ok(())
    }
}

/// diffusers' `FlowMatchEulerDiscreteScheduler` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct FlowMatchEulerConfig {
    /// Timesteps the model was trained with (1000).
    pub num_train_timesteps: usize,
    /// The flow shift applied to the sigmas.
    #[serde(deserialize_with = "lenient_f64")]
    pub shift: f64,
    /// Resolution-dependent shifting (unsupported; must be false).
    pub use_dynamic_shifting: bool,
    /// Inverted sigmas (unsupported; must be false).
    pub invert_sigmas: bool,
    /// Stretches the schedule so that its last sigma equals this value.
    pub shift_terminal: Option<f64>,
    /// Karras sigmas (unsupported; must be false).
    pub use_karras_sigmas: bool,
    /// Exponential sigmas (unsupported; must be false).
    pub use_exponential_sigmas: bool,
    /// Beta sigmas (unsupported; must be false).
    pub use_beta_sigmas: bool,
    /// Stochastic Euler sampling (unsupported; must be false).
    pub stochastic_sampling: bool,
}

impl Default for FlowMatchEulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            invert_sigmas: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            stochastic_sampling: false,
        }
    }
}

impl FlowMatchEulerConfig {
    pub(crate) fn validate(&self) -> Result<(), SchedError> {
        const C: &str = "FlowMatchEulerDiscreteScheduler";
        check_train_steps(C, self.num_train_timesteps)?;
        check_shift(C, "shift", self.shift)?;
        require(!self.use_dynamic_shifting, C, "use_dynamic_shifting", true)?;
        require(!self.invert_sigmas, C, "invert_sigmas", true)?;
        require(
            self.shift_terminal.is_none(),
            C,
            "shift_terminal",
            format!("{:?}", self.shift_terminal),
        )?;
        require(!self.stochastic_sampling, C, "stochastic_sampling", true)?;
        check_no_alt_sigmas(
            C,
            self.use_karras_sigmas,
            self.use_exponential_sigmas,
            self.use_beta_sigmas,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_json_non_finite_tokens_become_strings() {
        let v = parse_python_json(r#"{"a": -Infinity, "b": "NaN inside -Infinity", "c": [NaN, Infinity], "d": "é"}"#)
            .unwrap();
        assert_eq!(v["a"], "-Infinity");
        assert_eq!(v["b"], "NaN inside -Infinity");
        assert_eq!(v["c"][0], "NaN");
        assert_eq!(v["c"][1], "Infinity");
        assert_eq!(v["d"], "é");
    }

    #[test]
    fn lenient_floats_accept_python_infinities() {
        let v = parse_python_json(r#"{"flow_shift": Infinity}"#).unwrap();
        let c: UniPcConfig = serde_json::from_value(v).unwrap();
        assert!(c.flow_shift.is_infinite());
        assert!(c.validate().is_err());
    }
}
