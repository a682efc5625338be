//! Helpers shared by the integration tests: rewriting fixture checkpoints in Wan's own layouts.
#![allow(dead_code)]

use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use std::path::Path;
use std::process::{Command, Output};

pub mod serve;

/// Runs `chitu generate` with `args`, writing into `out`; without `--model-dir` (or
/// `--embedded`) on the embedded random-weight tiny model, which these tests were written for.
pub fn generate(args: &[&str], out: &Path) -> Output {
    let mut all = tiny_unless_chosen(args);
    all.extend(args);
    generate_as_given(&all, out)
}

/// Runs `chitu generate` with exactly `args` (the binary's own default model without
/// `--model-dir`), writing into `out`.
pub fn generate_as_given(args: &[&str], out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chitu"))
        .arg("generate")
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

/// `--embedded tiny` unless `args` choose a model.
pub fn tiny_unless_chosen(args: &[&str]) -> Vec<&'static str> {
    if args.iter().any(|a| *a == "--model-dir" || *a == "--embedded") {
        Vec::new()
    } else {
        vec!["--embedded", "tiny"]
    }
}

/// Renames a diffusers folder's transformers UMT5 checkpoint to Wan's `t5.py` names and writes it
/// to `path`, leaving out the tensor named `drop`.
pub fn write_wan_t5(pipeline_dir: &Path, path: &Path, drop: Option<&str>) {
    let bytes = std::fs::read(pipeline_dir.join("text_encoder/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let rename = |k: &str| -> String {
        if k == "shared.weight" {
            return "token_embedding.weight".into();
        }
        if k == "encoder.final_layer_norm.weight" {
            return "norm.weight".into();
        }
        let parts: Vec<&str> = k.split('.').collect();
        let (i, rest) = (parts[2], parts[3..].join("."));
        let tail = match rest.as_str() {
            "layer.0.SelfAttention.relative_attention_bias.weight" => "pos_embedding.embedding.weight".to_string(),
            "layer.0.layer_norm.weight" => "norm1.weight".into(),
            "layer.1.layer_norm.weight" => "norm2.weight".into(),
            "layer.1.DenseReluDense.wi_0.weight" => "ffn.gate.0.weight".into(),
            "layer.1.DenseReluDense.wi_1.weight" => "ffn.fc1.weight".into(),
            "layer.1.DenseReluDense.wo.weight" => "ffn.fc2.weight".into(),
            other => other.replace("layer.0.SelfAttention.", "attn."),
        };
        format!("blocks.{i}.{tail}")
    };
    let views: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (rename(&k), v))
        .filter(|(k, _)| Some(k.as_str()) != drop)
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// diffusers VAE key → Wan's `vae.py` key, for the fixture's shape (4 stages, 2 residual blocks).
pub fn to_wan_vae_key(key: &str) -> String {
    let mut k = key.to_string();
    for (a, b) in [
        (".norm1.", ".residual.0."),
        (".conv1.", ".residual.2."),
        (".norm2.", ".residual.3."),
        (".conv2.", ".residual.6."),
        (".conv_shortcut.", ".shortcut."),
        ("encoder.conv_in.", "encoder.conv1."),
        ("decoder.conv_in.", "decoder.conv1."),
        ("mid_block.resnets.0.", "middle.0."),
        ("mid_block.attentions.0.", "middle.1."),
        ("mid_block.resnets.1.", "middle.2."),
        ("norm_out.", "head.0."),
        ("conv_out.", "head.2."),
        ("encoder.down_blocks.", "encoder.downsamples."),
    ] {
        k = k.replace(a, b);
    }
    if let Some(rest) = k.strip_prefix("post_quant_conv.") {
        return format!("conv2.{rest}");
    }
    if let Some(rest) = k.strip_prefix("quant_conv.") {
        return format!("conv1.{rest}");
    }
    if let Some(rest) = k.strip_prefix("decoder.up_blocks.") {
        let parts: Vec<&str> = rest.splitn(4, '.').collect();
        let block: usize = parts[0].parse().unwrap();
        let (flat, tail) = match parts[1] {
            "resnets" => (block * 4 + parts[2].parse::<usize>().unwrap(), parts[3]),
            _ => (block * 4 + 3, parts[3]),
        };
        return format!("decoder.upsamples.{flat}.{tail}");
    }
    k
}

/// diffusers VAE key → Wan's `vae2_2.py` key, for a Wan2.2 VAE with `res` residual blocks per
/// encoder stage: each stage nests its layers (`downsamples.S.downsamples.N`), resampler last.
pub fn to_wan22_vae_key(key: &str, res: usize) -> String {
    let mut k = key.to_string();
    for (a, b) in [
        (".downsampler.", &format!(".downsamples.{res}.")[..]),
        (".upsampler.", &format!(".upsamples.{}.", res + 1)[..]),
    ] {
        k = k.replace(a, b);
    }
    k = k.replacen("encoder.down_blocks.", "encoder.downsamples.", 1).replacen(
        "decoder.up_blocks.",
        "decoder.upsamples.",
        1,
    );
    if k.starts_with("encoder.downsamples.") {
        k = k.replace(".resnets.", ".downsamples.");
    }
    if k.starts_with("decoder.upsamples.") {
        k = k.replace(".resnets.", ".upsamples.");
    }
    // The rest is named as in Wan2.1 (the flat decoder list aside, which Wan2.2 does not have).
    to_wan_vae_key(&k)
}

/// Writes a diffusers folder's VAE in Wan's own key layout to `path` (`vae.py`'s, or
/// `vae2_2.py`'s with `wan22_res`, the residual blocks per encoder stage).
pub fn write_wan_vae_as(pipeline_dir: &Path, path: &Path, wan22_res: Option<usize>) {
    let bytes = std::fs::read(pipeline_dir.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let rename = |k: &str| match wan22_res {
        Some(res) => to_wan22_vae_key(k, res),
        None => to_wan_vae_key(k),
    };
    let renamed: Vec<(String, TensorView)> = st.tensors().into_iter().map(|(k, v)| (rename(&k), v)).collect();
    safetensors::serialize_to_file(renamed, None, path).unwrap();
}

/// Writes a diffusers folder's VAE in Wan's `vae.py` key layout to `path`.
pub fn write_wan_vae(pipeline_dir: &Path, path: &Path) {
    write_wan_vae_as(pipeline_dir, path, None)
}

/// Decodes every sample of the MP4's video track; returns (frames decoded, width, height).
pub fn decode_mp4(path: &Path) -> (usize, usize, usize) {
    let file = std::fs::File::open(path).unwrap();
    let size = file.metadata().unwrap().len();
    let mut reader = mp4::Mp4Reader::read_header(std::io::BufReader::new(file), size).unwrap();
    let (id, w, h, sps, pps) = {
        let (id, track) = reader.tracks().iter().next().unwrap();
        let avc = &track.trak.mdia.minf.stbl.stsd.avc1.as_ref().unwrap().avcc;
        let sets = (
            avc.sequence_parameter_sets[0].bytes.clone(),
            avc.picture_parameter_sets[0].bytes.clone(),
        );
        (*id, track.width() as usize, track.height() as usize, sets.0, sets.1)
    };
    let annex_b = |nal: &[u8], out: &mut Vec<u8>| {
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(nal);
    };
    let mut decoder = openh264::decoder::Decoder::new().unwrap();
    let mut decoded = 0;
    for i in 1..=reader.sample_count(id).unwrap() {
        let sample = reader.read_sample(id, i).unwrap().unwrap();
        let mut packet = Vec::new();
        if i == 1 {
            annex_b(&sps, &mut packet);
            annex_b(&pps, &mut packet);
        }
        let mut rest = &sample.bytes[..];
        while rest.len() >= 4 {
            let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            annex_b(&rest[4..4 + n], &mut packet);
            rest = &rest[4 + n..];
        }
        if let Some(frame) = decoder.decode(&packet).unwrap() {
            assert_eq!(openh264::formats::YUVSource::dimensions(&frame), (w, h));
            decoded += 1;
        }
    }
    decoded += decoder.flush_remaining().unwrap().len();
    (decoded, w, h)
}
