//! `clx-pool submit`: queues one job and prints its id.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};

use super::target;
use crate::UsageError;
use crate::cli::DbArgs;
use crate::db;

pub struct Submit<'a> {
    pub db: &'a DbArgs,
    pub job_type: &'a str,
    pub input: &'a str,
    pub output: &'a str,
    pub payload: &'a str,
    pub priority: i64,
    pub max_attempts: i64,
    pub content_hash: Option<&'a str>,
    pub workspace: Option<&'a Path>,
}

pub fn run(s: Submit) -> anyhow::Result<i64> {
    let t = target(s.db)?;
    if serde_json::from_str::<serde_json::Value>(s.payload).is_err() {
        return Err(UsageError(format!("--payload is not valid JSON: {}", s.payload)).into());
    }
    if s.max_attempts < 1 {
        return Err(UsageError("--max-attempts must be at least 1".into()).into());
    }
    let wanted = t.config.as_ref().and_then(|c| c.pool.protocol);
    let (conn, _) = db::open(&t.db_path, wanted)?;
    let hash = match s.content_hash {
        Some(h) => h.to_string(),
        None => {
            let workspace = match (s.workspace, &t.config) {
                (Some(w), _) => w.to_path_buf(),
                (None, Some(c)) => c.pool.workspace_path.clone(),
                (None, None) => db::supervisor::supervisor(&conn)?
                    .and_then(|r| r.workspace_path)
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from(".")),
            };
            let input = if Path::new(s.input).is_absolute() {
                PathBuf::from(s.input)
            } else {
                workspace.join(s.input)
            };
            hash_input(&input, s.payload).map_err(|e| {
                UsageError(format!(
                    "cannot read the input file {} ({e}); relative paths are relative to the workspace {} (pass --content-hash to queue a job whose input is not on this host)",
                    input.display(),
                    workspace.display()
                ))
            })?
        }
    };
    let id = db::jobs::submit(
        &conn,
        &db::jobs::NewJob {
            job_type: s.job_type,
            input_file: s.input,
            output_file: s.output,
            content_hash: &hash,
            payload: s.payload,
            priority: s.priority,
            max_attempts: s.max_attempts,
        },
    )
    .with_context(|| format!("queueing the job in {}", t.db_path.display()))?;
    super::print(&id.to_string());
    warn_if_no_pool_takes(&conn, &t.db_path, s.job_type)?;
    Ok(id)
}

/// SHA-256 of the input file's bytes and the payload, hex-encoded.
fn hash_input(path: &Path, payload: &str) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher.update(payload.as_bytes());
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Queueing a job no running pool can take is allowed (a pool may come
/// later), but worth a word: it would otherwise wait silently.
fn warn_if_no_pool_takes(conn: &rusqlite::Connection, db: &Path, job_type: &str) -> anyhow::Result<()> {
    if crate::lock::running_supervisor(db).is_none() {
        return Ok(());
    }
    let types: Vec<String> = db::slots::slots(conn)?.into_iter().map(|s| s.worker_type).collect();
    if !types.is_empty() && !types.iter().any(|t| t == job_type) {
        let mut known = types;
        known.dedup();
        eprintln!(
            "warning: the running pool has no `{job_type}` workers (it has: {}); the job waits until one does",
            known.join(", ")
        );
    }
    Ok(())
}
