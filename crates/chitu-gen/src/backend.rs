//! The loaded models of one pipeline (Chitu's `DiffusionBackend`): a diffusers folder, a Wan
//! release folder, or the embedded tiny model, and what the memory levels keep off the device.

use crate::native::{find, is_wan_native, WanNativeConfig};
use crate::{DiffusionUserParams, GenError, Offloaded};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::DTypeUsage;
use burn::tensor::DType;
use burn::tensor::{backend::Backend, Tensor};
use chitu_dit::{WanDitConfig, WanTransformer};
use chitu_sched::SchedulerSpec;
use chitu_store::{cast_module, Cast, Format, Precision, Weights};
use chitu_text::{T5Tokenizer, TextEncoder, Umt5Encoder};
use chitu_vae::{WanVae, WanVaeConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How to load a model folder.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadOptions {
    /// The memory level the backend keeps at least (see [`MemoryLevel`]); from 2 the text
    /// encoder, and from 3 each DiT, is parked in host memory as soon as it loads, so the device
    /// never holds more than one of them while loading.
    pub low_mem: u8,
    /// The dtype of the DiT's and the text encoder's weight matrices. What diffusers keeps in
    /// f32 stays f32 (see `chitu_dit::KEEP_F32`); activations, latents and the scheduler are f32.
    pub dtype: Precision,
    /// The dtype of the VAE's conv kernels; f32 unless asked, as diffusers and Wan keep it.
    pub vae_dtype: Precision,
    /// How the DiT's and the text encoder's linear layers are held: in `dtype`, or as int8
    /// blocks quantized at load (chitu-store's [`Weights`]). The VAE has no linear layers.
    pub weights: Weights,
    /// For a run of one request (the CLI): each model is released when its stage ends, the text
    /// encoder once the prompts are encoded and the DiTs before the decode, so that the peak is
    /// the largest stage instead of the sum of the models. A later request reloads them from
    /// their files.
    pub release_after_use: bool,
    /// LoRAs merged into the DiTs once they load ([`DiffusionBackend::apply_lora`]).
    pub loras: Vec<crate::LoraSpec>,
    /// Apply what fits of each LoRA and skip (and report) the keys that do not, instead of
    /// refusing the LoRA.
    pub lora_partial: bool,
}

impl LoadOptions {
    /// How the DiTs and the text encoder are held.
    pub fn format(&self) -> Format {
        Format::new(self.dtype, self.weights)
    }

    /// `dit` released at once in a one-request run: loading it checked its files, and it comes
    /// back after the prompts are encoded, so that the text encoder and the DiTs are never
    /// resident together.
    fn released_if_one_shot<B: Backend>(
        &self,
        dit: Offloaded<B, WanTransformer<B>>,
    ) -> Result<Offloaded<B, WanTransformer<B>>, GenError> {
        if self.release_after_use {
            dit.release()?;
        }
        Ok(dit)
    }

    /// Refuses a dtype the backend cannot hold on `device`.
    fn check<B: Backend>(&self, device: &B::Device) -> Result<(), GenError> {
        for (what, precision) in [("dtype", self.dtype), ("VAE dtype", self.vae_dtype)] {
            if !B::supports_dtype(device, precision.dtype()) {
                return Err(GenError::Dtype {
                    what,
                    precision,
                    backend: B::name(device),
                });
            }
        }
        let int8 = DType::QFloat(chitu_store::int8_scheme(chitu_store::INT8_BLOCK));
        if self.weights == Weights::Int8 && !B::dtype_usage(device, int8).contains(DTypeUsage::Storage) {
            return Err(GenError::Weights {
                weights: self.weights,
                backend: B::name(device),
            });
        }
        Ok(())
    }
}

/// What a memory level (`--low-mem`) keeps off the device; the one place the levels are defined.
///
/// A request's `low_mem` can raise the backend's level for that request, never lower it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemoryLevel(pub u8);

impl MemoryLevel {
    /// From level 1: the VAE decodes in spatial tiles.
    pub fn tiled_decode(self) -> bool {
        self.0 >= 1
    }

    /// From level 2: the text encoder waits in host memory except while it encodes.
    pub fn parks_text(self) -> bool {
        self.0 >= 2
    }

    /// From level 3: only the active DiT is on the device.
    pub fn parks_dits(self) -> bool {
        self.0 >= 3
    }
}

/// Which Wan pipeline a model is: what a request may condition it on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PipelineKind {
    /// Text to video (Wan2.1, Wan2.2-T2V-A14B): no picture.
    #[default]
    TextToVideo,
    /// Wan2.2 TI2V-5B (`expand_timesteps`): text to video, or image to video with the picture
    /// as latent frame 0, whose tokens get timestep 0.
    TextImageToVideo,
    /// Wan2.2 I2V-A14B (`WanImageToVideoPipeline`): a picture is required (and a last one may be
    /// given); the DiT reads the latents beside a frame mask and the encoded condition video.
    ImageToVideo,
}

impl PipelineKind {
    /// The kind a diffusers `model_index.json` names.
    fn from_index(index: &serde_json::Value, path: &Path) -> Result<Self, GenError> {
        let class = index
            .get("_class_name")
            .and_then(|v| v.as_str())
            .unwrap_or("WanPipeline");
        let expand = index.get("expand_timesteps").and_then(|v| v.as_bool()).unwrap_or(false);
        let folder = |message: String| GenError::Folder {
            path: path.to_path_buf(),
            message,
        };
        if index
            .get("image_encoder")
            .and_then(|v| v.get(0))
            .is_some_and(|v| !v.is_null())
        {
            return Err(folder(
                "an image_encoder (Wan2.1 I2V/FLF2V's CLIP) is not supported yet; Wan2.2 I2V-A14B and TI2V-5B need none".into(),
            ));
        }
        match (class, expand) {
            ("WanPipeline" | "WanImageToVideoPipeline", true) => Ok(Self::TextImageToVideo),
            ("WanImageToVideoPipeline", false) => Ok(Self::ImageToVideo),
            ("WanPipeline", false) => Ok(Self::TextToVideo),
            (other, _) => Err(folder(format!(
                "_class_name {other} is not a pipeline chitu runs (WanPipeline, WanImageToVideoPipeline)"
            ))),
        }
    }

    /// Its name in messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::TextToVideo => "text-to-video",
            Self::TextImageToVideo => "text-and-image-to-video (TI2V)",
            Self::ImageToVideo => "image-to-video (I2V)",
        }
    }
}

/// Text encoder, a pool of one or two DiTs, the VAE and the scheduler of a model.
///
/// The text encoder and the DiTs can be parked in host memory between uses (`low_mem` 2 and 3);
/// [`Offloaded::with`] brings them back.
pub struct DiffusionBackend<B: Backend> {
    /// The text encoder (tokenizer and UMT5).
    pub text: Offloaded<B, TextEncoder<B>>,
    /// `transformer` then, for Wan2.2-A14B, `transformer_2` (the low-noise expert).
    pub model_pool: Vec<Offloaded<B, WanTransformer<B>>>,
    /// The pool switches to its second model once `t < boundary_ratio * num_train_timesteps`.
    pub boundary_ratio: Option<f64>,
    /// What a request may condition this model on (a picture or not).
    pub pipeline: PipelineKind,
    /// The VAE.
    pub vae: WanVae<B>,
    /// The folder's scheduler, parsed and checked at load.
    pub scheduler: SchedulerSpec,
    /// The device every model runs on.
    pub device: B::Device,
    /// The model's name in sidecars and logs (its folder, `embedded-demo` or `embedded-tiny`).
    pub name: String,
    /// The memory level this backend keeps at least.
    pub memory: MemoryLevel,
    /// The longest prompt the tokenizer is made for (its `model_max_length`; Wan's 512 when the
    /// folder does not say).
    pub text_max_len: usize,
    /// The dtype of the DiT's and the text encoder's weight matrices.
    pub dtype: Precision,
    /// How their linear layers are held ([`LoadOptions::weights`]).
    pub weights: Weights,
    /// Whether each model is released when its stage ends ([`LoadOptions::release_after_use`]).
    pub release_after_use: bool,
    /// The LoRAs merged into the pool's DiTs.
    pub(crate) lora: crate::lora::LoraStack<B>,
}

/// Wan's text length, for tokenizers that do not state theirs.
const WAN_TEXT_LEN: usize = 512;

/// The tokenizer's `model_max_length` from a `tokenizer_config.json` beside it, when it states
/// a usable one (transformers writes a 1e30 sentinel for "no limit").
fn text_max_len(tokenizer_dir: &Path) -> usize {
    chitu_store::read_json(&tokenizer_dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|c| c.get("model_max_length")?.as_u64())
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n > 0 && n <= 1 << 20)
        .unwrap_or(WAN_TEXT_LEN)
}

/// A two-expert switch point must lie strictly between the ends of the schedule.
fn check_boundary(path: &Path, boundary_ratio: Option<f64>) -> Result<(), GenError> {
    match boundary_ratio {
        Some(r) if !(r > 0.0 && r < 1.0) => Err(GenError::Folder {
            path: path.to_path_buf(),
            message: format!("boundary_ratio {r} must lie strictly between 0 and 1"),
        }),
        _ => Ok(()),
    }
}

impl<B: Backend> DiffusionBackend<B> {
    /// Loads a model folder with default options; see [`DiffusionBackend::load`].
    pub fn from_dir(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self, GenError> {
        Self::load(dir, device, LoadOptions::default())
    }

    /// Loads a diffusers-layout Wan folder: `model_index.json`, `transformer/`, optional
    /// `transformer_2/` with `boundary_ratio`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`.
    /// A Wan release folder (no `model_index.json`) loads as [`DiffusionBackend::from_wan_dir`]
    /// with the preset [`WanNativeConfig::for_dir`] picks.
    pub fn load(dir: impl AsRef<Path>, device: &B::Device, options: LoadOptions) -> Result<Self, GenError> {
        let dir = dir.as_ref();
        if is_wan_native(dir) {
            return Self::from_wan_dir_with(dir, &WanNativeConfig::for_dir(dir), device, options);
        }
        let index_path = dir.join("model_index.json");
        let index = chitu_store::read_json(&index_path)?;
        let second = index
            .get("transformer_2")
            .and_then(|v| v.get(0))
            .is_some_and(|v| !v.is_null());
        let boundary_ratio = match index.get("boundary_ratio") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(v.as_f64().ok_or_else(|| GenError::Folder {
                path: index_path.clone(),
                message: format!("boundary_ratio {v} is not a number"),
            })?),
        };
        check_boundary(&index_path, boundary_ratio)?;
        let pipeline = PipelineKind::from_index(&index, &index_path)?;
        if second != boundary_ratio.is_some() {
            return Err(GenError::Folder {
                path: index_path,
                message: "transformer_2 and boundary_ratio must come together".into(),
            });
        }
        options.check::<B>(device)?;
        let memory = MemoryLevel(options.low_mem);
        let (dtype, format) = (options.dtype, options.format());
        let names: &[&str] = if second {
            &["transformer", "transformer_2"]
        } else {
            &["transformer"]
        };
        let mut model_pool = Vec::new();
        for name in names {
            let reload = dit_reload(dir.join(name), format);
            let dit = reload(device)?;
            let dit = Offloaded::loaded(*name, dit, device, memory.parks_dits(), reload)?;
            model_pool.push(options.released_if_one_shot(dit)?);
        }
        let vae = WanVae::from_dir_as(dir.join("vae"), device, options.vae_dtype)?;
        // Loaded last: a one-request run encodes with it first, while the DiTs wait released.
        let text_reload: crate::Reload<B, TextEncoder<B>> = {
            let dir = dir.to_path_buf();
            Arc::new(move |device| Ok(TextEncoder::from_pipeline_dir_as(&dir, device, format)?))
        };
        let text = text_reload(device)?;
        let text = Offloaded::loaded("text encoder", text, device, memory.parks_text(), text_reload)?;
        let scheduler =
            SchedulerSpec::from_json(&chitu_store::read_json(&dir.join("scheduler/scheduler_config.json"))?)?;
        let lora = crate::lora::LoraStack::new(names.iter().map(|n| Some(dir.join(n))).collect());
        let backend = Self {
            text,
            model_pool,
            boundary_ratio,
            pipeline,
            vae,
            scheduler,
            device: device.clone(),
            name: dir.display().to_string(),
            memory,
            text_max_len: text_max_len(&dir.join("tokenizer")),
            dtype,
            weights: options.weights,
            release_after_use: options.release_after_use,
            lora,
        };
        backend.check_channels(&dir.join("transformer"))?;
        backend.apply_lora(&options.loras, options.lora_partial)?;
        Ok(backend)
    }

    /// The DiT's channels must fit the pipeline: the VAE's latents (T2V, TI2V), or those plus a
    /// frame mask and the condition latents (I2V).
    fn check_channels(&self, path: &Path) -> Result<(), GenError> {
        let dit = self.dit(0)?.shell();
        let z = self.vae.config.z_dim;
        let want = match self.pipeline {
            PipelineKind::ImageToVideo => 2 * z + self.vae.config.temporal_factor(),
            _ => z,
        };
        if dit.in_channels != want || dit.out_channels != z {
            return Err(GenError::Folder {
                path: path.to_path_buf(),
                message: format!(
                    "the transformer takes {} channels and gives {}; a {} model with this VAE ({z} latent channels) needs {want} and {z}",
                    dit.in_channels,
                    dit.out_channels,
                    self.pipeline.describe()
                ),
            });
        }
        Ok(())
    }

    /// Loads a Wan release folder with the shapes and sampler settings of `config`.
    pub fn from_wan_dir(dir: impl AsRef<Path>, config: &WanNativeConfig, device: &B::Device) -> Result<Self, GenError> {
        Self::from_wan_dir_with(dir, config, device, LoadOptions::default())
    }

    /// [`DiffusionBackend::from_wan_dir`] with load options.
    pub fn from_wan_dir_with(
        dir: impl AsRef<Path>,
        config: &WanNativeConfig,
        device: &B::Device,
        options: LoadOptions,
    ) -> Result<Self, GenError> {
        let dir = dir.as_ref();
        check_boundary(dir, config.boundary_ratio)?;
        options.check::<B>(device)?;
        let memory = MemoryLevel(options.low_mem);
        let (dtype, format) = (options.dtype, options.format());
        let t5 = find(
            dir,
            &[
                "models_t5_umt5-xxl-enc-bf16.pth",
                "models_t5_umt5-xxl-enc-bf16.safetensors",
            ],
        )?;
        let tokenizer = find(&dir.join("google/umt5-xxl"), &["tokenizer.json"])?;

        let experts: Vec<PathBuf> = if dir.join("high_noise_model").is_dir() {
            vec![dir.join("high_noise_model"), dir.join("low_noise_model")]
        } else {
            vec![dir.to_path_buf()]
        };
        if (experts.len() == 2) != config.boundary_ratio.is_some() {
            return Err(GenError::Folder {
                path: dir.to_path_buf(),
                message: format!(
                    "{} expert folder(s) but boundary_ratio {:?}; two experts need a boundary and one needs none",
                    experts.len(),
                    config.boundary_ratio
                ),
            });
        }
        let mut model_pool = Vec::new();
        for (i, d) in experts.iter().enumerate() {
            let reload = dit_reload(d.clone(), format);
            let dit = reload(device)?;
            let name = ["transformer", "transformer_2"][i];
            let dit = Offloaded::loaded(name, dit, device, memory.parks_dits(), reload)?;
            model_pool.push(options.released_if_one_shot(dit)?);
        }

        let vae_file = match config.vae.is_residual {
            true => find(dir, &["Wan2.2_VAE.pth", "Wan2.2_VAE.safetensors"])?,
            false => find(dir, &["Wan2.1_VAE.pth", "Wan2.1_VAE.safetensors"])?,
        };
        let vae = WanVae::from_wan_checkpoint_as(&vae_file, config.vae.clone(), device, options.vae_dtype)?;
        // Loaded last, as in `load`.
        let text_reload: crate::Reload<B, TextEncoder<B>> = {
            let text_config = config.text.clone();
            Arc::new(move |device| {
                Ok(TextEncoder::from_wan_files_as(
                    &t5,
                    &tokenizer,
                    text_config.clone(),
                    device,
                    format,
                )?)
            })
        };
        let text = text_reload(device)?;
        let text = Offloaded::loaded("text encoder", text, device, memory.parks_text(), text_reload)?;
        let lora = crate::lora::LoraStack::new(experts.into_iter().map(Some).collect());
        let backend = Self {
            text,
            model_pool,
            boundary_ratio: config.boundary_ratio,
            pipeline: config.pipeline,
            vae,
            scheduler: SchedulerSpec::unipc_flow(config.shift),
            device: device.clone(),
            name: dir.display().to_string(),
            memory,
            text_max_len: text_max_len(&dir.join("google/umt5-xxl")),
            dtype,
            weights: options.weights,
            release_after_use: options.release_after_use,
            lora,
        };
        backend.check_channels(dir)?;
        backend.apply_lora(&options.loras, options.lora_partial)?;
        Ok(backend)
    }

    /// The embedded tiny Wan2.1-shaped model: 2-layer UMT5 (d 32), 2-block DiT (dim 48),
    /// VAE of base width 8, UniPC with shift 3. Weights are random with a fixed seed.
    pub fn embedded_tiny(device: &B::Device) -> Result<Self, GenError> {
        Self::embedded_tiny_as(device, Precision::F32)
    }

    /// [`DiffusionBackend::embedded_tiny`] with the text encoder's and the DiT's weight matrices
    /// held in `format` (the same weights at f32 as [`DiffusionBackend::embedded_tiny`], rounded
    /// or quantized).
    pub fn embedded_tiny_as(device: &B::Device, format: impl Into<Format>) -> Result<Self, GenError> {
        let format = format.into();
        let options = LoadOptions {
            dtype: format.precision,
            weights: format.weights,
            ..LoadOptions::default()
        };
        options.check::<B>(device)?;
        // The weights come from the backend's global RNG, and burn draws a parameter lazily, on
        // its first use. Ranks that build their model at the same time (in-process CFG or CP
        // ranks) would draw from it in turn, mid-run, and get different weights; so each rank
        // seeds, builds and draws every parameter while holding the lock.
        static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
        B::seed(device, TINY_WEIGHT_SEED);
        let tokenizer = T5Tokenizer::from_json_bytes(TINY_TOKENIZER.as_bytes())?;
        // The demo model's UMT5 shape: both are 2 layers of width 32.
        let encoder = Umt5Encoder::new(crate::demo::text_config(tokenizer.vocab_size()), device)?;
        let dit_config = WanDitConfig {
            num_heads: 2,
            head_dim: 24,
            text_dim: 32,
            ffn_dim: 96,
            num_layers: 2,
            ..WanDitConfig::wan21_t2v_1_3b()
        };
        let dit = WanTransformer::new(dit_config, device)?;
        let vae_config = WanVaeConfig {
            base_dim: 8,
            ..WanVaeConfig::default()
        };
        let vae = WanVae::new(vae_config, device)?;
        let mut draw = DrawNow;
        encoder.visit(&mut draw);
        dit.visit(&mut draw);
        vae.visit(&mut draw);
        Ok(Self::embedded(
            tokenizer,
            encoder,
            dit,
            vae,
            format,
            "embedded-tiny",
            device,
        ))
    }

    /// The embedded demo model: a tiny Wan2.1-architecture model trained in this project on
    /// 32x32, 9-frame clips of coloured shapes ([`crate::demo`], `examples/train_demo.rs`), at
    /// the sizes of [`DiffusionUserParams::demo`].
    pub fn embedded_demo_as(device: &B::Device, format: impl Into<Format>) -> Result<Self, GenError> {
        Self::demo(&crate::demo::embedded()?, device, format.into(), "embedded-demo")
    }

    /// A demo model from the files a training run wrote to `dir` ([`crate::demo::FILES`]).
    pub fn demo_from_dir(dir: &Path, device: &B::Device, format: impl Into<Format>) -> Result<Self, GenError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| GenError::Folder {
                path,
                message: format!("cannot read the demo model's file: {e}"),
            })
        };
        let bytes = crate::demo::FILES.map(read);
        let bytes: Vec<Vec<u8>> = bytes.into_iter().collect::<Result<_, _>>()?;
        let files = crate::demo::DemoFiles(std::array::from_fn(|i| bytes[i].as_slice()));
        Self::demo(&files, device, format.into(), &dir.display().to_string())
    }

    fn demo(files: &crate::demo::DemoFiles, device: &B::Device, format: Format, name: &str) -> Result<Self, GenError> {
        LoadOptions {
            dtype: format.precision,
            weights: format.weights,
            ..LoadOptions::default()
        }
        .check::<B>(device)?;
        let parts = crate::demo::load::<B>(files, device)?;
        Ok(Self::embedded(
            parts.tokenizer,
            parts.text,
            parts.dit,
            parts.vae,
            format,
            name,
            device,
        ))
    }

    /// A backend of in-memory models: one expert, UniPC with shift 3, the weight matrices of the
    /// text encoder and the DiT held in `format`.
    fn embedded(
        tokenizer: T5Tokenizer,
        encoder: Umt5Encoder<B>,
        dit: WanTransformer<B>,
        vae: WanVae<B>,
        format: Format,
        name: &str,
        device: &B::Device,
    ) -> Self {
        let cast = |keep_f32| Cast::new(format, keep_f32);
        let encoder = cast_module(encoder, cast(chitu_text::KEEP_F32));
        let dit = cast_module(dit, cast(chitu_dit::KEEP_F32));
        let text = TextEncoder::new(tokenizer, encoder, device.clone());
        Self {
            text: Offloaded::new("text encoder", text, device),
            model_pool: vec![Offloaded::new("transformer", dit, device)],
            boundary_ratio: None,
            pipeline: PipelineKind::TextToVideo,
            vae,
            scheduler: SchedulerSpec::unipc_flow(3.0),
            device: device.clone(),
            name: name.into(),
            memory: MemoryLevel::default(),
            text_max_len: WAN_TEXT_LEN,
            dtype: format.precision,
            weights: format.weights,
            release_after_use: false,
            lora: crate::lora::LoraStack::new(vec![None]),
        }
    }

    /// Refuses a request this model cannot run, before anything is allocated: a size the VAE and
    /// patching do not divide, a grid beyond the DiT's RoPE tables, a text longer than the
    /// tokenizer is made for, a low-noise guidance on a model without a second expert, and (on
    /// the CPU) a request whose memory estimate exceeds the memory available
    /// ([`DiffusionBackend::check_fits`]).
    pub fn check_request(&self, params: &DiffusionUserParams) -> Result<(), GenError> {
        // The config travels with a parked model too: checking never brings one back.
        let dit = self.dit(0)?.shell();
        let bad = |m: String| Err(GenError::Params(m));
        let [pt, ph, pw] = dit.patch_size;
        let vae_spatial = self.vae.config.spatial_factor();
        let (sy, sx) = (vae_spatial * ph, vae_spatial * pw);
        if !params.height.is_multiple_of(sy) || !params.width.is_multiple_of(sx) {
            return bad(format!(
                "height {} and width {} must be multiples of {sy} and {sx} for this model (its VAE's {vae_spatial} pixels per latent times the DiT's {ph}x{pw} patch)",
                params.height, params.width
            ));
        }
        self.check_pictures(params)?;
        let [_, _, t, h, w] = params.latent_shape(self.vae.config.z_dim, vae_spatial);
        let grid = [t.div_ceil(pt), h / ph, w / pw];
        if grid.iter().any(|&g| g > dit.rope_max_seq_len) {
            return bad(format!(
                "height {} and width {} with {} frames make a token grid {grid:?}; this model's RoPE tables reach {} per axis (at most {} pixels per side, {} frames)",
                params.height,
                params.width,
                params.num_frames,
                dit.rope_max_seq_len,
                dit.rope_max_seq_len * sy.min(sx),
                (dit.rope_max_seq_len * pt - 1) * 4 + 1
            ));
        }
        if params.max_sequence_length > self.text_max_len {
            return bad(format!(
                "max_sequence_length {} exceeds the tokenizer's model_max_length {}",
                params.max_sequence_length, self.text_max_len
            ));
        }
        if params.guidance_scale_2.is_some() && self.boundary_ratio.is_none() {
            return bad("guidance_scale_2 sets the low-noise expert's guidance, and this model has one expert".into());
        }
        // Last: the estimate reads the request's sizes, which the checks above bound.
        self.check_fits(params)
    }

    /// The pictures a request gives must fit the pipeline, and with resizing off, the size.
    fn check_pictures(&self, params: &DiffusionUserParams) -> Result<(), GenError> {
        let bad = |m: String| Err(GenError::Params(m));
        let kind = self.pipeline;
        match (&params.image, kind) {
            (Some(_), PipelineKind::TextToVideo) => {
                return bad(format!(
                    "this model is {}: it takes no image (drop --image, or use an image-to-video model such as Wan2.2 TI2V-5B or I2V-A14B)",
                    kind.describe()
                ))
            }
            (None, PipelineKind::ImageToVideo) => {
                return bad(format!(
                    "this model is {}: it needs a picture to start from (--image PATH)",
                    kind.describe()
                ))
            }
            _ => {}
        }
        if params.last_image.is_some() {
            if kind != PipelineKind::ImageToVideo {
                return bad(format!(
                    "a last image conditions image-to-video models that concatenate a condition video (I2V-A14B); this model is {}",
                    kind.describe()
                ));
            }
            if params.image.is_none() || params.num_frames < 2 {
                return bad("a last image needs a first image (--image) and at least 5 frames".into());
            }
        }
        for img in params.image.iter().chain(&params.last_image) {
            img.check_size(params.width, params.height)?;
        }
        Ok(())
    }

    /// The memory level a request runs at: its own `low_mem`, or the backend's when higher.
    pub fn memory(&self, low_mem: u8) -> MemoryLevel {
        self.memory.max(MemoryLevel(low_mem))
    }

    /// Which pool model and guidance scale denoise at timestep `t`.
    pub fn expert(&self, t: f64, params: &DiffusionUserParams) -> (usize, f64) {
        let train_steps = self.scheduler.num_train_timesteps() as f64;
        match self.boundary_ratio {
            Some(ratio) if t < ratio * train_steps => (1, params.guidance_scale_2.unwrap_or(params.guidance_scale)),
            _ => (0, params.guidance_scale),
        }
    }

    /// Pool model `index`, or an error naming the pool's size.
    pub fn dit(&self, index: usize) -> Result<&Offloaded<B, WanTransformer<B>>, GenError> {
        self.model_pool.get(index).ok_or_else(|| {
            GenError::Params(format!(
                "the model pool has {} model(s), no model {index}",
                self.model_pool.len()
            ))
        })
    }

    /// Parks what `memory` keeps off the device: the text encoder from level 2, every DiT from
    /// level 3. Each comes back when it is next used.
    pub fn park_for(&self, memory: MemoryLevel) -> Result<(), GenError> {
        if memory.parks_text() {
            self.text.park()?;
        }
        if memory.parks_dits() {
            self.park_dits_except(None)?;
        }
        Ok(())
    }

    /// Parks every DiT of the pool but `keep`.
    pub fn park_dits_except(&self, keep: Option<usize>) -> Result<(), GenError> {
        for (i, dit) in self.model_pool.iter().enumerate() {
            if Some(i) != keep {
                dit.park()?;
            }
        }
        Ok(())
    }
}

/// Loads the transformer folder `dir` (again) in `format`.
fn dit_reload<B: Backend>(dir: PathBuf, format: Format) -> crate::Reload<B, WanTransformer<B>> {
    Arc::new(move |device| Ok(WanTransformer::from_dir_as(&dir, device, format)?))
}

/// Draws every lazily initialised parameter of a module now.
struct DrawNow;

impl<B: Backend> ModuleVisitor<B> for DrawNow {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let _ = param.val();
    }
}

/// The tiny T5 tokenizer of the parity fixtures (a 120-piece unigram vocabulary).
const TINY_TOKENIZER: &str = include_str!("../assets/tiny_tokenizer.json");

/// Seed of the embedded model's weights.
pub const TINY_WEIGHT_SEED: u64 = 2024;
