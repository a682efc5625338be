//! `chitu serve --cfg-parallel/--cp`: the ranks run as threads of this process, one device each.
//! Rank 0 serves: its worker claims the jobs and tells the other ranks, which follow it step
//! for step, what to run.

use super::worker::{self, stage_name};
use super::{lock, ServeArgs, ServeError, Service};
use crate::dist::{Communicator, Layout, Mesh, TensorData};
use crate::pipeline::{DiffusionTask, DiffusionUserParams, Generator, LoraSpec};
use crate::DefaultBackend as B;
use serde_json::{json, Value};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

/// What rank 0 tells the others, between steps.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Control {
    /// No job: a keep-alive, so that a waiting rank never times out.
    Idle,
    /// Start this request (as accepted).
    Job(Value),
    /// Run the next step of the job.
    Step,
    /// Drop the job (cancelled, or the server is stopping).
    Abandon,
    /// The server is stopping.
    Stop,
}

impl Control {
    fn encode(&self) -> TensorData {
        let v = match self {
            Self::Idle => json!({"c": "idle"}),
            Self::Job(request) => json!({"c": "job", "request": request}),
            Self::Step => json!({"c": "step"}),
            Self::Abandon => json!({"c": "abandon"}),
            Self::Stop => json!({"c": "stop"}),
        };
        let bytes = v.to_string().into_bytes();
        let n = bytes.len();
        TensorData::new(bytes, [n])
    }

    fn decode(data: TensorData) -> Result<Self, String> {
        let bytes = data.into_vec::<u8>().map_err(|e| format!("{e:?}"))?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        Ok(match v["c"].as_str() {
            Some("idle") => Self::Idle,
            Some("job") => Self::Job(v["request"].clone()),
            Some("step") => Self::Step,
            Some("abandon") => Self::Abandon,
            Some("stop") => Self::Stop,
            _ => return Err(format!("not a control message: {v}")),
        })
    }
}

/// Rank 0's side: sends `c` to every other rank.
pub(crate) fn tell(world: &dyn Communicator, c: Control) -> Result<(), crate::dist::CommError> {
    world.broadcast_data(Some(c.encode()), 0).map(drop)
}

/// Hands each rank the service once rank 0's model has loaded and the service exists.
pub(crate) struct Handoff {
    /// Rank 0's generator and the model's defaults, to the main thread.
    pub(crate) loaded: Mutex<Sender<(Arc<Generator<B>>, DiffusionUserParams)>>,
    /// The service, to each rank.
    pub(crate) service: Vec<Mutex<Option<Receiver<Arc<Service>>>>>,
}

type AnyError = Box<dyn std::error::Error + Send + Sync>;

/// One rank's life: load on its device in the mesh, then serve (rank 0) or follow.
pub(crate) fn rank_main(
    world: Arc<dyn Communicator>,
    args: &ServeArgs,
    layout: Layout,
    handoff: &Handoff,
) -> Result<(), AnyError> {
    let rank = world.rank();
    let device = crate::rank_device(rank);
    let mesh = Mesh::new(world.clone(), layout)?;
    let (generator, defaults) = super::load(&args.model, &device)?;
    let generator = generator.with_mesh(mesh);
    let receiver = lock(&handoff.service[rank]).take();
    let receiver = receiver.ok_or("a rank started twice")?;
    if rank == 0 {
        let generator = Arc::new(generator);
        let sender = lock(&handoff.loaded).clone();
        sender.send((generator, defaults))?;
        let svc = receiver.recv()?;
        worker::run(&svc, Some(world.as_ref()));
        return Ok(());
    }
    let svc = receiver.recv()?;
    follow(&svc, &generator, world.as_ref())
}

/// A follower: mirrors rank 0's job and steps until told to stop.
fn follow(svc: &Service, generator: &Generator<B>, world: &dyn Communicator) -> Result<(), AnyError> {
    let mut task: Option<DiffusionTask<B>> = None;
    let mut merged: Vec<LoraSpec> = svc.default_loras.clone();
    let rank = world.rank();
    loop {
        let control = Control::decode(world.broadcast_data(None, 0)?)?;
        match control {
            Control::Idle => {}
            Control::Stop => return Ok(()),
            Control::Abandon => task = None,
            Control::Job(request) => {
                task = match start(svc, generator, &request, &mut merged) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        tracing::warn!(rank, "cannot follow the job: {e}");
                        None
                    }
                };
            }
            Control::Step => {
                let Some(t) = task.as_mut() else { continue };
                let stage = stage_name(t.stage());
                if let Err(e) = generator.generate_step(t) {
                    tracing::warn!(rank, stage, "step failed: {e}");
                    task = None;
                } else if t.is_finished() {
                    task = None;
                }
            }
        }
    }
}

/// The follower's task for `request`, with its LoRAs merged, as rank 0 builds its own.
fn start(
    svc: &Service,
    generator: &Generator<B>,
    request: &Value,
    merged: &mut Vec<LoraSpec>,
) -> Result<DiffusionTask<B>, AnyError> {
    let request = svc.parse_request(request)?;
    worker::merge_loras(&generator.backend, &request.loras, merged)?;
    let task = DiffusionTask::<B>::from_user_request(request.params)?;
    generator.backend.check_request(task.params())?;
    Ok(task)
}

/// The ranks, started, with rank 0's model loaded.
pub(crate) struct Started {
    /// Rank 0's generator, which checks requests.
    pub(crate) generator: Arc<Generator<B>>,
    /// The model's request defaults.
    pub(crate) defaults: DiffusionUserParams,
    /// Where each rank waits for the service.
    pub(crate) senders: Vec<Sender<Arc<Service>>>,
    /// The thread the ranks run on; it ends when they all have.
    pub(crate) thread: std::thread::JoinHandle<Result<(), ServeError>>,
}

/// Starts the ranks (on a thread of their own) and waits for rank 0's model.
pub(crate) fn start_ranks(args: ServeArgs, layout: Layout) -> Result<Started, ServeError> {
    let (loaded_tx, loaded_rx) = std::sync::mpsc::channel();
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..layout.world())
        .map(|_| {
            let (tx, rx) = std::sync::mpsc::channel();
            (tx, Mutex::new(Some(rx)))
        })
        .unzip();
    let handoff = Handoff {
        loaded: Mutex::new(loaded_tx),
        service: receivers,
    };
    let timeout = std::time::Duration::from_secs(args.rank_timeout);
    let ranks = std::thread::Builder::new()
        .name("chitu-ranks".into())
        .spawn(move || {
            crate::dist::run_local_with(layout.world(), timeout, |world| {
                rank_main(world, &args, layout, &handoff)
            })
            .map(drop)
            .map_err(ServeError::Ranks)
        })
        .map_err(|source| ServeError::Net {
            what: "starting the ranks".into(),
            source,
        })?;
    match loaded_rx.recv() {
        Ok((generator, defaults)) => Ok(Started {
            generator,
            defaults,
            senders,
            thread: ranks,
        }),
        // Rank 0 never loaded: the ranks' own error says why.
        Err(_) => Err(ranks.join().unwrap_or(Ok(())).err().unwrap_or(ServeError::RanksEnded)),
    }
}

#[cfg(test)]
mod tests {
    use super::Control;

    #[test]
    fn control_messages_round_trip() {
        for c in [
            Control::Idle,
            Control::Job(serde_json::json!({"prompt": "a", "steps": 2})),
            Control::Step,
            Control::Abandon,
            Control::Stop,
        ] {
            assert_eq!(Control::decode(c.encode()).unwrap(), c);
        }
    }
}
