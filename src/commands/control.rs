//! `scale`, `restart` and `reload`: requests to the running supervisor over
//! its control socket (see `supervisor::control`). The supervisor answers
//! at once; replacing workers goes on in the background, and `restart` and
//! `reload` follow it until it is done or `--timeout` passes.

use std::time::{Duration, Instant};

use super::target;
use crate::cli::DbArgs;
use crate::contract::control::{self, Request, Response};
use crate::contract::exit;

/// How often a background operation is asked how it stands.
const POLL: Duration = Duration::from_millis(100);

pub async fn run(args: &DbArgs, request: Request, timeout: Duration) -> anyhow::Result<i32> {
    let t = target(args)?;
    let deadline = Instant::now() + timeout;
    // The supervisor answers or refuses within ANSWER_WITHIN; a little
    // more for the way there and back.
    let within =
        || (control::ANSWER_WITHIN + Duration::from_secs(2)).min(deadline.saturating_duration_since(Instant::now()));
    let Some(mut response) = control::ask(&t.db_path, &request, within()).await? else {
        eprintln!("error: no supervisor is running for {}", t.db_path.display());
        return Ok(exit::FAILURE);
    };
    let progress = super::progress::Progress::new("replaced");
    while let Some(op) = response.operation.filter(|op| !op.done) {
        progress.update(op.settled as u64, op.total as u64, "");
        if Instant::now() + POLL >= deadline {
            progress.finish();
            eprintln!(
                "error: still replacing workers after {} ({} of {} done); the supervisor goes on (operation {})",
                humantime::format_duration(timeout),
                op.settled,
                op.total,
                op.id
            );
            return Ok(exit::FAILURE);
        }
        tokio::time::sleep(POLL).await;
        let ask = Request::Progress { operation: op.id };
        response = match control::ask(&t.db_path, &ask, within()).await? {
            Some(r) => r,
            None => Response::error("the supervisor stopped before it was done"),
        };
    }
    progress.finish();
    for line in &response.lines {
        if response.ok {
            super::print(line);
        } else {
            eprintln!("error: {line}");
        }
    }
    Ok(if response.ok { 0 } else { 1 })
}
