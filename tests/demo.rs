//! The demo model's training run: it writes every file the generator loads a demo model from,
//! resumes where it stopped, and the model it makes runs through the whole pipeline.

use chitu::demo::clips::vocabulary;
use chitu::demo::train::{train, Stage, TrainOptions};
use chitu::pipeline::{demo, DiffusionBackend, DiffusionUserParams, Generator, Precision};
use chitu::{default_device, DefaultBackend as B};

#[test]
fn a_short_training_run_resumes_and_makes_a_model_the_generator_runs() {
    let dir = tempfile::tempdir().unwrap();
    let options = TrainOptions {
        out: dir.path().join("out"),
        work: dir.path().join("work"),
        stage: Stage::All,
        vae_steps: 1,
        vae_clip_steps: 1,
        dit_steps: 2,
        dit_clips: 8,
        ..TrainOptions::default()
    };
    train(&options).unwrap();
    for file in demo::FILES {
        assert!(options.out.join(file).is_file(), "{file} was not written");
    }
    let step = |name: &str| std::fs::read_to_string(options.work.join(format!("{name}.step"))).unwrap();
    assert_eq!((step("vae"), step("dit")), ("2".to_string(), "2".to_string()));
    // One more DiT step starts from the checkpoint, not from scratch.
    train(&TrainOptions {
        stage: Stage::Dit,
        dit_steps: 3,
        ..options.clone()
    })
    .unwrap();
    assert_eq!(step("dit"), "3");

    let backend = DiffusionBackend::<B>::demo_from_dir(&options.out, &default_device(), Precision::F32).unwrap();
    let video = Generator::new(backend)
        .generate(DiffusionUserParams {
            num_inference_steps: 2,
            ..DiffusionUserParams::demo("a red disc moves to the right")
        })
        .unwrap();
    let frames = video.frames();
    assert_eq!(
        (frames.frames.len(), frames.width, frames.height),
        (demo::DEMO_FRAMES, 32, 32)
    );

    // A folder without one of the files is refused by name.
    std::fs::remove_file(options.out.join("vae_stats.json")).unwrap();
    let err = DiffusionBackend::<B>::demo_from_dir(&options.out, &default_device(), Precision::F32)
        .err()
        .expect("a folder without vae_stats.json loads");
    assert!(err.to_string().contains("vae_stats.json"), "{err}");
}

#[test]
fn the_committed_tokenizer_is_the_one_the_vocabulary_makes() {
    let committed = include_str!("../crates/chitu-gen/assets/demo/tokenizer.json");
    assert_eq!(committed, demo::tokenizer_json(&vocabulary()));
}
