//! Task pool and multi-stage refinement plans on the parity models.

use burn::tensor::Tensor;
use chitu::pipeline::{DiffusionBackend, DiffusionTask, DiffusionUserParams, Generator, PlanStage, TaskPool};
use chitu::{default_device, DefaultBackend as B};
use std::path::Path;

fn generator(name: &str) -> Generator<B> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity/models")
        .join(name);
    Generator::new(DiffusionBackend::<B>::from_dir(dir, &default_device()).unwrap())
}

fn small(prompt: &str, steps: usize) -> DiffusionUserParams {
    DiffusionUserParams {
        prompt: prompt.into(),
        height: 32,
        width: 32,
        num_frames: 5,
        num_inference_steps: steps,
        max_sequence_length: 16,
        seed: 11,
        ..DiffusionUserParams::default()
    }
}

#[test]
fn a_one_stage_plan_equals_the_plain_pipeline() {
    let gen = generator("wan21");
    let params = small("A cat walking on grass", 3);
    let plain = gen
        .run(DiffusionTask::<B>::from_user_request(params.clone()).unwrap())
        .unwrap();
    let stage = PlanStage {
        model: 0,
        steps: 3,
        height: 32,
        width: 32,
        guidance_scale: params.guidance_scale,
        start_sigma: 1.0,
    };
    let planned = gen.generate_plan(&params, &[stage], None).unwrap();
    planned
        .video
        .into_data()
        .assert_eq(&plain.video().cloned().unwrap().into_data(), true);
}

#[test]
fn a_two_stage_plan_refines_at_twice_the_resolution_with_the_second_expert() {
    let gen = generator("wan22");
    let params = small("A cat walking on grass", 4);
    let plan = [
        PlanStage {
            model: 0,
            steps: 3,
            height: 16,
            width: 16,
            guidance_scale: 4.0,
            start_sigma: 1.0,
        },
        PlanStage {
            model: 1,
            steps: 4,
            height: 32,
            width: 32,
            guidance_scale: 3.0,
            start_sigma: 0.6,
        },
    ];
    let out = gen.generate_plan(&params, &plan, None).unwrap();
    assert_eq!(out.stage_latents[0].dims(), [1, 16, 2, 2, 2]);
    assert_eq!(out.stage_latents[1].dims(), [1, 16, 2, 4, 4]);
    assert_eq!(out.video.dims(), [1, 3, 5, 32, 32]);
    let finite: Vec<f32> = out.video.into_data().to_vec().unwrap();
    assert!(finite.iter().all(|v| v.is_finite()));

    let bad = [PlanStage {
        model: 5,
        ..plan[0].clone()
    }];
    assert!(gen.generate_plan(&params, &bad, None).is_err());
    // 32 -> 48 pixels is not an integer upscale of the latent (4 -> 6).
    let odd = [
        PlanStage {
            height: 32,
            ..plan[0].clone()
        },
        PlanStage {
            height: 48,
            ..plan[1].clone()
        },
    ];
    assert!(gen.generate_plan(&params, &odd, None).is_err());
}

#[test]
fn the_pool_runs_fifo_and_isolates_cancelled_and_failing_tasks() {
    let gen = generator("wan21");
    let dev = default_device();
    let mut pool = TaskPool::<B>::new();
    let a = pool.add(DiffusionTask::from_user_request(small("first", 2)).unwrap());
    let b = pool.add(DiffusionTask::from_user_request(small("second", 2)).unwrap());
    let nan = Tensor::<B, 5>::full([1, 16, 2, 4, 4], f32::NAN, &dev);
    let c = pool.add(
        DiffusionTask::from_user_request(small("broken", 2))
            .unwrap()
            .with_initial_latents(nan),
    );
    let d = pool.add(DiffusionTask::from_user_request(small("last", 2)).unwrap());
    assert!(pool.cancel(b));
    assert!(!pool.cancel(b));
    let results = pool.run_until_empty(&gen);
    assert!(pool.is_empty());
    let ids: Vec<u64> = results.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, vec![a, c, d]);
    assert!(results[0].1.as_ref().unwrap().is_finished());
    assert!(results[1].1.is_err());
    assert!(results[2].1.as_ref().unwrap().is_finished());
}
