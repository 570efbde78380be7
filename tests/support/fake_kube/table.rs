//! Server-side printing: meta.k8s.io/v1 Table responses for clients that send
//! `Accept: application/json;as=Table;...`, as `kubectl get` does. The columns
//! follow kube-apiserver's printers for these kinds.

use std::sync::Arc;

use serde_json::{json, Value};

use super::names::{human_duration, seconds_since};
use super::resources::{meta_str, ResourceKind};

/// Contents of each row's `object` field (the includeObject query parameter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub(super) fn parse(value: Option<&str>) -> IncludeObject {
        match value {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

/// Returns whether an Accept header requests a Table.
pub(super) fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.split(';').any(|param| param.trim() == "as=Table"))
}

fn column(name: &str, type_: &str, format: &str, priority: i32, description: &str) -> Value {
    json!({"name": name, "type": type_, "format": format, "description": description, "priority": priority})
}

fn columns(kind: ResourceKind) -> Vec<Value> {
    let name = column(
        "Name",
        "string",
        "name",
        0,
        "Name of the object, unique within its namespace.",
    );
    let age = column("Age", "string", "", 0, "Time since the object was created.");
    match kind {
        ResourceKind::Deployment => vec![
            name,
            column(
                "Ready",
                "string",
                "",
                0,
                "Ready pods out of the desired replicas.",
            ),
            column(
                "Up-to-date",
                "integer",
                "",
                0,
                "Pods that run the current pod template.",
            ),
            column(
                "Available",
                "integer",
                "",
                0,
                "Pods that are available to serve.",
            ),
            age,
            column(
                "Containers",
                "string",
                "",
                1,
                "Container names in the pod template.",
            ),
            column(
                "Images",
                "string",
                "",
                1,
                "Container images in the pod template.",
            ),
            column("Selector", "string", "", 1, "Label selector of the pods."),
        ],
        ResourceKind::Pod => vec![
            name,
            column(
                "Ready",
                "string",
                "",
                0,
                "Ready containers out of all containers.",
            ),
            column(
                "Status",
                "string",
                "",
                0,
                "Phase, or the reason the pod is not running.",
            ),
            column("Restarts", "string", "", 0, "Container restarts."),
            age,
            column("IP", "string", "", 1, "Pod IP address."),
            column("Node", "string", "", 1, "Node the pod runs on."),
            column(
                "Nominated Node",
                "string",
                "",
                1,
                "Node nominated by preemption.",
            ),
            column("Readiness Gates", "string", "", 1, "Pod readiness gates."),
        ],
        ResourceKind::EndpointSlice => vec![
            name,
            column(
                "AddressType",
                "string",
                "",
                0,
                "Address type of the endpoints.",
            ),
            column("Ports", "string", "", 0, "Ports of the endpoints."),
            column("Endpoints", "string", "", 0, "Endpoint addresses."),
            age,
        ],
        ResourceKind::Lease => vec![
            name,
            column("Holder", "string", "", 0, "Current holder of the lease."),
            age,
        ],
        ResourceKind::CoreEvent | ResourceKind::EventsEvent => vec![
            column(
                "Last Seen",
                "string",
                "",
                0,
                "Time since the event was last seen.",
            ),
            column("Type", "string", "", 0, "Normal or Warning."),
            column("Reason", "string", "", 0, "Short machine-readable reason."),
            column("Object", "string", "", 0, "Object the event is about."),
            column("Message", "string", "", 0, "Human-readable description."),
        ],
    }
}

fn age(object: &Value) -> String {
    seconds_since(meta_str(object, "creationTimestamp"))
        .map(human_duration)
        .unwrap_or_else(|| "<unknown>".to_string())
}

fn join_or_none(items: Vec<String>) -> String {
    if items.is_empty() {
        "<none>".to_string()
    } else {
        items.join(",")
    }
}

/// Returns the STATUS column of a pod, by the rules kubectl users know: Terminating while
/// deletion is pending, else the reason a container is waiting or terminated, else
/// the phase.
fn pod_status(pod: &Value) -> String {
    if pod["metadata"].get("deletionTimestamp").is_some() {
        return "Terminating".to_string();
    }
    let mut reason = pod["status"]["phase"]
        .as_str()
        .unwrap_or("Unknown")
        .to_string();
    for container in pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let state = &container["state"];
        if let Some(waiting) = state["waiting"]["reason"].as_str() {
            reason = waiting.to_string();
        } else if let Some(terminated) = state.get("terminated").filter(|t| t.is_object()) {
            reason = terminated["reason"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("ExitCode:{}", terminated["exitCode"]));
        }
    }
    reason
}

fn cells(kind: ResourceKind, object: &Value) -> Vec<Value> {
    let name = json!(meta_str(object, "name"));
    match kind {
        ResourceKind::Deployment => {
            let desired = object["spec"]["replicas"].as_i64().unwrap_or(1);
            let ready = object["status"]["readyReplicas"].as_i64().unwrap_or(0);
            let containers = object["spec"]["template"]["spec"]["containers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let container_names = containers
                .iter()
                .filter_map(|c| c["name"].as_str())
                .map(str::to_string)
                .collect();
            let images = containers
                .iter()
                .filter_map(|c| c["image"].as_str())
                .map(str::to_string)
                .collect();
            let selector = object["spec"]["selector"]["matchLabels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect()
                })
                .unwrap_or_default();
            vec![
                name,
                json!(format!("{ready}/{desired}")),
                json!(object["status"]["updatedReplicas"].as_i64().unwrap_or(0)),
                json!(object["status"]["availableReplicas"].as_i64().unwrap_or(0)),
                json!(age(object)),
                json!(join_or_none(container_names)),
                json!(join_or_none(images)),
                json!(join_or_none(selector)),
            ]
        }
        ResourceKind::Pod => {
            let statuses = object["status"]["containerStatuses"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let total = object["spec"]["containers"].as_array().map_or(0, Vec::len);
            let ready = statuses.iter().filter(|s| s["ready"] == true).count();
            let restarts: i64 = statuses
                .iter()
                .filter_map(|s| s["restartCount"].as_i64())
                .sum();
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(pod_status(object)),
                json!(restarts.to_string()),
                json!(age(object)),
                json!(object["status"]["podIP"].as_str().unwrap_or("<none>")),
                json!(object["spec"]["nodeName"].as_str().unwrap_or("<none>")),
                json!("<none>"),
                json!("<none>"),
            ]
        }
        ResourceKind::EndpointSlice => {
            let ports = object["ports"]
                .as_array()
                .map(|ports| {
                    ports
                        .iter()
                        .filter_map(|p| p["port"].as_i64())
                        .map(|p| p.to_string())
                        .collect()
                })
                .unwrap_or_default();
            let addresses = object["endpoints"]
                .as_array()
                .map(|endpoints| {
                    endpoints
                        .iter()
                        .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
                        .filter_map(|a| a.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            vec![
                name,
                json!(object["addressType"].as_str().unwrap_or("")),
                json!(join_or_none(ports)),
                json!(join_or_none(addresses)),
                json!(age(object)),
            ]
        }
        ResourceKind::Lease => vec![
            name,
            json!(object["spec"]["holderIdentity"]
                .as_str()
                .unwrap_or("<none>")),
            json!(age(object)),
        ],
        ResourceKind::CoreEvent | ResourceKind::EventsEvent => {
            let about = if kind == ResourceKind::CoreEvent {
                &object["involvedObject"]
            } else {
                &object["regarding"]
            };
            let note = if kind == ResourceKind::CoreEvent {
                &object["message"]
            } else {
                &object["note"]
            };
            vec![
                json!(age(object)),
                json!(object["type"].as_str().unwrap_or("")),
                json!(object["reason"].as_str().unwrap_or("")),
                json!(format!(
                    "{}/{}",
                    about["kind"].as_str().unwrap_or("").to_lowercase(),
                    about["name"].as_str().unwrap_or("")
                )),
                json!(note.as_str().unwrap_or("")),
            ]
        }
    }
}

fn row_object(object: &Value, include: IncludeObject) -> Value {
    match include {
        IncludeObject::None => Value::Null,
        IncludeObject::Object => object.clone(),
        IncludeObject::Metadata => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": object["metadata"],
        }),
    }
}

/// Renders objects as a Table. Watch events after the first omit the column
/// definitions, as the API server does.
pub(super) fn render(
    kind: ResourceKind,
    objects: &[Arc<Value>],
    resource_version: u64,
    include: IncludeObject,
    with_columns: bool,
) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let mut row = json!({"cells": cells(kind, object)});
            if include != IncludeObject::None {
                row["object"] = row_object(object, include);
            }
            row
        })
        .collect();
    let column_definitions = if with_columns {
        columns(kind)
    } else {
        Vec::new()
    };
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version.to_string()},
        "columnDefinitions": column_definitions,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_header_detection() {
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        ));
        assert!(!wants_table("application/json"));
        assert!(!wants_table(
            "application/json, application/json;as=Table;v=v1;g=meta.k8s.io"
        ));
    }

    #[test]
    fn pod_status_prefers_waiting_reason() {
        let pod = json!({
            "status": {"phase": "Running", "containerStatuses": [{"state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}
        });
        assert_eq!(pod_status(&pod), "CrashLoopBackOff");
        let terminating = json!({"metadata": {"deletionTimestamp": "2025-01-01T00:00:00Z"}, "status": {"phase": "Running"}});
        assert_eq!(pod_status(&terminating), "Terminating");
    }
}
