//! Times one DiT forward (one block at Wan2.1-1.3B width, 1,950 tokens, 512 text tokens, random
//! weights) on one rank and under Ulysses context parallelism on in-process ranks, and prints a
//! markdown table with the time, the all-to-all traffic per rank and the speedup.
//!
//! ```text
//! cargo run --release --example bench_parallel [-- RUNS]
//! ```
//! In-process ranks on one CPU share its cores (and burn-flex's thread pool), so this measures the
//! cost of the collectives and the split, not the gain of more devices; run it on a multi-GPU
//! machine with `--features cuda` for that.

use burn::tensor::{Distribution, Tensor};
use chitu::dist::run_local;
use chitu::dit::{DitRunner, NoHook, SeqParallel, WanDitConfig, WanTransformer};
use chitu::pipeline::UlyssesGroup;
use chitu::{rank_device, DefaultBackend as B};
use std::sync::Arc;
use std::time::Instant;

type AnyError = Box<dyn std::error::Error + Send + Sync>;

const LATENT: [usize; 5] = [1, 16, 5, 30, 52];

fn config() -> WanDitConfig {
    WanDitConfig {
        num_layers: 1,
        ..WanDitConfig::wan21_t2v_1_3b()
    }
}

/// Median and minimum seconds of `runs` forwards after one warm-up, on this rank.
fn time_forward(dit: &DitRunner<B>, runs: usize, device: &burn::tensor::Device<B>) -> Result<(f64, f64), AnyError> {
    let x = Tensor::<B, 5>::random(LATENT, Distribution::Normal(0.0, 1.0), device);
    let text = Tensor::<B, 3>::random([1, 512, 4096], Distribution::Normal(0.0, 1.0), device);
    let mut times = Vec::new();
    for i in 0..=runs {
        let t0 = Instant::now();
        let out = dit.forward(x.clone(), &[500.0], text.clone(), &mut NoHook)?;
        let _: f32 = out.slice([0..1, 0..1, 0..1, 0..1, 0..1]).into_scalar();
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[0]))
}

fn main() -> Result<(), AnyError> {
    let runs: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let tokens: usize = 5 * 15 * 26;
    let dim = config().dim();
    println!("| ranks | layout | median s | min s | all-to-all MiB per rank per block | speedup |");
    println!("|---|---|---|---|---|---|");
    let dev = rank_device(0);
    let model = WanTransformer::<B>::new(config(), &dev)?;
    let (single, single_min) = time_forward(&DitRunner::local(&model), runs, &dev)?;
    println!("| 1 | one device | {single:.3} | {single_min:.3} | 0 | 1.00 |");
    for n in [2usize, 4] {
        let times = run_local(n, |comm| {
            let dev = rank_device(comm.rank());
            let model = WanTransformer::<B>::new(config(), &dev)?;
            let group: Arc<dyn SeqParallel<B>> = Arc::new(UlyssesGroup::<B>::new(comm));
            time_forward(&DitRunner::sharded(&model, group), runs, &dev)
        })?;
        let (median, min) = times
            .iter()
            .fold((0.0f64, 0.0f64), |(a, b), &(m, n)| (a.max(m), b.max(n)));
        // Per block: q, k, v there and the output back, each a (n-1)/n share of the local tokens.
        let local = tokens.div_ceil(n);
        let mib = 4.0 * (local * dim * 4) as f64 * (n - 1) as f64 / n as f64 / (1024.0 * 1024.0);
        println!(
            "| {n} | cp {n} (in-process, shared CPU) | {median:.3} | {min:.3} | {mib:.1} | {:.2} |",
            single / median
        );
    }
    Ok(())
}
