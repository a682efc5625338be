//! The VAE stage: the tiny Wan VAE on 5-frame windows, then on whole clips, with reconstruction
//! (object pixels weighted up) plus a small KL term.

use super::{
    bar, clips, demo, learning_rate, log, save_safetensors, seeded, weighted_mean, Checkpoint, Cpu, Train, TrainError,
    TrainOptions, CHECKPOINT_EVERY, FRAMES, KL_WEIGHT, SIZE, VAE_BATCH, VAE_WINDOW,
};
use crate::demo::clips::Rng;
use crate::vae::WanVae;
use burn::grad_clipping::GradientClippingConfig;
use burn::module::{AutodiffModule, Param};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::{Tensor, TensorData};

/// Frames `start..start + len` of each of the `channels` planes of a clip.
fn window(clip: &[f32], channels: usize, start: usize, len: usize) -> Vec<f32> {
    let plane = SIZE * SIZE;
    (0..channels)
        .flat_map(|c| {
            clip[(c * FRAMES + start) * plane..(c * FRAMES + start + len) * plane]
                .iter()
                .copied()
        })
        .collect()
}

pub(super) fn train_vae(args: &TrainOptions, device: &burn::tensor::Device<Train>) -> Result<(), TrainError> {
    // Placeholder statistics: the VAE's own training never normalises latents.
    let config = demo::vae_config(vec![0.0; demo::DEMO_Z], vec![1.0; demo::DEMO_Z]);
    let mut model = seeded::<Train, _>(args.seed + 1, device, || {
        WanVae::new(config, device).expect("a valid config")
    });
    // The posterior's log-variance starts at -12 instead of about 0. The KL weight is small, so
    // it barely moves, and the sampled noise sets how much detail survives the latents while
    // they are small: unit noise (log-variance 0) held an earlier run at 9.7 dB PSNR for 300
    // steps, and -6 (noise 0.05 against latents of about 0.15) at 13.9 dB.
    let z = demo::DEMO_Z;
    let mut bias = model.quant_conv.bias.val().into_data().to_vec::<f32>()?;
    bias[z..].fill(-12.0);
    model.quant_conv.bias = Param::from_tensor(Tensor::from_data(TensorData::new(bias, [2 * z]), device));
    // Clipped: the VAE's channel-wise L2 norms give rare gradient spikes at this width, and one
    // spike in Adam's moments set an earlier run back by hundreds of steps.
    let optim = AdamConfig::new()
        .with_grad_clipping(Some(GradientClippingConfig::Norm(1.0)))
        .init::<Train, WanVae<Train>>();
    let ckpt = Checkpoint {
        dir: args.work.clone(),
        name: "vae",
    };
    let (mut model, mut optim, first) = ckpt.resume(model, optim, device)?;
    // Windows first, which are cheap, then whole clips: a window decodes at most two latent
    // frames, so only whole clips train the third with a cache filled by a four-frame chunk
    // (the 2,500-window run reached 18.8 dB on windows and 11.9 dB on whole held-out clips).
    let total = args.vae_steps + args.vae_clip_steps;
    let progress = bar(total, "vae");
    progress.set_position(first as u64);
    let mut smooth = None::<f32>;
    for step in first..total {
        let whole = step >= args.vae_steps;
        let (frames, lr) = if whole {
            let s = step - args.vae_steps;
            (FRAMES, learning_rate(args.vae_clip_lr, s, args.vae_clip_steps))
        } else {
            (VAE_WINDOW, learning_rate(args.vae_lr, step, args.vae_steps))
        };
        // Each step draws from its own stream, so that a resumed run draws what it would have.
        let mut rng = Rng::new(args.seed ^ 0x5AE0 ^ (step as u64).wrapping_mul(0x9E37_79B9));
        let mut batch = Vec::with_capacity(VAE_BATCH * 3 * frames * SIZE * SIZE);
        let mut weight = Vec::with_capacity(VAE_BATCH * frames * SIZE * SIZE);
        for j in 0..VAE_BATCH {
            let scene = clips::training_scene(args.seed, (step * VAE_BATCH + j) as u64);
            let start = if whole || rng.below(2) == 0 {
                0
            } else {
                FRAMES - VAE_WINDOW
            };
            batch.extend(window(&scene.render(), 3, start, frames));
            let objects = window(&scene.object_pixels(), 1, start, frames);
            weight.extend(objects.iter().map(|o| 1.0 + args.vae_object_weight * o));
        }
        let x = Tensor::<Train, 5>::from_data(TensorData::new(batch, [VAE_BATCH, 3, frames, SIZE, SIZE]), device);
        let weight = TensorData::new(weight, [VAE_BATCH, 1, frames, SIZE, SIZE]);
        let weight = Tensor::<Train, 5>::from_data(weight, device);
        let posterior = model.encode(x.clone())?;
        let eps: Vec<f32> = (0..posterior.mean.shape().num_elements())
            .map(|_| rng.normal())
            .collect();
        let eps = Tensor::<Train, 5>::from_data(TensorData::new(eps, posterior.mean.dims()), device);
        let z = posterior.mean.clone() + (posterior.logvar.clone() * 0.5).exp() * eps;
        let recon = model.decode_unclamped_for_training(z)?;
        let error = (recon - x).powi_scalar(2);
        let mse = error.clone().mean();
        // Normalised by the mean weight, so that the KL term keeps its share.
        let weighted = weighted_mean(error, weight);
        let kl = (posterior.mean.powi_scalar(2) + posterior.logvar.clone().exp() - posterior.logvar - 1.0).mean() * 0.5;
        let loss = weighted + kl.clone() * KL_WEIGHT;
        let mse_value = mse.into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr, model, grads);
        let s = match smooth {
            // The whole clips' error starts higher than the windows': restart the average.
            Some(s) if step != args.vae_steps => 0.95 * s + 0.05 * mse_value,
            _ => mse_value,
        };
        smooth = Some(s);
        log(
            &progress,
            step,
            format!("mse {s:.5} (psnr {:.1} dB) kl {:.3}", psnr(s), kl.into_scalar()),
        );
        if (step + 1) % CHECKPOINT_EVERY == 0 || step + 1 == total {
            ckpt.save(&model, &optim, step + 1)?;
        }
    }
    progress.finish();
    let vae = model.valid();
    save_safetensors(&vae, &args.work.join("vae_unnormalised.safetensors"))?;
    let (all, objects) = held_out_psnr(&vae, args.seed)?;
    println!("vae: held-out PSNR {all:.2} dB, {objects:.2} dB on the objects' pixels");
    Ok(())
}

fn psnr(mse: f32) -> f32 {
    // Pixels in [-1, 1]: the peak-to-peak range is 2.
    10.0 * (4.0 / mse.max(1e-12)).log10()
}

/// PSNR of whole 9-frame clips never used in training, reconstructed through the posterior
/// mean: over all pixels, and over those that show an object (a VAE can score well on the
/// backgrounds alone).
fn held_out_psnr(vae: &WanVae<Cpu>, seed: u64) -> Result<(f32, f32), TrainError> {
    let device = Default::default();
    let (mut total, mut on_objects, mut object_pixels) = (0.0, 0.0, 0.0);
    let n = 32;
    for i in 0..n {
        let scene = clips::training_scene(seed ^ 0xE7A1, i);
        let x = Tensor::<Cpu, 5>::from_data(TensorData::new(scene.render(), [1, 3, FRAMES, SIZE, SIZE]), &device);
        let mask = Tensor::<Cpu, 5>::from_data(
            TensorData::new(scene.object_pixels(), [1, 1, FRAMES, SIZE, SIZE]),
            &device,
        );
        let z = vae.encode(x.clone())?.mean;
        let error = (vae.decode(z)? - x).powi_scalar(2);
        total += error.clone().mean().into_scalar();
        on_objects += (error * mask.clone()).sum().into_scalar() / 3.0;
        object_pixels += mask.sum().into_scalar();
    }
    Ok((psnr(total / n as f32), psnr(on_objects / object_pixels.max(1.0))))
}
