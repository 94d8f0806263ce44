//! Every route of the Worker API driven through the router as a CLM worker
//! in a container calls it (`tower::ServiceExt::oneshot`), against a real
//! CLM database in a temporary folder: the status code, the JSON answer and
//! what each request left in the database.

use std::io::{Read, Write};
use std::path::PathBuf;

use axum::Router;
use axum::body::{Body as HttpBody, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use rusqlite::types::FromSql;
use rusqlite::{Connection, Params, params};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::{ApiState, JSON_BODY_LIMIT, router};
use crate::api::tokens::WorkerTokens;
use crate::db::jobs::{self, NewJob};
use crate::db::{self, Db};
use crate::vocab::Protocol;
use crate::vocab::WorkerRow;

const TOKEN: &str = "secret";

/// A router over a fresh CLM database; the folder lives as long as it.
struct Api {
    router: Router,
    /// Tokens of single workers, as a swarm slot mints them.
    tokens: WorkerTokens,
    db: PathBuf,
    cache_db: PathBuf,
    _dir: tempfile::TempDir,
}

fn app() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.db");
    let (conn, protocol) = db::open(&path, Some(Protocol::Clm)).unwrap();
    assert_eq!(protocol, Protocol::Clm);
    let cache_db = dir.path().join("clm_cache.db");
    let state = ApiState {
        db: Db::new(conn, &path, protocol),
        cache_db: cache_db.clone(),
        token: TOKEN.into(),
        workers: WorkerTokens::default(),
        refusals: crate::api::refusals::Refusals::default(),
    };
    Api {
        tokens: state.workers.clone(),
        router: router(state),
        db: path,
        cache_db,
        _dir: dir,
    }
}

/// A request with `Authorization: <auth>` when given.
fn request(method: Method, uri: &str, auth: Option<&str>, body: impl Into<HttpBody>) -> Request<HttpBody> {
    let mut r = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(auth) = auth {
        r = r.header(header::AUTHORIZATION, auth);
    }
    r.body(body.into()).unwrap()
}

/// The answer's body as JSON (Null when empty, a string when not JSON).
fn json_of(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into()))
}

impl Api {
    async fn call(&self, req: Request<HttpBody>) -> (StatusCode, HeaderMap, Bytes) {
        let response = self.router.clone().oneshot(req).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        (parts.status, parts.headers, bytes)
    }

    /// `body` sent as JSON (none for Null), with `Bearer <token>` when given.
    async fn send(&self, method: Method, uri: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let body = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let (status, _, bytes) = self.call(request(method, uri, auth.as_deref(), body)).await;
        (status, json_of(&bytes))
    }

    async fn post(&self, uri: &str, body: Value) -> (StatusCode, Value) {
        self.send(Method::POST, uri, Some(TOKEN), body).await
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.send(Method::GET, uri, Some(TOKEN), Value::Null).await
    }

    /// A second connection to the database, as another process has.
    fn conn(&self) -> Connection {
        db::open_existing(&self.db).unwrap().0
    }

    fn one<T: FromSql>(&self, sql: &str, p: impl Params) -> T {
        self.conn().query_row(sql, p, |r| r.get(0)).unwrap()
    }

    fn count(&self, table: &str) -> i64 {
        self.one(&format!("SELECT COUNT(*) FROM {table}"), [])
    }

    /// A worker row with `status`, as CLM's pool or a registration leaves it.
    fn worker(&self, status: &str) -> i64 {
        let c = self.conn();
        let n: i64 = c.query_row("SELECT COUNT(*) FROM workers", [], |r| r.get(0)).unwrap();
        c.execute(
            "INSERT INTO workers (worker_type, container_id, status, last_heartbeat)
             VALUES ('notebook', ?1, ?2, '2000-01-01 00:00:00')",
            params![format!("container-{n}"), status],
        )
        .unwrap();
        c.last_insert_rowid()
    }

    /// A pending `notebook` job.
    fn job(&self, input_file: &str, payload: &str) -> i64 {
        jobs::submit(
            &self.conn(),
            &NewJob {
                job_type: "notebook",
                input_file,
                output_file: "out.html",
                content_hash: "hash",
                payload,
                priority: 0,
                max_attempts: 3,
            },
        )
        .unwrap()
    }

    fn job_status(&self, id: i64) -> String {
        self.one("SELECT status FROM jobs WHERE id = ?1", [id])
    }

    fn worker_status(&self, id: i64) -> String {
        self.one("SELECT status FROM workers WHERE id = ?1", [id])
    }

    /// A `processing` job claimed through the API by a fresh idle worker:
    /// (job, worker).
    async fn claimed(&self) -> (i64, i64) {
        let w = self.worker("idle");
        let id = self.job("a.py", "{}");
        let (status, body) = self.post("/api/worker/jobs/claim", claim_body(w)).await;
        assert_eq!((status, &body["job"]["id"]), (StatusCode::OK, &json!(id)));
        (id, w)
    }
}

fn claim_body(worker: i64) -> Value {
    json!({ "worker_id": worker, "job_type": "notebook" })
}

/// The detail of a FastAPI validation error names where it failed.
fn unprocessable_at(body: &Value) -> &Value {
    &body["detail"][0]["loc"][0]
}

fn gzip(bytes: &[u8], level: flate2::Compression) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), level);
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).unwrap();
    out
}

const NOTEBOOK: &str =
    "/api/worker/cache/executed_notebook?input_file=slides%2Fintro.py&content_hash=h1&language=de&prog_lang=python";

fn notebook_json() -> Vec<u8> {
    json!({ "nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [{ "cell_type": "markdown", "source": "Hallo", "metadata": {} }] })
        .to_string()
        .into_bytes()
}

#[tokio::test]
async fn health_is_open_and_tells_only_the_version() {
    let api = app();
    let (status, body) = api.send(Method::GET, "/health", None, Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION"), "api_version": "1.0" })
    );
}

#[tokio::test]
async fn only_the_bearer_token_in_the_header_opens_a_worker_route() {
    let api = app();
    let body = json!({ "worker_type": "notebook", "container_id": "c1" }).to_string();
    for (auth, uri) in [
        (None, "/api/worker/register"),
        (Some("Bearer wrong"), "/api/worker/register"),
        (Some("Bearer secre"), "/api/worker/register"),
        (Some("Bearer secrets"), "/api/worker/register"),
        (Some("Bearer "), "/api/worker/register"),
        (Some("Basic secret"), "/api/worker/register"),
        (Some("secret"), "/api/worker/register"),
        (None, "/api/worker/register?token=secret"),
    ] {
        let (status, headers, bytes) = api.call(request(Method::POST, uri, auth, body.clone())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?} {uri}");
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer", "{auth:?}");
        assert_eq!(
            json_of(&bytes),
            json!({ "detail": "Missing or invalid Worker API token" })
        );
    }
    assert_eq!(api.count("workers"), 0);
    // The scheme is case-insensitive.
    let (status, _, _) = api
        .call(request(
            Method::POST,
            "/api/worker/register",
            Some("bearer secret"),
            body,
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(api.count("workers"), 1);
}

#[tokio::test]
async fn every_worker_route_needs_the_token_before_it_reads_anything() {
    let api = app();
    let w = api.worker("created");
    let id = api.job("a.py", "{}");
    let routes = [
        (Method::POST, "/api/worker/register".to_string()),
        (Method::POST, "/api/worker/activate".to_string()),
        (Method::POST, "/api/worker/jobs/claim".to_string()),
        (Method::POST, format!("/api/worker/jobs/{id}/status")),
        (Method::GET, format!("/api/worker/jobs/{id}/cancelled")),
        (Method::POST, "/api/worker/heartbeat".to_string()),
        (Method::POST, "/api/worker/unregister".to_string()),
        (Method::POST, "/api/worker/cache/add".to_string()),
        (Method::GET, NOTEBOOK.to_string()),
        (Method::POST, NOTEBOOK.to_string()),
    ];
    // Bodies that would be accepted with the token.
    let body = json!({
        "worker_type": "notebook", "container_id": "c1", "worker_id": w, "job_type": "notebook",
        "status": "completed", "output_file": "o", "content_hash": "h", "result_metadata": {},
    });
    for (method, uri) in routes {
        let (status, body) = api.send(method.clone(), &uri, Some("wrong"), body.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {uri}");
        assert_eq!(body["detail"], "Missing or invalid Worker API token");
    }
    assert_eq!(api.count("workers"), 1);
    assert_eq!(api.worker_status(w), "created");
    assert_eq!(api.job_status(id), "pending");
    assert_eq!(api.count("results_cache"), 0);
    assert!(!api.cache_db.exists(), "the cache database was opened");
}

#[tokio::test]
async fn unknown_paths_are_404_in_fastapi_shape() {
    let api = app();
    for (method, uri, token) in [
        (Method::GET, "/", None),
        (Method::GET, "/api/worker", Some(TOKEN)),
        (Method::POST, "/api/worker/nope", Some(TOKEN)),
        (Method::POST, "/api/worker/nope", None),
        (Method::POST, "/api/worker/jobs/1/finish", Some(TOKEN)),
        (Method::POST, "/api/workers/register", Some(TOKEN)),
    ] {
        let (status, body) = api.send(method, uri, token, json!({})).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(body, json!({ "detail": "Not Found" }), "{uri}");
    }
}

#[tokio::test]
async fn a_wrong_method_is_405_once_the_token_is_right() {
    let api = app();
    let (status, _) = api.send(Method::GET, "/api/worker/register", None, Value::Null).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = api.get("/api/worker/register").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _) = api.post("/api/worker/jobs/1/cancelled", json!({})).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _) = api.post("/health", json!({})).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn register_creates_an_idle_worker_row() {
    let api = app();
    let (status, body) = api
        .post(
            "/api/worker/register",
            json!({ "worker_type": "plantuml", "container_id": "abc123", "parent_pid": 4242 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let row = body["worker_id"].as_i64().unwrap();
    assert!(
        humantime::parse_rfc3339(body["registered_at"].as_str().unwrap()).is_ok(),
        "{body}"
    );
    let (worker_type, container_id, state, parent_pid): (String, String, String, Option<i64>) = api
        .conn()
        .query_row(
            "SELECT worker_type, container_id, status, parent_pid FROM workers WHERE id = ?1",
            [row],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(
        (worker_type.as_str(), container_id.as_str(), state.as_str(), parent_pid),
        ("plantuml", "abc123", "idle", Some(4242))
    );
    // parent_pid is optional.
    let (status, body) = api
        .post(
            "/api/worker/register",
            json!({ "worker_type": "drawio", "container_id": "def456" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let second = body["worker_id"].as_i64().unwrap();
    assert_ne!(second, row);
    let parent: Option<i64> = api.one("SELECT parent_pid FROM workers WHERE id = ?1", [second]);
    assert_eq!(parent, None);
    assert_eq!(api.worker_status(second), "idle");
}

#[tokio::test]
async fn register_refuses_a_body_that_does_not_parse_and_writes_nothing() {
    let api = app();
    for body in [
        r#"{"worker_type": "notebook"}"#,
        r#"{"worker_type": 5, "container_id": "c1"}"#,
        r#"{"worker_type": "notebook", "container_id": "c1", "parent_pid": "12"}"#,
        r#"{"worker_type": "notebook", "container_id": "c1""#,
        "",
        "[]",
    ] {
        let (status, _, bytes) = api
            .call(request(
                Method::POST,
                "/api/worker/register",
                Some("Bearer secret"),
                body,
            ))
            .await;
        let answer = json_of(&bytes);
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(unprocessable_at(&answer), "body", "{body}: {answer}");
        assert_eq!(answer["detail"][0]["type"], "value_error");
    }
    assert_eq!(api.count("workers"), 0);
}

#[tokio::test]
async fn registering_one_container_id_twice_is_a_500() {
    let api = app();
    let body = json!({ "worker_type": "notebook", "container_id": "same" });
    assert_eq!(api.post("/api/worker/register", body.clone()).await.0, StatusCode::OK);
    let (status, answer) = api.post("/api/worker/register", body).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let detail = answer["detail"].as_str().unwrap();
    assert!(detail.starts_with("Failed to register worker"), "{detail}");
    assert!(detail.contains("UNIQUE"), "{detail}");
    assert_eq!(api.count("workers"), 1);
}

#[tokio::test]
async fn activate_turns_a_created_row_idle() {
    let api = app();
    let w = api.worker("created");
    let (status, body) = api.post("/api/worker/activate", json!({ "worker_id": w })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["acknowledged"], true);
    assert!(
        humantime::parse_rfc3339(body["activated_at"].as_str().unwrap()).is_ok(),
        "{body}"
    );
    assert_eq!(api.worker_status(w), "idle");
    let fresh: bool = api.one(
        "SELECT last_heartbeat >= datetime('now', '-1 minute') FROM workers WHERE id = ?1",
        [w],
    );
    assert!(fresh, "last_heartbeat was not refreshed");
}

#[tokio::test]
async fn activate_is_404_for_an_unknown_worker_and_400_for_one_not_created() {
    let api = app();
    let (status, body) = api.post("/api/worker/activate", json!({ "worker_id": 999 })).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, json!({ "detail": "Worker 999 not found" }));
    assert_eq!(api.count("workers"), 0);

    let w = api.worker("dead");
    let (status, body) = api.post("/api/worker/activate", json!({ "worker_id": w })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["detail"],
        format!("Worker {w} has status 'dead', expected 'created'")
    );
    assert_eq!(api.worker_status(w), "dead");

    let (status, body) = api.post("/api/worker/activate", json!({ "worker_id": "one" })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(unprocessable_at(&body), "body");
}

#[tokio::test]
async fn claim_hands_out_the_oldest_pending_job_once() {
    let api = app();
    let w = api.worker("idle");
    let newer = api.job("newer.py", r#"{"kind": "newer"}"#);
    let older = api.job("older.py", r#"{"kind": "older", "n": 1}"#);
    let other_type = api.job("other.py", "{}");
    let c = api.conn();
    c.execute(
        "UPDATE jobs SET created_at = '2000-01-01 00:00:00', correlation_id = 'corr-1' WHERE id = ?1",
        [older],
    )
    .unwrap();
    c.execute("UPDATE jobs SET job_type = 'plantuml' WHERE id = ?1", [other_type])
        .unwrap();

    let (status, body) = api.post("/api/worker/jobs/claim", claim_body(w)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({ "job": {
            "id": older, "job_type": "notebook", "input_file": "older.py", "output_file": "out.html",
            "content_hash": "hash", "payload": { "kind": "older", "n": 1 }, "correlation_id": "corr-1",
        }})
    );
    let (state, worker_id, attempts, started): (String, i64, i64, bool) = c
        .query_row(
            "SELECT status, worker_id, attempts, started_at IS NOT NULL FROM jobs WHERE id = ?1",
            [older],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(
        (state.as_str(), worker_id, attempts, started),
        ("processing", w, 1, true)
    );
    assert_eq!(api.worker_status(w), "busy");

    let (_, body) = api.post("/api/worker/jobs/claim", claim_body(w)).await;
    assert_eq!(body["job"]["id"], newer);
    assert_eq!(body["job"]["correlation_id"], Value::Null);
    let (status, body) = api.post("/api/worker/jobs/claim", claim_body(w)).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "job": null })));
    assert_eq!(api.job_status(other_type), "pending");
}

#[tokio::test]
async fn claim_without_an_execution_mode_takes_only_docker_or_untagged_jobs() {
    let api = app();
    let w = api.worker("idle");
    let direct = api.job("direct.py", "{}");
    let docker = api.job("docker.py", "{}");
    let c = api.conn();
    c.execute("UPDATE jobs SET execution_mode = 'direct' WHERE id = ?1", [direct])
        .unwrap();
    c.execute("UPDATE jobs SET execution_mode = 'docker' WHERE id = ?1", [docker])
        .unwrap();

    let (_, body) = api.post("/api/worker/jobs/claim", claim_body(w)).await;
    assert_eq!(body["job"]["id"], docker);
    let (_, body) = api.post("/api/worker/jobs/claim", claim_body(w)).await;
    assert_eq!(body, json!({ "job": null }));
    assert_eq!(api.job_status(direct), "pending");

    let (_, body) = api
        .post(
            "/api/worker/jobs/claim",
            json!({ "worker_id": w, "job_type": "notebook", "execution_mode": "direct" }),
        )
        .await;
    assert_eq!(body["job"]["id"], direct);
}

#[tokio::test]
async fn claim_gives_nothing_to_a_worker_without_a_row() {
    let api = app();
    let id = api.job("a.py", "{}");
    let (status, body) = api.post("/api/worker/jobs/claim", claim_body(999)).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "job": null })));
    assert_eq!(api.job_status(id), "pending");
    let attempts: i64 = api.one("SELECT attempts FROM jobs WHERE id = ?1", [id]);
    assert_eq!(attempts, 0);
}

#[tokio::test]
async fn claim_fails_a_job_whose_payload_is_not_an_object_and_hands_out_the_next() {
    let api = app();
    let w = api.worker("idle");
    let list = api.job("list.py", "[1, 2]");
    let text = api.job("text.py", "not json");
    let good = api.job("good.py", r#"{"ok": true}"#);

    let (status, body) = api.post("/api/worker/jobs/claim", claim_body(w)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["job"]["id"], good);
    assert_eq!(body["job"]["payload"], json!({ "ok": true }));
    for bad in [list, text] {
        let (state, worker_id, error): (String, i64, String) = api
            .conn()
            .query_row("SELECT status, worker_id, error FROM jobs WHERE id = ?1", [bad], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((state.as_str(), worker_id), ("failed", w));
        assert!(error.contains("payload is not a JSON object"), "{error}");
    }
    assert_eq!(api.worker_status(w), "busy");
}

#[tokio::test]
async fn claim_refuses_a_body_that_does_not_parse_and_claims_nothing() {
    let api = app();
    let w = api.worker("idle");
    let id = api.job("a.py", "{}");
    let (status, body) = api
        .post(
            "/api/worker/jobs/claim",
            json!({ "worker_id": w, "job_type": "notebook", "execution_mode": "kubernetes" }),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(unprocessable_at(&body), "execution_mode");
    for bad in [
        json!({ "worker_id": w }),
        json!({ "job_type": "notebook" }),
        json!({ "worker_id": w.to_string(), "job_type": "notebook" }),
    ] {
        let (status, body) = api.post("/api/worker/jobs/claim", bad.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        assert_eq!(unprocessable_at(&body), "body", "{bad}");
    }
    assert_eq!(api.job_status(id), "pending");
    assert_eq!(api.worker_status(w), "idle");
}

#[tokio::test]
async fn a_completed_report_records_the_result_and_frees_the_worker() {
    let api = app();
    let (id, w) = api.claimed().await;
    let (status, body) = api
        .post(
            &format!("/api/worker/jobs/{id}/status"),
            json!({ "worker_id": w, "status": "completed", "result": { "warnings": ["cell 3 is slow"] } }),
        )
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "acknowledged": true })));
    let (state, done_at, error, result): (String, bool, Option<String>, String) = api
        .conn()
        .query_row(
            "SELECT status, completed_at IS NOT NULL, error, result FROM jobs WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!((state.as_str(), done_at, error), ("completed", true, None));
    assert_eq!(
        serde_json::from_str::<Value>(&result).unwrap(),
        json!({ "warnings": ["cell 3 is slow"] })
    );
    let (state, processed, failed): (String, i64, i64) = api
        .conn()
        .query_row(
            "SELECT status, jobs_processed, jobs_failed FROM workers WHERE id = ?1",
            [w],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((state.as_str(), processed, failed), ("idle", 1, 0));
}

#[tokio::test]
async fn a_failed_report_records_the_error_and_stores_an_empty_result_as_null() {
    let api = app();
    let (id, w) = api.claimed().await;
    let (status, body) = api
        .post(
            &format!("/api/worker/jobs/{id}/status"),
            json!({ "worker_id": w, "status": "failed", "error": { "message": "kernel died" }, "result": {} }),
        )
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "acknowledged": true })));
    let (state, error, result): (String, String, Option<String>) = api
        .conn()
        .query_row("SELECT status, error, result FROM jobs WHERE id = ?1", [id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(state, "failed");
    assert_eq!(
        serde_json::from_str::<Value>(&error).unwrap(),
        json!({ "message": "kernel died" })
    );
    assert_eq!(result, None);
    let (state, processed, failed): (String, i64, i64) = api
        .conn()
        .query_row(
            "SELECT status, jobs_processed, jobs_failed FROM workers WHERE id = ?1",
            [w],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((state.as_str(), processed, failed), ("idle", 0, 1));
}

#[tokio::test]
async fn a_report_for_a_job_that_is_not_the_workers_is_not_acknowledged() {
    let api = app();
    let (id, w) = api.claimed().await;
    let other = api.worker("idle");
    let completed = |worker: i64| json!({ "worker_id": worker, "status": "completed", "result": { "x": 1 } });

    // Another worker's report, a report for no job.
    let (status, body) = api
        .post(&format!("/api/worker/jobs/{id}/status"), completed(other))
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "acknowledged": false })));
    let (status, body) = api.post("/api/worker/jobs/999/status", completed(w)).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "acknowledged": false })));
    assert_eq!(api.job_status(id), "processing");
    assert_eq!(api.worker_status(w), "busy");

    // A job cancelled while it ran stays cancelled.
    api.conn()
        .execute("UPDATE jobs SET status = 'cancelled' WHERE id = ?1", [id])
        .unwrap();
    let (status, body) = api.post(&format!("/api/worker/jobs/{id}/status"), completed(w)).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "acknowledged": false })));
    assert_eq!(api.job_status(id), "cancelled");
    let result: Option<String> = api.one("SELECT result FROM jobs WHERE id = ?1", [id]);
    assert_eq!(result, None);
}

#[tokio::test]
async fn a_report_with_another_status_is_400_and_changes_nothing() {
    let api = app();
    let (id, w) = api.claimed().await;
    for word in ["pending", "cancelled", "Completed", ""] {
        let (status, body) = api
            .post(
                &format!("/api/worker/jobs/{id}/status"),
                json!({ "worker_id": w, "status": word }),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{word}");
        assert_eq!(
            body["detail"],
            format!("Invalid status: {word}. Must be 'completed' or 'failed'")
        );
    }
    assert_eq!(api.job_status(id), "processing");
    assert_eq!(api.worker_status(w), "busy");
}

#[tokio::test]
async fn a_report_that_does_not_parse_is_422_and_changes_nothing() {
    let api = app();
    let (id, w) = api.claimed().await;
    let good = json!({ "worker_id": w, "status": "completed" });
    let (status, body) = api.post("/api/worker/jobs/abc/status", good.clone()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(unprocessable_at(&body), "path");
    let (status, body) = api.post("/api/worker/jobs/1.5/status", good).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(unprocessable_at(&body), "path");
    for bad in [
        json!({ "status": "completed" }),
        json!({ "worker_id": w }),
        json!({ "worker_id": w, "status": "completed", "result": ["not", "a", "dict"] }),
        json!({ "worker_id": w, "status": "failed", "error": "a string" }),
    ] {
        let (status, body) = api.post(&format!("/api/worker/jobs/{id}/status"), bad.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        assert_eq!(unprocessable_at(&body), "body", "{bad}");
    }
    assert_eq!(api.job_status(id), "processing");
    assert_eq!(api.worker_status(w), "busy");
}

#[tokio::test]
async fn cancelled_tells_whether_and_when_a_job_was_cancelled_and_404_for_no_job() {
    let api = app();
    let running = api.job("a.py", "{}");
    let cancelled = api.job("b.py", "{}");
    api.conn()
        .execute(
            "UPDATE jobs SET status = 'cancelled', cancelled_at = '2026-01-02 03:04:05', cancelled_by = 'corr-9'
             WHERE id = ?1",
            [cancelled],
        )
        .unwrap();
    let (status, body) = api.get(&format!("/api/worker/jobs/{running}/cancelled")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({ "cancelled": false, "cancelled_at": null, "cancelled_by": null })
    );
    let (status, body) = api.get(&format!("/api/worker/jobs/{cancelled}/cancelled")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({ "cancelled": true, "cancelled_at": "2026-01-02T03:04:05+00:00", "cancelled_by": "corr-9" })
    );
    assert_eq!(api.job_status(running), "pending");

    let (status, body) = api.get("/api/worker/jobs/999/cancelled").await;
    assert_eq!(
        (status, body),
        (StatusCode::NOT_FOUND, json!({ "detail": "Job 999 not found" }))
    );
    let (status, body) = api.get("/api/worker/jobs/latest/cancelled").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(unprocessable_at(&body), "path");
}

#[tokio::test]
async fn heartbeat_refreshes_last_heartbeat() {
    let api = app();
    let w = api.worker("idle");
    let other = api.worker("idle");
    let (status, body) = api.post("/api/worker/heartbeat", json!({ "worker_id": w })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["acknowledged"], true);
    assert!(
        humantime::parse_rfc3339(body["timestamp"].as_str().unwrap()).is_ok(),
        "{body}"
    );
    let beat = "SELECT last_heartbeat >= datetime('now', '-1 minute') FROM workers WHERE id = ?1";
    assert!(api.one::<bool>(beat, [w]), "last_heartbeat was not refreshed");
    assert!(!api.one::<bool>(beat, [other]), "another worker's heartbeat moved");
    assert_eq!(api.worker_status(w), "idle");
}

#[tokio::test]
async fn heartbeat_for_an_unknown_worker_is_not_acknowledged() {
    let api = app();
    let (status, body) = api.post("/api/worker/heartbeat", json!({ "worker_id": 999 })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["acknowledged"], false);
    assert_eq!(api.count("workers"), 0);
    let (status, body) = api.post("/api/worker/heartbeat", json!({ "worker": 1 })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(unprocessable_at(&body), "body");
}

#[tokio::test]
async fn unregister_marks_the_worker_dead_and_leaves_its_job_to_the_supervisor() {
    let api = app();
    let (id, w) = api.claimed().await;
    let bystander = api.worker("idle");
    let (status, body) = api
        .post("/api/worker/unregister", json!({ "worker_id": w, "reason": "sigterm" }))
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "acknowledged": true })));
    assert_eq!(api.worker_status(w), "dead");
    assert_eq!(api.worker_status(bystander), "idle");
    // The slot puts the job back when the container has exited.
    let holder: i64 = api.one("SELECT worker_id FROM jobs WHERE id = ?1", [id]);
    assert_eq!((api.job_status(id).as_str(), holder), ("processing", w));

    // As CLM: an unknown worker is acknowledged too; no worker_id is a 422.
    let (status, body) = api.post("/api/worker/unregister", json!({ "worker_id": 999 })).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "acknowledged": true })));
    let (status, body) = api.post("/api/worker/unregister", json!({ "reason": "sigterm" })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(unprocessable_at(&body), "body");
    assert_eq!(api.worker_status(bystander), "idle");
    assert_eq!(api.count("workers"), 2);
}

#[tokio::test]
async fn cache_add_records_and_replaces_the_result_metadata() {
    let api = app();
    for bad in [
        json!({ "output_file": "o", "content_hash": "h" }),
        json!({ "output_file": "o", "content_hash": "h", "result_metadata": "text" }),
        json!({ "output_file": "o", "content_hash": "h", "result_metadata": null }),
    ] {
        let (status, body) = api.post("/api/worker/cache/add", bad.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        assert_eq!(unprocessable_at(&body), "body", "{bad}");
    }
    assert_eq!(api.count("results_cache"), 0);
    for n in [1, 2] {
        let (status, body) = api
            .post(
                "/api/worker/cache/add",
                json!({ "output_file": "out/a.html", "content_hash": "h1", "result_metadata": { "run": n } }),
            )
            .await;
        assert_eq!((status, body), (StatusCode::OK, json!({ "acknowledged": true })));
    }
    assert_eq!(api.count("results_cache"), 1);
    let metadata: String = api.one(
        "SELECT result_metadata FROM results_cache WHERE output_file = 'out/a.html' AND content_hash = 'h1'",
        [],
    );
    assert_eq!(serde_json::from_str::<Value>(&metadata).unwrap(), json!({ "run": 2 }));
}

#[tokio::test]
async fn an_executed_notebook_stored_gzipped_comes_back_gzipped() {
    let api = app();
    let notebook = notebook_json();
    let (status, _, bytes) = api
        .call(request(
            Method::POST,
            NOTEBOOK,
            Some("Bearer secret"),
            gzip(&notebook, flate2::Compression::default()),
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        json_of(&bytes),
        json!({ "acknowledged": true, "bytes_stored": notebook.len() })
    );

    let (status, headers, bytes) = api
        .call(request(Method::GET, NOTEBOOK, Some("Bearer secret"), ""))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_ENCODING], "gzip");
    assert_eq!(headers[header::CONTENT_TYPE], "application/octet-stream");
    assert_eq!(gunzip(&bytes), notebook);

    // Each of the four fields is part of the key.
    let (status, body) = api.get(&NOTEBOOK.replace("prog_lang=python", "prog_lang=cpp")).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::NOT_FOUND,
            json!({ "detail": "Executed notebook not cached" })
        )
    );
    let stored: String = rusqlite::Connection::open(&api.cache_db)
        .unwrap()
        .query_row(
            "SELECT input_file || '|' || language || '|' || payload_format FROM executed_notebooks",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, "slides/intro.py|de|nbformat-json");
}

#[tokio::test]
async fn a_body_that_is_not_a_gzipped_nbformat_4_notebook_is_400_and_not_stored() {
    let api = app();
    let nbformat_3 = json!({ "nbformat": 3, "metadata": {}, "cells": [] }).to_string();
    let no_cells = json!({ "nbformat": 4, "metadata": {} }).to_string();
    for (body, says) in [
        (notebook_json(), "Body is not valid gzip"),
        (
            gzip(b"{not json", flate2::Compression::default()),
            "Body is not a valid nbformat notebook",
        ),
        (
            gzip(nbformat_3.as_bytes(), flate2::Compression::default()),
            "nbformat 3, expected 4",
        ),
        (
            gzip(no_cells.as_bytes(), flate2::Compression::default()),
            "no list of cells",
        ),
    ] {
        let (status, _, bytes) = api
            .call(request(Method::POST, NOTEBOOK, Some("Bearer secret"), body))
            .await;
        let detail = json_of(&bytes)["detail"].as_str().unwrap().to_string();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{says}");
        assert!(detail.contains(says), "{detail}");
    }
    assert!(!api.cache_db.exists(), "the cache database was opened");
}

#[tokio::test]
async fn notebook_routes_need_all_four_query_fields() {
    let api = app();
    let partial = "/api/worker/cache/executed_notebook?input_file=a.py&content_hash=h1&language=de";
    let (status, body) = api.get(partial).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(unprocessable_at(&body), "query");
    let (status, _, bytes) = api
        .call(request(
            Method::POST,
            partial,
            Some("Bearer secret"),
            gzip(&notebook_json(), flate2::Compression::default()),
        ))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(unprocessable_at(&json_of(&bytes)), "query");
    assert!(!api.cache_db.exists(), "the cache database was opened");
}

#[tokio::test]
async fn a_json_body_over_one_mib_is_413_and_writes_nothing() {
    let api = app();
    let body = json!({ "worker_type": "notebook", "container_id": "x".repeat(JSON_BODY_LIMIT) }).to_string();
    assert!(body.len() > JSON_BODY_LIMIT);
    let (status, _, bytes) = api
        .call(request(
            Method::POST,
            "/api/worker/register",
            Some("Bearer secret"),
            body,
        ))
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let answer = json_of(&bytes);
    assert!(
        answer["detail"].as_str().unwrap().starts_with("request body too large"),
        "{answer}"
    );
    assert_eq!(api.count("workers"), 0);
}

/// A client that sends its headers and then stalls its body (or sends
/// part of it) is answered 408 once [`super::BODY_WITHIN`] has passed, on
/// a JSON route and on the notebook route alike, and nothing is written.
#[tokio::test(start_paused = true)]
async fn a_body_that_does_not_arrive_in_time_is_408_and_writes_nothing() {
    let api = app();
    let stalled = || {
        let first = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"{\"worker_type\": "))]);
        HttpBody::from_stream(futures_util::StreamExt::chain(first, futures_util::stream::pending()))
    };
    let started = tokio::time::Instant::now();
    let (status, _, bytes) = api
        .call(request(
            Method::POST,
            "/api/worker/register",
            Some("Bearer secret"),
            stalled(),
        ))
        .await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{}", json_of(&bytes));
    assert!(
        json_of(&bytes)["detail"]
            .as_str()
            .unwrap()
            .contains("not received within"),
        "{}",
        json_of(&bytes)
    );
    assert_eq!(started.elapsed(), super::BODY_WITHIN);
    let (status, _, _) = api
        .call(request(Method::POST, NOTEBOOK, Some("Bearer secret"), stalled()))
        .await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(api.count("workers"), 0);
    assert!(!api.cache_db.exists(), "the cache database was opened");
}

#[tokio::test]
async fn an_executed_notebook_may_be_larger_than_a_json_body() {
    let api = app();
    let source = "x".repeat(JSON_BODY_LIMIT + 1);
    let notebook = json!({ "nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [{ "cell_type": "markdown", "source": source, "metadata": {} }] })
        .to_string()
        .into_bytes();
    // Stored uncompressed: the body itself is over the JSON limit.
    let body = gzip(&notebook, flate2::Compression::none());
    assert!(body.len() > JSON_BODY_LIMIT);
    let (status, _, bytes) = api
        .call(request(Method::POST, NOTEBOOK, Some("Bearer secret"), body))
        .await;
    assert_eq!(status, StatusCode::OK, "{}", json_of(&bytes));
    assert_eq!(json_of(&bytes)["bytes_stored"], notebook.len());
}

#[tokio::test]
async fn a_workers_own_token_acts_only_for_its_row_and_is_refused_once_revoked() {
    let api = app();
    let (mine, other) = (api.worker("created"), api.worker("created"));
    let token = api.tokens.mint(WorkerRow(mine)).unwrap();
    let me = Some(token.as_str());
    let send = |uri: &'static str, body: Value| api.send(Method::POST, uri, me, body);
    // Its own row: activated, heartbeats, claims.
    assert_eq!(
        send("/api/worker/activate", json!({ "worker_id": mine })).await.0,
        StatusCode::OK
    );
    assert_eq!(
        send("/api/worker/heartbeat", json!({ "worker_id": mine })).await.0,
        StatusCode::OK
    );
    let job = api.job("a.py", "{}");
    let (status, body) = send("/api/worker/jobs/claim", claim_body(mine)).await;
    assert_eq!((status, &body["job"]["id"]), (StatusCode::OK, &json!(job)));
    // Another worker's row: 403 for every route that names a worker, and
    // nothing written.
    for (uri, body) in [
        ("/api/worker/activate", json!({ "worker_id": other })),
        ("/api/worker/heartbeat", json!({ "worker_id": other })),
        ("/api/worker/jobs/claim", claim_body(other)),
        ("/api/worker/unregister", json!({ "worker_id": other })),
    ] {
        let (status, body) = send(uri, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{uri}: {body}");
        assert!(
            body["detail"].as_str().unwrap().contains(&format!("worker {mine}")),
            "{body}"
        );
    }
    let report = json!({ "worker_id": other, "status": "completed", "result": {} });
    let (status, _) = api.send(Method::POST, "/api/worker/jobs/1/status", me, report).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(api.worker_status(other), "created");
    assert_eq!(api.job_status(job), "processing");
    // It cannot register workers of its own.
    let register = json!({ "worker_type": "notebook", "container_id": "sneaky", "parent_pid": 1 });
    assert_eq!(send("/api/worker/register", register).await.0, StatusCode::FORBIDDEN);
    assert_eq!(api.count("workers"), 2);
    // Revoked (its worker ended): refused as an unknown token; the pool's
    // token still works.
    api.tokens.revoke(WorkerRow(mine));
    let (status, _) = send("/api/worker/heartbeat", json!({ "worker_id": mine })).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = api.post("/api/worker/heartbeat", json!({ "worker_id": mine })).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_peer_that_keeps_failing_gets_429_while_valid_tokens_from_it_pass() {
    use crate::api::refusals::{BUDGET, Peer};
    let api = app();
    let w = api.worker("idle");
    let from = |peer: &str, token: &str| {
        let mut r = request(
            Method::POST,
            "/api/worker/heartbeat",
            Some(&format!("Bearer {token}")),
            json!({ "worker_id": w }).to_string(),
        );
        r.extensions_mut().insert(Peer(peer.parse().unwrap()));
        r
    };
    for _ in 0..BUDGET {
        assert_eq!(
            api.call(from("10.0.0.9:5000", "guess")).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    let (status, headers, _) = api.call(from("10.0.0.9:5001", "guess")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers[header::RETRY_AFTER], "60");
    // A worker on that node with its valid token is never locked out.
    assert_eq!(api.call(from("10.0.0.9:5002", TOKEN)).await.0, StatusCode::OK);
    // Another peer still gets a plain 401.
    assert_eq!(
        api.call(from("10.0.0.7:5000", "guess")).await.0,
        StatusCode::UNAUTHORIZED
    );
}
