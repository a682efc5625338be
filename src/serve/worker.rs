//! The worker: one thread owns the generator's device and runs the queue's jobs in FIFO order,
//! each to completion (README, "Serving", says why not interleaved).

use super::ranks::{self, Control};
use super::store::{Job, JobState};
use super::{lock, Event, Live, Service};
use crate::dist::Communicator;
use crate::pipeline::{DiffusionBackend, DiffusionTask, GenError, LoraSpec, Stage, Video};
use crate::DefaultBackend as B;
use serde_json::{json, Value};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How a job's run ended, short of an error.
enum Ended {
    Succeeded(Value),
    Cancelled,
    /// The server is stopping: the job goes back to the queue.
    Stopping,
}

/// Why a job failed, as its `error` text.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    Gen(#[from] GenError),
    #[error("{0}")]
    Request(String),
    #[error("writing the outputs: {0}")]
    Io(#[from] std::io::Error),
}

/// The worker's loop: claim the oldest queued job, run it, record how it ended; until shutdown.
/// With `ranks` (rank 0 of several) every other rank is told each job and each step.
pub(crate) fn run(svc: &Service, ranks: Option<&dyn Communicator>) {
    let tell = |c: Control| match ranks.map(|w| ranks::tell(w, c)) {
        Some(Err(e)) => {
            // Without its peers this rank cannot run a step: the service stops.
            tracing::error!("a rank is gone: {e}");
            eprintln!("error: a rank is gone ({e}); stopping");
            super::stop(svc);
            false
        }
        _ => true,
    };
    // The LoRAs merged now, so that consecutive jobs with the same ones merge once.
    let mut merged: Vec<LoraSpec> = svc.default_loras.clone();
    while !svc.shutdown.load(Ordering::SeqCst) {
        let claimed = svc.store().claim_next();
        let job = match claimed {
            Ok(Some(job)) => job,
            Ok(None) => {
                tell(Control::Idle);
                svc.wait_for_work(Duration::from_millis(500));
                continue;
            }
            Err(e) => {
                tracing::error!("{e}");
                svc.wait_for_work(Duration::from_secs(1));
                continue;
            }
        };
        svc.publish(job.seq, "stage");
        tell(Control::Job(job.request.clone()));
        // A panic in a job fails that job; the server keeps serving.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| run_job(svc, &job, &mut merged, &tell)))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown");
                Err(RunError::Request(format!("internal error (panic): {what}")))
            });
        *lock(&svc.live) = None;
        lock(&svc.cancels).remove(&job.seq);
        let store = svc.store();
        let recorded = match result {
            Ok(Ended::Succeeded(timings)) => store.finish(job.seq, JobState::Succeeded, None, Some(&timings)),
            Ok(Ended::Cancelled) => store.finish(job.seq, JobState::Cancelled, None, None),
            Ok(Ended::Stopping) => store.requeue(job.seq),
            Err(e) => {
                tracing::warn!(job = job.id(), "failed: {e}");
                svc.metrics().failures += 1;
                store.finish(job.seq, JobState::Failed, Some(&e.to_string()), None)
            }
        };
        drop(store);
        if let Err(e) = recorded {
            tracing::error!(job = job.id(), "{e}");
        }
        svc.publish(job.seq, "final");
    }
    tell(Control::Stop);
}

/// Runs one job step by step, publishing each stage change and denoise step.
fn run_job(
    svc: &Service,
    job: &Job,
    merged: &mut Vec<LoraSpec>,
    tell: &dyn Fn(Control) -> bool,
) -> Result<Ended, RunError> {
    let request = svc
        .parse_request(&job.request)
        .map_err(|e| RunError::Request(e.message))?;
    let generator = &svc.generator;
    let backend = &generator.backend;
    merge_loras(backend, &request.loras, merged)?;
    let mut task = DiffusionTask::<B>::from_user_request(request.params)?;
    backend.check_request(task.params())?;
    let set_live = |task: &DiffusionTask<B>| {
        *lock(&svc.live) = Some(Live {
            seq: job.seq,
            stage: stage_name(task.stage()),
            step: task.step(),
            progress: generator.get_progress(task),
        });
    };
    set_live(&task);
    while !task.is_finished() {
        if svc.shutdown.load(Ordering::SeqCst) {
            tell(Control::Abandon);
            return Ok(Ended::Stopping);
        }
        if lock(&svc.cancels).contains(&job.seq) {
            // Dropping the task frees its latents and embeddings, here and on every rank.
            tell(Control::Abandon);
            return Ok(Ended::Cancelled);
        }
        if !tell(Control::Step) {
            return Ok(Ended::Stopping);
        }
        let stage = task.stage();
        let t0 = Instant::now();
        generator.generate_step(&mut task)?;
        if stage == Stage::Denoise {
            svc.metrics().observe_step(t0.elapsed().as_secs_f64());
        }
        set_live(&task);
        let kind = match task.stage() == stage {
            true => "step",
            false => "stage",
        };
        svc.publish(job.seq, kind);
    }
    let t = task.timings();
    let timings = json!({
        "text_encode_s": t.text_encode,
        "denoise_s": t.denoise,
        "vae_decode_s": t.vae_decode,
        "dit_calls": task.dit_calls(),
    });
    let video = Video::from_task(task, backend)?;
    write_outputs(svc, job, &video)?;
    let mut metrics = svc.metrics();
    metrics.successes += 1;
    metrics.job_seconds += t.text_encode + t.denoise + t.vae_decode;
    Ok(Ended::Succeeded(timings))
}

/// Merges `wanted` in place of the LoRAs `merged` now, when they differ: consecutive jobs with
/// the same LoRAs merge once.
pub(crate) fn merge_loras(
    backend: &DiffusionBackend<B>,
    wanted: &[LoraSpec],
    merged: &mut Vec<LoraSpec>,
) -> Result<(), GenError> {
    if wanted == merged.as_slice() {
        return Ok(());
    }
    // Cleared first: a failed merge leaves the base weights, not a half-merged set.
    backend.remove_lora()?;
    merged.clear();
    backend.apply_lora(wanted, false)?;
    *merged = wanted.to_vec();
    Ok(())
}

/// Writes the job's files, each to a temporary name renamed into place, the sidecar last: a
/// file that exists is complete, and a job whose sidecar exists has all of its files.
fn write_outputs(svc: &Service, job: &Job, video: &Video) -> Result<(), RunError> {
    let dir = svc.job_dir(job.seq);
    std::fs::create_dir_all(&dir)?;
    let files: Vec<PathBuf> = vec![dir.join("video.mp4"), dir.join("contact.png")];
    video.save_mp4(&files[0]).map_err(GenError::from)?;
    video.save_png_sheet(&files[1]).map_err(GenError::from)?;
    let mut meta = video.metadata(&files);
    meta["id"] = job.id().into();
    meta["request"] = job.request.clone();
    Video::save_metadata(dir.join("meta.json"), &meta).map_err(GenError::from)?;
    Ok(())
}

/// The API's name of a stage.
pub(crate) fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::TextEncode => "text_encode",
        Stage::Denoise => "denoise",
        Stage::VaeDecode => "vae_decode",
        Stage::Done => "done",
    }
}

impl Service {
    /// Sends `kind` with the job's status now to every event stream.
    pub(crate) fn publish(&self, seq: i64, kind: &'static str) {
        let status = match self.status(seq) {
            Ok(Some(status)) => status,
            _ => return,
        };
        // No receiver is not an error: nobody is watching.
        let _ = self.events.send(Event { seq, kind, status });
    }
}
