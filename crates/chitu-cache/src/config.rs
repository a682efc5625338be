//! What a request asks of the cache: the policy and its knobs, with Chitu's and diffusers' defaults.

use crate::CacheError;
use chitu_dit::WanDitConfig;
use serde::{Deserialize, Serialize};

/// A feature-cache policy and its settings, chosen per request.
///
/// Deserialises from `{"policy": "teacache" | "pab" | "first_block_cache" | "taylorseer", ...}` with
/// the policy's fields; missing fields take the defaults below, unknown ones are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "policy")]
pub enum CacheConfig {
    #[serde(rename = "teacache")]
    /// TeaCache: skips whole forwards while the timestep modulation changes little.
    TeaCache(TeaCacheConfig),
    #[serde(rename = "pab")]
    /// Pyramid Attention Broadcast: reuses attention outputs on fixed step ranges.
    Pab(PabConfig),
    #[serde(rename = "first_block_cache")]
    /// First Block Cache: skips the blocks after the first while its residual changes little.
    FirstBlockCache(FirstBlockCacheConfig),
    #[serde(rename = "taylorseer")]
    /// TaylorSeer: forecasts attention and FFN outputs between full computes.
    TaylorSeer(TaylorSeerConfig),
}

/// Which timestep signal TeaCache measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeaCacheMode {
    /// The block modulation input `e0` (TeaCache4Wan2.1's `use_ret_steps`; Chitu's default).
    #[default]
    RetSteps,
    /// The time embedding `temb`.
    Default,
}

/// TeaCache: skip every block while the rescaled change of the timestep signal stays small.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TeaCacheConfig {
    /// Reuse while the accumulated rescaled distance is below this; 0 never reuses.
    pub threshold: f64,
    /// Which modulation input the change is measured on.
    pub mode: TeaCacheMode,
    /// Rescaling polynomial, highest power first; chosen from the model size when unset.
    pub coefficients: Option<Vec<f64>>,
    /// Steps at the start that always compute.
    pub warmup: usize,
    /// Steps at the end that always compute.
    pub cooldown: usize,
}

impl Default for TeaCacheConfig {
    /// Chitu's `TeaCacheParams`: threshold 0.2, ret-steps, warmup 1, cooldown 1.
    fn default() -> Self {
        Self {
            threshold: 0.2,
            mode: TeaCacheMode::RetSteps,
            coefficients: None,
            warmup: 1,
            cooldown: 1,
        }
    }
}

/// Pyramid Attention Broadcast: recompute attention outputs only every few steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PabConfig {
    /// Steps at the start that always compute.
    pub warmup: usize,
    /// Steps at the end that always compute.
    pub cooldown: usize,
    /// Self-attention is computed every this many steps; 1 always computes.
    pub skip_self_range: usize,
    /// Cross-attention is computed every this many steps; 1 always computes.
    pub skip_cross_range: usize,
}

impl Default for PabConfig {
    /// Chitu's `PABParams`: warmup 5, cooldown 5, self every 2 steps, cross every 3.
    fn default() -> Self {
        Self {
            warmup: 5,
            cooldown: 5,
            skip_self_range: 2,
            skip_cross_range: 3,
        }
    }
}

/// First Block Cache: run block 0, and skip the rest while its residual barely changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FirstBlockCacheConfig {
    /// Skip when the relative mean-absolute change of block 0's residual is at most this; 0
    /// never skips.
    pub threshold: f64,
    /// Steps at the start that always compute.
    pub warmup: usize,
    /// Steps at the end that always compute.
    pub cooldown: usize,
}

impl Default for FirstBlockCacheConfig {
    /// diffusers' `FirstBlockCacheConfig`: threshold 0.05, no warmup or cooldown.
    fn default() -> Self {
        Self {
            threshold: 0.05,
            warmup: 0,
            cooldown: 0,
        }
    }
}

/// TaylorSeer: between full computes, forecast each sub-layer output with a Taylor series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaylorSeerConfig {
    /// Full computes happen every this many steps after the warmup; 1 always computes.
    pub cache_interval: usize,
    /// Highest order of the expansion (finite differences of this order are kept).
    pub max_order: usize,
    /// diffusers' `disable_cache_before_step`.
    pub warmup: usize,
    /// Steps at the end that always compute (diffusers' `disable_cache_after_step = N - cooldown`).
    pub cooldown: usize,
}

impl Default for TaylorSeerConfig {
    /// diffusers' `TaylorSeerCacheConfig`: interval 5, first order, caching from step 3.
    fn default() -> Self {
        Self {
            cache_interval: 5,
            max_order: 1,
            warmup: 3,
            cooldown: 0,
        }
    }
}

/// TeaCache4Wan2.1's rescaling polynomials, highest power first.
mod coefficients {
    pub const RET_1_3B: [f64; 5] = [-5.21862437e4, 9.23041404e3, -5.28275948e2, 1.36987616e1, -4.99875664e-2];
    pub const RET_14B: [f64; 5] = [-3.03318725e5, 4.90537029e4, -2.65530556e3, 5.87365115e1, -3.15583525e-1];
    pub const DEFAULT_1_3B: [f64; 5] = [2.39676752e3, -1.31110545e3, 2.01331979e2, -8.29855975, 1.37887774e-1];
    pub const DEFAULT_14B: [f64; 5] = [
        -5784.54975374,
        5449.50911966,
        -1811.16591783,
        256.27178429,
        -13.02252404,
    ];
}

impl TeaCacheConfig {
    /// The rescaling polynomial for `model`: the override, else the fitted set for Wan's 1.3B
    /// (width 1536) or 14B (width 5120) models, else the identity (the raw distance), since no
    /// fit exists for other sizes.
    pub fn coefficients_for(&self, model: &WanDitConfig) -> Vec<f64> {
        if let Some(c) = &self.coefficients {
            return c.clone();
        }
        use coefficients::*;
        match (self.mode, model.dim()) {
            (TeaCacheMode::RetSteps, 1536) => RET_1_3B.to_vec(),
            (TeaCacheMode::RetSteps, 5120) => RET_14B.to_vec(),
            (TeaCacheMode::Default, 1536) => DEFAULT_1_3B.to_vec(),
            (TeaCacheMode::Default, 5120) => DEFAULT_14B.to_vec(),
            _ => vec![1.0, 0.0],
        }
    }
}

/// Evaluates a polynomial given highest power first (numpy's `poly1d`).
pub fn polyval(coefficients: &[f64], x: f64) -> f64 {
    coefficients.iter().fold(0.0, |acc, c| acc * x + c)
}

impl CacheConfig {
    /// The policy's defaults by name: `teacache`, `pab`, `first_block_cache` (or `fbc`),
    /// `taylorseer`.
    pub fn from_name(name: &str) -> Result<Self, CacheError> {
        Ok(match name.to_ascii_lowercase().replace('-', "_").as_str() {
            "teacache" => Self::TeaCache(Default::default()),
            "pab" => Self::Pab(Default::default()),
            "first_block_cache" | "fbc" => Self::FirstBlockCache(Default::default()),
            "taylorseer" => Self::TaylorSeer(Default::default()),
            other => {
                return Err(CacheError::Config(format!(
                    "unknown cache policy {other:?}; expected teacache, pab, first_block_cache or taylorseer"
                )))
            }
        })
    }

    /// Parses either a policy name or a JSON object such as `{"policy": "pab", "skip_self_range": 3}`.
    pub fn parse(spec: &str) -> Result<Self, CacheError> {
        let spec = spec.trim();
        let config = if spec.starts_with('{') {
            serde_json::from_str(spec).map_err(|e| CacheError::Config(format!("cache spec {spec}: {e}")))?
        } else {
            Self::from_name(spec)?
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads the `cache` object of a parity case or request file.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, CacheError> {
        let config: Self =
            serde_json::from_value(value.clone()).map_err(|e| CacheError::Config(format!("cache config: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// The policy's name as [`CacheConfig::from_name`] accepts it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::TeaCache(_) => "teacache",
            Self::Pab(_) => "pab",
            Self::FirstBlockCache(_) => "first_block_cache",
            Self::TaylorSeer(_) => "taylorseer",
        }
    }

    /// Sets the policy's threshold (TeaCache, First Block Cache); refuses it for the others.
    pub fn with_threshold(mut self, threshold: f64) -> Result<Self, CacheError> {
        match &mut self {
            Self::TeaCache(c) => c.threshold = threshold,
            Self::FirstBlockCache(c) => c.threshold = threshold,
            other => {
                return Err(CacheError::Config(format!(
                    "{} has no threshold (it runs on a fixed schedule)",
                    other.name()
                )))
            }
        }
        self.validate()?;
        Ok(self)
    }

    /// Steps at the start and the end that always compute.
    pub fn window(&self) -> Window {
        let (warmup, cooldown) = match self {
            Self::TeaCache(c) => (c.warmup, c.cooldown),
            Self::Pab(c) => (c.warmup, c.cooldown),
            Self::FirstBlockCache(c) => (c.warmup, c.cooldown),
            Self::TaylorSeer(c) => (c.warmup, c.cooldown),
        };
        Window::new(warmup, cooldown)
    }

    /// Sets warmup and cooldown.
    pub fn with_window(mut self, warmup: usize, cooldown: usize) -> Self {
        let w = match &mut self {
            Self::TeaCache(c) => (&mut c.warmup, &mut c.cooldown),
            Self::Pab(c) => (&mut c.warmup, &mut c.cooldown),
            Self::FirstBlockCache(c) => (&mut c.warmup, &mut c.cooldown),
            Self::TaylorSeer(c) => (&mut c.warmup, &mut c.cooldown),
        };
        (*w.0, *w.1) = (warmup, cooldown);
        self
    }

    /// Checks every field; the error names the bad one.
    pub fn validate(&self) -> Result<(), CacheError> {
        let bad = |m: String| Err(CacheError::Config(m));
        let threshold = |t: f64| {
            if t.is_finite() && t >= 0.0 {
                Ok(())
            } else {
                bad(format!(
                    "{}: threshold {t} must be finite and not negative",
                    self.name()
                ))
            }
        };
        let at_least_1 = |field: &str, v: usize| {
            if v >= 1 {
                Ok(())
            } else {
                bad(format!(
                    "{}: {field} must be at least 1 (1 computes every step)",
                    self.name()
                ))
            }
        };
        match self {
            Self::TeaCache(c) => {
                threshold(c.threshold)?;
                if let Some(co) = &c.coefficients {
                    if co.is_empty() || co.iter().any(|v| !v.is_finite()) {
                        return bad(format!("teacache: coefficients {co:?} must be finite and non-empty"));
                    }
                }
            }
            Self::Pab(c) => {
                at_least_1("skip_self_range", c.skip_self_range)?;
                at_least_1("skip_cross_range", c.skip_cross_range)?;
            }
            Self::FirstBlockCache(c) => threshold(c.threshold)?,
            Self::TaylorSeer(c) => {
                at_least_1("cache_interval", c.cache_interval)?;
                if c.max_order > 4 {
                    return bad(format!("taylorseer: max_order {} is above 4", c.max_order));
                }
            }
        }
        Ok(())
    }
}

impl CacheConfig {
    /// Every policy at settings that never reuse anything: a run with any of them must equal
    /// the uncached run exactly (what the tests check the policies' plumbing with).
    pub fn neutral() -> Vec<CacheConfig> {
        vec![
            CacheConfig::TeaCache(TeaCacheConfig {
                threshold: 0.0,
                warmup: 0,
                cooldown: 0,
                ..Default::default()
            }),
            CacheConfig::FirstBlockCache(FirstBlockCacheConfig {
                threshold: 0.0,
                ..Default::default()
            }),
            CacheConfig::Pab(PabConfig {
                warmup: 0,
                cooldown: 0,
                skip_self_range: 1,
                skip_cross_range: 1,
            }),
            CacheConfig::TaylorSeer(TaylorSeerConfig {
                cache_interval: 1,
                warmup: 0,
                ..Default::default()
            }),
        ]
    }
}

/// Steps at the start (`warmup`) and end (`cooldown`) of a run that every policy computes in full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Window {
    /// Steps at the start that always compute.
    pub warmup: usize,
    /// Steps at the end that always compute.
    pub cooldown: usize,
}

impl Window {
    /// `warmup` leading and `cooldown` trailing steps.
    pub const fn new(warmup: usize, cooldown: usize) -> Self {
        Self { warmup, cooldown }
    }

    /// Whether `step` of `num_steps` must compute.
    pub fn forces(&self, step: usize, num_steps: usize) -> bool {
        step < self.warmup || step >= num_steps.saturating_sub(self.cooldown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_json_and_defaults() {
        assert_eq!(
            CacheConfig::parse("teacache").unwrap(),
            CacheConfig::TeaCache(TeaCacheConfig::default())
        );
        assert_eq!(
            CacheConfig::parse("FBC").unwrap(),
            CacheConfig::FirstBlockCache(Default::default())
        );
        let pab = CacheConfig::parse(r#"{"policy": "pab", "skip_self_range": 4}"#).unwrap();
        assert_eq!(
            pab,
            CacheConfig::Pab(PabConfig {
                skip_self_range: 4,
                ..Default::default()
            })
        );
        let case = serde_json::json!({"policy": "first_block_cache", "threshold": 0.2});
        assert_eq!(
            CacheConfig::from_json(&case).unwrap(),
            CacheConfig::FirstBlockCache(FirstBlockCacheConfig {
                threshold: 0.2,
                ..Default::default()
            })
        );
        let round = serde_json::to_value(&pab).unwrap();
        assert_eq!(CacheConfig::from_json(&round).unwrap(), pab);
    }

    #[test]
    fn bad_settings_name_the_problem() {
        let err = |spec: &str| CacheConfig::parse(spec).unwrap_err().to_string();
        assert!(err("fastcache").contains("unknown cache policy"));
        assert!(err(r#"{"policy": "pab", "skip_self_range": 0}"#).contains("skip_self_range"));
        assert!(err(r#"{"policy": "pab", "skip_selfrange": 2}"#).contains("skip_selfrange"));
        assert!(err(r#"{"policy": "teacache", "threshold": -1}"#).contains("threshold"));
        assert!(err(r#"{"policy": "taylorseer", "cache_interval": 0}"#).contains("cache_interval"));
        assert!(err(r#"{"policy": "taylorseer", "max_order": 9}"#).contains("max_order"));
        assert!(err(r#"{"policy": "teacache", "coefficients": []}"#).contains("coefficients"));
        assert!(err(r#"{"threshold": 0.1}"#).contains("policy"));
        let pab = CacheConfig::from_name("pab").unwrap();
        assert!(pab
            .with_threshold(0.1)
            .unwrap_err()
            .to_string()
            .contains("no threshold"));
        assert!(CacheConfig::from_name("teacache")
            .unwrap()
            .with_threshold(f64::NAN)
            .is_err());
    }

    #[test]
    fn polynomials_are_highest_power_first() {
        assert_eq!(polyval(&[2.0, 0.0, 1.0], 3.0), 19.0);
        assert_eq!(polyval(&[1.0, 0.0], 0.25), 0.25);
    }

    #[test]
    fn windows_force_the_ends() {
        let w = Window { warmup: 2, cooldown: 1 };
        let forced: Vec<usize> = (0..6).filter(|&s| w.forces(s, 6)).collect();
        assert_eq!(forced, vec![0, 1, 5]);
        assert_eq!(CacheConfig::from_name("pab").unwrap().with_window(2, 1).window(), w);
    }
}
