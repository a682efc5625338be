//! Tokenizer and UMT5 encoder against transformers, and Wan's own checkpoint layout.

use chitu::text::{T5Tokenizer, TextEncoder, Umt5Config};
use chitu::{default_device, DefaultBackend as B};
use chitu_parity::tensors::{rel_l2, HostTensor};
use chitu_parity::{text, Case};
use std::path::{Path, PathBuf};

use crate::common;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

fn model_dir() -> PathBuf {
    fixtures().join("models/wan21")
}

fn floats(t: burn::tensor::Tensor<B, 3>) -> Vec<f32> {
    HostTensor::from_backend(t).unwrap().as_f32("t").unwrap().to_vec()
}

#[test]
fn every_output_matches_transformers() {
    let case = Case::load(&fixtures(), "text_encode").unwrap();
    for (name, out) in text::encode::<B>(&case, &default_device()).unwrap() {
        let e = chitu_parity::tensors::compare(name, &out, case.tensor(name).unwrap()).unwrap();
        let tol = if name.contains("ids") || name.contains("mask") {
            0.0
        } else {
            1e-4
        };
        assert!(e <= tol, "{name}: {e}");
    }
}

#[test]
fn embeddings_are_zero_past_each_prompt_and_empty_prompt_works() {
    let enc = TextEncoder::<B>::from_pipeline_dir(model_dir(), &default_device()).unwrap();
    let embeds = floats(enc.encode_prompt(&["A cat walking on grass", ""], 24).unwrap());
    let d = enc.encoder.config.d_model;
    let row = |r: usize, p: usize| &embeds[(r * 24 + p) * d..(r * 24 + p + 1) * d];
    // The empty prompt is just `</s>`: one live position, the rest exactly zero.
    assert!(row(1, 0).iter().any(|&v| v != 0.0));
    assert!((1..24).all(|p| row(1, p).iter().all(|&v| v == 0.0)));
    let ids = enc.tokenizer.encode(&["A cat walking on grass"], 24).unwrap();
    let n = ids.len(0);
    assert!(row(0, n - 1).iter().any(|&v| v != 0.0));
    assert!((n..24).all(|p| row(0, p).iter().all(|&v| v == 0.0)));
}

#[test]
fn long_prompts_are_truncated_keeping_the_closing_token() {
    let tok = T5Tokenizer::from_file(model_dir().join("tokenizer/tokenizer.json")).unwrap();
    let long = "a cat walking on grass ".repeat(40);
    let enc = tok.encode(&[&long], 8).unwrap();
    assert_eq!(enc.ids.len(), 8);
    assert_eq!(enc.mask, vec![1; 8]);
    assert_eq!(enc.ids[7], 1, "last id must be </s>: {:?}", enc.ids);
    let short = tok.encode(&[&long], 64).unwrap();
    assert_eq!(&short.ids[..7], &enc.ids[..7]);
    // Cleaning folds whitespace and unescapes HTML before tokenizing.
    assert_eq!(
        tok.encode(&["  A   cat&#32;walking\ton grass "], 24).unwrap(),
        tok.encode(&["A cat walking on grass"], 24).unwrap()
    );
}

#[test]
fn missing_tokenizer_names_the_path() {
    let e = T5Tokenizer::from_file("/nonexistent/tokenizer/tokenizer.json")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/nonexistent/tokenizer/tokenizer.json"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let e = TextEncoder::<B>::from_pipeline_dir(dir.path(), &default_device())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn wan_checkpoint_layout_loads_to_the_same_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("umt5-enc.safetensors");
    common::write_wan_t5(&model_dir(), &ckpt, None);
    let config: Umt5Config =
        serde_json::from_str(&std::fs::read_to_string(model_dir().join("text_encoder/config.json")).unwrap()).unwrap();
    let tok = model_dir().join("tokenizer/tokenizer.json");
    let dev = default_device();
    let wan = TextEncoder::<B>::from_wan_files(&ckpt, &tok, config.clone(), &dev).unwrap();
    let hf = TextEncoder::<B>::from_pipeline_dir(model_dir(), &dev).unwrap();
    let prompts = ["A cat walking on grass", "blurry, low quality, static"];
    let a = floats(wan.encode_prompt(&prompts, 24).unwrap());
    let b = floats(hf.encode_prompt(&prompts, 24).unwrap());
    assert_eq!(rel_l2(&a, &b), 0.0);

    // A renamed checkpoint with a tensor missing fails and names it.
    common::write_wan_t5(&model_dir(), &ckpt, Some("blocks.1.ffn.gate.0.weight"));
    let e = TextEncoder::<B>::from_wan_files(&ckpt, &tok, config, &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("blocks.1.ffn.wi_0.weight"), "{e}");
}

#[test]
fn token_table_in_file_or_on_device_gives_the_same_states() {
    use chitu::text::{TextLayout, TokenTable, Umt5Encoder};
    let dir = model_dir().join("text_encoder");
    let config: Umt5Config = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let files = [dir.join("model.safetensors")];
    let dev = default_device();
    let load = |table| {
        Umt5Encoder::<B>::new(config.clone(), &dev).unwrap().load_weights_with(
            &files,
            TextLayout::Transformers,
            table,
            chitu::text::Precision::F32,
        )
    };
    let in_file = load(TokenTable::InFile).unwrap();
    let on_device = load(TokenTable::OnDevice).unwrap();
    assert!(in_file.token_embedding.is_none() && in_file.token_rows.is_some());
    assert!(on_device.token_embedding.is_some() && on_device.token_rows.is_none());
    // Repeated ids (padding) and the last row of the table.
    let last = config.vocab_size as i64 - 1;
    let ids = [5, 0, last, 0, 0, 17, 5, 1];
    let mask = [1, 1, 1, 1, 1, 1, 0, 0];
    let a = floats(in_file.forward(&ids, &mask, 2, &dev).unwrap());
    let b = floats(on_device.forward(&ids, &mask, 2, &dev).unwrap());
    assert_eq!(a, b);

    // A table of another size than the config's is refused, naming the tensor and both shapes.
    let small = Umt5Config {
        vocab_size: config.vocab_size - 1,
        ..config.clone()
    };
    let e = Umt5Encoder::<B>::new(small, &dev)
        .unwrap()
        .load_weights(&files, TextLayout::Transformers)
        .unwrap_err()
        .to_string();
    assert!(e.contains("token_embedding.weight") && e.contains("bad tensors"), "{e}");
}

/// Wan ships its UMT5 as a bf16 PyTorch pickle; `tests/fixtures/wan_pth/make.py` wrote the tiny
/// encoder that way and as safetensors from the same bf16 tensors.
#[test]
fn a_bf16_wan_pickle_loads_to_the_same_encoder_as_its_safetensors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wan_pth");
    let config: Umt5Config =
        serde_json::from_str(&std::fs::read_to_string(model_dir().join("text_encoder/config.json")).unwrap()).unwrap();
    let tok = model_dir().join("tokenizer/tokenizer.json");
    let dev = default_device();
    let pth = TextEncoder::<B>::from_wan_files(dir.join("umt5.pth"), &tok, config.clone(), &dev).unwrap();
    let st = TextEncoder::<B>::from_wan_files(dir.join("umt5.safetensors"), &tok, config, &dev).unwrap();
    // A pickle's table loads whole; the safetensors one stays in its file.
    assert!(pth.encoder.token_embedding.is_some() && pth.encoder.token_rows.is_none());
    assert!(st.encoder.token_rows.is_some());
    let prompts = ["A cat walking on grass", "blurry, low quality, static"];
    let a = floats(pth.encode_prompt(&prompts, 24).unwrap());
    let b = floats(st.encode_prompt(&prompts, 24).unwrap());
    assert!(a.iter().any(|&v| v != 0.0));
    assert_eq!(a, b);
    // bf16 weights give states near, not equal to, the f32 checkpoint's.
    let f32_states = TextEncoder::<B>::from_pipeline_dir(model_dir(), &dev).unwrap();
    let c = floats(f32_states.encode_prompt(&prompts, 24).unwrap());
    let e = rel_l2(&a, &c);
    assert!(e > 0.0 && e < 2e-2, "{e}");
}
