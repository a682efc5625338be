//! The demo model: a tiny Wan2.1-architecture model trained in this project on procedural clips
//! of coloured shapes (`examples/train_demo.rs`), embedded in the binary as the default model.
//!
//! It is a toy: 32x32 pixels, 9 frames, a vocabulary of about 25 words. It is there to show that
//! the whole path (tokenizer, UMT5, DiT, scheduler, VAE) makes what a prompt says.

use crate::GenError;
use burn::tensor::backend::Backend;
use burn_store::{ModuleSnapshot, SafetensorsStore};
use chitu_dit::{WanDitConfig, WanTransformer};
use chitu_text::{T5Tokenizer, Umt5Config, Umt5Encoder};
use chitu_vae::{WanVae, WanVaeConfig};

/// Seed of the demo model's training run (and of its frozen, randomly initialised UMT5).
pub const DEMO_SEED: u64 = 2026;
/// Height and width of the clips the demo model was trained on.
pub const DEMO_SIZE: usize = 32;
/// Frames of the clips the demo model was trained on.
pub const DEMO_FRAMES: usize = 9;
/// Latent channels of the demo VAE.
pub const DEMO_Z: usize = 8;
/// Tokens each prompt is padded to, in training and by `DiffusionUserParams::demo`, so that the
/// DiT sees the same zero padding when it generates. The longest caption is 20 tokens; a longer
/// padding only adds identical keys that outnumber the words in cross-attention.
pub const DEMO_TEXT_LEN: usize = 24;

/// A unigram `tokenizer.json` in the layout of the T5 tokenizers: `<pad>`, `</s>`, `<unk>`, then
/// each of `words` as one piece, then the letters and `▁` so that any other word still
/// tokenizes (letter by letter, which the model was never trained on).
pub fn tokenizer_json(words: &[&str]) -> String {
    let mut vocab: Vec<(String, f64)> = vec![("<pad>".into(), 0.0), ("</s>".into(), 0.0), ("<unk>".into(), 0.0)];
    vocab.extend(words.iter().map(|w| (format!("▁{w}"), -1.0)));
    vocab.push(("▁".into(), -8.0));
    vocab.extend(('a'..='z').map(|c| (c.to_string(), -10.0)));
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<pad>"), special(1, "</s>"), special(2, "<unk>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFKC"},
            {"type": "Lowercase"},
            {"type": "Replace", "pattern": {"String": " {2,}"}, "content": " "}
        ]},
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}},
        "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
        "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": false}
    });
    serde_json::to_string_pretty(&json).expect("a JSON value serialises")
}

/// The demo UMT5: 2 layers of width 32 (kept frozen at its seeded random initialisation: the
/// DiT learns to read it).
pub fn text_config(vocab_size: usize) -> Umt5Config {
    Umt5Config {
        vocab_size,
        d_model: 32,
        d_kv: 8,
        d_ff: 64,
        num_heads: 4,
        num_layers: 2,
        ..Umt5Config::umt5_xxl()
    }
}

/// The demo DiT: Wan2.1's architecture at width 128 (4 heads of 32), 4 blocks.
pub fn dit_config() -> WanDitConfig {
    WanDitConfig {
        num_heads: 4,
        head_dim: 32,
        in_channels: DEMO_Z,
        out_channels: DEMO_Z,
        text_dim: 32,
        ffn_dim: 384,
        num_layers: 4,
        ..WanDitConfig::wan21_t2v_1_3b()
    }
}

/// The demo VAE: Wan2.1's architecture at base width 8, one residual block per stage, 8 latent
/// channels; `latents_mean` and `latents_std` are measured on the training clips after the VAE
/// is trained.
pub fn vae_config(latents_mean: Vec<f64>, latents_std: Vec<f64>) -> WanVaeConfig {
    WanVaeConfig {
        base_dim: 8,
        z_dim: DEMO_Z,
        // Two downsamplings, both in space and time: 4x4 pixels per latent, so that a 32x32
        // clip has 8x8 latents (4x4 DiT tokens per frame) and a shape of a few pixels survives.
        dim_mult: vec![1, 2, 4],
        temperal_downsample: vec![true, true],
        num_res_blocks: 1,
        latents_mean,
        latents_std,
        ..WanVaeConfig::default()
    }
}

/// The demo model's files, by name, as `examples/train_demo.rs` writes them.
pub const FILES: [&str; 5] = [
    "tokenizer.json",
    "text_encoder.safetensors",
    "transformer.safetensors",
    "vae.safetensors",
    "vae_stats.json",
];

/// The contents of the demo model's [`FILES`], in that order.
pub struct DemoFiles<'a>(pub [&'a [u8]; 5]);

/// The trained files, embedded when the tree has them (see `build.rs`).
#[cfg(chitu_demo_assets)]
const EMBEDDED: DemoFiles<'static> = DemoFiles([
    include_bytes!("../assets/demo/tokenizer.json"),
    include_bytes!("../assets/demo/text_encoder.safetensors"),
    include_bytes!("../assets/demo/transformer.safetensors"),
    include_bytes!("../assets/demo/vae.safetensors"),
    include_bytes!("../assets/demo/vae_stats.json"),
]);

/// The embedded demo model's files; a build from a tree without them (one that is retraining
/// the model from scratch) has none, and says how to make them.
pub(crate) fn embedded() -> Result<DemoFiles<'static>, GenError> {
    #[cfg(chitu_demo_assets)]
    return Ok(EMBEDDED);
    #[cfg(not(chitu_demo_assets))]
    Err(GenError::Embedded {
        file: "assets/demo",
        message: "this build has no trained demo model: run `cargo run --release --example train_demo`".into(),
    })
}

/// The demo model's parts, built at their configs and loaded from its files.
pub(crate) struct DemoParts<B: Backend> {
    pub tokenizer: T5Tokenizer,
    pub text: Umt5Encoder<B>,
    pub dit: WanTransformer<B>,
    pub vae: WanVae<B>,
}

/// Builds the demo model's parts on `device`, at f32, from `files`.
pub(crate) fn load<B: Backend>(files: &DemoFiles, device: &B::Device) -> Result<DemoParts<B>, GenError> {
    let [tokenizer, text, dit, vae, stats] = files.0;
    let tokenizer = T5Tokenizer::from_json_bytes(tokenizer)?;
    #[derive(serde::Deserialize)]
    struct Stats {
        latents_mean: Vec<f64>,
        latents_std: Vec<f64>,
    }
    let stats: Stats = serde_json::from_slice(stats).map_err(|e| fault(FILES[4], e))?;
    let text_model = Umt5Encoder::new(text_config(tokenizer.vocab_size()), device)?;
    let dit_model = WanTransformer::new(dit_config(), device)?;
    let vae_model = WanVae::new(vae_config(stats.latents_mean, stats.latents_std), device)?;
    Ok(DemoParts {
        text: fill(text_model, text, FILES[1])?,
        dit: fill(dit_model, dit, FILES[2])?,
        vae: fill(vae_model, vae, FILES[3])?,
        tokenizer,
    })
}

fn fault(file: &'static str, e: impl std::fmt::Display) -> GenError {
    GenError::Embedded {
        file,
        message: e.to_string(),
    }
}

/// `model` with every parameter from the safetensors `bytes` (saved from the same module by
/// burn-store); a missing or misshapen tensor is an error, not a random weight left behind.
fn fill<B: Backend, M: ModuleSnapshot<B>>(mut model: M, bytes: &[u8], file: &'static str) -> Result<M, GenError> {
    let mut store = SafetensorsStore::from_bytes(Some(bytes.to_vec()));
    let result = model.load_from(&mut store).map_err(|e| fault(file, e))?;
    if !result.missing.is_empty() || !result.errors.is_empty() {
        let missing: Vec<&str> = result.missing.iter().map(|(path, _)| path.as_str()).collect();
        return Err(fault(file, format!("missing {missing:?}, errors {:?}", result.errors)));
    }
    Ok(model)
}
