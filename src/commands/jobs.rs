//! `clx-pool jobs`: lists jobs, as a table or JSON.

use comfy_table::Table;

use super::target;
use crate::UsageError;
use crate::cli::DbArgs;
use crate::db;
use crate::vocab::JobStatus;

pub fn run(args: &DbArgs, status: Option<&str>, limit: i64, json: bool) -> anyhow::Result<i32> {
    let status: Option<JobStatus> = match status {
        None => None,
        Some(s) => Some(s.parse().map_err(|e| UsageError(format!("--status: {e}")))?),
    };
    let t = target(args)?;
    let (conn, _) = db::open_for_reading(&t.db_path)?;
    let rows = db::jobs::list(&conn, status, limit)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header(["ID", "TYPE", "STATUS", "ATTEMPTS", "INPUT", "OUTPUT", "ERROR"]);
    for j in rows {
        let error = j
            .error
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(80)
            .collect::<String>();
        table.add_row(vec![
            j.id.to_string(),
            j.job_type,
            j.status.to_string(),
            j.attempts.to_string(),
            j.input_file,
            j.output_file,
            error,
        ]);
    }
    println!("{table}");
    Ok(0)
}
