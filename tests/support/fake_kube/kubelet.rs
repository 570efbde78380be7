//! The simulated kubelet and ReplicaSet controller: keeps the number of pods of each
//! deployment at spec.replicas, runs each pod as a real process, probes readiness,
//! and writes Pod, EndpointSlice and Deployment status objects.
//!
//! The controller task owns which pods exist. Each pod has its own task (in
//! `pod_run`) that owns every write to its Pod object and its endpoint, so the two
//! never race.

use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateWaiting, ContainerStatus, HostIP, ObjectReference, Pod,
    PodCondition, PodIP, PodSpec, PodStatus,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

use super::api::container_for;
use super::names::{new_uid, now_time, random_suffix, template_hash};
use super::pod_ips::{allocate_pod_ip, default_pod_ip_start, release_pod_ip};
use super::pod_run::{PodCommand, PodRun};
use super::process::{signal_group, ProcessSupervisor};
use super::resources::{meta_str, ResourceKind};
use super::status::ApiError;
use super::store::ObjectKey;
use super::{DeploymentSpec, Inner};

pub(super) type DeleteReply = oneshot::Sender<Result<Arc<Value>, ApiError>>;

pub(super) enum KubeletMessage {
    /// spec.replicas of a deployment may have changed.
    Reconcile(ObjectKey),
    /// A client deleted a pod through the API.
    DeletePod { pod: ObjectKey, reply: DeleteReply },
    /// A pod's process is gone and its objects are removed.
    PodGone {
        deployment: ObjectKey,
        pod: String,
        ip: Ipv4Addr,
    },
}

/// The handle the API layer and the test controls use to reach the kubelet.
pub(super) struct KubeletHandle {
    pub(super) messages: mpsc::UnboundedSender<KubeletMessage>,
    pub(super) processes: ProcessSupervisor,
    /// pid of the running process of each pod.
    pids: Mutex<HashMap<ObjectKey, i32>>,
}

impl KubeletHandle {
    pub(super) fn new() -> io::Result<(KubeletHandle, mpsc::UnboundedReceiver<KubeletMessage>)> {
        let (messages, receiver) = mpsc::unbounded_channel();
        let handle = KubeletHandle {
            messages,
            processes: ProcessSupervisor::new()?,
            pids: Mutex::new(HashMap::new()),
        };
        Ok((handle, receiver))
    }

    pub(super) fn pids(&self) -> MutexGuard<'_, HashMap<ObjectKey, i32>> {
        self.pids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn reconcile(&self, namespace: &str, deployment: &str) {
        let _ = self.messages.send(KubeletMessage::Reconcile((
            namespace.to_string(),
            deployment.to_string(),
        )));
    }

    /// Starts graceful deletion of a pod and returns it with deletionTimestamp set.
    pub(super) async fn delete_pod(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Arc<Value>, ApiError> {
        let (reply, response) = oneshot::channel();
        let pod = (namespace.to_string(), name.to_string());
        self.messages
            .send(KubeletMessage::DeletePod { pod, reply })
            .map_err(|_| {
                ApiError::injected(
                    503,
                    "delete",
                    Some(ResourceKind::Pod),
                    "pods",
                    name,
                    namespace,
                )
            })?;
        response
            .await
            .unwrap_or_else(|_| Err(ApiError::not_found(ResourceKind::Pod, name)))
    }

    pub(super) fn kill_process(&self, namespace: &str, pod: &str) -> Result<(), String> {
        let pid = self
            .pids()
            .get(&(namespace.to_string(), pod.to_string()))
            .copied();
        match pid {
            Some(pid) => {
                signal_group(pid, libc::SIGKILL);
                Ok(())
            }
            None => Err(format!("pod {namespace}/{pod} has no running process; check the name with FakeCluster::pods")),
        }
    }

    pub(super) fn kill_all_now(&self) {
        self.processes.kill_all_now();
    }

    pub(super) async fn kill_all_and_wait(&self, timeout: Duration) {
        self.processes.kill_all_and_wait(timeout).await;
    }
}

struct PodHandle {
    name: String,
    sequence: u64,
    terminating: bool,
    commands: mpsc::UnboundedSender<PodCommand>,
}

struct Controller {
    inner: Arc<Inner>,
    /// Pods of each deployment, oldest first.
    pods: HashMap<ObjectKey, Vec<PodHandle>>,
    /// uid of the (not stored) ReplicaSet named in each deployment's pods' ownerReferences.
    replica_set_uids: HashMap<ObjectKey, String>,
    tasks: JoinSet<()>,
    next_sequence: u64,
    ip_cursor: u32,
}

pub(super) fn spawn_controller(
    inner: Arc<Inner>,
    messages: mpsc::UnboundedReceiver<KubeletMessage>,
) -> JoinHandle<()> {
    let start = inner
        .options
        .pod_ip_start
        .unwrap_or_else(default_pod_ip_start);
    let controller = Controller {
        inner,
        pods: HashMap::new(),
        replica_set_uids: HashMap::new(),
        tasks: JoinSet::new(),
        next_sequence: 0,
        ip_cursor: u32::from(start),
    };
    tokio::spawn(controller.run(messages))
}

/// Name of the ReplicaSet a deployment's pods belong to.
pub(super) fn replica_set_name(namespace: &str, deployment: &str) -> String {
    format!(
        "{deployment}-{}",
        template_hash(&format!("{namespace}/{deployment}"))
    )
}

fn is_pod_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|condition| condition["type"] == "Ready" && condition["status"] == "True")
}

impl Controller {
    async fn run(mut self, mut messages: mpsc::UnboundedReceiver<KubeletMessage>) {
        loop {
            tokio::select! {
                message = messages.recv() => match message {
                    Some(message) => self.handle(message),
                    None => return,
                },
                Some(result) = self.tasks.join_next() => {
                    if let Err(error) = result {
                        if error.is_panic() {
                            tracing::error!(%error, "a simulated pod task panicked");
                        }
                    }
                }
            }
        }
    }

    fn handle(&mut self, message: KubeletMessage) {
        match message {
            KubeletMessage::Reconcile(deployment) => self.reconcile(&deployment),
            KubeletMessage::DeletePod { pod, reply } => self.delete_pod(pod, reply),
            KubeletMessage::PodGone {
                deployment,
                pod,
                ip,
            } => {
                release_pod_ip(ip);
                if let Some(pods) = self.pods.get_mut(&deployment) {
                    pods.retain(|handle| handle.name != pod);
                }
            }
        }
    }

    fn reconcile(&mut self, deployment: &ObjectKey) {
        let (namespace, name) = deployment;
        let (spec, desired) = {
            let store = self.inner.store();
            let Some(spec) = store.deployment_specs.get(deployment).cloned() else {
                return;
            };
            let desired = store
                .get(ResourceKind::Deployment, namespace, name)
                .and_then(|d| d["spec"]["replicas"].as_i64())
                .unwrap_or(0)
                .max(0) as usize;
            (spec, desired)
        };
        let active = self
            .pods
            .get(deployment)
            .map(|pods| pods.iter().filter(|p| !p.terminating).count())
            .unwrap_or(0);
        if active < desired {
            for _ in active..desired {
                self.create_pod(deployment, &spec);
            }
        } else if active > desired {
            self.scale_down(deployment, active - desired);
        }
        refresh_deployment_status(&self.inner, namespace, name);
    }

    /// Terminates `count` pods, choosing not-ready pods first and newer pods before
    /// older ones. This is part of the ReplicaSet controller's ranking of pods to
    /// delete, which also weighs scheduling, phase and restart counts.
    fn scale_down(&mut self, deployment: &ObjectKey, count: usize) {
        let namespace = &deployment.0;
        let readiness: HashMap<String, bool> = {
            let store = self.inner.store();
            store
                .list(ResourceKind::Pod, Some(namespace))
                .iter()
                .map(|pod| (meta_str(pod, "name").to_string(), is_pod_ready(pod)))
                .collect()
        };
        let Some(pods) = self.pods.get_mut(deployment) else {
            return;
        };
        let mut candidates: Vec<&mut PodHandle> =
            pods.iter_mut().filter(|p| !p.terminating).collect();
        candidates.sort_by_key(|handle| {
            let ready = readiness.get(&handle.name).copied().unwrap_or(false);
            (ready, std::cmp::Reverse(handle.sequence))
        });
        for handle in candidates.into_iter().take(count) {
            handle.terminating = true;
            let _ = handle.commands.send(PodCommand::Terminate { reply: None });
        }
    }

    fn delete_pod(&mut self, pod: ObjectKey, reply: DeleteReply) {
        let found = self.pods.iter_mut().find_map(|(deployment, pods)| {
            pods.iter_mut()
                .find(|handle| deployment.0 == pod.0 && handle.name == pod.1)
                .map(|handle| (deployment.clone(), handle))
        });
        let Some((deployment, handle)) = found else {
            let _ = reply.send(Err(ApiError::not_found(ResourceKind::Pod, &pod.1)));
            return;
        };
        if handle.terminating {
            let current = self.inner.store().get(ResourceKind::Pod, &pod.0, &pod.1);
            let _ =
                reply.send(current.ok_or_else(|| ApiError::not_found(ResourceKind::Pod, &pod.1)));
            return;
        }
        handle.terminating = true;
        if let Err(mpsc::error::SendError(PodCommand::Terminate { reply: Some(reply) })) = handle
            .commands
            .send(PodCommand::Terminate { reply: Some(reply) })
        {
            let _ = reply.send(Err(ApiError::not_found(ResourceKind::Pod, &pod.1)));
        }
        self.reconcile(&deployment);
    }

    fn create_pod(&mut self, deployment: &ObjectKey, spec: &DeploymentSpec) {
        let (namespace, deployment_name) = deployment;
        let Some(ip) = allocate_pod_ip(&mut self.ip_cursor, spec.template.port) else {
            tracing::error!(
                namespace = %namespace,
                deployment = %deployment_name,
                port = spec.template.port,
                "no free loopback pod IP found for the container port; the pod was not created"
            );
            return;
        };
        let replica_set = replica_set_name(namespace, deployment_name);
        let pod_name = format!("{replica_set}-{}", random_suffix(5));
        let replica_set_uid = self
            .replica_set_uids
            .entry(deployment.clone())
            .or_insert_with(new_uid)
            .clone();
        let pod = new_pod(
            &self.inner,
            spec,
            namespace,
            deployment_name,
            &pod_name,
            ip,
            &replica_set,
            &replica_set_uid,
        );
        let pod_value = serde_json::to_value(&pod).expect("Pod serializes");

        let stored = self.inner.store().create(ResourceKind::Pod, pod_value);
        let stored = match stored {
            Ok(stored) => stored,
            Err(error) => {
                tracing::error!(namespace = %namespace, pod = %pod_name, ?error, "storing a new pod failed");
                release_pod_ip(ip);
                return;
            }
        };
        let uid = meta_str(&stored, "uid").to_string();
        update_endpoints(&self.inner, namespace, &spec.service, |endpoints| {
            endpoints.push(new_endpoint(
                ip,
                namespace,
                &pod_name,
                &uid,
                &self.inner.options.node_name,
            ));
        });
        tracing::info!(namespace = %namespace, pod = %pod_name, %ip, "pod created");

        let (commands, command_receiver) = mpsc::unbounded_channel();
        self.next_sequence += 1;
        self.pods
            .entry(deployment.clone())
            .or_default()
            .push(PodHandle {
                name: pod_name.clone(),
                sequence: self.next_sequence,
                terminating: false,
                commands,
            });
        let run = PodRun {
            inner: self.inner.clone(),
            namespace: namespace.clone(),
            name: pod_name,
            deployment: deployment_name.clone(),
            service: spec.service.clone(),
            ip,
            template: spec.template.clone(),
            commands: command_receiver,
            restart_count: 0,
        };
        self.tasks.spawn(run.run());
    }
}

#[allow(clippy::too_many_arguments)]
fn new_pod(
    inner: &Inner,
    spec: &DeploymentSpec,
    namespace: &str,
    deployment: &str,
    pod_name: &str,
    ip: Ipv4Addr,
    replica_set: &str,
    replica_set_uid: &str,
) -> Pod {
    let mut labels = if spec.labels.is_empty() {
        std::collections::BTreeMap::from([("app".to_string(), deployment.to_string())])
    } else {
        spec.labels.clone()
    };
    labels.insert(
        "pod-template-hash".to_string(),
        replica_set
            .rsplit('-')
            .next()
            .unwrap_or_default()
            .to_string(),
    );
    let now = now_time();
    let container = container_for(spec);
    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name.to_string()),
            generate_name: Some(format!("{replica_set}-")),
            namespace: Some(namespace.to_string()),
            labels: Some(labels),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".to_string(),
                kind: "ReplicaSet".to_string(),
                name: replica_set.to_string(),
                uid: replica_set_uid.to_string(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![container.clone()],
            node_name: Some(inner.options.node_name.clone()),
            restart_policy: Some("Always".to_string()),
            termination_grace_period_seconds: Some(
                spec.template.termination_grace_period.as_secs_f64().ceil() as i64,
            ),
            dns_policy: Some("ClusterFirst".to_string()),
            scheduler_name: Some("default-scheduler".to_string()),
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Pending".to_string()),
            conditions: Some(vec![
                condition("PodReadyToStartContainers", true, None, &now),
                condition("Initialized", true, None, &now),
                condition("Ready", false, Some(&spec.template.container_name), &now),
                condition(
                    "ContainersReady",
                    false,
                    Some(&spec.template.container_name),
                    &now,
                ),
                condition("PodScheduled", true, None, &now),
            ]),
            container_statuses: Some(vec![ContainerStatus {
                name: spec.template.container_name.clone(),
                image: spec.template.image.clone(),
                image_id: String::new(),
                ready: false,
                restart_count: 0,
                started: Some(false),
                state: Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some("ContainerCreating".to_string()),
                        message: None,
                    }),
                    ..ContainerState::default()
                }),
                ..ContainerStatus::default()
            }]),
            host_ip: Some("127.0.0.1".to_string()),
            host_ips: Some(vec![HostIP {
                ip: "127.0.0.1".to_string(),
            }]),
            pod_ip: Some(ip.to_string()),
            pod_ips: Some(vec![PodIP { ip: ip.to_string() }]),
            qos_class: Some("BestEffort".to_string()),
            start_time: Some(now),
            ..PodStatus::default()
        }),
    }
}

/// Builds a pod condition. A false Ready or ContainersReady condition names the
/// container that is not ready, as the kubelet's message does.
fn condition(
    type_: &str,
    status: bool,
    unready_container: Option<&str>,
    now: &Time,
) -> PodCondition {
    let (reason, message) = match unready_container {
        Some(container) if !status => (
            Some("ContainersNotReady".to_string()),
            Some(format!("containers with unready status: [{container}]")),
        ),
        _ => (None, None),
    };
    PodCondition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        last_transition_time: Some(now.clone()),
        reason,
        message,
        ..PodCondition::default()
    }
}

fn new_endpoint(ip: Ipv4Addr, namespace: &str, pod: &str, uid: &str, node: &str) -> Endpoint {
    Endpoint {
        addresses: vec![ip.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(false),
            serving: Some(false),
            terminating: Some(false),
        }),
        node_name: Some(node.to_string()),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".to_string()),
            name: Some(pod.to_string()),
            namespace: Some(namespace.to_string()),
            uid: Some(uid.to_string()),
            ..ObjectReference::default()
        }),
        ..Endpoint::default()
    }
}

/// Changes the endpoint list of a service's EndpointSlice under the store lock.
pub(super) fn update_endpoints(
    inner: &Inner,
    namespace: &str,
    service: &str,
    change: impl FnOnce(&mut Vec<Endpoint>),
) {
    let mut store = inner.store();
    let Some(slice_name) = store
        .slice_names
        .get(&(namespace.to_string(), service.to_string()))
        .cloned()
    else {
        return;
    };
    let Some(current) = store.get(ResourceKind::EndpointSlice, namespace, &slice_name) else {
        return;
    };
    let mut slice: EndpointSlice =
        serde_json::from_value((*current).clone()).expect("stored EndpointSlice decodes");
    change(&mut slice.endpoints);
    let value = serde_json::to_value(&slice).expect("EndpointSlice serializes");
    if let Err(error) = store.replace(ResourceKind::EndpointSlice, value, None) {
        tracing::error!(
            namespace,
            service,
            ?error,
            "updating an EndpointSlice failed"
        );
    }
}

/// Sets the conditions of one pod's endpoint.
pub(super) fn set_endpoint_conditions(
    inner: &Inner,
    namespace: &str,
    service: &str,
    pod: &str,
    ready: bool,
    serving: bool,
    terminating: bool,
) {
    update_endpoints(inner, namespace, service, |endpoints| {
        for endpoint in endpoints.iter_mut() {
            let names_pod =
                endpoint.target_ref.as_ref().and_then(|r| r.name.as_deref()) == Some(pod);
            if names_pod {
                endpoint.conditions = Some(EndpointConditions {
                    ready: Some(ready),
                    serving: Some(serving),
                    terminating: Some(terminating),
                });
            }
        }
    });
}

/// Changes a stored Pod under the store lock and returns the stored result.
pub(super) fn update_pod(
    inner: &Inner,
    namespace: &str,
    name: &str,
    change: impl FnOnce(&mut Pod),
) -> Option<Arc<Value>> {
    let mut store = inner.store();
    let current = store.get(ResourceKind::Pod, namespace, name)?;
    let mut pod: Pod = serde_json::from_value((*current).clone()).expect("stored Pod decodes");
    change(&mut pod);
    let value = serde_json::to_value(&pod).expect("Pod serializes");
    match store.replace(ResourceKind::Pod, value, None) {
        Ok((stored, _)) => Some(stored),
        Err(error) => {
            tracing::error!(namespace, pod = name, ?error, "updating a pod failed");
            None
        }
    }
}

/// Sets one pod condition, keeping lastTransitionTime when the status is unchanged.
pub(super) fn set_condition(pod: &mut Pod, type_: &str, status: bool, container: &str) {
    let Some(conditions) = pod.status.as_mut().and_then(|s| s.conditions.as_mut()) else {
        return;
    };
    let now = now_time();
    let unready = (type_ == "Ready" || type_ == "ContainersReady").then_some(container);
    let replacement = condition(type_, status, unready, &now);
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) if existing.status == replacement.status => {}
        Some(existing) => *existing = replacement,
        None => conditions.push(replacement),
    }
}

pub(super) fn container_status(pod: &mut Pod) -> Option<&mut ContainerStatus> {
    pod.status
        .as_mut()?
        .container_statuses
        .as_mut()?
        .first_mut()
}

/// Recomputes a deployment's status from its pods, the way the deployment
/// controller reports it. Terminating pods do not count.
pub(super) fn refresh_deployment_status(inner: &Inner, namespace: &str, name: &str) {
    let mut store = inner.store();
    let Some(current) = store.get(ResourceKind::Deployment, namespace, name) else {
        return;
    };
    let replica_set = replica_set_name(namespace, name);
    let pods: Vec<Arc<Value>> = store
        .list(ResourceKind::Pod, Some(namespace))
        .into_iter()
        .filter(|pod| {
            pod["metadata"]["ownerReferences"][0]["name"] == replica_set.as_str()
                && pod["metadata"].get("deletionTimestamp").is_none()
        })
        .collect();
    let desired = current["spec"]["replicas"].as_i64().unwrap_or(1) as i32;
    let replicas = pods.len() as i32;
    let ready = pods.iter().filter(|pod| is_pod_ready(pod)).count() as i32;
    // With the default maxUnavailable of 25% (rounded down), this many pods must be
    // available for the Available condition.
    let minimum_available = desired - desired / 4;
    let available_ok = ready >= minimum_available;
    let complete = replicas == desired && ready == desired;

    let previous: Option<DeploymentStatus> = current
        .get("status")
        .and_then(|status| serde_json::from_value(status.clone()).ok());
    let previous_conditions = previous
        .and_then(|status| status.conditions)
        .unwrap_or_default();
    let keep_times = |type_: &str, status: &str, reason: &str, message: String| {
        let now = now_time();
        match previous_conditions.iter().find(|c| c.type_ == type_) {
            Some(old) if old.status == status && old.reason.as_deref() == Some(reason) => {
                DeploymentCondition {
                    message: Some(message),
                    ..old.clone()
                }
            }
            _ => DeploymentCondition {
                type_: type_.to_string(),
                status: status.to_string(),
                reason: Some(reason.to_string()),
                message: Some(message),
                last_update_time: Some(now.clone()),
                last_transition_time: Some(now),
            },
        }
    };
    let available = if available_ok {
        keep_times(
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.".to_string(),
        )
    } else {
        keep_times(
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.".to_string(),
        )
    };
    let progressing = if complete {
        keep_times(
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{replica_set}\" has successfully progressed."),
        )
    } else {
        keep_times(
            "Progressing",
            "True",
            "ReplicaSetUpdated",
            format!("ReplicaSet \"{replica_set}\" is progressing."),
        )
    };
    let positive = |n: i32| (n > 0).then_some(n);
    let status = DeploymentStatus {
        observed_generation: current["metadata"]["generation"].as_i64(),
        replicas: positive(replicas),
        updated_replicas: positive(replicas),
        ready_replicas: positive(ready),
        available_replicas: positive(ready),
        unavailable_replicas: positive(desired - ready),
        conditions: Some(vec![available, progressing]),
        ..DeploymentStatus::default()
    };
    let mut object = (*current).clone();
    object["status"] = serde_json::to_value(&status).expect("DeploymentStatus serializes");
    if let Err(error) = store.replace(ResourceKind::Deployment, object, None) {
        tracing::error!(
            namespace,
            deployment = name,
            ?error,
            "updating deployment status failed"
        );
    }
}
