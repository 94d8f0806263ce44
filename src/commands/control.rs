//! `scale`, `restart` and `reload`: requests to the running supervisor over
//! its control socket (see `supervisor::control`).

use super::target;
use crate::cli::DbArgs;
use crate::supervisor::control::{self, Request};

pub async fn run(args: &DbArgs, request: Request) -> anyhow::Result<i32> {
    let t = target(args)?;
    let Some(response) = control::ask(&t.db_path, &request).await? else {
        eprintln!("error: no supervisor is running for {}", t.db_path.display());
        return Ok(1);
    };
    for line in &response.lines {
        if response.ok {
            super::print(line);
        } else {
            eprintln!("error: {line}");
        }
    }
    Ok(if response.ok { 0 } else { 1 })
}
