//! The `kubernetes` backend: a Deployment scaled between 0 and `replicas` through its
//! `scale` subresource.
//!
//! coldgate owns only the move from zero and back to zero. Both writes are conditional JSON
//! patches (`test` the current replica count, then `replace` it), so coldgate never lowers
//! a count that an HPA, KEDA or a person raised, and replicas that race each other cannot
//! undo each other's work: at most one of them changes anything. Several coldgate
//! replicas record activity on a per-service Lease; only the elected leader scales to zero,
//! and only when that Lease shows no activity for `idle_timeout`.

pub mod cluster;
pub mod discovery;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use prometheus::IntCounterVec;
use tracing::{debug, info, warn};

use super::{Backend, BackendError, EndpointEvents, ScaleDown};
use crate::config::{format_duration, KubernetesServiceConfig, PortRef};
use cluster::{activity_lease_name, Cluster};
use discovery::SliceView;

/// Field manager and user agent name in coldgate's writes, visible in `managedFields`.
const FIELD_MANAGER: &str = "coldgate";
const RETRY_START: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

pub struct KubernetesBackend {
    cluster: Arc<Cluster>,
    service: String,
    namespace: String,
    deployment: String,
    k8s_service: String,
    port: PortRef,
    replicas: u32,
    /// Set on every request; the activity task turns it into a Lease renewal.
    active: Arc<AtomicBool>,
    slices: Arc<SliceView>,
    recorder: Recorder,
    api_errors: IntCounterVec,
}

impl KubernetesBackend {
    pub fn new(cluster: Arc<Cluster>, service: &str, config: &KubernetesServiceConfig, api_errors: IntCounterVec) -> Self {
        let namespace = config.namespace.clone().unwrap_or_else(|| cluster.default_namespace.clone());
        let recorder = Recorder::new(
            cluster.client.clone(),
            Reporter { controller: "coldgate".into(), instance: Some(cluster.identity.clone()) },
        );
        KubernetesBackend {
            service: service.to_string(),
            namespace,
            deployment: config.deployment.clone(),
            k8s_service: config.service.clone(),
            port: config.port.clone(),
            replicas: config.replicas,
            active: Arc::new(AtomicBool::new(false)),
            slices: Arc::new(SliceView::default()),
            recorder,
            api_errors,
            cluster,
        }
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.cluster.client.clone(), &self.namespace)
    }

    fn count_error(&self, operation: &str) {
        self.api_errors.with_label_values(&[self.service.as_str(), operation]).inc();
    }

    /// Reads spec.replicas from the scale subresource.
    async fn current_replicas(&self) -> Result<i32, kube::Error> {
        let scale = self.deployments().get_scale(&self.deployment).await?;
        Ok(scale.spec.and_then(|s| s.replicas).unwrap_or(0))
    }

    /// Sets replicas from `from` to `to` only if they are still `from`. Returns false when
    /// the count changed under us (the `test` operation failed).
    async fn conditional_scale(&self, from: i32, to: i32) -> Result<bool, kube::Error> {
        let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
            { "op": "test", "path": "/spec/replicas", "value": from },
            { "op": "replace", "path": "/spec/replicas", "value": to },
        ]))
        .expect("a static JSON patch is valid");
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        match self.deployments().patch_scale(&self.deployment, &params, &Patch::<()>::Json(patch)).await {
            Ok(_) => Ok(true),
            // A failed `test` comes back as 422 Invalid (and 409 on a write conflict):
            // both mean someone else changed the count first.
            Err(kube::Error::Api(status)) if status.code == 422 || status.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Turns an API error into a permanent refusal (403, 404) or `None` for retryable ones.
    fn refusal(&self, error: &kube::Error, verb: &str) -> Option<BackendError> {
        let kube::Error::Api(status) = error else { return None };
        let what = format!("deployments/{}/scale in namespace {}", self.deployment, self.namespace);
        match status.code {
            403 => Some(BackendError::Refused(format!(
                "the Kubernetes API forbids coldgate to {verb} {what}; grant the verb in coldgate's Role: {}",
                status.message
            ))),
            404 => Some(BackendError::Refused(format!(
                "{what} was not found; check [service.kubernetes] deployment and namespace: {}",
                status.message
            ))),
            _ => None,
        }
    }

    async fn publish_event(&self, reason: &str, note: String) {
        let reference = ObjectReference {
            api_version: Some("apps/v1".into()),
            kind: Some("Deployment".into()),
            name: Some(self.deployment.clone()),
            namespace: Some(self.namespace.clone()),
            ..Default::default()
        };
        let event = KubeEvent { type_: EventType::Normal, reason: reason.into(), note: Some(note), action: "Scale".into(), secondary: None };
        if let Err(error) = self.recorder.publish(&event, &reference).await {
            debug!(service = %self.service, %error, "failed to publish a Kubernetes Event");
        }
    }

    /// Renews the service's activity Lease every `activity_interval` while this replica has
    /// seen traffic or still holds or serves requests.
    fn start_activity_task(&self, events: EndpointEvents) {
        let active = self.active.clone();
        let leases = self.cluster.leases();
        let name = activity_lease_name(&self.service);
        let identity = self.cluster.identity.clone();
        let interval = self.cluster.activity_interval;
        let service = self.service.clone();
        let api_errors = self.api_errors.clone();
        tokio::spawn(async move {
            let mut last_error: Option<String> = None;
            loop {
                tokio::time::sleep(interval).await;
                let was_active = active.swap(false, Ordering::AcqRel);
                if !was_active && !events.is_busy() {
                    if events.is_closed() {
                        return;
                    }
                    continue;
                }
                match renew_activity(&leases, &name, &identity).await {
                    Ok(()) => last_error = None,
                    Err(error) => {
                        api_errors.with_label_values(&[service.as_str(), "activity_lease"]).inc();
                        // Try again next round rather than lose the activity.
                        active.store(true, Ordering::Release);
                        if last_error.as_deref() != Some(error.as_str()) {
                            warn!(service = %service, lease = %name, %error, "failed to record activity; retrying");
                            last_error = Some(error);
                        }
                    }
                }
            }
        });
    }
}

async fn renew_activity(leases: &Api<Lease>, name: &str, identity: &str) -> Result<(), String> {
    let now = MicroTime(jiff::Timestamp::now());
    let patch = serde_json::json!({ "spec": { "holderIdentity": identity, "renewTime": now } });
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    match leases.patch(name, &params, &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(name.to_string()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(identity.to_string()),
                    renew_time: Some(now),
                    ..Default::default()
                }),
            };
            match leases.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(()),
                // Another replica created it first; its renewTime is just as recent.
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
                Err(error) => Err(error.to_string()),
            }
        }
        Err(error) => Err(error.to_string()),
    }
}

#[async_trait]
impl Backend for KubernetesBackend {
    fn watch(&self, events: EndpointEvents) {
        let client = self.cluster.client.clone();
        discovery::watch_endpoint_slices(
            client.clone(),
            self.namespace.clone(),
            self.k8s_service.clone(),
            self.port.clone(),
            events.clone(),
            self.slices.clone(),
        );
        discovery::watch_pods(client, self.namespace.clone(), self.deployment.clone(), events.clone());
        self.start_activity_task(events);
    }

    async fn scale_up(&self, events: EndpointEvents) -> Result<(), BackendError> {
        let target = self.replicas as i32;
        let mut delay = RETRY_START;
        let mut last_logged: Option<String> = None;
        loop {
            let attempt = async {
                let current = self.current_replicas().await.map_err(|e| (e, "get"))?;
                if current > 0 {
                    return Ok(None);
                }
                self.conditional_scale(0, target).await.map_err(|e| (e, "patch")).map(Some)
            };
            match attempt.await {
                Ok(None) => {
                    debug!(service = %self.service, deployment = %self.deployment, "already scaled up");
                    return Ok(());
                }
                Ok(Some(true)) => {
                    info!(service = %self.service, deployment = %self.deployment, namespace = %self.namespace, replicas = target, "scaled up from zero");
                    self.publish_event("ScaledUpFromZero", format!("coldgate scaled {} from 0 to {target} replicas for held requests", self.deployment)).await;
                    return Ok(());
                }
                // The count changed between our read and our write: read it again.
                Ok(Some(false)) => continue,
                Err((error, verb)) => {
                    self.count_error("scale_up");
                    if let Some(refusal) = self.refusal(&error, verb) {
                        warn!(service = %self.service, error = %refusal, "scale-up refused");
                        return Err(refusal);
                    }
                    let message = format!("Kubernetes API error while scaling up {}: {error}", self.deployment);
                    if last_logged.as_deref() != Some(message.as_str()) {
                        warn!(service = %self.service, error = %message, retry_ms = delay.as_millis() as u64, "scale-up failed; retrying");
                        last_logged = Some(message.clone());
                    }
                    events.problem(message);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
    }

    async fn scale_down_check(&self, idle_timeout: Duration) -> Result<(), String> {
        if !self.cluster.is_leader() {
            return Err("this coldgate replica is not the leader".into());
        }
        let starting = self.slices.starting.load(Ordering::Acquire);
        if starting > 0 {
            return Err(format!("{starting} pod(s) still starting"));
        }
        let name = activity_lease_name(&self.service);
        let lease = self.cluster.leases().get_opt(&name).await.map_err(|e| {
            self.count_error("activity_lease");
            format!("failed to read activity Lease {name}: {e}")
        })?;
        let Some(spec) = lease.and_then(|l| l.spec) else { return Ok(()) };
        if let Some(renewed) = spec.renew_time {
            let age = jiff::Timestamp::now().duration_since(renewed.0);
            let age = Duration::from_secs_f64(age.as_secs_f64().max(0.0));
            if age < idle_timeout {
                return Err(format!(
                    "replica {} saw traffic {} ago (idle_timeout {})",
                    spec.holder_identity.unwrap_or_default(),
                    format_duration(age),
                    format_duration(idle_timeout)
                ));
            }
        }
        Ok(())
    }

    async fn scale_down(&self) -> Result<ScaleDown, BackendError> {
        let target = self.replicas as i32;
        let current = self.current_replicas().await.map_err(|e| {
            self.count_error("scale_down");
            BackendError::Api(format!("failed to read the scale of {}: {e}", self.deployment))
        })?;
        if current == 0 {
            return Ok(ScaleDown::Done);
        }
        if current != target {
            return Ok(ScaleDown::Skipped(format!(
                "{} has {current} replicas, not the {target} coldgate sets: an autoscaler or a person owns the count",
                self.deployment
            )));
        }
        match self.conditional_scale(target, 0).await {
            Ok(true) => {
                info!(service = %self.service, deployment = %self.deployment, namespace = %self.namespace, "scaled to zero");
                self.publish_event("ScaledToZero", format!("coldgate scaled {} from {target} to 0 replicas after idle_timeout", self.deployment)).await;
                Ok(ScaleDown::Done)
            }
            Ok(false) => Ok(ScaleDown::Skipped(format!("the replica count of {} changed during the scale-down", self.deployment))),
            Err(error) => {
                self.count_error("scale_down");
                Err(self.refusal(&error, "patch").unwrap_or_else(|| {
                    BackendError::Api(format!("failed to scale {} to zero: {error}", self.deployment))
                }))
            }
        }
    }

    fn record_activity(&self) {
        // A relaxed flag: the activity task reads it at most every activity_interval.
        if !self.active.load(Ordering::Relaxed) {
            self.active.store(true, Ordering::Relaxed);
        }
    }

    fn kind(&self) -> &'static str {
        "kubernetes"
    }
}
