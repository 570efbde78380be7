//! Runs coldgate: the data listener, the admin server, and the ordered shutdown.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests and the binary
//! run the same code: the binary binds the configured addresses and passes SIGTERM/SIGINT.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::BytesMut;
use pingora_core::apps::{HttpServerApp, HttpServerOptions, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::ALPN;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{GetSocketDigest, SocketDigest, Stream};
use pingora_core::server::configuration::ServerConf;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use crate::admin::{self, AdminState};
use crate::backend::kubernetes::cluster::Cluster;
use crate::config::{format_duration, Config};
use crate::front_door::{AdmittedRequests, FrontDoor, Outcome};
use crate::metrics::Metrics;
use crate::proxy::Activator;
use crate::registry::Registry;
use crate::reload::Reloader;
use crate::service::GlobalBudget;
use crate::tls::TlsTerminator;

/// The two sockets coldgate serves on.
pub struct Listeners {
    pub data: std::net::TcpListener,
    pub admin: std::net::TcpListener,
}

impl Listeners {
    /// Binds the data and admin addresses from the configuration.
    pub fn bind(data: SocketAddr, admin: SocketAddr) -> std::io::Result<Self> {
        let data = std::net::TcpListener::bind(data)
            .map_err(|e| std::io::Error::new(e.kind(), format!("failed to bind data listener {data}: {e}")))?;
        let admin = std::net::TcpListener::bind(admin)
            .map_err(|e| std::io::Error::new(e.kind(), format!("failed to bind admin listener {admin}: {e}")))?;
        data.set_nonblocking(true)?;
        admin.set_nonblocking(true)?;
        Ok(Listeners { data, admin })
    }
}

/// Counts open client connections so shutdown can wait for them.
#[derive(Default)]
struct ConnectionCount {
    open: AtomicUsize,
    closed: Notify,
}

struct ConnectionGuard(Arc<ConnectionCount>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

type Proxy = pingora_proxy::HttpProxy<Activator>;

/// Seconds an idle keep-alive client connection stays open (pingora's default).
const KEEPALIVE_SECONDS: u64 = 60;

/// What a connection task needs besides its socket.
#[derive(Clone)]
struct ConnectionContext {
    proxy: Arc<Proxy>,
    tls: Option<Arc<TlsTerminator>>,
    front_door: Arc<FrontDoor>,
    admitted: Arc<AdmittedRequests>,
    connections: Arc<ConnectionCount>,
    stop: watch::Receiver<bool>,
}

/// Serves an accepted client connection on its own task: TLS if configured, then the
/// front door for the first HTTP/1 request, then pingora.
fn spawn_connection(context: &ConnectionContext, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let mut stream: L4Stream = stream.into();
    // pingora reads the client address from the socket digest (for X-Forwarded-For).
    let digest = SocketDigest::from_raw_fd(std::os::fd::AsRawFd::as_raw_fd(&stream));
    let _ = digest.peer_addr.set(Some(peer.into()));
    stream.set_socket_digest(digest);

    context.connections.open.fetch_add(1, Ordering::AcqRel);
    let guard = ConnectionGuard(context.connections.clone());
    let context = context.clone();
    tokio::spawn(async move {
        let _guard = guard;
        let stream: Stream = match &context.tls {
            None => {
                match context.front_door.first_request(&mut stream, peer).await {
                    Outcome::Done => return,
                    Outcome::Http2(read) => {
                        // pingora recognises the preface again once the bytes are back.
                        stream.rewind(&read);
                        context.proxy.process_new(Box::new(stream), &context.stop).await;
                        return;
                    }
                    Outcome::Forward(prefix) => {
                        serve_http1(&context, Box::new(stream), prefix, peer).await;
                        return;
                    }
                }
            }
            Some(tls) => match tls.accept(stream).await {
                Ok(stream) => stream,
                Err(error) => {
                    debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
            },
        };
        if stream.selected_alpn_proto() == Some(ALPN::H2) {
            context.proxy.process_new(stream, &context.stop).await;
            return;
        }
        let mut stream = stream;
        match context.front_door.first_request(&mut stream, peer).await {
            Outcome::Done => {}
            // No preface is expected after TLS without ALPN h2; pingora answers it.
            Outcome::Http2(read) | Outcome::Forward(read) => serve_http1(&context, stream, read, peer).await,
        }
    });
}

/// Runs pingora's HTTP/1 request loop on a connection whose first bytes were already read.
async fn serve_http1(context: &ConnectionContext, stream: Stream, prefix: BytesMut, peer: SocketAddr) {
    let mut session = ServerSession::new_http1(stream);
    session.set_pipelined_prefix(prefix);
    session.set_keepalive(if *context.stop.borrow() { None } else { Some(KEEPALIVE_SECONDS) });
    let mut reused = context.proxy.process_new_http(session, &context.stop).await;
    // A lease that request_filter did not take (pingora rejected the request before it
    // ran) must not stay counted in flight.
    drop(context.admitted.take(peer));

    while let Some((stream, settings)) = reused.map(|r| r.consume()) {
        let mut session = ServerSession::new_http1(stream);
        if let Some(settings) = settings {
            settings.apply_to_session(&mut session);
        }
        if *context.stop.borrow() {
            session.set_keepalive(None);
        }
        reused = context.proxy.process_new_http(session, &context.stop).await;
    }
}

/// Serves until `shutdown` resolves, then drains: `/readyz` fails at once, the listener
/// closes after `drain_delay`, open requests (held ones included) get up to
/// `shutdown_grace` to finish, and finally every started instance is stopped.
///
/// With `config_path`, the configuration is reloaded when that file changes or on SIGHUP.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let started = Instant::now();
    let metrics = Arc::new(Metrics::new());
    let budget = Arc::new(GlobalBudget::new(config.server.max_total_queued, metrics.held_requests_total.clone()));
    let uses_kubernetes = config.services.iter().any(|s| matches!(s.backend, crate::config::Backend::Kubernetes(_)));
    let cluster = if uses_kubernetes {
        let cluster = Cluster::connect(&config.kubernetes, metrics.leader.clone())
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        cluster.start_leader_election();
        Some(cluster)
    } else {
        None
    };
    let (registry, _) = Registry::build(&config, None, cluster.as_ref(), &budget, &metrics);
    let registry = Arc::new(ArcSwap::from_pointee(registry));
    let reloader = config_path.map(|path| {
        let reloader = Reloader::new(path, config.clone(), registry.clone(), cluster.clone(), budget.clone(), metrics.clone());
        reloader.start();
        reloader
    });

    let mut server_conf = ServerConf::default();
    server_conf.threads = config.server.threads.max(1);
    // Connection retries are bounded by each request's deadline, not by a count.
    server_conf.max_retries = usize::MAX;
    let server_conf = Arc::new(server_conf);
    let admitted = Arc::new(AdmittedRequests::default());
    let front_door = Arc::new(FrontDoor::new(registry.clone(), metrics.clone(), admitted.clone()));
    let mut proxy = pingora_proxy::http_proxy(
        &server_conf,
        Activator::new(registry.clone(), metrics.clone(), admitted.clone()),
    );
    let mut options = HttpServerOptions::default();
    options.h2c = true;
    proxy.server_options = Some(options);
    let proxy = Arc::new(proxy);

    let tls = match &config.server.tls {
        Some(tls_config) => {
            let terminator = TlsTerminator::new(tls_config).map_err(|e| std::io::Error::other(e.to_string()))?;
            terminator.watch();
            Some(terminator)
        }
        None => None,
    };

    let data_listener = TcpListener::from_std(listeners.data)?;
    let admin_listener = TcpListener::from_std(listeners.admin)?;
    let data_addr = data_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let (stop_sender, stop_receiver) = watch::channel(false);
    let admin_state = Arc::new(AdminState {
        registry: registry.clone(),
        metrics: metrics.clone(),
        accepting: AtomicBool::new(true),
        started,
        version: env!("CARGO_PKG_VERSION"),
        auth: admin::AdminAuth::from_config(&config.server)?,
    });
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state.clone(), stop_receiver.clone()));
    tokio::spawn(crate::keep_warm::run(registry.clone(), stop_receiver.clone()));

    metrics.startup_duration.observe(started.elapsed().as_secs_f64());
    info!(
        data_addr = %data_addr,
        admin_addr = %admin_addr,
        services = config.services.len(),
        tls = tls.is_some(),
        "listening"
    );

    // Accept until shutdown begins.
    let connections = Arc::new(ConnectionCount::default());
    let context = ConnectionContext {
        proxy: proxy.clone(),
        tls: tls.clone(),
        front_door,
        admitted,
        connections: connections.clone(),
        stop: stop_receiver.clone(),
    };
    let accept_loop = async {
        loop {
            let (stream, peer) = match data_listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            spawn_connection(&context, stream, peer);
        }
    };
    tokio::select! {
        () = accept_loop => {}
        () = shutdown => {}
    }

    // Drain.
    // Reloads may have changed the drain settings since start-up.
    let (drain_delay, shutdown_grace) = match &reloader {
        Some(reloader) => reloader.drain_settings(),
        None => (config.server.drain_delay, config.server.shutdown_grace),
    };
    info!(drain_delay = %format_duration(drain_delay), "shutdown requested; /readyz now fails");
    admin_state.accepting.store(false, Ordering::Release);
    // Keep accepting during the drain delay so clients routed here before load balancers
    // notice /readyz still get served.
    let drain_accept = async {
        loop {
            if let Ok((stream, peer)) = data_listener.accept().await {
                spawn_connection(&context, stream, peer);
            }
        }
    };
    let _ = tokio::time::timeout(drain_delay, drain_accept).await;
    drop(data_listener);
    let _ = stop_sender.send(true);
    proxy.cleanup().await;
    info!(
        open_connections = connections.open.load(Ordering::Acquire),
        grace = %format_duration(shutdown_grace),
        "listener closed; waiting for open requests"
    );

    let wait_for_connections = async {
        loop {
            let closed = connections.closed.notified();
            if connections.open.load(Ordering::Acquire) == 0 {
                return;
            }
            closed.await;
        }
    };
    if tokio::time::timeout(shutdown_grace, wait_for_connections).await.is_err() {
        warn!(
            open_connections = connections.open.load(Ordering::Acquire),
            "shutdown_grace passed with requests still open; closing them"
        );
    }

    // Stop every instance coldgate started, including services that a reload removed.
    let mut services: Vec<_> = registry.load().services().cloned().collect();
    if let Some(reloader) = &reloader {
        services.extend(reloader.draining());
    }
    futures::future::join_all(services.iter().map(|s| s.shut_down())).await;
    if let Some(cluster) = &cluster {
        cluster.release().await;
    }
    admin_task.abort();
    info!("stopped");
    Ok(())
}
