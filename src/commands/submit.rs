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
    /// Queue it even if no worker serves its type.
    pub allow_unserved: bool,
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
    served(&t, &conn, s.job_type, s.allow_unserved)?;
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

/// A job of a type no worker serves would wait forever: refused (a usage
/// error, exit 2) with the types that are served and the likeliest one,
/// unless `allow` (a pool that serves it may come later). The types are
/// the config's entries when it is given, else those of the database's
/// pool; a database no pool ever ran on says nothing.
fn served(t: &super::Target, conn: &rusqlite::Connection, job_type: &str, allow: bool) -> anyhow::Result<()> {
    let types = t.served_types(Some(conn))?;
    let whose = match &t.config {
        Some(c) => format!("the workers of {}", c.path.display()),
        None => format!("the pool of {}", t.db_path.display()),
    };
    if types.is_empty() || types.iter().any(|ty| ty == job_type) {
        return Ok(());
    }
    let known: Vec<&str> = types.iter().map(String::as_str).collect();
    let hint = crate::config::suggest(job_type, &known)
        .map(|k| format!("; did you mean `{k}`?"))
        .unwrap_or_default();
    let what = format!(
        "no worker serves job type `{job_type}`: {whose} serve {}{hint}",
        quoted(&known)
    );
    if allow {
        eprintln!("warning: {what}; queued anyway (--allow-unserved): it waits until a worker of that type runs");
        return Ok(());
    }
    Err(UsageError(format!(
        "{what}. Nothing was queued; --allow-unserved queues it anyway (for a pool that will serve it)"
    ))
    .into())
}

fn quoted(types: &[&str]) -> String {
    types.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", ")
}
