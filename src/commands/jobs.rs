//! `clx-pool jobs [list|show|cancel|retry|prune]`: the queue by hand.

use comfy_table::Table;

use super::target;
use crate::UsageError;
use crate::cli::{DbArgs, JobsAction, ListArgs};
use crate::contract::exit;
use crate::db;
use crate::db::jobs::admin;
use crate::vocab::JobStatus;

pub fn run(action: Option<&JobsAction>, list_args: &ListArgs) -> anyhow::Result<i32> {
    match action {
        None => list(list_args),
        Some(JobsAction::List(args)) => list(args),
        Some(JobsAction::Show { db, id, json }) => show(db, *id, *json),
        // --all: no condition beyond pending or processing.
        Some(JobsAction::Cancel {
            db,
            ids,
            job_type,
            all: _,
        }) => {
            let filter = admin::Filter {
                ids: ids.clone(),
                job_type: job_type.clone(),
                ..admin::Filter::default()
            };
            change(db, ids, "cancelled", |c, p| admin::cancel(c, p, &filter))
        }
        Some(JobsAction::Retry {
            db,
            ids,
            job_type,
            failed,
        }) => {
            // `--failed` and `--type` take failed jobs only; ids may name
            // cancelled ones too.
            let statuses = if ids.is_empty() || *failed {
                vec![JobStatus::Failed]
            } else {
                Vec::new()
            };
            let filter = admin::Filter {
                ids: ids.clone(),
                job_type: job_type.clone(),
                statuses,
                ..admin::Filter::default()
            };
            change(db, ids, "put back in the queue", |c, p| admin::retry(c, p, &filter))
        }
        Some(JobsAction::Prune {
            db,
            older_than,
            status,
            vacuum,
        }) => prune(db, *older_than, status, *vacuum),
    }
}

fn list(args: &ListArgs) -> anyhow::Result<i32> {
    let t = target(&args.db)?;
    let (conn, _) = db::open_for_reading(&t.db_path)?;
    let filter = admin::Filter {
        job_type: args.job_type.clone(),
        statuses: args.status.clone(),
        newer_than: args.since,
        ..admin::Filter::default()
    };
    if args.limit < 1 {
        return Err(UsageError("--limit must be at least 1".into()).into());
    }
    let (rows, total) = admin::list(&conn, &filter, args.limit)?;
    if args.json {
        let out = serde_json::json!({ "jobs": rows, "total": total });
        super::print(&serde_json::to_string_pretty(&out)?);
        return Ok(exit::OK);
    }
    if rows.is_empty() {
        super::print("no jobs match");
        return Ok(exit::OK);
    }
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header([
        "ID", "TYPE", "STATUS", "ATTEMPTS", "CREATED", "INPUT", "OUTPUT", "ERROR",
    ]);
    let shown = rows.len() as i64;
    for j in rows {
        let error: String = j
            .error
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(80)
            .collect();
        table.add_row(vec![
            j.id.to_string(),
            j.job_type,
            j.status.to_string(),
            j.attempts.to_string(),
            j.created_at.unwrap_or_default(),
            j.input_file,
            j.output_file,
            error,
        ]);
    }
    super::print(&table.to_string());
    if total > shown {
        super::print(&format!(
            "… {} more (newest {shown} shown; --limit N for more)",
            total - shown
        ));
    }
    Ok(exit::OK)
}

fn show(args: &DbArgs, id: i64, json: bool) -> anyhow::Result<i32> {
    let t = target(args)?;
    let (conn, _) = db::open_for_reading(&t.db_path)?;
    let Some(d) = admin::show(&conn, id)? else {
        return Err(UsageError(format!("there is no job {id} in {}", t.db_path.display())).into());
    };
    if json {
        super::print(&serde_json::to_string_pretty(&d)?);
        return Ok(exit::OK);
    }
    let none = || "-".to_string();
    let worker = match (&d.worker, d.worker_row) {
        (Some(w), Some(r)) => format!("{w} (row {r})"),
        (None, Some(r)) => format!("row {r} (gone)"),
        _ => none(),
    };
    let lines = [
        ("job", d.id.to_string()),
        ("type", d.job_type),
        ("status", d.status.to_string()),
        ("attempts", format!("{} of {}", d.attempts, d.max_attempts)),
        ("priority", d.priority.to_string()),
        ("input", d.input_file),
        ("output", d.output_file),
        ("content hash", d.content_hash),
        ("payload", d.payload),
        ("created", d.created_at.unwrap_or_else(none)),
        ("started", d.started_at.unwrap_or_else(none)),
        ("finished", d.completed_at.unwrap_or_else(none)),
        ("worker", worker),
        ("error", d.error.unwrap_or_else(none)),
    ];
    let text: Vec<String> = lines.iter().map(|(k, v)| format!("{k:>12}: {v}")).collect();
    super::print(&text.join("\n"));
    Ok(exit::OK)
}

/// Runs a change on the queue and says what it touched.
/// Job ids it names must exist (an unknown one is a usage error, as for
/// `wait --jobs` and `jobs show`).
fn change(
    args: &DbArgs,
    named: &[i64],
    done: &str,
    f: impl FnOnce(&mut rusqlite::Connection, crate::vocab::Protocol) -> rusqlite::Result<Vec<i64>>,
) -> anyhow::Result<i32> {
    let t = target(args)?;
    let (mut conn, protocol) = db::open_existing(&t.db_path)?;
    let found = if named.is_empty() {
        Vec::new()
    } else {
        admin::statuses(&conn, named)?
    };
    if let Some(missing) = named.iter().find(|id| !found.iter().any(|(f, _, _)| f == *id)) {
        return Err(UsageError(format!("there is no job {missing} in {}", t.db_path.display())).into());
    }
    let ids = f(&mut conn, protocol)?;
    let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
    match ids.len() {
        0 => super::print(&format!("no job {done}: none matched")),
        1 => super::print(&format!("1 job {done}: {list}")),
        n => super::print(&format!("{n} jobs {done}: {list}")),
    }
    Ok(exit::OK)
}

fn prune(args: &DbArgs, older_than: std::time::Duration, statuses: &[JobStatus], vacuum: bool) -> anyhow::Result<i32> {
    if let Some(s) = statuses
        .iter()
        .find(|s| matches!(s, JobStatus::Pending | JobStatus::Processing))
    {
        return Err(UsageError(format!("--status {s}: only finished jobs are pruned")).into());
    }
    let t = target(args)?;
    let (conn, protocol) = db::open_existing(&t.db_path)?;
    let filter = admin::Filter {
        statuses: statuses.to_vec(),
        older_than: Some(older_than),
        ..admin::Filter::default()
    };
    let n = admin::prune(&conn, protocol, &filter)?;
    super::print(&format!(
        "{n} job{} pruned (finished more than {} ago)",
        if n == 1 { "" } else { "s" },
        humantime::format_duration(older_than)
    ));
    if vacuum {
        conn.execute_batch("VACUUM")?;
        super::print("database vacuumed");
    }
    Ok(exit::OK)
}
