//! Semantics of each API operation: decoding and validating bodies, preconditions,
//! the scale subresource, and the write log. HTTP framing lives in `server`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec as K8sDeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, HTTPGetAction, PodSpec, PodTemplateSpec, Probe,
};
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector as K8sLabelSelector, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use super::names::random_suffix;
use super::patch::{apply_patch, PatchType};
use super::resources::{meta_str, normalize_scale, set_meta, ResourceKind};
use super::selector::{FieldSelector, LabelSelector};
use super::status::{delete_success, ApiError};
use super::{DeploymentSpec, Inner, ScaleWrite, Verb, WriteVia};

/// Identity of the client that sent a write.
#[derive(Clone, Debug, Default)]
pub(super) struct Caller {
    pub(super) user_agent: Option<String>,
    pub(super) field_manager: Option<String>,
}

impl Caller {
    /// Returns the name the API server records in managedFields: the field manager, else the
    /// User-Agent up to its first "/" (as kube-apiserver's managerOrUserAgent does).
    fn manager_name(&self) -> String {
        if let Some(manager) = &self.field_manager {
            return manager.clone();
        }
        let agent = self.user_agent.as_deref().unwrap_or("");
        agent.split('/').next().unwrap_or("").to_string()
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|error| {
        ApiError::bad_request(format!(
            "couldn't get version/kind; json parse error: {error}"
        ))
    })
}

/// Decodes a POST or PUT body for `kind` in `namespace`, checking apiVersion,
/// kind and namespace the way the API server's decoder and handlers do.
fn decode_object(kind: ResourceKind, namespace: &str, body: &[u8]) -> Result<Value, ApiError> {
    let value = parse_json(body)?;
    let Some(body_kind) = value.get("kind").and_then(Value::as_str) else {
        let text = String::from_utf8_lossy(body);
        return Err(ApiError::bad_request(format!(
            "Object 'Kind' is missing in '{text}'"
        )));
    };
    if body_kind != kind.kind() {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({body_kind}) does not match the expected kind ({})",
            kind.kind()
        )));
    }
    let body_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if body_version != kind.api_version() {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({body_version}) does not match the expected API version ({})",
            kind.api_version()
        )));
    }
    let mut object = kind.normalize(value).map_err(|error| {
        ApiError::bad_request(format!(
            "unable to decode {} body: {error}",
            kind.group_kind()
        ))
    })?;
    match meta_str(&object, "namespace") {
        "" => set_meta(
            &mut object,
            "namespace",
            Value::String(namespace.to_string()),
        ),
        body_namespace if body_namespace != namespace => return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => {}
    }
    Ok(object)
}

fn check_name(object: &Value, url_name: &str) -> Result<(), ApiError> {
    let body_name = meta_str(object, "name");
    if body_name != url_name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({url_name})"
        )));
    }
    Ok(())
}

/// Parses a resourceVersion precondition. An empty one means the write is unconditional.
fn parse_precondition(resource_version: &str) -> Result<Option<u64>, ApiError> {
    if resource_version.is_empty() {
        return Ok(None);
    }
    resource_version.parse().map(Some).map_err(|_| {
        ApiError::bad_request(format!(
            "invalid resource version {resource_version:?}: must be an integer"
        ))
    })
}

pub(super) fn get_object(
    inner: &Inner,
    kind: ResourceKind,
    namespace: &str,
    name: &str,
) -> Result<Arc<Value>, ApiError> {
    let stored = inner.store().get(kind.storage_kind(), namespace, name);
    stored
        .map(|object| kind.stored_to_view(&object))
        .ok_or_else(|| ApiError::not_found(kind, name))
}

/// Converts an object of `kind`'s view to its stored form.
fn to_storage(kind: ResourceKind, object: Value) -> Result<Value, ApiError> {
    kind.view_to_stored(object).map_err(|error| {
        ApiError::bad_request(format!(
            "converting {} to its stored form failed: {error}",
            kind.group_kind()
        ))
    })
}

/// Returns the matching objects and the resourceVersion of the snapshot.
pub(super) fn list_objects(
    inner: &Inner,
    kind: ResourceKind,
    namespace: Option<&str>,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> (Vec<Arc<Value>>, u64) {
    let (stored, version) = {
        let store = inner.store();
        (
            store.list(kind.storage_kind(), namespace),
            store.resource_version(),
        )
    };
    let items = stored
        .iter()
        .map(|object| kind.stored_to_view(object))
        .filter(|object| {
            labels.matches(&super::resources::labels(object)) && fields.matches(object)
        })
        .collect();
    (items, version)
}

/// Builds a `<Kind>List` body.
pub(super) fn list_body(kind: ResourceKind, items: &[Arc<Value>], resource_version: u64) -> Value {
    let items: Vec<&Value> = items.iter().map(|item| item.as_ref()).collect();
    serde_json::json!({
        "apiVersion": kind.api_version(),
        "kind": format!("{}List", kind.kind()),
        "metadata": {"resourceVersion": resource_version.to_string()},
        "items": items,
    })
}

pub(super) fn create(
    inner: &Inner,
    kind: ResourceKind,
    namespace: &str,
    body: &[u8],
) -> Result<Arc<Value>, ApiError> {
    let mut object = decode_object(kind, namespace, body)?;
    if meta_str(&object, "name").is_empty() {
        let prefix = meta_str(&object, "generateName").to_string();
        if prefix.is_empty() {
            return Err(ApiError::invalid_field(
                &kind.group_kind(),
                "",
                "metadata.name",
                "\"\"",
                "name or generateName is required",
            ));
        }
        set_meta(
            &mut object,
            "name",
            Value::String(format!("{prefix}{}", random_suffix(5))),
        );
    }
    let stored = inner
        .store()
        .create(kind.storage_kind(), to_storage(kind, object)?)?;
    Ok(kind.stored_to_view(&stored))
}

/// Handles PUT of a whole object.
pub(super) fn update(
    inner: &Inner,
    kind: ResourceKind,
    namespace: &str,
    name: &str,
    body: &[u8],
    caller: &Caller,
) -> Result<Arc<Value>, ApiError> {
    let object = decode_object(kind, namespace, body)?;
    check_name(&object, name)?;
    let precondition = parse_precondition(meta_str(&object, "resourceVersion"))?;
    if kind == ResourceKind::Deployment {
        return write_deployment(
            inner,
            namespace,
            name,
            object,
            precondition,
            WriteVia::DeploymentPut,
            None,
            caller,
        );
    }
    let (stored, _) =
        inner
            .store()
            .replace(kind.storage_kind(), to_storage(kind, object)?, precondition)?;
    Ok(kind.stored_to_view(&stored))
}

/// Handles PATCH of a whole object.
pub(super) fn patch(
    inner: &Inner,
    kind: ResourceKind,
    namespace: &str,
    name: &str,
    body: &[u8],
    patch_type: PatchType,
    caller: &Caller,
) -> Result<(Arc<Value>, bool), ApiError> {
    let current = match get_object(inner, kind, namespace, name) {
        Ok(current) => current,
        // Server-side apply creates a missing object.
        Err(error)
            if error.code == 404
                && patch_type == PatchType::Apply
                && kind.verbs().contains(&Verb::Create) =>
        {
            let created = create(inner, kind, namespace, body)?;
            check_name(&created, name)?;
            return Ok((created, true));
        }
        Err(error) => return Err(error),
    };
    let patched = apply_patch(&current, patch_type, body)?;
    let object = kind
        .normalize(patched.clone())
        .map_err(|error| patched_object_invalid(&patched, &error))?;
    check_name(&object, name)?;
    // A patch that sets metadata.resourceVersion makes it a precondition.
    let patched_version = meta_str(&object, "resourceVersion");
    let precondition = if patched_version == meta_str(&current, "resourceVersion") {
        None
    } else {
        parse_precondition(patched_version)?
    };
    if kind == ResourceKind::Deployment {
        let via = WriteVia::DeploymentPatch;
        let stored = write_deployment(
            inner,
            namespace,
            name,
            object,
            precondition,
            via,
            Some(patch_type),
            caller,
        )?;
        return Ok((stored, false));
    }
    let (stored, _) =
        inner
            .store()
            .replace(kind.storage_kind(), to_storage(kind, object)?, precondition)?;
    Ok((kind.stored_to_view(&stored), false))
}

/// Returns the error for a patch result that does not decode as the resource type, in the
/// form kube-apiserver's jsonPatcher uses (errors.NewInvalid on field "patch").
fn patched_object_invalid(patched: &Value, error: &str) -> ApiError {
    ApiError::invalid_field(
        "",
        "",
        "patch",
        &format!("{:?}", patched.to_string()),
        error,
    )
}

/// Handles DELETE. Pods go through the kubelet's graceful termination and are
/// returned with deletionTimestamp set. Other kinds are removed at once, and the
/// response is a Success Status.
pub(super) async fn delete(
    inner: &Inner,
    kind: ResourceKind,
    namespace: &str,
    name: &str,
    body: &[u8],
) -> Result<Value, ApiError> {
    let current = get_object(inner, kind, namespace, name)?;
    check_delete_preconditions(kind, &current, body)?;
    if kind == ResourceKind::Pod {
        let pod = inner.kubelet.delete_pod(namespace, name).await?;
        return Ok((*pod).clone());
    }
    let removed = inner.store().remove(kind.storage_kind(), namespace, name)?;
    Ok(delete_success(kind, name, meta_str(&removed, "uid")))
}

fn check_delete_preconditions(
    kind: ResourceKind,
    current: &Value,
    body: &[u8],
) -> Result<(), ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let options = parse_json(body)?;
    let name = meta_str(current, "name");
    let preconditions = &options["preconditions"];
    if let Some(expected) = preconditions["resourceVersion"].as_str() {
        if expected != meta_str(current, "resourceVersion") {
            return Err(ApiError::conflict(kind, name));
        }
    }
    if let Some(expected) = preconditions["uid"].as_str() {
        let actual = meta_str(current, "uid");
        if expected != actual {
            let mut error = ApiError::conflict(kind, name);
            error.status.message = Some(format!(
                "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: UID in precondition: {expected}, UID in object meta: {actual}",
                kind.group_resource()
            ));
            return Err(error);
        }
    }
    Ok(())
}

fn replicas_of(deployment: &Value) -> i32 {
    deployment["spec"]["replicas"]
        .as_i64()
        .map(|r| r as i32)
        .unwrap_or(1)
}

/// Validates and stores a new version of a deployment written through the API or a
/// test control: status stays as the kubelet last wrote it, spec.replicas must not
/// be negative, and spec.selector is immutable.
#[allow(clippy::too_many_arguments)]
fn write_deployment(
    inner: &Inner,
    namespace: &str,
    name: &str,
    mut object: Value,
    precondition: Option<u64>,
    via: WriteVia,
    patch_type: Option<PatchType>,
    caller: &Caller,
) -> Result<Arc<Value>, ApiError> {
    let mut store = inner.store();
    let current = store
        .get(ResourceKind::Deployment, namespace, name)
        .ok_or_else(|| ApiError::not_found(ResourceKind::Deployment, name))?;

    if let Some(replicas) = object["spec"]["replicas"].as_i64() {
        if replicas < 0 {
            return Err(ApiError::invalid_field(
                "Deployment.apps",
                name,
                "spec.replicas",
                &replicas.to_string(),
                "must be greater than or equal to 0",
            ));
        }
    }
    if object["spec"]["selector"] != current["spec"]["selector"] {
        return Err(ApiError::invalid_field(
            "Deployment.apps",
            name,
            "spec.selector",
            &object["spec"]["selector"].to_string(),
            "field is immutable",
        ));
    }

    match current.get("status") {
        Some(status) => object["status"] = status.clone(),
        None => {
            if let Some(map) = object.as_object_mut() {
                map.remove("status");
            }
        }
    }

    let from = replicas_of(&current);
    let to = replicas_of(&object);
    let (stored, _) = store.replace(ResourceKind::Deployment, object, precondition)?;

    let records_write = matches!(
        via,
        WriteVia::ScalePatch | WriteVia::ScalePut | WriteVia::TestControl
    ) || from != to;
    if records_write {
        let client = caller.manager_name();
        store.scale_writes.push((
            (namespace.to_string(), name.to_string()),
            ScaleWrite {
                from,
                to,
                via,
                patch_type,
                field_manager: caller.field_manager.clone(),
                user_agent: caller.user_agent.clone(),
                client,
                resource_version: meta_str(&stored, "resourceVersion").to_string(),
                at: Instant::now(),
            },
        ));
    }
    drop(store);

    if from != to {
        tracing::info!(
            namespace,
            deployment = name,
            from,
            to,
            ?via,
            "deployment replicas changed"
        );
        inner.kubelet.reconcile(namespace, name);
    }
    Ok(stored)
}

/// Returns the label selector of a deployment in query-string form, as Scale's
/// status.selector carries it.
fn selector_string(deployment: &Value) -> String {
    deployment["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn scale_of(deployment: &Value) -> Value {
    let scale = serde_json::json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            "name": meta_str(deployment, "name"),
            "namespace": meta_str(deployment, "namespace"),
            "uid": meta_str(deployment, "uid"),
            "resourceVersion": meta_str(deployment, "resourceVersion"),
            "creationTimestamp": deployment["metadata"]["creationTimestamp"],
        },
        "spec": {"replicas": replicas_of(deployment)},
        "status": {
            "replicas": deployment["status"]["replicas"].as_i64().unwrap_or(0),
            "selector": selector_string(deployment),
        },
    });
    normalize_scale(scale).expect("a Scale built from a stored deployment decodes")
}

pub(super) fn get_scale(inner: &Inner, namespace: &str, name: &str) -> Result<Value, ApiError> {
    let deployment = get_object(inner, ResourceKind::Deployment, namespace, name)?;
    Ok(scale_of(&deployment))
}

/// Writes spec.replicas from a Scale object: metadata.resourceVersion, when set,
/// is a precondition, and spec.replicas must not be negative.
fn write_scale(
    inner: &Inner,
    namespace: &str,
    name: &str,
    scale: &Value,
    via: WriteVia,
    patch_type: Option<PatchType>,
    caller: &Caller,
) -> Result<Value, ApiError> {
    check_name(scale, name)?;
    let replicas = scale["spec"]["replicas"].as_i64().unwrap_or(0);
    if replicas < 0 {
        return Err(ApiError::invalid_field(
            "Scale.autoscaling",
            name,
            "spec.replicas",
            &replicas.to_string(),
            "must be greater than or equal to 0",
        ));
    }
    let current = get_object(inner, ResourceKind::Deployment, namespace, name)?;
    let precondition = parse_precondition(meta_str(scale, "resourceVersion"))?;
    let mut object = (*current).clone();
    object["spec"]["replicas"] = Value::from(replicas);
    let stored = write_deployment(
        inner,
        namespace,
        name,
        object,
        precondition,
        via,
        patch_type,
        caller,
    )?;
    Ok(scale_of(&stored))
}

pub(super) fn update_scale(
    inner: &Inner,
    namespace: &str,
    name: &str,
    body: &[u8],
    caller: &Caller,
) -> Result<Value, ApiError> {
    let value = parse_json(body)?;
    let scale = normalize_scale(value).map_err(|error| {
        ApiError::bad_request(format!("unable to decode Scale.autoscaling body: {error}"))
    })?;
    write_scale(
        inner,
        namespace,
        name,
        &scale,
        WriteVia::ScalePut,
        None,
        caller,
    )
}

/// Applies a patch to the deployment's Scale, as kube-apiserver does for the scale
/// subresource: the patch applies to the Scale object, not to the Deployment.
pub(super) fn patch_scale(
    inner: &Inner,
    namespace: &str,
    name: &str,
    body: &[u8],
    patch_type: PatchType,
    caller: &Caller,
) -> Result<Value, ApiError> {
    let current = get_scale(inner, namespace, name)?;
    let patched = apply_patch(&current, patch_type, body)?;
    let mut scale = normalize_scale(patched.clone())
        .map_err(|error| patched_object_invalid(&patched, &error))?;
    // An unchanged resourceVersion is not a precondition, because it came from the
    // current object rather than from the client.
    if meta_str(&scale, "resourceVersion") == meta_str(&current, "resourceVersion") {
        set_meta(&mut scale, "resourceVersion", Value::String(String::new()));
    }
    write_scale(
        inner,
        namespace,
        name,
        &scale,
        WriteVia::ScalePatch,
        Some(patch_type),
        caller,
    )
}

pub(super) fn set_replicas(
    inner: &Inner,
    namespace: &str,
    name: &str,
    replicas: i32,
    writer: &str,
) -> Result<(), ApiError> {
    let current = get_object(inner, ResourceKind::Deployment, namespace, name)?;
    let mut object = (*current).clone();
    object["spec"]["replicas"] = Value::from(replicas);
    let caller = Caller {
        user_agent: None,
        field_manager: Some(writer.to_string()),
    };
    write_deployment(
        inner,
        namespace,
        name,
        object,
        None,
        WriteVia::TestControl,
        None,
        &caller,
    )?;
    Ok(())
}

fn effective_labels(name: &str, spec: &DeploymentSpec) -> BTreeMap<String, String> {
    if spec.labels.is_empty() {
        BTreeMap::from([("app".to_string(), name.to_string())])
    } else {
        spec.labels.clone()
    }
}

/// Builds the container that the Deployment and Pod specs show for a pod template.
pub(super) fn container_for(spec: &DeploymentSpec) -> Container {
    let template = &spec.template;
    let period_seconds = template.probe_period.as_secs_f64().ceil().max(1.0) as i32;
    let timeout_seconds = template.probe_timeout.as_secs_f64().ceil().max(1.0) as i32;
    Container {
        name: template.container_name.clone(),
        image: Some(template.image.clone()),
        command: Some(vec![template.program.to_string_lossy().into_owned()]),
        args: Some(template.args.clone()),
        ports: Some(vec![ContainerPort {
            name: Some(template.port_name.clone()),
            container_port: i32::from(template.port),
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some(template.readiness_path.clone()),
                port: IntOrString::String(template.port_name.clone()),
                scheme: Some("HTTP".to_string()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(period_seconds),
            timeout_seconds: Some(timeout_seconds),
            failure_threshold: Some(template.readiness_failure_threshold as i32),
            success_threshold: Some(1),
            ..Probe::default()
        }),
        termination_message_path: Some("/dev/termination-log".to_string()),
        termination_message_policy: Some("File".to_string()),
        image_pull_policy: Some("IfNotPresent".to_string()),
        ..Container::default()
    }
}

/// Creates a deployment, its service's EndpointSlice (unless another deployment
/// already created it), and has the kubelet start the pods.
pub(super) fn add_deployment(
    inner: &Inner,
    namespace: &str,
    name: &str,
    spec: DeploymentSpec,
) -> Result<(), ApiError> {
    if spec.replicas < 0 {
        return Err(ApiError::invalid_field(
            "Deployment.apps",
            name,
            "spec.replicas",
            &spec.replicas.to_string(),
            "must be greater than or equal to 0",
        ));
    }
    let labels = effective_labels(name, &spec);
    let grace_seconds = spec.template.termination_grace_period.as_secs_f64().ceil() as i64;
    let deployment = Deployment {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(labels.clone()),
            annotations: Some(BTreeMap::from([(
                "deployment.kubernetes.io/revision".to_string(),
                "1".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(K8sDeploymentSpec {
            replicas: Some(spec.replicas),
            selector: K8sLabelSelector {
                match_labels: Some(labels.clone()),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels.clone()),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container_for(&spec)],
                    restart_policy: Some("Always".to_string()),
                    termination_grace_period_seconds: Some(grace_seconds),
                    dns_policy: Some("ClusterFirst".to_string()),
                    scheduler_name: Some("default-scheduler".to_string()),
                    ..PodSpec::default()
                }),
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_string()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::String("25%".to_string())),
                    max_unavailable: Some(IntOrString::String("25%".to_string())),
                }),
            }),
            revision_history_limit: Some(10),
            progress_deadline_seconds: Some(600),
            ..K8sDeploymentSpec::default()
        }),
        status: None,
    };
    let deployment = serde_json::to_value(&deployment).expect("Deployment serializes");

    let mut store = inner.store();
    let key = (namespace.to_string(), name.to_string());
    store.create(ResourceKind::Deployment, deployment)?;
    let service_key = (namespace.to_string(), spec.service.clone());
    if !store.slice_names.contains_key(&service_key) {
        let slice_name = format!("{}-{}", spec.service, random_suffix(5));
        let slice = EndpointSlice {
            metadata: ObjectMeta {
                name: Some(slice_name.clone()),
                generate_name: Some(format!("{}-", spec.service)),
                namespace: Some(namespace.to_string()),
                labels: Some(BTreeMap::from([
                    (
                        "kubernetes.io/service-name".to_string(),
                        spec.service.clone(),
                    ),
                    (
                        "endpointslice.kubernetes.io/managed-by".to_string(),
                        "endpointslice-controller.k8s.io".to_string(),
                    ),
                ])),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".to_string(),
            endpoints: Vec::new(),
            ports: Some(vec![EndpointPort {
                name: Some(spec.template.port_name.clone()),
                port: Some(i32::from(spec.template.port)),
                protocol: Some("TCP".to_string()),
                app_protocol: None,
            }]),
        };
        let slice = serde_json::to_value(&slice).expect("EndpointSlice serializes");
        store.create(ResourceKind::EndpointSlice, slice)?;
        store.slice_names.insert(service_key, slice_name);
    }
    store.deployment_specs.insert(key, spec);
    drop(store);

    super::kubelet::refresh_deployment_status(inner, namespace, name);
    inner.kubelet.reconcile(namespace, name);
    Ok(())
}
