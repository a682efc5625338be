//! `chitu serve` on the embedded model, over loopback: every route, every state a job passes
//! through, every 4xx, shutdown, and proptest-made bodies that must never get a 5xx.

use crate::common;
use common::decode_mp4;
use common::serve::{Server, LONG, SHORT};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);

#[test]
fn a_job_goes_from_queued_to_succeeded_and_serves_its_files() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &[]);
    let health = server.get("/healthz").json();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["model"], "embedded-tiny");

    let r = server.post(r#"{"prompt": "a cat", "steps": 3, "seed": 7}"#);
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["state"], "queued");
    let id = r.json()["id"].as_str().unwrap().to_string();
    let events = server.events(&id, MINUTE);
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds.last(), Some(&"final"), "{kinds:?}");
    assert_eq!(events.last().unwrap().1["state"], "succeeded");
    // Each denoise step is an event, unless the stream joined after it.
    let steps: Vec<u64> = events
        .iter()
        .filter(|(k, _)| k == "step")
        .map(|(_, v)| v["step"].as_u64().unwrap())
        .collect();
    assert!(steps.windows(2).all(|w| w[1] == w[0] + 1), "{steps:?}");
    let progress: Vec<f64> = events.iter().map(|(_, v)| v["progress"].as_f64().unwrap()).collect();
    assert!(progress.windows(2).all(|w| w[1] >= w[0]), "{progress:?}");

    let job = server.job(&id);
    for field in [
        "id", "state", "progress", "stage", "step", "steps", "created", "started", "finished", "timings", "error",
        "request",
    ] {
        assert!(job.get(field).is_some(), "no {field} in {job}");
    }
    assert_eq!(job["progress"], 1.0);
    assert_eq!((job["step"].as_u64(), job["steps"].as_u64()), (Some(3), Some(3)));
    assert_eq!(job["request"], json!({"prompt": "a cat", "steps": 3, "seed": 7}));
    assert!(job["timings"]["denoise_s"].as_f64().unwrap() > 0.0);
    let (created, started, finished) = (
        job["created"].as_f64().unwrap(),
        job["started"].as_f64().unwrap(),
        job["finished"].as_f64().unwrap(),
    );
    assert!(created <= started && started <= finished);

    let mp4 = server.get(&format!("/v1/videos/{id}/video.mp4"));
    assert_eq!(mp4.status, 200);
    assert_eq!(mp4.header("content-type"), Some("video/mp4"));
    let path = data.path().join("copy.mp4");
    std::fs::write(&path, &mp4.body).unwrap();
    assert_eq!(decode_mp4(&path), (9, 64, 64));
    // Browsers seek with Range.
    let part = server.call(
        "GET",
        &format!("/v1/videos/{id}/video.mp4"),
        &[("Range", "bytes=4-11")],
        None,
    );
    assert_eq!(part.status, 206);
    assert_eq!(part.body, mp4.body[4..12]);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 4-11/{}", mp4.body.len()).as_str())
    );
    let png = server.get(&format!("/v1/videos/{id}/contact.png"));
    assert_eq!((png.status, &png.body[1..4]), (200, &b"PNG"[..]));
    let meta = server.get(&format!("/v1/videos/{id}/meta.json")).json();
    assert_eq!(meta["id"], id.as_str());
    assert_eq!(meta["params"]["seed"], 7);

    let list = server.get("/v1/videos?state=succeeded").json();
    assert_eq!(list["videos"][0]["id"], id.as_str());
    assert_eq!(server.get("/v1/videos?state=queued").json()["videos"], json!([]));
    let metrics = server.get("/metrics").text();
    assert!(metrics.contains("chitu_jobs{state=\"succeeded\"} 1"), "{metrics}");
    assert!(metrics.contains("chitu_step_seconds_count 3"), "{metrics}");
    assert!(metrics.contains("chitu_queue_depth 0"));
    assert!(metrics.contains("chitu_peak_rss_bytes "));
    let page = server.get("/");
    assert_eq!(page.status, 200);
    assert!(page.text().contains("<form") && page.text().contains("EventSource"));
    // The stream of a finished job is its final status.
    let again = server.events(&id, MINUTE);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].0, "final");
}

#[test]
fn bad_requests_get_a_4xx_that_names_the_problem() {
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data.path().join("loras")).unwrap();
    let server = Server::start(data.path(), &[]);
    let cases: &[(&str, u16, Option<&str>)] = &[
        (r#"{"prompt": "x", "height": 65}"#, 400, Some("height")),
        (r#"{"prompt": "x", "width": 0}"#, 400, Some("width")),
        (r#"{"prompt": "x", "frames": 8}"#, 400, Some("frames")),
        (r#"{"prompt": "x", "steps": 0}"#, 400, Some("steps")),
        (r#"{"prompt": "x", "steps": -1}"#, 400, Some("steps")),
        (r#"{"prompt": "x", "guidance": -1}"#, 400, Some("guidance")),
        (r#"{"prompt": "x", "guidance_2": 3}"#, 400, Some("guidance_2")),
        (r#"{"prompt": "x", "shift": 0}"#, 400, Some("shift")),
        (r#"{"prompt": "x", "solver": "heun"}"#, 400, Some("solver")),
        (r#"{"prompt": "x", "cache": "bogus"}"#, 400, Some("cache")),
        (r#"{"prompt": "x", "seed": "seven"}"#, 400, Some("seed")),
        (r#"{"prompt": 3}"#, 400, Some("prompt")),
        (r#"{"steps": 3}"#, 400, Some("prompt")),
        (r#"{"prompt": "x", "colour": "red"}"#, 400, Some("colour")),
        (
            r#"{"prompt": "x", "loras": ["../secret.safetensors"]}"#,
            400,
            Some("loras"),
        ),
        (
            r#"{"prompt": "x", "loras": ["missing.safetensors"]}"#,
            400,
            Some("loras"),
        ),
        (r#"{"prompt": "x", "loras": "a.safetensors"}"#, 400, Some("loras")),
        (
            r#"{"prompt": "x", "height": 100000, "width": 100000}"#,
            400,
            Some("height"),
        ),
        (r#"["prompt"]"#, 400, Some("body")),
        (r#"{"prompt": "#, 400, None),
        ("", 400, None),
    ];
    for (body, status, field) in cases {
        let r = server.post(body);
        assert_eq!(r.status, *status, "{body}: {}", r.text());
        let json = r.json();
        assert!(!json["error"].as_str().unwrap().is_empty(), "{body}");
        assert_eq!(json["field"].as_str(), *field, "{body}: {json}");
    }
    let big = format!(r#"{{"prompt": "{}"}}"#, "x".repeat(100_000));
    assert_eq!(server.post(&big).status, 413);

    let not_found = [
        ("GET", "/v1/videos/v999"),
        ("GET", "/v1/videos/abc"),
        ("GET", "/v1/videos/v999/events"),
        ("GET", "/v1/videos/v999/video.mp4"),
        ("DELETE", "/v1/videos/v999"),
        ("GET", "/nowhere"),
    ];
    for (method, path) in not_found {
        let r = server.call(method, path, &[], None);
        assert_eq!(r.status, 404, "{method} {path}: {}", r.text());
        assert!(r.json()["error"].is_string());
    }
    for query in ["state=bogus", "limit=0", "limit=x", "before=12", "colour=red"] {
        let r = server.get(&format!("/v1/videos?{query}"));
        assert_eq!(r.status, 400, "{query}: {}", r.text());
    }
    assert_eq!(server.call("PUT", "/v1/videos", &[], None).status, 405);

    // A job's files only once it has succeeded; nothing to cancel once it has ended.
    let id = server.submit(SHORT);
    server.wait_for(&id, &["succeeded"], MINUTE);
    assert_eq!(server.get(&format!("/v1/videos/{id}/frames.zip")).status, 404);
    let r = server.call("DELETE", &format!("/v1/videos/{id}"), &[], None);
    assert_eq!(r.status, 409, "{}", r.text());
    let long = server.submit(LONG);
    let r = server.get(&format!("/v1/videos/{long}/video.mp4"));
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().unwrap().contains("succeeded"));
    server.call("DELETE", &format!("/v1/videos/{long}"), &[], None);
}

#[test]
fn cancel_stops_a_queued_job_before_it_starts_and_a_running_one_at_a_step() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &[]);
    let long = server.submit(LONG);
    let queued = server.submit(SHORT);
    server.wait_denoising(&long, MINUTE);
    let r = server.call("DELETE", &format!("/v1/videos/{queued}"), &[], None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "cancelled");
    let r = server.call("DELETE", &format!("/v1/videos/{long}"), &[], None);
    assert_eq!(r.status, 202, "{}", r.text());
    let stopped = server.wait_for(&long, &["cancelled"], MINUTE);
    assert!(stopped["finished"].is_number());
    let never = server.job(&queued);
    assert_eq!(
        (never["state"].as_str(), never["started"].is_null()),
        (Some("cancelled"), true)
    );
    assert!(!data.path().join("videos").join(&long).join("video.mp4").exists());
    // The worker goes on with the next job.
    let next = server.submit(SHORT);
    server.wait_for(&next, &["succeeded"], MINUTE);
    let cancelled = server.get("/v1/videos?state=cancelled").json();
    assert_eq!(cancelled["videos"].as_array().unwrap().len(), 2);
}

#[test]
fn a_full_queue_gets_429_with_retry_after() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &["--max-queue", "1"]);
    let running = server.submit(LONG);
    server.wait_for(&running, &["running"], MINUTE);
    let waiting = server.submit(SHORT);
    let r = server.post(SHORT);
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r
        .header("retry-after")
        .and_then(|s| s.parse::<u64>().ok())
        .is_some_and(|s| s >= 1));
    assert!(r.json()["error"].as_str().unwrap().contains("queue is full"));
    for id in [&waiting, &running] {
        server.call("DELETE", &format!("/v1/videos/{id}"), &[], None);
    }
}

#[test]
fn a_token_guards_every_v1_route() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &["--token", "s3cret"]);
    let body = SHORT.as_bytes();
    for headers in [&[][..], &[("Authorization", "Bearer wrong")][..]] {
        assert_eq!(server.call("POST", "/v1/videos", headers, Some(body)).status, 401);
        assert_eq!(server.call("GET", "/v1/videos", headers, None).status, 401);
        assert_eq!(server.call("GET", "/v1/videos/v1", headers, None).status, 401);
        assert_eq!(server.call("DELETE", "/v1/videos/v1", headers, None).status, 401);
        assert_eq!(server.call("GET", "/v1/videos/v1/events", headers, None).status, 401);
        assert_eq!(server.call("GET", "/v1/videos/v1/video.mp4", headers, None).status, 401);
    }
    let auth = [("Authorization", "Bearer s3cret")];
    let r = server.call("POST", "/v1/videos", &auth, Some(body));
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    // The page's EventSource and <video> pass it in the query.
    assert_eq!(server.get(&format!("/v1/videos/{id}?token=s3cret")).status, 200);
    assert_eq!(server.get("/healthz").status, 200);
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn a_failing_job_ends_failed_with_its_error_and_the_server_keeps_serving() {
    let data = tempfile::tempdir().unwrap();
    let loras = data.path().join("loras");
    std::fs::create_dir_all(&loras).unwrap();
    std::fs::write(loras.join("broken.safetensors"), b"not a safetensors file").unwrap();
    let server = Server::start(data.path(), &[]);
    let id = server.submit(r#"{"prompt": "x", "steps": 2, "loras": ["broken.safetensors:0.8"]}"#);
    let failed = server.wait_for(&id, &["failed", "succeeded"], MINUTE);
    assert_eq!(failed["state"], "failed");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("broken.safetensors"), "{error}");
    assert!(!data.path().join("videos").join(&id).exists());
    let next = server.submit(SHORT);
    server.wait_for(&next, &["succeeded"], MINUTE);
    assert!(server.get("/metrics").text().contains("chitu_jobs{state=\"failed\"} 1"));
}

#[test]
fn sigterm_requeues_the_running_job_and_exits_cleanly() {
    let data = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let id = server.submit(LONG);
    server.wait_denoising(&id, MINUTE);
    let status = server.terminate(Duration::from_secs(30)).expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}: {}", server.stderr());
    let server = Server::start(data.path(), &[]);
    // Back in the queue, and a stop is not a failed attempt.
    let job = server.wait_for(&id, &["running"], MINUTE);
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["error"], Value::Null);
    server.call("DELETE", &format!("/v1/videos/{id}"), &[], None);
    server.wait_for(&id, &["cancelled"], MINUTE);
}

/// JSON values of every kind, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (-5i64..300).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or Inf", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-z_ ]{0,12}".prop_map(Value::from),
        prop_oneof![
            Just("teacache"),
            Just("pab"),
            Just("unipc"),
            Just("euler"),
            Just("x:y:z")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Request-like bodies: the API's field names (and some others) with values of any kind.
fn any_body() -> impl Strategy<Value = Vec<u8>> {
    let field = prop_oneof![
        Just("prompt"),
        Just("negative_prompt"),
        Just("height"),
        Just("width"),
        Just("frames"),
        Just("steps"),
        Just("guidance"),
        Just("guidance_2"),
        Just("seed"),
        Just("solver"),
        Just("shift"),
        Just("cache"),
        Just("loras"),
        Just("timesteps"),
        Just("sigmas"),
        Just("bogus"),
    ];
    prop_oneof![
        prop::collection::btree_map(field, any_json(), 0..6).prop_map(|m| serde_json::to_vec(&Value::Object(
            m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
        ))
        .unwrap()),
        any_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        prop::collection::vec(any::<u8>(), 0..200),
    ]
}

#[test]
fn generated_bodies_never_get_a_5xx() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &["--max-queue", "4"]);
    // Keeps what the fuzzing queues from running: the worker is busy with this.
    let busy = server.submit(LONG);
    let config = ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(body in any_body())| {
        let r = server.call("POST", "/v1/videos", &[("Content-Type", "application/json")], Some(&body));
        prop_assert!(r.status < 500, "{} for {:?}: {}", r.status, String::from_utf8_lossy(&body), r.text());
        if r.status >= 400 {
            prop_assert!(r.json()["error"].is_string());
        }
        if r.status == 202 {
            let id = r.json()["id"].as_str().unwrap().to_string();
            server.call("DELETE", &format!("/v1/videos/{id}"), &[], None);
        }
    });
    assert_eq!(server.get("/healthz").json()["status"], "ok");
    server.call("DELETE", &format!("/v1/videos/{busy}"), &[], None);
    server.wait_for(&busy, &["cancelled"], MINUTE);
}

#[test]
fn under_mpirun_it_refuses_to_start_with_a_reason() {
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chitu"))
        .args(["serve", "--port", "0", "--data"])
        .arg(data.path())
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("without mpirun"), "{stderr}");
}

#[test]
fn under_cfg_parallel_rank_0_serves_and_the_other_rank_follows() {
    let data = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &["--cfg-parallel", "2"]);
    assert!(server.stderr().contains("2 in-process ranks"), "{}", server.stderr());
    let first = server.submit(r#"{"prompt": "a cat", "steps": 3, "seed": 7}"#);
    let done = server.wait_for(&first, &["succeeded", "failed"], MINUTE);
    assert_eq!(done["state"], "succeeded", "{done}");
    // A cancel mid-job drops it on both ranks; the next job runs in step again.
    let long = server.submit(LONG);
    server.wait_denoising(&long, MINUTE);
    server.call("DELETE", &format!("/v1/videos/{long}"), &[], None);
    server.wait_for(&long, &["cancelled"], MINUTE);
    let next = server.submit(r#"{"prompt": "a cat", "steps": 3, "seed": 7}"#);
    assert_eq!(
        server.wait_for(&next, &["succeeded", "failed"], MINUTE)["state"],
        "succeeded"
    );
    let mp4 = server.get(&format!("/v1/videos/{next}/video.mp4"));
    let path = data.path().join("copy.mp4");
    std::fs::write(&path, &mp4.body).unwrap();
    assert_eq!(decode_mp4(&path), (9, 64, 64));
    let status = server.terminate(Duration::from_secs(30)).expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}: {}", server.stderr());
}
