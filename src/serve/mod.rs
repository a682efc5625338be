//! `chitu serve`: a video-generation job service. axum on tokio answers HTTP; one worker thread
//! owns the generator; jobs are rows of a SQLite table (WAL) under `--data`, and their files
//! are written whole or not at all.
//!
//! The routes are in [`api`]; the page at `/` is `page.html`, embedded in the binary.

mod api;
mod metrics;
mod ranks;
pub mod store;
mod worker;

use crate::cli::{FieldError, ModelArgs, RequestArgs};
use crate::pipeline::{DiffusionTask, DiffusionUserParams, GenError, Generator, LoraSpec};
use crate::DefaultBackend as B;
use metrics::Metrics;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use store::{JobState, JobStore};
use tokio::sync::broadcast;

/// `chitu serve`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to bind; loopback unless you mean to expose the service.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to bind; 0 picks a free one (printed on the first line).
    #[arg(long, default_value_t = 8188)]
    pub port: u16,
    /// The model, as `chitu generate` takes it; the embedded model (`--embedded`) without
    /// `--model-dir`.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Folder of the job database (`jobs.sqlite`) and the outputs (`videos/ID/`).
    #[arg(long, default_value = "chitu-data")]
    pub data: PathBuf,
    /// Require `Authorization: Bearer T` on every `/v1` route (or `?token=T`, for the page's
    /// event streams and video elements, which cannot send headers).
    #[arg(long, env = "CHITU_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Queued jobs at most; one more gets 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Folder a request's `loras` are named in (as ComfyUI's `models/loras`); `DATA/loras` by
    /// default. Paths outside it are refused.
    #[arg(long)]
    pub lora_dir: Option<PathBuf>,
    /// Largest request body, in bytes; a larger one gets 413.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_body: usize,
    /// 2 runs the two guidance branches on two ranks, as `chitu generate`; rank 0 serves and
    /// the other ranks follow it (in-process ranks, one device each).
    #[arg(long)]
    pub cfg_parallel: Option<usize>,
    /// Ranks sharing one sequence (Ulysses context parallelism).
    #[arg(long)]
    pub cp: Option<usize>,
    /// Seconds a rank waits for a peer before failing.
    #[arg(long, default_value_t = 600)]
    pub rank_timeout: u64,
}

/// Why the service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data folder cannot be made.
    #[error("data folder {}: {source}", path.display())]
    Data {
        /// The folder.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The job database cannot be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The model did not load.
    #[error(transparent)]
    Gen(#[from] GenError),
    /// `--cfg-parallel`/`--cp` do not make a layout, or a rank failed.
    #[error(transparent)]
    Ranks(#[from] crate::dist::CommError),
    /// Started by `mpirun`, which this service does not run under.
    #[error("chitu serve runs its ranks in one process (--cfg-parallel/--cp): start it once, without mpirun")]
    UnderMpi,
    /// The ranks ended before rank 0's model loaded, without saying why.
    #[error("the ranks ended before the model loaded")]
    RanksEnded,
    /// The address cannot be bound, or serving failed.
    #[error("{what}: {source}")]
    Net {
        /// What was being done.
        what: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// A job's progress while the worker runs it (the database has the rest).
#[derive(Debug, Clone)]
pub(crate) struct Live {
    seq: i64,
    stage: &'static str,
    step: usize,
    progress: f64,
}

/// One message to the event streams: job `seq`'s status after a change of `kind` (`stage`,
/// `step` or `final`); `seq` 0 tells every stream the server is stopping.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    seq: i64,
    kind: &'static str,
    status: Value,
}

/// A request body, resolved against the model's defaults.
pub(crate) struct JobRequest {
    params: DiffusionUserParams,
    loras: Vec<LoraSpec>,
}

/// Everything the routes and the worker share.
pub(crate) struct Service {
    store: Mutex<JobStore>,
    live: Mutex<Option<Live>>,
    events: broadcast::Sender<Event>,
    work: (Mutex<()>, Condvar),
    cancels: Mutex<HashSet<i64>>,
    shutdown: AtomicBool,
    metrics: Mutex<Metrics>,
    generator: Arc<Generator<B>>,
    defaults: DiffusionUserParams,
    low_mem: u8,
    default_loras: Vec<LoraSpec>,
    data: PathBuf,
    lora_dir: PathBuf,
    max_queue: usize,
    max_body: usize,
    token: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Service {
    fn store(&self) -> MutexGuard<'_, JobStore> {
        lock(&self.store)
    }

    fn metrics(&self) -> MutexGuard<'_, Metrics> {
        lock(&self.metrics)
    }

    /// Wakes the worker: a job was queued, or the server is stopping.
    fn notify_work(&self) {
        let _guard = lock(&self.work.0);
        self.work.1.notify_all();
    }

    fn wait_for_work(&self, at_most: Duration) {
        let guard = lock(&self.work.0);
        let _ = self.work.1.wait_timeout(guard, at_most);
    }

    /// Where job `seq`'s files go.
    fn job_dir(&self, seq: i64) -> PathBuf {
        self.data.join("videos").join(format!("v{seq}"))
    }

    /// A request body resolved and checked as the CLI checks its flags: the error names the field.
    fn parse_request(&self, body: &Value) -> Result<JobRequest, FieldError> {
        let Value::Object(fields) = body else {
            return Err(FieldError::new("body", "the body must be a JSON object"));
        };
        // A path in a request would read the server's files; pictures need an upload first.
        for key in ["image", "last_image"] {
            if fields.contains_key(key) {
                return Err(FieldError::new(
                    key,
                    format!("{key}: the job service does not take pictures yet; run `chitu generate --image PATH`"),
                ));
            }
        }
        let args = RequestArgs::empty().with_json(fields, &["loras"])?;
        let params = args
            .params(self.defaults.clone(), self.low_mem)
            .map_err(|e| FieldError::new(param_field(&e.to_string(), None), e.to_string()))?;
        let loras = match fields.get("loras") {
            None => self.default_loras.clone(),
            Some(v) => self.parse_loras(v)?,
        };
        Ok(JobRequest { params, loras })
    }

    /// `loras`: a list of `NAME[:STRENGTH[:EXPERT]]`, each NAME a file under the LoRA folder.
    fn parse_loras(&self, v: &Value) -> Result<Vec<LoraSpec>, FieldError> {
        let bad = |m: String| FieldError::new("loras", m);
        let Some(list) = v.as_array() else {
            return Err(bad(format!("expected a list of \"NAME[:STRENGTH[:EXPERT]]\", got {v}")));
        };
        list.iter()
            .map(|item| {
                let text = item
                    .as_str()
                    .ok_or_else(|| bad(format!("expected a string, got {item}")))?;
                let mut spec: LoraSpec = text.parse().map_err(|e: String| bad(e))?;
                let name = spec.path.clone();
                let inside = name.components().all(|c| matches!(c, Component::Normal(_)));
                if !inside || name.as_os_str().is_empty() {
                    return Err(bad(format!(
                        "{}: name a file inside the LoRA folder, without '..' or a leading '/'",
                        name.display()
                    )));
                }
                spec.path = self.lora_dir.join(&name);
                if !spec.path.is_file() {
                    return Err(bad(format!(
                        "{}: no such LoRA in {}",
                        name.display(),
                        self.lora_dir.display()
                    )));
                }
                Ok(spec)
            })
            .collect()
    }

    /// Checks a request as `chitu generate` does before any tensor exists: the parameters, then
    /// the model's limits (sizes its RoPE reaches, its experts, memory).
    fn check(&self, request: &JobRequest) -> Result<(), FieldError> {
        let p = &request.params;
        let field = |e: GenError| FieldError::new(param_field(&e.to_string(), Some(p)), e.to_string());
        let task = DiffusionTask::<B>::from_user_request(request.params.clone()).map_err(field)?;
        self.generator.backend.check_request(task.params()).map_err(field)
    }

    /// The API's view of job `seq`.
    fn status(&self, seq: i64) -> Result<Option<Value>, store::StoreError> {
        let Some(job) = self.store().get(seq)? else {
            return Ok(None);
        };
        Ok(Some(self.status_of(&job)))
    }

    fn status_of(&self, job: &store::Job) -> Value {
        let live = lock(&self.live).clone().filter(|l| l.seq == job.seq);
        let (progress, stage, step) = match (job.state, &live) {
            (JobState::Running, Some(l)) => (l.progress, l.stage, l.step),
            (JobState::Running, None) => (0.0, "starting", 0),
            (JobState::Queued, _) => (0.0, "queued", 0),
            (JobState::Succeeded, _) => (1.0, "done", job.steps),
            _ => (0.0, "ended", 0),
        };
        let id = job.id();
        let mut v = json!({
            "id": id,
            "state": job.state.name(),
            "progress": progress,
            "stage": stage,
            "step": step,
            "steps": job.steps,
            "created": job.created,
            "started": job.started,
            "finished": job.finished,
            "timings": job.timings,
            "error": job.error,
            "request": job.request,
            "attempts": job.attempts,
        });
        if job.state == JobState::Succeeded {
            v["files"] = json!({
                "video": format!("/v1/videos/{id}/video.mp4"),
                "contact": format!("/v1/videos/{id}/contact.png"),
                "meta": format!("/v1/videos/{id}/meta.json"),
            });
        }
        if job.state == JobState::Running && lock(&self.cancels).contains(&job.seq) {
            v["cancel_requested"] = true.into();
        }
        v
    }
}

/// The request field a parameter error is about, by the parameter names the library's
/// messages start with; of a message about both sides, the side of `params` that is not a
/// multiple of 16 (every Wan model's factor).
fn param_field(message: &str, params: Option<&DiffusionUserParams>) -> &'static str {
    if let (Some(p), true) = (params, message.contains("height") && message.contains("width")) {
        let bad = |n: usize| n == 0 || !n.is_multiple_of(16);
        if bad(p.width) && !bad(p.height) {
            return "width";
        }
    }
    const NAMES: [(&str, &str); 14] = [
        ("guidance_scale_2", "guidance_2"),
        ("guidance_scale", "guidance"),
        ("guidance", "guidance"),
        ("num_frames", "frames"),
        ("frames", "frames"),
        ("num_inference_steps", "steps"),
        ("steps", "steps"),
        ("height", "height"),
        ("width", "width"),
        ("shift", "shift"),
        ("max_sequence_length", "max_sequence_length"),
        ("cache", "cache"),
        ("timesteps", "timesteps"),
        ("sigmas", "sigmas"),
    ];
    let lower = message.to_ascii_lowercase();
    NAMES
        .iter()
        .filter_map(|(name, field)| lower.find(name).map(|at| (at, *field)))
        .min_by_key(|(at, _)| *at)
        .map_or("body", |(_, f)| f)
}

/// Loads the model, opens the job store, and serves until SIGTERM or Ctrl-C; the running job
/// then goes back to the queue, and the process exits cleanly.
pub fn serve(args: ServeArgs) -> Result<(), ServeError> {
    // The launcher variables `MpiComm::launched` reads: each process would bind the same port.
    let launchers = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"];
    if launchers.iter().any(|v| std::env::var_os(v).is_some()) {
        return Err(ServeError::UnderMpi);
    }
    let data_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ServeError::Data { path, source }
    };
    std::fs::create_dir_all(args.data.join("videos")).map_err(data_err(&args.data))?;
    let lora_dir = args.lora_dir.clone().unwrap_or_else(|| args.data.join("loras"));
    let (store, recovery) = JobStore::open(&args.data.join("jobs.sqlite"))?;
    for seq in &recovery.requeued {
        eprintln!("v{seq} was running when the server stopped: queued again");
    }
    for seq in &recovery.failed {
        eprintln!("v{seq} was running when the server stopped for the second time: failed");
    }
    if args.model.model_dir.is_none() {
        eprintln!(
            "no --model-dir: serving the embedded {}",
            match args.model.embedded {
                crate::cli::Embedded::Demo => "demo model (a toy trained on coloured shapes)",
                crate::cli::Embedded::Tiny => "tiny model (random weights: it shows the service, not quality)",
            }
        );
    }
    let layout = crate::dist::Layout::new(args.cfg_parallel.unwrap_or(1), args.cp.unwrap_or(1))?;
    let (generator, defaults, followers, ranks) = match layout.world() {
        1 => {
            let (generator, defaults) = load(&args.model, &crate::default_device())?;
            (Arc::new(generator), defaults, Vec::new(), None)
        }
        world => {
            eprintln!(
                "serving on {world} in-process ranks (cfg {} x cp {})",
                layout.cfg, layout.cp
            );
            let r = ranks::start_ranks(args.clone(), layout)?;
            (r.generator, r.defaults, r.senders, Some(r.thread))
        }
    };
    let svc = Arc::new(Service {
        store: Mutex::new(store),
        live: Mutex::new(None),
        events: broadcast::channel(1024).0,
        work: (Mutex::new(()), Condvar::new()),
        cancels: Mutex::new(HashSet::new()),
        shutdown: AtomicBool::new(false),
        metrics: Mutex::new(Metrics::default()),
        generator,
        defaults,
        low_mem: args.model.low_mem.level(),
        default_loras: args.model.loras.clone(),
        data: args.data.clone(),
        lora_dir,
        max_queue: args.max_queue,
        max_body: args.max_body,
        token: args.token.clone().filter(|t| !t.is_empty()),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| ServeError::Net {
            what: "starting the async runtime".into(),
            source,
        })?;
    // One worker: this process's, or rank 0's, which tells the other ranks what to run.
    let worker = match ranks {
        None => {
            let svc = svc.clone();
            std::thread::Builder::new()
                .name("chitu-worker".into())
                .spawn(move || {
                    worker::run(&svc, None);
                    Ok(())
                })
                .map_err(|source| ServeError::Net {
                    what: "starting the worker".into(),
                    source,
                })?
        }
        Some(ranks) => {
            for rank in followers {
                // A rank that already ended reports its error when joined below.
                let _ = rank.send(svc.clone());
            }
            ranks
        }
    };
    let served = runtime.block_on(api::serve(svc.clone(), &args.host, args.port));
    stop(&svc);
    // The worker stops at its next step boundary and requeues its job.
    let ended = worker.join().unwrap_or(Err(ServeError::RanksEnded));
    served.and(ended)
}

/// Loads the model as `chitu generate` does for a prompts file: every model stays resident,
/// and `--low-mem auto` plans for the model's default request.
fn load(model: &ModelArgs, device: &burn::tensor::Device<B>) -> Result<(Generator<B>, DiffusionUserParams), GenError> {
    let plan = model.plan::<B>(device, &[model.defaults()], false)?;
    let (backend, defaults) = model.load::<B>(device, false, plan.as_ref())?;
    Ok((Generator::new(backend).with_oom_retry(true), defaults))
}

/// Stops the service: the worker at its next step boundary, and every event stream.
fn stop(svc: &Service) {
    svc.shutdown.store(true, Ordering::SeqCst);
    svc.notify_work();
    let _ = svc.events.send(Event {
        seq: 0,
        kind: "shutdown",
        status: Value::Null,
    });
}

#[cfg(test)]
mod tests {
    use super::param_field;
    use crate::pipeline::DiffusionUserParams;

    #[test]
    fn parameter_errors_name_their_field() {
        assert_eq!(param_field("num_frames 8 must be 4k+1 (1, 5, ..., 81)", None), "frames");
        let sides = "height 64 and width 0 must be multiples of 16";
        assert_eq!(param_field(sides, None), "height");
        let p = DiffusionUserParams {
            width: 0,
            ..DiffusionUserParams::tiny("x")
        };
        assert_eq!(param_field(sides, Some(&p)), "width");
        assert_eq!(
            param_field("guidance_scale_2 sets the low-noise expert's guidance", None),
            "guidance_2"
        );
        assert_eq!(param_field("something else", None), "body");
    }
}
