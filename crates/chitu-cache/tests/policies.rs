//! Policies on a small random DiT: what they compute, what they reuse, and that the neutral
//! settings change nothing.

use burn::tensor::{backend::Backend, Distribution, Tensor, TensorData};
use burn_flex::Flex;
use chitu_cache::{
    build, pab_computes, Branch, CacheConfig, CachePolicy, DitCall, DitInput, FirstBlockCacheConfig, PabConfig,
    TaylorSeerConfig, TeaCacheConfig,
};
use chitu_dit::{BlockPart, DitRunner, WanDitConfig, WanTransformer};

type B = Flex;

const STEPS: usize = 8;

fn model() -> WanTransformer<B> {
    let device = Default::default();
    B::seed(&device, 7);
    let config = WanDitConfig {
        num_heads: 2,
        head_dim: 8,
        text_dim: 12,
        ffn_dim: 24,
        num_layers: 3,
        ..WanDitConfig::wan21_t2v_1_3b()
    };
    WanTransformer::new(config, &device).unwrap()
}

/// A small denoising trajectory: latents and timesteps per step, and the two text contexts.
struct Run {
    latents: Vec<Tensor<B, 5>>,
    timesteps: Vec<f64>,
    cond: Tensor<B, 3>,
    uncond: Tensor<B, 3>,
}

fn run_inputs() -> Run {
    let device = Default::default();
    B::seed(&device, 11);
    let x0 = Tensor::<B, 5>::random([1, 16, 2, 4, 4], Distribution::Normal(0.0, 1.0), &device);
    let noise = Tensor::<B, 5>::random([1, 16, 2, 4, 4], Distribution::Normal(0.0, 1.0), &device);
    let sigmas: Vec<f64> = (0..STEPS).map(|i| 1.0 - i as f64 / STEPS as f64).collect();
    Run {
        latents: sigmas
            .iter()
            .map(|&s| noise.clone().mul_scalar(s as f32) + x0.clone().mul_scalar((1.0 - s) as f32))
            .collect(),
        timesteps: sigmas.iter().map(|s| s * 1000.0).collect(),
        cond: Tensor::random([1, 6, 12], Distribution::Normal(0.0, 1.0), &device),
        uncond: Tensor::random([1, 6, 12], Distribution::Normal(0.0, 1.0), &device),
    }
}

fn call(step: usize, branch: Branch) -> DitCall {
    DitCall {
        step,
        num_steps: STEPS,
        branch,
        expert: 0,
    }
}

/// Runs every step for both branches; returns the outputs in call order.
fn drive(policy: &mut dyn CachePolicy<B>, model: &WanTransformer<B>, run: &Run) -> Vec<TensorData> {
    let mut outs = Vec::new();
    for step in 0..STEPS {
        for (branch, ctx) in [(Branch::Cond, &run.cond), (Branch::Uncond, &run.uncond)] {
            let out = policy
                .forward(
                    &DitRunner::local(model),
                    call(step, branch),
                    DitInput::new(run.latents[step].clone(), run.timesteps[step], ctx.clone()),
                )
                .unwrap();
            outs.push(out.into_data());
        }
    }
    outs
}

fn uncached(model: &WanTransformer<B>, run: &Run) -> Vec<TensorData> {
    let mut outs = Vec::new();
    for step in 0..STEPS {
        for ctx in [&run.cond, &run.uncond] {
            let out = model
                .forward(run.latents[step].clone(), &[run.timesteps[step]], ctx.clone())
                .unwrap();
            outs.push(out.into_data());
        }
    }
    outs
}

#[test]
fn neutral_settings_are_identical_to_no_cache() {
    let model = model();
    let run = run_inputs();
    let reference = uncached(&model, &run);
    for config in CacheConfig::neutral() {
        let mut policy = build::<B>(&config).unwrap();
        let outs = drive(policy.as_mut(), &model, &run);
        assert_eq!(outs, reference, "{}", config.name());
        let stats = policy.stats();
        assert_eq!(stats.calls, 2 * STEPS, "{}", config.name());
        assert_eq!(stats.full_computes, 2 * STEPS, "{}", config.name());
        assert_eq!(stats.block_evals(), (2 * STEPS * 3) as f64, "{}", config.name());
    }
}

#[test]
fn a_huge_threshold_reuses_everything_outside_the_window() {
    let model = model();
    let run = run_inputs();
    let reference = uncached(&model, &run);

    // TeaCache: per branch, step 0 (warmup) and step 7 (cooldown) compute; all else is reused.
    let tea = CacheConfig::TeaCache(TeaCacheConfig {
        threshold: 1e9,
        ..Default::default()
    });
    let mut policy = build::<B>(&tea).unwrap();
    let outs = drive(policy.as_mut(), &model, &run);
    let stats = policy.stats();
    assert_eq!((stats.calls, stats.full_computes), (16, 4));
    assert_eq!(stats.reused_blocks, 12 * 3);
    assert_eq!(outs[..2], reference[..2]);
    assert_ne!(outs[2], reference[2]);

    // First Block Cache without a window: only each branch's first call runs every block.
    let fbc = CacheConfig::FirstBlockCache(FirstBlockCacheConfig {
        threshold: 1e9,
        ..Default::default()
    });
    let mut policy = build::<B>(&fbc).unwrap();
    drive(policy.as_mut(), &model, &run);
    let stats = policy.stats();
    assert_eq!((stats.calls, stats.full_computes), (16, 2));
    assert_eq!(stats.reused_blocks, 14 * 2);
    assert!((stats.block_speedup() - 48.0 / 20.0).abs() < 1e-12);

    policy.reset();
    assert_eq!(policy.stats(), Default::default());
}

#[test]
fn state_is_kept_per_branch_and_per_expert() {
    let model = model();
    let run = run_inputs();
    let fbc = CacheConfig::FirstBlockCache(FirstBlockCacheConfig {
        threshold: 1e9,
        ..Default::default()
    });
    let mut policy = build::<B>(&fbc).unwrap();
    for step in 0..2 {
        for expert in [0, 1] {
            for branch in [Branch::Cond, Branch::Uncond] {
                let c = DitCall {
                    expert,
                    ..call(step, branch)
                };
                policy
                    .forward(
                        &DitRunner::local(&model),
                        c,
                        DitInput::new(run.latents[step].clone(), run.timesteps[step], run.cond.clone()),
                    )
                    .unwrap();
            }
        }
    }
    // Each of the four contexts computes its first call and reuses its second.
    assert_eq!(policy.stats().full_computes, 4);
    assert_eq!(policy.stats().calls, 8);
}

#[test]
fn pab_reuses_exactly_its_scheduled_attention_outputs() {
    let model = model();
    let run = run_inputs();
    let config = PabConfig {
        warmup: 1,
        cooldown: 1,
        skip_self_range: 2,
        skip_cross_range: 3,
    };
    let mut policy = build::<B>(&CacheConfig::Pab(config.clone())).unwrap();
    let outs = drive(policy.as_mut(), &model, &run);
    // Steps 1..7 are active: self-attention computes at 1, 3, 5 (reuses 2, 4, 6); cross-attention
    // computes at 1, 4 (reuses 2, 3, 5, 6). Three blocks, two branches.
    assert_eq!(policy.stats().reused_parts, (3 + 4) * 3 * 2);
    // Nothing is reused at 0 and 7 (window) and 1 (both kinds recompute).
    assert_eq!(policy.stats().full_computes, 3 * 2);
    let reused: usize = (0..STEPS)
        .map(|s| {
            [BlockPart::SelfAttn, BlockPart::CrossAttn, BlockPart::Ffn]
                .iter()
                .filter(|&&p| !pab_computes(&config, p, s, STEPS))
                .count()
        })
        .sum();
    assert_eq!(reused, 7);
    let reference = uncached(&model, &run);
    assert_eq!(outs[..4], reference[..4]);
    assert_ne!(outs[4], reference[4]);
}

#[test]
fn taylorseer_forecasts_between_computes() {
    let model = model();
    let run = run_inputs();
    let config = TaylorSeerConfig {
        cache_interval: 3,
        max_order: 1,
        warmup: 2,
        cooldown: 0,
    };
    let mut policy = build::<B>(&CacheConfig::TaylorSeer(config)).unwrap();
    let outs = drive(policy.as_mut(), &model, &run);
    // Computes at 0, 1 (warmup), 3, 6; forecasts 2, 4, 5, 7.
    let stats = policy.stats();
    assert_eq!(stats.full_computes, 4 * 2);
    assert_eq!(stats.reused_parts, 4 * 2 * 3 * 3);
    let reference = uncached(&model, &run);
    assert_eq!(outs[..4], reference[..4]);
    let rel = |a: &TensorData, b: &TensorData| {
        let (a, b) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
        let num: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
        (num / b.iter().map(|y| y * y).sum::<f32>()).sqrt()
    };
    // A forecast is not the computed value, but it is close to it.
    let e = rel(&outs[4], &reference[4]);
    assert!(e > 0.0 && e < 0.5, "forecast error {e}");
}

#[test]
fn teacache_picks_coefficients_by_model_width() {
    let tea = TeaCacheConfig::default();
    assert_eq!(tea.coefficients_for(&WanDitConfig::wan21_t2v_1_3b())[0], -5.21862437e4);
    assert_eq!(tea.coefficients_for(&WanDitConfig::wan21_t2v_14b())[0], -3.03318725e5);
    let default_mode = TeaCacheConfig {
        mode: chitu_cache::TeaCacheMode::Default,
        ..Default::default()
    };
    assert_eq!(
        default_mode.coefficients_for(&WanDitConfig::wan21_t2v_1_3b())[0],
        2.39676752e3
    );
    assert_eq!(
        default_mode.coefficients_for(&WanDitConfig::wan21_t2v_14b())[0],
        -5784.54975374
    );
    // No fit for other widths: the raw distance.
    assert_eq!(tea.coefficients_for(&model().config), vec![1.0, 0.0]);
    let custom = TeaCacheConfig {
        coefficients: Some(vec![2.0, 1.0]),
        ..Default::default()
    };
    assert_eq!(custom.coefficients_for(&WanDitConfig::wan21_t2v_14b()), vec![2.0, 1.0]);
}
