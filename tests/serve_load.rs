//! A bounded load test over loopback: 20 clients submit 200 short jobs on the embedded model,
//! cancelling about one in ten at random. No job is lost or run twice, every job that was not
//! cancelled succeeds, and every MP4 decodes. Prints the queue latency and the throughput.

use crate::common;
use common::decode_mp4;
use common::serve::Server;
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const CLIENTS: usize = 20;
const JOBS_PER_CLIENT: usize = 10;

/// One finished job as its client saw it.
struct Seen {
    id: String,
    state: String,
    cancel_sent: bool,
    /// Seconds from accepted to started, for jobs that started.
    queue_s: Option<f64>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[test]
fn twenty_clients_two_hundred_jobs_none_lost_none_twice() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &["--max-queue", "256"]);
    let deadline = Instant::now() + Duration::from_secs(600);
    let seen = Mutex::new(Vec::new());
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for client in 0..CLIENTS {
            let (server, seen) = (&server, &seen);
            s.spawn(move || {
                // A small LCG per client: the same cancels on every run.
                let mut rng = 0x9E37_79B9u64.wrapping_mul(client as u64 + 1);
                let mut next = || {
                    rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (rng >> 33) as u32
                };
                let mut ids = Vec::new();
                for j in 0..JOBS_PER_CLIENT {
                    let body = format!(r#"{{"prompt": "load {client} {j}", "steps": 2, "seed": {j}}}"#);
                    ids.push(server.submit(&body));
                }
                for id in ids {
                    let cancel = next() % 10 == 0;
                    if cancel {
                        let r = server.call("DELETE", &format!("/v1/videos/{id}"), &[], None);
                        // 409 when it finished first: a race the test allows.
                        assert!([200, 202, 409].contains(&r.status), "{}", r.text());
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    let job = server.wait_for(&id, &["succeeded", "failed", "cancelled"], left);
                    let queue_s = job["started"].as_f64().map(|s| s - job["created"].as_f64().unwrap());
                    seen.lock().unwrap().push(Seen {
                        id,
                        state: job["state"].as_str().unwrap().to_string(),
                        cancel_sent: cancel,
                        queue_s,
                    });
                }
            });
        }
    });
    let wall = t0.elapsed().as_secs_f64();
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.len(), CLIENTS * JOBS_PER_CLIENT);
    for s in &seen {
        match s.state.as_str() {
            "succeeded" => {}
            "cancelled" => assert!(s.cancel_sent, "{} cancelled without a DELETE", s.id),
            other => panic!("{} ended {other}", s.id),
        }
    }
    // The store holds each job once: page through everything.
    let mut listed = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let path = match &before {
            Some(b) => format!("/v1/videos?limit=64&before={b}"),
            None => "/v1/videos?limit=64".to_string(),
        };
        let page = server.get(&path).json();
        for v in page["videos"].as_array().unwrap() {
            listed.push((v["id"].as_str().unwrap().to_string(), v["attempts"].as_u64().unwrap()));
        }
        match page["next"].as_str() {
            Some(n) => before = Some(n.to_string()),
            None => break,
        }
    }
    let unique: BTreeSet<&str> = listed.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(unique.len(), listed.len(), "a job is listed twice");
    let submitted: BTreeSet<&str> = seen.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(unique, submitted);
    assert!(listed.iter().all(|(_, attempts)| *attempts <= 1), "a job ran twice");
    let mut decoded = 0;
    for s in seen.iter().filter(|s| s.state == "succeeded") {
        let mp4 = server.get(&format!("/v1/videos/{}/video.mp4", s.id));
        assert_eq!(mp4.status, 200);
        let path = data.path().join("check.mp4");
        std::fs::write(&path, &mp4.body).unwrap();
        assert_eq!(decode_mp4(&path), (9, 64, 64), "{}", s.id);
        decoded += 1;
    }
    let mut queue: Vec<f64> = seen.iter().filter_map(|s| s.queue_s).collect();
    queue.sort_by(f64::total_cmp);
    let cancelled = seen.iter().filter(|s| s.state == "cancelled").count();
    eprintln!(
        "load: {} jobs from {CLIENTS} clients in {wall:.1}s: {decoded} succeeded (all decoded), {cancelled} cancelled; \
         queue latency p50 {:.2}s, p95 {:.2}s; {:.1} jobs per minute",
        seen.len(),
        percentile(&queue, 0.5),
        percentile(&queue, 0.95),
        decoded as f64 / wall * 60.0
    );
}
