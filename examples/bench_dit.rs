//! Times one Wan DiT block at Wan2.1-1.3B width (dim 1536, 12 heads, ffn 8960) on 1,950 tokens
//! (latent 16x5x30x52) with 512 text tokens, random weights, and prints a markdown table: both
//! attention kernels at f32, and the default kernel with the weights held in bf16, f16 and int8
//! (the rest bf16; blocks of 64, and of 32 and 128 to compare), each with its output's rel-L2 from the f32 block's (the weights are drawn once,
//! std 0.02 as `make_fullsize.py` writes them).
//!
//! ```text
//! cargo run --release --example bench_dit [-- RUNS]
//! ```

use burn::module::Module;
use burn::tensor::{Distribution, Tensor};
use chitu::dit::{AttentionKind, NoHook, WanDitConfig, WanTransformer, KEEP_F32};
use chitu::store::{cast_module, quantize_int8, Cast, Format, Precision, Weights};
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
    // Drawn now, once: a lazy parameter's clones would each draw their own.
    struct Draw;
    impl burn::module::ModuleVisitor<B> for Draw {
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<B, D>>) {
            let _ = p.val();
        }
    }
    struct Std002;
    impl burn::module::ModuleMapper<B> for Std002 {
        fn map_float<const D: usize>(
            &mut self,
            p: burn::module::Param<Tensor<B, D>>,
        ) -> burn::module::Param<Tensor<B, D>> {
            p.map(|t| match D {
                1 => t,
                _ => Tensor::random(t.shape(), Distribution::Normal(0.0, 0.02), &t.device()),
            })
        }
    }
    let model = model.map(&mut Std002);
    model.visit(&mut Draw);
    let x = Tensor::<B, 5>::random([1, 16, 5, 30, 52], Distribution::Normal(0.0, 1.0), &dev);
    let text = Tensor::<B, 3>::random([1, 512, 4096], Distribution::Normal(0.0, 1.0), &dev);
    let e = model.embed(x, &[500.0], text)?;
    println!(
        "Machine: {}; GEMM: {}\n",
        chitu_host::Machine::detect(),
        chitu_host::sgemm::Sgemm::get().kind().name()
    );
    println!("| workload | kernel | weights | tokens | median s | min s | rel_l2 vs f32 |");
    println!("|---|---|---|---|---|---|---|");
    let mut reference: Option<Tensor<B, 3>> = None;
    let runs_of = [
        (AttentionKind::Fused, Format::F32),
        (AttentionKind::Reference, Format::F32),
        (AttentionKind::Reference, Precision::Bf16.into()),
        (AttentionKind::Reference, Precision::F16.into()),
        (AttentionKind::Reference, Format::new(Precision::Bf16, Weights::Int8)),
    ];
    // The int8 block sizes the scheme was chosen from: bf16 matrices requantized at each.
    struct Int8At(usize);
    impl burn::module::ModuleMapper<B> for Int8At {
        fn map_float<const D: usize>(
            &mut self,
            p: burn::module::Param<Tensor<B, D>>,
        ) -> burn::module::Param<Tensor<B, D>> {
            p.map(|t| match (D, quantize_int8(&t.to_data(), self.0)) {
                (2, Some(q)) => Tensor::from_data(q, &t.device()),
                _ => t,
            })
        }
    }
    let variants = runs_of
        .into_iter()
        .map(|(kind, format)| (kind, format, None))
        .chain([32, 128].map(|b| (AttentionKind::Reference, Format::from(Precision::Bf16), Some(b))));
    for (kind, format, block) in variants {
        let cast = Cast::new(format, KEEP_F32);
        let model = cast_module(model.clone(), cast);
        let model = match block {
            Some(b) => model.map(&mut Int8At(b)),
            None => model,
        };
        let name = match block {
            Some(b) => format!("int8 (blocks of {b})+bf16"),
            None => format.name(),
        };
        let mut times = Vec::new();
        let mut last = None;
        for i in 0..=runs {
            let t0 = Instant::now();
            let out = model.forward_blocks(e.tokens.clone(), &e.inputs, 0..1, &kind, &mut NoHook);
            last = Some(out.clone());
            // Reading one value forces the computation on lazy backends.
            let _: f32 = out.slice([0..1, 0..1, 0..1]).into_scalar();
            if i > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        let out = last.ok_or("no run")?;
        // Of the block's update (its output less its input), which is what the weights make.
        let update = out - e.tokens.clone();
        let reference = reference.get_or_insert_with(|| update.clone()).clone();
        let rel: f32 = ((update - reference.clone()).powf_scalar(2.0).sum().sqrt()
            / reference.powf_scalar(2.0).sum().sqrt())
        .into_scalar();
        println!(
            "| one block, dim 1536, ffn 8960 | {kind:?} | {name} | 1950 | {:.3} | {:.3} | {rel:.2e} |",
            times[times.len() / 2],
            times[0]
        );
    }
    Ok(())
}
