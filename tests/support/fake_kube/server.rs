//! The HTTP/1.1 listener, request routing and response framing.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{StatusCause, StatusDetails};
use serde_json::Value;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use super::api::{self, Caller};
use super::discovery;
use super::patch::PatchType;
use super::resources::ResourceKind;
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::table::{self, IncludeObject};
use super::watch::{self, WatchParams};
use super::{Inner, RequestRecord, Verb};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Maximum request body size.
const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// The listener task, which can be stopped and started again on the same address.
pub(super) struct ApiServer {
    addr: SocketAddr,
    running: Mutex<Option<Running>>,
}

/// Binds with SO_REUSEADDR so that `start_api` can bind the same port again while
/// connections closed by `stop_api` sit in TIME_WAIT.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("binding the fake API server to {addr} failed: {error}"),
        )
    })?;
    socket.listen(1024)
}

impl ApiServer {
    pub(super) async fn start(inner: Arc<Inner>, addr: SocketAddr) -> io::Result<ApiServer> {
        let listener = bind(addr)?;
        let addr = listener.local_addr()?;
        let server = ApiServer {
            addr,
            running: Mutex::new(None),
        };
        server.launch(inner, listener);
        Ok(server)
    }

    pub(super) fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn launch(&self, inner: Arc<Inner>, listener: TcpListener) {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(inner, listener, stopped));
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(Running { stop, task });
    }

    /// Closes the listener and every connection, and waits until they are closed.
    pub(super) async fn stop(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(running) = running {
            let _ = running.stop.send(());
            let _ = running.task.await;
            tracing::info!(addr = %self.addr, "fake Kubernetes API server stopped");
        }
    }

    /// Listens again on the same address, or does nothing if already listening.
    pub(super) async fn restart(&self, inner: Arc<Inner>) -> io::Result<()> {
        if self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return Ok(());
        }
        let listener = bind(self.addr)?;
        self.launch(inner, listener);
        tracing::info!(addr = %self.addr, "fake Kubernetes API server started again");
        Ok(())
    }

    /// Aborts the listener task without waiting, for Drop.
    pub(super) fn abort(&self) {
        if let Some(running) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            running.task.abort();
        }
    }
}

async fn serve(inner: Arc<Inner>, listener: TcpListener, mut stopped: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let inner = inner.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |request| {
                            let inner = inner.clone();
                            async move { Ok::<_, Infallible>(handle(inner, request).await) }
                        });
                        if let Err(error) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                            tracing::debug!(%error, "fake API server connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection to the fake API server failed; retrying in 10 ms");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

fn full_body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

fn json_response(code: u16, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("JSON values serialize");
    let mut response = Response::new(full_body(body));
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(error: &ApiError) -> Response<Body> {
    let mut response = json_response(error.code, &error.to_json());
    if let Some(seconds) = error.retry_after {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// Decodes %XX escapes and '+' in a query-string component.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => decoded.push(b' '),
            b'%' if index + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        decoded.push(byte);
                        index += 2;
                    }
                    None => decoded.push(b'%'),
                }
            }
            other => decoded.push(other),
        }
        index += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// Parsed query parameters. The last occurrence of a repeated key wins.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: &str) -> Query {
        Query(
            query
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| match pair.split_once('=') {
                    Some((key, value)) => (percent_decode(key), percent_decode(value)),
                    None => (percent_decode(pair), String::new()),
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true") | Some("1"))
    }
}

/// A request path that names a resource.
struct Target {
    kind: ResourceKind,
    namespace: Option<String>,
    name: Option<String>,
    /// Only "scale", on deployments.
    subresource: Option<String>,
}

impl Target {
    /// Returns the resource as faults name it, for example "deployments/scale".
    fn resource_path(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.kind.plural()),
            None => self.kind.plural().to_string(),
        }
    }
}

fn parse_target(path: &str) -> Result<Target, ApiError> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(ApiError::path_not_found()),
    };
    let (namespace, plural, name, subresource) = match rest {
        [plural] => (None, *plural, None, None),
        ["namespaces", namespace, plural] => (Some(*namespace), *plural, None, None),
        ["namespaces", namespace, plural, name] => (Some(*namespace), *plural, Some(*name), None),
        ["namespaces", namespace, plural, name, sub] => {
            (Some(*namespace), *plural, Some(*name), Some(*sub))
        }
        _ => return Err(ApiError::path_not_found()),
    };
    let kind =
        ResourceKind::from_path(group, version, plural).ok_or_else(ApiError::path_not_found)?;
    if let Some(sub) = subresource {
        if !(kind == ResourceKind::Deployment && sub == "scale") {
            return Err(ApiError::path_not_found());
        }
    }
    Ok(Target {
        kind,
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
        subresource: subresource.map(str::to_string),
    })
}

fn verb_for(method: &Method, target: &Target, query: &Query) -> Result<Verb, ApiError> {
    let has_name = target.name.is_some();
    let verb = match (method.as_str(), has_name) {
        ("GET", true) => Verb::Get,
        ("GET", false) if query.flag("watch") => Verb::Watch,
        ("GET", false) => Verb::List,
        ("POST", false) => Verb::Create,
        ("PUT", true) => Verb::Update,
        ("PATCH", true) => Verb::Patch,
        ("DELETE", true) => Verb::Delete,
        _ => return Err(ApiError::method_not_allowed()),
    };
    let supported = match target.subresource {
        Some(_) => matches!(verb, Verb::Get | Verb::Update | Verb::Patch),
        None => target.kind.verbs().contains(&verb),
    };
    // Writes always need a namespace because every served kind is namespaced.
    let needs_namespace = !matches!(verb, Verb::List | Verb::Watch);
    if !supported || (needs_namespace && target.namespace.is_none()) {
        return Err(ApiError::method_not_allowed());
    }
    Ok(verb)
}

/// Consumes one matching injected fault, if any.
fn take_fault(inner: &Inner, verb: Verb, target: &Target) -> Option<ApiError> {
    let resource = target.resource_path();
    let mut store = inner.store();
    let index = store.faults.iter().position(|fault| {
        fault.count > 0
            && (fault.verb == Verb::Any || fault.verb == verb)
            && (fault.resource == "*" || fault.resource == resource)
    })?;
    let fault = &mut store.faults[index];
    fault.count -= 1;
    let status = fault.status;
    if fault.count == 0 {
        store.faults.remove(index);
    }
    Some(ApiError::injected(
        status,
        verb.as_str(),
        Some(target.kind),
        &resource,
        target.name.as_deref().unwrap_or(""),
        target.namespace.as_deref().unwrap_or(""),
    ))
}

async fn read_body(body: Incoming) -> Result<Bytes, ApiError> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) => Err(ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("Request entity too large: reading the body failed or it exceeds {MAX_BODY_BYTES} bytes: {error}"),
            None,
        )),
    }
}

fn header(request: &Request<Incoming>, name: http::header::HeaderName) -> Option<String> {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn handle(inner: Arc<Inner>, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let user_agent = header(&request, USER_AGENT);
    let response = match route(&inner, request).await {
        Ok(response) => response,
        Err(error) => error_response(&error),
    };
    tracing::debug!(%method, %path, %query, status = response.status().as_u16(), "fake API request");
    inner.store().record_request(RequestRecord {
        method,
        path,
        query,
        user_agent,
        status: response.status().as_u16(),
        at: Instant::now(),
    });
    response
}

async fn route(inner: &Arc<Inner>, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = request.uri().path().to_string();
    if request.method() == Method::GET {
        if matches!(path.as_str(), "/healthz" | "/livez" | "/readyz") {
            let mut response = Response::new(full_body("ok"));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            return Ok(response);
        }
        let host = header(&request, http::header::HOST)
            .unwrap_or_else(|| inner.options.listen_addr.to_string());
        if let Some(document) = discovery::document(&path, &host) {
            return Ok(json_response(200, &document));
        }
    }

    let target = parse_target(&path)?;
    let query = Query::parse(request.uri().query().unwrap_or(""));
    let verb = verb_for(request.method(), &target, &query)?;
    if let Some(error) = take_fault(inner, verb, &target) {
        return Err(error);
    }

    if query.get("dryRun").is_some() && !matches!(verb, Verb::Get | Verb::List | Verb::Watch) {
        return Err(ApiError::bad_request(
            "fakekube does not implement dryRun, and a write without it would change state; send the request without the dryRun parameter",
        ));
    }

    let table = header(&request, ACCEPT)
        .filter(|accept| table::wants_table(accept))
        .map(|_| IncludeObject::parse(query.get("includeObject")));
    let caller = Caller {
        user_agent: header(&request, USER_AGENT),
        field_manager: query
            .get("fieldManager")
            .filter(|m| !m.is_empty())
            .map(str::to_string),
    };
    let content_type = header(&request, CONTENT_TYPE).unwrap_or_default();
    let body = read_body(request.into_body()).await?;
    let namespace = target.namespace.as_deref().unwrap_or("");
    let name = target.name.as_deref().unwrap_or("");
    let kind = target.kind;
    let scale = target.subresource.is_some();

    match verb {
        Verb::Get if scale => Ok(json_response(200, &api::get_scale(inner, namespace, name)?)),
        Verb::Get => {
            let object = api::get_object(inner, kind, namespace, name)?;
            match table {
                Some(include) => {
                    let version = inner.store().resource_version();
                    Ok(json_response(
                        200,
                        &table::render(kind, &[object], version, include, true),
                    ))
                }
                None => Ok(json_response(200, &object)),
            }
        }
        Verb::List => {
            let (labels, fields) = selectors(kind, &query)?;
            let (items, version) =
                api::list_objects(inner, kind, target.namespace.as_deref(), &labels, &fields);
            match table {
                Some(include) => Ok(json_response(
                    200,
                    &table::render(kind, &items, version, include, true),
                )),
                None => Ok(json_response(200, &api::list_body(kind, &items, version))),
            }
        }
        Verb::Watch => {
            let (labels, fields) = selectors(kind, &query)?;
            let timeout = match query.get("timeoutSeconds") {
                Some(seconds) => Some(Duration::from_secs(seconds.parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "invalid timeoutSeconds {seconds:?}: must be a non-negative integer"
                    ))
                })?)),
                None => None,
            };
            let params = WatchParams {
                kind,
                namespace: target.namespace.clone(),
                labels,
                fields,
                resource_version: query.get("resourceVersion").map(str::to_string),
                allow_bookmarks: query.flag("allowWatchBookmarks"),
                send_initial_events: query.flag("sendInitialEvents"),
                timeout,
                table,
            };
            let mut chunks = watch::start(inner.clone(), params)?;
            let stream = futures::stream::poll_fn(move |cx| {
                chunks
                    .poll_recv(cx)
                    .map(|chunk| chunk.map(|bytes| Ok::<_, Infallible>(Frame::data(bytes))))
            });
            let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(response)
        }
        Verb::Create => Ok(json_response(
            201,
            api::create(inner, kind, namespace, &body)?.as_ref(),
        )),
        Verb::Update if scale => Ok(json_response(
            200,
            &api::update_scale(inner, namespace, name, &body, &caller)?,
        )),
        Verb::Update => Ok(json_response(
            200,
            api::update(inner, kind, namespace, name, &body, &caller)?.as_ref(),
        )),
        Verb::Patch => {
            let patch_type = PatchType::from_content_type(&content_type)?;
            if patch_type == PatchType::Apply && caller.field_manager.is_none() {
                return Err(field_manager_required());
            }
            if scale {
                Ok(json_response(
                    200,
                    &api::patch_scale(inner, namespace, name, &body, patch_type, &caller)?,
                ))
            } else {
                let (object, created) =
                    api::patch(inner, kind, namespace, name, &body, patch_type, &caller)?;
                Ok(json_response(if created { 201 } else { 200 }, &object))
            }
        }
        Verb::Delete => Ok(json_response(
            200,
            &api::delete(inner, kind, namespace, name, &body).await?,
        )),
        Verb::Any => Err(ApiError::method_not_allowed()),
    }
}

/// The 422 kube-apiserver returns for an apply patch without a field manager.
fn field_manager_required() -> ApiError {
    let cause_message = "Required value: is required for apply patch";
    ApiError::new(
        422,
        "Invalid",
        format!("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: {cause_message}"),
        Some(StatusDetails {
            group: Some("meta.k8s.io".to_string()),
            kind: Some("PatchOptions".to_string()),
            causes: Some(vec![StatusCause {
                reason: Some("FieldValueRequired".to_string()),
                message: Some(cause_message.to_string()),
                field: Some("fieldManager".to_string()),
            }]),
            ..StatusDetails::default()
        }),
    )
}

fn selectors(
    kind: ResourceKind,
    query: &Query,
) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(kind, query.get("fieldSelector").unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let query = Query::parse(
            "labelSelector=app%3Decho%2Ctier%21%3Ddb&watch=1&fieldSelector=metadata.name%3Dx",
        );
        assert_eq!(query.get("labelSelector"), Some("app=echo,tier!=db"));
        assert!(query.flag("watch"));
        assert_eq!(query.get("fieldSelector"), Some("metadata.name=x"));
    }

    #[test]
    fn percent_decode_keeps_bad_escapes() {
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a%zz"), "a%zz");
        assert_eq!(percent_decode("a+b%20c"), "a b c");
    }

    #[test]
    fn target_parsing() {
        let target =
            parse_target("/apis/apps/v1/namespaces/models/deployments/echo/scale").unwrap();
        assert_eq!(target.kind, ResourceKind::Deployment);
        assert_eq!(target.resource_path(), "deployments/scale");
        assert!(parse_target("/apis/apps/v1/namespaces/models/deployments/echo/status").is_err());
        assert!(parse_target("/api/v1/namespaces/models/services").is_err());
        let all = parse_target("/api/v1/pods").unwrap();
        assert!(all.namespace.is_none());
    }
}
