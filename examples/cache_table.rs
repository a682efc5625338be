//! FlexCache speed/quality table: for each policy, DiT block evaluations and frame PSNR against
//! the uncached run from the same seed, on the embedded demo model (trained: with a threshold
//! sweep of TeaCache and First Block Cache), the embedded tiny model (random weights) and the
//! parity model (or a model folder given with `--model-dir DIR`, using the parity request's
//! sizes).
//!
//! `cargo run --release --example cache_table [-- --model-dir DIR]`

use chitu::cache::{CacheConfig, FirstBlockCacheConfig, PabConfig, TeaCacheConfig};
use chitu::pipeline::{DiffusionBackend, DiffusionUserParams, Generator, Precision};
use chitu::{default_device, DefaultBackend as B};
use std::path::PathBuf;

fn policies() -> Vec<(String, CacheConfig)> {
    let mut v: Vec<(String, CacheConfig)> = ["teacache", "pab", "first_block_cache", "taylorseer"]
        .iter()
        .map(|n| (format!("{n} (defaults)"), CacheConfig::from_name(n).unwrap()))
        .collect();
    // Settings that still act on short runs: a smaller PAB window, the parity case's FBC threshold,
    // and TeaCache at a looser threshold.
    v.push((
        "pab warmup 1, cooldown 1".into(),
        CacheConfig::Pab(PabConfig {
            warmup: 1,
            cooldown: 1,
            ..Default::default()
        }),
    ));
    v.push((
        "first_block_cache threshold 0.2".into(),
        CacheConfig::FirstBlockCache(FirstBlockCacheConfig {
            threshold: 0.2,
            ..Default::default()
        }),
    ));
    v.push((
        "teacache threshold 0.5".into(),
        CacheConfig::TeaCache(TeaCacheConfig {
            threshold: 0.5,
            ..Default::default()
        }),
    ));
    v
}

/// Thresholds around the defaults (TeaCache 0.2 as Chitu, First Block Cache 0.05 as diffusers),
/// for a model whose steps change as a trained model's do.
fn sweep() -> Vec<(String, CacheConfig)> {
    let mut v = Vec::new();
    for threshold in [0.05, 0.1, 0.3, 0.5] {
        v.push((
            format!("teacache threshold {threshold}"),
            CacheConfig::TeaCache(TeaCacheConfig {
                threshold,
                ..Default::default()
            }),
        ));
    }
    for threshold in [0.02, 0.1, 0.2, 0.3] {
        v.push((
            format!("first_block_cache threshold {threshold}"),
            CacheConfig::FirstBlockCache(FirstBlockCacheConfig {
                threshold,
                ..Default::default()
            }),
        ));
    }
    v
}

fn table(
    title: &str,
    generator: &Generator<B>,
    params: &DiffusionUserParams,
    policies: Vec<(String, CacheConfig)>,
) -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "\n### {title}: {}x{}, {} frames, {} steps, guidance {}\n",
        params.width, params.height, params.num_frames, params.num_inference_steps, params.guidance_scale
    );
    println!(
        "| policy | full computes / calls | block evals (uncached) | fewer | frames PSNR dB | max abs latent diff |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, config) in policies {
        let p = DiffusionUserParams {
            cache: Some(config),
            ..params.clone()
        };
        let (_, c) = generator.generate_checked(p)?;
        let s = c.stats;
        println!(
            "| {name} | {} / {} | {:.1} ({}) | {:.2}x | {} | {:.2e} |",
            s.full_computes,
            s.calls,
            s.block_evals(),
            s.uncached_block_evals(),
            c.block_speedup(),
            if c.psnr_db.is_finite() {
                format!("{:.1}", c.psnr_db)
            } else {
                "identical".into()
            },
            c.max_abs_latent_diff
        );
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = default_device();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model_dir = args
        .iter()
        .position(|a| a == "--model-dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/models/wan21"));

    // Only a build with the trained demo model's files has it (none ships yet).
    match DiffusionBackend::<B>::embedded_demo_as(&device, Precision::F32) {
        Ok(demo) => {
            let mut all = policies();
            all.extend(sweep());
            table(
                "embedded demo model (trained)",
                &Generator::new(demo),
                &DiffusionUserParams::demo("a red disc moves to the right"),
                all,
            )?;
        }
        Err(e) => println!("no demo model table: {e}"),
    }

    let tiny = Generator::new(DiffusionBackend::<B>::embedded_tiny(&device)?);
    table(
        "embedded tiny model (random weights)",
        &tiny,
        &DiffusionUserParams::tiny("A cat walking on grass"),
        policies(),
    )?;

    let parity = Generator::new(DiffusionBackend::<B>::from_dir(&model_dir, &device)?);
    // The First Block Cache parity case's request; each row sets its own cache.
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity");
    let case = chitu_parity::Case::load(&fixtures, "pipeline_t2v_wan21_first_block_cache")?;
    let params = chitu_parity::pipeline::params(&case)?;
    table(&format!("{}", model_dir.display()), &parity, &params, policies())?;
    Ok(())
}
