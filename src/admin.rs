//! The admin HTTP server: `/metrics`, `/healthz`, `/readyz`, `/status`, the status page
//! at `/`, and admin actions under `/admin/` (`POST /admin/services/NAME/warm`).
//!
//! It listens on its own port so that operators can keep it off the network that carries
//! inference traffic; nothing on the data port exposes these endpoints. The GET endpoints
//! are open; admin actions need the bearer token from `[server] admin_token_file` or
//! `admin_token` and are disabled without one.

mod auth;
pub mod history;

pub use auth::AdminAuth;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::keep_warm::WarmOutcome;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::service::Service;
use auth::Denied;

/// What the admin endpoints read.
pub struct AdminState {
    pub registry: Arc<ArcSwap<Registry>>,
    pub metrics: Arc<Metrics>,
    /// False once shutdown began: `/readyz` then fails so load balancers stop sending.
    pub accepting: AtomicBool,
    pub started: Instant,
    pub version: &'static str,
    /// Checks the bearer token of admin actions.
    pub auth: AdminAuth,
}

/// Serves the admin endpoints until `shutdown` turns true.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(connection) => connection,
            Err(error) => {
                warn!(%error, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, request)) }
            });
            if let Err(error) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, %error, "admin connection ended with an error");
            }
        });
    }
}

fn handle(state: &AdminState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(action) = request.uri().path().strip_prefix("/admin/") {
        return handle_action(state, &request, action);
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported here\n");
        response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/" | "/status.html" => status_page(),
        "/metrics" => {
            let mut response = text(StatusCode::OK, state.metrics.render());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if state.accepting.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            }
        }
        "/status" => {
            let registry = state.registry.load();
            let now = jiff::Timestamp::now();
            let services: Vec<_> = registry.services().map(|s| service_status(s, now)).collect();
            let body = serde_json::json!({
                "version": state.version,
                "uptime_seconds": state.started.elapsed().as_secs_f64(),
                "accepting": state.accepting.load(Ordering::Acquire),
                "admin_actions": if state.auth.is_enabled() { "enabled" } else { "disabled" },
                "services": services,
            });
            json(StatusCode::OK, &body)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try / (status page), /status, /metrics, /healthz or /readyz\n",
        ),
    }
}

/// Returns a service's `/status` entry: [`Service::status`] plus the cold-start history and
/// the keep-warm windows.
fn service_status(service: &Service, now: jiff::Timestamp) -> serde_json::Value {
    let mut value = serde_json::to_value(service.status()).expect("a status always serialises");
    let schedule = service.keep_warm_schedule();
    value["recent_cold_starts"] = serde_json::json!(service.recent_cold_starts());
    value["keep_warm"] = serde_json::json!({
        "windows": schedule.windows().iter().map(|window| window.as_str()).collect::<Vec<_>>(),
        "open": schedule.in_keep_warm_window(now),
        "open_until_unix_ms": schedule.open_until(now).map(|end| end.as_millisecond()),
        "next_start_unix_ms": schedule.next_start(now).map(|start| start.as_millisecond()),
    });
    value
}

/// The status page: one HTML file with inline CSS and JavaScript that polls `/status`.
const STATUS_PAGE: &str = include_str!("admin/status.html");

fn status_page() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(STATUS_PAGE.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    // The page loads nothing from elsewhere; the policy makes the browser enforce that.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; \
             img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    response
}

/// Handles `/admin/...`: actions that change state. They need the admin token.
fn handle_action(state: &AdminState, request: &Request<Incoming>, action: &str) -> Response<Full<Bytes>> {
    let Some(name) = action.strip_prefix("services/").and_then(|rest| rest.strip_suffix("/warm")) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            None,
            "unknown admin action; the admin actions are POST /admin/services/NAME/warm",
        );
    };
    if request.method() != Method::POST {
        let mut response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            Some(name),
            "admin actions take POST",
        );
        response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        return response;
    }

    if let Err(denied) = state.auth.check(request.headers()) {
        state.auth.log_rejection(denied, request.uri().path());
        return denied_response(denied);
    }
    if !state.accepting.load(Ordering::Acquire) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            Some(name),
            "coldgate is shutting down and starts no instances",
        );
    }
    let registry = state.registry.load();
    let Some(service) = registry.services().find(|s| s.name.as_ref() == name) else {
        return error(
            StatusCode::NOT_FOUND,
            "unknown_service",
            Some(name),
            &format!("no service is named {name:?}; GET /status lists the configured services"),
        );
    };

    let outcome = service.warm();
    info!(service = %service.name, outcome = ?outcome, "warm-up requested through the admin API");
    let (status, result, message) = match outcome {
        WarmOutcome::Started => (StatusCode::ACCEPTED, "started", "an instance is starting; GET /status shows when it serves"),
        WarmOutcome::AfterScaleDown => (
            StatusCode::ACCEPTED,
            "starts_after_scale_down",
            "the service is scaling down; an instance starts once that has finished",
        ),
        WarmOutcome::AlreadyRunning(_) => (StatusCode::OK, "already_running", "the service is already starting or serving"),
        WarmOutcome::Closed => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                Some(name),
                "the service is being stopped and starts no instances",
            )
        }
    };
    let body = serde_json::json!({
        "service": name,
        "result": result,
        "state": service.status().state,
        "message": message,
    });
    json(status, &body)
}

fn denied_response(denied: Denied) -> Response<Full<Bytes>> {
    let (status, code, message, challenge) = match denied {
        Denied::Disabled => (
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "admin actions are disabled; enable them by setting [server] admin_token_file = \"/path/to/token\" \
             (or admin_token = \"...\", at least 16 characters) and restarting coldgate, then send \
             Authorization: Bearer <token>",
            None,
        ),
        Denied::MissingToken => (
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing admin token; send the configured token as Authorization: Bearer <token>",
            Some("Bearer realm=\"coldgate-admin\""),
        ),
        Denied::WrongToken => (
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "invalid admin token; send the token from [server] admin_token_file or admin_token",
            Some("Bearer realm=\"coldgate-admin\", error=\"invalid_token\""),
        ),
    };
    let mut response = error(status, code, None, message);
    if let Some(challenge) = challenge {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static(challenge));
    }
    response
}

/// Builds an error in the format of the data port: `{"error": {"code", "service", "message"}}`.
fn error(status: StatusCode, code: &str, service: Option<&str>, message: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({"error": {"code": code, "service": service, "message": message}}))
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).expect("a JSON value always serialises");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}
