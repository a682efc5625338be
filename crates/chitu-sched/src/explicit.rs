//! Explicit step lists, as few-step distilled models (lightx2v's 4-step LoRAs) are sampled.
//!
//! LightX2V's `WanStepDistillScheduler` takes a `denoising_step_list` such as
//! `[1000, 750, 500, 250]` and a `sample_shift` (5 for its Wan LoRAs). Step `t` reads entry
//! `T - t` of the 1000 training sigmas `linspace(1, 0, T + 1)[:-1]` after the shift, the model is
//! called at that sigma times `T`, and each step is flow-matching Euler to the next sigma, the
//! last one to 0. Everything is float32, as LightX2V runs it. [`StepList::Sigmas`] gives the
//! noise levels themselves instead (unshifted).

use crate::SchedError;

/// The noise levels of a run, given one per step instead of a step count.
#[derive(Debug, Clone, PartialEq)]
pub enum StepList {
    /// Training timesteps, integers from `T` down, read as LightX2V's `denoising_step_list`:
    /// shifted by the run's flow shift.
    Timesteps(Vec<f64>),
    /// Noise levels in (0, 1], descending, used as given.
    Sigmas(Vec<f64>),
}

impl StepList {
    /// How many steps the list makes.
    pub fn len(&self) -> usize {
        match self {
            Self::Timesteps(v) | Self::Sigmas(v) => v.len(),
        }
    }

    /// Whether it has no step.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The flag or field that gives it, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Timesteps(_) => "timesteps",
            Self::Sigmas(_) => "sigmas",
        }
    }

    /// The sigma of each step (without the final 0), as float32 values widened to f64; checks
    /// that the list is usable.
    pub fn sigmas(&self, shift: f64, num_train_timesteps: usize) -> Result<Vec<f64>, SchedError> {
        let invalid = |reason: String| SchedError::Invalid {
            class: "explicit schedule",
            option: self.name(),
            reason,
        };
        let values = match self {
            Self::Timesteps(v) | Self::Sigmas(v) => v,
        };
        if values.is_empty() {
            return Err(invalid("the list is empty".into()));
        }
        if values.windows(2).any(|w| w[1] >= w[0]) {
            return Err(invalid(format!("{values:?} must be strictly decreasing")));
        }
        match self {
            Self::Timesteps(ts) => {
                let t_max = num_train_timesteps as f64;
                if let Some(bad) = ts.iter().find(|t| t.fract() != 0.0 || **t < 1.0 || **t > t_max) {
                    return Err(invalid(format!(
                        "{bad} is not a whole training timestep from 1 to {num_train_timesteps}"
                    )));
                }
                if !shift.is_finite() || shift <= 0.0 {
                    return Err(invalid(format!("shift {shift} must be finite and positive")));
                }
                Ok(step_distill_sigmas(ts, shift, num_train_timesteps))
            }
            Self::Sigmas(s) => {
                if let Some(bad) = s.iter().find(|s| !(**s > 0.0 && **s <= 1.0)) {
                    return Err(invalid(format!("{bad} is not a noise level in (0, 1]")));
                }
                Ok(s.iter().map(|&s| s as f32 as f64).collect())
            }
        }
    }
}

/// LightX2V's step-distill sigmas for whole timesteps `ts` (each in `1..=T`) and `shift`, in its
/// float32 arithmetic: torch's `linspace(1, 0, T + 1)` (from the start for the first half, from
/// the end for the second), the flow shift, then entry `T - t`.
pub fn step_distill_sigmas(ts: &[f64], shift: f64, num_train_timesteps: usize) -> Vec<f64> {
    let steps = num_train_timesteps + 1;
    let step = -1.0f32 / num_train_timesteps as f32;
    let linspace = |i: usize| -> f32 {
        match i < steps / 2 {
            true => 1.0 + step * i as f32,
            false => 0.0 - step * (steps - i - 1) as f32,
        }
    };
    let shift = shift as f32;
    ts.iter()
        .map(|&t| {
            let s = linspace(num_train_timesteps - t as usize);
            (shift * s / (1.0 + (shift - 1.0) * s)) as f64
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lightx2v_4_step_list_at_shift_5() {
        // LightX2V's WanStepDistillScheduler.set_denoising_timesteps with denoising_step_list
        // [1000, 750, 500, 250] and sample_shift 5 (its Wan2.1 and Wan2.2 4-step LoRA configs),
        // run in torch 2.x: self.sigmas and self.timesteps.
        let want_sigmas = [1.0, 0.9375, 0.8333333134651184, 0.625];
        let want_timesteps = [1000.0, 937.5, 833.3333129882812, 625.0];
        let got = step_distill_sigmas(&[1000.0, 750.0, 500.0, 250.0], 5.0, 1000);
        for ((g, s), t) in got.iter().zip(want_sigmas).zip(want_timesteps) {
            assert_eq!(*g, s);
            assert_eq!((*g as f32 * 1000.0) as f64, t);
        }
        // Entries from both halves of torch's linspace, from the same code.
        let got = step_distill_sigmas(&[999.0, 875.0, 333.0, 1.0], 5.0, 1000);
        let want = [
            0.9997997879981995,
            0.9722222089767456,
            0.7139794230461121,
            0.004980080295354128,
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn bad_lists_are_refused_by_name() {
        let e = StepList::Timesteps(vec![500.0, 750.0]).sigmas(5.0, 1000).unwrap_err();
        assert!(
            e.to_string().contains("timesteps") && e.to_string().contains("decreasing"),
            "{e}"
        );
        let e = StepList::Timesteps(vec![1001.0]).sigmas(5.0, 1000).unwrap_err();
        assert!(e.to_string().contains("1001"), "{e}");
        let e = StepList::Sigmas(vec![1.5]).sigmas(5.0, 1000).unwrap_err();
        assert!(e.to_string().contains("sigmas") && e.to_string().contains("1.5"), "{e}");
        assert!(StepList::Sigmas(vec![]).sigmas(5.0, 1000).is_err());
    }
}
