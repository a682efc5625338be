//! A generated video: its 8-bit frames and the record of how it was made, with the writers for
//! MP4, PNG and the JSON sidecar (the encoders need the default `video` feature).

use crate::{DiffusionTask, DiffusionUserParams, GenError, StageTimings};
use burn::tensor::{backend::Backend, Tensor};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Frames per second of written videos (Wan's rate).
pub const FPS: u32 = 16;

/// Why frames could not be taken or written.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    /// The frames tensor is not `[1, F, H, W, 3]`.
    #[error("expected frames [1, F, H, W, 3], got {0:?}")]
    Shape(Vec<usize>),
    /// The backend could not hand over the frames' data.
    #[error("reading frames: {0}")]
    Read(String),
    /// A file could not be created or written.
    #[error("writing {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// An encoder refused the frames or failed.
    #[error("writing {}: {message}", path.display())]
    Encode {
        /// The file.
        path: PathBuf,
        /// What the encoder said.
        message: String,
    },
}

impl VideoError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Writes a file whole or not at all: into a temporary name beside it, synced, then renamed.
/// On any failure (a full disk, an encoder error) the temporary is removed and `path` is
/// untouched, so a file that exists is complete.
pub(crate) fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> Result<(), VideoError>,
) -> Result<(), VideoError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.part-{}", std::process::id()));
    let _pending = Pending::register(&tmp);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp).map_err(|e| VideoError::io(path, e))?;
        write(&mut file)?;
        file.sync_all().map_err(|e| VideoError::io(path, e))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(|e| VideoError::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The temporaries being written now, so that a process ending mid-write (a second Ctrl-C)
/// can remove them: see [`remove_partial_files`].
static PENDING: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Holds a temporary in [`PENDING`] while it is written.
struct Pending(PathBuf);

impl Pending {
    fn register(path: &Path) -> Self {
        PENDING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.to_path_buf());
        Self(path.to_path_buf())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        PENDING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| p != &self.0);
    }
}

/// Removes every temporary a write is filling now. For a process that must end at once (a
/// second Ctrl-C): the files it was writing then never appear, whole or half.
pub fn remove_partial_files() {
    for path in PENDING.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let _ = std::fs::remove_file(path);
    }
}

/// A finished generation: the frames, and the request, timings and model that made them.
#[derive(Debug, Clone)]
pub struct Video {
    frames: RgbFrames,
    params: DiffusionUserParams,
    timings: StageTimings,
    model: String,
    dtype: chitu_store::Precision,
    weights: chitu_store::Weights,
    stage_peaks: [Option<u64>; 3],
    oom_retries: Vec<crate::OomRetry>,
    dit_calls: usize,
    loras: Vec<crate::LoraSpec>,
}

impl Video {
    /// The video of a finished task, made by `backend`'s model.
    pub fn from_task<B: Backend>(
        task: DiffusionTask<B>,
        backend: &crate::DiffusionBackend<B>,
    ) -> Result<Self, GenError> {
        let (params, timings) = (task.params().clone(), task.timings());
        let (stage_peaks, oom_retries) = (task.stage_peaks(), task.oom_retries().to_vec());
        let dit_calls = task.dit_calls();
        let frames = RgbFrames::from_tensor(crate::video_to_frames(task.into_video()?))?;
        Ok(Self {
            frames,
            params,
            timings,
            model: backend.name.clone(),
            dtype: backend.dtype,
            weights: backend.weights,
            stage_peaks,
            oom_retries,
            dit_calls,
            loras: backend.loras().into_iter().flatten().fold(Vec::new(), |mut all, spec| {
                // A LoRA into both experts is listed once.
                if !all.contains(&spec) {
                    all.push(spec);
                }
                all
            }),
        })
    }

    /// The 8-bit RGB frames.
    pub fn frames(&self) -> &RgbFrames {
        &self.frames
    }

    /// The request that made the video.
    pub fn params(&self) -> &DiffusionUserParams {
        &self.params
    }

    /// Seconds per stage.
    pub fn timings(&self) -> StageTimings {
        self.timings
    }

    /// Chitu's file stem for this video (see [`output_stem`]).
    pub fn stem(&self) -> String {
        output_stem(&self.params.prompt, self.params.seed, self.params.num_inference_steps)
    }

    /// The JSON sidecar: the request, per-stage timings, peak memory and `files` written.
    pub fn metadata(&self, files: &[PathBuf]) -> serde_json::Value {
        let mut json = sidecar(&self.params, &self.timings, &self.model, files);
        json["dtype"] = self.dtype.name().into();
        json["weights"] = self.weights.name().into();
        let [text, denoise, decode] = self.stage_peaks;
        json["stage_peak_rss_bytes"] = serde_json::json!({
            "text_encode": text,
            "denoise": denoise,
            "vae_decode": decode,
        });
        json["dit_calls"] = self.dit_calls.into();
        if !self.loras.is_empty() {
            json["loras"] = serde_json::to_value(&self.loras).unwrap_or_default();
        }
        if let Some(list) = &self.params.step_list {
            let (chitu_sched::StepList::Timesteps(v) | chitu_sched::StepList::Sigmas(v)) = list;
            json["params"][list.name()] = serde_json::json!(v);
        }
        if !self.oom_retries.is_empty() {
            json["oom_retries"] = serde_json::to_value(&self.oom_retries).unwrap_or_default();
        }
        json
    }

    /// Writes `metadata` (from [`Video::metadata`], perhaps extended) as pretty JSON.
    pub fn save_metadata(path: impl AsRef<Path>, metadata: &serde_json::Value) -> Result<(), VideoError> {
        let path = path.as_ref();
        let text = serde_json::to_string_pretty(metadata).unwrap_or_else(|_| unreachable!("a JSON value prints"));
        write_atomically(path, |file| {
            file.write_all(text.as_bytes()).map_err(|e| VideoError::io(path, e))
        })
    }

    /// Writes the video as H.264 in an MP4 at [`FPS`].
    #[cfg(feature = "video")]
    pub fn save_mp4(&self, path: impl AsRef<Path>) -> Result<(), VideoError> {
        crate::encode::write_mp4(path.as_ref(), &self.frames)
    }

    /// Writes all frames side by side in a grid (about square) as one PNG.
    #[cfg(feature = "video")]
    pub fn save_png_sheet(&self, path: impl AsRef<Path>) -> Result<(), VideoError> {
        crate::encode::write_contact_sheet(path.as_ref(), &self.frames)
    }

    /// Writes every frame as `{stem}_{index:04}.png` in `dir`; returns the paths.
    #[cfg(feature = "video")]
    pub fn save_png_frames(&self, dir: impl AsRef<Path>, stem: &str) -> Result<Vec<PathBuf>, VideoError> {
        crate::encode::write_frame_pngs(dir.as_ref(), stem, &self.frames)
    }
}

/// 8-bit RGB frames, row-major `[H, W, 3]` each.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbFrames {
    /// Frame width in pixels.
    pub width: usize,
    /// Frame height in pixels.
    pub height: usize,
    /// One `[H, W, 3]` buffer per frame.
    pub frames: Vec<Vec<u8>>,
}

impl RgbFrames {
    /// Converts frames `[1, F, H, W, 3]` in [0, 1] (see `video_to_frames`) to 8-bit RGB.
    pub fn from_tensor<B: Backend>(frames: Tensor<B, 5>) -> Result<Self, VideoError> {
        let [b, f, h, w, c] = frames.dims();
        if b != 1 || c != 3 {
            return Err(VideoError::Shape(frames.dims().to_vec()));
        }
        let data: Vec<f32> = frames
            .into_data()
            .convert::<f32>()
            .into_vec()
            .map_err(|e| VideoError::Read(format!("{e:?}")))?;
        let per = h * w * 3;
        let frames = (0..f)
            .map(|i| {
                data[i * per..(i + 1) * per]
                    .iter()
                    .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
                    .collect()
            })
            .collect();
        Ok(Self {
            width: w,
            height: h,
            frames,
        })
    }
}

/// Chitu's file stem: `{slug(prompt)[:64]}_seed{seed}_step{steps}`.
pub fn output_stem(prompt: &str, seed: u64, steps: usize) -> String {
    let mut slug = String::new();
    for ch in prompt.chars() {
        if ch.is_ascii_alphanumeric() {
            slug.push(ch.to_ascii_lowercase());
        } else if !slug.ends_with('_') && !slug.is_empty() {
            slug.push('_');
        }
    }
    let slug: String = slug.trim_end_matches('_').chars().take(64).collect();
    let slug = if slug.is_empty() { "video".to_string() } else { slug };
    format!("{slug}_seed{seed}_step{steps}")
}

/// The kernel's peak resident memory of this process since it started or since the last
/// [`start_stage_peak`] (Linux `VmHWM`).
fn kernel_peak() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The process's peak before the last [`start_stage_peak`] reset the kernel's.
static EARLIER_PEAK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Peak resident memory of this process in bytes (Linux `VmHWM`, across the resets of
/// [`start_stage_peak`]), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let now = kernel_peak()?;
    Some(now.max(EARLIER_PEAK.load(std::sync::atomic::Ordering::Relaxed)))
}

/// Starts measuring one stage's own peak: the kernel's high-water mark is reset to the memory
/// resident now (`/proc/self/clear_refs`), after folding it into [`peak_rss_bytes`]. Returns
/// whether the reset took; where it did not, [`stage_peak`] would give the process's peak.
pub fn start_stage_peak() -> bool {
    if let Some(now) = kernel_peak() {
        EARLIER_PEAK.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
    }
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The peak resident memory since [`start_stage_peak`] returned true.
pub fn stage_peak() -> Option<u64> {
    kernel_peak()
}

/// The JSON sidecar: request, per-stage timings, peak memory and the files written.
fn sidecar(params: &DiffusionUserParams, timings: &StageTimings, model: &str, files: &[PathBuf]) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "params": {
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "seed": params.seed,
            "height": params.height,
            "width": params.width,
            "num_frames": params.num_frames,
            "num_inference_steps": params.num_inference_steps,
            "guidance_scale": params.guidance_scale,
            "guidance_scale_2": params.guidance_scale_2,
            "solver": params.solver.map(|s| format!("{s:?}")),
            "shift": params.shift,
            "max_sequence_length": params.max_sequence_length,
            "cache": params.cache,
            "image": params.image.as_ref().map(|i| i.source.display().to_string()),
            "last_image": params.last_image.as_ref().map(|i| i.source.display().to_string()),
        },
        "timings_s": {
            "text_encode": timings.text_encode,
            "denoise": timings.denoise,
            "vae_decode": timings.vae_decode,
        },
        "peak_rss_bytes": peak_rss_bytes(),
        "fps": FPS,
        "files": files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that fails half-way (a full disk, an encoder error) leaves no file and no
    /// temporary, an earlier complete file under the same name stays as it was, and a write cut
    /// short by `remove_partial_files` leaves nothing.
    #[test]
    fn a_failed_write_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.mp4");
        let half = |file: &mut std::fs::File| -> Result<(), VideoError> {
            file.write_all(b"half a video").unwrap();
            Err(VideoError::Read("the encoder stopped".into()))
        };
        assert!(write_atomically(&path, half).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        write_atomically(&path, |f| f.write_all(b"whole").map_err(|e| VideoError::io(&path, e))).unwrap();
        assert!(write_atomically(&path, half).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"whole");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        // What a second Ctrl-C does mid-write: the temporary goes, and the file never appears.
        // (In the same test: removing partial files is process-wide.)
        let path = dir.path().join("v.png");
        let interrupted = |file: &mut std::fs::File| -> Result<(), VideoError> {
            file.write_all(b"half a picture").unwrap();
            remove_partial_files();
            Ok(())
        };
        assert!(write_atomically(&path, interrupted).is_err());
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn stems_follow_chitu() {
        assert_eq!(
            output_stem("A cat, walking on grass!", 42, 50),
            "a_cat_walking_on_grass_seed42_step50"
        );
        assert_eq!(output_stem("", 1, 2), "video_seed1_step2");
        assert_eq!(output_stem(&"x".repeat(100), 0, 1).len(), 64 + "_seed0_step1".len());
    }
}
