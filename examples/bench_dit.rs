//! Times one Wan DiT block at Wan2.1-1.3B width (dim 1536, 12 heads, ffn 8960) on 1,950 tokens
//! (latent 16x5x30x52) with 512 text tokens, random weights, and prints a markdown table: both
//! attention kernels at f32, and the default kernel with the weights held in bf16 and f16.
//!
//! ```text
//! cargo run --release --example bench_dit [-- RUNS]
//! ```

use burn::tensor::{Distribution, Tensor};
use chitu::dit::{AttentionKind, NoHook, WanDitConfig, WanTransformer, KEEP_F32};
use chitu::store::{cast_module, Cast, Precision};
use chitu::{default_device, DefaultBackend as B};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let dev = default_device();
    let config = WanDitConfig {
        num_layers: 1,
        ..WanDitConfig::wan21_t2v_1_3b()
    };
    let model = WanTransformer::<B>::new(config, &dev)?;
    let x = Tensor::<B, 5>::random([1, 16, 5, 30, 52], Distribution::Normal(0.0, 1.0), &dev);
    let text = Tensor::<B, 3>::random([1, 512, 4096], Distribution::Normal(0.0, 1.0), &dev);
    let e = model.embed(x, &[500.0], text)?;
    println!("| workload | kernel | weights | tokens | median s | min s |");
    println!("|---|---|---|---|---|---|");
    let runs_of = [
        (AttentionKind::Fused, Precision::F32),
        (AttentionKind::Reference, Precision::F32),
        (AttentionKind::Reference, Precision::Bf16),
        (AttentionKind::Reference, Precision::F16),
    ];
    for (kind, precision) in runs_of {
        let cast = Cast {
            precision,
            keep_f32: KEEP_F32,
        };
        let model = cast_module(model.clone(), cast);
        let mut times = Vec::new();
        for i in 0..=runs {
            let t0 = Instant::now();
            let out = model.forward_blocks(e.tokens.clone(), &e.inputs, 0..1, &kind, &mut NoHook);
            // Reading one value forces the computation on lazy backends.
            let _: f32 = out.slice([0..1, 0..1, 0..1]).into_scalar();
            if i > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        println!(
            "| one block, dim 1536, ffn 8960 | {kind:?} | {precision} | 1950 | {:.3} | {:.3} |",
            times[times.len() / 2],
            times[0]
        );
    }
    Ok(())
}
