//! A fake Kubernetes API server with a simulated kubelet, for tests of coldgate's
//! Kubernetes backend.
//!
//! The API server speaks plain HTTP/1.1 on a loopback address and serves the subset
//! coldgate uses: Deployments with the `scale` subresource, EndpointSlices, Pods,
//! Leases and Events, plus the discovery documents kubectl needs. Objects are
//! encoded with the k8s-openapi types, errors are metav1.Status bodies, and
//! resourceVersion is one cluster-wide counter, as with etcd.
//!
//! The simulated kubelet runs each pod as a real local process on its own loopback
//! IP (127.x.y.z), probes its readiness path over HTTP, and keeps the Pod objects,
//! the service's EndpointSlice and the Deployment status up to date.
//!
//! Test controls are plain methods on [`FakeCluster`]. Dropping the cluster kills
//! every pod process.
//!
//! # Differences from a real API server
//!
//! - One resourceVersion counter and one bounded history serve every resource. A
//!   watch from a resourceVersion ahead of the store waits for it instead of failing
//!   with "Too large resource version". LIST ignores `limit`, `continue` and
//!   `resourceVersionMatch` and always returns the current state, with apiVersion and
//!   kind on every item.
//! - A watch without `timeoutSeconds` stays open until the client leaves,
//!   `close_watches`, or `stop_api`; kube-apiserver closes it after 30 to 60 minutes.
//! - Strategic merge patches and apply patches are applied as JSON merge patches:
//!   lists are replaced rather than merged by key, and apply patches must be JSON and
//!   get no field ownership or conflict checks. There are no managedFields,
//!   `fieldValidation` is ignored (unknown fields are dropped), and `dryRun` is
//!   rejected with 400.
//! - There is no authentication or authorization; 403 comes only from injected faults.
//! - Deployments come only from `add_deployment` (POST and DELETE get 405). No
//!   ReplicaSet objects exist, status is not a served subresource, and pods run the
//!   [`PodTemplate`] rather than spec.template, so template changes start no rollout.
//! - Pods get their IP at creation instead of when the sandbox starts, have one
//!   container, ignore DELETE options such as gracePeriodSeconds, and have no log,
//!   exec or status subresources. Controllers and the kubelet post no Events.
//! - Each service has exactly one EndpointSlice and no Service object. A terminating
//!   endpoint has serving=false, while kube-controller-manager keeps serving equal
//!   to the pod's readiness until the pod is gone.
//! - Namespaces are not objects: any name works and /api/v1/namespaces is 404.
//!   Events never expire and are not validated, and neither are Leases.
//! - Only legacy discovery, JSON bodies and plain HTTP/1.1 are served;
//!   /openapi/v2 and /openapi/v3 are 404.

mod api;
mod discovery;
mod kubelet;
mod names;
mod patch;
mod pod_ips;
mod pod_run;
mod process;
mod resources;
mod selector;
mod server;
mod status;
mod store;
mod table;
mod watch;

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event as EventsEvent;
use serde::de::DeserializeOwned;
use tokio::sync::watch as watch_channel;

pub use patch::PatchType;

use resources::ResourceKind;
use store::Store;

/// Settings of a fake cluster. `Default` suits tests: short backoffs, 1 s bookmarks.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Address of the API server. It must be a loopback address, and port 0 picks a free port.
    pub listen_addr: SocketAddr,
    /// Number of changes kept for watches to replay. A watch from an older
    /// resourceVersion gets a 410 Expired ERROR event.
    pub watch_history: usize,
    /// Period of BOOKMARK events on watches that request them.
    pub bookmark_interval: Duration,
    /// Delay before the first restart of a crashed container. It doubles with each restart.
    pub crash_backoff_initial: Duration,
    /// Maximum restart delay.
    pub crash_backoff_max: Duration,
    /// A container that ran this long before it exited starts again from the initial delay.
    pub crash_backoff_reset: Duration,
    /// First pod IP to try. The default derives a 127.x.y.1 block from the process id,
    /// so that test processes running in parallel rarely pick the same addresses.
    pub pod_ip_start: Option<Ipv4Addr>,
    /// Directory for pod output (`<namespace>_<pod>.log`, stdout and stderr, kept
    /// across restarts). Without it, pod output is discarded.
    pub pod_log_dir: Option<PathBuf>,
    /// spec.nodeName of every pod and nodeName of every endpoint.
    pub node_name: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            listen_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            watch_history: 1000,
            bookmark_interval: Duration::from_secs(1),
            crash_backoff_initial: Duration::from_millis(10),
            crash_backoff_max: Duration::from_secs(5),
            crash_backoff_reset: Duration::from_secs(10),
            pod_ip_start: None,
            pod_log_dir: None,
            node_name: "fakekube-node".to_string(),
        }
    }
}

/// Recipe the simulated kubelet follows to run each pod of a deployment.
///
/// In `program`, `args` and `env` values, `{ip}`, `{port}`, `{pod}` and
/// `{namespace}` are replaced by the pod IP, the container port, the pod name and
/// its namespace.
#[derive(Clone, Debug)]
pub struct PodTemplate {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub container_name: String,
    /// Image shown in the Pod and Deployment specs. Nothing is pulled.
    pub image: String,
    /// Container port the process listens on, at the pod IP.
    pub port: u16,
    /// Name of the container port and of the EndpointSlice port.
    pub port_name: String,
    /// HTTP path of the readiness probe. A response status from 200 to 399 makes the
    /// pod ready, as with the kubelet's HTTP probe.
    pub readiness_path: String,
    pub probe_period: Duration,
    pub probe_timeout: Duration,
    /// Consecutive failed probes after which a ready pod turns not ready.
    pub readiness_failure_threshold: u32,
    /// Time between SIGTERM and SIGKILL when a pod is deleted.
    pub termination_grace_period: Duration,
    /// Time a new pod spends in ContainerCreating before its process starts.
    pub container_create_delay: Duration,
}

impl PodTemplate {
    /// Returns a template running `program` with `args`, listening on port 8080
    /// (named "http") with readiness path /healthz probed every 100 ms.
    pub fn new(
        program: impl Into<PathBuf>,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        PodTemplate {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            container_name: "main".to_string(),
            image: "fakekube.local/process:latest".to_string(),
            port: 8080,
            port_name: "http".to_string(),
            readiness_path: "/healthz".to_string(),
            probe_period: Duration::from_millis(100),
            probe_timeout: Duration::from_secs(1),
            readiness_failure_threshold: 3,
            termination_grace_period: Duration::from_secs(5),
            container_create_delay: Duration::ZERO,
        }
    }
}

/// A deployment added through [`FakeCluster::add_deployment`].
#[derive(Clone, Debug)]
pub struct DeploymentSpec {
    pub replicas: i32,
    pub template: PodTemplate,
    /// Service whose EndpointSlice lists the pods.
    pub service: String,
    /// Selector and pod labels. Empty means `app=<deployment name>`.
    pub labels: BTreeMap<String, String>,
}

/// An API verb, as in RBAC rules and audit logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    /// Matches every verb in a [`Fault`].
    Any,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::Any => "*",
        }
    }
}

/// Path by which a write changed spec.replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteVia {
    ScalePatch,
    ScalePut,
    DeploymentPatch,
    DeploymentPut,
    /// [`FakeCluster::set_replicas`].
    TestControl,
}

/// One successful write of spec.replicas of a deployment.
#[derive(Clone, Debug)]
pub struct ScaleWrite {
    pub from: i32,
    pub to: i32,
    pub via: WriteVia,
    pub patch_type: Option<PatchType>,
    /// The `fieldManager` query parameter of the request.
    pub field_manager: Option<String>,
    /// The User-Agent header of the request.
    pub user_agent: Option<String>,
    /// The field manager, else the User-Agent, else the writer label of a test control.
    pub client: String,
    /// resourceVersion of the deployment after the write (unchanged when from == to).
    pub resource_version: String,
    pub at: Instant,
}

/// Makes the next `count` requests that match `verb` and `resource` fail with `status`.
///
/// `resource` is the plural resource with an optional subresource, for example
/// "deployments/scale", "leases" or "endpointslices", or "*" for all.
#[derive(Clone, Debug)]
pub struct Fault {
    pub verb: Verb,
    pub resource: String,
    /// 403, 404, 409, 429, 500 and 503 get the reason and message of the real error;
    /// other codes get the API server's generic message.
    pub status: u16,
    pub count: u32,
}

/// One API request, for assertions about what a client sent.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub query: String,
    pub user_agent: Option<String>,
    pub status: u16,
    pub at: Instant,
}

/// State shared by the API server, the watches and the kubelet.
struct Inner {
    options: ClusterOptions,
    store: Mutex<Store>,
    /// Latest resourceVersion. Watches wake up on every change.
    resource_version_rx: watch_channel::Receiver<u64>,
    /// Generation bumped by `close_watches` and `stop_api`. Open watch streams end when it changes.
    close_watches: watch_channel::Sender<u64>,
    kubelet: kubelet::KubeletHandle,
}

impl Inner {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A running fake cluster: API server plus simulated kubelet.
pub struct FakeCluster {
    inner: Arc<Inner>,
    server: server::ApiServer,
    kubelet_task: tokio::task::JoinHandle<()>,
}

impl FakeCluster {
    /// Starts the API server and the kubelet. Must be called within a tokio runtime.
    pub async fn start(options: ClusterOptions) -> io::Result<FakeCluster> {
        if !options.listen_addr.ip().is_loopback() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "fake API server address {} is not a loopback address; use 127.0.0.1:0 or another 127.x.y.z address",
                    options.listen_addr
                ),
            ));
        }
        let (resource_version_tx, resource_version_rx) = watch_channel::channel(1);
        let (close_watches, _) = watch_channel::channel(0);
        let (kubelet, kubelet_rx) = kubelet::KubeletHandle::new()?;
        let inner = Arc::new(Inner {
            store: Mutex::new(Store::new(options.watch_history, resource_version_tx)),
            options,
            resource_version_rx,
            close_watches,
            kubelet,
        });
        let kubelet_task = kubelet::spawn_controller(inner.clone(), kubelet_rx);
        let server = server::ApiServer::start(inner.clone(), inner.options.listen_addr).await?;
        tracing::info!(addr = %server.addr(), "fake Kubernetes API server started");
        Ok(FakeCluster {
            inner,
            server,
            kubelet_task,
        })
    }

    /// Returns the address of the API server, which stays the same across `stop_api` and `start_api`.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Base URL of the API server, for example "http://127.0.0.1:38427".
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Creates a Deployment, its service's EndpointSlice, and `spec.replicas` pods.
    pub fn add_deployment(
        &self,
        namespace: &str,
        name: &str,
        spec: DeploymentSpec,
    ) -> Result<(), String> {
        api::add_deployment(&self.inner, namespace, name, spec).map_err(|error| {
            format!(
                "adding deployment {namespace}/{name} failed: {}",
                error.status.message.unwrap_or_default()
            )
        })
    }

    /// Returns spec.replicas of a deployment, or None if it does not exist.
    pub fn replicas(&self, namespace: &str, name: &str) -> Option<i32> {
        let deployment = self.deployment(namespace, name)?;
        Some(deployment.spec.and_then(|spec| spec.replicas).unwrap_or(1))
    }

    /// Sets spec.replicas like an autoscaler would, recorded as a TestControl write
    /// by `writer`.
    pub fn set_replicas(
        &self,
        namespace: &str,
        name: &str,
        replicas: i32,
        writer: &str,
    ) -> Result<(), String> {
        api::set_replicas(&self.inner, namespace, name, replicas, writer).map_err(|error| {
            format!(
                "setting replicas of {namespace}/{name} to {replicas} failed: {}",
                error.status.message.unwrap_or_default()
            )
        })
    }

    /// Returns every recorded write of spec.replicas of a deployment, oldest first.
    ///
    /// Writes through the scale subresource and `set_replicas` are recorded even when
    /// they leave the value unchanged. Deployment PUT and PATCH are recorded when
    /// they change it.
    pub fn scale_writes(&self, namespace: &str, name: &str) -> Vec<ScaleWrite> {
        let key = (namespace.to_string(), name.to_string());
        self.inner
            .store()
            .scale_writes
            .iter()
            .filter(|(write_key, _)| *write_key == key)
            .map(|(_, write)| write.clone())
            .collect()
    }

    pub fn deployment(&self, namespace: &str, name: &str) -> Option<Deployment> {
        self.typed(ResourceKind::Deployment, namespace, name)
    }

    pub fn lease(&self, namespace: &str, name: &str) -> Option<Lease> {
        self.typed(ResourceKind::Lease, namespace, name)
    }

    /// Returns the pods of a namespace, ordered by name.
    pub fn pods(&self, namespace: &str) -> Vec<Pod> {
        self.typed_list(ResourceKind::Pod, Some(namespace))
    }

    /// Returns the EndpointSlice of a service, if a deployment names that service.
    pub fn endpoint_slice(&self, namespace: &str, service: &str) -> Option<EndpointSlice> {
        let name = self
            .inner
            .store()
            .slice_names
            .get(&(namespace.to_string(), service.to_string()))?
            .clone();
        self.typed(ResourceKind::EndpointSlice, namespace, &name)
    }

    /// Returns the addresses of the ready endpoints of a service.
    pub fn ready_addresses(&self, namespace: &str, service: &str) -> Vec<String> {
        let Some(slice) = self.endpoint_slice(namespace, service) else {
            return Vec::new();
        };
        slice
            .endpoints
            .into_iter()
            .filter(|endpoint| endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(true))
            .flat_map(|endpoint| endpoint.addresses)
            .collect()
    }

    /// Waits until a service has `count` ready endpoints, polling every 10 ms.
    pub async fn wait_for_ready_addresses(
        &self,
        namespace: &str,
        service: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<String>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let ready = self.ready_addresses(namespace, service);
            if ready.len() == count {
                return Ok(ready);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "service {namespace}/{service} has {} ready endpoints {ready:?} after {timeout:?}, expected {count}",
                    ready.len()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Returns every Event posted through either events API, in the
    /// events.k8s.io/v1 form, ordered by their last write.
    pub fn events(&self) -> Vec<EventsEvent> {
        let mut stored = self.inner.store().list(ResourceKind::CoreEvent, None);
        stored.sort_by_key(|object| last_write(object));
        stored
            .iter()
            .map(|object| ResourceKind::EventsEvent.stored_to_view(object))
            .filter_map(|object| serde_json::from_value((*object).clone()).ok())
            .collect()
    }

    /// Returns every Event in the core/v1 form, ordered by their last write.
    pub fn core_events(&self) -> Vec<CoreEvent> {
        let mut stored = self.inner.store().list(ResourceKind::CoreEvent, None);
        stored.sort_by_key(|object| last_write(object));
        stored
            .iter()
            .filter_map(|object| serde_json::from_value((**object).clone()).ok())
            .collect()
    }

    /// Returns the API requests received so far (the newest 10,000), oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.inner.store().requests.iter().cloned().collect()
    }

    /// Returns the current cluster-wide resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.store().resource_version()
    }

    /// Closes the API listener and every open connection, including watches. The
    /// kubelet and the pods keep running.
    pub async fn stop_api(&self) {
        self.server.stop().await;
        self.inner
            .close_watches
            .send_modify(|generation| *generation += 1);
    }

    /// Listens again on the same address after `stop_api`.
    pub async fn start_api(&self) -> io::Result<()> {
        self.server.restart(self.inner.clone()).await
    }

    /// Ends every open watch stream cleanly, as a server-side watch timeout does.
    pub fn close_watches(&self) {
        self.inner
            .close_watches
            .send_modify(|generation| *generation += 1);
    }

    /// Drops the retained watch history, so a watch from any resourceVersion handed
    /// out so far gets a 410 Expired ERROR event. Open watches keep running, so call
    /// `close_watches` to make their clients reconnect.
    pub fn expire_watch_history(&self) {
        self.inner.store().expire_history();
    }

    /// Makes matching requests fail, as [`Fault`] describes.
    pub fn inject_failures(&self, fault: Fault) {
        self.inner.store().faults.push(fault);
    }

    /// Sends SIGKILL to a pod's process, as an out-of-memory kill would. The kubelet
    /// then restarts it with crash-loop backoff.
    pub fn kill_pod_process(&self, namespace: &str, pod: &str) -> Result<(), String> {
        self.inner.kubelet.kill_process(namespace, pod)
    }

    /// Stops the API server and kills every pod process, waiting until they are gone.
    pub async fn shutdown(&self) {
        self.server.stop().await;
        self.inner
            .close_watches
            .send_modify(|generation| *generation += 1);
        self.kubelet_task.abort();
        self.inner
            .kubelet
            .kill_all_and_wait(Duration::from_secs(5))
            .await;
    }

    fn typed<T: DeserializeOwned>(
        &self,
        kind: ResourceKind,
        namespace: &str,
        name: &str,
    ) -> Option<T> {
        let object = self.inner.store().get(kind, namespace, name)?;
        serde_json::from_value((*object).clone()).ok()
    }

    fn typed_list<T: DeserializeOwned>(
        &self,
        kind: ResourceKind,
        namespace: Option<&str>,
    ) -> Vec<T> {
        let objects = self.inner.store().list(kind, namespace);
        objects
            .iter()
            .filter_map(|object| serde_json::from_value((**object).clone()).ok())
            .collect()
    }
}

fn last_write(object: &serde_json::Value) -> u64 {
    resources::meta_str(object, "resourceVersion")
        .parse()
        .unwrap_or(0)
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        self.server.abort();
        self.kubelet_task.abort();
        self.inner.kubelet.kill_all_now();
    }
}
