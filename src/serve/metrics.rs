//! `/metrics`: Prometheus text, written by hand (a handful of series needs no client crate).

/// Upper bounds of the step-seconds histogram's buckets.
const BUCKETS: [f64; 12] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0];

/// Counters the worker keeps.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// Denoise steps per bucket (not cumulative), the last one past every bound.
    step_counts: [u64; BUCKETS.len() + 1],
    step_sum: f64,
    pub(crate) successes: u64,
    pub(crate) failures: u64,
    /// Seconds the succeeded jobs ran, summed.
    pub(crate) job_seconds: f64,
}

impl Metrics {
    /// Counts one denoise step of `seconds`.
    pub(crate) fn observe_step(&mut self, seconds: f64) {
        let bucket = BUCKETS.iter().position(|&b| seconds <= b).unwrap_or(BUCKETS.len());
        self.step_counts[bucket] += 1;
        self.step_sum += seconds;
    }

    /// Seconds a client should wait before trying a full queue again: one job's mean run.
    pub(crate) fn retry_after_s(&self) -> u64 {
        let mean = self.job_seconds / self.successes.max(1) as f64;
        (mean.ceil() as u64).clamp(1, 3600)
    }

    /// The exposition: `queue` jobs waiting, `jobs` by state, and the process's peak memory.
    pub(crate) fn render(&self, queue: u64, jobs: &[(&str, u64)], peak_rss: Option<u64>) -> String {
        let mut out = String::new();
        let mut put = |s: String| out.push_str(&s);
        put("# HELP chitu_queue_depth Jobs waiting to run.\n# TYPE chitu_queue_depth gauge\n".into());
        put(format!("chitu_queue_depth {queue}\n"));
        put("# HELP chitu_jobs Jobs in the store, by state.\n# TYPE chitu_jobs gauge\n".into());
        for (state, n) in jobs {
            put(format!("chitu_jobs{{state=\"{state}\"}} {n}\n"));
        }
        put("# HELP chitu_jobs_finished_total Jobs this process ran to an end, by outcome.\n".into());
        put("# TYPE chitu_jobs_finished_total counter\n".into());
        put(format!(
            "chitu_jobs_finished_total{{outcome=\"succeeded\"}} {}\n",
            self.successes
        ));
        put(format!(
            "chitu_jobs_finished_total{{outcome=\"failed\"}} {}\n",
            self.failures
        ));
        put("# HELP chitu_step_seconds Seconds per denoise step.\n# TYPE chitu_step_seconds histogram\n".into());
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.step_counts[i];
            put(format!("chitu_step_seconds_bucket{{le=\"{bound}\"}} {cumulative}\n"));
        }
        cumulative += self.step_counts[BUCKETS.len()];
        put(format!("chitu_step_seconds_bucket{{le=\"+Inf\"}} {cumulative}\n"));
        put(format!("chitu_step_seconds_sum {}\n", self.step_sum));
        put(format!("chitu_step_seconds_count {cumulative}\n"));
        put(
            "# HELP chitu_peak_rss_bytes Peak resident memory of the process.\n# TYPE chitu_peak_rss_bytes gauge\n"
                .into(),
        );
        if let Some(bytes) = peak_rss {
            put(format!("chitu_peak_rss_bytes {bytes}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_is_cumulative() {
        let mut m = Metrics::default();
        for s in [0.0005, 0.02, 0.02, 1000.0] {
            m.observe_step(s);
        }
        let text = m.render(2, &[("queued", 2)], Some(7));
        assert!(text.contains("chitu_step_seconds_bucket{le=\"0.001\"} 1\n"));
        assert!(text.contains("chitu_step_seconds_bucket{le=\"0.05\"} 3\n"));
        assert!(text.contains("chitu_step_seconds_bucket{le=\"300\"} 3\n"));
        assert!(text.contains("chitu_step_seconds_bucket{le=\"+Inf\"} 4\n"));
        assert!(text.contains("chitu_step_seconds_count 4\n"));
        assert!(text.contains("chitu_queue_depth 2\n"));
        assert!(text.contains("chitu_jobs{state=\"queued\"} 2\n"));
        assert!(text.contains("chitu_peak_rss_bytes 7\n"));
    }
}
