//! The HTTP routes. Every error is JSON, `{"error": "...", "field": ...}`, with a 4xx status
//! for anything the client can fix.

use super::store::{parse_id, JobState};
use super::{lock, stop, ServeError, Service};
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;

type Svc = State<Arc<Service>>;

/// An error answer.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    error: String,
    field: Option<String>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
            field: None,
            retry_after: None,
        }
    }

    fn bad_field(e: crate::cli::FieldError) -> Self {
        Self {
            field: Some(e.field),
            ..Self::new(StatusCode::BAD_REQUEST, e.message)
        }
    }

    fn not_found(id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("no video {id:?}"))
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": self.error, "field": self.field }));
        let mut response = (self.status, body).into_response();
        if let Some(s) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

/// Binds `host:port`, prints the address on stdout's first line, and serves until SIGTERM or
/// Ctrl-C.
pub(crate) async fn serve(svc: Arc<Service>, host: &str, port: u16) -> Result<(), ServeError> {
    let net = |what: String| move |source| ServeError::Net { what, source };
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .map_err(net(format!("binding {host}:{port}")))?;
    let addr = listener.local_addr().map_err(net("reading the bound address".into()))?;
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "listening on http://{addr}");
    let _ = stdout.flush();
    let app = router(svc.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal(svc))
        .await
        .map_err(net("serving".into()))
}

async fn shutdown_signal(svc: Arc<Service>) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("stopping: the running job goes back to the queue");
    stop(&svc);
}

fn router(svc: Arc<Service>) -> Router {
    let v1 = Router::new()
        .route("/v1/videos", get(list).post(create))
        .route("/v1/videos/{id}", get(show).delete(cancel))
        .route("/v1/videos/{id}/events", get(events))
        .route("/v1/videos/{id}/{file}", get(file))
        .route_layer(middleware::from_fn_with_state(svc.clone(), auth));
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(health))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .with_state(svc)
}

/// `--token`: a bearer token, or `?token=` for what a browser cannot give headers to.
async fn auth(State(svc): Svc, req: Request, next: Next) -> Response {
    let Some(token) = &svc.token else {
        return next.run(req).await;
    };
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let query = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .map(|t| t.to_string())
    });
    let given = header.map(str::to_string).or(query);
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "wrong token").into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this server needs a token: Authorization: Bearer TOKEN",
        )
        .into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn health(State(svc): Svc) -> Result<Json<Value>, ApiError> {
    let backend = &svc.generator.backend;
    let queued = svc.store().counts().map_err(ApiError::internal)?;
    let running = lock(&svc.live).as_ref().map(|l| format!("v{}", l.seq));
    Ok(Json(json!({
        "status": "ok",
        "model": backend.name,
        "format": crate::pipeline::Format::new(backend.dtype, backend.weights).name(),
        "queued": queued.iter().find(|(s, _)| *s == JobState::Queued).map_or(0, |(_, n)| *n),
        "running": running,
    })))
}

async fn metrics(State(svc): Svc) -> Result<Response, ApiError> {
    let counts = svc.store().counts().map_err(ApiError::internal)?;
    let queue = counts
        .iter()
        .find(|(s, _)| *s == JobState::Queued)
        .map_or(0, |(_, n)| *n);
    let named: Vec<(&str, u64)> = counts.iter().map(|(s, n)| (s.name(), *n)).collect();
    let text = svc
        .metrics()
        .render(queue, &named, crate::pipeline::video::peak_rss_bytes());
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// `POST /v1/videos`: validated as the CLI validates, written to the store, then answered.
async fn create(State(svc): Svc, body: Body) -> Result<(StatusCode, Json<Value>), ApiError> {
    let bytes = axum::body::to_bytes(body, svc.max_body).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over the limit of {} bytes", svc.max_body),
        )
    })?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")))?;
    let request = svc.parse_request(&value).map_err(ApiError::bad_field)?;
    let steps = request.params.num_inference_steps;
    let checked = svc.clone();
    // The model check may wait for the worker's current step: off the async threads.
    tokio::task::spawn_blocking(move || checked.check(&request))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::bad_field)?;
    let inserting = svc.clone();
    let inserted = tokio::task::spawn_blocking(move || {
        let max = inserting.max_queue;
        inserting.store().insert(&value, steps, max)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    let Some(job) = inserted else {
        return Err(ApiError {
            retry_after: Some(svc.metrics().retry_after_s()),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("the queue is full ({} jobs wait); try again later", svc.max_queue),
            )
        });
    };
    svc.notify_work();
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": job.id(), "state": "queued" }))))
}

fn seq_of(id: &str) -> Result<i64, ApiError> {
    parse_id(id).ok_or_else(|| ApiError::not_found(id))
}

async fn show(State(svc): Svc, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let status = svc.status(seq_of(&id)?).map_err(ApiError::internal)?;
    status.map(Json).ok_or_else(|| ApiError::not_found(&id))
}

/// `GET /v1/videos?state=&limit=&before=`: newest first; `next` is the `before` of the next page.
async fn list(State(svc): Svc, Query(q): Query<HashMap<String, String>>) -> Result<Json<Value>, ApiError> {
    let bad = |field: &str, m: String| ApiError {
        field: Some(field.into()),
        ..ApiError::new(StatusCode::BAD_REQUEST, m)
    };
    if let Some(k) = q
        .keys()
        .find(|k| !["state", "limit", "before", "token"].contains(&k.as_str()))
    {
        return Err(bad(
            k,
            format!("unknown query parameter {k:?}: expected state, limit or before"),
        ));
    }
    let state = match q.get("state").map(String::as_str) {
        None | Some("") => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            bad(
                "state",
                format!("state {s:?}: expected queued, running, succeeded, failed or cancelled"),
            )
        })?),
    };
    let limit = match q.get("limit") {
        None => 50,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=500).contains(n))
            .ok_or_else(|| bad("limit", format!("limit {l:?}: expected a whole number from 1 to 500")))?,
    };
    let before = match q.get("before") {
        None => None,
        Some(b) => Some(parse_id(b).ok_or_else(|| bad("before", format!("before {b:?}: expected a video id")))?),
    };
    let jobs = svc.store().list(state, limit, before).map_err(ApiError::internal)?;
    let next = match jobs.len() == limit {
        true => jobs.last().map(|j| j.id()),
        false => None,
    };
    let videos: Vec<Value> = jobs.iter().map(|j| svc.status_of(j)).collect();
    Ok(Json(json!({ "videos": videos, "next": next })))
}

/// `DELETE /v1/videos/{id}`: a queued job is cancelled now (200); a running one at its next
/// step boundary (202).
async fn cancel(State(svc): Svc, Path(id): Path<String>) -> Result<(StatusCode, Json<Value>), ApiError> {
    let seq = seq_of(&id)?;
    let job = svc.store().get(seq).map_err(ApiError::internal)?;
    let job = job.ok_or_else(|| ApiError::not_found(&id))?;
    if job.state.is_final() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{id} has already {}; nothing to cancel", job.state.name()),
        ));
    }
    let cancelled_now = svc.store().cancel_queued(seq).map_err(ApiError::internal)?;
    if cancelled_now {
        svc.publish(seq, "final");
    } else {
        // It started meanwhile: the worker stops it at the next step boundary.
        lock(&svc.cancels).insert(seq);
    }
    let status = svc.status(seq).map_err(ApiError::internal)?.unwrap_or(Value::Null);
    let code = match cancelled_now {
        true => StatusCode::OK,
        false => StatusCode::ACCEPTED,
    };
    Ok((code, Json(status)))
}

/// Whether a job status (from `Service::status`) is of a job that has ended.
fn has_ended(status: &Value) -> bool {
    status["state"]
        .as_str()
        .and_then(JobState::parse)
        .is_some_and(JobState::is_final)
}

/// `GET /v1/videos/{id}/events`: the status now, then one event per stage change and denoise
/// step, and a `final` event, after which the stream ends.
async fn events(
    State(svc): Svc,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let seq = seq_of(&id)?;
    // Subscribed before the status is read, so that no change falls between the two.
    let rx = svc.events.subscribe();
    let now = svc.status(seq).map_err(ApiError::internal)?;
    let now = now.ok_or_else(|| ApiError::not_found(&id))?;
    let ended = has_ended(&now);
    let first = SseEvent::default()
        .event(if ended { "final" } else { "status" })
        .data(now.to_string());
    let state = (Some(first), rx, ended, svc);
    let stream = stream::unfold(state, move |(first, mut rx, ended, svc)| async move {
        if let Some(event) = first {
            return Some((Ok(event), (None, rx, ended, svc)));
        }
        if ended {
            return None;
        }
        loop {
            match rx.recv().await {
                Ok(ev) if ev.seq == 0 => return None,
                Ok(ev) if ev.seq == seq => {
                    let event = SseEvent::default().event(ev.kind).data(ev.status.to_string());
                    return Some((Ok(event), (None, rx, ev.kind == "final", svc)));
                }
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Some events were missed: the status now stands for them.
                    let status = svc.status(seq).ok().flatten()?;
                    let ended = has_ended(&status);
                    let kind = if ended { "final" } else { "status" };
                    let event = SseEvent::default().event(kind).data(status.to_string());
                    return Some((Ok(event), (None, rx, ended, svc)));
                }
                Err(_) => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// `video.mp4`, `contact.png`, `meta.json` of a finished job, with Range support.
async fn file(State(svc): Svc, Path((id, name)): Path<(String, String)>, req: Request) -> Result<Response, ApiError> {
    let seq = seq_of(&id)?;
    if !["video.mp4", "contact.png", "meta.json"].contains(&name.as_str()) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no file {name:?}: a video has video.mp4, contact.png and meta.json"),
        ));
    }
    let job = svc.store().get(seq).map_err(ApiError::internal)?;
    let job = job.ok_or_else(|| ApiError::not_found(&id))?;
    if job.state != JobState::Succeeded {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("{id} is {}: its files exist once it has succeeded", job.state.name()),
        ));
    }
    let path = svc.job_dir(seq).join(&name);
    if !path.is_file() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("{id}'s {name} is missing from the data folder"),
        ));
    }
    let response = tower_http::services::ServeFile::new(path)
        .try_call(req)
        .await
        .map_err(ApiError::internal)?;
    Ok(response.map(Body::new))
}
