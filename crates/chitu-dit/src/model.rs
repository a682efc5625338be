//! The whole Wan transformer, callable in pieces: embed, blocks `i..j`, head.

use crate::attention::AttentionOp;
use crate::block::{BlockHook, BlockInputs, NoHook, WanBlock};
use crate::embed::{timestep_embedding, unpatchify, RopeTables};
use crate::layers::{layer_norm, linear, modulate, ConditionEmbedder, PatchEmbed, TextProjection, TimestepEmbedding};
use crate::ulysses::SeqShard;
use crate::{DitError, WanDitConfig};
use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear};
use burn::tensor::activation::silu;
use burn::tensor::{backend::Backend, Tensor};
use chitu_host::mixed;
use std::ops::Range;

/// RoPE base frequency of Wan.
pub const ROPE_THETA: f64 = 10000.0;

/// diffusers' `WanTransformer3DModel` (text-to-video).
#[derive(Module, Debug)]
pub struct WanTransformer<B: Backend> {
    /// The 3D patch embedding (`patch_embedding`).
    pub patch_embedding: PatchEmbed<B>,
    /// Timestep and text embedders (`condition_embedder`).
    pub condition_embedder: ConditionEmbedder<B>,
    /// The transformer blocks (`blocks.N`).
    pub blocks: Vec<WanBlock<B>>,
    /// The output projection to patches (`proj_out`).
    pub proj_out: Linear<B>,
    /// `[1, 2, dim]`: shift and scale of the output head.
    pub scale_shift_table: Param<Tensor<B, 3>>,
    #[module(skip)]
    /// The shape this model was built with.
    pub config: WanDitConfig,
}

/// The output of [`WanTransformer::embed`]: tokens plus everything the blocks and head read.
#[derive(Debug, Clone)]
pub struct Embedded<B: Backend> {
    /// Patch tokens `[B, S, dim]`.
    pub tokens: Tensor<B, 3>,
    /// Time embedding `[B, dim]` (TeaCache's default-mode signal; the head's modulation input).
    pub temb: Tensor<B, 2>,
    /// Block inputs: modulation `e0` `[B, 6, dim]` (TeaCache's ret-steps signal), text, RoPE.
    pub inputs: BlockInputs<B>,
    /// The patched grid `(f, h, w)`.
    pub grid: [usize; 3],
    /// Which tokens this rank holds, in a sequence-parallel run.
    pub shard: Option<SeqShard<B>>,
    /// With a first-frame timestep: how many tokens latent frame 0 has in the whole sequence, and
    /// their time embedding `[B, dim]` for the head.
    pub first: Option<(usize, Tensor<B, 2>)>,
}

impl<B: Backend> WanTransformer<B> {
    /// A model with random weights, for tests and the embedded demo; loading replaces them.
    pub fn new(config: WanDitConfig, device: &B::Device) -> Result<Self, DitError> {
        config.validate()?;
        let dim = config.dim();
        let patch_out = config.out_channels * config.patch_size.iter().product::<usize>();
        Ok(Self {
            patch_embedding: PatchEmbed::new(config.in_channels, dim, config.patch_size, device),
            condition_embedder: ConditionEmbedder {
                time_embedder: TimestepEmbedding {
                    linear_1: linear(config.freq_dim, dim, device),
                    linear_2: linear(dim, dim, device),
                },
                time_proj: linear(dim, 6 * dim, device),
                text_embedder: TextProjection {
                    linear_1: linear(config.text_dim, dim, device),
                    linear_2: linear(dim, dim, device),
                },
            },
            blocks: (0..config.num_layers).map(|_| WanBlock::new(&config, device)).collect(),
            proj_out: linear(dim, patch_out, device),
            scale_shift_table: Initializer::Normal {
                mean: 0.0,
                std: 1.0 / (dim as f64).sqrt(),
            }
            .init([1, 2, dim], device),
            config,
        })
    }

    /// Checks input shapes against the config; returns the patched grid.
    pub fn check_inputs(&self, x: &[usize; 5], timesteps: usize, context: &[usize; 3]) -> Result<[usize; 3], DitError> {
        let c = &self.config;
        let [b, ch, f, h, w] = *x;
        let [pt, ph, pw] = c.patch_size;
        let bad = |msg: String| Err(DitError::Shape(msg));
        if ch != c.in_channels {
            return bad(format!(
                "latents have {ch} channels, the model expects {}",
                c.in_channels
            ));
        }
        if f % pt != 0 || h % ph != 0 || w % pw != 0 || f == 0 || h == 0 || w == 0 {
            return bad(format!(
                "latent size {f}x{h}x{w} is not a positive multiple of the patch {pt}x{ph}x{pw}"
            ));
        }
        let grid = [f / pt, h / ph, w / pw];
        if grid[0] > c.rope_max_seq_len || grid[1] > c.rope_max_seq_len || grid[2] > c.rope_max_seq_len {
            return bad(format!(
                "patched grid {grid:?} exceeds rope_max_seq_len {}",
                c.rope_max_seq_len
            ));
        }
        if timesteps != b {
            return bad(format!("{timesteps} timesteps for a batch of {b}"));
        }
        if context[0] != b || context[2] != c.text_dim {
            return bad(format!(
                "text states {context:?} do not match batch {b} and text_dim {}",
                c.text_dim
            ));
        }
        Ok(grid)
    }

    /// Patch embedding, time and text conditioning, and the RoPE tables of all tokens.
    /// `timesteps` holds one value per batch row.
    pub fn embed(&self, x: Tensor<B, 5>, timesteps: &[f64], context: Tensor<B, 3>) -> Result<Embedded<B>, DitError> {
        self.embed_at(x, timesteps, None, context)
    }

    /// [`WanTransformer::embed`] where the tokens of latent frame 0 may have their own timestep
    /// `first_frame` (Wan2.2 TI2V's `expand_timesteps` with an image: 0, the image is clean).
    pub fn embed_at(
        &self,
        x: Tensor<B, 5>,
        timesteps: &[f64],
        first_frame: Option<f64>,
        context: Tensor<B, 3>,
    ) -> Result<Embedded<B>, DitError> {
        let (tokens, mut e) = self.embed_without_rope(x, timesteps, first_frame, context)?;
        let seq = e.grid.iter().product();
        e.inputs.rope = RopeTables::new(e.grid, self.config.head_dim, ROPE_THETA, 0..seq, &tokens.device());
        e.tokens = tokens;
        Ok(e)
    }

    /// The time embedding `[B, dim]` and modulation input `[B, 6, dim]` of `timesteps`.
    fn time_conditioning(&self, timesteps: &[f64], device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 3>) {
        let dim = self.config.dim();
        let sinusoid = timestep_embedding::<B>(timesteps, self.config.freq_dim, device);
        let temb = self.condition_embedder.time_embedder.forward(sinusoid);
        let e0 =
            mixed::linear(&self.condition_embedder.time_proj, silu(temb.clone())).reshape([timesteps.len(), 6, dim]);
        (temb, e0)
    }

    /// [`WanTransformer::embed`] with empty tokens and RoPE tables, returning the tokens apart:
    /// a sharded run keeps only its own.
    pub(crate) fn embed_without_rope(
        &self,
        x: Tensor<B, 5>,
        timesteps: &[f64],
        first_frame: Option<f64>,
        context: Tensor<B, 3>,
    ) -> Result<(Tensor<B, 3>, Embedded<B>), DitError> {
        let grid = self.check_inputs(&x.dims(), timesteps.len(), &context.dims())?;
        if first_frame.is_some() && self.config.patch_size[0] != 1 {
            return Err(DitError::Shape(format!(
                "a first-frame timestep needs a temporal patch of 1, the model's is {}",
                self.config.patch_size[0]
            )));
        }
        let device = x.device();
        let [b, _, _, _, _] = x.dims();
        let dim = self.config.dim();
        let tokens = self.patch_embedding.forward(x);

        let (temb, e0) = self.time_conditioning(timesteps, &device);
        let first = first_frame.map(|t0| {
            let (temb0, e00) = self.time_conditioning(&vec![t0; b], &device);
            (grid[1] * grid[2], temb0, e00)
        });
        let context = self.condition_embedder.text_embedder.forward(context);
        let rope = RopeTables::new(grid, self.config.head_dim, ROPE_THETA, 0..0, &device);
        let embedded = Embedded {
            tokens: Tensor::empty([b, 0, dim], &device),
            temb,
            inputs: BlockInputs {
                e0,
                context,
                rope,
                self_attention: None,
                first: first.as_ref().map(|(k, _, e00)| (*k, e00.clone())),
            },
            grid,
            shard: None,
            first: first.map(|(k, temb0, _)| (k, temb0)),
        };
        Ok((tokens, embedded))
    }

    /// Runs blocks `range` on `x`, letting `hook` reuse or replace sub-layer outputs.
    pub fn forward_blocks(
        &self,
        mut x: Tensor<B, 3>,
        inputs: &BlockInputs<B>,
        range: Range<usize>,
        attn: &dyn AttentionOp<B>,
        hook: &mut dyn BlockHook<B>,
    ) -> Tensor<B, 3> {
        for i in range {
            x = self.blocks[i].forward(i, x, inputs, attn, hook);
        }
        x
    }

    /// The output head: modulated LayerNorm, projection, unpatchify to `[B, C, F, H, W]`.
    pub fn head(&self, x: Tensor<B, 3>, temb: Tensor<B, 2>, grid: [usize; 3]) -> Tensor<B, 5> {
        self.head_at(x, temb, None, grid)
    }

    /// [`WanTransformer::head`] with the first `k` tokens modulated by their own time embedding.
    pub fn head_at(
        &self,
        x: Tensor<B, 3>,
        temb: Tensor<B, 2>,
        first: Option<(usize, Tensor<B, 2>)>,
        grid: [usize; 3],
    ) -> Tensor<B, 5> {
        let table = self.scale_shift_table.val();
        let mods = table.clone() + temb.unsqueeze_dim(1);
        let first_mods = first.as_ref().map(|(_, t)| table + t.clone().unsqueeze_dim(1));
        let k = first.as_ref().map_or(0, |f| f.0);
        let eps = self.config.eps;
        let x = crate::block::split_tokens(x, k, |x, is_first| {
            let m = match (&first_mods, is_first) {
                (Some(f), true) => f,
                _ => &mods,
            };
            modulate(layer_norm(x, eps), m.clone().narrow(1, 0, 1), m.clone().narrow(1, 1, 1))
        });
        let x = mixed::linear(&self.proj_out, x);
        unpatchify(x, grid, self.config.patch_size, self.config.out_channels)
    }

    /// The full forward: the flow-matching velocity for latents `x` `[B, C, F, H, W]` at
    /// `timesteps` (one per row), conditioned on text states `context` `[B, L, text_dim]`.
    pub fn forward(&self, x: Tensor<B, 5>, timesteps: &[f64], context: Tensor<B, 3>) -> Result<Tensor<B, 5>, DitError> {
        self.forward_with(x, timesteps, context, &self.config.attention, &mut NoHook)
    }

    /// [`WanTransformer::forward`] with an explicit attention implementation and hook.
    pub fn forward_with(
        &self,
        x: Tensor<B, 5>,
        timesteps: &[f64],
        context: Tensor<B, 3>,
        attn: &dyn AttentionOp<B>,
        hook: &mut dyn BlockHook<B>,
    ) -> Result<Tensor<B, 5>, DitError> {
        let e = self.embed(x, timesteps, context)?;
        let x = self.forward_blocks(e.tokens, &e.inputs, 0..self.blocks.len(), attn, hook);
        Ok(self.head_at(x, e.temb, e.first, e.grid))
    }
}
