//! The dtype a model's weights are held in once loaded.
//!
//! Real Wan checkpoints ship in bf16, and holding them as f32 doubles the memory a model needs.
//! A load names a [`Precision`] and the module paths that stay f32 whatever it is (the parts
//! diffusers and Wan keep in f32: embedders, modulation tables, norms); every float matrix and
//! kernel is converted to the precision tensor by tensor as it is read, so a bf16 file never
//! passes through a whole f32 copy. Vectors (biases, norm gains) stay f32: they are a
//! rounding error in size and are added to f32 activations.

use crate::quant::{block_for, int8_bytes, quantize_int8, Weights};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use std::fmt;
use std::str::FromStr;

/// burn's container name for a `Linear` module.
pub(crate) const LINEAR: &str = "Struct:Linear";

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

/// How a model's weights are held: the float precision and the linear layers' format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Format {
    /// The dtype of the float matrices and kernels.
    pub precision: Precision,
    /// How the linear layers' matrices are held.
    pub weights: Weights,
}

impl Format {
    /// Everything in f32.
    pub const F32: Self = Self {
        precision: Precision::F32,
        weights: Weights::Float,
    };

    /// `precision` with the linear layers in `weights`.
    pub fn new(precision: Precision, weights: Weights) -> Self {
        Self { precision, weights }
    }

    /// The name used in logs and sidecars: `bf16`, or `int8+bf16` for 8-bit linear layers.
    pub fn name(&self) -> String {
        match self.weights {
            Weights::Float => self.precision.name().to_string(),
            Weights::Int8 => format!("int8+{}", self.precision),
        }
    }
}

impl From<Precision> for Format {
    fn from(precision: Precision) -> Self {
        Self {
            precision,
            weights: Weights::Float,
        }
    }
}

/// Which dtype each tensor of one load is held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cast {
    /// The dtype of the weight matrices and kernels.
    pub precision: Precision,
    /// How the linear layers' matrices are held ([`Weights::Int8`] quantizes each `Linear`'s
    /// weight that is not kept f32, at load).
    pub weights: Weights,
    /// Module-path segments whose tensors stay f32: a path stays f32 when any of its
    /// dot-separated segments equals one of these (`scale_shift_table`, `condition_embedder`).
    /// Each model crate has its list as a constant (`KEEP_F32`).
    pub keep_f32: &'static [&'static str],
}

impl Cast {
    /// Everything in f32: the exact path.
    pub const F32: Self = Self {
        precision: Precision::F32,
        weights: Weights::Float,
        keep_f32: &[],
    };

    /// `format` with the module paths in `keep_f32` kept f32.
    pub fn new(format: impl Into<Format>, keep_f32: &'static [&'static str]) -> Self {
        let format = format.into();
        Self {
            precision: format.precision,
            weights: format.weights,
            keep_f32,
        }
    }

    fn kept(&self, path: &str) -> bool {
        path.split('.').any(|seg| self.keep_f32.contains(&seg))
    }

    /// The int8 block a `Linear`'s weight at `path` of `shape` is quantized with; `None` when it
    /// is held as a float.
    pub fn int8_block(&self, path: &str, shape: &[usize]) -> Option<usize> {
        let quantized = self.weights == Weights::Int8 && shape.len() == 2 && !self.kept(path);
        quantized.then(|| block_for(shape[1])).flatten()
    }

    /// Bytes the tensor at `path` of `shape` takes once loaded; `linear` says that it is a
    /// `Linear`'s weight (which int8 quantizes). For a memory plan made from file headers.
    pub fn held_bytes(&self, path: &str, shape: &[usize], linear: bool) -> u64 {
        let elements = shape.iter().product::<usize>() as u64;
        match self.int8_block(path, shape).filter(|_| linear) {
            Some(block) => int8_bytes(elements, block),
            None => elements * self.dtype_of(path, shape.len()).size() as u64,
        }
    }
    /// The dtype the tensor at module path `path` with `rank` axes is held in.
    pub fn dtype_of(&self, path: &str, rank: usize) -> DType {
        let kept = rank < 2 || self.kept(path);
        match kept {
            true => DType::F32,
            false => self.precision.dtype(),
        }
    }
}

/// Bytes `module`'s float tensors take once loaded under `cast`, from their shapes alone: for a
/// module built from its config, which holds no weights until they are loaded (burn's parameters
/// are lazy), this is a memory plan's figure for the model, made without reading a weight.
pub fn held_bytes<B: Backend, M: Module<B>>(module: &M, cast: Cast) -> u64 {
    struct Sum {
        cast: Cast,
        at: Position,
        bytes: u64,
    }
    impl<B: Backend> ModuleVisitor<B> for Sum {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.at.enter(name, container);
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.at.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let shape = param.lazy_shape();
            self.bytes += self
                .cast
                .held_bytes(&self.at.path(), &shape, self.at.is_linear_weight());
        }
    }
    let mut sum = Sum {
        cast,
        at: Position::default(),
        bytes: 0,
    };
    module.visit(&mut sum);
    sum.bytes
}

/// Where a module walk is: the path of names it entered, and the type of each module.
#[derive(Default)]
pub(crate) struct Position {
    path: Vec<String>,
    containers: Vec<String>,
}

impl Position {
    pub(crate) fn enter(&mut self, name: &str, container: &str) {
        self.path.push(name.to_string());
        self.containers.push(container.to_string());
    }

    pub(crate) fn exit(&mut self) {
        self.path.pop();
        self.containers.pop();
    }

    /// The parameter's path: its own name is the last segment entered.
    pub(crate) fn path(&self) -> String {
        self.path.join(".")
    }

    /// Whether the parameter is a `Linear`'s weight (the type entered with its name is the
    /// module that owns it).
    pub(crate) fn is_linear_weight(&self) -> bool {
        self.containers.last().map(String::as_str) == Some(LINEAR)
            && self.path.last().map(String::as_str) == Some("weight")
    }
}

/// `module` with each float tensor in the dtype `cast` gives its path: for a model built in
/// memory (the embedded one) rather than loaded.
pub fn cast_module<B: Backend, M: Module<B>>(module: M, cast: Cast) -> M {
    struct Mapper {
        cast: Cast,
        at: Position,
    }
    impl<B: Backend> ModuleMapper<B> for Mapper {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.at.enter(name, container);
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.at.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (path, linear) = (self.at.path(), self.at.is_linear_weight());
            let dtype = self.cast.dtype_of(&path, D);
            param.map(|t| {
                let block = self.cast.int8_block(&path, &t.dims()).filter(|_| linear);
                match block.and_then(|b| quantize_int8(&t.to_data(), b)) {
                    Some(q) => Tensor::from_data(q, &t.device()),
                    None if t.dtype() == dtype => t,
                    None => t.cast(dtype),
                }
            })
        }
    }
    module.map(&mut Mapper {
        cast,
        at: Position::default(),
    })
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
        let cast = Cast::new(Precision::Bf16, &["scale_shift_table", "condition_embedder"]);
        assert_eq!(cast.dtype_of("blocks.0.attn1.to_q.weight", 2), DType::BF16);
        assert_eq!(cast.dtype_of("blocks.0.attn1.to_q.bias", 1), DType::F32);
        assert_eq!(cast.dtype_of("blocks.3.scale_shift_table", 3), DType::F32);
        assert_eq!(cast.dtype_of("condition_embedder.time_proj.weight", 2), DType::F32);
        // A segment must match whole, not as a substring.
        assert_eq!(cast.dtype_of("blocks.0.scale_shift_table_x.weight", 2), DType::BF16);
        assert_eq!(Cast::F32.dtype_of("blocks.0.ffn.fc1.weight", 2), DType::F32);
    }

    #[test]
    fn int8_takes_the_linear_matrices_that_are_not_kept() {
        let cast = Cast::new(Format::new(Precision::Bf16, Weights::Int8), &["condition_embedder"]);
        assert_eq!(cast.int8_block("blocks.0.attn1.to_q.weight", &[1536, 1536]), Some(64));
        assert_eq!(
            cast.int8_block("condition_embedder.time_proj.weight", &[256, 1536]),
            None
        );
        assert_eq!(cast.int8_block("blocks.0.attn1.to_q.bias", &[1536]), None);
        assert_eq!(Cast::new(Precision::Bf16, &[]).int8_block("a.weight", &[64, 64]), None);
        // 1536 x 1536 in int8 with a scale per 64 (resident twice), against two bytes in bf16.
        assert_eq!(
            cast.held_bytes("blocks.0.attn1.to_q.weight", &[1536, 1536], true),
            1536 * 1536 * 9 / 8
        );
        assert_eq!(
            cast.held_bytes("blocks.0.attn1.to_q.weight", &[1536, 1536], false),
            1536 * 1536 * 2
        );
        assert_eq!(cast.held_bytes("blocks.0.attn1.to_q.bias", &[1536], false), 1536 * 4);
        assert_eq!(Format::new(Precision::Bf16, Weights::Int8).name(), "int8+bf16");
    }
}
