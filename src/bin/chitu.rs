//! `chitu generate`: text to video with a Wan model folder, or with the embedded tiny model.

use chitu::cache::CacheConfig;
use chitu::dist::{run_local_with, Communicator, Layout, Mesh};
use chitu::gen::output::{output_stem, sidecar, write_contact_sheet, write_frame_pngs, write_mp4, RgbFrames};
use chitu::gen::{video_to_frames, DiffusionBackend, DiffusionTask, DiffusionUserParams, Generator, Stage};
use chitu::sched::SolverKind;
use chitu::{default_device, rank_device, DefaultBackend as B};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "chitu", version, about = "Wan text-to-video inference in Rust")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a video from a prompt.
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// A diffusers-layout Wan2.1/2.2 folder; the embedded tiny model when omitted.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    #[arg(long)]
    width: Option<usize>,
    /// Frame count, 4k+1.
    #[arg(long)]
    frames: Option<usize>,
    #[arg(long)]
    guidance: Option<f64>,
    /// Guidance of the low-noise expert (Wan2.2-A14B).
    #[arg(long)]
    guidance_2: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// unipc, dpm++ or euler; the folder's scheduler when omitted.
    #[arg(long)]
    solver: Option<String>,
    #[arg(long)]
    shift: Option<f64>,
    #[arg(long)]
    max_sequence_length: Option<usize>,
    /// Memory saving level: 1 decodes the VAE in tiles; 2 also keeps the text encoder in host
    /// memory except while it encodes; 3 also keeps only the active DiT on the device. Levels 2
    /// and 3 park models as they load. They are for GPUs: on the CPU backend they save nothing.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=3))]
    low_mem: u8,
    /// FlexCache policy: teacache, pab, first_block_cache or taylorseer, or a JSON object such
    /// as '{"policy": "pab", "skip_self_range": 3}'.
    #[arg(long)]
    cache: Option<String>,
    /// Threshold of teacache or first_block_cache.
    #[arg(long, requires = "cache")]
    cache_threshold: Option<f64>,
    /// Also run without the cache from the same seed and report PSNR, latent difference and speedup.
    #[arg(long, requires = "cache")]
    cache_check: bool,
    /// Folder for the outputs.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// Also write one PNG per frame.
    #[arg(long)]
    png_frames: bool,
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

fn run_rank(args: &GenerateArgs, parallel: Option<(Arc<dyn Communicator>, Layout)>) -> Result<(), AnyError> {
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
    let (backend, mut params, model_name) = match &args.model_dir {
        Some(dir) => (
            DiffusionBackend::<B>::from_dir_low_mem(dir, &device, args.low_mem)?,
            DiffusionUserParams::new(args.prompt.clone()),
            dir.display().to_string(),
        ),
        None => {
            if output_rank {
                eprintln!(
                    "no --model-dir: using the embedded tiny model (random weights: it shows the pipeline, not quality)"
                );
            }
            (
                DiffusionBackend::<B>::embedded_tiny(&device)?,
                DiffusionUserParams::tiny(args.prompt.clone()),
                "embedded-tiny".into(),
            )
        }
    };
    params.negative_prompt = args.negative_prompt.clone();
    params.seed = args.seed;
    params.height = args.height.unwrap_or(params.height);
    params.width = args.width.unwrap_or(params.width);
    params.num_frames = args.frames.unwrap_or(params.num_frames);
    params.num_inference_steps = args.steps.unwrap_or(params.num_inference_steps);
    params.guidance_scale = args.guidance.unwrap_or(params.guidance_scale);
    params.guidance_scale_2 = args.guidance_2.or(params.guidance_scale_2);
    params.solver = args.solver.as_deref().map(str::parse::<SolverKind>).transpose()?;
    params.shift = args.shift.or(params.shift);
    params.max_sequence_length = args.max_sequence_length.unwrap_or(params.max_sequence_length);
    params.low_mem = args.low_mem;
    params.cache = match &args.cache {
        Some(spec) => {
            let config = CacheConfig::parse(spec)?;
            Some(match args.cache_threshold {
                Some(t) => config.with_threshold(t)?,
                None => config,
            })
        }
        None => None,
    };

    let generator = match mesh {
        Some(mesh) => Generator::new(backend).with_mesh(mesh),
        None => Generator::new(backend),
    };
    let mut task = DiffusionTask::<B>::from_user_request(params.clone())?;
    let bar = match output_rank {
        true => ProgressBar::new(params.num_inference_steps as u64),
        false => ProgressBar::hidden(),
    };
    bar.set_style(ProgressStyle::with_template(
        "{msg:>10} [{bar:40}] {pos}/{len} steps {elapsed_precise}",
    )?);
    while !task.is_finished() {
        bar.set_message(match task.stage {
            Stage::TextEncode => "text",
            Stage::Denoise => "denoise",
            Stage::VaeDecode => "decode",
            Stage::Done => "done",
        });
        generator.generate_step(&mut task)?;
        bar.set_position(task.buffer.current_step as u64);
    }
    bar.finish_with_message("done");
    let check = match args.cache_check {
        true => {
            if output_rank {
                eprintln!("cache check: running again without the cache");
            }
            Some(generator.cache_check(&task)?)
        }
        false => None,
    };
    if !output_rank {
        return Ok(());
    }
    let t = task.buffer.timings;
    eprintln!(
        "text {:.2}s, denoise {:.2}s, vae decode {:.2}s",
        t.text_encode, t.denoise, t.vae_decode
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

    let video = task.buffer.video.take().ok_or("no video decoded")?;
    let frames = RgbFrames::from_tensor(video_to_frames(video))?;
    std::fs::create_dir_all(&args.out)?;
    let stem = output_stem(&params.prompt, params.seed, params.num_inference_steps);
    let mp4 = args.out.join(format!("{stem}.mp4"));
    let sheet = args.out.join(format!("{stem}.png"));
    write_mp4(&mp4, &frames)?;
    write_contact_sheet(&sheet, &frames)?;
    let mut files = vec![mp4, sheet];
    if args.png_frames {
        files.extend(write_frame_pngs(&args.out, &stem, &frames)?);
    }
    let json = args.out.join(format!("{stem}.json"));
    let mut meta = sidecar(&params, &t, &model_name, &files);
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
    std::fs::write(&json, serde_json::to_string_pretty(&meta)?)?;
    files.push(json);
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
