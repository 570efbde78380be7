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
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ServerApp};
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
use crate::coalesce::CoalescingStream;
use crate::config::{format_duration, Config};
use crate::front_door::{Admitted, FrontDoor, Outcome};
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
        set_backlog(&data, LISTEN_BACKLOG)?;
        data.set_nonblocking(true)?;
        admin.set_nonblocking(true)?;
        Ok(Listeners { data, admin })
    }
}

/// Accept queue length of the data listener. The standard library listens with 128, which
/// a burst of new connections (a cold-start storm) overflows: the kernel then drops SYNs
/// and clients retry after a second. Linux caps the value at `net.core.somaxconn`.
const LISTEN_BACKLOG: i32 = 4096;

/// Sets the accept queue length of a listening socket. Linux applies a second `listen`
/// call on a listening socket as a new backlog.
fn set_backlog(listener: &std::net::TcpListener, backlog: i32) -> std::io::Result<()> {
    // SAFETY: listen only reads its arguments; the descriptor belongs to `listener`,
    // which outlives the call.
    let result = unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(listener), backlog) };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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
    connections: Arc<ConnectionCount>,
    stop: watch::Receiver<bool>,
}

/// Serves an accepted client connection on its own task: TLS if configured, then HTTP/2
/// or the HTTP/1 request loop.
///
/// A held request's memory is mostly this task, so its future is kept small: everything
/// after the first request's hold, and the whole TLS path, run in boxed futures that are
/// allocated only when reached.
fn spawn_connection(context: &ConnectionContext, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    // Boxed now rather than when pingora takes it, to keep the task small.
    let mut stream: Box<L4Stream> = Box::new(stream.into());
    context.connections.open.fetch_add(1, Ordering::AcqRel);
    let guard = ConnectionGuard(context.connections.clone());
    let context = context.clone();
    tokio::spawn(async move {
        let _guard = guard;
        if let Some(tls) = &context.tls {
            set_client_digest(&mut stream, peer);
            Box::pin(serve_tls(&context, tls, *stream, peer)).await;
            return;
        }
        let mut stop = context.stop.clone();
        let first = context.front_door.next_request(&mut stream, true, &mut stop).await;
        if matches!(first, Outcome::Done) {
            return;
        }
        set_client_digest(&mut stream, peer);
        if let Outcome::Http2(read) = first {
            // pingora recognises the preface again once the bytes are back.
            stream.rewind(&read);
            context.proxy.process_new(stream, &context.stop).await;
            return;
        }
        Box::pin(serve_http1(&context, stream, first, stop)).await;
    });
}

/// Records the client address in the socket digest, where pingora reads it (for
/// X-Forwarded-For and the logs).
fn set_client_digest(stream: &mut L4Stream, peer: SocketAddr) {
    let digest = SocketDigest::from_raw_fd(std::os::fd::AsRawFd::as_raw_fd(&*stream));
    let _ = digest.peer_addr.set(Some(peer.into()));
    stream.set_socket_digest(digest);
}

/// Serves a TLS connection: HTTP/2 when ALPN chose it, otherwise the HTTP/1 request loop.
async fn serve_tls(context: &ConnectionContext, tls: &TlsTerminator, stream: L4Stream, peer: SocketAddr) {
    let mut stream = match tls.accept(stream).await {
        Ok(stream) => stream,
        Err(error) => {
            debug!(%peer, %error, "TLS handshake failed");
            return;
        }
    };
    if stream.selected_alpn_proto() == Some(ALPN::H2) {
        context.proxy.process_new(stream, &context.stop).await;
        return;
    }
    // No preface is expected after TLS without ALPN h2, so it is parsed as HTTP/1, and
    // pingora answers it.
    let mut stop = context.stop.clone();
    let first = context.front_door.next_request(&mut stream, false, &mut stop).await;
    serve_http1(context, stream, first, stop).await;
}

/// Runs the HTTP/1 request loop of a connection. The front door reads each request's head
/// (and holds the request while its service is cold); pingora then parses and proxies it.
async fn serve_http1(context: &ConnectionContext, stream: Stream, mut next: Outcome, mut stop: watch::Receiver<bool>) {
    let mut stream: Stream = Box::new(CoalescingStream::new(stream));
    let mut settings: Option<HttpPersistentSettings> = None;
    loop {
        let (prefix, admitted) = match next {
            Outcome::Forward(prefix, admitted) => (prefix, admitted),
            Outcome::Http2(prefix) => (prefix, None),
            Outcome::Done => return,
        };
        let session = http1_session(stream, prefix, admitted, settings.take(), *context.stop.borrow());
        let Some(reused) = context.proxy.process_new_http(session, &context.stop).await else {
            return;
        };
        let (reused_stream, reused_settings) = reused.consume();
        stream = reused_stream;
        settings = reused_settings;
        next = context.front_door.next_request(&mut stream, false, &mut stop).await;
    }
}

/// Builds the pingora session for the next request of a connection. A separate function,
/// because pingora's HTTP/1 session is large and a local holding it in `serve_http1` would
/// stay in that future's state (and in the memory of every idle connection) across awaits.
fn http1_session(
    stream: Stream,
    prefix: BytesMut,
    admitted: Option<Admitted>,
    settings: Option<HttpPersistentSettings>,
    stopping: bool,
) -> ServerSession {
    let mut session = ServerSession::new_http1(stream);
    match settings {
        Some(settings) => settings.apply_to_session(&mut session),
        None => session.set_keepalive(Some(KEEPALIVE_SECONDS)),
    }
    if stopping {
        session.set_keepalive(None);
    }
    // pingora leaves no bytes of a next request behind when it offers the connection for
    // reuse, because pipelining stays disabled: so the prefix slot is still empty here.
    session.set_pipelined_prefix(prefix);
    if let Some(admitted) = admitted {
        // Activator::on_connection_reuse moves the lease into the request's context.
        session.set_connection_user_context(Some(Box::new(admitted)));
    }
    session
}

/// Returns the number of runtime worker threads for the `threads` setting, where 0 means
/// one per CPU.
pub fn worker_threads(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
        n => n,
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

    let server_conf = Arc::new(ServerConf {
        // pingora sizes its upstream keep-alive pool by this thread count.
        threads: worker_threads(config.server.threads),
        // Connection retries are bounded by each request's deadline, not by a count.
        max_retries: usize::MAX,
        ..ServerConf::default()
    });
    let front_door = Arc::new(FrontDoor::new(registry.clone(), metrics.clone()));
    let mut proxy = pingora_proxy::http_proxy(
        &server_conf,
        Activator::new(registry.clone(), metrics.clone()),
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
