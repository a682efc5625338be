//! Weight deltas merged into a loaded module (LoRA adapters), and undone exactly.
//!
//! A merge widens each touched tensor to f32, adds its deltas there and rounds the sum once to
//! the dtype the tensor was held in: the same float, or int8 blocks quantized as a load
//! quantizes them. Rounding is not invertible, so undoing a merge never subtracts: it puts back
//! the base tensors, which the merge either kept ([`BaseWeights`]) or a caller reads again from
//! the checkpoint ([`crate::reload_tensors_as`]).

use crate::precision::Position;
use crate::quant::quantize_int8;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::quantization::QuantLevel;
use burn::tensor::{backend::Backend, DType, Tensor, TensorData, TensorPrimitive};
use std::collections::{BTreeMap, HashMap};

/// One float parameter of a module, as a merge sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// Its shape in burn's layout (a `Linear` weight is `[in, out]`).
    pub shape: Vec<usize>,
    /// Whether it is a `Linear`'s weight, which a checkpoint stores transposed (`[out, in]`).
    pub linear: bool,
}

impl ParamInfo {
    /// The shape a PyTorch checkpoint stores the parameter in.
    pub fn stored_shape(&self) -> Vec<usize> {
        match self.linear {
            true => self.shape.iter().rev().copied().collect(),
            false => self.shape.clone(),
        }
    }
}

/// Every float parameter of `module` by path, from shapes alone: a module built from its config
/// (whose parameters are lazy) lists its table without allocating a weight.
pub fn param_table<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, ParamInfo> {
    struct Table {
        at: Position,
        out: BTreeMap<String, ParamInfo>,
    }
    impl<B: Backend> ModuleVisitor<B> for Table {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.at.enter(name, container);
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.at.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let info = ParamInfo {
                shape: param.lazy_shape().to_vec(),
                linear: self.at.is_linear_weight(),
            };
            self.out.insert(self.at.path(), info);
        }
    }
    let mut table = Table {
        at: Position::default(),
        out: BTreeMap::new(),
    };
    module.visit(&mut table);
    table.out
}

/// A change to one parameter, in the checkpoint's (PyTorch's) layout.
#[derive(Debug, Clone)]
pub enum Delta {
    /// `up @ down`: `up` is `[out, rank]`, `down` is `[rank, in]`; for a `Linear` weight.
    LowRank {
        /// The down projection, `[rank, in]`.
        down: TensorData,
        /// The up projection, `[out, rank]`.
        up: TensorData,
    },
    /// A tensor of the parameter's stored shape (a `Linear` weight's `[out, in]`, a bias).
    Full(TensorData),
}

impl Delta {
    /// Bytes the delta's tensors hold.
    pub fn bytes(&self) -> u64 {
        match self {
            Self::LowRank { down, up } => (down.bytes.len() + up.bytes.len()) as u64,
            Self::Full(d) => d.bytes.len() as u64,
        }
    }
}

/// A delta and the factor it is added with (a LoRA's strength times its `alpha / rank`).
#[derive(Debug, Clone)]
pub struct Term {
    /// The change.
    pub delta: Delta,
    /// Its factor.
    pub scale: f32,
}

/// The deltas of a merge, by parameter path, each list added in order.
pub type DeltaSet = BTreeMap<String, Vec<Term>>;

/// The base tensors a merge replaced, kept so that [`restore_base`] puts them back bit for bit.
/// They are the tensors the module held (not copies): keeping them costs their size until the
/// merge is undone.
pub struct BaseWeights<B: Backend> {
    /// Each tensor, with the bytes it holds.
    tensors: HashMap<String, (TensorPrimitive<B>, u64)>,
    bytes: u64,
}

impl<B: Backend> BaseWeights<B> {
    /// Bytes of the kept tensors.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// How many tensors are kept.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Adds the tensors of `later` that this set does not hold: what a second merge replaced
    /// for the first time. Where both hold a path, this one's is the base.
    pub fn absorb(&mut self, later: BaseWeights<B>) {
        for (path, (t, bytes)) in later.tensors {
            if let std::collections::hash_map::Entry::Vacant(slot) = self.tensors.entry(path) {
                self.bytes += bytes;
                slot.insert((t, bytes));
            }
        }
    }
}

fn block_of(level: QuantLevel) -> Option<usize> {
    match level {
        QuantLevel::Block(b) => Some(b.num_elements()),
        QuantLevel::Tensor => None,
    }
}

/// `module` with `deltas` added to their parameters, each widened to f32, summed and rounded
/// once to the dtype it was held in. With `keep_base` the replaced tensors come back too, for
/// [`restore_base`].
///
/// Every path and shape must have been checked against [`param_table`]; a delta whose shape does
/// not fit its parameter is a programming error and panics.
pub fn merge_deltas<B: Backend, M: Module<B>>(
    module: M,
    deltas: &DeltaSet,
    keep_base: bool,
) -> (M, Option<BaseWeights<B>>) {
    struct Merge<'a, B: Backend> {
        deltas: &'a DeltaSet,
        at: Position,
        base: Option<BaseWeights<B>>,
    }
    impl<B: Backend> ModuleMapper<B> for Merge<'_, B> {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.at.enter(name, container);
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.at.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let path = self.at.path();
            let Some(terms) = self.deltas.get(&path) else {
                return param;
            };
            let linear = self.at.is_linear_weight();
            let base = &mut self.base;
            param.map(|t| {
                if let Some(kept) = base.as_mut() {
                    let bytes = crate::tensor_bytes(t.dtype(), t.shape().num_elements() as u64);
                    kept.bytes += bytes;
                    kept.tensors.insert(path.clone(), (t.clone().into_primitive(), bytes));
                }
                merged(t, terms, linear)
            })
        }
    }
    let mut merge = Merge {
        deltas,
        at: Position::default(),
        base: keep_base.then(|| BaseWeights {
            tensors: HashMap::new(),
            bytes: 0,
        }),
    };
    let module = module.map(&mut merge);
    (module, merge.base)
}

/// `t + sum(scale * delta)`, computed in f32 and rounded once to `t`'s dtype.
fn merged<B: Backend, const D: usize>(t: Tensor<B, D>, terms: &[Term], linear: bool) -> Tensor<B, D> {
    let device = t.device();
    let dims = t.dims();
    let dtype = t.dtype();
    let mut wide = match dtype {
        DType::QFloat(_) => t.dequantize(),
        DType::F32 => t,
        _ => t.cast(DType::F32),
    };
    for term in terms {
        let delta: Tensor<B, D> = match &term.delta {
            Delta::LowRank { down, up } => {
                let f32 = |d: &TensorData| d.clone().convert_dtype(DType::F32);
                // The scale goes on the small factor, not on the full-size product.
                let down = Tensor::<B, 2>::from_data(f32(down), &device).mul_scalar(term.scale);
                let up = Tensor::<B, 2>::from_data(f32(up), &device);
                // burn holds a Linear weight as `[in, out]`: (up @ down)^T = down^T @ up^T.
                down.transpose().matmul(up.transpose()).reshape(dims)
            }
            Delta::Full(d) => {
                let d = Tensor::<B, D>::from_data(d.clone().convert_dtype(DType::F32), &device);
                let d = d.mul_scalar(term.scale);
                match linear && D == 2 {
                    true => d.transpose(),
                    false => d,
                }
            }
        };
        wide = wide + delta;
    }
    match dtype {
        DType::QFloat(scheme) => {
            let block = block_of(scheme.level).unwrap_or(dims[D - 1]);
            let q = quantize_int8(&wide.into_data(), block)
                .unwrap_or_else(|| unreachable!("the parameter was quantized with this block"));
            Tensor::from_data(q, &device)
        }
        DType::F32 => wide,
        d => wide.cast(d),
    }
}

/// `module` with the tensors `base` kept put back: the weights before the merge, bit for bit.
pub fn restore_base<B: Backend, M: Module<B>>(module: M, base: BaseWeights<B>) -> M {
    struct Restore<B: Backend> {
        tensors: HashMap<String, (TensorPrimitive<B>, u64)>,
        at: Position,
    }
    impl<B: Backend> ModuleMapper<B> for Restore<B> {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.at.enter(name, container);
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.at.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            match self.tensors.remove(&self.at.path()) {
                Some((t, _)) => param.map(|_| Tensor::from_primitive(t)),
                None => param,
            }
        }
    }
    module.map(&mut Restore {
        tensors: base.tensors,
        at: Position::default(),
    })
}

/// Every tensor of a safetensors file by name, read whole (fp8 ones decoded to f32): for small
/// files such as LoRA adapters, which are merged rather than loaded into a module.
pub fn read_tensors(path: &std::path::Path) -> Result<Vec<(String, TensorData)>, crate::LoadError> {
    let mut out = Vec::new();
    for s in crate::file::snapshots(path)? {
        let name = s.full_path();
        let data = s
            .to_data()
            .map_err(|e| crate::LoadError::malformed(path, format!("tensor {name}: {e}")))?;
        out.push((name, data));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn_flex::Flex;

    #[derive(Module, Debug)]
    struct Toy<B: Backend> {
        fc: Linear<B>,
    }

    fn toy() -> Toy<Flex> {
        Toy {
            fc: LinearConfig::new(64, 2).init(&Default::default()),
        }
    }

    fn values(t: &Tensor<Flex, 2>) -> Vec<f32> {
        let wide = match t.dtype() {
            DType::QFloat(_) => t.clone().dequantize(),
            _ => t.clone().cast(DType::F32),
        };
        wide.into_data().to_vec().unwrap()
    }

    #[test]
    fn a_low_rank_delta_lands_transposed_and_restores_bit_for_bit() {
        let m = toy();
        let before = m.fc.weight.val().into_data();
        let table = param_table(&m);
        assert_eq!(
            table["fc.weight"],
            ParamInfo {
                shape: vec![64, 2],
                linear: true
            }
        );
        assert_eq!(table["fc.weight"].stored_shape(), vec![2, 64]);
        // up [2, 1] @ down [1, 64]: row o, column i is up[o] * down[i].
        let down: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let up = vec![1.0f32, -2.0];
        let deltas = DeltaSet::from([(
            "fc.weight".to_string(),
            vec![Term {
                delta: Delta::LowRank {
                    down: TensorData::new(down.clone(), [1, 64]),
                    up: TensorData::new(up.clone(), [2, 1]),
                },
                scale: 0.5,
            }],
        )]);
        let (m, base) = merge_deltas(m, &deltas, true);
        let base = base.unwrap();
        assert_eq!((base.len(), base.bytes()), (1, 64 * 2 * 4));
        let got = values(&m.fc.weight.val());
        let old: Vec<f32> = before.to_vec().unwrap();
        for i in 0..64 {
            for o in 0..2 {
                let want = old[i * 2 + o] + 0.5 * up[o] * down[i];
                assert!((got[i * 2 + o] - want).abs() < 1e-5, "{i},{o}");
            }
        }
        let m = restore_base(m, base);
        assert_eq!(m.fc.weight.val().into_data().as_bytes(), before.as_bytes());
    }

    #[test]
    fn held_dtypes_are_kept_and_rounded_once() {
        for dtype in [DType::BF16, DType::QFloat(crate::int8_scheme(64))] {
            // 64 outputs: int8 blocks run along burn's rows (`[in, out]`).
            let m = Toy {
                fc: LinearConfig::new(2, 64).init(&Default::default()),
            };
            let m = Toy {
                fc: Linear {
                    weight: m.fc.weight.map(|w| match dtype {
                        DType::QFloat(_) => Tensor::from_data(quantize_int8(&w.to_data(), 64).unwrap(), &w.device()),
                        d => w.cast(d),
                    }),
                    bias: m.fc.bias,
                },
            };
            let before = m.fc.weight.val().into_data();
            let full = TensorData::new(vec![0.25f32; 128], [64, 2]);
            let deltas = DeltaSet::from([(
                "fc.weight".to_string(),
                vec![Term {
                    delta: Delta::Full(full),
                    scale: 1.0,
                }],
            )]);
            let (merged, base) = merge_deltas(m, &deltas, true);
            assert_eq!(merged.fc.weight.val().dtype(), dtype);
            let old = values(&Tensor::from_data(before.clone(), &Default::default()));
            let new = values(&merged.fc.weight.val());
            for (a, b) in old.iter().zip(&new) {
                assert!((b - a - 0.25).abs() < 2e-2, "{dtype:?}: {a} + 0.25 -> {b}");
            }
            let back = restore_base(merged, base.unwrap());
            assert_eq!(
                back.fc.weight.val().into_data().as_bytes(),
                before.as_bytes(),
                "{dtype:?}"
            );
        }
    }
}
