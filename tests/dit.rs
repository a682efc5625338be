//! The Wan DiT against the bundled diffusers fixture, through both checkpoint layouts and the
//! ways real checkpoints ship (shards, bf16, Wan's own key names).

use burn::tensor::Tensor;
use chitu::dit::{AttentionKind, CheckpointLayout, NoHook, WanTransformer};
use chitu::{default_device, DefaultBackend as B};
use chitu_parity::tensors::{rel_l2, HostTensor};
use chitu_parity::{dit, Case};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

fn case() -> Case {
    Case::load(&fixtures(), "dit_forward").unwrap()
}

fn reference(case: &Case) -> Vec<f32> {
    case.tensor("output").unwrap().as_f32("output").unwrap().to_vec()
}

/// The fixture's latents, text states and timesteps on the default device.
fn inputs(case: &Case) -> (Tensor<B, 5>, Tensor<B, 3>, Vec<f64>) {
    let dev = default_device();
    let x = case
        .tensor("hidden_states")
        .unwrap()
        .to_backend::<B, 5>("x", &dev)
        .unwrap();
    let ctx = case
        .tensor("encoder_hidden_states")
        .unwrap()
        .to_backend::<B, 3>("c", &dev)
        .unwrap();
    let t = case
        .tensor("timestep")
        .unwrap()
        .as_f32("t")
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    (x, ctx, t)
}

/// Runs the fixture inputs through an already built model.
fn run(model: &WanTransformer<B>, case: &Case) -> Vec<f32> {
    let (x, ctx, t) = inputs(case);
    let out = model.forward(x, &t, ctx).unwrap();
    HostTensor::from_backend(out).unwrap().as_f32("o").unwrap().to_vec()
}

/// Reads every tensor of a safetensors file as (name, dtype, shape, bytes).
fn read_all(path: &Path) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn write_all(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Copies a transformer folder's config into `dir` and writes the given tensors as its weights.
fn folder_with(src: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    write_all(&dir.path().join("diffusion_pytorch_model.safetensors"), tensors);
    dir
}

#[test]
fn both_layouts_match_diffusers() {
    let case = case();
    let want = reference(&case);
    for dir in ["models/wan21/transformer", "models/wan21_native_dit"] {
        let got = dit::forward::<B>(&case, dir, &default_device()).unwrap();
        let e = rel_l2(got.as_f32("o").unwrap(), &want);
        assert!(e <= 1e-4, "{dir}: rel_l2 {e}");
    }
}

#[test]
fn pieces_compose_to_the_full_forward_exactly() {
    let case = case();
    let dev = default_device();
    let model = WanTransformer::<B>::from_dir(fixtures().join("models/wan21/transformer"), &dev).unwrap();
    let (x, ctx, t) = inputs(&case);
    let full = model.forward(x.clone(), &t, ctx.clone()).unwrap();
    let n = model.blocks.len();
    for k in 0..=n {
        let e = model.embed(x.clone(), &t, ctx.clone()).unwrap();
        // The kernel `forward` uses, so that the composition is bit-exact.
        let attn = model.config.attention;
        let h = model.forward_blocks(e.tokens, &e.inputs, 0..k, &attn, &mut NoHook);
        let h = model.forward_blocks(h, &e.inputs, k..n, &attn, &mut NoHook);
        let out = model.head(h, e.temb, e.grid);
        out.into_data().assert_eq(&full.clone().into_data(), true);
    }
}

#[test]
fn every_attention_kernel_matches_diffusers() {
    let case = case();
    let mut model =
        WanTransformer::<B>::from_dir(fixtures().join("models/wan21/transformer"), &default_device()).unwrap();
    for kind in [AttentionKind::Fused, AttentionKind::Reference, AttentionKind::Auto] {
        model.config.attention = kind;
        let e = rel_l2(&run(&model, &case), &reference(&case));
        assert!(e <= 1e-4, "{kind:?}: rel_l2 {e}");
    }
}

#[test]
fn rows_are_independent_with_their_own_timesteps() {
    // Each batch row (own latents, text, timestep) must give what it gives alone.
    let case = case();
    let dev = default_device();
    let model = WanTransformer::<B>::from_dir(fixtures().join("models/wan21/transformer"), &dev).unwrap();
    let (x, ctx, _) = inputs(&case);
    let t = [900.0, 250.0];
    let both = model.forward(x.clone(), &t, ctx.clone()).unwrap();
    for row in 0..2 {
        let one = model
            .forward(
                x.clone().slice(row..row + 1),
                &t[row..row + 1],
                ctx.clone().slice(row..row + 1),
            )
            .unwrap();
        let a = HostTensor::from_backend(both.clone().slice(row..row + 1)).unwrap();
        let b = HostTensor::from_backend(one).unwrap();
        let e = rel_l2(a.as_f32("a").unwrap(), b.as_f32("b").unwrap());
        assert!(e < 1e-6, "row {row}: {e}");
    }
}

#[test]
fn a_two_shard_checkpoint_with_index_loads_the_same() {
    let case = case();
    let src = fixtures().join("models/wan21/transformer");
    let tensors = read_all(&src.join("diffusion_pytorch_model.safetensors"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let half = tensors.len() / 2;
    let names = [
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
    ];
    write_all(&dir.path().join(names[0]), &tensors[..half]);
    write_all(&dir.path().join(names[1]), &tensors[half..]);
    let map: serde_json::Map<String, serde_json::Value> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.0.clone(), serde_json::Value::from(names[usize::from(i >= half)])))
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(
        dir.path().join("diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let sharded = WanTransformer::<B>::from_dir(dir.path(), &default_device()).unwrap();
    let single = WanTransformer::<B>::from_dir(&src, &default_device()).unwrap();
    assert_eq!(run(&sharded, &case), run(&single, &case));

    // An index naming a shard that is not there is an error naming it.
    std::fs::remove_file(dir.path().join(names[1])).unwrap();
    let e = WanTransformer::<B>::from_dir(dir.path(), &default_device())
        .unwrap_err()
        .to_string();
    assert!(e.contains("00002-of-00002"), "{e}");
}

#[test]
fn wan_release_key_names_load() {
    // Wan's own checkpoints name block modulation `blocks.N.modulation`; the fixture writes
    // `blocks.N.head.modulation`. Both must load to the same model.
    let case = case();
    let src = fixtures().join("models/wan21_native_dit");
    let tensors: Vec<_> = read_all(&src.join("diffusion_pytorch_model.safetensors"))
        .into_iter()
        .map(|(n, d, s, b)| (n.replace(".head.modulation", ".modulation"), d, s, b))
        .collect();
    assert!(tensors.iter().any(|t| t.0 == "blocks.0.modulation"));
    let dir = folder_with(&src, &tensors);
    let model = WanTransformer::<B>::from_dir(dir.path(), &default_device()).unwrap();
    let e = rel_l2(&run(&model, &case), &reference(&case));
    assert!(e <= 1e-4, "rel_l2 {e}");
}

#[test]
fn bf16_weights_load_into_f32() {
    let case = case();
    let src = fixtures().join("models/wan21/transformer");
    let tensors: Vec<_> = read_all(&src.join("diffusion_pytorch_model.safetensors"))
        .into_iter()
        .map(|(n, _, s, b)| {
            let bf: Vec<u8> = b
                .chunks_exact(4)
                .flat_map(|c| half::bf16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes())
                .collect();
            (n, Dtype::BF16, s, bf)
        })
        .collect();
    let dir = folder_with(&src, &tensors);
    let model = WanTransformer::<B>::from_dir(dir.path(), &default_device()).unwrap();
    assert_eq!(
        model.blocks[0].attn1.to_q.weight.val().dtype(),
        burn::tensor::DType::F32
    );
    // bf16 keeps about 3 significant digits: close to the f32 result, but not equal.
    let e = rel_l2(&run(&model, &case), &reference(&case));
    assert!(e > 0.0 && e < 2e-2, "rel_l2 {e}");
}

/// The load errors are typed all the way up, so a caller can act on what is wrong.
#[test]
fn a_caller_can_match_on_what_is_wrong_with_a_checkpoint() {
    use chitu::dit::DitError;
    use chitu::pipeline::{DiffusionBackend, GenError};
    use chitu::store::LoadError;
    let src = fixtures().join("models/wan21/transformer");
    let tensors = read_all(&src.join("diffusion_pytorch_model.safetensors"));
    let load = |t: &[(String, Dtype, Vec<usize>, Vec<u8>)]| {
        WanTransformer::<B>::from_dir(folder_with(&src, t).path(), &default_device()).unwrap_err()
    };

    let without: Vec<_> = tensors.iter().filter(|t| t.0 != "proj_out.weight").cloned().collect();
    match load(&without) {
        DitError::Load(LoadError::MissingKeys { keys, unexpected, .. }) => {
            assert_eq!((keys, unexpected.len()), (vec!["proj_out.weight".to_string()], 0))
        }
        other => panic!("expected MissingKeys, got {other:?}"),
    }
    let mut extra = tensors.clone();
    extra.push(("blocks.0.mystery.weight".into(), Dtype::F32, vec![2], vec![0; 8]));
    match load(&extra) {
        DitError::Load(LoadError::UnexpectedKeys { keys, .. }) => {
            assert!(
                keys.len() == 1 && keys[0].starts_with("blocks.0.mystery.weight"),
                "{keys:?}"
            )
        }
        other => panic!("expected UnexpectedKeys, got {other:?}"),
    }
    let misshapen: Vec<_> = tensors
        .iter()
        .map(|t| match t.0 == "proj_out.bias" {
            true => (t.0.clone(), t.1, vec![32], t.3[..128].to_vec()),
            false => t.clone(),
        })
        .collect();
    match load(&misshapen) {
        DitError::Load(LoadError::Shape { key, got, .. }) => {
            assert_eq!((key.as_str(), &got[..]), ("proj_out.bias", &[32][..]))
        }
        other => panic!("expected Shape, got {other:?}"),
    }
    // A linear weight is named by its key in the file, with both shapes as the file stores them
    // (burn keeps linear weights transposed; the error does not).
    let (key, stored) = ("blocks.0.ffn.net.0.proj.weight", vec![96, 48]);
    let narrow: Vec<_> = tensors
        .iter()
        .map(|t| match t.0 == key {
            true => {
                assert_eq!(t.2, stored, "the fixture's FFN weight");
                let rows: Vec<u8> = t.3.chunks(48 * 4).flat_map(|row| row[..40 * 4].to_vec()).collect();
                (t.0.clone(), t.1, vec![96, 40], rows)
            }
            false => t.clone(),
        })
        .collect();
    match load(&narrow) {
        DitError::Load(e @ LoadError::Shape { .. }) => {
            let LoadError::Shape {
                key: k,
                module,
                expected,
                got,
                file,
            } = &e
            else {
                unreachable!()
            };
            assert_eq!(
                (k.as_str(), &expected[..], &got[..]),
                (key, &stored[..], &[96, 40][..]),
                "{e}"
            );
            assert_eq!(module, "blocks.0.ffn.fc1.weight", "{e}");
            assert!(file.ends_with("diffusion_pytorch_model.safetensors"), "{e}");
            assert!(e.to_string().contains(key) && e.to_string().contains("[96, 40]"), "{e}");
        }
        other => panic!("expected Shape, got {other:?}"),
    }
    // The generator wraps the same error: a missing folder file is the store's `Io`, with its path.
    match DiffusionBackend::<B>::from_dir(fixtures().join("models/nonexistent"), &default_device()) {
        Err(GenError::Store(LoadError::Io { path, .. })) => assert!(path.ends_with("model_index.json"), "{path:?}"),
        Err(other) => panic!("expected Store(Io), got {other:?}"),
        Ok(_) => panic!("loaded a folder that does not exist"),
    }
}

#[test]
fn missing_unexpected_and_misshapen_keys_are_listed() {
    let src = fixtures().join("models/wan21/transformer");
    let tensors = read_all(&src.join("diffusion_pytorch_model.safetensors"));

    let without: Vec<_> = tensors
        .iter()
        .filter(|t| t.0 != "blocks.1.attn2.to_k.weight")
        .cloned()
        .collect();
    let dir = folder_with(&src, &without);
    let e = WanTransformer::<B>::from_dir(dir.path(), &default_device())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing keys") && e.contains("blocks.1.attn2.to_k.weight"),
        "{e}"
    );

    let mut extra = tensors.clone();
    extra.push(("blocks.0.mystery.weight".into(), Dtype::F32, vec![2], vec![0; 8]));
    let dir = folder_with(&src, &extra);
    let e = WanTransformer::<B>::from_dir(dir.path(), &default_device())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unexpected keys") && e.contains("blocks.0.mystery.weight"),
        "{e}"
    );

    let misshapen: Vec<_> = tensors
        .iter()
        .map(|t| {
            if t.0 == "proj_out.bias" {
                (t.0.clone(), t.1, vec![32], t.3[..128].to_vec())
            } else {
                t.clone()
            }
        })
        .collect();
    let dir = folder_with(&src, &misshapen);
    let e = WanTransformer::<B>::from_dir(dir.path(), &default_device())
        .unwrap_err()
        .to_string();
    assert!(e.contains("proj_out.bias"), "{e}");

    // A diffusers checkpoint read as Wan's layout fails loudly instead of loading garbage.
    let model = WanTransformer::<B>::from_dir(&src, &default_device()).unwrap();
    let e = model
        .load_weights(
            &[src.join("diffusion_pytorch_model.safetensors")],
            CheckpointLayout::Wan,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing keys"), "{e}");
}

#[test]
fn bad_inputs_and_configs_are_errors() {
    let dev = default_device();
    let model = WanTransformer::<B>::from_dir(fixtures().join("models/wan21/transformer"), &dev).unwrap();
    let ctx = Tensor::<B, 3>::zeros([1, 7, 32], &dev);
    let odd = Tensor::<B, 5>::zeros([1, 16, 2, 5, 4], &dev);
    assert!(model
        .forward(odd, &[1.0], ctx.clone())
        .unwrap_err()
        .to_string()
        .contains("patch"));
    let chans = Tensor::<B, 5>::zeros([1, 8, 2, 4, 4], &dev);
    assert!(model
        .forward(chans, &[1.0], ctx.clone())
        .unwrap_err()
        .to_string()
        .contains("channels"));
    let ok = Tensor::<B, 5>::zeros([1, 16, 2, 4, 4], &dev);
    assert!(model.forward(ok.clone(), &[1.0, 2.0], ctx).is_err());
    assert!(model.forward(ok, &[1.0], Tensor::zeros([1, 7, 64], &dev)).is_err());

    let e = WanTransformer::<B>::from_dir("/nonexistent/transformer", &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/transformer/config.json"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"num_attention_heads": 2}"#).unwrap();
    assert!(WanTransformer::<B>::from_dir(dir.path(), &dev).is_err());
    std::fs::copy(
        fixtures().join("models/wan21/transformer/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let e = WanTransformer::<B>::from_dir(dir.path(), &dev).unwrap_err().to_string();
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");
}
