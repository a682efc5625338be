//! The cache quality gate: a cached run compared with the uncached run from the same start.

use crate::{video_to_frames, DiffusionTask, DiffusionUserParams, GenError, Generator};
use burn::tensor::backend::Backend;
use chitu_cache::quality::{max_abs_diff, psnr};
use chitu_cache::CacheStats;
use std::fmt;

/// How a cached run compares with the same request run without the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheCheck {
    /// The policy's name.
    pub policy: &'static str,
    /// The cached run's counters.
    pub stats: CacheStats,
    /// PSNR of the cached frames against the uncached ones, in dB (infinite when identical).
    pub psnr_db: f64,
    /// Largest absolute difference of the final latents.
    pub max_abs_latent_diff: f64,
    /// Denoise wall time of the cached run, in seconds.
    pub denoise_s: f64,
    /// Denoise wall time of the uncached run, in seconds.
    pub uncached_denoise_s: f64,
}

impl CacheCheck {
    /// Uncached over cached DiT block evaluations.
    pub fn block_speedup(&self) -> f64 {
        self.stats.block_speedup()
    }

    /// Uncached over cached denoise wall time.
    pub fn wall_speedup(&self) -> f64 {
        if self.denoise_s > 0.0 {
            self.uncached_denoise_s / self.denoise_s
        } else {
            1.0
        }
    }
}

impl fmt::Display for CacheCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        writeln!(
            f,
            "cache {}: {} calls, {} full computes, {} blocks and {} sub-layers reused",
            self.policy, s.calls, s.full_computes, s.reused_blocks, s.reused_parts
        )?;
        writeln!(
            f,
            "  block evaluations {:.1} of {} ({:.2}x fewer)",
            s.block_evals(),
            s.uncached_block_evals(),
            self.block_speedup()
        )?;
        writeln!(
            f,
            "  denoise wall time {:.3}s vs {:.3}s uncached ({:.2}x)",
            self.denoise_s,
            self.uncached_denoise_s,
            self.wall_speedup()
        )?;
        write!(
            f,
            "  frames PSNR {:.2} dB, max |latent difference| {:.3e}",
            self.psnr_db, self.max_abs_latent_diff
        )
    }
}

impl<B: Backend> Generator<B> {
    /// Runs `cached`'s request again without its cache, from the same starting latents, and
    /// compares the two. `cached` must be finished and use a cache.
    pub fn cache_check(&self, cached: &DiffusionTask<B>) -> Result<CacheCheck, GenError> {
        let (Some(policy), Some(stats)) = (cached.params.cache.as_ref(), cached.cache_stats()) else {
            return Err(GenError::Params("cache check: the request has no cache policy".into()));
        };
        // Under a mesh only the output rank holds the video; every rank reruns the denoise.
        let (Some(latents), Some(start), true) = (
            cached.latents().cloned(),
            cached.start_latents(),
            cached.is_finished() && (cached.video().is_some() || !self.is_output_rank()),
        ) else {
            return Err(GenError::Task("to check has not finished"));
        };
        let params = DiffusionUserParams {
            cache: None,
            ..cached.params.clone()
        };
        let plain = self.run(DiffusionTask::from_user_request(params)?.with_initial_latents(start))?;
        let plain_latents = plain.latents().cloned().ok_or(GenError::Task("ran without latents"))?;
        let psnr_db = match (cached.video().cloned(), plain.video().cloned()) {
            (Some(a), Some(b)) => psnr(video_to_frames(a), video_to_frames(b)),
            _ => f64::NAN,
        };
        Ok(CacheCheck {
            policy: policy.name(),
            stats,
            psnr_db,
            max_abs_latent_diff: max_abs_diff(latents, plain_latents),
            denoise_s: cached.timings().denoise,
            uncached_denoise_s: plain.timings().denoise,
        })
    }

    /// Generates `params` (which must name a cache) and checks it against the uncached run.
    pub fn generate_checked(&self, params: DiffusionUserParams) -> Result<(DiffusionTask<B>, CacheCheck), GenError> {
        let task = self.run(DiffusionTask::from_user_request(params)?)?;
        let check = self.cache_check(&task)?;
        Ok((task, check))
    }
}
