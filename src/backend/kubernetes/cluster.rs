//! What all Kubernetes services of one coldgate share: the API client, this replica's
//! identity, and the leader election that decides which replica may scale to zero.
//!
//! Leader election follows the usual Lease protocol: the holder renews `renewTime` every
//! third of `lease_duration`; another replica takes the Lease over only once it has not been
//! renewed for `lease_duration`, and writes are guarded by `resourceVersion`, so two
//! replicas cannot both win. A replica counts itself leader only until its last successful
//! renewal plus `lease_duration`, measured on its own monotonic clock, so a replica that
//! loses the API stops acting as leader by itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use parking_lot::Mutex;
use prometheus::IntGauge;
use tracing::{debug, info, warn};

use crate::config::KubernetesConfig;

/// Name of the Lease that records a service's last activity across replicas.
pub fn activity_lease_name(service: &str) -> String {
    format!("coldgate-activity-{service}")
}

/// Errors while connecting to the Kubernetes API at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("failed to read kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("failed to find Kubernetes credentials (in-cluster service account or KUBECONFIG): {0}")]
    Infer(String),
    #[error("failed to build the Kubernetes client: {0}")]
    Client(String),
}

pub struct Cluster {
    pub client: Client,
    /// This replica's name in Leases and Events.
    pub identity: String,
    /// Namespace for services that name none, from the config or the client's context.
    pub default_namespace: String,
    pub lease_namespace: String,
    leader_lease: String,
    lease_duration: Duration,
    pub activity_interval: Duration,
    /// Until when this replica may act as leader (its last renewal plus lease_duration).
    leader_until: Mutex<Option<Instant>>,
    stopped: AtomicBool,
    leader_gauge: IntGauge,
}

impl Cluster {
    /// Builds the API client from the configured kubeconfig, or from the in-cluster service
    /// account (or the usual KUBECONFIG lookup) when none is configured.
    pub async fn connect(config: &KubernetesConfig, leader_gauge: IntGauge) -> Result<Arc<Cluster>, ConnectError> {
        let kube_config = match &config.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path).map_err(|e| ConnectError::Kubeconfig {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .map_err(|e| ConnectError::Kubeconfig { path: path.display().to_string(), message: e.to_string() })?
            }
            None => kube::Config::infer().await.map_err(|e| ConnectError::Infer(e.to_string()))?,
        };
        let client = Client::try_from(kube_config).map_err(|e| ConnectError::Client(e.to_string()))?;
        let default_namespace = config.namespace.clone().unwrap_or_else(|| client.default_namespace().to_string());
        let lease_namespace = config.lease_namespace.clone().unwrap_or_else(|| default_namespace.clone());
        let identity = config.identity.clone().unwrap_or_else(default_identity);
        info!(
            identity = %identity,
            namespace = %default_namespace,
            lease_namespace = %lease_namespace,
            "connected the Kubernetes backend"
        );
        Ok(Arc::new(Cluster {
            client,
            identity,
            default_namespace,
            lease_namespace,
            leader_lease: config.leader_lease.clone(),
            lease_duration: config.lease_duration,
            activity_interval: config.activity_interval,
            leader_until: Mutex::new(None),
            stopped: AtomicBool::new(false),
            leader_gauge,
        }))
    }

    pub fn is_leader(&self) -> bool {
        self.leader_until.lock().is_some_and(|until| Instant::now() < until)
    }

    pub fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.lease_namespace)
    }

    /// Runs leader election until [`Cluster::release`] is called.
    pub fn start_leader_election(self: &Arc<Self>) {
        let cluster = self.clone();
        tokio::spawn(async move {
            let period = cluster.lease_duration / 3;
            let mut last_error: Option<String> = None;
            let mut was_leader = false;
            while !cluster.stopped.load(Ordering::Acquire) {
                let attempt_started = Instant::now();
                match cluster.try_acquire_or_renew().await {
                    Ok(true) => {
                        *cluster.leader_until.lock() = Some(attempt_started + cluster.lease_duration);
                        last_error = None;
                    }
                    Ok(false) => {
                        *cluster.leader_until.lock() = None;
                        last_error = None;
                    }
                    Err(error) => {
                        // Keep the current term: it runs out by itself at leader_until.
                        if last_error.as_deref() != Some(error.as_str()) {
                            warn!(lease = %cluster.leader_lease, %error, "leader election failed; retrying");
                            last_error = Some(error);
                        }
                    }
                }
                let leader = cluster.is_leader();
                if leader != was_leader {
                    info!(identity = %cluster.identity, leader, "leadership changed");
                    was_leader = leader;
                }
                cluster.leader_gauge.set(leader as i64);
                tokio::time::sleep(period).await;
            }
        });
    }

    /// Returns Ok(true) when this replica holds the leader Lease after the call.
    async fn try_acquire_or_renew(&self) -> Result<bool, String> {
        let api = self.leases();
        let now = MicroTime(jiff::Timestamp::now());
        let duration_seconds = self.lease_duration.as_secs().max(1) as i32;
        let existing = api.get_opt(&self.leader_lease).await.map_err(|e| e.to_string())?;

        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.leader_lease.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration_seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(error.to_string()),
            };
        };

        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        if !ours && !holder.is_empty() && !lease_expired(spec) {
            return Ok(false);
        }
        if !ours {
            debug!(previous = %holder, "taking over the leader Lease");
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(duration_seconds);
        spec.renew_time = Some(now);
        // replace() sends metadata.resourceVersion, so a concurrent writer makes this a 409.
        match api.replace(&self.leader_lease, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error.to_string()),
        }
    }

    /// Stops leader election and gives the Lease up, so another replica takes over without
    /// waiting for it to expire.
    pub async fn release(&self) {
        self.stopped.store(true, Ordering::Release);
        if !self.is_leader() {
            return;
        }
        *self.leader_until.lock() = None;
        self.leader_gauge.set(0);
        let patch = serde_json::json!({ "spec": { "holderIdentity": null, "renewTime": null } });
        match self.leases().patch(&self.leader_lease, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => info!(identity = %self.identity, "released the leader Lease"),
            Err(error) => warn!(%error, "failed to release the leader Lease; it expires by itself"),
        }
    }
}

fn lease_expired(spec: &LeaseSpec) -> bool {
    let Some(renewed) = spec.renew_time.as_ref() else { return true };
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    let age = jiff::Timestamp::now().duration_since(renewed.0);
    age.as_secs() >= duration
}

/// The replica's default identity: POD_NAME from the downward API, else the host name.
fn default_identity() -> String {
    if let Ok(name) = std::env::var("POD_NAME") {
        if !name.trim().is_empty() {
            return name;
        }
    }
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most buffer.len() bytes into the buffer it is given.
    let result = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if result == 0 {
        let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
        if let Ok(name) = std::str::from_utf8(&buffer[..end]) {
            if !name.is_empty() {
                return name.to_string();
            }
        }
    }
    format!("coldgate-{}", std::process::id())
}
