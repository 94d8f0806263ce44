//! Listeners a local client cannot exhaust or stall: the control socket,
//! `/metrics` and the Worker API all accept through [`serve`]. At most
//! [`Limits::connections`] are open at once (more wait in the kernel's
//! backlog, costing the supervisor no descriptor); a client gets
//! [`Limits::request_within`] to send its request and
//! [`Limits::connection_within`] for the whole connection; an accept that
//! fails (descriptors run out) is retried after a pause that doubles to a
//! second, logged once per spell, never in a tight loop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// What a listener allows one client.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub connections: usize,
    /// How long a client may take to send its request (HTTP: its headers).
    pub request_within: Duration,
    /// How long one connection may stay open at all.
    pub connection_within: Duration,
}

/// Something that accepts connections.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<Self::Io> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<Self::Io> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// The pause after a failed accept: 10 ms, doubling to a second.
fn pause_after(failures: u32) -> Duration {
    Duration::from_millis(10u64.saturating_mul(1 << failures.min(7))).min(Duration::from_secs(1))
}

/// Accepts on `listener` until `token` is cancelled, handing each
/// connection to `handle` (within `limits`); `what` names the listener in
/// the log.
pub async fn serve<L, F, Fut>(listener: L, limits: Limits, token: CancellationToken, what: &'static str, handle: F)
where
    L: Listener,
    F: Fn(L::Io) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.connections));
    let handle = Arc::new(handle);
    let mut failures = 0u32;
    loop {
        let permit = tokio::select! {
            _ = token.cancelled() => return,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = token.cancelled() => return,
            a = listener.accept_one() => a,
        };
        let io = match accepted {
            Ok(io) => {
                if failures > 0 {
                    tracing::info!("{what}: accepting again after {failures} failed accepts");
                    failures = 0;
                }
                io
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!("{what}: cannot accept a connection: {e}; pausing (logged once until it recovers)");
                }
                failures = failures.saturating_add(1);
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(pause_after(failures)) => {}
                }
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if tokio::time::timeout(limits.connection_within, handle(io))
                .await
                .is_err()
            {
                tracing::debug!("{what}: a connection reached its time limit; closed");
            }
        });
    }
}

/// Serves HTTP/1 on one connection with an axum router: its headers
/// within `limits.request_within`.
pub async fn http<I>(io: I, router: axum::Router, limits: Limits)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(router);
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.request_within)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
    if let Err(e) = served {
        tracing::debug!("http connection: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP listener on 127.0.0.1 with small limits, answering `ok` to
    /// every request; its address, and the token that stops it.
    async fn small(limits: Limits) -> (std::net::SocketAddr, CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(serve(listener, limits, token.clone(), "test", move |io| {
            http(io, router.clone(), limits)
        }));
        (addr, token)
    }

    /// What the server sends back on `stream` until it closes it, read
    /// within `deadline` (`None`: still open then).
    async fn answer(stream: &mut tokio::net::TcpStream, deadline: Duration) -> Option<String> {
        use tokio::io::AsyncReadExt;
        let mut all = Vec::new();
        match tokio::time::timeout(deadline, stream.read_to_end(&mut all)).await {
            Ok(_) => Some(String::from_utf8_lossy(&all).into_owned()),
            Err(_) => None,
        }
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

    /// A client that sends half its headers and stalls is cut off after
    /// `request_within`; one that sends them gets its answer.
    #[tokio::test]
    async fn a_client_that_stalls_its_headers_is_closed() {
        use tokio::io::AsyncWriteExt;
        let limits = Limits {
            connections: 8,
            request_within: Duration::from_millis(300),
            connection_within: Duration::from_secs(60),
        };
        let (addr, token) = small(limits).await;
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let heard = answer(&mut slow, Duration::from_secs(20)).await;
        assert!(heard.is_some(), "a stalled request was still open after 20 s");
        assert!(!heard.unwrap().contains(" 200 "), "a half request was answered");
        let mut fine = tokio::net::TcpStream::connect(addr).await.unwrap();
        fine.write_all(GET).await.unwrap();
        let heard = answer(&mut fine, Duration::from_secs(20)).await.unwrap();
        assert!(heard.starts_with("HTTP/1.1 200"), "{heard}");
        token.cancel();
    }

    /// Past `connections` open at once, a client waits in the backlog
    /// until one closes, and is served then; a connection that outlives
    /// `connection_within` is closed.
    #[tokio::test]
    async fn connections_over_the_cap_wait_and_none_lives_forever() {
        use tokio::io::AsyncWriteExt;
        let limits = Limits {
            connections: 2,
            request_within: Duration::from_secs(60),
            connection_within: Duration::from_secs(2),
        };
        let (addr, token) = small(limits).await;
        let mut idle = Vec::new();
        for _ in 0..2 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        third.write_all(GET).await.unwrap();
        assert_eq!(
            answer(&mut third, Duration::from_millis(500)).await,
            None,
            "a third connection was served while two were open"
        );
        // The idle two reach their time limit; then the third is served.
        for stream in &mut idle {
            assert!(
                answer(stream, Duration::from_secs(30)).await.is_some(),
                "an idle connection lived on"
            );
        }
        let heard = answer(&mut third, Duration::from_secs(30)).await.unwrap();
        assert!(heard.starts_with("HTTP/1.1 200"), "{heard}");
        token.cancel();
    }

    #[test]
    fn failed_accepts_pause_longer_up_to_a_second() {
        let ms = |n| pause_after(n).as_millis();
        assert_eq!(
            [ms(1), ms(2), ms(3), ms(6), ms(7), ms(50)],
            [20, 40, 80, 640, 1000, 1000]
        );
    }
}
