//! The supervisor's control channel: a Unix socket beside the database
//! (`<db>.sock`, mode 0600) taking one JSON request per connection and
//! answering with one JSON response, from the supervisor's own user or
//! root only (checked with the peer's credentials, whatever the file's
//! mode). `scale`, `restart`, `reload` and `stop` use it; docs/protocol.md
//! describes the requests.
//!
//! Every request is answered or refused within [`ANSWER_WITHIN`]: at most
//! [`WAITING`] requests wait for the supervisor (more are refused at once),
//! and one not answered in time is refused and dropped, never carried out
//! later. Long work (replacing workers) goes on in the background as an
//! operation whose progress the client asks for.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::rollout::Operations;
use crate::contract::control::addressable;
pub use crate::contract::control::{ANSWER_WITHIN, OperationId, OperationRef, Request, Response, WAITING, ask};
use crate::contract::socket_path;

/// How long a client may take to send its request.
const REQUEST_WITHIN: Duration = Duration::from_secs(5);

/// What one client of the control socket gets: idle or half-sent
/// connections are closed, and no more than [`WAITING`] are open at once.
const LIMITS: crate::listen::Limits = crate::listen::Limits {
    connections: WAITING,
    request_within: REQUEST_WITHIN,
    connection_within: Duration::from_secs(20),
};

/// How operation `id` stands, as an answer.
pub fn progress(operations: &Operations, id: OperationId) -> Response {
    match operations.progress(id) {
        Some(p) => Response {
            ok: p.ok,
            lines: p.lines,
            operation: Some(OperationRef {
                id,
                done: p.done,
                settled: p.settled,
                total: p.total,
            }),
        },
        None => Response::error(format!("no operation {id} (this supervisor remembers its latest 256)")),
    }
}

/// A request and where its answer goes.
pub type Incoming = (Request, oneshot::Sender<Response>);

/// Binds the socket at `path` (replacing a stale one: the caller holds the
/// supervisor lock), mode 0600.
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use anyhow::Context;
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?
        }
        Ok(_) => anyhow::bail!("{} exists and is not a socket; remove it", path.display()),
        Err(_) => {}
    }
    let (address, _dir) = addressable(path).with_context(|| format!("the control socket {}", path.display()))?;
    let listener =
        UnixListener::bind(&address).with_context(|| format!("creating the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

/// The socket file and what it is, to see it replaced or removed.
fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// How often the socket file is looked at (removed by a cleanup job, it is
/// made again).
const LOOK_AT_FILE: Duration = Duration::from_secs(1);

/// Binds the socket (replacing a stale one: the caller holds the
/// supervisor lock) and serves it until `token` is cancelled; a socket
/// file that someone removes is made again within a second. A `stop`
/// request is carried out at once (cancelling `token`), also while the
/// pool is still starting.
pub fn serve(
    db: &Path,
    token: CancellationToken,
    operations: Operations,
    tasks: &TaskTracker,
) -> anyhow::Result<mpsc::Receiver<Incoming>> {
    let path = socket_path(db);
    let mut listener = bind(&path)?;
    let (tx, rx) = mpsc::channel(WAITING);
    tasks.spawn(async move {
        let mut bound;
        loop {
            bound = identity(&path);
            let serving = token.child_token();
            let (stop, ops, tx) = (token.clone(), operations.clone(), tx.clone());
            let accepting = tokio::spawn(crate::listen::serve(
                listener,
                LIMITS,
                serving.clone(),
                "control socket",
                move |stream| {
                    let (tx, stop, ops) = (tx.clone(), stop.clone(), ops.clone());
                    async move {
                        if let Err(e) = answer(stream, tx, stop, ops).await {
                            debug!("control connection: {e}");
                        }
                    }
                },
            ));
            // Until the pool stops, or the file is no longer this socket.
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(LOOK_AT_FILE) => {}
                }
                if identity(&path) != bound {
                    break;
                }
            }
            serving.cancel();
            if let Err(e) = accepting.await {
                warn!("the control socket's task failed: {e}");
            }
            if token.is_cancelled() {
                break;
            }
            warn!(socket = %path.display(), "the control socket was removed or replaced: making it again");
            listener = loop {
                match bind(&path) {
                    Ok(l) => break l,
                    Err(e) => {
                        warn!("{e:#}; trying again in a second");
                        tokio::select! {
                            _ = token.cancelled() => return,
                            _ = tokio::time::sleep(LOOK_AT_FILE) => {}
                        }
                    }
                }
            };
        }
        // Only our own socket goes.
        if identity(&path) == bound
            && let Err(e) = std::fs::remove_file(&path)
        {
            debug!("removing the control socket: {e}");
        }
    });
    Ok(rx)
}

/// Whether a peer may give orders: the supervisor's own user, or root.
pub fn allowed(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == own_uid || peer_uid == 0
}

async fn answer(
    stream: UnixStream,
    requests: mpsc::Sender<Incoming>,
    stop: CancellationToken,
    operations: Operations,
) -> std::io::Result<()> {
    let peer = stream.peer_cred()?.uid();
    let own = nix::unistd::geteuid().as_raw();
    let (read, mut write) = stream.into_split();
    // Read the request first in every case, so the peer always hears the
    // answer instead of a broken pipe.
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, 64 * 1024));
    match tokio::time::timeout(REQUEST_WITHIN, reader.read_line(&mut line)).await {
        Ok(read) => read?,
        Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no request in time")),
    };
    let response = if !allowed(peer, own) {
        warn!(peer_uid = peer, "refused a control request from another user");
        Response::error(format!(
            "refused: uid {peer} is not the supervisor's user (uid {own}) or root"
        ))
    } else {
        match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::error(format!("not a request: {e}")),
            Ok(Request::Stop) => {
                tracing::info!("stop requested");
                stop.cancel();
                Response::ok(vec!["stopping".into()])
            }
            Ok(Request::Progress { operation }) => progress(&operations, operation),
            Ok(request) => {
                let (tx, rx) = oneshot::channel();
                match requests.try_send((request, tx)) {
                    Err(mpsc::error::TrySendError::Full(_)) => Response::error(format!(
                        "refused: {WAITING} requests are already waiting for the supervisor; try again"
                    )),
                    Err(mpsc::error::TrySendError::Closed(_)) => Response::error("the supervisor is stopping"),
                    // Dropping the receiver on timeout withdraws the
                    // request: the supervisor skips it.
                    Ok(()) => match tokio::time::timeout(ANSWER_WITHIN, rx).await {
                        Ok(answer) => answer.unwrap_or_else(|_| Response::error("the supervisor is stopping")),
                        Err(_) => Response::error(format!(
                            "refused: not answered within {}; nothing was done",
                            humantime::format_duration(ANSWER_WITHIN)
                        )),
                    },
                }
            }
        }
    };
    let mut text = serde_json::to_string(&response).unwrap_or_else(|_| "{\"ok\":false,\"lines\":[]}".into());
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_json_with_a_command() {
        let r = Request::Scale {
            counts: vec![("upper".into(), 4)],
            now: false,
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"command":"scale","counts":[["upper",4]],"now":false}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"ping"}"#).unwrap(),
            Request::Ping
        );
        assert!(serde_json::from_str::<Request>(r#"{"command":"format-disk"}"#).is_err());
    }

    #[test]
    fn only_the_same_user_or_root() {
        assert!(allowed(1000, 1000));
        assert!(allowed(0, 1000));
        assert!(!allowed(1001, 1000));
        assert!(!allowed(1000, 0));
    }
}
