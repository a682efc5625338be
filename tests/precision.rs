//! `--dtype`: which tensors each precision narrows, and what stays f32.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{DType, Tensor};
use chitu::dit::WanTransformer;
use chitu::pipeline::{DiffusionBackend, Generator, LoadOptions, Precision};
use chitu::text::TextEncoder;
use chitu::vae::WanVae;
use chitu::{default_device, DefaultBackend as B};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity/models")
        .join(name)
}

/// Every float tensor's dtype, by module path.
fn dtypes<M: Module<B>>(module: &M) -> BTreeMap<String, DType> {
    struct Collect {
        path: Vec<String>,
        seen: BTreeMap<String, DType>,
    }
    impl ModuleVisitor<B> for Collect {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.seen.insert(self.path.join("."), param.val().dtype());
        }
    }
    let mut c = Collect {
        path: Vec::new(),
        seen: BTreeMap::new(),
    };
    module.visit(&mut c);
    c.seen
}

#[test]
fn bf16_narrows_the_matrices_and_keeps_what_diffusers_keeps_in_f32() {
    let dev = default_device();
    let dit = WanTransformer::<B>::from_dir_as(model("wan21/transformer"), &dev, Precision::Bf16).unwrap();
    let d = dtypes(&dit);
    assert_eq!(d["blocks.0.attn1.to_q.weight"], DType::BF16);
    assert_eq!(d["blocks.1.ffn.fc2.weight"], DType::BF16);
    assert_eq!(d["proj_out.weight"], DType::BF16);
    assert_eq!(d["patch_embedding.weight"], DType::BF16);
    assert_eq!(d["blocks.0.attn1.to_q.bias"], DType::F32);
    assert_eq!(d["blocks.0.attn1.norm_q.gamma"], DType::F32);
    assert_eq!(d["blocks.0.scale_shift_table"], DType::F32);
    assert_eq!(d["scale_shift_table"], DType::F32);
    assert_eq!(d["condition_embedder.time_proj.weight"], DType::F32);
    assert_eq!(d["condition_embedder.text_embedder.linear_1.weight"], DType::F32);

    let text = TextEncoder::<B>::from_pipeline_dir_as(model("wan21"), &dev, Precision::F16).unwrap();
    let t = dtypes(&text.encoder);
    assert!(
        t.iter().any(|(k, v)| k.ends_with("attn.q.weight") && *v == DType::F16),
        "{t:?}"
    );
    assert!(t
        .iter()
        .filter(|(k, _)| k.contains("pos_embedding"))
        .all(|(_, v)| *v == DType::F32));
    assert!(t
        .iter()
        .filter(|(k, _)| k.contains("norm"))
        .all(|(_, v)| *v == DType::F32));

    let vae = WanVae::<B>::from_dir_as(model("wan21/vae"), &dev, Precision::Bf16).unwrap();
    let v = dtypes(&vae);
    assert_eq!(v["decoder.conv_out.weight"], DType::BF16);
    assert!(v
        .iter()
        .filter(|(k, _)| k.ends_with("gamma"))
        .all(|(_, v)| *v == DType::F32));
    assert!(v
        .iter()
        .filter(|(k, _)| k.ends_with("bias"))
        .all(|(_, v)| *v == DType::F32));
}

#[test]
fn f32_loads_hold_every_tensor_in_f32() {
    let dev = default_device();
    let backend = DiffusionBackend::<B>::load(model("wan21"), &dev, LoadOptions::default()).unwrap();
    let all: Vec<DType> = backend
        .dit(0)
        .unwrap()
        .with(|m| dtypes(m).into_values().collect())
        .unwrap();
    assert!(all.iter().all(|d| *d == DType::F32));
}

/// A released model comes back from its files with the same weights: a one-request run and a
/// run that keeps everything give the same video, bit for bit.
#[test]
fn releasing_models_after_use_changes_no_bit() {
    let dev = default_device();
    let run = |release_after_use| {
        let options = LoadOptions {
            dtype: Precision::Bf16,
            release_after_use,
            ..LoadOptions::default()
        };
        let generator = Generator::<B>::from_dir(model("wan21"), &dev, options).unwrap();
        let mut params = chitu::pipeline::DiffusionUserParams::tiny("a red fox");
        (
            params.num_inference_steps,
            params.height,
            params.width,
            params.num_frames,
        ) = (3, 32, 32, 5);
        let first = generator.generate(params.clone()).unwrap();
        let released = generator.backend.text.is_released() && generator.backend.dit(0).unwrap().is_released();
        assert_eq!(released, release_after_use);
        // A second request reloads what the first released.
        let second = generator.generate(params).unwrap();
        assert_eq!(first.frames().frames, second.frames().frames);
        first
    };
    let kept = run(false);
    let released = run(true);
    assert_eq!(kept.frames().frames, released.frames().frames);
}

/// `--weights int8`: every linear layer's matrix that diffusers does not keep in f32 becomes int8
/// blocks; conv kernels, embeddings and the kept parts stay as they were.
#[test]
fn int8_quantizes_the_linear_layers_and_nothing_else() {
    use chitu::pipeline::{Format, Weights};
    let dev = default_device();
    let int8 = Format::new(Precision::Bf16, Weights::Int8);
    let is_int8 = |d: &DType| matches!(d, DType::QFloat(_));
    let dit = WanTransformer::<B>::from_dir_as(model("wan21/transformer"), &dev, int8).unwrap();
    let d = dtypes(&dit);
    assert!(is_int8(&d["blocks.0.attn1.to_q.weight"]), "{d:?}");
    assert!(is_int8(&d["blocks.1.attn2.to_k.weight"]));
    assert!(is_int8(&d["blocks.1.ffn.fc2.weight"]));
    assert!(is_int8(&d["proj_out.weight"]));
    assert_eq!(d["patch_embedding.weight"], DType::BF16);
    assert_eq!(d["blocks.0.attn1.to_q.bias"], DType::F32);
    assert_eq!(d["blocks.0.scale_shift_table"], DType::F32);
    assert_eq!(d["condition_embedder.text_embedder.linear_1.weight"], DType::F32);

    let text = TextEncoder::<B>::from_pipeline_dir_as(model("wan21"), &dev, int8).unwrap();
    let t = dtypes(&text.encoder);
    assert!(
        t.iter().any(|(k, v)| k.ends_with("attn.q.weight") && is_int8(v)),
        "{t:?}"
    );
    assert!(t.iter().any(|(k, v)| k.ends_with("wi_0.weight") && is_int8(v)), "{t:?}");
    assert!(t
        .iter()
        .filter(|(k, _)| k.contains("pos_embedding") || k.contains("norm"))
        .all(|(_, v)| *v == DType::F32));
}

/// The memory plan sizes a folder from its configs alone; those sizes are what loading it holds,
/// byte for byte, at every format.
#[test]
fn plan_sizes_from_configs_are_the_loaded_sizes() {
    use chitu::pipeline::{Format, ModelSizes, Weights};
    let dev = default_device();
    for folder in ["wan21", "wan22"] {
        for format in [
            Format::F32,
            Format::from(Precision::Bf16),
            Format::new(Precision::Bf16, Weights::Int8),
            Format::new(Precision::F32, Weights::Int8),
        ] {
            let planned = ModelSizes::of_folder::<B>(&model(folder), format, Precision::F32, &dev).unwrap();
            let options = LoadOptions {
                dtype: format.precision,
                weights: format.weights,
                ..LoadOptions::default()
            };
            let loaded = DiffusionBackend::<B>::load(model(folder), &dev, options)
                .unwrap()
                .sizes();
            let what = format!("{folder} {}", format.name());
            assert_eq!(planned.dit_weights, loaded.dit_weights, "{what}");
            assert_eq!(planned.text_weights, loaded.text_weights, "{what}");
            assert_eq!(planned.vae_weights, loaded.vae_weights, "{what}");
            assert_eq!(planned.narrow, loaded.narrow, "{what}");
        }
    }
}
