//! The job store: one SQLite table in WAL mode, so each job is a real row that survives a
//! crash, and a reader never waits for the worker's writes.

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde_json::Value;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// A job's place in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Waiting for the worker.
    Queued,
    /// The worker is on it.
    Running,
    /// Its files are complete.
    Succeeded,
    /// It ended with an error (in `error`).
    Failed,
    /// Cancelled before it finished.
    Cancelled,
}

impl JobState {
    /// Every state, in the order of a job's life.
    pub const ALL: [JobState; 5] = [
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];

    /// The name in the API and the database.
    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.name() == s)
    }

    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// One row.
#[derive(Debug, Clone)]
pub struct Job {
    /// The row's key; the API's id is `v{seq}`.
    pub seq: i64,
    /// Where it is.
    pub state: JobState,
    /// The request body as it was accepted.
    pub request: Value,
    /// Denoise steps of the resolved request.
    pub steps: usize,
    /// Unix seconds it was accepted.
    pub created: f64,
    /// Unix seconds its last attempt started.
    pub started: Option<f64>,
    /// Unix seconds it ended.
    pub finished: Option<f64>,
    /// Why it failed.
    pub error: Option<String>,
    /// Attempts started, counting those a crash ended.
    pub attempts: u32,
    /// Per-stage seconds of a finished job.
    pub timings: Option<Value>,
}

impl Job {
    /// The id the API uses.
    pub fn id(&self) -> String {
        format!("v{}", self.seq)
    }

    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        let state: String = row.get("state")?;
        let json = |text: Option<String>| text.and_then(|t| serde_json::from_str(&t).ok());
        Ok(Self {
            seq: row.get("seq")?,
            state: JobState::parse(&state).unwrap_or(JobState::Failed),
            request: json(row.get("request")?).unwrap_or(Value::Null),
            steps: row.get::<_, i64>("steps")?.max(0) as usize,
            created: row.get("created")?,
            started: row.get("started")?,
            finished: row.get("finished")?,
            error: row.get("error")?,
            attempts: row.get::<_, i64>("attempts")?.max(0) as u32,
            timings: json(row.get("timings")?),
        })
    }
}

/// The key of a job from its API id (`v12`), if it is one.
pub fn parse_id(id: &str) -> Option<i64> {
    id.strip_prefix('v')?.parse().ok().filter(|&n| n > 0)
}

/// A store failure: SQLite's own error, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("job store: {what}: {source}")]
pub struct StoreError {
    what: &'static str,
    #[source]
    source: rusqlite::Error,
}

trait Context<T> {
    fn doing(self, what: &'static str) -> Result<T, StoreError>;
}

impl<T> Context<T> for rusqlite::Result<T> {
    fn doing(self, what: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError { what, source })
    }
}

/// What opening the store found of a previous run that ended while a job ran.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Jobs that were running, queued again.
    pub requeued: Vec<i64>,
    /// Jobs that were running when the server stopped for the second time: failed.
    pub failed: Vec<i64>,
}

/// Attempts a job gets: one more after a crash, then it is failed.
pub const MAX_ATTEMPTS: u32 = 2;

/// The jobs table.
pub struct JobStore {
    db: Connection,
}

/// Unix seconds now.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl JobStore {
    /// Opens (or creates) the store at `path`, and settles the jobs that a previous process left
    /// running.
    pub fn open(path: &Path) -> Result<(Self, Recovery), StoreError> {
        let db = Connection::open(path).doing("opening the database")?;
        // WAL: readers never block the writer; FULL: a row is on disk before its 202 is sent.
        db.pragma_update(None, "journal_mode", "WAL")
            .doing("setting WAL mode")?;
        db.pragma_update(None, "synchronous", "FULL")
            .doing("setting synchronous")?;
        db.busy_timeout(std::time::Duration::from_secs(10))
            .doing("setting the busy timeout")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS jobs (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                state TEXT NOT NULL,
                request TEXT NOT NULL,
                steps INTEGER NOT NULL,
                created REAL NOT NULL,
                started REAL,
                finished REAL,
                error TEXT,
                attempts INTEGER NOT NULL DEFAULT 0,
                timings TEXT
            );
            CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);",
        )
        .doing("creating the jobs table")?;
        let store = Self { db };
        let recovery = store.recover()?;
        Ok((store, recovery))
    }

    /// Requeues the jobs a crash left running, failing those it has already ended once.
    fn recover(&self) -> Result<Recovery, StoreError> {
        let mut stmt = self
            .db
            .prepare("SELECT seq, attempts FROM jobs WHERE state = 'running'")
            .doing("reading running jobs")?;
        let running: Vec<(i64, u32)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)?.max(0) as u32)))
            .doing("reading running jobs")?
            .collect::<Result<_, _>>()
            .doing("reading running jobs")?;
        let mut recovery = Recovery::default();
        for (seq, attempts) in running {
            if attempts >= MAX_ATTEMPTS {
                let why = format!(
                    "the server stopped during this job {attempts} times (killed or crashed while it ran); not tried again"
                );
                self.finish(seq, JobState::Failed, Some(&why), None)?;
                recovery.failed.push(seq);
            } else {
                self.db
                    .execute("UPDATE jobs SET state = 'queued', started = NULL WHERE seq = ?1", [seq])
                    .doing("requeueing a job")?;
                recovery.requeued.push(seq);
            }
        }
        Ok(recovery)
    }

    /// Adds a queued job, unless `max_queue` jobs already wait (then `None`).
    pub fn insert(&mut self, request: &Value, steps: usize, max_queue: usize) -> Result<Option<Job>, StoreError> {
        let tx = self.db.transaction().doing("starting a transaction")?;
        let queued: i64 = tx
            .query_row("SELECT COUNT(*) FROM jobs WHERE state = 'queued'", [], |r| r.get(0))
            .doing("counting queued jobs")?;
        if queued as usize >= max_queue {
            return Ok(None);
        }
        tx.execute(
            "INSERT INTO jobs (state, request, steps, created) VALUES ('queued', ?1, ?2, ?3)",
            params![request.to_string(), steps as i64, now()],
        )
        .doing("inserting a job")?;
        let seq = tx.last_insert_rowid();
        tx.commit().doing("committing a job")?;
        self.get(seq)
    }

    /// The job with key `seq`.
    pub fn get(&self, seq: i64) -> Result<Option<Job>, StoreError> {
        self.db
            .query_row("SELECT * FROM jobs WHERE seq = ?1", [seq], Job::from_row)
            .optional()
            .doing("reading a job")
    }

    /// Up to `limit` jobs, newest first, in `state` when given, older than `before` when given.
    pub fn list(&self, state: Option<JobState>, limit: usize, before: Option<i64>) -> Result<Vec<Job>, StoreError> {
        let mut stmt = self
            .db
            .prepare(
                "SELECT * FROM jobs WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR seq < ?2)
                 ORDER BY seq DESC LIMIT ?3",
            )
            .doing("listing jobs")?;
        let rows = stmt
            .query_map(params![state.map(JobState::name), before, limit as i64], Job::from_row)
            .doing("listing jobs")?;
        rows.collect::<Result<_, _>>().doing("listing jobs")
    }

    /// Marks the oldest queued job running and returns it.
    pub fn claim_next(&self) -> Result<Option<Job>, StoreError> {
        self.db
            .query_row(
                "UPDATE jobs SET state = 'running', started = ?1, attempts = attempts + 1
                 WHERE seq = (SELECT seq FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1)
                 RETURNING *",
                [now()],
                Job::from_row,
            )
            .optional()
            .doing("claiming a job")
    }

    /// Ends a job in `state`.
    pub fn finish(
        &self,
        seq: i64,
        state: JobState,
        error: Option<&str>,
        timings: Option<&Value>,
    ) -> Result<(), StoreError> {
        self.db
            .execute(
                "UPDATE jobs SET state = ?2, finished = ?3, error = ?4, timings = ?5 WHERE seq = ?1",
                params![seq, state.name(), now(), error, timings.map(Value::to_string)],
            )
            .doing("ending a job")
            .map(drop)
    }

    /// Puts a running job back in the queue on shutdown: not a failed attempt.
    pub fn requeue(&self, seq: i64) -> Result<(), StoreError> {
        self.db
            .execute(
                "UPDATE jobs SET state = 'queued', started = NULL, attempts = MAX(attempts - 1, 0)
                 WHERE seq = ?1 AND state = 'running'",
                [seq],
            )
            .doing("requeueing a job")
            .map(drop)
    }

    /// Cancels a job that is still queued; false if it is not.
    pub fn cancel_queued(&self, seq: i64) -> Result<bool, StoreError> {
        self.db
            .execute(
                "UPDATE jobs SET state = 'cancelled', finished = ?2 WHERE seq = ?1 AND state = 'queued'",
                params![seq, now()],
            )
            .doing("cancelling a job")
            .map(|n| n == 1)
    }

    /// How many jobs are in each state.
    pub fn counts(&self) -> Result<Vec<(JobState, u64)>, StoreError> {
        let mut stmt = self
            .db
            .prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            .doing("counting jobs")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .doing("counting jobs")?;
        let found: Vec<(String, i64)> = rows.collect::<Result<_, _>>().doing("counting jobs")?;
        Ok(JobState::ALL
            .into_iter()
            .map(|s| {
                let n = found.iter().find(|(name, _)| name == s.name()).map_or(0, |(_, n)| *n);
                (s, n.max(0) as u64)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_requeues_once_then_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.sqlite");
        let (mut store, _) = JobStore::open(&path).unwrap();
        let job = store
            .insert(&serde_json::json!({"prompt": "a"}), 3, 10)
            .unwrap()
            .unwrap();
        assert_eq!(store.claim_next().unwrap().unwrap().seq, job.seq);
        drop(store);
        let (store, recovery) = JobStore::open(&path).unwrap();
        assert_eq!(recovery.requeued, vec![job.seq]);
        assert_eq!(store.get(job.seq).unwrap().unwrap().state, JobState::Queued);
        store.claim_next().unwrap().unwrap();
        drop(store);
        let (store, recovery) = JobStore::open(&path).unwrap();
        assert_eq!(recovery.failed, vec![job.seq]);
        let failed = store.get(job.seq).unwrap().unwrap();
        assert_eq!(failed.state, JobState::Failed);
        assert!(failed.error.unwrap().contains("2 times"));
    }

    #[test]
    fn the_queue_limit_and_paging() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = JobStore::open(&dir.path().join("jobs.sqlite")).unwrap();
        let r = serde_json::json!({"prompt": "a"});
        let seqs: Vec<i64> = (0..3).map(|_| store.insert(&r, 1, 3).unwrap().unwrap().seq).collect();
        assert!(store.insert(&r, 1, 3).unwrap().is_none());
        assert!(store.cancel_queued(seqs[1]).unwrap());
        assert!(!store.cancel_queued(seqs[1]).unwrap());
        let page: Vec<i64> = store.list(None, 2, None).unwrap().iter().map(|j| j.seq).collect();
        assert_eq!(page, vec![seqs[2], seqs[1]]);
        let rest: Vec<i64> = store
            .list(None, 2, Some(seqs[1]))
            .unwrap()
            .iter()
            .map(|j| j.seq)
            .collect();
        assert_eq!(rest, vec![seqs[0]]);
        let cancelled = store.list(Some(JobState::Cancelled), 10, None).unwrap();
        assert_eq!(cancelled.len(), 1);
        assert_eq!(parse_id("v12"), Some(12));
        assert_eq!(parse_id("12"), None);
    }
}
