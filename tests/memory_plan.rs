//! `--low-mem auto`: the plan chosen for a budget, the refusal when none fits, and the retry of a
//! stage that runs out of device memory.

use chitu::pipeline::estimate::largest;
use chitu::pipeline::{
    estimate_stages, plan_memory, BudgetSource, DiffusionTask, DiffusionUserParams, Format, GenError, Generator,
    LoadOptions, MemoryLevel, ModelSizes, PlanLimits, Precision, Stage, Video, Weights,
};
use chitu::{default_device, DefaultBackend as B};
use std::path::{Path, PathBuf};

use crate::common;

fn model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity/models")
        .join(name)
}

fn params() -> DiffusionUserParams {
    DiffusionUserParams {
        height: 32,
        width: 32,
        num_frames: 5,
        num_inference_steps: 3,
        max_sequence_length: 16,
        ..DiffusionUserParams::tiny("a fox in the snow")
    }
}

fn limits(budget: Option<u64>, weights: Option<Weights>) -> PlanLimits {
    PlanLimits {
        precision: Precision::Bf16,
        vae_dtype: Precision::F32,
        weights,
        min_level: 0,
        budget,
        source: BudgetSource::Given,
        release_after_use: true,
    }
}

/// The tiny two-expert folder's sizes with its DiTs' and text encoder's weights scaled to a real
/// model's (the fixture's weights are kilobytes, and the tiny VAE's decode would set every peak).
fn sizes(format: Format) -> Result<ModelSizes, GenError> {
    let mut s = ModelSizes::of_folder::<B>(&model("wan22"), format, Precision::F32, &default_device())?;
    const SCALE: u64 = 100_000;
    s.text_weights *= SCALE;
    s.dit_weights.iter_mut().for_each(|w| *w *= SCALE);
    Ok(s)
}

/// The predicted peak of a format at a level, as the plan computes it.
fn peak(format: Format, level: u8) -> u64 {
    largest(&estimate_stages(
        &sizes(format).unwrap(),
        &params(),
        MemoryLevel(level),
        true,
    ))
    .bytes
}

#[test]
fn the_plan_is_the_least_costly_that_fits() {
    let (float, int8) = (
        Format::from(Precision::Bf16),
        Format::new(Precision::Bf16, Weights::Int8),
    );
    let p = params();
    // Room for anything: the float weights at level 0.
    let plan = plan_memory(sizes, &p, limits(Some(u64::MAX), None)).unwrap();
    assert_eq!((plan.format, plan.level), (float, MemoryLevel(0)));
    // Just too little for every float plan: the first int8 one that fits.
    let best_float = (0..=3).map(|l| peak(float, l)).min().unwrap();
    let plan = plan_memory(sizes, &p, limits(Some(best_float - 1), None)).unwrap();
    assert_eq!(plan.format, int8);
    assert!(plan.peak().bytes < best_float);
    // With the format fixed by the user, the plan moves only the level, and its table says so.
    let level3 = peak(float, 3);
    let plan = plan_memory(sizes, &p, limits(Some(level3), Some(Weights::Float))).unwrap();
    assert_eq!(plan.format, float);
    assert_eq!(plan.peak().bytes, level3);
    let table = plan.table(None);
    assert!(table.contains("bf16 weights") && table.contains("denoising"), "{table}");
    // No budget known: the least costly plan.
    let plan = plan_memory(sizes, &p, limits(None, None)).unwrap();
    assert_eq!((plan.format, plan.level), (float, MemoryLevel(0)));
}

#[test]
fn no_plan_fitting_is_refused_saying_what_would() {
    let p = params();
    let e = plan_memory(sizes, &p, limits(Some(1_000_000), None))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("needs about") && e.contains("GB of memory for this request"),
        "{e}"
    );
    // Float weights forced while int8 would fit: the refusal says so.
    let int8_peak = peak(Format::new(Precision::Bf16, Weights::Int8), 3);
    let float_peak = peak(Format::from(Precision::Bf16), 3);
    assert!(int8_peak < float_peak);
    let e = plan_memory(sizes, &p, limits(Some(int8_peak), Some(Weights::Float)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--weights int8 would fit"), "{e}");
}

#[test]
fn the_cli_plans_before_loading_and_refuses_a_budget_nothing_fits() {
    let out = tempfile::tempdir().unwrap();
    let dir = model("wan21");
    let small = [
        "--prompt", "x", "--height", "32", "--width", "32", "--frames", "5", "--steps", "2",
    ];
    let with = |extra: &[&str]| {
        let mut args: Vec<&str> = vec!["--model-dir", dir.to_str().unwrap()];
        args.extend(small);
        args.extend(extra);
        common::generate(&args, &out.path().join("out"))
    };
    let o = with(&["--memory-budget", "0.01"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("needs about") && err.contains("budget is 0.01 GB"),
        "{err}"
    );
    assert!(!out.path().join("out").exists() || std::fs::read_dir(out.path().join("out")).unwrap().count() == 0);
    // A budget that fits: the plan table before the run, the measured peaks after it.
    let o = with(&["--memory-budget", "20"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("memory plan for a budget of 20.00 GB"), "{err}");
    assert!(err.contains("| predicted peak | measured peak |"), "{err}");
    for (bad, needles) in [
        ("--memory-budget=0", ["--memory-budget", "positive"]),
        ("--low-mem=fast", ["--low-mem", "auto"]),
        ("--weights=int4", ["--weights", "int8"]),
    ] {
        let o = with(&[bad]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(needles.iter().all(|n| err.contains(n)), "{bad}: {err}");
    }
}

/// A stage that runs out of device memory (simulated: this CPU's allocations do not fail) is
/// retried once at the next level, from the last completed step, and the run gives the same
/// video as one that never failed; the sidecar records the retry.
#[test]
fn a_stage_out_of_memory_is_retried_once_at_the_next_level() {
    let dev = default_device();
    let gen = Generator::<B>::from_dir(model("wan21"), &dev, LoadOptions::default())
        .unwrap()
        .with_oom_retry(true);
    let plain = gen.run(DiffusionTask::from_user_request(params()).unwrap()).unwrap();

    let mut task = DiffusionTask::<B>::from_user_request(params()).unwrap();
    gen.generate_step(&mut task).unwrap();
    gen.generate_step(&mut task).unwrap();
    gen.simulate_oom(Stage::Denoise, 1);
    gen.generate_step(&mut task).unwrap();
    assert_eq!(task.step(), 2);
    let task = gen.run(task).unwrap();
    let retries = task.oom_retries().to_vec();
    assert_eq!(retries.len(), 1, "{retries:?}");
    assert_eq!(retries[0].stage, "denoise step 1");
    assert_eq!((retries[0].from_level, retries[0].to_level), (0, 2));
    assert_eq!(task.params().low_mem, 2);
    let (a, b) = (plain.video().unwrap(), task.video().unwrap());
    a.to_data().assert_eq(&b.to_data(), true);
    let json = Video::from_task(task, &gen.backend).unwrap().metadata(&[]);
    assert_eq!(json["oom_retries"][0]["to_level"], 2, "{json}");

    // The decode retries as a tiled decode.
    gen.simulate_oom(Stage::VaeDecode, 1);
    let task = gen.run(DiffusionTask::from_user_request(params()).unwrap()).unwrap();
    assert_eq!(task.oom_retries()[0].to_level, 1);
}

#[test]
fn a_second_failure_or_no_retry_is_the_typed_error() {
    let dev = default_device();
    let gen = Generator::<B>::from_dir(model("wan21"), &dev, LoadOptions::default()).unwrap();
    gen.simulate_oom(Stage::TextEncode, 1);
    let e = gen.run(DiffusionTask::from_user_request(params()).unwrap()).err();
    assert!(matches!(e, Some(GenError::OutOfMemory { .. })), "{e:?}");

    let gen = gen.with_oom_retry(true);
    gen.simulate_oom(Stage::VaeDecode, 2);
    let e = gen.run(DiffusionTask::from_user_request(params()).unwrap()).err();
    match e {
        Some(GenError::OutOfMemory { stage, .. }) => assert_eq!(stage, "VAE decode"),
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
}
