//! The routes of CLM 1.35's Worker API (`clm/infrastructure/api/
//! worker_routes.py`, `models.py`, `server.py`): same paths, JSON bodies
//! and status codes, backed by the same database code as direct mode.
//! Every `/api/worker` route needs the bearer token; `/health` does not.
//! Errors are FastAPI's shape, `{"detail": ...}`: 401 without a token
//! (the pool's, or a live one of a single worker: see [`super::tokens`]),
//! 403 when a worker's own token names another worker's row,
//! 422 for a body, path or query that does not parse (nothing is written),
//! 413 for a body over the limit, 408 for a body not received within
//! [`BODY_WITHIN`], 404/400 as CLM answers them, 500 when the database
//! fails. A handler's own work is never cut short by a deadline: a claim
//! that took place is answered (see docs/protocol.md, "Limits").

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::refusals::{self, Peer, Refusals, Verdict};
use super::tokens::{Caller, NotYours, WorkerTokens};
use crate::db::{self, Db};
use crate::vocab::{JobStatus, ModeKind, Protocol, WorkerRow, WorkerStatus};

/// Largest JSON body a route accepts (a job's result with its warnings is
/// a few kilobytes).
pub const JSON_BODY_LIMIT: usize = 1024 * 1024;
/// Largest gzipped executed notebook accepted, and its size unpacked.
pub const NOTEBOOK_BODY_LIMIT: usize = 64 * 1024 * 1024;
pub const NOTEBOOK_UNPACKED_LIMIT: u64 = 256 * 1024 * 1024;
/// How long a client may take to send a request's body once its headers
/// are in (they get [`super::LIMITS`]' `request_within`): a stalled upload
/// holds a connection, not the API.
pub const BODY_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// What every handler shares.
#[derive(Clone)]
pub struct ApiState {
    pub db: Db,
    /// CLM's cache database (`clm_cache.db`), for executed notebooks.
    pub cache_db: PathBuf,
    pub token: Arc<str>,
    /// Tokens of single workers (swarm workers).
    pub workers: WorkerTokens,
    /// Failed authentications per peer.
    pub refusals: Refusals,
}

pub fn router(state: ApiState) -> Router {
    let worker = Router::new()
        .route("/register", post(register))
        .route("/activate", post(activate))
        .route("/jobs/claim", post(claim))
        .route("/jobs/{job_id}/status", post(job_status))
        .route("/jobs/{job_id}/cancelled", get(cancelled))
        .route("/heartbeat", post(heartbeat))
        .route("/unregister", post(unregister))
        .route("/cache/add", post(cache_add))
        .route(
            "/cache/executed_notebook",
            get(get_notebook)
                .post(store_notebook)
                .layer(DefaultBodyLimit::max(NOTEBOOK_BODY_LIMIT)),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/health", get(health))
        .nest("/api/worker", worker)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "Not Found") })
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .with_state(state)
}

/// `/health` alone (what `check`'s preflight tasks reach).
pub fn health_only() -> Router {
    Router::new().route("/health", get(health))
}

/// An error in FastAPI's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: Value,
}

impl ApiError {
    fn new(status: StatusCode, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            detail: Value::String(detail.into()),
        }
    }

    /// A request that does not parse: FastAPI's validation error.
    fn unprocessable(location: &str, message: impl std::fmt::Display) -> ApiError {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            detail: json!([{ "type": "value_error", "loc": [location], "msg": message.to_string() }]),
        }
    }

    fn internal(what: &str, e: anyhow::Error) -> ApiError {
        tracing::error!("worker API: {what}: {e:#}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{what}: {e:#}"))
    }
}

impl From<NotYours> for ApiError {
    fn from(e: NotYours) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({ "detail": self.detail }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

/// A request's whole body, received within [`BODY_WITHIN`] (else 408) and
/// within the route's size limit (else 413); nothing is read by a handler
/// before it is all in.
pub struct Timed(Bytes);

impl<S: Send + Sync> FromRequest<S> for Timed {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let read = tokio::time::timeout(BODY_WITHIN, Bytes::from_request(req, state))
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("request body not received within {BODY_WITHIN:?}"),
                )
            })?;
        read.map(Timed).map_err(|e| {
            let status = e.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(status, format!("request body too large: {}", e.body_text()))
            } else {
                ApiError::unprocessable("body", e.body_text())
            }
        })
    }
}

/// A JSON body: any problem reading or parsing it is a 422 (a body over
/// the limit a 413, one too slow a 408), and the handler never runs.
pub struct Body<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let Timed(bytes) = Timed::from_request(req, state).await?;
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| ApiError::unprocessable("body", e))
    }
}

fn path_id(p: Result<Path<i64>, PathRejection>) -> Result<i64, ApiError> {
    p.map(|Path(id)| id)
        .map_err(|e| ApiError::unprocessable("path", e.body_text()))
}

/// The bearer token, compared without leaking its length or prefix through
/// timing (both sides hashed first). Never read from the query string.
async fn require_token(State(state): State<ApiState>, headers: HeaderMap, mut req: Request, next: Next) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|t| !t.is_empty());
    let peer = req.extensions().get::<Peer>().copied();
    let caller = match presented {
        Some(t) if same_secret(t, &state.token) => Some(Caller::Pool),
        Some(t) => state.workers.row_of(t).map(Caller::Worker),
        None => None,
    };
    let Some(caller) = caller else {
        return refuse(&state, peer, req.uri().path(), "without a valid token");
    };
    req.extensions_mut().insert(caller);
    let path = req.uri().path().to_string();
    let response = next.run(req).await;
    if response.status() == StatusCode::FORBIDDEN
        && let Some(Peer(addr)) = peer
    {
        tracing::warn!(peer = %addr, path, ?caller, "worker API: refused (403): a worker's token named another worker");
    }
    response
}

/// A request without a valid token: 401, logged with its peer, or 429 for
/// a peer over its budget of refusals.
fn refuse(state: &ApiState, peer: Option<Peer>, path: &str, why: &str) -> Response {
    let unauthorized =
        || ApiError::new(StatusCode::UNAUTHORIZED, "Missing or invalid Worker API token").into_response();
    let Some(Peer(addr)) = peer else {
        return unauthorized();
    };
    let now = tokio::time::Instant::now();
    if state.refusals.over_budget(addr.ip(), now) {
        return too_many();
    }
    match state.refusals.record(addr.ip(), now) {
        Verdict::Refuse => {
            tracing::warn!(peer = %addr, path, "worker API: refused (401) a request {why}");
            unauthorized()
        }
        Verdict::LastWarning => {
            tracing::warn!(
                peer = %addr,
                path,
                "worker API: refused (401) a request {why}; {} refusals within {:?}: its further requests without a valid token get 429 until then",
                refusals::BUDGET,
                refusals::WINDOW
            );
            unauthorized()
        }
        Verdict::TooMany => too_many(),
    }
}

fn too_many() -> Response {
    let mut response = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "Too many requests without a valid Worker API token from this address; try again later",
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
    response
}

fn same_secret(a: &str, b: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (x, y) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    x.iter().zip(y.iter()).fold(0u8, |acc, (p, q)| acc | (p ^ q)) == 0
}

/// Now, in UTC, as an ISO 8601 timestamp (as CLM's routes answer).
fn now_iso() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

/// SQLite's `YYYY-MM-DD HH:MM:SS` (UTC) as CLM sends it: ISO 8601 with the
/// offset.
fn sqlite_time_to_iso(t: &str) -> String {
    match t.split_once(' ') {
        Some((date, time)) if !time.contains('+') && !time.ends_with('Z') => format!("{date}T{time}+00:00"),
        _ => t.to_string(),
    }
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION"), "api_version": "1.0" }))
}

#[derive(Deserialize)]
struct RegisterBody {
    worker_type: String,
    container_id: String,
    parent_pid: Option<i64>,
}

async fn register(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Body(b): Body<RegisterBody>,
) -> ApiResult {
    if let Caller::Worker(row) = caller {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("worker {row} was registered by the supervisor; a worker's own token cannot register another"),
        ));
    }
    let row =
        s.db.call(move |c| db::workers::register_remote(c, &b.worker_type, &b.container_id, b.parent_pid))
            .await
            .map_err(|e| ApiError::internal("Failed to register worker", e))?;
    tracing::info!(worker_row = %row, "worker API: registered a worker");
    Ok(Json(json!({ "worker_id": row, "registered_at": now_iso() })))
}

#[derive(Deserialize)]
struct WorkerBody {
    worker_id: i64,
}

async fn activate(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Body(b): Body<WorkerBody>,
) -> ApiResult {
    let row = WorkerRow(b.worker_id);
    caller.may_act_for(row)?;
    let outcome =
        s.db.call(move |c| {
            Ok(match db::workers::activate(c, row) {
                Ok(found) => Ok(found),
                Err(db::workers::ActivationError::NotCreated(status)) => Err(status),
                Err(db::workers::ActivationError::Sql(e)) => return Err(e),
            })
        })
        .await
        .map_err(|e| ApiError::internal("Failed to activate worker", e))?;
    match outcome {
        Ok(true) => Ok(Json(json!({ "acknowledged": true, "activated_at": now_iso() }))),
        Ok(false) => Err(ApiError::new(StatusCode::NOT_FOUND, format!("Worker {row} not found"))),
        Err(status) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "Worker {row} has status '{status}', expected '{}'",
                WorkerStatus::Created
            ),
        )),
    }
}

#[derive(Deserialize)]
struct ClaimBody {
    worker_id: i64,
    job_type: String,
    execution_mode: Option<String>,
}

async fn claim(State(s): State<ApiState>, Extension(caller): Extension<Caller>, Body(b): Body<ClaimBody>) -> ApiResult {
    caller.may_act_for(WorkerRow(b.worker_id))?;
    // Only containers reach the queue this way: a missing mode is docker,
    // as CLM assumes for older images.
    let mode = match b.execution_mode.as_deref() {
        None => ModeKind::Docker,
        Some(m) => m
            .parse::<ModeKind>()
            .map_err(|e| ApiError::unprocessable("execution_mode", e))?,
    };
    let row = WorkerRow(b.worker_id);
    let job_type = b.job_type.clone();
    let claimed =
        s.db.call(move |c| {
            // A worker without a row was deregistered: it gets nothing
            // (CLM #853), whatever the queue holds.
            if db::workers::status(c, row)?.is_none() {
                return Ok(None);
            }
            let who = db::jobs::Claimant {
                protocol: Protocol::Clm,
                worker_row: row,
                execution_mode: mode,
            };
            loop {
                let Some(job) = db::jobs::claim(c, &job_type, who)? else {
                    return Ok(None);
                };
                match serde_json::from_str::<Value>(&job.payload) {
                    Ok(payload) if payload.is_object() => {
                        let correlation_id = db::jobs::correlation_id(c, job.id)?;
                        return Ok(Some((job, payload, correlation_id)));
                    }
                    _ => {
                        let error = "the job's payload is not a JSON object; a CLM worker cannot take it";
                        db::jobs::fail_unservable(c, job.id, row, error)?;
                    }
                }
            }
        })
        .await
        .map_err(|e| ApiError::internal("Failed to claim job", e))?;
    let Some((job, payload, correlation_id)) = claimed else {
        return Ok(Json(json!({ "job": null })));
    };
    Ok(Json(json!({ "job": {
        "id": job.id,
        "job_type": b.job_type,
        "input_file": job.input_file,
        "output_file": job.output_file,
        "content_hash": job.content_hash,
        "payload": payload,
        "correlation_id": correlation_id,
    }})))
}

#[derive(Deserialize)]
struct StatusBody {
    worker_id: i64,
    status: String,
    result: Option<serde_json::Map<String, Value>>,
    error: Option<serde_json::Map<String, Value>>,
}

async fn job_status(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    job_id: Result<Path<i64>, PathRejection>,
    Body(b): Body<StatusBody>,
) -> ApiResult {
    let job_id = path_id(job_id)?;
    caller.may_act_for(WorkerRow(b.worker_id))?;
    let status = match b.status.parse() {
        Ok(s @ (JobStatus::Completed | JobStatus::Failed)) => s,
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "Invalid status: {}. Must be '{}' or '{}'",
                    b.status,
                    JobStatus::Completed,
                    JobStatus::Failed
                ),
            ));
        }
    };
    // CLM stores them as JSON text, and an empty dict as NULL.
    let text = |m: &Option<serde_json::Map<String, Value>>| {
        m.as_ref()
            .filter(|m| !m.is_empty())
            .map(|m| Value::Object(m.clone()).to_string())
    };
    let (result, error, row) = (text(&b.result), text(&b.error), WorkerRow(b.worker_id));
    let taken =
        s.db.call_until_done("recording a job's outcome from the worker API", move |c| {
            db::jobs::report(
                c,
                &db::jobs::Report {
                    job_id,
                    worker_row: row,
                    status,
                    result: result.as_deref(),
                    error: error.as_deref(),
                },
            )
        })
        .await
        .map_err(|e| ApiError::internal("Failed to update job status", e))?;
    if !taken {
        tracing::warn!(job_id, worker_row = %row, "worker API: a report for a job that is no longer the worker's was ignored");
    }
    Ok(Json(json!({ "acknowledged": taken })))
}

async fn heartbeat(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Body(b): Body<WorkerBody>,
) -> ApiResult {
    let row = WorkerRow(b.worker_id);
    caller.may_act_for(row)?;
    let found =
        s.db.call(move |c| db::workers::heartbeat(c, row))
            .await
            .map_err(|e| ApiError::internal("Failed to update heartbeat", e))?;
    Ok(Json(json!({ "acknowledged": found, "timestamp": now_iso() })))
}

async fn cancelled(State(s): State<ApiState>, job_id: Result<Path<i64>, PathRejection>) -> ApiResult {
    let job_id = path_id(job_id)?;
    let found =
        s.db.call(move |c| db::jobs::cancellation(c, job_id))
            .await
            .map_err(|e| ApiError::internal("Failed to check job cancellation", e))?;
    let c = found.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("Job {job_id} not found")))?;
    Ok(Json(json!({
        "cancelled": c.cancelled,
        "cancelled_at": c.cancelled_at.as_deref().map(sqlite_time_to_iso),
        "cancelled_by": c.cancelled_by,
    })))
}

#[derive(Deserialize)]
struct UnregisterBody {
    worker_id: i64,
    #[serde(default = "graceful")]
    reason: String,
}

fn graceful() -> String {
    "graceful_shutdown".into()
}

async fn unregister(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Body(b): Body<UnregisterBody>,
) -> ApiResult {
    let row = WorkerRow(b.worker_id);
    caller.may_act_for(row)?;
    s.db.call(move |c| db::workers::mark_dead(c, row))
        .await
        .map_err(|e| ApiError::internal("Failed to unregister worker", e))?;
    tracing::info!(worker_row = %row, reason = %b.reason, "worker API: a worker unregistered");
    Ok(Json(json!({ "acknowledged": true })))
}

#[derive(Deserialize)]
struct CacheAddBody {
    output_file: String,
    content_hash: String,
    result_metadata: serde_json::Map<String, Value>,
}

async fn cache_add(State(s): State<ApiState>, Body(b): Body<CacheAddBody>) -> ApiResult {
    let metadata = Value::Object(b.result_metadata).to_string();
    s.db.call(move |c| db::cache::cache_add(c, &b.output_file, &b.content_hash, &metadata))
        .await
        .map_err(|e| ApiError::internal("Failed to add to cache", e))?;
    Ok(Json(json!({ "acknowledged": true })))
}

#[derive(Deserialize)]
struct NotebookQuery {
    input_file: String,
    content_hash: String,
    language: String,
    prog_lang: String,
}

impl NotebookQuery {
    fn key(&self) -> db::cache::NotebookKey<'_> {
        db::cache::NotebookKey {
            input_file: &self.input_file,
            content_hash: &self.content_hash,
            language: &self.language,
            prog_lang: &self.prog_lang,
        }
    }
}

async fn with_cache<T: Send + 'static>(
    path: PathBuf,
    f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    use anyhow::Context;
    tokio::task::spawn_blocking(move || {
        let conn = db::cache::open_cache(&path).with_context(|| format!("cache database {}", path.display()))?;
        f(&conn).with_context(|| format!("cache database {}", path.display()))
    })
    .await
    .context("cache task panicked")?
}

async fn get_notebook(
    State(s): State<ApiState>,
    q: Result<Query<NotebookQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::unprocessable("query", e.body_text()))?;
    let found = with_cache(s.cache_db.clone(), move |c| db::cache::notebook(c, &q.key()))
        .await
        .map_err(|e| ApiError::internal("Failed to read executed_notebook cache", e))?;
    let json = found.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "Executed notebook not cached"))?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &json)
        .and_then(|_| gz.finish())
        .map(|bytes| {
            (
                [
                    (header::CONTENT_TYPE, "application/octet-stream"),
                    (header::CONTENT_ENCODING, "gzip"),
                ],
                bytes,
            )
                .into_response()
        })
        .map_err(|e| ApiError::internal("Failed to compress the notebook", e.into()))
}

async fn store_notebook(
    State(s): State<ApiState>,
    q: Result<Query<NotebookQuery>, QueryRejection>,
    Timed(body): Timed,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::unprocessable("query", e.body_text()))?;
    let json = gunzip(&body)?;
    check_notebook(&json)?;
    let stored = json.len();
    with_cache(s.cache_db.clone(), move |c| {
        db::cache::store_notebook(c, &q.key(), &json)
    })
    .await
    .map_err(|e| ApiError::internal("Failed to store executed_notebook cache", e))?;
    Ok(Json(json!({ "acknowledged": true, "bytes_stored": stored })))
}

fn gunzip(body: &[u8]) -> Result<Vec<u8>, ApiError> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body)
        .take(NOTEBOOK_UNPACKED_LIMIT + 1)
        .read_to_end(&mut out)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("Body is not valid gzip: {e}")))?;
    if out.len() as u64 > NOTEBOOK_UNPACKED_LIMIT {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the notebook unpacks to more than {NOTEBOOK_UNPACKED_LIMIT} bytes"),
        ));
    }
    Ok(out)
}

/// What nbformat 4 requires at the top level: a malformed notebook must not
/// poison a later cache hit.
fn check_notebook(json: &[u8]) -> Result<(), ApiError> {
    let bad = |why: &str| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("Body is not a valid nbformat notebook: {why}"),
        )
    };
    let v: Value = serde_json::from_slice(json).map_err(|e| bad(&e.to_string()))?;
    let nb = v.as_object().ok_or_else(|| bad("not a JSON object"))?;
    match nb.get("nbformat").and_then(Value::as_i64) {
        Some(4) => {}
        Some(n) => return Err(bad(&format!("nbformat {n}, expected 4"))),
        None => return Err(bad("no nbformat version")),
    }
    if !nb.get("cells").is_some_and(Value::is_array) {
        return Err(bad("no list of cells"));
    }
    if !nb.get("metadata").is_some_and(Value::is_object) {
        return Err(bad("no metadata"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_iso_8601_utc() {
        assert_eq!(sqlite_time_to_iso("2026-11-26 17:00:01"), "2026-11-26T17:00:01+00:00");
        assert_eq!(
            sqlite_time_to_iso("2026-11-26T17:00:01+00:00"),
            "2026-11-26T17:00:01+00:00"
        );
        assert!(humantime::parse_rfc3339(&now_iso()).is_ok());
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("ab", "abc"));
        assert!(!same_secret("", "abc"));
    }

    #[test]
    fn notebooks_are_checked_before_they_are_stored() {
        assert!(check_notebook(br#"{"nbformat": 4, "nbformat_minor": 5, "cells": [], "metadata": {}}"#).is_ok());
        assert!(check_notebook(br#"{"nbformat": 3, "cells": [], "metadata": {}}"#).is_err());
        assert!(check_notebook(br#"{"cells": [], "metadata": {}}"#).is_err());
        assert!(check_notebook(br#"[1, 2]"#).is_err());
        assert!(check_notebook(b"not json").is_err());
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod over_http;
