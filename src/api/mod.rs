//! CLM's Worker API, served by the supervisor whenever a `clm` pool runs
//! CLM workers in containers: CLM 1.35 starts those with `CLM_API_URL` and
//! `CLM_API_TOKEN`, and they register, claim, report, heartbeat and check
//! cancellation over HTTP instead of opening the SQLite file (see
//! docs/protocol.md). The routes are in [`routes`]; this module decides
//! where the API listens and what containers are told.
//!
//! Security as CLM defines it: a random per-run bearer token on every
//! worker route; by default the API listens only on the loopback address
//! and on the gateway of the pool's docker network (a host-local address
//! containers reach as `host.docker.internal`), on one port the system
//! picks. `[pool] api_listen` names another address, and one that reaches
//! beyond this machine needs `[pool] api_token_file` (a generated token
//! cannot be handed to another machine).

pub mod refusals;
pub mod routes;
pub mod tokens;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::db::Db;

/// What one client of the Worker API gets: its request's headers within
/// 10 s, a connection for at most 5 minutes (a worker opens another), and
/// at most [`CONNECTIONS`] at once.
pub const LIMITS: crate::listen::Limits = crate::listen::Limits {
    connections: CONNECTIONS,
    request_within: Duration::from_secs(10),
    connection_within: Duration::from_secs(300),
};

/// Connections the Worker API keeps open at once: a worker holds one or
/// two; more wait in the kernel's backlog.
pub const CONNECTIONS: usize = 512;

/// The name containers use for the host (CLM's `DOCKER_HOST_ALIAS`).
pub const HOST_ALIAS: &str = "host.docker.internal";

/// What a container needs to reach the API.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `CLM_API_URL` as seen from a container.
    pub url: String,
    /// `CLM_API_TOKEN`.
    pub token: Arc<str>,
    /// Where [`HOST_ALIAS`] points inside containers, if they need it.
    pub host_alias: Option<IpAddr>,
}

/// How the pool's containers reach the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// `network = "host"`: the host's own loopback.
    HostNetwork,
    /// A bridge network: the host is its gateway.
    Gateway(IpAddr),
}

/// A running API: where it listens, and how to stop it.
pub struct ApiServer {
    pub endpoint: Arc<Endpoint>,
    /// Tokens of single workers, minted by their executor.
    pub tokens: tokens::WorkerTokens,
    /// Its TLS, which a reload reads again.
    pub tls: Option<Tls>,
    pub listening: Vec<SocketAddr>,
    serving: Serving,
}

/// Listeners serving a router, until stopped.
pub struct Serving {
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

/// The token: read from `file` (trimmed, not empty), or 32 random bytes.
pub fn token(file: Option<&Path>) -> anyhow::Result<Arc<str>> {
    if let Some(file) = file {
        let text = crate::files::read_regular(file)
            .with_context(|| format!("reading the worker API token from {}", file.display()))?;
        let t = text.trim();
        anyhow::ensure!(!t.is_empty(), "the worker API token file {} is empty", file.display());
        anyhow::ensure!(
            !t.chars().any(char::is_whitespace),
            "the worker API token in {} contains whitespace",
            file.display()
        );
        return Ok(t.into());
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for the worker API token: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>().into())
}

/// Whether `ip` can only be reached from this machine (loopback, or the
/// gateway of a docker network on it).
pub fn is_local(ip: IpAddr, reach: Reach) -> bool {
    ip.is_loopback() || matches!(reach, Reach::Gateway(g) if g == ip)
}

/// HTTPS for the Worker API: rustls (its `ring` provider, TLS 1.2 and
/// 1.3, ALPN `http/1.1`) with the certificate chain and key read from PEM
/// files now.
pub fn tls_config(tls: &crate::config::ApiTls) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "reading the worker API's certificate chain {} (api_tls_cert)",
                tls.cert.display()
            )
        })?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{} holds no certificate (api_tls_cert: a PEM chain)",
        tls.cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(&tls.key).with_context(|| {
        format!(
            "reading the worker API's private key {} (api_tls_key)",
            tls.key.display()
        )
    })?;
    // ring, not aws-lc-rs: it builds with a C compiler alone (no cmake,
    // no Go). rustls 0.23.48 deprecates it for lacking post-quantum key
    // exchange; X25519 and the NIST curves remain, which CLM's httpx uses.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "the worker API's key {} does not fit its certificate {}",
                tls.key.display(),
                tls.cert.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The Worker API's TLS in force: read from its files at start, read again
/// by a reload (new connections get the new certificate, open ones keep
/// theirs); a reload that cannot read them keeps the old one.
#[derive(Clone)]
pub struct Tls {
    files: crate::config::ApiTls,
    current: Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>,
}

impl Tls {
    pub fn load(files: &crate::config::ApiTls) -> anyhow::Result<Tls> {
        Ok(Tls {
            files: files.clone(),
            current: Arc::new(std::sync::RwLock::new(tls_config(files)?)),
        })
    }

    /// Reads the certificate and key again; on failure the old ones stay.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = tls_config(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// Where to listen and serve: exactly `listen` when configured; by default
/// loopback plus the network's gateway on one system-chosen port. With
/// `tls`, every connection is HTTPS (its handshake within the time a
/// request's headers get).
pub async fn start(
    db: Db,
    cache_db: PathBuf,
    token: Arc<str>,
    listen: Option<SocketAddr>,
    reach: Reach,
    tls: Option<Tls>,
) -> anyhow::Result<ApiServer> {
    let listeners = match listen {
        Some(addr) => vec![
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("the worker API cannot listen on {addr} (api_listen)"))?,
        ],
        None => bind_local(reach).await?,
    };
    let listening: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    let port = listening.first().map(|a| a.port()).unwrap_or_default();
    let (host, host_alias) = container_view(listening[0].ip(), reach);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = Arc::new(Endpoint {
        url: format!("{scheme}://{}:{port}", url_host(host, host_alias)),
        token: token.clone(),
        host_alias,
    });
    let worker_tokens = tokens::WorkerTokens::default();
    let router = routes::router(routes::ApiState {
        db,
        cache_db,
        token,
        workers: worker_tokens.clone(),
        refusals: refusals::Refusals::default(),
    });
    Ok(ApiServer {
        endpoint,
        serving: serve_all(listeners, router, tls.clone()),
        tls,
        tokens: worker_tokens,
        listening,
    })
}

/// Only `/health`, at `listen` (HTTPS with `tls`), for `check`'s preflight
/// tasks when no supervisor serves the Worker API there.
pub async fn serve_health(listen: SocketAddr, tls: Option<Tls>) -> anyhow::Result<Serving> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("the worker API's address {listen} (api_listen) cannot be listened on"))?;
    Ok(serve_all(vec![listener], routes::health_only(), tls))
}

fn serve_all(listeners: Vec<TcpListener>, router: axum::Router, tls: Option<Tls>) -> Serving {
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    for listener in listeners {
        let (router, stop, acceptor) = (router.clone(), stop.clone(), tls.clone());
        tasks.spawn(crate::listen::serve(
            listener,
            LIMITS,
            stop,
            "the worker API",
            move |io| serve_one(io, router.clone(), acceptor.clone()),
        ));
    }
    Serving { stop, tasks }
}

/// One connection: HTTP/1, inside TLS when the API has a certificate.
async fn serve_one(io: tokio::net::TcpStream, router: axum::Router, tls: Option<Tls>) {
    // Every request knows its peer, for the log of refusals and their budget.
    let router = match io.peer_addr() {
        Ok(addr) => router.layer(axum::Extension(refusals::Peer(addr))),
        Err(_) => router,
    };
    let Some(acceptor) = tls.map(|t| t.acceptor()) else {
        return crate::listen::http(io, router, LIMITS).await;
    };
    let peer = io.peer_addr().ok();
    match tokio::time::timeout(LIMITS.request_within, acceptor.accept(io)).await {
        Ok(Ok(stream)) => crate::listen::http(stream, router, LIMITS).await,
        Ok(Err(e)) => tracing::debug!(?peer, "worker API: TLS handshake failed: {e}"),
        Err(_) => tracing::debug!(?peer, "worker API: no TLS handshake within {:?}", LIMITS.request_within),
    }
}

/// The host as containers name it: the alias where they have one.
fn url_host(host: IpAddr, alias: Option<IpAddr>) -> String {
    match (alias, host) {
        (Some(_), _) => HOST_ALIAS.to_string(),
        (None, IpAddr::V6(v6)) => format!("[{v6}]"),
        (None, IpAddr::V4(v4)) => v4.to_string(),
    }
}

/// What address containers use for an API listening on `ip`, and what
/// [`HOST_ALIAS`] must point to.
fn container_view(ip: IpAddr, reach: Reach) -> (IpAddr, Option<IpAddr>) {
    match reach {
        Reach::HostNetwork if ip.is_unspecified() => (IpAddr::V4(Ipv4Addr::LOCALHOST), None),
        Reach::HostNetwork => (ip, None),
        Reach::Gateway(g) if ip.is_unspecified() || ip.is_loopback() || ip == g => (g, Some(g)),
        // A configured address of this host: containers route to it.
        Reach::Gateway(g) => (ip, Some(g)),
    }
}

/// Loopback, and the gateway on the same port; a port taken on the
/// gateway is tried again with another.
async fn bind_local(reach: Reach) -> anyhow::Result<Vec<TcpListener>> {
    let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    for _ in 0..10 {
        let first = TcpListener::bind(loopback)
            .await
            .context("the worker API cannot listen on 127.0.0.1")?;
        let Reach::Gateway(gateway) = reach else {
            return Ok(vec![first]);
        };
        let port = first.local_addr()?.port();
        match TcpListener::bind(SocketAddr::new(gateway, port)).await {
            Ok(second) => return Ok(vec![first, second]),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "the worker API cannot listen on {gateway}:{port}, the gateway of the pool's docker network"
                )));
            }
        }
    }
    anyhow::bail!("the worker API found no port free on both 127.0.0.1 and the network's gateway")
}

impl ApiServer {
    /// Stops listening; requests under way get a moment to finish.
    pub async fn stop(self) {
        self.serving.stop().await;
    }
}

impl Serving {
    /// Stops listening; requests under way get a moment to finish.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(5), all).await.is_err() {
            self.tasks.abort_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_are_told_an_address_they_can_reach() {
        let g: IpAddr = "172.18.0.1".parse().unwrap();
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let lan: IpAddr = "192.168.1.5".parse().unwrap();
        assert_eq!(container_view(lo, Reach::Gateway(g)), (g, Some(g)));
        assert_eq!(container_view(any, Reach::Gateway(g)), (g, Some(g)));
        assert_eq!(container_view(lan, Reach::Gateway(g)), (lan, Some(g)));
        assert_eq!(container_view(lo, Reach::HostNetwork), (lo, None));
        assert_eq!(container_view(any, Reach::HostNetwork), (lo, None));
        assert_eq!(url_host(g, Some(g)), HOST_ALIAS);
        assert_eq!(url_host("::1".parse().unwrap(), None), "[::1]");
    }

    #[test]
    fn only_loopback_and_the_gateway_are_local() {
        let g: IpAddr = "172.18.0.1".parse().unwrap();
        assert!(is_local("127.0.0.1".parse().unwrap(), Reach::Gateway(g)));
        assert!(is_local("::1".parse().unwrap(), Reach::HostNetwork));
        assert!(is_local(g, Reach::Gateway(g)));
        assert!(!is_local("0.0.0.0".parse().unwrap(), Reach::Gateway(g)));
        assert!(!is_local("192.168.1.5".parse().unwrap(), Reach::Gateway(g)));
    }

    #[test]
    fn a_token_file_must_hold_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "  s3cret\n").unwrap();
        assert_eq!(&*token(Some(&file)).unwrap(), "s3cret");
        std::fs::write(&file, "\n").unwrap();
        assert!(token(Some(&file)).unwrap_err().to_string().contains("is empty"));
        let a = token(None).unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, token(None).unwrap());
    }
}
