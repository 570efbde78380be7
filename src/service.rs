//! Per-service state: the admission queue, the ready endpoints, in-flight counts, the idle
//! clock and the state machine that activates a service from zero and scales it back.
//!
//! ```text
//! Idle --request--> Activating --endpoint passes readiness probe--> Serving
//! Serving --idle_timeout, nothing in flight or queued--> ScalingDown --stopped--> Idle
//! ScalingDown --request--> (held) --stopped--> Activating
//! Activating --instance exited, spawn failed, startup_timeout--> Idle, held requests fail
//! ```
//!
//! Everything that changes together lives in one `State` behind one mutex, so the
//! decisions "hold or forward", "activate now" and "scale down now" see one consistent view.
//! No lock is held across an `.await`, and a [`Lease`] is never dropped while the lock is
//! held, because its `Drop` takes the lock.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::sync::{oneshot, Notify};
use tracing::{debug, info, warn};

use crate::backend::{Backend, ScaleDown};
use crate::config::{ReadinessProbe, ServiceConfig, ServiceSettings, UpstreamProtocol};
use crate::metrics::Metrics;
use crate::probe;

/// `Retry-After` for a service that has never finished a cold start.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Where a service is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Activating,
    Serving,
    ScalingDown,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Activating => "activating",
            Phase::Serving => "serving",
            Phase::ScalingDown => "scaling_down",
        }
    }
}

/// Why a request could not be admitted or was given up while held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmitError {
    /// The service's queue holds `max_queued_requests` already.
    QueueFull,
    /// All services together hold `server.max_total_queued` already.
    GlobalQueueFull,
    /// The request was held for the whole `queue_timeout`.
    Timeout,
    /// The instance could not be started or died before it could serve the request.
    ActivationFailed(Arc<str>),
    /// The backend's control plane refused the start or could not be reached (for example
    /// a Kubernetes API error), so no instance could be asked for.
    Unavailable(Arc<str>),
}

/// Counts held requests across all services against `server.max_total_queued`.
pub struct GlobalBudget {
    held: AtomicUsize,
    max: AtomicUsize,
    gauge: IntGauge,
}

impl GlobalBudget {
    pub fn new(max: usize, gauge: IntGauge) -> Self {
        GlobalBudget { held: AtomicUsize::new(0), max: AtomicUsize::new(max), gauge }
    }

    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    fn try_reserve(&self) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        let reserved = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| (held < max).then_some(held + 1))
            .is_ok();
        if reserved {
            self.gauge.inc();
        }
        reserved
    }

    fn release(&self) {
        self.held.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

/// One ready instance of a service, as seen by the load balancer.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Requests forwarded to this endpoint and not finished. Changed only under the service
    /// lock; atomic so that status reads need no lock.
    in_flight: AtomicUsize,
    /// Set when the endpoint leaves the ready set, so a request retrying its connection
    /// knows to pick another endpoint.
    removed: AtomicBool,
}

impl Endpoint {
    fn new(addr: SocketAddr) -> Self {
        Endpoint { addr, in_flight: AtomicUsize::new(0), removed: AtomicBool::new(false) }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }
}

type Grant = Arc<Endpoint>;
type GrantSender = oneshot::Sender<Result<Grant, AdmitError>>;

/// Prometheus series of one service, resolved once so the request path does no label lookups.
struct ServiceMetrics {
    queue_depth: IntGauge,
    in_flight: IntGauge,
    ready_endpoints: IntGauge,
    cold_start: Histogram,
    activation_success: IntCounter,
    activation_failure: IntCounter,
    scale_up: IntCounter,
    scale_down: IntCounter,
    wait_released: Histogram,
    wait_timeout: Histogram,
    wait_cancelled: Histogram,
    wait_failed: Histogram,
}

impl ServiceMetrics {
    fn new(metrics: &Metrics, name: &str) -> Self {
        metrics.init_service(name);
        let wait = |outcome: &str| metrics.queue_wait.with_label_values(&[name, outcome]);
        ServiceMetrics {
            queue_depth: metrics.queue_depth.with_label_values(&[name]),
            in_flight: metrics.in_flight.with_label_values(&[name]),
            ready_endpoints: metrics.ready_endpoints.with_label_values(&[name]),
            cold_start: metrics.cold_start.with_label_values(&[name]),
            activation_success: metrics.activations.with_label_values(&[name, "success"]),
            activation_failure: metrics.activations.with_label_values(&[name, "failure"]),
            scale_up: metrics.scale_events.with_label_values(&[name, "up"]),
            scale_down: metrics.scale_events.with_label_values(&[name, "down"]),
            wait_released: wait("released"),
            wait_timeout: wait("timeout"),
            wait_cancelled: wait("cancelled"),
            wait_failed: wait("failed"),
        }
    }
}

/// The probe task of an address that is not ready yet.
struct Probing {
    /// Stops the probe task.
    stop: Arc<Notify>,
    /// Makes the probe task probe at once.
    wake: Arc<Notify>,
}

struct State {
    phase: Phase,
    settings: ServiceSettings,
    protocol: UpstreamProtocol,
    readiness_probe: ReadinessProbe,
    readiness_path: String,
    /// Endpoints that passed the readiness probe, in the order they became ready.
    ready: Vec<Arc<Endpoint>>,
    /// Addresses reported by the backend and still being probed.
    probing: HashMap<SocketAddr, Probing>,
    /// Held requests in arrival order; the key is an arrival sequence number.
    queue: BTreeMap<u64, GrantSender>,
    next_seq: u64,
    in_flight: usize,
    /// When the service last had nothing in flight and nothing queued.
    idle_since: Instant,
    /// Incremented on every activation, so stale timers and probes can tell they are stale.
    activation_id: u64,
    activation_started: Option<Instant>,
    last_cold_start: Option<Duration>,
    last_error: Option<String>,
    /// A backend problem seen during the current activation (an API error being retried);
    /// held requests that time out report it instead of a bare timeout.
    activation_problem: Option<Arc<str>>,
    /// The idle watcher does not try to scale down before this instant, because the last
    /// attempt was refused (not the leader, activity elsewhere) or failed.
    scale_down_not_before: Option<Instant>,
    /// Rotates the starting point of the least-outstanding scan so that ties spread out.
    pick_offset: usize,
}

/// A snapshot of one service for `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub state: &'static str,
    pub backend: &'static str,
    pub instances: usize,
    pub starting_instances: usize,
    pub endpoints: Vec<EndpointStatus>,
    pub queue_depth: usize,
    pub in_flight: usize,
    pub idle_seconds: Option<f64>,
    pub last_cold_start_seconds: Option<f64>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointStatus {
    pub address: String,
    pub in_flight: usize,
}

/// One configured service: its queue, endpoints and backend.
pub struct Service {
    pub name: Arc<str>,
    backend: Arc<dyn Backend>,
    budget: Arc<GlobalBudget>,
    state: Mutex<State>,
    /// Wakes the idle watcher when the service may have become idle or its settings changed.
    idle_changed: Notify,
    metrics: ServiceMetrics,
    /// Set once coldgate shuts down: no new activations start after that.
    closed: AtomicBool,
    /// Why the latest readiness probe failed, reported when a start times out.
    last_probe_failure: Mutex<Option<String>>,
}

impl Service {
    /// Creates the service and starts its idle watcher on the current tokio runtime.
    pub fn start(
        config: &ServiceConfig,
        backend: Arc<dyn Backend>,
        budget: Arc<GlobalBudget>,
        metrics: &Metrics,
    ) -> Arc<Self> {
        let service = Arc::new(Service {
            name: Arc::from(config.name.as_str()),
            backend,
            budget,
            state: Mutex::new(State {
                phase: Phase::Idle,
                settings: config.settings.clone(),
                protocol: config.protocol,
                readiness_probe: config.readiness_probe,
                readiness_path: config.readiness_path.clone(),
                ready: Vec::new(),
                probing: HashMap::new(),
                queue: BTreeMap::new(),
                next_seq: 0,
                in_flight: 0,
                idle_since: Instant::now(),
                activation_id: 0,
                activation_started: None,
                last_cold_start: None,
                last_error: None,
                activation_problem: None,
                scale_down_not_before: None,
                pick_offset: 0,
            }),
            idle_changed: Notify::new(),
            metrics: ServiceMetrics::new(metrics, &config.name),
            closed: AtomicBool::new(false),
            last_probe_failure: Mutex::new(None),
        });
        service.backend.watch(EndpointEvents { service: Arc::downgrade(&service) });
        tokio::spawn(Self::watch_idle(service.clone()));
        service
    }

    /// Applies new limits and timeouts from a reloaded configuration. Held and in-flight
    /// requests keep going; new limits apply to the next decision.
    pub fn update_settings(&self, config: &ServiceConfig) {
        {
            let mut st = self.state.lock();
            st.settings = config.settings.clone();
            st.protocol = config.protocol;
            st.readiness_probe = config.readiness_probe;
            st.readiness_path = config.readiness_path.clone();
            self.dispatch_locked(&mut st);
        }
        self.idle_changed.notify_one();
    }

    pub fn settings(&self) -> ServiceSettings {
        self.state.lock().settings.clone()
    }

    /// Returns the connect timeout and protocol to use towards instances.
    pub fn upstream_options(&self) -> (Duration, UpstreamProtocol) {
        let st = self.state.lock();
        (st.settings.connect_timeout, st.protocol)
    }

    /// Admits a request: a lease on a ready endpoint at once, a place in the queue, or a
    /// rejection when a queue bound is reached. Queuing a request into an idle service
    /// starts its activation.
    pub fn admit(self: &Arc<Self>) -> Admission {
        self.backend.record_activity();
        let mut st = self.state.lock();

        if st.queue.is_empty() && st.phase == Phase::Serving {
            if let Some(endpoint) = Self::pick_endpoint(&mut st) {
                Self::count_start(&mut st, &endpoint);
                self.metrics.in_flight.set(st.in_flight as i64);
                drop(st);
                return Admission::Ready(Lease::new(self.clone(), endpoint));
            }
        }

        if st.queue.len() >= st.settings.max_queued_requests {
            return Admission::Rejected(AdmitError::QueueFull);
        }
        if !self.budget.try_reserve() {
            return Admission::Rejected(AdmitError::GlobalQueueFull);
        }

        let seq = st.next_seq;
        st.next_seq += 1;
        let (sender, receiver) = oneshot::channel();
        st.queue.insert(seq, sender);
        self.metrics.queue_depth.set(st.queue.len() as i64);

        match st.phase {
            Phase::Idle => self.begin_activation_locked(&mut st),
            // A request during a scale-down is held; finish_scale_down starts a new instance.
            Phase::ScalingDown | Phase::Activating | Phase::Serving => {}
        }
        drop(st);

        Admission::Queued(Waiter {
            service: self.clone(),
            seq,
            receiver,
            enqueued: Instant::now(),
            finished: false,
        })
    }

    /// Returns a status snapshot for the admin endpoints.
    pub fn status(&self) -> ServiceStatus {
        let st = self.state.lock();
        let idle = st.in_flight == 0 && st.queue.is_empty();
        ServiceStatus {
            name: self.name.to_string(),
            state: st.phase.as_str(),
            backend: self.backend.kind(),
            instances: st.ready.len(),
            starting_instances: st.probing.len(),
            endpoints: st
                .ready
                .iter()
                .map(|e| EndpointStatus { address: e.addr.to_string(), in_flight: e.in_flight() })
                .collect(),
            queue_depth: st.queue.len(),
            in_flight: st.in_flight,
            idle_seconds: idle.then(|| st.idle_since.elapsed().as_secs_f64()),
            last_cold_start_seconds: st.last_cold_start.map(|d| d.as_secs_f64()),
            last_error: st.last_error.clone(),
        }
    }

    /// Returns how many seconds a rejected client should wait before retrying (the value of
    /// `Retry-After`), from this service's recent cold starts: the median of the last five,
    /// minus how long the current start (or the request itself, `waited`) has already
    /// taken. A serving service answers 1: its queue is full only because its instances
    /// are busy, and they free up request by request. Without any cold start to go by,
    /// the estimate is [`DEFAULT_RETRY_AFTER`]. The result is between 1 and 300 seconds.
    pub fn retry_after(&self, waited: Duration) -> u64 {
        let (phase, activation_elapsed, last) = {
            let st = self.state.lock();
            (st.phase, st.activation_started.map(|t| t.elapsed()), st.last_cold_start)
        };
        if phase == Phase::Serving {
            return 1;
        }
        let mut recent: Vec<f64> = self.recent_cold_starts().iter().rev().take(5).map(|c| c.seconds).collect();
        recent.sort_by(|a, b| a.total_cmp(b));
        let typical = match recent.get(recent.len() / 2) {
            Some(&median) => Duration::from_secs_f64(median),
            None => last.unwrap_or(DEFAULT_RETRY_AFTER),
        };
        let spent = match phase {
            Phase::Activating => activation_elapsed.unwrap_or_default().max(waited),
            _ => waited,
        };
        typical.saturating_sub(spent).as_secs_f64().ceil().clamp(1.0, 300.0) as u64
    }

    /// Stops the backend for good: used at shutdown, after held and in-flight requests had
    /// their grace period. Requests still held fail.
    pub async fn shut_down(self: &Arc<Self>) {
        self.closed.store(true, Ordering::Release);
        self.idle_changed.notify_one();
        {
            let mut st = self.state.lock();
            self.clear_endpoints_locked(&mut st);
            st.phase = Phase::ScalingDown;
            self.fail_waiters_locked(&mut st, AdmitError::Unavailable("coldgate is shutting down".into()));
        }
        self.backend.shutdown().await;
        self.state.lock().phase = Phase::Idle;
    }

    /// Returns true when the service has in-flight or held requests.
    pub fn has_requests(&self) -> bool {
        let st = self.state.lock();
        st.in_flight > 0 || !st.queue.is_empty()
    }

    // ---- load balancing -------------------------------------------------------------

    /// Picks the ready endpoint with the fewest requests in flight that is below the
    /// per-endpoint concurrency limit.
    fn pick_endpoint(st: &mut State) -> Option<Arc<Endpoint>> {
        let count = st.ready.len();
        if count == 0 {
            return None;
        }
        let limit = st.settings.max_concurrency_per_endpoint;
        st.pick_offset = st.pick_offset.wrapping_add(1);
        let mut best: Option<&Arc<Endpoint>> = None;
        for i in 0..count {
            let endpoint = &st.ready[(st.pick_offset + i) % count];
            let load = endpoint.in_flight();
            if limit != 0 && load >= limit {
                continue;
            }
            if best.is_none_or(|b| load < b.in_flight()) {
                best = Some(endpoint);
            }
        }
        best.cloned()
    }

    fn count_start(st: &mut State, endpoint: &Endpoint) {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        st.in_flight += 1;
    }

    /// Hands held requests, oldest first, to endpoints with free capacity.
    fn dispatch_locked(&self, st: &mut State) {
        if st.phase != Phase::Serving {
            return;
        }
        while !st.queue.is_empty() {
            let Some(endpoint) = Self::pick_endpoint(st) else { break };
            let Some((_, sender)) = st.queue.pop_first() else { break };
            self.budget.release();
            Self::count_start(st, &endpoint);
            if let Err(Ok(endpoint)) = sender.send(Ok(endpoint)) {
                // The waiter is gone (its Drop is waiting for this lock). Undo the count here
                // instead of building a Lease, whose Drop would take the lock again.
                endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
                st.in_flight -= 1;
            }
        }
        self.metrics.queue_depth.set(st.queue.len() as i64);
        self.metrics.in_flight.set(st.in_flight as i64);
    }

    fn release(&self, endpoint: &Endpoint) {
        let mut st = self.state.lock();
        endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
        st.in_flight -= 1;
        self.mark_idle_if_quiet(&mut st);
        self.dispatch_locked(&mut st);
        self.metrics.in_flight.set(st.in_flight as i64);
    }

    fn mark_idle_if_quiet(&self, st: &mut State) {
        if st.in_flight == 0 && st.queue.is_empty() {
            st.idle_since = Instant::now();
            self.idle_changed.notify_one();
        }
    }

    fn fail_waiters_locked(&self, st: &mut State, error: AdmitError) {
        let queue = std::mem::take(&mut st.queue);
        for (_, sender) in queue {
            self.budget.release();
            // A closed receiver means the waiter is already leaving; nothing to tell it.
            let _ = sender.send(Err(error.clone()));
        }
        self.metrics.queue_depth.set(0);
        self.mark_idle_if_quiet(st);
    }

    fn clear_endpoints_locked(&self, st: &mut State) {
        for endpoint in st.ready.drain(..) {
            endpoint.removed.store(true, Ordering::Release);
        }
        for (_, Probing { stop, .. }) in st.probing.drain() {
            stop.notify_one();
        }
        self.metrics.ready_endpoints.set(0);
    }

    // ---- activation -----------------------------------------------------------------

    fn begin_activation_locked(self: &Arc<Self>, st: &mut State) {
        if self.closed.load(Ordering::Acquire) {
            self.fail_waiters_locked(st, AdmitError::Unavailable("coldgate is shutting down".into()));
            return;
        }
        st.phase = Phase::Activating;
        st.activation_id += 1;
        st.activation_started = Some(Instant::now());
        st.last_error = None;
        st.activation_problem = None;
        *self.last_probe_failure.lock() = None;
        let activation_id = st.activation_id;
        let startup_timeout = st.settings.startup_timeout;
        info!(service = %self.name, "activating: starting an instance");
        self.metrics.scale_up.inc();

        let service = self.clone();
        tokio::spawn(async move {
            let events = EndpointEvents { service: Arc::downgrade(&service) };
            let watchdog = tokio::time::sleep(startup_timeout);
            tokio::pin!(watchdog);
            tokio::select! {
                result = service.backend.scale_up(events) => {
                    if let Err(error) = result {
                        let failure = match error.client_status() {
                            503 => AdmitError::Unavailable(error.to_string().into()),
                            _ => AdmitError::ActivationFailed(error.to_string().into()),
                        };
                        service.activation_failed(activation_id, failure, false).await;
                        return;
                    }
                    (&mut watchdog).await;
                }
                () = &mut watchdog => {}
            }
            let still_starting = {
                let st = service.state.lock();
                st.activation_id == activation_id && st.phase == Phase::Activating
            };
            if still_starting {
                let mut reason = format!(
                    "no instance passed its readiness probe within startup_timeout ({})",
                    crate::config::format_duration(startup_timeout)
                );
                if let Some(failure) = service.last_probe_failure.lock().take() {
                    reason.push_str(&format!("; {failure}"));
                }
                service.activation_failed(activation_id, AdmitError::ActivationFailed(reason.into()), true).await;
            }
        });
    }

    /// Fails the held requests of a start that went wrong and returns the service to Idle.
    /// With `stop_backend`, whatever the backend started is stopped too.
    async fn activation_failed(self: &Arc<Self>, activation_id: u64, failure: AdmitError, stop_backend: bool) {
        {
            let mut st = self.state.lock();
            if st.activation_id != activation_id || st.phase != Phase::Activating {
                return;
            }
            let reason = match &failure {
                AdmitError::ActivationFailed(reason) | AdmitError::Unavailable(reason) => reason.to_string(),
                other => format!("{other:?}"),
            };
            warn!(service = %self.name, reason = %reason, "activation failed; failing held requests");
            self.metrics.activation_failure.inc();
            st.last_error = Some(reason);
            self.clear_endpoints_locked(&mut st);
            self.fail_waiters_locked(&mut st, failure);
            st.phase = if stop_backend { Phase::ScalingDown } else { Phase::Idle };
        }
        if stop_backend {
            if let Err(error) = self.backend.scale_down().await {
                warn!(service = %self.name, %error, "stopping a failed instance failed");
            }
            self.finish_scale_down();
        }
    }

    /// Records a backend problem during the current activation without failing it yet; the
    /// backend keeps retrying and held requests wait until their deadline.
    fn activation_problem(&self, reason: String) {
        let mut st = self.state.lock();
        if st.phase == Phase::Activating {
            st.last_error = Some(reason.clone());
            st.activation_problem = Some(reason.into());
        }
    }

    /// Fails the current activation at once, for example when every pod is in
    /// CrashLoopBackOff.
    fn start_failed(self: &Arc<Self>, reason: String) {
        let activation_id = {
            let st = self.state.lock();
            if st.phase != Phase::Activating || !st.ready.is_empty() {
                return;
            }
            st.activation_id
        };
        let service = self.clone();
        tokio::spawn(async move {
            service.activation_failed(activation_id, AdmitError::ActivationFailed(reason.into()), false).await;
        });
    }

    /// Called by the backend with an address that may serve the service once its readiness
    /// probe passes.
    fn endpoint_discovered(self: &Arc<Self>, addr: SocketAddr) {
        let mut st = self.state.lock();
        if st.probing.contains_key(&addr) || st.ready.iter().any(|e| e.addr == addr) {
            return;
        }
        if st.phase == Phase::ScalingDown {
            debug!(service = %self.name, %addr, "ignoring an endpoint reported during a scale-down");
            return;
        }
        let stop = Arc::new(Notify::new());
        let wake = Arc::new(Notify::new());
        st.probing.insert(addr, Probing { stop: stop.clone(), wake: wake.clone() });
        let kind = match (st.readiness_probe, st.protocol) {
            (ReadinessProbe::Grpc, _) => probe::ProbeKind::Grpc,
            (ReadinessProbe::Http, UpstreamProtocol::H2c) => probe::ProbeKind::H2c,
            (ReadinessProbe::Http, UpstreamProtocol::Http1) => probe::ProbeKind::Http1,
        };
        let plan = probe::ProbePlan {
            addr,
            kind,
            path: st.readiness_path.clone(),
            interval: st.settings.probe_interval,
            timeout: st.settings.probe_timeout,
        };
        let activation_id = st.activation_id;
        drop(st);

        let service = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = probe::wait_until_ready(&plan, &wake, |failure| *service.last_probe_failure.lock() = Some(failure)) => {
                    service.endpoint_ready(addr, activation_id)
                }
                () = stop.notified() => debug!(service = %service.name, %addr, "probe stopped"),
            }
        });
    }

    /// Runs the pending readiness probe of `addr` now rather than at its next interval,
    /// unless the line is an access log line of coldgate's own probe (it names the
    /// readiness path followed by the protocol, as in `"GET /ready HTTP/1.1"`).
    fn endpoint_output(&self, addr: SocketAddr, line: &str) {
        let st = self.state.lock();
        if line.contains(&format!("{} HTTP/", st.readiness_path)) {
            return;
        }
        if let Some(probing) = st.probing.get(&addr) {
            probing.wake.notify_one();
        }
    }

    fn endpoint_ready(self: &Arc<Self>, addr: SocketAddr, activation_id: u64) {
        let mut st = self.state.lock();
        if st.probing.remove(&addr).is_none() {
            return;
        }
        st.ready.push(Arc::new(Endpoint::new(addr)));
        self.metrics.ready_endpoints.set(st.ready.len() as i64);
        if st.phase == Phase::Activating && st.activation_id == activation_id {
            let elapsed = st.activation_started.map(|t| t.elapsed()).unwrap_or_default();
            st.last_cold_start = Some(elapsed);
            self.record_cold_start(elapsed);
            self.metrics.cold_start.observe(elapsed.as_secs_f64());
            self.metrics.activation_success.inc();
            info!(
                service = %self.name,
                endpoint = %addr,
                elapsed_ms = elapsed.as_millis() as u64,
                held = st.queue.len(),
                "instance ready; releasing held requests"
            );
        } else {
            info!(service = %self.name, endpoint = %addr, "instance ready");
        }
        if st.phase != Phase::Serving {
            // Instances that appear without an activation (started by another coldgate
            // replica or an autoscaler) start the idle clock from now.
            st.idle_since = Instant::now();
        }
        st.phase = Phase::Serving;
        self.mark_idle_if_quiet(&mut st);
        self.dispatch_locked(&mut st);
    }

    /// Called by the backend when an address stops serving (the process exited, the pod
    /// went away). If it was the last one, held requests fail with the reason at once.
    fn endpoint_lost(self: &Arc<Self>, addr: SocketAddr, reason: String) {
        let mut st = self.state.lock();
        let was_probing = st.probing.remove(&addr).map(|probing| probing.stop.notify_one()).is_some();
        let position = st.ready.iter().position(|e| e.addr == addr);
        let was_ready = position.is_some();
        if let Some(position) = position {
            let endpoint = st.ready.remove(position);
            endpoint.removed.store(true, Ordering::Release);
            self.metrics.ready_endpoints.set(st.ready.len() as i64);
        }
        if !was_probing && !was_ready {
            return; // Already removed, for example by a scale-down.
        }
        warn!(service = %self.name, endpoint = %addr, reason = %reason, "instance lost");
        st.last_error = Some(reason.clone());
        if !st.ready.is_empty() || !st.probing.is_empty() {
            return;
        }
        if st.phase == Phase::Activating {
            self.metrics.activation_failure.inc();
        }
        if matches!(st.phase, Phase::Activating | Phase::Serving) {
            st.phase = Phase::Idle;
            self.fail_waiters_locked(&mut st, AdmitError::ActivationFailed(reason.into()));
            self.idle_changed.notify_one();
        }
    }

    // ---- scale to zero --------------------------------------------------------------

    /// Scales the service to zero once it has been quiet for `idle_timeout`. Runs until the
    /// service is closed.
    async fn watch_idle(service: Arc<Service>) {
        while !service.closed.load(Ordering::Acquire) {
            let notified = service.idle_changed.notified();
            let wait_until = {
                let st = service.state.lock();
                let quiet = st.in_flight == 0 && st.queue.is_empty();
                (st.phase == Phase::Serving && quiet).then(|| {
                    let expiry = st.idle_since + st.settings.idle_timeout;
                    st.scale_down_not_before.map_or(expiry, |not_before| expiry.max(not_before))
                })
            };
            match wait_until {
                Some(deadline) if Instant::now() >= deadline => service.clone().scale_down_if_idle().await,
                Some(deadline) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(deadline.into()) => {}
                        () = notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// How long to wait before asking again after a scale-down was refused or failed.
    fn scale_down_retry_delay(idle_timeout: Duration) -> Duration {
        (idle_timeout / 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }

    fn postpone_scale_down(&self, reason: &str) {
        let mut st = self.state.lock();
        let delay = Self::scale_down_retry_delay(st.settings.idle_timeout);
        st.scale_down_not_before = Some(Instant::now() + delay);
        debug!(service = %self.name, reason, retry_ms = delay.as_millis() as u64, "scale-down postponed");
    }

    async fn scale_down_if_idle(self: Arc<Self>) {
        if self.in_keep_warm_window() {
            self.postpone_scale_down("a keep_warm window is open");
            return;
        }
        let idle_timeout = self.state.lock().settings.idle_timeout;
        if let Err(reason) = self.backend.scale_down_check(idle_timeout).await {
            self.postpone_scale_down(&reason);
            return;
        }

        let saved = {
            let mut st = self.state.lock();
            let quiet = st.in_flight == 0 && st.queue.is_empty();
            let expired = st.idle_since.elapsed() >= st.settings.idle_timeout;
            if st.phase != Phase::Serving || !quiet || !expired {
                return;
            }
            info!(
                service = %self.name,
                idle_ms = st.idle_since.elapsed().as_millis() as u64,
                "idle timeout reached; scaling to zero"
            );
            st.phase = Phase::ScalingDown;
            st.scale_down_not_before = None;
            let saved: Vec<SocketAddr> = st.ready.iter().map(|e| e.addr).collect();
            self.clear_endpoints_locked(&mut st);
            saved
        };

        match self.backend.scale_down().await {
            Ok(ScaleDown::Done) => {
                self.metrics.scale_down.inc();
                self.finish_scale_down();
            }
            Ok(ScaleDown::Skipped(reason)) => {
                info!(service = %self.name, reason = %reason, "scale-down skipped; still serving");
                self.restore_after_scale_down(saved, &reason);
            }
            Err(error) => {
                warn!(service = %self.name, %error, "scale-down failed; still serving");
                self.state.lock().last_error = Some(error.to_string());
                self.restore_after_scale_down(saved, &error.to_string());
            }
        }
    }

    /// Puts the endpoints back after a scale-down that did not happen.
    fn restore_after_scale_down(self: &Arc<Self>, addrs: Vec<SocketAddr>, reason: &str) {
        {
            let mut st = self.state.lock();
            if st.phase != Phase::ScalingDown {
                return;
            }
            st.ready = addrs.into_iter().map(|addr| Arc::new(Endpoint::new(addr))).collect();
            self.metrics.ready_endpoints.set(st.ready.len() as i64);
            st.phase = if st.ready.is_empty() { Phase::Idle } else { Phase::Serving };
            self.dispatch_locked(&mut st);
            if st.phase == Phase::Idle && !st.queue.is_empty() {
                self.begin_activation_locked(&mut st);
            }
        }
        self.postpone_scale_down(reason);
    }

    fn finish_scale_down(self: &Arc<Self>) {
        let mut st = self.state.lock();
        if st.phase != Phase::ScalingDown {
            return;
        }
        st.phase = Phase::Idle;
        if !st.queue.is_empty() {
            info!(service = %self.name, held = st.queue.len(), "requests arrived during scale-down; activating again");
            self.begin_activation_locked(&mut st);
        } else {
            info!(service = %self.name, "scaled to zero");
        }
    }

    // ---- warm-up, keep-warm windows, cold-start history -----------------------------
    // Used by the admin API and src/keep_warm.rs.

    /// Starts an instance ahead of traffic through the same activation as a held request,
    /// with nothing held. A service that is scaling down starts again once the scale-down
    /// has finished.
    pub fn warm(self: &Arc<Self>) -> crate::keep_warm::WarmOutcome {
        use crate::keep_warm::WarmOutcome;
        if self.closed.load(Ordering::Acquire) {
            return WarmOutcome::Closed;
        }
        // Counts as traffic, so that other coldgate replicas (Kubernetes backend) do not
        // scale the warmed service straight back down.
        self.backend.record_activity();
        let mut st = self.state.lock();
        match st.phase {
            Phase::Idle => {
                self.begin_activation_locked(&mut st);
                WarmOutcome::Started
            }
            Phase::ScalingDown => {
                drop(st);
                self.warm_after_scale_down();
                WarmOutcome::AfterScaleDown
            }
            Phase::Activating | Phase::Serving => WarmOutcome::AlreadyRunning(st.phase.as_str()),
        }
    }

    /// Activates the service once the running scale-down has finished. `finish_scale_down`
    /// restarts only for held requests and a warm-up leaves the queue empty, so this polls
    /// the phase.
    fn warm_after_scale_down(self: &Arc<Self>) {
        const POLL_INTERVAL: Duration = Duration::from_millis(50);
        // Longer than any stop_grace or Kubernetes scale-down that coldgate waits for.
        const GIVE_UP_AFTER: Duration = Duration::from_secs(600);
        let service = self.clone();
        tokio::spawn(async move {
            let give_up_at = Instant::now() + GIVE_UP_AFTER;
            loop {
                tokio::time::sleep(POLL_INTERVAL).await;
                let finished = {
                    let mut st = service.state.lock();
                    match st.phase {
                        Phase::ScalingDown => false,
                        Phase::Idle => {
                            service.begin_activation_locked(&mut st);
                            true
                        }
                        Phase::Activating | Phase::Serving => true,
                    }
                };
                if finished {
                    return;
                }
                if Instant::now() >= give_up_at {
                    warn!(service = %service.name, "scale-down did not finish within 10 minutes; warm-up dropped");
                    return;
                }
            }
        });
    }

    /// Returns the keep-warm windows from the current settings.
    pub fn keep_warm_schedule(&self) -> crate::keep_warm::KeepWarmSchedule {
        self.state.lock().settings.keep_warm.clone()
    }

    /// Returns true while one of the service's keep_warm windows is open, so the idle
    /// watcher must not scale the service to zero.
    pub fn in_keep_warm_window(&self) -> bool {
        self.keep_warm_schedule().in_keep_warm_window(jiff::Timestamp::now())
    }

    /// Adds a cold start to the history that `/status` shows.
    pub fn record_cold_start(&self, elapsed: Duration) {
        crate::admin::history::record(&self.name, elapsed);
    }

    /// Returns the most recent cold starts, oldest first.
    pub fn recent_cold_starts(&self) -> Vec<crate::admin::history::ColdStart> {
        crate::admin::history::recent(&self.name)
    }
}

/// The result of [`Service::admit`].
pub enum Admission {
    Ready(Lease),
    Queued(Waiter),
    Rejected(AdmitError),
}

/// A request's place in a service's queue. Dropping it (the client went away, the request
/// was cancelled) gives the place back at once.
pub struct Waiter {
    service: Arc<Service>,
    seq: u64,
    receiver: oneshot::Receiver<Result<Grant, AdmitError>>,
    enqueued: Instant,
    finished: bool,
}

impl Waiter {
    /// Waits for an endpoint until `deadline`. Cancel-safe: dropping the future leaves the
    /// queue as if the request had never been queued.
    pub async fn wait(mut self, deadline: Instant) -> Result<Lease, AdmitError> {
        let outcome = tokio::time::timeout_at(deadline.into(), &mut self.receiver).await;
        let result = match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AdmitError::ActivationFailed("the service was removed".into())),
            Err(_) => match self.leave_queue() {
                // The grant raced the deadline: the endpoint is ours, so use it.
                Some(endpoint) => Ok(endpoint),
                None => match self.service.state.lock().activation_problem.clone() {
                    Some(problem) => Err(AdmitError::Unavailable(problem)),
                    None => Err(AdmitError::Timeout),
                },
            },
        };
        self.finished = true;
        let waited = self.enqueued.elapsed().as_secs_f64();
        let metrics = &self.service.metrics;
        match &result {
            Ok(_) => metrics.wait_released.observe(waited),
            Err(AdmitError::Timeout) => metrics.wait_timeout.observe(waited),
            Err(_) => metrics.wait_failed.observe(waited),
        }
        result.map(|endpoint| Lease::new(self.service.clone(), endpoint))
    }

    /// Removes this waiter from the queue. Returns the endpoint if it was granted one in the
    /// meantime; the caller then owns one in-flight count on it.
    fn leave_queue(&mut self) -> Option<Grant> {
        {
            let mut st = self.service.state.lock();
            if st.queue.remove(&self.seq).is_some() {
                self.service.budget.release();
                self.service.metrics.queue_depth.set(st.queue.len() as i64);
                self.service.mark_idle_if_quiet(&mut st);
                return None;
            }
        }
        // Not in the queue any more, so a result was sent under the lock before we took it.
        match self.receiver.try_recv() {
            Ok(Ok(endpoint)) => Some(endpoint),
            _ => None,
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(endpoint) = self.leave_queue() {
            // Granted just as the client left: give the endpoint back. The lock is not held.
            drop(Lease::new(self.service.clone(), endpoint));
        }
        self.service.metrics.wait_cancelled.observe(self.enqueued.elapsed().as_secs_f64());
    }
}

/// One in-flight request on one endpoint. Dropping it ends the request's share of the
/// endpoint's concurrency and may start the idle clock.
pub struct Lease {
    service: Arc<Service>,
    endpoint: Arc<Endpoint>,
}

impl Lease {
    fn new(service: Arc<Service>, endpoint: Arc<Endpoint>) -> Self {
        Lease { service, endpoint }
    }

    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr
    }

    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    /// Returns false once the endpoint has left the ready set (its instance stopped or
    /// crashed), so a retry should pick another endpoint.
    pub fn is_current(&self) -> bool {
        !self.endpoint.is_removed()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.service.release(&self.endpoint);
    }
}

/// The channel through which a backend reports the addresses of its instances.
#[derive(Clone)]
pub struct EndpointEvents {
    service: Weak<Service>,
}

impl EndpointEvents {
    /// Reports an address that may serve once it passes the readiness probe.
    pub fn discovered(&self, addr: SocketAddr) {
        if let Some(service) = self.service.upgrade() {
            service.endpoint_discovered(addr);
        }
    }

    /// Reports a line of output from the instance at `addr`. Model servers log when they
    /// finish loading, so a readiness probe that is still pending runs at once instead of
    /// at its next interval.
    pub fn output(&self, addr: SocketAddr, line: &str) {
        if let Some(service) = self.service.upgrade() {
            service.endpoint_output(addr, line);
        }
    }

    /// Reports that an address no longer serves, with a reason for held requests and logs.
    pub fn lost(&self, addr: SocketAddr, reason: String) {
        if let Some(service) = self.service.upgrade() {
            service.endpoint_lost(addr, reason);
        }
    }

    /// Reports a problem that the backend keeps retrying (an API error, say). Held requests
    /// that reach their deadline get it as the reason for their 503.
    pub fn problem(&self, reason: String) {
        if let Some(service) = self.service.upgrade() {
            service.activation_problem(reason);
        }
    }

    /// Reports that the instances cannot start (every pod crash-looping, for example):
    /// held requests fail at once with the reason.
    pub fn start_failed(&self, reason: String) {
        if let Some(service) = self.service.upgrade() {
            service.start_failed(reason);
        }
    }

    /// Returns true once the service was removed or coldgate is shutting down.
    pub fn is_closed(&self) -> bool {
        self.service.upgrade().is_none_or(|s| s.closed.load(Ordering::Acquire))
    }

    /// Returns true while the service has requests in flight or held; false once the
    /// service is gone.
    pub fn is_busy(&self) -> bool {
        self.service.upgrade().is_some_and(|s| s.has_requests())
    }
}

impl std::fmt::Debug for EndpointEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointEvents").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendError;
    use async_trait::async_trait;
    use std::sync::atomic::AtomicUsize;

    /// A backend that records scale calls and never reports an endpoint, or fails to start.
    #[derive(Default)]
    struct CountingBackend {
        scale_ups: AtomicUsize,
        fail: bool,
    }

    #[async_trait]
    impl Backend for CountingBackend {
        async fn scale_up(&self, _events: EndpointEvents) -> Result<(), BackendError> {
            self.scale_ups.fetch_add(1, Ordering::SeqCst);
            if self.fail {
                return Err(BackendError::Spawn {
                    command: "missing-model-server".into(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                });
            }
            Ok(())
        }
        async fn scale_down(&self) -> Result<ScaleDown, BackendError> {
            Ok(ScaleDown::Done)
        }
        fn kind(&self) -> &'static str {
            "test"
        }
    }

    fn service_with(defaults: &str, backend: Arc<CountingBackend>, global_max: usize) -> (Arc<Service>, Arc<GlobalBudget>) {
        let text = format!(
            "[defaults]\n{defaults}\n[[service]]\nname = \"m\"\nhosts = [\"m.local\"]\n[service.process]\ncommand = \"true\"\n"
        );
        let config = crate::config::parse(&text, "test.toml").unwrap();
        let metrics = Metrics::new();
        let budget = Arc::new(GlobalBudget::new(global_max, metrics.held_requests_total.clone()));
        let service = Service::start(&config.services[0], backend, budget.clone(), &metrics);
        (service, budget)
    }

    fn queued(admission: Admission) -> Waiter {
        match admission {
            Admission::Queued(waiter) => waiter,
            Admission::Ready(_) => panic!("expected the request to be queued, it was forwarded"),
            Admission::Rejected(error) => panic!("expected the request to be queued, it was rejected: {error:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn held_request_times_out_at_deadline() {
        let (service, budget) = service_with("", Arc::default(), 100);
        let waiter = queued(service.admit());
        let started = tokio::time::Instant::now();
        let result = waiter.wait(Instant::now() + Duration::from_secs(30)).await;
        assert_eq!(result.err(), Some(AdmitError::Timeout));
        assert!(started.elapsed() >= Duration::from_secs(30));
        assert_eq!(service.status().queue_depth, 0);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn queue_bound_rejects_overflow() {
        let (service, _) = service_with("max_queued_requests = 2", Arc::default(), 100);
        let _first = queued(service.admit());
        let _second = queued(service.admit());
        assert!(matches!(service.admit(), Admission::Rejected(AdmitError::QueueFull)));
    }

    #[tokio::test]
    async fn global_budget_rejects_overflow() {
        let (service, budget) = service_with("", Arc::default(), 1);
        let _first = queued(service.admit());
        assert!(matches!(service.admit(), Admission::Rejected(AdmitError::GlobalQueueFull)));
        assert_eq!(budget.held(), 1);
    }

    #[tokio::test]
    async fn dropped_waiter_leaves_queue() {
        let (service, budget) = service_with("", Arc::default(), 100);
        let waiter = queued(service.admit());
        assert_eq!(service.status().queue_depth, 1);
        drop(waiter);
        assert_eq!(service.status().queue_depth, 0);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn many_requests_activate_once() {
        let backend = Arc::new(CountingBackend::default());
        let (service, _) = service_with("", backend.clone(), 100);
        let waiters: Vec<_> = (0..50).map(|_| queued(service.admit())).collect();
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(backend.scale_ups.load(Ordering::SeqCst), 1);
        assert_eq!(service.status().state, "activating");
        assert_eq!(waiters.len(), 50);
    }

    #[tokio::test]
    async fn failed_start_fails_held_requests() {
        let backend = Arc::new(CountingBackend { fail: true, ..Default::default() });
        let (service, budget) = service_with("", backend, 100);
        let waiter = queued(service.admit());
        let result = tokio::time::timeout(Duration::from_secs(5), waiter.wait(Instant::now() + Duration::from_secs(60)))
            .await
            .expect("held request should fail at once, not at its deadline");
        match result {
            Err(AdmitError::ActivationFailed(reason)) => assert!(reason.contains("missing-model-server"), "{reason}"),
            other => panic!("expected ActivationFailed, got {:?}", other.map(|l| l.addr())),
        }
        assert_eq!(service.status().state, "idle");
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn retry_after_follows_recent_cold_starts() {
        let text = "[[service]]\nname = \"retry-after-unit\"\nhosts = [\"r.local\"]\n[service.process]\ncommand = \"true\"\n";
        let config = crate::config::parse(text, "test.toml").unwrap();
        let metrics = Metrics::new();
        let budget = Arc::new(GlobalBudget::new(10, metrics.held_requests_total.clone()));
        let service = Service::start(&config.services[0], Arc::new(CountingBackend::default()), budget, &metrics);
        let _held = queued(service.admit());

        assert_eq!(service.retry_after(Duration::ZERO), DEFAULT_RETRY_AFTER.as_secs(), "no history yet");
        for seconds in [18, 20, 40] {
            service.record_cold_start(Duration::from_secs(seconds));
        }
        assert_eq!(service.retry_after(Duration::ZERO), 20, "the median of recent cold starts");
        assert_eq!(service.retry_after(Duration::from_secs(8)), 12, "minus what the request already waited");
        assert_eq!(service.retry_after(Duration::from_secs(60)), 1, "never below one second");
    }

    #[test]
    fn least_outstanding_pick_skips_full_endpoints() {
        let config = crate::config::parse(
            "[[service]]\nname = \"m\"\nhosts = [\"m.local\"]\n[service.process]\ncommand = \"true\"\n",
            "t.toml",
        )
        .unwrap();
        let mut settings = config.services[0].settings.clone();
        settings.max_concurrency_per_endpoint = 2;
        let endpoints: Vec<_> = (1..=3).map(|i| Arc::new(Endpoint::new(([127, 0, 0, 1], 9000 + i).into()))).collect();
        endpoints[0].in_flight.store(2, Ordering::Relaxed);
        endpoints[1].in_flight.store(1, Ordering::Relaxed);
        endpoints[2].in_flight.store(0, Ordering::Relaxed);
        let mut st = State {
            phase: Phase::Serving,
            settings,
            protocol: UpstreamProtocol::Http1,
            readiness_probe: ReadinessProbe::Http,
            readiness_path: "/".into(),
            ready: endpoints.clone(),
            probing: HashMap::new(),
            queue: BTreeMap::new(),
            next_seq: 0,
            in_flight: 3,
            idle_since: Instant::now(),
            activation_id: 0,
            activation_started: None,
            last_cold_start: None,
            last_error: None,
            activation_problem: None,
            scale_down_not_before: None,
            pick_offset: 0,
        };
        for _ in 0..5 {
            assert_eq!(Service::pick_endpoint(&mut st).unwrap().addr.port(), 9003);
        }
        endpoints[2].in_flight.store(2, Ordering::Relaxed);
        assert_eq!(Service::pick_endpoint(&mut st).unwrap().addr.port(), 9002);
        endpoints[1].in_flight.store(2, Ordering::Relaxed);
        assert!(Service::pick_endpoint(&mut st).is_none(), "every endpoint is at its limit");
    }
}
