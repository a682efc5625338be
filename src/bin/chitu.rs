//! `chitu generate`: text to video with a Wan model folder, or with the embedded tiny model.

use chitu::cli::{hint, CliError, JobArgs, LowMem, Request};
use chitu::dist::{run_local_with, Communicator, Layout, Mesh};
use chitu::pipeline::{CacheCheck, DiffusionTask, DiffusionUserParams, GenError, Generator, MemoryPlan, Stage, Video};
use chitu::{default_device, rank_device, DefaultBackend as B};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "chitu", version, about = "Wan text-to-video inference in Rust")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once at start: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Generate a video from a prompt.
    Generate(GenerateArgs),
    /// Serve a job API and a web page: POST /v1/videos, progress over SSE, files when done.
    #[cfg(feature = "serve")]
    Serve(chitu::serve::ServeArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[command(flatten)]
    job: JobArgs,
    /// Also run without the cache from the same seed and report PSNR, latent difference and speedup.
    #[arg(long, requires = "cache")]
    cache_check: bool,
    /// 2 runs the two guidance branches on two ranks (ranks i and i + W/2 form a pair).
    #[arg(long)]
    cfg_parallel: Option<usize>,
    /// Ranks sharing one sequence (Ulysses context parallelism).
    #[arg(long)]
    cp: Option<usize>,
    /// Seconds a rank waits for a peer before failing the run.
    #[arg(long, default_value_t = 600)]
    rank_timeout: u64,
    /// Move collectives over NCCL between GPUs (builds with `--features nccl`).
    #[arg(long)]
    nccl: bool,
}

type AnyError = Box<dyn std::error::Error + Send + Sync>;

/// Runs one rank per device: under `mpirun` this process is one rank of the MPI world;
/// otherwise `--cfg-parallel x --cp` ranks run as threads of this process.
fn run(args: GenerateArgs) -> Result<(), AnyError> {
    // Before any work: a folder that cannot take the outputs fails now, not after the run.
    args.job.output.prepare()?;
    let timeout = std::time::Duration::from_secs(args.rank_timeout);
    #[cfg(feature = "mpi")]
    if chitu::dist::MpiComm::launched() {
        let world = Arc::new(chitu::dist::MpiComm::init(timeout)?);
        let layout = Layout::infer(world.world_size(), args.cfg_parallel, args.cp);
        let result = layout
            .map_err(AnyError::from)
            .and_then(|layout| run_rank(&args, Some((world.clone(), layout))));
        if let Err(e) = result {
            eprintln!("error on rank {}: {e}", world.rank());
            // The other processes must not wait for this one.
            world.abort(1);
        }
        return Ok(());
    }
    let layout = Layout::new(args.cfg_parallel.unwrap_or(1), args.cp.unwrap_or(1))?;
    if layout.world() == 1 {
        return run_rank(&args, None);
    }
    eprintln!(
        "running {} in-process ranks (cfg {} x cp {})",
        layout.world(),
        layout.cfg,
        layout.cp
    );
    run_local_with(layout.world(), timeout, |world| run_rank(&args, Some((world, layout))))?;
    Ok(())
}

/// The device index of a rank on its node: the launcher's local rank on multi-node jobs, else the
/// world rank (in-process ranks all live on one node).
fn local_index(world_rank: usize) -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(world_rank)
}

/// The world this rank's collectives use: the launcher's, or NCCL between the GPUs.
fn collective_world(
    args: &GenerateArgs,
    world: Arc<dyn Communicator>,
    device_index: usize,
) -> Result<Arc<dyn Communicator>, AnyError> {
    if !args.nccl {
        return Ok(world);
    }
    #[cfg(feature = "nccl")]
    {
        Ok(Arc::new(chitu::dist::NcclComm::new(world.as_ref(), device_index)?))
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = (world, device_index);
        Err("--nccl needs a build with `--features nccl`".into())
    }
}

/// One rank's whole run: load once, then for each request build it, generate, and (on the output
/// rank) write. Under `--prompts-file` a failed request is reported and the next one runs.
fn run_rank(args: &GenerateArgs, parallel: Option<(Arc<dyn Communicator>, Layout)>) -> Result<(), AnyError> {
    let (generator, defaults, bar, plan) = load(args, parallel)?;
    let mut failed = Vec::new();
    let requests = args.job.request.requests()?;
    let total = requests.len();
    for Request { line, args: request } in requests {
        let one = || -> Result<(), AnyError> {
            let params = request?.params(defaults.clone(), args.job.model.low_mem.level())?;
            let (task, check) = generate(args, &generator, params, &bar)?;
            if generator.is_output_rank() {
                if let Some(plan) = &plan {
                    eprint!("{}", plan.table(Some(task.stage_peaks())));
                }
                write(args, &generator, task, check, line)?;
            }
            Ok(())
        };
        match (one(), line) {
            (Ok(()), _) => {}
            (Err(e), Some(line)) if !is_interrupt(&e) => {
                if generator.is_output_rank() {
                    eprintln!("request on line {line}: error: {e}");
                }
                failed.push(line);
            }
            (Err(e), _) => return Err(e),
        }
    }
    if !failed.is_empty() {
        return Err(format!("{} of {total} requests failed, on lines {failed:?}", failed.len()).into());
    }
    Ok(())
}

fn is_interrupt(e: &AnyError) -> bool {
    matches!(e.downcast_ref::<CliError>(), Some(CliError::Interrupted(_)))
}

/// Set by Ctrl-C; the run stops at the next step boundary.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The generator of this rank (on its device, in its mesh), the model's request defaults, the
/// progress bar (hidden off the output rank) that the decode reports to as well, and the memory
/// plan it loaded under (`--low-mem auto`).
fn load(
    args: &GenerateArgs,
    parallel: Option<(Arc<dyn Communicator>, Layout)>,
) -> Result<(Generator<B>, DiffusionUserParams, ProgressBar, Option<MemoryPlan>), AnyError> {
    let (mesh, device) = match parallel {
        Some((world, layout)) => {
            let index = local_index(world.rank());
            let device = rank_device(index);
            let world = collective_world(args, world, index)?;
            (Some(Mesh::new(world, layout)?), device)
        }
        None => (None, default_device()),
    };
    let output_rank = mesh.as_ref().is_none_or(|m| m.is_output_rank());
    if args.job.model.model_dir.is_none() && output_rank {
        eprintln!("no --model-dir: using the embedded tiny model (random weights: it shows the pipeline, not quality)");
    }
    // One request (not a prompts file): each model can go as soon as its stage is done.
    let one_request = args.job.request.prompts_file.is_none();
    let model = &args.job.model;
    // Planned for every request that parses; a bad line is reported when its turn comes.
    let requests: Vec<DiffusionUserParams> = args
        .job
        .request
        .requests()?
        .into_iter()
        .filter_map(|r| r.args.ok()?.params(model.defaults(), 0).ok())
        .collect();
    let plan = model.plan::<B>(&device, &requests, one_request)?;
    if let (Some(plan), true) = (&plan, output_rank) {
        eprint!("{}", plan.table(None));
    }
    let (backend, defaults) = model.load::<B>(&device, one_request, plan.as_ref())?;
    if output_rank {
        report_loras(&backend.lora_report());
    }
    let bar = match output_rank {
        true => ProgressBar::new(0),
        false => ProgressBar::hidden(),
    };
    bar.set_style(ProgressStyle::with_template(
        "{msg:>14} [{bar:40}] {pos}/{len} steps {elapsed_precise}",
    )?);
    let decode_bar = bar.clone();
    let oom_retry = model.oom_retry || model.low_mem == LowMem::Auto;
    let generator = Generator::new(backend)
        .with_oom_retry(oom_retry)
        .on_decode_progress(move |done, total| {
            decode_bar.set_message(format!("decode {done}/{total}"));
        });
    let generator = match mesh {
        Some(mesh) => generator.with_mesh(mesh),
        None => generator,
    };
    Ok((generator, defaults, bar, plan))
}

/// What each LoRA went into, and what a partial load skipped.
fn report_loras(report: &chitu::pipeline::LoraReport) {
    for a in &report.applied {
        eprintln!(
            "LoRA {} (strength {}) into the {}: {} tensors from {} keys",
            a.spec.path.display(),
            a.spec.strength,
            a.model,
            a.tensors,
            a.keys
        );
        for line in &a.skipped {
            eprintln!("  skipped {line}");
        }
        if !a.ignored.is_empty() {
            eprintln!(
                "  ignored {} norm-layer diff key(s), as diffusers does",
                a.ignored.len()
            );
        }
    }
    if report.merged_now > 0 {
        eprintln!(
            "merged into {} DiT(s) in {:.2}s; {:.1} MB of deltas, {:.1} MB of base weights kept",
            report.merged_now,
            report.merge_seconds,
            report.delta_bytes as f64 / 1e6,
            report.base_bytes as f64 / 1e6
        );
    } else if !report.applied.is_empty() {
        eprintln!(
            "the LoRAs merge as each DiT is read for denoising; {:.1} MB of deltas",
            report.delta_bytes as f64 / 1e6
        );
    }
}

/// Runs the request step by step under a progress bar, then the cache check when asked.
fn generate(
    args: &GenerateArgs,
    generator: &Generator<B>,
    params: DiffusionUserParams,
    bar: &ProgressBar,
) -> Result<(DiffusionTask<B>, Option<CacheCheck>), AnyError> {
    let mut task = DiffusionTask::<B>::from_user_request(params)?;
    // Refused here, before any tensor exists, rather than part-way through.
    generator.backend.check_request(task.params())?;
    if generator.is_output_rank() {
        eprintln!("{}", describe(task.params(), generator));
    }
    bar.reset();
    bar.set_length(task.params().num_inference_steps as u64);
    while !task.is_finished() {
        bar.set_message(match task.stage() {
            Stage::TextEncode => "text",
            Stage::Denoise => "denoise",
            Stage::VaeDecode => "decode",
            Stage::Done => "done",
        });
        if INTERRUPTED.load(Ordering::SeqCst) {
            bar.abandon();
            let at = match task.stage() {
                Stage::Denoise => format!("denoise step {}", task.step()),
                other => format!("{other:?}"),
            };
            return Err(CliError::Interrupted(at).into());
        }
        generator.generate_step(&mut task)?;
        bar.set_position(task.step() as u64);
    }
    bar.finish_with_message("done");
    let check = match args.cache_check {
        true => {
            if generator.is_output_rank() {
                eprintln!("cache check: running again without the cache");
            }
            Some(generator.cache_check(&task)?)
        }
        false => None,
    };
    Ok((task, check))
}

/// The resolved request, printed before it starts.
fn describe(p: &DiffusionUserParams, generator: &Generator<B>) -> String {
    let solver = match (&p.step_list, p.solver) {
        (Some(list), _) => format!("Euler at the listed {}", list.name()),
        (None, Some(s)) => format!("{s:?}"),
        (None, None) => "the model's own scheduler".into(),
    };
    let pixels = p.height * p.width * p.num_frames * 3;
    let estimate = generator
        .backend
        .estimate_memory(p, generator.backend.memory(p.low_mem));
    format!(
        "generating {}x{}, {} frames, {} steps, guidance {}, {solver}, seed {}, low-mem {}, on {} with {} weights ({:.1} MiB of video as f32; about {:.2} GB at most, in {})",
        p.width,
        p.height,
        p.num_frames,
        p.num_inference_steps,
        p.guidance_scale,
        p.seed,
        generator.backend.memory(p.low_mem).0,
        generator.backend.name,
        chitu::pipeline::Format::new(generator.backend.dtype, generator.backend.weights).name(),
        (pixels * 4) as f64 / (1 << 20) as f64,
        estimate.bytes as f64 / 1e9,
        estimate.stage
    )
}

/// Reports the run and writes the video, the contact sheet and, last, the sidecar; a request
/// from line `line` of a prompts file is named after it.
fn write(
    args: &GenerateArgs,
    generator: &Generator<B>,
    task: DiffusionTask<B>,
    check: Option<CacheCheck>,
    line: Option<usize>,
) -> Result<(), AnyError> {
    let t = task.timings();
    eprintln!(
        "text {:.2}s, denoise {:.2}s ({} DiT evaluations), vae decode {:.2}s",
        t.text_encode,
        t.denoise,
        task.dit_calls(),
        t.vae_decode
    );
    if let Some(stats) = task.cache_stats() {
        eprintln!(
            "cache: {} calls, {} full computes, {:.1} of {} block evaluations",
            stats.calls,
            stats.full_computes,
            stats.block_evals(),
            stats.uncached_block_evals()
        );
    }
    if let Some(check) = &check {
        eprintln!("{check}");
    }
    let merge_s = generator.backend.lora_merge_seconds();
    if merge_s > 0.0 {
        eprintln!("LoRA merge, as the DiT was read for denoising: {merge_s:.2}s (in the denoise time)");
    }
    let video = Video::from_task(task, &generator.backend)?;
    let stem = match line {
        Some(line) => format!("line{line:04}_{}", video.stem()),
        None => video.stem(),
    };
    let mut files = args.job.output.write(&video, &stem)?;
    let json = args.job.output.out.join(format!("{stem}.json"));
    let mut meta = video.metadata(&files);
    if let Some(mesh) = generator.mesh() {
        meta["parallel"] = serde_json::json!({ "cfg": mesh.layout.cfg, "cp": mesh.layout.cp });
    }
    if let Some(c) = check {
        meta["cache_check"] = serde_json::json!({
            "policy": c.policy,
            "psnr_db": if c.psnr_db.is_finite() { Some(c.psnr_db) } else { None },
            "max_abs_latent_diff": c.max_abs_latent_diff,
            "block_evals": c.stats.block_evals(),
            "uncached_block_evals": c.stats.uncached_block_evals(),
            "block_speedup": c.block_speedup(),
            "denoise_s": c.denoise_s,
            "uncached_denoise_s": c.uncached_denoise_s,
            "wall_speedup": c.wall_speedup(),
        });
    }
    Video::save_metadata(&json, &meta)?;
    files.push(json);
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}

/// The first Ctrl-C stops at the next step boundary; a second one ends the process at once.
fn stop_on_ctrl_c() {
    let handler = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            chitu::pipeline::video::remove_partial_files();
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: stopping at the next step boundary (Ctrl-C again to quit now)");
    });
    if let Err(e) = handler {
        eprintln!("warning: no Ctrl-C handler ({e}); Ctrl-C ends the run at once");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => {
            stop_on_ctrl_c();
            run(args)
        }
        // The server handles SIGINT and SIGTERM itself: it requeues the running job.
        #[cfg(feature = "serve")]
        Command::Serve(args) => chitu::serve::serve(args).map_err(AnyError::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let gen = e
                .downcast_ref::<GenError>()
                .or_else(|| match e.downcast_ref::<chitu::cli::CliError>() {
                    Some(chitu::cli::CliError::Gen(g)) => Some(g),
                    _ => None,
                });
            if let Some(h) = gen.and_then(hint) {
                eprintln!("hint: {h}");
            }
            ExitCode::FAILURE
        }
    }
}
