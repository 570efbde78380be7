//! Watches that tell a service which pods can serve it.
//!
//! EndpointSlices (label `kubernetes.io/service-name`) are the source of truth for pod
//! addresses: an endpoint is offered to the service only when it is ready and not
//! terminating, and coldgate still probes it itself before sending traffic. Pods of the
//! Deployment are watched for containers stuck in back-off (CrashLoopBackOff,
//! ImagePullBackOff), so held requests fail at once instead of at their deadline.
//!
//! kube-runtime's watcher re-lists after errors and after `410 Gone`, with a short backoff; while
//! the API is unreachable the last known endpoints stay in use, so warm services keep
//! serving.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, ResourceExt};
use tracing::{debug, info, warn};

use crate::backend::EndpointEvents;
use crate::config::PortRef;

/// Container waiting reasons that mean the pod will not become ready without a change.
const STUCK_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// Retry delays of a failed watch: doubling from 250 ms to at most 3 s. kube-runtime's
/// default goes up to 30 s, which after an API outage would leave coldgate blind to new
/// pods for up to half a minute after the API is back.
struct WatchBackoff {
    next: Duration,
}

const WATCH_RETRY_START: Duration = Duration::from_millis(250);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(3);

impl WatchBackoff {
    fn new() -> Self {
        WatchBackoff { next: WATCH_RETRY_START }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(WATCH_RETRY_MAX);
        Some(delay)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = WATCH_RETRY_START;
    }
}

/// What the EndpointSlice watch last saw, shared with the scale-down check.
#[derive(Default)]
pub struct SliceView {
    /// Endpoints that are neither ready nor terminating: pods still starting.
    pub starting: AtomicUsize,
}

/// Watches the EndpointSlices of `k8s_service` and reports ready addresses.
pub fn watch_endpoint_slices(
    client: Client,
    namespace: String,
    k8s_service: String,
    port: PortRef,
    events: EndpointEvents,
    view: Arc<SliceView>,
) {
    tokio::spawn(async move {
        let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
        let selector = format!("kubernetes.io/service-name={k8s_service}");
        let mut stream = watcher::watcher(api, watcher::Config::default().labels(&selector))
            .backoff(WatchBackoff::new())
            .boxed();
        let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
        let mut relisting: Option<BTreeMap<String, EndpointSlice>> = None;
        let mut offered: BTreeSet<SocketAddr> = BTreeSet::new();
        let mut last_error: Option<String> = None;

        while let Some(item) = stream.next().await {
            match item {
                Ok(Event::Init) => relisting = Some(BTreeMap::new()),
                Ok(Event::InitApply(slice)) => {
                    if let Some(buffer) = relisting.as_mut() {
                        buffer.insert(slice.name_any(), slice);
                    }
                }
                Ok(Event::InitDone) => {
                    if let Some(buffer) = relisting.take() {
                        slices = buffer;
                    }
                    if last_error.take().is_some() {
                        info!(service = %k8s_service, namespace = %namespace, "EndpointSlice watch recovered");
                    }
                }
                Ok(Event::Apply(slice)) => {
                    slices.insert(slice.name_any(), slice);
                }
                Ok(Event::Delete(slice)) => {
                    slices.remove(&slice.name_any());
                }
                Err(error) => {
                    let message = error.to_string();
                    if last_error.as_deref() != Some(message.as_str()) {
                        warn!(service = %k8s_service, namespace = %namespace, error = %message, "EndpointSlice watch failed; retrying with backoff, last known endpoints stay in use");
                        last_error = Some(message);
                    }
                    continue;
                }
            }
            if relisting.is_some() {
                continue;
            }

            let (ready, starting) = ready_addresses(&slices, &port);
            view.starting.store(starting, Ordering::Release);
            for addr in offered.difference(&ready) {
                events.lost(*addr, format!("pod {addr} is no longer ready, or is terminating"));
            }
            for addr in ready.difference(&offered) {
                debug!(service = %k8s_service, endpoint = %addr, "ready endpoint in EndpointSlice");
                events.discovered(*addr);
            }
            offered = ready;
        }
    });
}

/// Returns the addresses of endpoints that are ready and not terminating, and how many
/// endpoints are still starting.
pub fn ready_addresses(slices: &BTreeMap<String, EndpointSlice>, port: &PortRef) -> (BTreeSet<SocketAddr>, usize) {
    let mut ready = BTreeSet::new();
    let mut starting = 0;
    for slice in slices.values() {
        let Some(port_number) = slice_port(slice, port) else { continue };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.as_ref();
            // The API defines a missing `ready` as true and a missing `terminating` as false.
            let is_ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            if terminating {
                continue;
            }
            if !is_ready {
                starting += 1;
                continue;
            }
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    ready.insert(SocketAddr::new(ip, port_number));
                }
            }
        }
    }
    (ready, starting)
}

fn slice_port(slice: &EndpointSlice, port: &PortRef) -> Option<u16> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    match port {
        PortRef::Number(number) => Some(*number),
        PortRef::Name(name) => ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok()),
    }
}

/// Watches the Deployment's pods and reports when every pod is stuck in back-off.
pub fn watch_pods(client: Client, namespace: String, deployment: String, events: EndpointEvents) {
    tokio::spawn(async move {
        let selector = loop {
            match deployment_selector(&client, &namespace, &deployment).await {
                Ok(selector) => break selector,
                Err(error) => {
                    debug!(deployment = %deployment, namespace = %namespace, %error, "cannot read the Deployment's selector yet");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        };
        let api: Api<Pod> = Api::namespaced(client, &namespace);
        let mut stream = watcher::watcher(api, watcher::Config::default().labels(&selector))
            .backoff(WatchBackoff::new())
            .boxed();
        let mut pods: HashMap<String, Pod> = HashMap::new();
        let mut relisting: Option<HashMap<String, Pod>> = None;
        let mut reported: Option<String> = None;

        while let Some(item) = stream.next().await {
            match item {
                Ok(Event::Init) => relisting = Some(HashMap::new()),
                Ok(Event::InitApply(pod)) => {
                    if let Some(buffer) = relisting.as_mut() {
                        buffer.insert(pod.name_any(), pod);
                    }
                }
                Ok(Event::InitDone) => {
                    if let Some(buffer) = relisting.take() {
                        pods = buffer;
                    }
                }
                Ok(Event::Apply(pod)) => {
                    pods.insert(pod.name_any(), pod);
                }
                Ok(Event::Delete(pod)) => {
                    pods.remove(&pod.name_any());
                }
                Err(_) => continue, // The EndpointSlice watch logs API trouble.
            }
            if relisting.is_some() {
                continue;
            }
            match all_pods_stuck(&pods) {
                Some(reason) if reported.as_deref() != Some(reason.as_str()) => {
                    events.start_failed(reason.clone());
                    reported = Some(reason);
                }
                Some(_) => {}
                None => reported = None,
            }
        }
    });
}

async fn deployment_selector(client: &Client, namespace: &str, deployment: &str) -> Result<String, kube::Error> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let deployment = api.get(deployment).await?;
    let labels = deployment
        .spec
        .and_then(|spec| spec.selector.match_labels)
        .unwrap_or_default();
    Ok(labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
}

/// Returns a description of the failure when at least one pod exists, none is ready, and
/// every pod that is not terminating has a container stuck in back-off.
pub fn all_pods_stuck(pods: &HashMap<String, Pod>) -> Option<String> {
    let live: Vec<&Pod> = pods.values().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
    if live.is_empty() {
        return None;
    }
    let mut first_reason = None;
    for pod in &live {
        let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.as_ref());
        let stuck = statuses.into_iter().flatten().find_map(|status| {
            let waiting = status.state.as_ref()?.waiting.as_ref()?;
            let reason = waiting.reason.as_deref()?;
            STUCK_REASONS.contains(&reason).then(|| {
                format!(
                    "pod {}: container {}: {}{} (restarts: {})",
                    pod.name_any(),
                    status.name,
                    reason,
                    waiting.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default(),
                    status.restart_count
                )
            })
        });
        match stuck {
            Some(reason) => {
                first_reason.get_or_insert(reason);
            }
            None => return None,
        }
    }
    first_reason
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateWaiting, ContainerStatus, PodStatus};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    fn slice(endpoints: Vec<(&str, Option<bool>, Option<bool>)>) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: endpoints
                .into_iter()
                .map(|(ip, ready, terminating)| Endpoint {
                    addresses: vec![ip.into()],
                    conditions: Some(EndpointConditions { ready, serving: ready, terminating }),
                    ..Default::default()
                })
                .collect(),
            ports: Some(vec![EndpointPort { name: Some("http".into()), port: Some(8080), ..Default::default() }]),
            ..Default::default()
        }
    }

    #[test]
    fn only_ready_non_terminating_endpoints_are_offered() {
        let mut slices = BTreeMap::new();
        slices.insert(
            "a".to_string(),
            slice(vec![
                ("10.0.0.1", Some(true), Some(false)),
                ("10.0.0.2", Some(false), Some(false)),
                ("10.0.0.3", Some(false), Some(true)),
                ("10.0.0.4", None, None),
            ]),
        );
        let (ready, starting) = ready_addresses(&slices, &PortRef::Name("http".into()));
        let ready: Vec<String> = ready.iter().map(|a| a.to_string()).collect();
        assert_eq!(ready, vec!["10.0.0.1:8080", "10.0.0.4:8080"]);
        assert_eq!(starting, 1);
    }

    #[test]
    fn unknown_port_name_offers_nothing() {
        let mut slices = BTreeMap::new();
        slices.insert("a".to_string(), slice(vec![("10.0.0.1", Some(true), None)]));
        let (ready, _) = ready_addresses(&slices, &PortRef::Name("grpc".into()));
        assert!(ready.is_empty());
        let (ready, _) = ready_addresses(&slices, &PortRef::Number(9000));
        assert_eq!(ready.iter().next().unwrap().port(), 9000);
    }

    fn pod(name: &str, waiting_reason: Option<&str>) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
            status: Some(PodStatus {
                container_statuses: Some(vec![ContainerStatus {
                    name: "model".into(),
                    restart_count: 3,
                    state: Some(ContainerState {
                        waiting: waiting_reason.map(|reason| ContainerStateWaiting {
                            reason: Some(reason.into()),
                            message: Some("back-off 40s restarting failed container".into()),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn stuck_only_when_every_pod_is_stuck() {
        let mut pods = HashMap::new();
        assert_eq!(all_pods_stuck(&pods), None);
        pods.insert("a".to_string(), pod("a", Some("CrashLoopBackOff")));
        let reason = all_pods_stuck(&pods).expect("one crash-looping pod");
        assert!(reason.contains("pod a") && reason.contains("CrashLoopBackOff") && reason.contains("restarts: 3"), "{reason}");
        pods.insert("b".to_string(), pod("b", Some("ContainerCreating")));
        assert_eq!(all_pods_stuck(&pods), None, "a pod still being created is not stuck");
    }
}
