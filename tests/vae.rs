//! The Wan VAE: errors on bad shapes, automatic tiling, latent normalisation.

use burn::tensor::{Distribution, Tensor};
use chitu::vae::{TileConfig, WanVae};
use chitu::{default_device, DefaultBackend as B};
use chitu_parity::tensors::{rel_l2, HostTensor};
use chitu_parity::{vae, Case};
use std::path::{Path, PathBuf};

use crate::common;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

fn vae() -> WanVae<B> {
    WanVae::from_dir(fixtures().join("models/wan21/vae"), &default_device()).unwrap()
}

fn host(t: Tensor<B, 5>) -> Vec<f32> {
    HostTensor::from_backend(t).unwrap().as_f32("t").unwrap().to_vec()
}

#[test]
fn every_vae_output_matches_diffusers() {
    for name in [
        "vae_decode",
        "vae_encode",
        "vae_decode_tiled",
        "vae22_decode",
        "vae22_encode",
    ] {
        let case = Case::load(&fixtures(), name).unwrap();
        for (out_name, out) in vae::outputs::<B>(&case, &default_device()).unwrap() {
            let e = chitu_parity::tensors::compare(out_name, &out, case.tensor(out_name).unwrap()).unwrap();
            assert!(e <= 1e-4, "{name}/{out_name}: {e}");
        }
    }
}

#[test]
fn bad_shapes_are_clear_errors() {
    let v = vae();
    let dev = default_device();
    let e = v
        .encode(Tensor::zeros([1, 3, 4, 32, 32], &dev))
        .unwrap_err()
        .to_string();
    assert!(e.contains("4 frames") && e.contains("4k+1"), "{e}");
    let e = v
        .encode(Tensor::zeros([1, 3, 5, 30, 32], &dev))
        .unwrap_err()
        .to_string();
    assert!(e.contains("30x32"), "{e}");
    let e = v.decode(Tensor::zeros([1, 8, 2, 4, 4], &dev)).unwrap_err().to_string();
    assert!(e.contains("8 channels"), "{e}");
    let bad_tiles = TileConfig {
        min_height: 64,
        min_width: 64,
        stride_height: 80,
        stride_width: 48,
    };
    assert!(v
        .decode_tiled(Tensor::zeros([1, 16, 1, 4, 4], &dev), bad_tiles)
        .is_err());
}

/// 64-pixel tiles at a 48-pixel stride: a 96-pixel decode is a 2 x 2 grid.
fn small_tiles() -> TileConfig {
    TileConfig {
        min_height: 64,
        min_width: 64,
        stride_height: 48,
        stride_width: 48,
    }
}

#[test]
fn decode_within_a_budget_tiles_only_when_needed() {
    let v = vae();
    let dev = default_device();
    let z = Tensor::<B, 5>::random([1, 16, 2, 12, 12], Distribution::Normal(0.0, 1.0), &dev);
    let tiles = small_tiles();
    let need = v.estimate_decode_bytes(z.dims());
    let plain = host(v.decode(z.clone()).unwrap());
    let tiled = host(v.decode_tiled(z.clone(), tiles).unwrap());
    assert!(
        rel_l2(&plain, &tiled) > 0.0,
        "tiling must change the result at tile seams"
    );
    assert_eq!(host(v.decode_within(z.clone(), need, tiles).unwrap()), plain);
    assert_eq!(host(v.decode_within(z, need - 1, tiles).unwrap()), tiled);
}

/// The decode reports each latent frame (of each tile) as it finishes, and reporting changes
/// nothing in the video.
#[test]
fn decodes_report_their_progress_frame_by_frame() {
    let v = vae();
    let z = Tensor::<B, 5>::random([1, 16, 2, 12, 12], Distribution::Normal(0.0, 1.0), &default_device());
    let mut seen = Vec::new();
    let video = v
        .decode_with_progress(z.clone(), &mut |done, total| seen.push((done, total)))
        .unwrap();
    assert_eq!(seen, vec![(1, 2), (2, 2)]);
    assert_eq!(host(video), host(v.decode(z.clone()).unwrap()));
    // 12x12 latents in 8-latent tiles at a stride of 6: a 2 x 2 grid, each tile two frames.
    let tiles = small_tiles();
    let mut seen = Vec::new();
    let tiled = v
        .decode_tiled_with_progress(z.clone(), tiles, &mut |done, total| seen.push((done, total)))
        .unwrap();
    assert_eq!(seen, (1..=8).map(|d| (d, 8)).collect::<Vec<_>>());
    assert_eq!(host(tiled), host(v.decode_tiled(z, tiles).unwrap()));
}

#[test]
fn normalize_inverts_denormalize() {
    let v = vae();
    let z = Tensor::<B, 5>::random([1, 16, 1, 2, 2], Distribution::Normal(0.0, 1.0), &default_device());
    let back = host(v.normalize(v.denormalize(z.clone())));
    assert!(rel_l2(&back, &host(z)) < 1e-6);
}

#[test]
fn wan_vae_checkpoint_layout_loads_to_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("models/wan21/vae");
    let ckpt = dir.path().join("Wan2.1_VAE.safetensors");
    common::write_wan_vae(&fixtures().join("models/wan21"), &ckpt);
    let bytes = std::fs::read(&ckpt).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.names().contains(&"decoder.upsamples.7.time_conv.weight"));

    let config: chitu::vae::WanVaeConfig =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let dev = default_device();
    let wan = WanVae::<B>::from_wan_checkpoint(&ckpt, config.clone(), &dev).unwrap();
    let z = Tensor::<B, 5>::random([1, 16, 2, 4, 4], Distribution::Normal(0.0, 1.0), &dev);
    assert_eq!(host(wan.decode(z.clone()).unwrap()), host(vae().decode(z).unwrap()));

    // The Wan table is wrong for a differently shaped VAE, and that is an error, not garbage.
    let e = WanVae::<B>::from_wan_checkpoint(
        &ckpt,
        chitu::vae::WanVaeConfig {
            num_res_blocks: 1,
            ..config
        },
        &dev,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("unexpected keys") || e.contains("missing keys"), "{e}");
}

fn vae22() -> WanVae<B> {
    WanVae::from_dir(fixtures().join("models/wan22_ti2v/vae"), &default_device()).unwrap()
}

#[test]
fn wan22_vae_checkpoint_layout_loads_to_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("models/wan22_ti2v/vae");
    let ckpt = dir.path().join("Wan2.2_VAE.safetensors");
    let config: chitu::vae::WanVaeConfig =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    common::write_wan_vae_as(
        &fixtures().join("models/wan22_ti2v"),
        &ckpt,
        Some(config.num_res_blocks),
    );
    let bytes = std::fs::read(&ckpt).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st
        .names()
        .contains(&"encoder.downsamples.1.downsamples.1.time_conv.weight"));
    assert!(st
        .names()
        .contains(&"decoder.upsamples.0.upsamples.0.residual.2.weight"));

    let dev = default_device();
    let wan = WanVae::<B>::from_wan_checkpoint(&ckpt, config, &dev).unwrap();
    let z = Tensor::<B, 5>::random([1, 48, 2, 2, 2], Distribution::Normal(0.0, 1.0), &dev);
    assert_eq!(host(wan.decode(z.clone()).unwrap()), host(vae22().decode(z).unwrap()));
}

/// The Wan2.2 VAE's 2x2 patchify makes it 16x: sizes that 16 does not divide are refused, and
/// tiled decodes and encodes blend in the patchify's units as diffusers does. The references are
/// diffusers' (`tests/fixtures/extra/make_vae22_tiled.py`; the parity folder has no such case).
#[test]
fn wan22_vae_shapes_and_tiles_match_diffusers() {
    let v = vae22();
    let dev = default_device();
    assert_eq!(v.config.spatial_factor(), 16);
    let e = v
        .encode(Tensor::zeros([1, 3, 1, 24, 32], &dev))
        .unwrap_err()
        .to_string();
    assert!(e.contains("24x32") && e.contains("16"), "{e}");
    let e = v
        .encode(Tensor::zeros([1, 12, 1, 32, 32], &dev))
        .unwrap_err()
        .to_string();
    assert!(e.contains("12 channels"), "{e}");

    let refs = chitu_parity::tensors::load_safetensors(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/extra/vae22_tiled.safetensors"),
    )
    .unwrap();
    let load = |name: &str| -> (Tensor<B, 5>, Vec<f32>) {
        let t = &refs[name];
        (
            t.to_backend::<B, 5>(name, &dev).unwrap(),
            t.as_f32(name).unwrap().to_vec(),
        )
    };
    let tiles = TileConfig {
        min_height: 64,
        min_width: 64,
        stride_height: 48,
        stride_width: 48,
    };
    let (z, _) = load("latents");
    let check = |what: &str, got: Tensor<B, 5>, reference: &str| {
        let err = rel_l2(&host(got), &load(reference).1);
        assert!(err <= 1e-4, "{what}: rel_l2 {err}");
    };
    check("plain decode", v.decode(z.clone()).unwrap(), "video_untiled");
    check("tiled decode", v.decode_tiled(z, tiles).unwrap(), "video_tiled");
    let (video, _) = load("video_in");
    check(
        "tiled encode",
        v.encode_tiled(video, tiles).unwrap().mean,
        "encoded_tiled_mean",
    );
}

#[test]
fn wan22_vae_configs_that_do_not_fit_are_refused() {
    let mut c = chitu::vae::WanVaeConfig::wan22();
    c.in_channels = 10;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("in_channels 10") && e.contains("patch_size^2 = 4"), "{e}");
    let mut c = chitu::vae::WanVaeConfig::wan22();
    c.base_dim = 7;
    c.dim_mult = vec![1, 3, 4, 4];
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("encoder stage"), "{e}");
}
