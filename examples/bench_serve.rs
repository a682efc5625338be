//! How `chitu serve`'s worker should order jobs, measured on the embedded default: each job to
//! completion (FIFO), or the queued tasks interleaved step by step as Chitu's scheduler does.
//!
//! ```text
//! cargo run --release --example bench_serve [ROUNDS]
//! ```
//! Part 1: a short job (4 steps, 64x64, 9 frames) queued right behind a long one (40 steps,
//! 128x128, 17 frames): when each finishes. Part 2: eight short jobs queued at once: the wall
//! time, jobs per minute, and the mean latency. Both policies run in the same process,
//! alternating, `ROUNDS` times (3 by default); the tables show medians.

use chitu::pipeline::{DiffusionBackend, DiffusionTask, DiffusionUserParams, Format, Generator, Precision, Weights};
use chitu::{default_device, DefaultBackend as B};
use std::time::Instant;

fn short(seed: u64) -> DiffusionUserParams {
    DiffusionUserParams {
        num_inference_steps: 4,
        seed,
        ..DiffusionUserParams::tiny("a short one")
    }
}

fn long() -> DiffusionUserParams {
    DiffusionUserParams {
        num_inference_steps: 40,
        height: 128,
        width: 128,
        num_frames: 17,
        ..DiffusionUserParams::tiny("a long one")
    }
}

/// Seconds from the start until each job finishes, under one policy.
fn run(generator: &Generator<B>, jobs: &[DiffusionUserParams], interleave: bool) -> Vec<f64> {
    let t0 = Instant::now();
    let mut tasks: Vec<DiffusionTask<B>> = jobs
        .iter()
        .map(|p| DiffusionTask::from_user_request(p.clone()).expect("a valid request"))
        .collect();
    let mut done = vec![0.0; tasks.len()];
    let mut left: Vec<usize> = (0..tasks.len()).collect();
    while !left.is_empty() {
        // Interleaved: one step of every unfinished task per round; otherwise the oldest to its end.
        let round: Vec<usize> = match interleave {
            true => left.clone(),
            false => vec![left[0]],
        };
        for i in round {
            generator.generate_step(&mut tasks[i]).expect("the step runs");
            if tasks[i].is_finished() {
                done[i] = t0.elapsed().as_secs_f64();
                left.retain(|&j| j != i);
            }
        }
    }
    done
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = std::env::args().nth(1).map_or(Ok(3), |s| s.parse())?;
    let device = default_device();
    let backend = DiffusionBackend::<B>::embedded_tiny_as(&device, Format::new(Precision::Bf16, Weights::Float))?;
    let generator = Generator::new(backend);
    // Warm up: first calls allocate and fill caches.
    run(&generator, &[short(0)], false);

    let behind = [long(), short(1)];
    let many: Vec<DiffusionUserParams> = (0..8).map(short).collect();
    let mut part1 = [vec![], vec![], vec![], vec![]];
    let mut part2 = [vec![], vec![], vec![], vec![]];
    for round in 0..rounds {
        for interleave in match round % 2 {
            0 => [false, true],
            _ => [true, false],
        } {
            let k = interleave as usize * 2;
            let t = run(&generator, &behind, interleave);
            part1[k].push(t[1]);
            part1[k + 1].push(t[0]);
            let t = run(&generator, &many, interleave);
            part2[k].push(t.iter().cloned().fold(0.0, f64::max));
            part2[k + 1].push(t.iter().sum::<f64>() / t.len() as f64);
        }
    }
    println!("\nA short job (4 steps, 64x64x9) queued behind a long one (40 steps, 128x128x17), median of {rounds}:\n");
    println!("| policy | short job done (s) | long job done (s) |");
    println!("|---|---|---|");
    for (name, k) in [("each to completion (FIFO)", 0), ("interleaved step by step", 2)] {
        println!(
            "| {name} | {:.3} | {:.3} |",
            median(part1[k].clone()),
            median(part1[k + 1].clone())
        );
    }
    println!("\nEight short jobs queued at once, median of {rounds}:\n");
    println!("| policy | all done (s) | jobs per minute | mean latency (s) |");
    println!("|---|---|---|---|");
    for (name, k) in [("each to completion (FIFO)", 0), ("interleaved step by step", 2)] {
        let wall = median(part2[k].clone());
        println!(
            "| {name} | {wall:.3} | {:.1} | {:.3} |",
            8.0 / wall * 60.0,
            median(part2[k + 1].clone())
        );
    }
    Ok(())
}
