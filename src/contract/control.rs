//! The control socket's protocol, shared by the supervisor (which serves
//! it, `supervisor::control`) and the commands that ask it (`scale`,
//! `restart`, `reload`, `stop`, `stats --prometheus`, `top`): one JSON
//! request per connection on one line, one JSON answer on one line
//! (docs/protocol.md); the socket's address; the client.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// A `restart` or `reload` that goes on in the background.
pub type OperationId = u64;

/// The supervisor answers every request within this, or refuses it.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// Requests that may wait for the supervisor at once, and connections
/// open at once; more are refused (or wait in the kernel's backlog).
pub const WAITING: usize = 32;

/// A request, as sent on the socket (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    /// Is it there? Answers with the supervisor's pid.
    Ping,
    /// Stop the pool (as SIGTERM does).
    Stop,
    /// Set the number of workers of types: `[["upper", 4]]`.
    Scale { counts: Vec<(String, u32)>, now: bool },
    /// Replace workers: `TYPE` or `TYPE-N` targets, all when empty.
    Restart {
        targets: Vec<String>,
        rolling: bool,
        now: bool,
    },
    /// Re-read the config and apply the difference.
    Reload,
    /// The Prometheus metrics, as `/metrics` serves them.
    Metrics,
    /// How a `restart` or `reload` stands.
    Progress { operation: OperationId },
}

/// The answer: whether it worked, and what happened (one line each);
/// for work that goes on in the background, the operation to follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub lines: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<OperationRef>,
}

/// An operation and whether it is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationRef {
    pub id: OperationId,
    pub done: bool,
    /// Slots dealt with so far, of all.
    pub settled: usize,
    pub total: usize,
}

impl Response {
    pub fn ok(lines: Vec<String>) -> Response {
        Response {
            ok: true,
            lines,
            operation: None,
        }
    }

    pub fn error(line: impl Into<String>) -> Response {
        Response {
            ok: false,
            lines: vec![line.into()],
            operation: None,
        }
    }
}

/// The longest path a Unix socket address holds (`sun_path` is 108 bytes
/// with its NUL).
const SUN_PATH_MAX: usize = 107;

/// A socket path usable in a socket address: the path itself, or, when it
/// is too long (a deep CI checkout), the same file reached through a
/// short `/proc/self/fd/N/NAME` of its folder, open while the returned
/// handle lives.
pub fn addressable(path: &Path) -> std::io::Result<(PathBuf, Option<std::fs::File>)> {
    use std::os::unix::ffi::OsStrExt;
    if path.as_os_str().as_bytes().len() <= SUN_PATH_MAX {
        return Ok((path.to_path_buf(), None));
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "no folder"));
    };
    use std::os::unix::fs::OpenOptionsExt;
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_PATH | nix::libc::O_DIRECTORY)
        .open(dir)?;
    use std::os::fd::AsRawFd;
    let short = Path::new("/proc/self/fd")
        .join(handle.as_raw_fd().to_string())
        .join(name);
    if short.as_os_str().as_bytes().len() > SUN_PATH_MAX {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the socket's file name alone is too long for a socket address",
        ));
    }
    Ok((short, Some(handle)))
}

/// The client side: sends `request` to the supervisor of `db` and waits
/// for its answer, for at most `within`. None when no supervisor listens
/// there.
pub async fn ask(db: &Path, request: &Request, within: Duration) -> anyhow::Result<Option<Response>> {
    let path = super::socket_path(db);
    match tokio::time::timeout(within, exchange(&path, request)).await {
        Ok(answer) => answer,
        Err(_) => anyhow::bail!(
            "the supervisor did not answer within {} ({})",
            humantime::format_duration(within),
            path.display()
        ),
    }
}

async fn exchange(path: &Path, request: &Request) -> anyhow::Result<Option<Response>> {
    use anyhow::Context;
    let (address, _dir) = match addressable(path) {
        Ok(a) => a,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("the control socket {}", path.display()))),
    };
    let stream = match UnixStream::connect(&address).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("connecting to {}", path.display()))),
    };
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await?;
    let mut answer = String::new();
    BufReader::new(read)
        .read_line(&mut answer)
        .await
        .with_context(|| format!("reading the answer from {}", path.display()))?;
    if answer.trim().is_empty() {
        anyhow::bail!("the supervisor closed the control connection without answering");
    }
    Ok(Some(serde_json::from_str(&answer).context("the supervisor's answer")?))
}
