//! `low_mem` levels 2 and 3: the text encoder and inactive DiTs off the device. On the CPU
//! backend these tests run on, a model off the device is released and read again from its files.

use burn::tensor::Tensor;
use chitu::pipeline::{DiffusionBackend, DiffusionTask, DiffusionUserParams, Generator, LoadOptions, Stage};
use chitu::{default_device, DefaultBackend as B};
use std::path::{Path, PathBuf};

fn model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity/models")
        .join(name)
}

fn params(low_mem: u8) -> DiffusionUserParams {
    DiffusionUserParams {
        prompt: "a fox in the snow".into(),
        height: 32,
        width: 32,
        num_frames: 5,
        num_inference_steps: 6,
        max_sequence_length: 16,
        low_mem,
        ..DiffusionUserParams::default()
    }
}

/// Which models are on the device after each `generate_step`: (stage reached, text encoder, DiTs).
type Residency = Vec<(Stage, bool, Vec<bool>)>;

fn run(gen: &Generator<B>, p: DiffusionUserParams) -> (Tensor<B, 5>, Tensor<B, 5>, Residency) {
    let mut task = DiffusionTask::<B>::from_user_request(p).unwrap();
    let mut seen = Vec::new();
    while !task.is_finished() {
        gen.generate_step(&mut task).unwrap();
        let b = &gen.backend;
        seen.push((
            task.stage(),
            b.text.is_resident(),
            b.model_pool.iter().map(|m| m.is_resident()).collect(),
        ));
    }
    (task.latents().cloned().unwrap(), task.video().cloned().unwrap(), seen)
}

fn assert_same(a: &Tensor<B, 5>, b: &Tensor<B, 5>) {
    a.to_data().assert_eq(&b.to_data(), true);
}

#[test]
fn level_three_keeps_only_the_active_expert_and_changes_nothing() {
    let dev = default_device();
    let gen = Generator::new(DiffusionBackend::<B>::from_dir(model("wan22"), &dev).unwrap());
    let (latents, video, seen) = run(&gen, params(0));
    assert!(
        seen.iter().all(|(_, text, dits)| *text && dits == &[true, true]),
        "{seen:?}"
    );

    let (latents3, video3, seen) = run(&gen, params(3));
    assert_same(&latents, &latents3);
    assert_same(&video, &video3);
    // After text encoding: no DiT on the device, and the text encoder parked too.
    assert_eq!(seen[0], (Stage::Denoise, false, vec![false, false]));
    // Each denoise step: exactly the step's expert, high noise first, switching once.
    let active: Vec<usize> = seen[1..=6]
        .iter()
        .map(|(_, text, dits)| {
            assert!(!text);
            assert_eq!(dits.iter().filter(|r| **r).count(), 1, "{dits:?}");
            dits.iter().position(|r| *r).unwrap()
        })
        .collect();
    let switch = active.iter().position(|&e| e == 1).expect("the low-noise expert runs");
    assert!(switch > 0 && active[switch..].iter().all(|&e| e == 1), "{active:?}");
    // The decode runs with every model parked.
    assert_eq!(seen.last().unwrap(), &(Stage::Done, false, vec![false, false]));
    // On the CPU, parked means released: no host copy is held.
    assert!(gen
        .backend
        .model_pool
        .iter()
        .all(|m| m.is_released() && m.parked_bytes() == 0));

    // A later request without offload brings the models back and keeps them.
    let (latents0, _, seen) = run(&gen, params(0));
    assert_same(&latents, &latents0);
    assert!(seen.last().unwrap().1 && seen.last().unwrap().2 == [true, true]);
}

#[test]
fn level_two_parks_the_text_encoder_only() {
    let dev = default_device();
    let gen = Generator::new(DiffusionBackend::<B>::from_dir(model("wan21"), &dev).unwrap());
    let (latents, _, _) = run(&gen, params(0));
    let (latents2, _, seen) = run(&gen, params(2));
    assert_same(&latents, &latents2);
    assert!(seen.iter().all(|(_, text, dits)| !*text && dits == &[true]), "{seen:?}");
    assert!(gen.backend.text.is_released());
}

#[test]
fn loading_at_level_three_parks_each_model_as_it_loads() {
    let dev = default_device();
    let plain = Generator::new(DiffusionBackend::<B>::from_dir(model("wan22"), &dev).unwrap());
    let backend = DiffusionBackend::<B>::load(
        model("wan22"),
        &dev,
        LoadOptions {
            low_mem: 3,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert!(!backend.text.is_resident());
    assert!(backend.model_pool.iter().all(|m| !m.is_resident() && m.is_released()));
    let parked = Generator::new(backend);
    let (latents, _, _) = run(&plain, params(0));
    let (latents3, _, _) = run(&parked, params(3));
    assert_same(&latents, &latents3);
}

/// The memory estimate follows the levels: a tiled decode and models away from the device need
/// less, and a longer video more.
#[test]
fn the_memory_estimate_follows_the_levels() {
    use chitu::pipeline::{EstimatedStage, MemoryLevel};
    let dev = default_device();
    let load = |options| DiffusionBackend::<B>::load(model("wan22"), &dev, options).unwrap();
    let kept = load(LoadOptions::default());
    let released = load(LoadOptions {
        release_after_use: true,
        ..LoadOptions::default()
    });
    let big = DiffusionUserParams {
        height: 1024,
        width: 1024,
        num_frames: 21,
        ..params(0)
    };
    let at = |b: &DiffusionBackend<B>, p: &DiffusionUserParams, level| b.estimate_memory(p, MemoryLevel(level));
    let plain = at(&kept, &big, 0);
    assert_eq!(plain.stage, EstimatedStage::VaeDecode);
    assert!(at(&kept, &big, 1).bytes < plain.bytes);
    let longer = DiffusionUserParams {
        num_frames: 41,
        ..big.clone()
    };
    assert!(at(&kept, &longer, 0).bytes > plain.bytes);
    // The weights: every model resident at level 0, fewer once they are released or parked.
    let small = params(0);
    assert!(at(&released, &small, 0).bytes < at(&kept, &small, 0).bytes);
    assert!(at(&kept, &small, 3).bytes < at(&kept, &small, 0).bytes);
}
