//! How much memory a request needs at its largest stage, and whether the machine has it.
//!
//! On the CPU backend a failed host allocation aborts the process (burn has no fallible
//! allocation), so the estimate, made before anything is allocated, is the defence: a request
//! that cannot fit is refused, saying what would. The figures are the weights each stage holds
//! (measured from the loaded modules) plus the stage's working memory, from per-token and
//! per-pixel costs fitted to the full-size Wan2.1-1.3B runs in BENCHMARKS.md (measured peak
//! 10.64 GB in bf16 where this says 10.78 GB).

use crate::{DiffusionBackend, DiffusionUserParams, GenError, MemoryLevel};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Tensor};
use std::fmt;

/// Bytes of every float tensor of `module`, in the dtype each is held in.
pub fn module_bytes<B: Backend, M: Module<B>>(module: &M) -> u64 {
    struct Sum(u64);
    impl<B: Backend> ModuleVisitor<B> for Sum {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let t = param.val();
            self.0 += chitu_store::tensor_bytes(t.dtype(), t.shape().num_elements() as u64);
        }
    }
    let mut sum = Sum(0);
    module.visit(&mut sum);
    sum.0
}

/// The three stages of a request, for the estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EstimatedStage {
    /// Encoding the prompts.
    TextEncode,
    /// The denoise loop.
    Denoise,
    /// The VAE decode.
    VaeDecode,
}

impl fmt::Display for EstimatedStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TextEncode => "text encoding",
            Self::Denoise => "denoising",
            Self::VaeDecode => "the VAE decode",
        })
    }
}

/// A request's estimated peak memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// The stage that needs the most.
    pub stage: EstimatedStage,
    /// Bytes it needs: the weights it holds plus its working memory.
    pub bytes: u64,
}

/// The process itself and the small tensors no formula lists; the allocator's slack is taken as
/// a twentieth on top of the rest.
const BASELINE: u64 = 128 << 20;
/// Working memory of the Wan VAE decode (base width 96): a fixed part plus a part per pixel of
/// the area it decodes at once (the frame, or one row of tiles). Fitted to the two decodes
/// BENCHMARKS.md measures, 240x416 (2.35 GB peak) and 480x832 (4.27 GB), less the weights;
/// both parts scale with the VAE's width.
const VAE_FIXED: u64 = 1_200_000_000;
const VAE_BYTES_PER_PIXEL: u64 = 7_500;
const VAE_WIDTH: u64 = 96;
/// Rows of a row of tiles (a 256-pixel tile and its blend margin).
const TILE_ROWS: u64 = 320;
/// Most bytes of attention scores the DiT's blocked kernel holds.
const SCORES: u64 = chitu_dit::SCORE_BUDGET_BYTES as u64;

/// What the memory estimate needs to know of a model: the bytes its weights take as held, and
/// the shapes that set each stage's working memory. Taken from a loaded backend
/// ([`DiffusionBackend::sizes`]) or, for a plan made before loading, from a folder's configs
/// (`ModelSizes::of_folder`).
#[derive(Debug, Clone)]
pub struct ModelSizes {
    /// The text encoder's weights (its token table stays in its file).
    pub text_weights: u64,
    /// Each DiT's weights.
    pub dit_weights: Vec<u64>,
    /// The VAE's weights.
    pub vae_weights: u64,
    /// The text encoder's shape.
    pub text: chitu_text::Umt5Config,
    /// The DiTs' shape (both experts share it).
    pub dit: Option<chitu_dit::WanDitConfig>,
    /// The VAE's base width (the wider of its encoder's and decoder's).
    pub vae_base_dim: usize,
    /// The VAE's latent channels.
    pub vae_z_dim: usize,
    /// The VAE's pixels per latent (8, or 16 for Wan2.2's).
    pub vae_spatial: usize,
    /// Whether the linear layers are held narrower than f32, so that each widens its weight into
    /// a buffer per thread as it runs.
    pub narrow: bool,
    /// Bytes held through every stage besides the models: the merged LoRAs' deltas.
    pub lora_bytes: u64,
}

/// One stage's estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageEstimate {
    /// The stage.
    pub stage: EstimatedStage,
    /// Bytes of weights resident during it.
    pub weights: u64,
    /// Its peak: the weights, its working memory, the allocator's slack and the process.
    pub bytes: u64,
}

/// Each stage's estimate for `params` at memory level `memory`; `release_after_use` is
/// [`crate::LoadOptions::release_after_use`].
pub fn estimate_stages(
    sizes: &ModelSizes,
    params: &DiffusionUserParams,
    memory: MemoryLevel,
    release_after_use: bool,
) -> [StageEstimate; 3] {
    let f32_bytes = 4u64;
    let text_w = sizes.text_weights;
    let (dit_sum, dit_max) = (
        sizes.dit_weights.iter().sum::<u64>(),
        sizes.dit_weights.iter().copied().max().unwrap_or(0),
    );
    let vae_w = sizes.vae_weights;
    let text_away = memory.parks_text() || release_after_use;
    let dits_away = memory.parks_dits() || release_after_use;

    let t = &sizes.text;
    let l = params.max_sequence_length as u64;
    let widened = |rows: usize, cols: usize| {
        if sizes.narrow {
            (rows * cols) as u64 * f32_bytes
        } else {
            0
        }
    };
    let text_act = f32_bytes * l * (8 * t.d_model as u64 + 3 * t.d_ff as u64)
        + f32_bytes * (t.num_heads as u64) * l * l
        + widened(t.d_model, t.d_ff);

    let [_, z, lt, lh, lw] = params.latent_shape(sizes.vae_z_dim, sizes.vae_spatial);
    let latent = (z * lt * lh * lw) as u64 * f32_bytes;
    let dit_act = match &sizes.dit {
        Some(c) => {
            let [pt, ph, pw] = c.patch_size;
            let s = (lt.div_ceil(pt) * (lh / ph) * (lw / pw)) as u64;
            let scores = (f32_bytes * c.num_heads as u64)
                .saturating_mul(s)
                .saturating_mul(s)
                .min(SCORES);
            f32_bytes * s * (12 * c.dim() as u64 + 3 * c.ffn_dim as u64)
                + scores
                + 2 * f32_bytes * l * c.dim() as u64
                + 6 * latent
                + widened(c.dim(), c.ffn_dim)
        }
        None => 6 * latent,
    };

    let (h, w) = (params.height as u64, params.width as u64);
    let video = 3 * params.num_frames as u64 * h * w * f32_bytes;
    let rows = if memory.tiled_decode() { h.min(TILE_ROWS) } else { h };
    let width = sizes.vae_base_dim as u64;
    let vae_act = (VAE_FIXED + VAE_BYTES_PER_PIXEL * rows * w) * width / VAE_WIDTH + 2 * video;
    // Image-to-video encodes its pictures in the encode stage, untiled: TI2V-5B (the model with
    // the 16x Wan2.2 VAE) one frame, I2V-A14B (Wan2.1's VAE) the whole condition video. Bounded
    // by the untiled decode's model at that size.
    let picture_frames = match (&params.image, &params.last_image) {
        (None, _) => 0,
        (Some(_), _) if sizes.vae_spatial > 8 => 1,
        (Some(_), _) => params.num_frames as u64,
    };
    let encode_act = match picture_frames {
        0 => 0,
        n => (VAE_FIXED + VAE_BYTES_PER_PIXEL * h * w) * width / VAE_WIDTH + 2 * 3 * n * h * w * f32_bytes,
    };

    let resident_text = |active: bool| if active || !text_away { text_w } else { 0 };
    let resident_dits = if dits_away { 0 } else { dit_sum };
    let denoise_dits = if memory.parks_dits() { dit_max } else { dit_sum };
    let stage = |stage, weights: u64, working: u64| {
        let weights = weights + vae_w + sizes.lora_bytes;
        let bytes = weights + working;
        StageEstimate {
            stage,
            weights,
            bytes: bytes + bytes / 20 + BASELINE,
        }
    };
    [
        stage(
            EstimatedStage::TextEncode,
            resident_text(true) + resident_dits,
            text_act.max(encode_act),
        ),
        stage(
            EstimatedStage::Denoise,
            resident_text(false) + denoise_dits,
            dit_act + latent,
        ),
        stage(EstimatedStage::VaeDecode, resident_text(false) + resident_dits, vae_act),
    ]
}

/// The largest of `stages`.
pub fn largest(stages: &[StageEstimate]) -> MemoryEstimate {
    let top = stages.iter().max_by_key(|s| s.bytes).copied();
    MemoryEstimate {
        stage: top.map_or(EstimatedStage::Denoise, |s| s.stage),
        bytes: top.map_or(BASELINE, |s| s.bytes),
    }
}

impl<B: Backend> DiffusionBackend<B> {
    /// The sizes of this backend's models, as loaded.
    pub fn sizes(&self) -> ModelSizes {
        ModelSizes {
            text_weights: self.text.weight_bytes(),
            dit_weights: self.model_pool.iter().map(|d| d.weight_bytes()).collect(),
            vae_weights: module_bytes(&self.vae),
            text: self.text.shell().1.clone(),
            dit: self.model_pool.first().map(|m| m.shell().clone()),
            vae_base_dim: self
                .vae
                .config
                .decoder_base_dim
                .unwrap_or(0)
                .max(self.vae.config.base_dim),
            vae_z_dim: self.vae.config.z_dim,
            vae_spatial: self.vae.config.spatial_factor(),
            narrow: self.dtype != chitu_store::Precision::F32 || self.weights != chitu_store::Weights::Float,
            lora_bytes: self.lora_report().delta_bytes,
        }
    }

    /// Each stage's estimate for `params` at memory level `memory` on this backend.
    pub fn stage_estimates(&self, params: &DiffusionUserParams, memory: MemoryLevel) -> [StageEstimate; 3] {
        estimate_stages(&self.sizes(), params, memory, self.release_after_use)
    }

    /// The peak memory `params` needs at memory level `memory` on this backend's device.
    pub fn estimate_memory(&self, params: &DiffusionUserParams, memory: MemoryLevel) -> MemoryEstimate {
        largest(&self.stage_estimates(params, memory))
    }

    /// Refuses, on a backend whose device is host memory, a request whose estimate exceeds the
    /// memory available now, saying what would fit. Other backends report device out-of-memory
    /// as an error of its own when it happens.
    pub fn check_fits(&self, params: &DiffusionUserParams) -> Result<(), GenError> {
        if !chitu_host::host_kernels::<B>() {
            return Ok(());
        }
        // What this process holds already (the loaded models) counts: the estimate is of its
        // whole peak, and the models it holds are part of it.
        let Some(available) = reachable_memory() else {
            return Ok(());
        };
        let memory = self.memory(params.low_mem);
        let need = self.estimate_memory(params, memory);
        if need.bytes <= available {
            return Ok(());
        }
        let fits = |p: &DiffusionUserParams, m: MemoryLevel| self.estimate_memory(p, m).bytes <= available;
        let mut ways = Vec::new();
        if !memory.tiled_decode() && fits(params, MemoryLevel(1.max(memory.0))) {
            ways.push("--low-mem 1 (a tiled decode) would fit".to_string());
        }
        if ways.is_empty() {
            ways = smaller_requests(fits, params, memory);
        }
        let available = format!("{:.1} GB of memory is available", available as f64 / 1e9);
        Err(too_big(params, need, &available, &ways))
    }
}

/// The refusal of a request whose estimate `need` exceeds what `available` says there is, with
/// `ways` it would fit.
pub(crate) fn too_big(
    params: &DiffusionUserParams,
    need: MemoryEstimate,
    available: &str,
    ways: &[String],
) -> GenError {
    GenError::Params(format!(
        "{}x{} with {} frames needs about {:.1} GB at its largest stage ({}), and {available}: {}",
        params.width,
        params.height,
        params.num_frames,
        need.bytes as f64 / 1e9,
        need.stage,
        ways.join("; ")
    ))
}

/// Smaller versions of `params` that `fits` at `memory`: the most frames (4k+1) at this size, else
/// the size halved until it fits, in the multiples of 16 the model takes.
pub(crate) fn smaller_requests(
    fits: impl Fn(&DiffusionUserParams, MemoryLevel) -> bool,
    params: &DiffusionUserParams,
    memory: MemoryLevel,
) -> Vec<String> {
    let mut ways = Vec::new();
    let fewer = (0..(params.num_frames.saturating_sub(1)) / 4).rev().map(|k| 4 * k + 1);
    if let Some(frames) = fewer.clone().find(|&f| {
        fits(
            &DiffusionUserParams {
                num_frames: f,
                ..params.clone()
            },
            memory,
        )
    }) {
        ways.push(format!("{frames} frames at this size would fit"));
    }
    if ways.is_empty() {
        let smaller = (1..=6).map(|k| 1usize << k).find_map(|div| {
            let (h, w) = (params.height / div / 16 * 16, params.width / div / 16 * 16);
            let p = DiffusionUserParams {
                height: h,
                width: w,
                ..params.clone()
            };
            (h >= 16 && w >= 16 && fits(&p, memory))
                .then(|| format!("{w}x{h} with {} frames would fit", params.num_frames))
        });
        ways.push(smaller.unwrap_or_else(|| "even a 16-pixel video of this length would not fit".into()));
    }
    ways
}

/// The memory this process can reach in all: what it holds now (`VmRSS`) plus what it can still
/// take ([`available_memory`]). `None` where that cannot be read.
pub fn reachable_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok();
    let rss = status.as_deref().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    });
    Some(available_memory()? + rss.unwrap_or(0))
}

/// The memory this process can still take: the kernel's `MemAvailable`, or what is left under
/// the process's cgroup limit when that is lower. `None` where neither can be read.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let available = meminfo.as_deref().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    });
    let read = |p: &str| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
    let cgroup = match (read("/sys/fs/cgroup/memory.max"), read("/sys/fs/cgroup/memory.current")) {
        (Some(max), Some(current)) => Some(max.saturating_sub(current)),
        _ => None,
    };
    match (available, cgroup) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}
