//! The latent statistics stage and the DiT stage: the tiny Wan DiT with Wan's flow-matching
//! objective on the frozen UMT5's states of each caption.

use super::{
    bar, demo, io, learning_rate, load_safetensors, log, save_safetensors, seeded, weighted_mean, write_atomic,
    Checkpoint, Cpu, Train, TrainError, TrainOptions, CHECKPOINT_EVERY, DIT_BATCH, DROP_CAPTION, FRAMES, SHIFT, SIZE,
};
use crate::demo::clips::{self, Rng};
use crate::dit::WanTransformer;
use crate::text::{T5Tokenizer, TextEncoder, Umt5Encoder};
use crate::vae::WanVae;
use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::{Tensor, TensorData};
use std::collections::HashMap;
use std::path::Path;

fn load_vae(args: &TrainOptions, mean: Vec<f64>, std: Vec<f64>) -> Result<WanVae<Cpu>, TrainError> {
    let device = Default::default();
    let vae = WanVae::<Cpu>::new(demo::vae_config(mean, std), &device)?;
    load_safetensors(vae, &args.work.join("vae_unnormalised.safetensors"))
}

/// A training clip's posterior, `[z, T, h, w]` row-major, its caption, and which latent cells
/// show an object (`[T, h, w]`, 1 or 0).
struct Encoded {
    mean: Vec<f32>,
    logvar: Vec<f32>,
    caption: String,
    objects: Vec<f32>,
}

fn encode_clips(vae: &WanVae<Cpu>, seed: u64, n: usize) -> Result<Vec<Encoded>, TrainError> {
    let device = Default::default();
    let progress = bar(n, "encode");
    let mut out = Vec::with_capacity(n);
    let (sf, tf) = (vae.config.spatial_factor(), vae.config.temporal_factor());
    for i in 0..n {
        let scene = clips::training_scene(seed, i as u64);
        let x = Tensor::<Cpu, 5>::from_data(TensorData::new(scene.render(), [1, 3, FRAMES, SIZE, SIZE]), &device);
        let p = vae.encode(x)?;
        out.push(Encoded {
            mean: p.mean.into_data().to_vec::<f32>()?,
            logvar: p.logvar.into_data().to_vec::<f32>()?,
            caption: scene.caption(),
            objects: scene.object_cells(sf, tf),
        });
        progress.inc(1);
    }
    progress.finish();
    Ok(out)
}

pub(super) fn latent_stats(args: &TrainOptions) -> Result<(), TrainError> {
    let z = demo::DEMO_Z;
    let vae = load_vae(args, vec![0.0; z], vec![1.0; z])?;
    let latents = encode_clips(&vae, args.seed, 512)?;
    let per = latents[0].mean.len() / z;
    let (mut mean, mut std) = (vec![0.0f64; z], vec![0.0f64; z]);
    for c in 0..z {
        let values: Vec<f64> = latents
            .iter()
            .flat_map(|l| l.mean[c * per..(c + 1) * per].iter().map(|&v| v as f64))
            .collect();
        let mu = values.iter().sum::<f64>() / values.len() as f64;
        let var = values.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / values.len() as f64;
        mean[c] = mu;
        std[c] = var.sqrt().max(1e-3);
    }
    println!("latents mean {mean:.3?}\nlatents std {std:.3?}");
    let json = serde_json::json!({"latents_mean": mean, "latents_std": std});
    write_atomic(
        &args.out.join("vae_stats.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    save_safetensors(&vae, &args.out.join("vae.safetensors"))?;
    Ok(())
}

fn read_stats(dir: &Path) -> Result<(Vec<f64>, Vec<f64>), TrainError> {
    let path = dir.join("vae_stats.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).map_err(io(&path))?)?;
    let get = |k: &str| -> Result<Vec<f64>, TrainError> { Ok(serde_json::from_value(json[k].clone())?) };
    Ok((get("latents_mean")?, get("latents_std")?))
}

/// The frozen text encoder: the seeded random UMT5 over the demo tokenizer.
fn text_encoder(args: &TrainOptions) -> Result<TextEncoder<Cpu>, TrainError> {
    let device = Default::default();
    let path = args.out.join("tokenizer.json");
    let tokenizer = T5Tokenizer::from_json_bytes(&std::fs::read(&path).map_err(io(&path))?)?;
    let config = demo::text_config(tokenizer.vocab_size());
    let encoder = seeded::<Cpu, _>(args.seed, &device, || {
        Umt5Encoder::new(config, &device).expect("a valid config")
    });
    save_safetensors(&encoder, &args.out.join("text_encoder.safetensors"))?;
    Ok(TextEncoder::new(tokenizer, encoder, device))
}

pub(super) fn train_dit(args: &TrainOptions, device: &burn::tensor::Device<Train>) -> Result<(), TrainError> {
    let (mean, std) = read_stats(&args.out)?;
    let vae = load_vae(args, mean.clone(), std.clone())?;
    let text = text_encoder(args)?;
    let latents = encode_clips(&vae, args.seed, args.dit_clips)?;
    let mut states: HashMap<String, Vec<f32>> = HashMap::new();
    for caption in latents.iter().map(|l| l.caption.as_str()).chain([""]) {
        if !states.contains_key(caption) {
            let s = text.encode_prompt(&[caption], demo::DEMO_TEXT_LEN)?;
            states.insert(caption.to_string(), s.into_data().to_vec::<f32>()?);
        }
    }
    let z = demo::DEMO_Z;
    let (sf, tf) = (vae.config.spatial_factor(), vae.config.temporal_factor());
    let [lt, lh, lw] = [(FRAMES - 1) / tf + 1, SIZE / sf, SIZE / sf];
    let per = lt * lh * lw;
    let width = text.encoder.config.d_model;

    let model = seeded::<Train, _>(args.seed + 2, device, || {
        WanTransformer::new(demo::dit_config(), device).expect("a valid config")
    });
    let optim = AdamConfig::new().init::<Train, WanTransformer<Train>>();
    let ckpt = Checkpoint {
        dir: args.work.clone(),
        name: "dit",
    };
    let (mut model, mut optim, first) = ckpt.resume(model, optim, device)?;
    let progress = bar(args.dit_steps, "dit");
    progress.set_position(first as u64);
    let mut smooth = None::<f32>;
    for step in first..args.dit_steps {
        let mut rng = Rng::new(args.seed ^ 0xD17 ^ (step as u64).wrapping_mul(0x9E37_79B9));
        let (mut xt, mut target, mut context, mut timesteps) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut weight = Vec::with_capacity(DIT_BATCH * per);
        for _ in 0..DIT_BATCH {
            let Encoded {
                mean: m,
                logvar: lv,
                caption,
                objects,
            } = &latents[rng.below(latents.len())];
            weight.extend(objects.iter().map(|o| 1.0 + args.dit_object_weight * o));
            let sigma = {
                let t = rng.unit();
                SHIFT * t / (1.0 + (SHIFT - 1.0) * t)
            };
            for c in 0..z {
                for k in 0..per {
                    let i = c * per + k;
                    // A posterior sample, normalised as the pipeline's latents are.
                    let x0 = ((m[i] + (0.5 * lv[i]).exp() * rng.normal()) as f64 - mean[c]) / std[c];
                    let noise = rng.normal();
                    xt.push((1.0 - sigma) * x0 as f32 + sigma * noise);
                    target.push(noise - x0 as f32);
                }
            }
            let caption = if rng.unit() < DROP_CAPTION {
                ""
            } else {
                caption.as_str()
            };
            context.extend_from_slice(&states[caption]);
            timesteps.push(sigma as f64 * 1000.0);
        }
        let shape = [DIT_BATCH, z, lt, lh, lw];
        let xt = Tensor::<Train, 5>::from_data(TensorData::new(xt, shape), device);
        let target = Tensor::<Train, 5>::from_data(TensorData::new(target, shape), device);
        let context = Tensor::<Train, 3>::from_data(
            TensorData::new(context, [DIT_BATCH, demo::DEMO_TEXT_LEN, width]),
            device,
        );
        let weight = TensorData::new(weight, [DIT_BATCH, 1, lt, lh, lw]);
        let weight = Tensor::<Train, 5>::from_data(weight, device);
        let pred = model.forward(xt, &timesteps, context)?;
        // Normalised by the mean weight, so that the loss reads as a mean squared error.
        let loss = weighted_mean((pred - target).powi_scalar(2), weight);
        let value = loss.clone().into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(learning_rate(args.dit_lr, step, args.dit_steps), model, grads);
        let s = smooth.map_or(value, |s| 0.98 * s + 0.02 * value);
        smooth = Some(s);
        log(&progress, step, format!("loss {s:.4}"));
        if (step + 1) % CHECKPOINT_EVERY == 0 || step + 1 == args.dit_steps {
            ckpt.save(&model, &optim, step + 1)?;
        }
    }
    progress.finish();
    save_safetensors(&model.valid(), &args.out.join("transformer.safetensors"))?;
    Ok(())
}
