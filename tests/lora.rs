//! LoRA adapters: unmerging gives the base weights back bit for bit (from kept tensors, from the
//! files, at every weight format), keys that do not fit fail by name (or are skipped with
//! `lora_partial`), musubi-tuner's names read as Wan's, and few-step runs skip the unconditional
//! pass. The parity of merged LoRAs against diffusers is in chitu-gen's parity test.

use crate::common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Tensor};
use chitu::pipeline::{
    DiffusionBackend, DiffusionTask, DiffusionUserParams, Expert, Format, GenError, Generator, LoadOptions, LoraSpec,
    Precision, StepList, Weights,
};
use chitu::{default_device, DefaultBackend as B};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

fn native_lora() -> PathBuf {
    fixtures().join("loras/wan21_native.safetensors")
}

/// Every float parameter of a module: its path, dtype and bytes.
fn weights<M: Module<B>>(module: &M) -> Vec<(String, String)> {
    struct All(Vec<(String, String)>, Vec<String>);
    impl<B2: Backend> ModuleVisitor<B2> for All {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.1.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.1.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B2, D>>) {
            let data = param.val().into_data();
            let digest = format!("{:?} {:x?}", data.dtype, fnv(data.as_bytes()));
            self.0.push((self.1.join("."), digest));
        }
    }
    let mut all = All(Vec::new(), Vec::new());
    module.visit(&mut all);
    all.0
}

/// A 64-bit FNV-1a of the bytes: equal digests for equal tensors, without holding copies.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn dit_weights(backend: &DiffusionBackend<B>, i: usize) -> Vec<(String, String)> {
    backend.dit(i).unwrap().with(weights).unwrap()
}

fn changed(a: &[(String, String)], b: &[(String, String)]) -> Vec<String> {
    a.iter()
        .zip(b)
        .filter(|(x, y)| x != y)
        .map(|(x, _)| x.0.clone())
        .collect()
}

/// A tensor to write: name, shape, f32 values.
type Tensor1 = (&'static str, Vec<usize>, Vec<f32>);

/// Writes `tensors` as a safetensors file.
fn write_lora(path: &Path, tensors: &[Tensor1]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| (name.to_string(), TensorView::new(Dtype::F32, shape.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// The native fixture LoRA with every key renamed by `rename`.
fn renamed_lora(path: &Path, rename: impl Fn(&str) -> String) {
    let bytes = std::fs::read(native_lora()).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, TensorView)> = st.tensors().into_iter().map(|(k, v)| (rename(&k), v)).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn unmerging_restores_the_base_weights_bit_for_bit() {
    let device = default_device();
    // The embedded model keeps the replaced tensors; a folder's model rereads them, at each format.
    let embedded = DiffusionBackend::<B>::embedded_tiny_as(&device, Precision::Bf16).unwrap();
    let mut backends = vec![("embedded bf16".to_string(), embedded)];
    for format in [
        Format::from(Precision::F32),
        Format::from(Precision::Bf16),
        Format::new(Precision::Bf16, Weights::Int8),
    ] {
        let options = LoadOptions {
            dtype: format.precision,
            weights: format.weights,
            ..LoadOptions::default()
        };
        let backend = DiffusionBackend::<B>::load(fixtures().join("models/wan21"), &device, options).unwrap();
        backends.push((format.name(), backend));
    }
    for (name, backend) in &backends {
        let base = dit_weights(backend, 0);
        let report = backend.apply_lora(&[LoraSpec::new(native_lora())], false).unwrap();
        assert_eq!(report.merged_now, 1, "{name}");
        // 2 blocks x 10 linear layers, the 10 bias deltas and the head's weight and bias.
        let merged = dit_weights(backend, 0);
        let touched = changed(&base, &merged);
        assert_eq!(touched.len(), 2 * 10 + 2 * 5 + 2, "{name}: {touched:?}");
        assert_eq!(report.applied[0].tensors, touched.len(), "{name}");
        // A second LoRA on top, then both out.
        let peft = LoraSpec {
            strength: 0.5,
            ..LoraSpec::new(fixtures().join("loras/wan21_peft.safetensors"))
        };
        backend.apply_lora(&[peft], false).unwrap();
        assert_eq!(backend.loras()[0].len(), 2);
        assert_ne!(dit_weights(backend, 0), merged, "{name}");
        backend.remove_lora().unwrap();
        assert_eq!(
            dit_weights(backend, 0),
            base,
            "{name}: unmerged weights differ from the base"
        );
        assert!(backend.loras()[0].is_empty());
        // Kept tensors cost memory only where there are no files to reread.
        assert_eq!(report.base_bytes > 0, name.starts_with("embedded"), "{name}");
    }
}

#[test]
fn a_released_dit_merges_when_it_is_read_again() {
    let device = default_device();
    let dir = fixtures().join("models/wan21");
    let plain = DiffusionBackend::<B>::load(&dir, &device, LoadOptions::default()).unwrap();
    plain.apply_lora(&[LoraSpec::new(native_lora())], false).unwrap();
    let want = dit_weights(&plain, 0);
    let options = LoadOptions {
        release_after_use: true,
        loras: vec![LoraSpec::new(native_lora())],
        ..LoadOptions::default()
    };
    let released = DiffusionBackend::<B>::load(&dir, &device, options).unwrap();
    assert!(released.dit(0).unwrap().is_released());
    assert_eq!(released.lora_report().merged_now, 0);
    assert_eq!(dit_weights(&released, 0), want);
    assert!(released.lora_merge_seconds() > 0.0);
    // Released again and taken out: the next read is the base model.
    released.dit(0).unwrap().release().unwrap();
    released.remove_lora().unwrap();
    let base = DiffusionBackend::<B>::load(&dir, &device, LoadOptions::default()).unwrap();
    assert_eq!(dit_weights(&released, 0), dit_weights(&base, 0));
}

#[test]
fn each_expert_takes_only_its_own_lora() {
    let device = default_device();
    let backend =
        DiffusionBackend::<B>::load(fixtures().join("models/wan22"), &device, LoadOptions::default()).unwrap();
    let (high0, low0) = (dit_weights(&backend, 0), dit_weights(&backend, 1));
    let spec = |file: &str, expert| LoraSpec {
        expert,
        ..LoraSpec::new(fixtures().join("loras").join(file))
    };
    backend
        .apply_lora(&[spec("wan22_high.safetensors", Expert::High)], false)
        .unwrap();
    assert!(!changed(&high0, &dit_weights(&backend, 0)).is_empty());
    assert!(changed(&low0, &dit_weights(&backend, 1)).is_empty());
    backend
        .apply_lora(&[spec("wan22_low.safetensors", Expert::Low)], false)
        .unwrap();
    assert!(!changed(&low0, &dit_weights(&backend, 1)).is_empty());
    backend.remove_lora().unwrap();
    assert_eq!((dit_weights(&backend, 0), dit_weights(&backend, 1)), (high0, low0));
    // An expert a one-DiT model does not have is refused by name.
    let one = DiffusionBackend::<B>::embedded_tiny(&device).unwrap();
    let e = one
        .apply_lora(&[spec("wan21_native.safetensors", Expert::Low)], false)
        .unwrap_err();
    assert!(
        e.to_string().contains("expert low") && e.to_string().contains("both"),
        "{e}"
    );
}

#[test]
fn keys_that_do_not_fit_fail_by_name_unless_partial() {
    let device = default_device();
    let backend = DiffusionBackend::<B>::embedded_tiny(&device).unwrap();
    let base = dit_weights(&backend, 0);
    let dir = tempfile::tempdir().unwrap();
    let r = 4;
    let fits = vec![
        (
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight",
            vec![r, 48],
            vec![0.01; r * 48],
        ),
        (
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight",
            vec![48, r],
            vec![0.01; 48 * r],
        ),
    ];
    let cases: Vec<(&str, Vec<Tensor1>, &[&str])> = vec![
        // A 14B LoRA on this model: its width is 5120, this one's 48.
        (
            "wide",
            vec![
                (
                    "diffusion_model.blocks.0.self_attn.k.lora_down.weight",
                    vec![r, 5120],
                    vec![0.0; r * 5120],
                ),
                (
                    "diffusion_model.blocks.0.self_attn.k.lora_up.weight",
                    vec![5120, r],
                    vec![0.0; 5120 * r],
                ),
            ],
            &["self_attn.k.lora_down.weight", "[4, 5120]", "[rank, 48]"],
        ),
        // An I2V LoRA on a T2V model: image projections this model has not got.
        (
            "i2v",
            vec![
                (
                    "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight",
                    vec![r, 48],
                    vec![0.0; r * 48],
                ),
                (
                    "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight",
                    vec![48, r],
                    vec![0.0; 48 * r],
                ),
            ],
            &["cross_attn.k_img.lora_down.weight", "has no"],
        ),
        // A block beyond the model's two.
        (
            "deep",
            vec![("diffusion_model.blocks.7.ffn.0.diff_b", vec![96], vec![0.0; 96])],
            &["blocks.7.ffn.0.diff_b", "has no blocks.7.ffn.fc1.bias"],
        ),
        // Half a pair.
        (
            "half",
            vec![(
                "diffusion_model.blocks.1.self_attn.v.lora_down.weight",
                vec![r, 48],
                vec![0.0; r * 48],
            )],
            &["self_attn.v.lora_down.weight", "lacks its up"],
        ),
        // A format chitu does not read (LoKr).
        (
            "lokr",
            vec![(
                "diffusion_model.blocks.0.self_attn.q.lokr_w1",
                vec![4, 4],
                vec![0.0; 16],
            )],
            &["lokr_w1", "not a key chitu reads"],
        ),
    ];
    for (name, bad, words) in cases {
        let path = dir.path().join(format!("{name}.safetensors"));
        let mut tensors = fits.clone();
        tensors.extend(bad);
        write_lora(&path, &tensors);
        let e = backend.apply_lora(&[LoraSpec::new(&path)], false).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, GenError::Lora(_)), "{name}: {msg}");
        for w in words {
            assert!(
                msg.contains(w) && msg.contains(&path.display().to_string()),
                "{name}: {w:?} not in {msg}"
            );
        }
        // Nothing merged.
        assert_eq!(dit_weights(&backend, 0), base, "{name}");
        // Partial: the fitting pair merges, the rest is reported.
        let report = backend.apply_lora(&[LoraSpec::new(&path)], true).unwrap();
        let applied = &report.applied[0];
        assert_eq!(applied.tensors, 1, "{name}");
        assert!(
            applied.skipped.iter().any(|s| s.contains(words[0])),
            "{name}: {:?}",
            applied.skipped
        );
        assert_eq!(
            changed(&base, &dit_weights(&backend, 0)),
            ["blocks.0.attn1.to_q.weight"],
            "{name}"
        );
        backend.remove_lora().unwrap();
    }
    // A LoRA of which nothing fits is an error even when partial.
    let path = dir.path().join("none.safetensors");
    write_lora(
        &path,
        &[("diffusion_model.blocks.9.ffn.2.diff_b", vec![48], vec![0.0; 48])],
    );
    let e = backend.apply_lora(&[LoraSpec::new(&path)], true).unwrap_err();
    assert!(e.to_string().contains("no key of the file applies"), "{e}");
}

#[test]
fn bad_files_and_values_are_refused_by_name() {
    let device = default_device();
    let backend = DiffusionBackend::<B>::embedded_tiny(&device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.safetensors");
    let e = backend.apply_lora(&[LoraSpec::new(&missing)], false).unwrap_err();
    assert!(e.to_string().contains("missing.safetensors"), "{e}");
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header").unwrap();
    let e = backend.apply_lora(&[LoraSpec::new(&junk)], false).unwrap_err();
    assert!(e.to_string().contains("junk.safetensors"), "{e}");
    let nan = dir.path().join("nan.safetensors");
    let mut up = vec![0.0f32; 48 * 4];
    up[5] = f32::NAN;
    write_lora(
        &nan,
        &[
            (
                "diffusion_model.blocks.0.self_attn.q.lora_down.weight",
                vec![4, 48],
                vec![0.0; 4 * 48],
            ),
            ("diffusion_model.blocks.0.self_attn.q.lora_up.weight", vec![48, 4], up),
        ],
    );
    let e = backend.apply_lora(&[LoraSpec::new(&nan)], false).unwrap_err();
    assert!(
        e.to_string().contains("lora_up.weight") && e.to_string().contains("NaN"),
        "{e}"
    );
    let strength = LoraSpec {
        strength: f32::INFINITY,
        ..LoraSpec::new(native_lora())
    };
    assert!(backend.apply_lora(&[strength], false).is_err());
    // The CLI's spelling.
    let spec: LoraSpec = "a.safetensors:0.7:low".parse().unwrap();
    assert_eq!((spec.strength, spec.expert), (0.7, Expert::Low));
    let spec: LoraSpec = "a.safetensors:high".parse().unwrap();
    assert_eq!((spec.strength, spec.expert), (1.0, Expert::High));
    for bad in ["a.safetensors:x", "a.safetensors:1:middle", "a.safetensors:nan"] {
        assert!(bad.parse::<LoraSpec>().is_err(), "{bad}");
    }
}

#[test]
fn musubi_and_peft_names_merge_as_the_wan_names_do() {
    let device = default_device();
    let dir = tempfile::tempdir().unwrap();
    let musubi = dir.path().join("musubi.safetensors");
    renamed_lora(&musubi, |k| {
        let body = k.strip_prefix("diffusion_model.").unwrap();
        let (module, part) = match body.find(".lora_") {
            Some(i) => body.split_at(i),
            None => body.split_at(body.rfind('.').unwrap()),
        };
        format!("lora_unet_{}{part}", module.replace('.', "_"))
    });
    let wan = DiffusionBackend::<B>::embedded_tiny(&device).unwrap();
    wan.apply_lora(&[LoraSpec::new(native_lora())], false).unwrap();
    let other = DiffusionBackend::<B>::embedded_tiny(&device).unwrap();
    other.apply_lora(&[LoraSpec::new(&musubi)], false).unwrap();
    assert_eq!(dit_weights(&wan, 0), dit_weights(&other, 0));
}

#[test]
fn guidance_1_runs_one_dit_evaluation_a_step_and_step_lists_drive_euler() {
    let device = default_device();
    let generator = Generator::new(DiffusionBackend::<B>::embedded_tiny(&device).unwrap());
    let run = |params: DiffusionUserParams| generator.run(DiffusionTask::from_user_request(params)?);
    let params = DiffusionUserParams {
        height: 32,
        width: 32,
        num_frames: 5,
        num_inference_steps: 4,
        ..DiffusionUserParams::tiny("a cat")
    };
    let guided = run(params.clone()).unwrap();
    assert_eq!(guided.dit_calls(), 8);
    let unguided = DiffusionUserParams {
        guidance_scale: 1.0,
        ..params.clone()
    };
    assert_eq!(run(unguided.clone()).unwrap().dit_calls(), 4);
    // LightX2V's 4-step list: Euler at its timesteps, one evaluation each.
    let listed = DiffusionUserParams {
        step_list: Some(StepList::Timesteps(vec![1000.0, 750.0, 500.0, 250.0])),
        shift: Some(5.0),
        ..unguided.clone()
    };
    let task = run(listed.clone()).unwrap();
    assert_eq!(task.dit_calls(), 4);
    assert!(task.latents().is_some());
    // A list of the wrong length, or with a multistep solver, is refused by name.
    let e = run(DiffusionUserParams {
        num_inference_steps: 3,
        ..listed.clone()
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("timesteps lists 4 steps"), "{e}");
    let e = run(DiffusionUserParams {
        solver: Some(chitu_sched::SolverKind::UniPc),
        ..listed
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("euler"), "{e}");
}

#[test]
fn a_cache_runs_on_merged_weights() {
    let device = default_device();
    let backend = DiffusionBackend::<B>::embedded_tiny(&device).unwrap();
    let params = DiffusionUserParams {
        height: 32,
        width: 32,
        num_frames: 5,
        num_inference_steps: 6,
        cache: Some(chitu_cache::CacheConfig::parse("first_block_cache").unwrap()),
        ..DiffusionUserParams::tiny("a cat")
    };
    let generator = Generator::new(backend);
    let latents = |g: &Generator<B>| {
        let task = g
            .run(DiffusionTask::from_user_request(params.clone()).unwrap())
            .unwrap();
        task.latents().unwrap().clone().into_data().to_vec::<f32>().unwrap()
    };
    let before = latents(&generator);
    generator
        .backend
        .apply_lora(&[LoraSpec::new(native_lora())], false)
        .unwrap();
    let with = latents(&generator);
    assert_ne!(before, with);
    generator.backend.remove_lora().unwrap();
    assert_eq!(latents(&generator), before);
}

#[test]
fn the_cli_takes_loras_and_step_lists() {
    let out = tempfile::tempdir().unwrap();
    let lora = format!("{}:0.7", native_lora().display());
    let run = common::generate(
        &[
            "--prompt",
            "a cat",
            "--height",
            "32",
            "--width",
            "32",
            "--frames",
            "5",
            "--guidance",
            "1",
            "--timesteps",
            "1000,750,500,250",
            "--shift",
            "5",
            "--lora",
            &lora,
        ],
        out.path(),
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("LoRA") && stderr.contains("4 DiT evaluations"),
        "{stderr}"
    );
    let json = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .unwrap();
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(meta["dit_calls"], 4);
    assert!(
        (meta["loras"][0]["strength"].as_f64().unwrap() - 0.7).abs() < 1e-6,
        "{meta}"
    );
    assert_eq!(meta["params"]["timesteps"][1], 750.0);
    // A LoRA that does not fit fails before anything runs, naming its keys.
    let dir = tempfile::tempdir().unwrap();
    let wide = dir.path().join("wide.safetensors");
    write_lora(
        &wide,
        &[
            (
                "diffusion_model.blocks.0.self_attn.k.lora_down.weight",
                vec![4, 5120],
                vec![0.0; 4 * 5120],
            ),
            (
                "diffusion_model.blocks.0.self_attn.k.lora_up.weight",
                vec![5120, 4],
                vec![0.0; 5120 * 4],
            ),
        ],
    );
    let bad = common::generate(&["--prompt", "a cat", "--lora", wide.to_str().unwrap()], out.path());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        stderr.contains("self_attn.k.lora_down.weight") && stderr.contains("5120"),
        "{stderr}"
    );
    let bad = common::generate(&["--prompt", "a cat", "--lora", "x.safetensors:1:middle"], out.path());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("high, low or both"));
}

#[test]
fn the_memory_plan_counts_the_lora_it_will_hold() {
    let device = default_device();
    let dir = fixtures().join("models/wan21");
    let spec = LoraSpec::new(native_lora());
    let planned = chitu::pipeline::ModelSizes::of_folder::<B>(&dir, Format::F32, Precision::F32, &device)
        .unwrap()
        .with_loras(std::slice::from_ref(&spec));
    let backend = DiffusionBackend::<B>::load(&dir, &device, LoadOptions::default()).unwrap();
    assert_eq!(backend.sizes().lora_bytes, 0);
    backend.apply_lora(&[spec], false).unwrap();
    let held = backend.sizes().lora_bytes;
    // The file holds the same tensors (and the alphas, folded into the deltas' scales), plus
    // its JSON header: the plan's figure is the file's size, an upper bound.
    let file = std::fs::metadata(native_lora()).unwrap().len();
    let bytes = std::fs::read(native_lora()).unwrap();
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let alphas = 4 * SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .iter()
        .filter(|k| k.ends_with(".alpha"))
        .count() as u64;
    assert_eq!(planned.lora_bytes, file);
    assert_eq!(held, file - header - alphas);
}
