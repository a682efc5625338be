//! What the model examples share: the `chitu generate` flags for the model, the request and the
//! outputs (`chitu::cli`), and the short path from a folder to a video file.

use chitu::cli::{JobArgs, LowMem};
use chitu::pipeline::{DiffusionTask, DiffusionUserParams, Generator, LoadOptions, Video};
use chitu::{default_device, DefaultBackend as B};
use clap::Parser;

/// `--model-dir DIR --prompt TEXT` and the rest of `chitu generate`'s request flags.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    job: JobArgs,
}

/// Loads `--model-dir`, generates with `default_params` as the model's defaults, and writes the
/// MP4, the contact sheet and the sidecar under `--out`.
#[allow(dead_code)] // each example compiles this module and uses one of the two
pub fn run(default_params: impl Fn(String) -> DiffusionUserParams) -> Result<(), Box<dyn std::error::Error>> {
    run_checked(default_params, |_| Ok(()))
}

/// [`run`], refusing arguments `check` refuses before anything loads.
pub fn run_checked(
    default_params: impl Fn(String) -> DiffusionUserParams,
    check: impl Fn(&JobArgs) -> Result<(), String>,
) -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse().job;
    check(&args)?;
    let Some(dir) = &args.model.model_dir else {
        return Err("usage: --model-dir DIR --prompt TEXT [--steps N] [--low-mem auto|0-3] ...".into());
    };
    // The request and the output folder are checked before the (slow) load.
    let mut requests = args.request.requests()?;
    if requests.len() != 1 {
        return Err("the model examples take one request; `chitu generate --prompts-file` runs many".into());
    }
    let request = requests.remove(0).args?;
    let params = request.params(default_params(String::new()), args.model.low_mem.level())?;
    params.validate()?;
    args.output.prepare()?;
    let device = default_device();
    // `--low-mem auto` (the default) plans the load for this request and this machine.
    let plan = args.model.plan::<B>(&device, std::slice::from_ref(&params), true)?;
    if let Some(plan) = &plan {
        eprint!("{}", plan.table(None));
    }
    let options = LoadOptions {
        release_after_use: true,
        loras: args.model.loras.clone(),
        lora_partial: args.model.lora_partial,
        ..plan.as_ref().map_or_else(|| args.model.options(), |p| p.options())
    };
    let retry = args.model.oom_retry || args.model.low_mem == LowMem::Auto;
    let generator = Generator::<B>::from_dir(dir, &device, options)?.with_oom_retry(retry);
    let task = generator.run(DiffusionTask::from_user_request(params)?)?;
    if let Some(plan) = &plan {
        eprint!("{}", plan.table(Some(task.stage_peaks())));
    }
    eprintln!(
        "{} DiT evaluations; denoise {:.2}s",
        task.dit_calls(),
        task.timings().denoise
    );
    let video = Video::from_task(task, &generator.backend)?;
    let mut files = args.output.write(&video, &video.stem())?;
    let json = args.output.out.join(format!("{}.json", video.stem()));
    Video::save_metadata(&json, &video.metadata(&files))?;
    files.push(json);
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}
