//! Prometheus metrics, all prefixed `coldgate_` and in base units.
//!
//! Labels are bounded: the service label only ever takes configured service names, and
//! statuses and outcomes come from fixed sets. Nothing from a request (path, host, client
//! address) becomes a label value, so a client cannot grow the registry.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// All of coldgate's metrics, registered in one registry served on the admin port.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub unrouted_requests: IntCounter,
    pub queue_depth: IntGaugeVec,
    pub queue_wait: HistogramVec,
    pub queue_rejections: IntCounterVec,
    pub cold_start: HistogramVec,
    pub activations: IntCounterVec,
    pub scale_events: IntCounterVec,
    pub ready_endpoints: IntGaugeVec,
    pub in_flight: IntGaugeVec,
    pub upstream_latency: HistogramVec,
    pub buffered_bytes: IntGaugeVec,
    pub connect_retries: IntCounterVec,
    pub process_exits: IntCounterVec,
    pub held_requests_total: IntGauge,
    pub kubernetes_api_errors: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub leader: IntGauge,
    pub startup_duration: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();

        // Cold starts of GPU model servers take seconds to minutes, so the buckets reach 20 min.
        let cold_start_buckets = vec![
            0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
        ];
        let wait_buckets = vec![
            0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
        ];
        let latency_buckets = exponential_buckets(0.0005, 2.5, 16).expect("static bucket layout is valid");

        let metrics = Metrics {
            requests: IntCounterVec::new(
                Opts::new("coldgate_requests_total", "Requests answered, by service and HTTP status"),
                &["service", "status"],
            )
            .unwrap(),
            unrouted_requests: IntCounter::new(
                "coldgate_unrouted_requests_total",
                "Requests whose Host and path matched no service (answered 404)",
            )
            .unwrap(),
            queue_depth: IntGaugeVec::new(
                Opts::new("coldgate_queue_depth", "Requests currently held in the service's queue"),
                &["service"],
            )
            .unwrap(),
            queue_wait: HistogramVec::new(
                HistogramOpts::new("coldgate_queue_wait_seconds", "Time requests spent held, by outcome")
                    .buckets(wait_buckets),
                &["service", "outcome"],
            )
            .unwrap(),
            queue_rejections: IntCounterVec::new(
                Opts::new(
                    "coldgate_queue_rejections_total",
                    "Requests rejected with 503 because a queue bound was reached",
                ),
                &["service", "reason"],
            )
            .unwrap(),
            cold_start: HistogramVec::new(
                HistogramOpts::new(
                    "coldgate_cold_start_duration_seconds",
                    "Time from activation request to the first instance passing its readiness probe",
                )
                .buckets(cold_start_buckets),
                &["service"],
            )
            .unwrap(),
            activations: IntCounterVec::new(
                Opts::new("coldgate_activations_total", "Activations from zero, by outcome"),
                &["service", "outcome"],
            )
            .unwrap(),
            scale_events: IntCounterVec::new(
                Opts::new("coldgate_scale_events_total", "Scale actions taken, by direction"),
                &["service", "direction"],
            )
            .unwrap(),
            ready_endpoints: IntGaugeVec::new(
                Opts::new("coldgate_ready_endpoints", "Instances that passed the readiness probe"),
                &["service"],
            )
            .unwrap(),
            in_flight: IntGaugeVec::new(
                Opts::new("coldgate_in_flight_requests", "Requests forwarded and not yet finished"),
                &["service"],
            )
            .unwrap(),
            upstream_latency: HistogramVec::new(
                HistogramOpts::new(
                    "coldgate_upstream_response_seconds",
                    "Time from forwarding a request to receiving the instance's response header",
                )
                .buckets(latency_buckets),
                &["service"],
            )
            .unwrap(),
            buffered_bytes: IntGaugeVec::new(
                Opts::new(
                    "coldgate_buffered_bytes",
                    "Request body bytes read and kept in memory while requests are held",
                ),
                &["service"],
            )
            .unwrap(),
            connect_retries: IntCounterVec::new(
                Opts::new(
                    "coldgate_connect_retries_total",
                    "Connections to an instance refused or failed before any byte was sent, then retried",
                ),
                &["service"],
            )
            .unwrap(),
            process_exits: IntCounterVec::new(
                Opts::new("coldgate_process_exits_total", "Exits of processes started by the process backend"),
                &["service", "expected"],
            )
            .unwrap(),
            held_requests_total: IntGauge::new(
                "coldgate_held_requests",
                "Requests held across all services (bounded by server.max_total_queued)",
            )
            .unwrap(),
            kubernetes_api_errors: IntCounterVec::new(
                Opts::new(
                    "coldgate_kubernetes_api_errors_total",
                    "Failed Kubernetes API calls of the kubernetes backend, by operation",
                ),
                &["service", "operation"],
            )
            .unwrap(),
            config_reloads: IntCounterVec::new(
                Opts::new(
                    "coldgate_config_reloads_total",
                    "Configuration reloads, by outcome (a failure keeps the running configuration)",
                ),
                &["outcome"],
            )
            .unwrap(),
            leader: IntGauge::new(
                "coldgate_leader",
                "1 while this replica holds the leader Lease that allows scaling to zero, else 0",
            )
            .unwrap(),
            startup_duration: Histogram::with_opts(
                HistogramOpts::new("coldgate_startup_seconds", "Time coldgate took to start serving")
                    .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            )
            .unwrap(),
            registry,
        };
        metrics.register_all();
        for outcome in ["success", "failure"] {
            metrics.config_reloads.with_label_values(&[outcome]).inc_by(0);
        }
        metrics
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.requests.clone()),
            Box::new(self.unrouted_requests.clone()),
            Box::new(self.queue_depth.clone()),
            Box::new(self.queue_wait.clone()),
            Box::new(self.queue_rejections.clone()),
            Box::new(self.cold_start.clone()),
            Box::new(self.activations.clone()),
            Box::new(self.scale_events.clone()),
            Box::new(self.ready_endpoints.clone()),
            Box::new(self.in_flight.clone()),
            Box::new(self.upstream_latency.clone()),
            Box::new(self.buffered_bytes.clone()),
            Box::new(self.connect_retries.clone()),
            Box::new(self.process_exits.clone()),
            Box::new(self.held_requests_total.clone()),
            Box::new(self.kubernetes_api_errors.clone()),
            Box::new(self.leader.clone()),
            Box::new(self.config_reloads.clone()),
            Box::new(self.startup_duration.clone()),
        ];
        for collector in collectors {
            self.registry
                .register(collector)
                .expect("each metric name is registered once");
        }
    }

    /// Creates the per-service series at zero so dashboards show a service before its first
    /// request.
    pub fn init_service(&self, service: &str) {
        self.queue_depth.with_label_values(&[service]).set(0);
        self.ready_endpoints.with_label_values(&[service]).set(0);
        self.in_flight.with_label_values(&[service]).set(0);
        self.buffered_bytes.with_label_values(&[service]).set(0);
        for outcome in ["success", "failure"] {
            self.activations.with_label_values(&[service, outcome]).inc_by(0);
        }
        for direction in ["up", "down"] {
            self.scale_events.with_label_values(&[service, direction]).inc_by(0);
        }
        for reason in ["queue_full", "global_limit"] {
            self.queue_rejections.with_label_values(&[service, reason]).inc_by(0);
        }
        self.connect_retries.with_label_values(&[service]).inc_by(0);
    }

    /// Renders every metric in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
