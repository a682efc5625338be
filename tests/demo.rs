//! The demo model's training run: it writes every file the generator loads a demo model from,
//! resumes where it stopped, and the model it makes runs through the whole pipeline.

use chitu::demo::clips::vocabulary;
use chitu::demo::train::{train, Stage, TrainOptions};
use chitu::pipeline::{demo, DiffusionBackend, DiffusionUserParams, Generator, Precision};
use chitu::{default_device, DefaultBackend as B};

use crate::common;

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

/// Whether this build embeds the trained demo model (all of its files are in the tree).
fn demo_is_built_in() -> bool {
    let assets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/chitu-gen/assets/demo");
    demo::FILES.iter().all(|f| assets.join(f).is_file())
}

/// The semantic end-to-end test: every held-back prompt (each colour with each direction, on a
/// shape the model never saw doing it) through tokenizer, UMT5, DiT, scheduler and VAE, with
/// the demo sampler's defaults; the decoded frames must show the prompt's colour moving its
/// way in at least nine of ten. A build without the trained files must say how to make them.
#[test]
fn the_embedded_demo_model_makes_what_held_back_prompts_say() {
    let backend = DiffusionBackend::<B>::embedded_demo_as(&default_device(), Precision::F32);
    if !demo_is_built_in() {
        let err = backend
            .err()
            .expect("a build without the demo files loads a demo model");
        assert!(err.to_string().contains("train_demo"), "{err}");
        return;
    }
    let outcomes = chitu::demo::judge::evaluate(backend.unwrap(), 0, None).unwrap();
    let right = outcomes.iter().filter(|o| o.correct()).count();
    let table = chitu::demo::judge::confusion_table(&outcomes);
    println!("{table}");
    assert!(right * 10 >= outcomes.len() * 9, "{table}");
}

/// `chitu generate` on the embedded demo model draws what its prompt says: the frames it writes
/// show a red object moving right. A build without the trained files says how to make them and
/// writes nothing.
#[test]
fn the_demo_command_draws_what_the_prompt_says() {
    use chitu::demo::clips::{Colour, Motion};
    let out = tempfile::tempdir().unwrap();
    let prompt = "a red disc moves to the right";
    let run = common::generate_as_given(&["--embedded", "demo", "--prompt", prompt, "--png-frames"], out.path());
    let stderr = String::from_utf8_lossy(&run.stderr);
    if !demo_is_built_in() {
        assert!(!run.status.success() && stderr.contains("train_demo"), "{stderr}");
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
        return;
    }
    assert!(run.status.success(), "{stderr}");
    // `--png-frames` writes `{stem}_{index:04}.png`; the stem is the prompt, seed and steps.
    let stem = "a_red_disc_moves_to_the_right_seed0_step20";
    let frames: Vec<Vec<u8>> = (0..demo::DEMO_FRAMES)
        .map(|i| {
            let path = out.path().join(format!("{stem}_{i:04}.png"));
            image::open(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .to_rgb8()
                .into_raw()
        })
        .collect();
    let verdict = chitu::demo::judge::judge(demo::DEMO_SIZE, demo::DEMO_SIZE, &frames);
    assert_eq!(
        (verdict.colour, verdict.direction()),
        (Some(Colour::Red), Some(Motion::Right)),
        "{verdict:?}\n{stderr}"
    );
}
