//! The Generator: request validation, stages and progress, seeded noise, NaN detection.

use burn::tensor::Tensor;
use chitu::pipeline::{seeded_noise, DiffusionBackend, DiffusionTask, DiffusionUserParams, GenError, Generator, Stage};
use chitu::{default_device, DefaultBackend as B};
use std::path::{Path, PathBuf};

fn model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity/models")
        .join(name)
}

fn small(prompt: &str) -> DiffusionUserParams {
    DiffusionUserParams {
        prompt: prompt.into(),
        height: 32,
        width: 32,
        num_frames: 5,
        num_inference_steps: 3,
        max_sequence_length: 16,
        ..DiffusionUserParams::default()
    }
}

fn invalid(p: DiffusionUserParams, needle: &str) {
    match DiffusionTask::<B>::from_user_request(p) {
        Err(GenError::Params(msg)) => assert!(msg.contains(needle), "{msg}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("accepted a request with bad {needle}"),
    }
}

#[test]
fn every_validation_error_is_reported() {
    invalid(
        DiffusionUserParams {
            height: 40,
            ..small("x")
        },
        "multiples of 16",
    );
    invalid(DiffusionUserParams { width: 0, ..small("x") }, "multiples of 16");
    invalid(
        DiffusionUserParams {
            num_frames: 6,
            ..small("x")
        },
        "4k+1",
    );
    invalid(
        DiffusionUserParams {
            num_frames: 0,
            ..small("x")
        },
        "4k+1",
    );
    invalid(
        DiffusionUserParams {
            num_inference_steps: 0,
            ..small("x")
        },
        "num_inference_steps",
    );
    invalid(
        DiffusionUserParams {
            guidance_scale: -1.0,
            ..small("x")
        },
        "guidance_scale",
    );
    invalid(
        DiffusionUserParams {
            guidance_scale_2: Some(f64::NAN),
            ..small("x")
        },
        "guidance_scale_2",
    );
    invalid(
        DiffusionUserParams {
            shift: Some(0.0),
            ..small("x")
        },
        "shift",
    );
    invalid(
        DiffusionUserParams {
            max_sequence_length: 0,
            ..small("x")
        },
        "max_sequence_length",
    );
    invalid(
        DiffusionUserParams {
            low_mem: 4,
            ..small("x")
        },
        "low_mem level 4",
    );
    assert!(DiffusionTask::<B>::from_user_request(small("x")).is_ok());
}

#[test]
fn wan21_defaults_follow_the_model() {
    let d = DiffusionUserParams::new("a cat");
    assert_eq!(
        (d.height, d.width, d.num_frames, d.num_inference_steps, d.guidance_scale),
        (480, 832, 81, 50, 5.0)
    );
    assert_eq!(d.latent_shape(16, 8), [1, 16, 21, 60, 104]);
}

#[test]
fn stages_advance_one_unit_per_call_and_progress_rises_to_one() {
    let dev = default_device();
    let gen = Generator::new(DiffusionBackend::<B>::from_dir(model("wan21"), &dev).unwrap());
    let mut task = DiffusionTask::<B>::from_user_request(small("A cat walking on grass")).unwrap();
    let mut stages = vec![task.stage()];
    let mut progress = vec![gen.get_progress(&task)];
    while !task.is_finished() {
        gen.generate_step(&mut task).unwrap();
        stages.push(task.stage());
        progress.push(gen.get_progress(&task));
    }
    use Stage::*;
    assert_eq!(stages, vec![TextEncode, Denoise, Denoise, Denoise, VaeDecode, Done]);
    assert!(progress.windows(2).all(|w| w[0] < w[1]), "{progress:?}");
    assert_eq!((progress[0], *progress.last().unwrap()), (0.0, 1.0));
    assert_eq!(task.video().unwrap().dims(), [1, 3, 5, 32, 32]);
    // A finished task stays finished.
    gen.generate_step(&mut task).unwrap();
    assert!(task.is_finished());
}

#[test]
fn a_seed_gives_the_same_video_and_another_seed_does_not() {
    let dev = default_device();
    let a = seeded_noise::<B>(7, [1, 16, 2, 4, 4], &dev);
    let b = seeded_noise::<B>(7, [1, 16, 2, 4, 4], &dev);
    let c = seeded_noise::<B>(8, [1, 16, 2, 4, 4], &dev);
    a.clone().into_data().assert_eq(&b.into_data(), true);
    let diff: f32 = (a.clone() - c).abs().max().into_scalar();
    assert!(diff > 0.0);
    let mean: f32 = seeded_noise::<B>(1, [1, 16, 8, 16, 16], &dev).mean().into_scalar();
    assert!(mean.abs() < 0.05, "not standard normal: mean {mean}");
}

#[test]
fn nan_latents_are_caught_with_the_step() {
    let dev = default_device();
    let gen = Generator::new(DiffusionBackend::<B>::from_dir(model("wan21"), &dev).unwrap());
    let nan = Tensor::<B, 5>::full([1, 16, 2, 4, 4], f32::NAN, &dev);
    let task = DiffusionTask::<B>::from_user_request(small("x"))
        .unwrap()
        .with_initial_latents(nan);
    let e = gen.run(task).err().unwrap().to_string();
    assert!(e.contains("NaN") && e.contains("step 0"), "{e}");
    // Wrong initial latent shape is a request error.
    let task = DiffusionTask::<B>::from_user_request(small("x"))
        .unwrap()
        .with_initial_latents(Tensor::zeros([1, 16, 3, 4, 4], &dev));
    assert!(matches!(gen.run(task), Err(GenError::Params(_))));
}

#[test]
fn the_two_expert_model_loads_both_experts() {
    let backend = DiffusionBackend::<B>::from_dir(model("wan22"), &default_device()).unwrap();
    assert_eq!(backend.model_pool.len(), 2);
    assert!(backend.model_pool.iter().all(|m| m.is_resident()));
    assert_eq!(backend.boundary_ratio, Some(0.875));
    let e = DiffusionBackend::<B>::from_dir(model("nonexistent"), &default_device())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model_index.json"), "{e}");
}

#[test]
fn pipeline_cases_match_diffusers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity");
    for name in ["pipeline_t2v_wan21", "pipeline_t2v_wan22"] {
        let report = chitu_parity::run_case::<B>(&root, name, &default_device());
        assert!(report.passed(), "{report}");
    }
}

#[test]
fn low_mem_level_one_decodes_in_tiles() {
    let dev = default_device();
    let gen = Generator::new(DiffusionBackend::<B>::from_dir(model("wan21"), &dev).unwrap());
    // 288 pixels wide: more than one 256-pixel tile.
    let params = DiffusionUserParams {
        width: 288,
        num_inference_steps: 1,
        ..small("x")
    };
    let plain = gen
        .run(DiffusionTask::<B>::from_user_request(params.clone()).unwrap())
        .unwrap();
    let low = DiffusionUserParams { low_mem: 1, ..params };
    let tiled = gen.run(DiffusionTask::<B>::from_user_request(low).unwrap()).unwrap();
    let latents = plain.latents().cloned().unwrap();
    tiled
        .video()
        .cloned()
        .unwrap()
        .into_data()
        .assert_eq(&gen.decode_vae_tiled(latents).unwrap().into_data(), true);
    let diff: f32 = (plain.video().cloned().unwrap() - tiled.video().cloned().unwrap())
        .abs()
        .max()
        .into_scalar();
    assert!(diff > 0.0, "a 288-pixel-wide decode must actually tile");
}

use crate::common;

#[test]
fn a_wan_release_folder_generates_what_the_diffusers_folder_does() {
    // The fixture's weights rewritten as Wan ships them: the DiT in Wan's key layout with Wan's
    // config, the UMT5 and VAE checkpoints under Wan's file names, the tokenizer under google/.
    let dir = tempfile::tempdir().unwrap();
    let native = dir.path();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/models");
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(fixtures.join("wan21_native_dit").join(f), native.join(f)).unwrap();
    }
    common::write_wan_t5(
        &model("wan21"),
        &native.join("models_t5_umt5-xxl-enc-bf16.safetensors"),
        None,
    );
    common::write_wan_vae(&model("wan21"), &native.join("Wan2.1_VAE.safetensors"));
    std::fs::create_dir_all(native.join("google/umt5-xxl")).unwrap();
    std::fs::copy(
        model("wan21").join("tokenizer/tokenizer.json"),
        native.join("google/umt5-xxl/tokenizer.json"),
    )
    .unwrap();
    assert!(chitu::pipeline::is_wan_native(native));

    // The real preset describes the real VAE and UMT5-XXL: the tiny checkpoints must be refused
    // by name, not loaded into garbage. The VAE loads before the text encoder (which loads last,
    // see `DiffusionBackend::load`), so it is the first refused.
    let dev = default_device();
    let e = DiffusionBackend::<B>::from_dir(native, &dev).err().unwrap().to_string();
    assert!(
        e.contains("VAE") && e.contains("the model expects [96, 3, 3, 3, 3]"),
        "{e}"
    );

    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
    let config = chitu::pipeline::WanNativeConfig {
        text: serde_json::from_str(&read(model("wan21").join("text_encoder/config.json"))).unwrap(),
        vae: serde_json::from_str(&read(model("wan21").join("vae/config.json"))).unwrap(),
        shift: 3.0,
        ..chitu::pipeline::WanNativeConfig::wan21_t2v()
    };
    // With the right VAE, the UMT5-XXL preset still refuses the tiny text checkpoint, by name.
    let xxl_text = chitu::pipeline::WanNativeConfig {
        text: chitu::text::Umt5Config::umt5_xxl(),
        ..config.clone()
    };
    let e = DiffusionBackend::<B>::from_wan_dir(native, &xxl_text, &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("UMT5") && e.contains("missing keys"), "{e}");
    let wan = Generator::new(DiffusionBackend::<B>::from_wan_dir(native, &config, &dev).unwrap());
    let diffusers = Generator::new(DiffusionBackend::<B>::from_dir(model("wan21"), &dev).unwrap());
    let run = |g: &Generator<B>| {
        let task = g.run(DiffusionTask::from_user_request(small("A cat walking on grass")).unwrap());
        task.unwrap().video().cloned().unwrap().into_data()
    };
    assert_eq!(run(&wan), run(&diffusers));

    // Two experts need a boundary; a missing checkpoint is named.
    let two = chitu::pipeline::WanNativeConfig {
        boundary_ratio: Some(0.875),
        ..config.clone()
    };
    let e = DiffusionBackend::<B>::from_wan_dir(native, &two, &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("boundary"), "{e}");
    std::fs::remove_file(native.join("Wan2.1_VAE.safetensors")).unwrap();
    let e = DiffusionBackend::<B>::from_wan_dir(native, &config, &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("Wan2.1_VAE.pth"), "{e}");
}
