//! CFG and Ulysses context parallelism on in-process CPU ranks give the single-device results.

use burn::tensor::{Distribution, Tensor};
use chitu::dist::{run_local, Layout, Mesh};
use chitu::dit::{DitRunner, NoHook, SeqParallel, WanTransformer};
use chitu::pipeline::UlyssesGroup;
use chitu::pipeline::{DiffusionBackend, DiffusionTask, DiffusionUserParams, Generator, Stage};
use chitu::{default_device, DefaultBackend as B};
use chitu_parity::tensors::rel_l2;
use chitu_parity::{pipeline, Case};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const TOL: f64 = 1e-5;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

fn host(t: Tensor<B, 5>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

/// The layouts the issue names.
fn layouts() -> Vec<Layout> {
    [(1, 2), (1, 4), (2, 1), (2, 2)]
        .into_iter()
        .map(|(cfg, cp)| Layout::new(cfg, cp).unwrap())
        .collect()
}

/// A model each rank builds for itself.
enum Model {
    /// A fixture folder.
    Dir(PathBuf),
    /// The embedded tiny model, whose weights come from a seeded RNG.
    Embedded,
    /// A fixture folder with the linear layers in int8 (`--weights int8`).
    Int8(PathBuf),
}

impl Model {
    fn load(&self) -> Result<DiffusionBackend<B>, chitu::pipeline::GenError> {
        match self {
            Model::Dir(dir) => DiffusionBackend::<B>::from_dir(dir, &default_device()),
            Model::Embedded => DiffusionBackend::<B>::embedded_tiny(&default_device()),
            Model::Int8(dir) => {
                let options = chitu::pipeline::LoadOptions {
                    weights: chitu::pipeline::Weights::Int8,
                    ..Default::default()
                };
                DiffusionBackend::<B>::load(dir, &default_device(), options)
            }
        }
    }
}

/// Final latents of `params` from `initial` on `layout` (every rank's must agree bit for bit).
fn final_latents(
    model: &Model,
    params: &DiffusionUserParams,
    initial: &[f32],
    shape: [usize; 5],
    layout: Layout,
) -> Vec<f32> {
    let run = |gen: Generator<B>| -> Result<Vec<f32>, Box<dyn std::error::Error + Send + Sync>> {
        let dev = default_device();
        let init = Tensor::<B, 1>::from_floats(initial, &dev).reshape(shape);
        let mut task = DiffusionTask::<B>::from_user_request(params.clone())?.with_initial_latents(init);
        while task.stage() != Stage::VaeDecode {
            gen.generate_step(&mut task)?;
        }
        Ok(host(task.latents().cloned().unwrap()))
    };
    let backend = || model.load();
    if layout.world() == 1 {
        return run(Generator::new(backend().unwrap())).unwrap();
    }
    let outs = run_local(layout.world(), |world| {
        let mesh = Mesh::new(world, layout)?;
        run(Generator::new(backend()?).with_mesh(mesh))
    })
    .unwrap();
    for (rank, o) in outs.iter().enumerate() {
        assert_eq!(o, &outs[0], "rank {rank} left lockstep under {layout:?}");
    }
    outs.into_iter().next().unwrap()
}

fn case_input(name: &str) -> (Model, DiffusionUserParams, Vec<f32>, [usize; 5]) {
    let case = Case::load(&root(), name).unwrap();
    let model = root().join(case.field("model").unwrap().as_str().unwrap());
    let params = pipeline::params(&case).unwrap();
    let init = case.tensor("initial_latents").unwrap();
    let shape = chitu_parity::tensors::fold_shape::<5>(&init.shape);
    (
        Model::Dir(model),
        params,
        init.as_f32("initial_latents").unwrap().to_vec(),
        shape,
    )
}

fn check_every_layout(model: &Model, params: &DiffusionUserParams, init: &[f32], shape: [usize; 5]) {
    let single = final_latents(model, params, init, shape, Layout::SINGLE);
    for layout in layouts() {
        let par = final_latents(model, params, init, shape, layout);
        let err = rel_l2(&par, &single);
        assert!(err <= TOL, "{layout:?}: rel_l2 {err:e} against one device");
    }
}

#[test]
fn parity_model_pipeline_matches_one_device_on_every_layout() {
    let (model, params, init, shape) = case_input("pipeline_t2v_wan21");
    check_every_layout(&model, &params, &init, shape);
}

/// int8 weights compose with CFG and context parallelism: each rank quantizes the same files the
/// same way, and the split run gives the one-device int8 run's latents.
#[test]
fn int8_weights_under_cfg_and_context_parallelism_match_one_device() {
    let (model, params, init, shape) = case_input("pipeline_t2v_wan21");
    let Model::Dir(dir) = model else {
        unreachable!("a fixture folder")
    };
    let model = Model::Int8(dir);
    let single = final_latents(&model, &params, &init, shape, Layout::SINGLE);
    let par = final_latents(&model, &params, &init, shape, Layout::new(2, 2).unwrap());
    let err = rel_l2(&par, &single);
    assert!(err <= TOL, "int8 under cfg 2 x cp 2: rel_l2 {err:e} against one device");
}

/// Every rank builds the embedded model from the same seed: all get the same weights, so a
/// parallel run of the README's first command equals one device.
#[test]
fn the_embedded_model_matches_one_device_on_every_layout() {
    let params = DiffusionUserParams {
        num_inference_steps: 3,
        ..DiffusionUserParams::tiny("A cat walking on grass")
    };
    let shape = params.latent_shape(16, 8);
    let init = host(chitu::pipeline::seeded_noise::<B>(
        params.seed,
        shape,
        &default_device(),
    ));
    check_every_layout(&Model::Embedded, &params, &init, shape);
}

#[test]
fn wan22_expert_switch_under_parallelism_matches_one_device() {
    let (model, params, init, shape) = case_input("pipeline_t2v_wan22");
    check_every_layout(&model, &params, &init, shape);
}

#[test]
fn a_sequence_the_group_does_not_divide_is_padded_and_masked() {
    // 48x48 pixels, 5 frames: a 2x3x3 patch grid, 18 tokens; CP=4 pads to 20.
    let (model, params, _, _) = case_input("pipeline_t2v_wan21");
    let params = DiffusionUserParams {
        height: 48,
        width: 48,
        num_inference_steps: 4,
        ..params
    };
    let shape = [1, 16, 2, 6, 6];
    let init = host(Tensor::<B, 5>::random(
        shape,
        Distribution::Normal(0.0, 1.0),
        &default_device(),
    ));
    check_every_layout(&model, &params, &init, shape);
}

#[test]
fn dit_output_matches_one_device_with_padding_and_padded_heads() {
    // 27 tokens on 2 and 4 ranks, and 2 heads on 4 ranks (zero heads appended).
    let dir = root().join("models/wan21/transformer");
    let dev = default_device();
    let model = WanTransformer::<B>::from_dir(&dir, &dev).unwrap();
    let x = Tensor::<B, 5>::random([1, 16, 3, 6, 6], Distribution::Normal(0.0, 1.0), &dev);
    let ctx = Tensor::<B, 3>::random([1, 7, model.config.text_dim], Distribution::Normal(0.0, 1.0), &dev);
    let single = host(model.forward(x.clone(), &[700.0], ctx.clone()).unwrap());
    let (xs, cs) = (host(x.clone()), ctx.into_data());
    for n in [2, 3, 4] {
        let outs = run_local(n, |comm| {
            let dev = default_device();
            let model = WanTransformer::<B>::from_dir(&dir, &dev)?;
            let group: Arc<dyn SeqParallel<B>> = Arc::new(UlyssesGroup::<B>::new(comm));
            let x = Tensor::<B, 1>::from_floats(xs.as_slice(), &dev).reshape([1, 16, 3, 6, 6]);
            let ctx = Tensor::<B, 3>::from_data(cs.clone(), &dev);
            let out = DitRunner::sharded(&model, group).forward(x, &[700.0], ctx, &mut NoHook)?;
            Ok(host(out))
        })
        .unwrap();
        for (rank, out) in outs.iter().enumerate() {
            let err = rel_l2(out, &single);
            assert!(err <= TOL, "cp {n}, rank {rank}: rel_l2 {err:e}");
        }
    }
}

#[test]
fn first_block_cache_decides_alike_on_every_rank_and_matches_one_device() {
    let (model, params, init, shape) = case_input("pipeline_t2v_wan21_first_block_cache");
    assert!(params.cache.is_some());
    let single = final_latents(&model, &params, &init, shape, Layout::SINGLE);
    for layout in [Layout::new(1, 2).unwrap(), Layout::new(2, 2).unwrap()] {
        let par = final_latents(&model, &params, &init, shape, layout);
        let err = rel_l2(&par, &single);
        assert!(err <= TOL, "{layout:?}: rel_l2 {err:e}");
    }
}

#[test]
fn only_the_output_rank_decodes_the_video() {
    let (model, params, init, shape) = case_input("pipeline_t2v_wan21");
    let params = DiffusionUserParams {
        num_inference_steps: 2,
        ..params
    };
    let decoded = run_local(4, |world| {
        let dev = default_device();
        let gen = Generator::new(model.load()?).with_mesh(Mesh::new(world, Layout::new(2, 2)?)?);
        let init = Tensor::<B, 1>::from_floats(init.as_slice(), &dev).reshape(shape);
        let task = gen.run(DiffusionTask::<B>::from_user_request(params.clone())?.with_initial_latents(init))?;
        Ok((gen.is_output_rank(), task.video().is_some(), task.is_finished()))
    })
    .unwrap();
    assert_eq!(
        decoded,
        vec![
            (true, true, true),
            (false, false, true),
            (false, false, true),
            (false, false, true)
        ]
    );
}

#[test]
fn a_rank_failing_mid_run_stops_the_others_with_a_clear_error() {
    let (model, params, init, shape) = case_input("pipeline_t2v_wan21");
    let e = run_local(2, |world| {
        let dev = default_device();
        let gen = Generator::new(model.load()?).with_mesh(Mesh::new(world.clone(), Layout::new(1, 2)?)?);
        let init = Tensor::<B, 1>::from_floats(init.as_slice(), &dev).reshape(shape);
        let mut task = DiffusionTask::<B>::from_user_request(params.clone())?.with_initial_latents(init);
        for _ in 0..3 {
            gen.generate_step(&mut task)?;
        }
        if world.rank() == 1 {
            return Err("rank 1: device lost".into());
        }
        gen.generate_step(&mut task)?;
        Ok(())
    })
    .unwrap_err();
    assert!(e.to_string().contains("device lost"), "{e}");
}
