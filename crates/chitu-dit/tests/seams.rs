//! The seams later features rely on: hooks see and may replace every sub-layer; configs parse.

use burn::tensor::{Distribution, Tensor};
use burn_flex::Flex;
use chitu_dit::{BlockHook, BlockPart, WanDitConfig, WanTransformer};
use std::collections::HashMap;

fn tiny() -> WanDitConfig {
    WanDitConfig {
        num_heads: 2,
        head_dim: 12,
        text_dim: 8,
        ffn_dim: 32,
        num_layers: 3,
        ..WanDitConfig::wan21_t2v_1_3b()
    }
}

fn inputs(dev: &<Flex as burn::tensor::backend::BackendTypes>::Device) -> (Tensor<Flex, 5>, Tensor<Flex, 3>) {
    (
        Tensor::random([1, 16, 2, 4, 6], Distribution::Normal(0.0, 1.0), dev),
        Tensor::random([1, 5, 8], Distribution::Normal(0.0, 1.0), dev),
    )
}

/// Counts calls and, for one part, returns a stored value instead of computing.
struct Recorder {
    seen: HashMap<(usize, BlockPart), usize>,
    computed: usize,
    replace: Option<(BlockPart, Tensor<Flex, 3>)>,
}

impl BlockHook<Flex> for Recorder {
    fn part(&mut self, block: usize, part: BlockPart, compute: &mut dyn FnMut() -> Tensor<Flex, 3>) -> Tensor<Flex, 3> {
        *self.seen.entry((block, part)).or_default() += 1;
        match &self.replace {
            Some((p, t)) if *p == part => t.clone(),
            _ => {
                self.computed += 1;
                compute()
            }
        }
    }
}

#[test]
fn hook_sees_every_part_and_can_skip_computation() {
    let dev = Default::default();
    let model = WanTransformer::<Flex>::new(tiny(), &dev).unwrap();
    let (x, ctx) = inputs(&dev);
    let plain = model.forward(x.clone(), &[500.0], ctx.clone()).unwrap();

    let mut rec = Recorder {
        seen: HashMap::new(),
        computed: 0,
        replace: None,
    };
    let hooked = model
        .forward_with(x.clone(), &[500.0], ctx.clone(), &model.config.attention, &mut rec)
        .unwrap();
    hooked.into_data().assert_eq(&plain.clone().into_data(), true);
    assert_eq!(rec.seen.len(), 3 * 3);
    assert!(rec.seen.values().all(|&n| n == 1));
    assert_eq!(rec.computed, 9);

    // Supplying the FFN output skips its computation and changes the result.
    let zeros = Tensor::<Flex, 3>::zeros([1, 12, 24], &dev);
    let mut rec = Recorder {
        seen: HashMap::new(),
        computed: 0,
        replace: Some((BlockPart::Ffn, zeros)),
    };
    let replaced = model
        .forward_with(x, &[500.0], ctx, &model.config.attention, &mut rec)
        .unwrap();
    assert_eq!(rec.computed, 6);
    let diff: f32 = (replaced - plain).abs().max().into_scalar();
    assert!(diff > 0.0);
}

#[test]
fn presets_have_wan_widths() {
    assert_eq!(WanDitConfig::wan21_t2v_1_3b().dim(), 1536);
    assert_eq!(WanDitConfig::wan21_t2v_14b().dim(), 5120);
    assert_eq!(WanDitConfig::wan22_t2v_a14b_expert().num_layers, 40);
}

#[test]
fn both_config_dialects_parse_to_the_same_shape() {
    let diffusers = serde_json::json!({"_class_name": "WanTransformer3DModel", "num_attention_heads": 12,
        "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30, "text_dim": 4096});
    let wan = serde_json::json!({"_class_name": "WanModel", "model_type": "t2v", "dim": 1536, "ffn_dim": 8960,
        "num_heads": 12, "num_layers": 30, "in_dim": 16, "out_dim": 16, "text_len": 512});
    let a = WanDitConfig::from_json(&diffusers).unwrap();
    let b = WanDitConfig::from_json(&wan).unwrap();
    assert_eq!(a, b);
    assert_eq!(a, WanDitConfig::wan21_t2v_1_3b());

    for bad in [
        serde_json::json!({"model_type": "i2v", "dim": 1536, "ffn_dim": 1, "num_heads": 12, "num_layers": 1}),
        serde_json::json!({"dim": 1536, "ffn_dim": 1, "num_heads": 7, "num_layers": 1}),
        serde_json::json!({"num_attention_heads": 2, "attention_head_dim": 8, "ffn_dim": 4, "num_layers": 1, "image_dim": 1280}),
        serde_json::json!({"num_attention_heads": 2, "attention_head_dim": 8, "ffn_dim": 4, "num_layers": 0}),
        serde_json::json!({"hello": 1}),
    ] {
        assert!(WanDitConfig::from_json(&bad).is_err(), "accepted {bad}");
    }
}
