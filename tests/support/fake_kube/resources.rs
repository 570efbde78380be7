//! The resource types the fake serves, their API coordinates, and conversion of
//! request bodies through the k8s-openapi types.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v1::Scale;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event as EventsEvent;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::Verb;

/// A resource type that the fake stores and serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum ResourceKind {
    Deployment,
    Pod,
    EndpointSlice,
    Lease,
    CoreEvent,
    EventsEvent,
}

pub(super) const ALL_KINDS: [ResourceKind; 6] = [
    ResourceKind::Deployment,
    ResourceKind::Pod,
    ResourceKind::EndpointSlice,
    ResourceKind::Lease,
    ResourceKind::CoreEvent,
    ResourceKind::EventsEvent,
];

impl ResourceKind {
    /// Returns the API group, which is empty for the core group.
    pub(super) fn group(self) -> &'static str {
        match self {
            ResourceKind::Deployment => "apps",
            ResourceKind::Pod | ResourceKind::CoreEvent => "",
            ResourceKind::EndpointSlice => "discovery.k8s.io",
            ResourceKind::Lease => "coordination.k8s.io",
            ResourceKind::EventsEvent => "events.k8s.io",
        }
    }

    pub(super) fn version(self) -> &'static str {
        "v1"
    }

    /// Returns the apiVersion field value, for example "apps/v1" or "v1".
    pub(super) fn api_version(self) -> String {
        match self.group() {
            "" => self.version().to_string(),
            group => format!("{group}/{}", self.version()),
        }
    }

    /// Plural resource name used in URLs.
    pub(super) fn plural(self) -> &'static str {
        match self {
            ResourceKind::Deployment => "deployments",
            ResourceKind::Pod => "pods",
            ResourceKind::EndpointSlice => "endpointslices",
            ResourceKind::Lease => "leases",
            ResourceKind::CoreEvent | ResourceKind::EventsEvent => "events",
        }
    }

    pub(super) fn singular(self) -> &'static str {
        match self {
            ResourceKind::Deployment => "deployment",
            ResourceKind::Pod => "pod",
            ResourceKind::EndpointSlice => "endpointslice",
            ResourceKind::Lease => "lease",
            ResourceKind::CoreEvent | ResourceKind::EventsEvent => "event",
        }
    }

    /// Returns the kind field value, for example "Deployment".
    pub(super) fn kind(self) -> &'static str {
        match self {
            ResourceKind::Deployment => "Deployment",
            ResourceKind::Pod => "Pod",
            ResourceKind::EndpointSlice => "EndpointSlice",
            ResourceKind::Lease => "Lease",
            ResourceKind::CoreEvent | ResourceKind::EventsEvent => "Event",
        }
    }

    pub(super) fn short_names(self) -> &'static [&'static str] {
        match self {
            ResourceKind::Deployment => &["deploy"],
            ResourceKind::Pod => &["po"],
            ResourceKind::EndpointSlice | ResourceKind::Lease => &[],
            ResourceKind::CoreEvent | ResourceKind::EventsEvent => &["ev"],
        }
    }

    pub(super) fn categories(self) -> &'static [&'static str] {
        match self {
            ResourceKind::Deployment | ResourceKind::Pod => &["all"],
            _ => &[],
        }
    }

    /// Returns the verbs the fake implements for this resource. Other verbs get 405.
    pub(super) fn verbs(self) -> &'static [Verb] {
        use Verb::*;
        match self {
            ResourceKind::Deployment => &[Get, List, Watch, Patch, Update],
            ResourceKind::Pod => &[Get, List, Watch, Delete],
            ResourceKind::EndpointSlice => &[Get, List, Watch],
            ResourceKind::Lease | ResourceKind::CoreEvent | ResourceKind::EventsEvent => {
                &[Get, List, Watch, Create, Update, Patch, Delete]
            }
        }
    }

    /// Returns whether the API server maintains metadata.generation for this resource.
    pub(super) fn has_generation(self) -> bool {
        matches!(self, ResourceKind::Deployment | ResourceKind::EndpointSlice)
    }

    /// Returns the "resource.group" form used in Status messages, for example "deployments.apps".
    pub(super) fn group_resource(self) -> String {
        match self.group() {
            "" => self.plural().to_string(),
            group => format!("{}.{group}", self.plural()),
        }
    }

    /// Returns the "Kind.group" form used in Invalid messages, for example "Deployment.apps".
    pub(super) fn group_kind(self) -> String {
        match self.group() {
            "" => self.kind().to_string(),
            group => format!("{}.{group}", self.kind()),
        }
    }

    pub(super) fn from_path(group: &str, version: &str, plural: &str) -> Option<ResourceKind> {
        ALL_KINDS
            .into_iter()
            .find(|k| k.group() == group && k.version() == version && k.plural() == plural)
    }

    /// Decodes `value` as this resource's k8s-openapi type and encodes it again, so
    /// stored objects have exactly the fields and shapes of the real type.
    ///
    /// A present apiVersion or kind must match. A missing one is filled in, as the API
    /// server does when it decodes a body against the URL's group and version.
    pub(super) fn normalize(self, value: Value) -> Result<Value, String> {
        match self {
            ResourceKind::Deployment => round_trip::<Deployment>(value),
            ResourceKind::Pod => round_trip::<Pod>(value),
            ResourceKind::EndpointSlice => round_trip::<EndpointSlice>(value),
            ResourceKind::Lease => round_trip::<Lease>(value),
            ResourceKind::CoreEvent => round_trip::<CoreEvent>(value),
            ResourceKind::EventsEvent => round_trip::<EventsEvent>(value),
        }
    }

    /// Returns the kind under which objects of this kind are stored. events.k8s.io/v1 Events
    /// are a second view of the core/v1 Events, as in kube-apiserver, so an Event
    /// posted through either API is listed by both.
    pub(super) fn storage_kind(self) -> ResourceKind {
        match self {
            ResourceKind::EventsEvent => ResourceKind::CoreEvent,
            kind => kind,
        }
    }

    /// Converts a stored object to this kind's view of it.
    pub(super) fn stored_to_view(self, stored: &Arc<Value>) -> Arc<Value> {
        if self.storage_kind() == self {
            return stored.clone();
        }
        let mut object = (**stored).clone();
        rename_fields(
            &mut object,
            EVENT_FIELD_NAMES.iter().map(|(view, core)| (*core, *view)),
        );
        object["apiVersion"] = Value::String(self.api_version());
        match self.normalize(object) {
            Ok(view) => Arc::new(view),
            Err(error) => {
                tracing::error!(%error, "converting a stored core/v1 Event to events.k8s.io/v1 failed");
                stored.clone()
            }
        }
    }

    /// Converts an object in this kind's view to the stored form.
    pub(super) fn view_to_stored(self, mut object: Value) -> Result<Value, String> {
        if self.storage_kind() == self {
            return Ok(object);
        }
        rename_fields(&mut object, EVENT_FIELD_NAMES.iter().copied());
        object["apiVersion"] = Value::String(self.storage_kind().api_version());
        self.storage_kind().normalize(object)
    }

    /// Returns an otherwise empty object of this kind with only
    /// metadata.resourceVersion (and annotations) set, the shape of a BOOKMARK object.
    pub(super) fn bookmark_object(
        self,
        resource_version: u64,
        annotations: Option<BTreeMap<String, String>>,
    ) -> Value {
        let value = serde_json::json!({
            "metadata": {
                "resourceVersion": resource_version.to_string(),
                "annotations": annotations,
            }
        });
        self.normalize(value)
            .expect("an object with only metadata decodes as every kind")
    }
}

/// Field names that differ between events.k8s.io/v1 and core/v1 Events, as
/// (events.k8s.io/v1 name, core/v1 name).
const EVENT_FIELD_NAMES: [(&str, &str); 7] = [
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

fn rename_fields<'a>(object: &mut Value, renames: impl Iterator<Item = (&'a str, &'a str)>) {
    let Some(map) = object.as_object_mut() else {
        return;
    };
    for (from, to) in renames {
        if let Some(value) = map.remove(from) {
            map.insert(to.to_string(), value);
        }
    }
}

/// Decodes and re-encodes a Scale through the autoscaling/v1 type.
pub(super) fn normalize_scale(value: Value) -> Result<Value, String> {
    round_trip::<Scale>(value)
}

fn round_trip<T: Serialize + DeserializeOwned>(value: Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(value).map_err(|error| error.to_string())?;
    serde_json::to_value(&typed).map_err(|error| error.to_string())
}

/// Returns metadata.<field> as a string, or "" when it is missing.
pub(super) fn meta_str<'a>(object: &'a Value, field: &str) -> &'a str {
    object
        .get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
}

pub(super) fn labels(object: &Value) -> BTreeMap<String, String> {
    object
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object)
        .map(|map| {
            map.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Sets metadata.<field>, creating the metadata object when it is missing.
pub(super) fn set_meta(object: &mut Value, field: &str, value: Value) {
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = Value::Object(Default::default());
    }
    object["metadata"][field] = value;
}

/// Returns the value at a dotted path such as "status.phase", if every step exists.
pub(super) fn lookup_path<'a>(object: &'a Value, dotted: &str) -> Option<&'a Value> {
    dotted
        .split('.')
        .try_fold(object, |current, step| current.get(step))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_rejects_wrong_kind() {
        let body =
            serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}});
        assert!(ResourceKind::Lease.normalize(body).is_err());
    }

    #[test]
    fn normalize_fills_kind_and_drops_unknown_fields() {
        let body = serde_json::json!({"metadata": {"name": "x"}, "bogus": 1});
        let lease = ResourceKind::Lease.normalize(body).unwrap();
        assert_eq!(lease["kind"], "Lease");
        assert_eq!(lease["apiVersion"], "coordination.k8s.io/v1");
        assert!(lease.get("bogus").is_none());
    }

    #[test]
    fn events_views_round_trip() {
        let view = serde_json::json!({
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": "e", "namespace": "ns"},
            "note": "woke up",
            "reportingController": "coldgate",
            "regarding": {"kind": "Deployment", "name": "echo"},
        });
        let stored = ResourceKind::EventsEvent
            .view_to_stored(view.clone())
            .unwrap();
        assert_eq!(stored["apiVersion"], "v1");
        assert_eq!(stored["message"], "woke up");
        assert_eq!(stored["reportingComponent"], "coldgate");
        assert_eq!(stored["involvedObject"]["name"], "echo");
        let back = ResourceKind::EventsEvent.stored_to_view(&Arc::new(stored));
        assert_eq!(*back, view);
    }

    #[test]
    fn bookmark_object_has_resource_version() {
        let object = ResourceKind::Pod.bookmark_object(42, None);
        assert_eq!(object["metadata"]["resourceVersion"], "42");
        assert_eq!(object["kind"], "Pod");
    }
}
