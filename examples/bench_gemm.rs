//! GFLOP/s of each f32 GEMM kernel this machine has, at the Wan2.1-1.3B DiT's real shapes
//! (1,950 tokens at 416x240x17, dim 1536, FFN 8960, 12 heads of 128, 512 text tokens), and one
//! markdown table with the machine above it.
//!
//! ```text
//! cargo run --release --example bench_gemm [-- RUNS]
//! ```
//!
//! Kernels: the `gemm` crate (burn-flex's, with AVX-512 micro-kernels where the CPU has them,
//! AVX2+FMA elsewhere), and OpenBLAS and BLIS where Debian's packages are installed
//! (`libopenblas0-pthread`, `libblis4-pthread`; opened at run time, see `chitu_host::sgemm`).
//! The attention rows run their 12 heads either one after another, each on all threads
//! ("heads in turn"), or side by side, one thread each ("heads in parallel": the crate only).
//! `bench/torch_side.py gemm THREADS RUNS` prints PyTorch's row for the same shapes.
//! Threads follow `RAYON_NUM_THREADS`.

use chitu_host::sgemm::{row_major, GemmKind, Mat, Sgemm};
use chitu_host::Machine;
use rayon::prelude::*;
use std::time::Instant;

/// One way of running a shape: it fills the output it is given.
type Timed<'a> = Box<dyn FnMut(&mut [f32]) + 'a>;

/// One GEMM shape: `batch` products of `[m, k] @ [k, n]`, rhs given transposed when `rhs_t`.
struct Shape {
    name: &'static str,
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    rhs_t: bool,
}

const SHAPES: [Shape; 7] = [
    Shape {
        name: "q/k/v/out projection",
        batch: 1,
        m: 1950,
        k: 1536,
        n: 1536,
        rhs_t: false,
    },
    Shape {
        name: "FFN up",
        batch: 1,
        m: 1950,
        k: 1536,
        n: 8960,
        rhs_t: false,
    },
    Shape {
        name: "FFN down",
        batch: 1,
        m: 1950,
        k: 8960,
        n: 1536,
        rhs_t: false,
    },
    Shape {
        name: "text k/v projection",
        batch: 1,
        m: 512,
        k: 1536,
        n: 1536,
        rhs_t: false,
    },
    Shape {
        name: "self-attn scores q kT (12 heads)",
        batch: 12,
        m: 1950,
        k: 128,
        n: 1950,
        rhs_t: true,
    },
    Shape {
        name: "self-attn p v (12 heads)",
        batch: 12,
        m: 1950,
        k: 1950,
        n: 128,
        rhs_t: false,
    },
    Shape {
        name: "cross-attn scores q kT (12 heads)",
        batch: 12,
        m: 1950,
        k: 128,
        n: 512,
        rhs_t: true,
    },
];

fn fill(n: usize, seed: u32) -> Vec<f32> {
    // A cheap deterministic spread in [-1, 1]; the values do not change the timing.
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1u32 << 23) as f32 - 1.0)
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let machine = Machine::detect();
    println!("Machine: {machine}");
    let mut kernels = vec![("gemm crate", Sgemm::crate_kernel())];
    for (name, kind) in [("OpenBLAS", GemmKind::OpenBlas), ("BLIS", GemmKind::Blis)] {
        match Sgemm::open(kind) {
            Some(k) => kernels.push((name, k)),
            None => println!("{name}: not installed here (skipped)"),
        }
    }
    let isa = machine.isa();
    println!();
    println!("| shape | m x k x n | kernel | mode | median ms | GFLOP/s |");
    println!("|---|---|---|---|---|---|");
    for s in SHAPES {
        let a = fill(s.batch * s.m * s.k, 1);
        let b = fill(s.batch * s.k * s.n, 2);
        let mut c = vec![0f32; s.batch * s.m * s.n];
        let flops = 2.0 * (s.batch * s.m * s.k * s.n) as f64;
        let rhs = |i: usize| {
            let ptr = b[i * s.k * s.n..].as_ptr();
            if s.rhs_t {
                Mat {
                    ptr,
                    rs: 1,
                    cs: s.k as isize,
                }
            } else {
                row_major(ptr, s.n)
            }
        };
        let mut modes: Vec<(&str, &str, Timed)> = Vec::new();
        for (name, kernel) in &kernels {
            let kernel: &Sgemm = kernel;
            let a = &a;
            let mode = if s.batch > 1 { "heads in turn" } else { "all threads" };
            modes.push((
                name,
                mode,
                Box::new(move |c: &mut [f32]| {
                    for i in 0..s.batch {
                        // SAFETY: each operand holds the [m, k], [k, n] and [m, n] it is given.
                        unsafe {
                            kernel.run(
                                s.m,
                                s.n,
                                s.k,
                                row_major(c[i * s.m * s.n..].as_mut_ptr(), s.n),
                                row_major(a[i * s.m * s.k..].as_ptr(), s.k),
                                rhs(i),
                                false,
                                true,
                            )
                        }
                    }
                }),
            ));
        }
        if s.batch > 1 {
            let a = &a;
            modes.push((
                "gemm crate",
                "heads in parallel",
                Box::new(move |c: &mut [f32]| {
                    c.par_chunks_mut(s.m * s.n).enumerate().for_each(|(i, c)| unsafe {
                        Sgemm::crate_kernel().run(
                            s.m,
                            s.n,
                            s.k,
                            row_major(c.as_mut_ptr(), s.n),
                            row_major(a[i * s.m * s.k..].as_ptr(), s.k),
                            rhs(i),
                            false,
                            false,
                        )
                    });
                }),
            ));
        }
        for (kernel, mode, mut run) in modes {
            run(&mut c); // warm-up
            let times: Vec<f64> = (0..runs)
                .map(|_| {
                    let t = Instant::now();
                    run(&mut c);
                    t.elapsed().as_secs_f64()
                })
                .collect();
            let t = median(times);
            let kernel = match kernel {
                "gemm crate" => format!("gemm crate ({isa})"),
                k => k.to_string(),
            };
            println!(
                "| {} | {}{} x {} x {} | {kernel} | {mode} | {:.1} | {:.1} |",
                s.name,
                if s.batch > 1 {
                    format!("{} x ", s.batch)
                } else {
                    String::new()
                },
                s.m,
                s.k,
                s.n,
                t * 1e3,
                flops / t / 1e9
            );
        }
    }
    Ok(())
}
