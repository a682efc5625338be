//! Checks that parallel runs give the single-device latents, on in-process ranks or under MPI.
//!
//! ```text
//! cargo run --release --example dist_check -- tests/fixtures/parity [--world 4]
//! mpirun -np 2 target/release/examples/dist_check tests/fixtures/parity   # built with --features mpi
//! ```
//! For every layout the world allows (cfg 1 or 2 times cp), runs every `pipeline` case of the
//! folder that has neither a cache nor LoRAs (Wan2.1, Wan2.2-A14B, TI2V-5B with and without a
//! picture, I2V-A14B), and on the first of them a request three patches on a side (48x48 for an 8x
//! VAE), whose odd token count no even group divides; it compares the final latents with a
//! single-device run (rel_l2 <= 1e-5). Rank 0 prints one line per check and `N passed, M failed`;
//! the exit code is non-zero on any failure.

use burn::tensor::Tensor;
use chitu::dist::{run_local, Communicator, Layout, Mesh};
use chitu::pipeline::{
    seeded_noise, DiffusionBackend, DiffusionTask, DiffusionUserParams, Generator, PipelineKind, Stage,
};
use chitu::{rank_device, DefaultBackend as B};
use chitu_parity::tensors::{fold_shape, rel_l2};
use chitu_parity::{list_cases, pipeline, Case};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

type AnyError = Box<dyn std::error::Error + Send + Sync>;
const TOL: f64 = 1e-5;

/// A model folder, a request and its starting latents (drawn from the request's seed when the
/// check has none).
struct Check {
    name: String,
    model: PathBuf,
    params: DiffusionUserParams,
    init: Option<(Vec<f32>, [usize; 5])>,
}

fn checks(root: &Path) -> Result<Vec<Check>, AnyError> {
    let mut out = Vec::new();
    for name in list_cases(root, &[])? {
        let case = Case::load(root, &name)?;
        if case.kind()? != "pipeline" || case.json.get("cache").is_some() || case.json.get("loras").is_some() {
            continue;
        }
        let init = case.tensor("initial_latents")?;
        out.push(Check {
            name,
            model: root.join(case.field("model")?.as_str().ok_or("model is not a string")?),
            params: pipeline::params(&case)?,
            init: Some((init.as_f32("initial_latents")?.to_vec(), fold_shape(&init.shape))),
        });
    }
    // Preferably a TI2V picture case: its frame-0 tokens then end inside a rank's share.
    let mut base = None;
    for check in &out {
        let backend = DiffusionBackend::<B>::from_dir(&check.model, &rank_device(0))?;
        let ti2v = backend.pipeline == PipelineKind::TextImageToVideo && check.params.image.is_some();
        if base.is_none() || ti2v {
            base = Some((check, backend));
        }
        if ti2v {
            break;
        }
    }
    let (first, backend) = base.ok_or("the folder has no pipeline case without a cache or LoRAs")?;
    // Three patches on a side and three latent frames: 27 tokens, which no even group divides
    // and whose first frame's 9 end inside the first share of two.
    let [_, ph, _] = backend.dit(0)?.shell().patch_size;
    let side = 3 * ph * backend.vae.config.spatial_factor();
    out.push(Check {
        name: format!("{}_{side}x{side}_odd_tokens", first.name),
        model: first.model.clone(),
        params: DiffusionUserParams {
            height: side,
            width: side,
            num_frames: 9,
            num_inference_steps: 4,
            seed: 7,
            ..first.params.clone()
        },
        init: None,
    });
    Ok(out)
}

/// The final latents of `check` on this rank (`mesh` None: one device).
fn latents(check: &Check, mesh: Option<Mesh>, device: &burn::tensor::Device<B>) -> Result<Vec<f32>, AnyError> {
    let backend = DiffusionBackend::<B>::from_dir(&check.model, device)?;
    let vae = backend.vae.config.clone();
    let gen = match mesh {
        Some(mesh) => Generator::new(backend).with_mesh(mesh),
        None => Generator::new(backend),
    };
    let init = match &check.init {
        Some((data, shape)) => Tensor::<B, 1>::from_floats(data.as_slice(), device).reshape(*shape),
        None => {
            let shape = check.params.latent_shape(vae.z_dim, vae.spatial_factor());
            seeded_noise::<B>(check.params.seed, shape, device)
        }
    };
    let mut task = DiffusionTask::<B>::from_user_request(check.params.clone())?.with_initial_latents(init);
    while task.stage() != Stage::VaeDecode {
        gen.generate_step(&mut task)?;
    }
    Ok(task.latents().cloned().ok_or("no latents")?.into_data().to_vec()?)
}

/// Runs every check on every layout of `world`; returns (lines, failures) on rank 0.
fn run_rank(root: &Path, world: Arc<dyn Communicator>) -> Result<(Vec<String>, usize), AnyError> {
    let device = rank_device(world.rank());
    let n = world.world_size();
    let layouts: Vec<Layout> = [1, 2]
        .into_iter()
        .filter(|cfg| n.is_multiple_of(*cfg))
        .map(|cfg| Layout::new(cfg, n / cfg))
        .collect::<Result<_, _>>()?;
    let (mut lines, mut failed) = (Vec::new(), 0);
    for check in checks(root)? {
        let single = latents(&check, None, &device)?;
        for &layout in &layouts {
            let par = latents(&check, Some(Mesh::new(world.clone(), layout)?), &device)?;
            let err = rel_l2(&par, &single);
            let ok = err <= TOL;
            failed += usize::from(!ok);
            lines.push(format!(
                "{:<32} cfg {} x cp {}  rel_l2 {err:.3e}  tol {TOL:e}  {}",
                check.name,
                layout.cfg,
                layout.cp,
                if ok { "ok" } else { "FAIL" }
            ));
        }
    }
    Ok((lines, failed))
}

fn report(results: Result<(Vec<String>, usize), AnyError>) -> ExitCode {
    match results {
        Ok((lines, failed)) => {
            for l in &lines {
                println!("{l}");
            }
            println!("{} passed, {failed} failed", lines.len() - failed);
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(root) = args.first().map(PathBuf::from) else {
        eprintln!("usage: dist_check DIR [--world N]");
        return ExitCode::from(2);
    };
    #[cfg(feature = "mpi")]
    if chitu::dist::MpiComm::launched() {
        let world = match chitu::dist::MpiComm::init(chitu::dist::DEFAULT_TIMEOUT) {
            Ok(w) => Arc::new(w),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let result = run_rank(&root, world.clone());
        if let Err(e) = &result {
            eprintln!("error on rank {}: {e}", world.rank());
            world.abort(1);
        }
        return if world.rank() == 0 {
            report(result)
        } else {
            ExitCode::SUCCESS
        };
    }
    let world = match args.iter().position(|a| a == "--world") {
        Some(i) => match args.get(i + 1).and_then(|v| v.parse::<usize>().ok()) {
            Some(n) if n >= 2 => n,
            _ => {
                eprintln!("--world needs a number of ranks, at least 2");
                return ExitCode::from(2);
            }
        },
        None => 2,
    };
    let results = run_local(world, |comm| run_rank(&root, comm)).map(|mut all| all.swap_remove(0));
    report(results.map_err(AnyError::from))
}
