//! The dtype a model's weights are held in once loaded.
//!
//! Real Wan checkpoints ship in bf16, and holding them as f32 doubles the memory a model needs.
//! A load names a [`Precision`] and the module paths that stay f32 whatever it is (the parts
//! diffusers and Wan keep in f32: embedders, modulation tables, norms); every float matrix and
//! kernel is converted to the precision tensor by tensor as it is read, so a bf16 file never
//! passes through a whole f32 copy. Vectors (biases, norm gains) stay f32: they are a
//! rounding error in size and are added to f32 activations.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use std::fmt;
use std::str::FromStr;

/// The dtype of a model's weight matrices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// 32-bit floats (the exact reference).
    #[default]
    F32,
    /// bfloat16, as Wan's releases ship.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl Precision {
    /// Every precision, in the order the CLI lists them.
    pub const ALL: [Self; 3] = [Self::F32, Self::Bf16, Self::F16];

    /// burn's dtype for it.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    /// The name used on the command line and in sidecars (`f32`, `bf16`, `f16`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }

    /// Bytes per weight element.
    pub fn bytes(self) -> usize {
        self.dtype().size()
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A precision name that is not one of `f32`, `bf16`, `f16`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype {0:?}: expected f32, bf16 or f16")]
pub struct UnknownPrecision(pub String);

impl FromStr for Precision {
    type Err = UnknownPrecision;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownPrecision(s.to_string()))
    }
}

/// Which dtype each tensor of one load is held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cast {
    /// The dtype of the weight matrices and kernels.
    pub precision: Precision,
    /// Module-path segments whose tensors stay f32: a path stays f32 when any of its
    /// dot-separated segments equals one of these (`scale_shift_table`, `condition_embedder`).
    /// Each model crate has its list as a constant (`KEEP_F32`).
    pub keep_f32: &'static [&'static str],
}

impl Cast {
    /// Everything in f32: the exact path.
    pub const F32: Self = Self {
        precision: Precision::F32,
        keep_f32: &[],
    };

    /// The dtype the tensor at module path `path` with `rank` axes is held in.
    pub fn dtype_of(&self, path: &str, rank: usize) -> DType {
        let kept = rank < 2 || path.split('.').any(|seg| self.keep_f32.contains(&seg));
        match kept {
            true => DType::F32,
            false => self.precision.dtype(),
        }
    }
}

/// `module` with each float tensor in the dtype `cast` gives its path: for a model built in
/// memory (the embedded one) rather than loaded.
pub fn cast_module<B: Backend, M: Module<B>>(module: M, cast: Cast) -> M {
    struct Mapper {
        cast: Cast,
        path: Vec<String>,
    }
    impl<B: Backend> ModuleMapper<B> for Mapper {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            // The parameter's own name is the last path segment the module entered.
            let dtype = self.cast.dtype_of(&self.path.join("."), D);
            param.map(|t| if t.dtype() == dtype { t } else { t.cast(dtype) })
        }
    }
    module.map(&mut Mapper { cast, path: Vec::new() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_are_refused() {
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>(), Ok(p));
            assert_eq!(p.name().to_uppercase().parse::<Precision>(), Ok(p));
        }
        let e = "fp8".parse::<Precision>().unwrap_err().to_string();
        assert!(e.contains("fp8") && e.contains("bf16"), "{e}");
    }

    #[test]
    fn matrices_take_the_precision_and_the_kept_parts_stay_f32() {
        let cast = Cast {
            precision: Precision::Bf16,
            keep_f32: &["scale_shift_table", "condition_embedder"],
        };
        assert_eq!(cast.dtype_of("blocks.0.attn1.to_q.weight", 2), DType::BF16);
        assert_eq!(cast.dtype_of("blocks.0.attn1.to_q.bias", 1), DType::F32);
        assert_eq!(cast.dtype_of("blocks.3.scale_shift_table", 3), DType::F32);
        assert_eq!(cast.dtype_of("condition_embedder.time_proj.weight", 2), DType::F32);
        // A segment must match whole, not as a substring.
        assert_eq!(cast.dtype_of("blocks.0.scale_shift_table_x.weight", 2), DType::BF16);
        assert_eq!(Cast::F32.dtype_of("blocks.0.ffn.fc1.weight", 2), DType::F32);
    }
}
