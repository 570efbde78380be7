//! The object store: current objects, the cluster-wide resourceVersion counter, and
//! the bounded event history that watches replay from.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::watch;

use super::names::{new_uid, now_time};
use super::resources::{meta_str, set_meta, ResourceKind};
use super::status::ApiError;
use super::{DeploymentSpec, Fault, RequestRecord, ScaleWrite};

/// Namespace and name of an object.
pub(super) type ObjectKey = (String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One retained change. `previous` is the object before a MODIFIED change, which
/// a filtered watch needs to tell "stopped matching" (DELETED) from "changed".
#[derive(Clone, Debug)]
pub(super) struct HistoryEntry {
    pub(super) resource_version: u64,
    pub(super) kind: ResourceKind,
    pub(super) event: EventType,
    pub(super) object: Arc<Value>,
    pub(super) previous: Option<Arc<Value>>,
}

/// Maximum number of API requests kept for `FakeCluster::requests`.
const REQUEST_LOG_LIMIT: usize = 10_000;

pub(super) struct Store {
    resource_version: u64,
    objects: HashMap<ResourceKind, BTreeMap<ObjectKey, Arc<Value>>>,
    history: VecDeque<HistoryEntry>,
    /// Every change with a resourceVersion above this one is still in `history`.
    history_floor: u64,
    history_limit: usize,
    notify: watch::Sender<u64>,
    pub(super) scale_writes: Vec<(ObjectKey, ScaleWrite)>,
    pub(super) requests: VecDeque<RequestRecord>,
    pub(super) faults: Vec<Fault>,
    /// EndpointSlice name for each (namespace, service).
    pub(super) slice_names: HashMap<ObjectKey, String>,
    /// How to run the pods of each deployment added through the test API.
    pub(super) deployment_specs: HashMap<ObjectKey, DeploymentSpec>,
}

impl Store {
    pub(super) fn new(history_limit: usize, notify: watch::Sender<u64>) -> Self {
        Store {
            resource_version: 1,
            objects: HashMap::new(),
            history: VecDeque::new(),
            history_floor: 1,
            history_limit: history_limit.max(1),
            notify,
            scale_writes: Vec::new(),
            requests: VecDeque::new(),
            faults: Vec::new(),
            slice_names: HashMap::new(),
            deployment_specs: HashMap::new(),
        }
    }

    pub(super) fn resource_version(&self) -> u64 {
        self.resource_version
    }

    pub(super) fn get(
        &self,
        kind: ResourceKind,
        namespace: &str,
        name: &str,
    ) -> Option<Arc<Value>> {
        self.objects
            .get(&kind)?
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Returns the objects of `kind`, in one namespace or all, ordered by namespace and name.
    pub(super) fn list(&self, kind: ResourceKind, namespace: Option<&str>) -> Vec<Arc<Value>> {
        let Some(objects) = self.objects.get(&kind) else {
            return Vec::new();
        };
        objects
            .iter()
            .filter(|((ns, _), _)| namespace.is_none_or(|wanted| wanted == ns))
            .map(|(_, object)| object.clone())
            .collect()
    }

    fn next_resource_version(&mut self) -> u64 {
        self.resource_version += 1;
        self.resource_version
    }

    fn record(&mut self, entry: HistoryEntry) {
        let resource_version = entry.resource_version;
        self.history.push_back(entry);
        while self.history.len() > self.history_limit {
            if let Some(evicted) = self.history.pop_front() {
                self.history_floor = evicted.resource_version;
            }
        }
        self.notify.send_replace(resource_version);
    }

    /// Stores a new object, filling uid, creationTimestamp, generation and
    /// resourceVersion. The object must already be normalized and carry its
    /// namespace and name.
    pub(super) fn create(
        &mut self,
        kind: ResourceKind,
        mut object: Value,
    ) -> Result<Arc<Value>, ApiError> {
        let key = (
            meta_str(&object, "namespace").to_string(),
            meta_str(&object, "name").to_string(),
        );
        let objects = self.objects.entry(kind).or_default();
        if objects.contains_key(&key) {
            return Err(ApiError::already_exists(kind, &key.1));
        }

        let resource_version = self.next_resource_version();
        set_meta(&mut object, "uid", Value::String(new_uid()));
        set_meta(
            &mut object,
            "creationTimestamp",
            serde_json::to_value(now_time()).expect("Time serializes"),
        );
        set_meta(
            &mut object,
            "resourceVersion",
            Value::String(resource_version.to_string()),
        );
        if kind.has_generation() {
            set_meta(&mut object, "generation", Value::from(1));
        }

        let object = Arc::new(object);
        self.objects
            .entry(kind)
            .or_default()
            .insert(key, object.clone());
        self.record(HistoryEntry {
            resource_version,
            kind,
            event: EventType::Added,
            object: object.clone(),
            previous: None,
        });
        Ok(object)
    }

    /// Replaces an existing object. System fields (uid, creationTimestamp,
    /// deletionTimestamp) are kept from the stored object, generation is bumped when
    /// `spec` changed, and a write that changes nothing is skipped without a new
    /// resourceVersion or watch event, as the API server does.
    ///
    /// `precondition` is the resourceVersion the caller read, and a different stored one
    /// fails with 409 Conflict. Returns the stored object and whether it changed.
    pub(super) fn replace(
        &mut self,
        kind: ResourceKind,
        mut object: Value,
        precondition: Option<u64>,
    ) -> Result<(Arc<Value>, bool), ApiError> {
        let namespace = meta_str(&object, "namespace").to_string();
        let name = meta_str(&object, "name").to_string();
        let Some(current) = self.get(kind, &namespace, &name) else {
            return Err(ApiError::not_found(kind, &name));
        };
        let current_version = meta_str(&current, "resourceVersion").to_string();
        if let Some(expected) = precondition {
            if expected.to_string() != current_version {
                return Err(ApiError::conflict(kind, &name));
            }
        }

        for field in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            match current["metadata"].get(field) {
                Some(value) => set_meta(&mut object, field, value.clone()),
                None => {
                    if let Some(metadata) = object["metadata"].as_object_mut() {
                        metadata.remove(field);
                    }
                }
            }
        }
        set_meta(
            &mut object,
            "resourceVersion",
            Value::String(current_version),
        );
        if kind.has_generation() {
            let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
            let spec_changed = object.get("spec") != current.get("spec");
            set_meta(
                &mut object,
                "generation",
                Value::from(generation + i64::from(spec_changed)),
            );
        }
        if object == *current {
            return Ok((current, false));
        }

        let resource_version = self.next_resource_version();
        set_meta(
            &mut object,
            "resourceVersion",
            Value::String(resource_version.to_string()),
        );
        let object = Arc::new(object);
        self.objects
            .entry(kind)
            .or_default()
            .insert((namespace, name), object.clone());
        self.record(HistoryEntry {
            resource_version,
            kind,
            event: EventType::Modified,
            object: object.clone(),
            previous: Some(current),
        });
        Ok((object, true))
    }

    /// Sets deletionTimestamp and deletionGracePeriodSeconds, which `replace` never
    /// changes because clients cannot set them.
    pub(super) fn mark_deleting(
        &mut self,
        kind: ResourceKind,
        namespace: &str,
        name: &str,
        grace_period_seconds: i64,
    ) -> Result<Arc<Value>, ApiError> {
        let Some(current) = self.get(kind, namespace, name) else {
            return Err(ApiError::not_found(kind, name));
        };
        if current["metadata"].get("deletionTimestamp").is_some() {
            return Ok(current);
        }
        let mut object = (*current).clone();
        let resource_version = self.next_resource_version();
        set_meta(
            &mut object,
            "deletionTimestamp",
            serde_json::to_value(now_time()).expect("Time serializes"),
        );
        set_meta(
            &mut object,
            "deletionGracePeriodSeconds",
            Value::from(grace_period_seconds),
        );
        set_meta(
            &mut object,
            "resourceVersion",
            Value::String(resource_version.to_string()),
        );
        let object = Arc::new(object);
        self.objects
            .entry(kind)
            .or_default()
            .insert((namespace.to_string(), name.to_string()), object.clone());
        self.record(HistoryEntry {
            resource_version,
            kind,
            event: EventType::Modified,
            object: object.clone(),
            previous: Some(current),
        });
        Ok(object)
    }

    /// Removes an object. The DELETED event carries the last state with the
    /// resourceVersion of the deletion, as the API server's watch does.
    pub(super) fn remove(
        &mut self,
        kind: ResourceKind,
        namespace: &str,
        name: &str,
    ) -> Result<Arc<Value>, ApiError> {
        let key = (namespace.to_string(), name.to_string());
        let Some(current) = self.objects.entry(kind).or_default().remove(&key) else {
            return Err(ApiError::not_found(kind, name));
        };
        let resource_version = self.next_resource_version();
        let mut object = (*current).clone();
        set_meta(
            &mut object,
            "resourceVersion",
            Value::String(resource_version.to_string()),
        );
        let object = Arc::new(object);
        self.record(HistoryEntry {
            resource_version,
            kind,
            event: EventType::Deleted,
            object: object.clone(),
            previous: None,
        });
        Ok(current)
    }

    /// Returns the retained changes of `kind` after `after`, or Err with the oldest
    /// resourceVersion still available when `after` is older than the history.
    pub(super) fn changes_after(
        &self,
        kind: ResourceKind,
        after: u64,
    ) -> Result<Vec<HistoryEntry>, u64> {
        if after < self.history_floor {
            return Err(self.history_floor);
        }
        let start = self
            .history
            .partition_point(|entry| entry.resource_version <= after);
        Ok(self
            .history
            .iter()
            .skip(start)
            .filter(|entry| entry.kind == kind)
            .cloned()
            .collect())
    }

    /// Drops all retained changes and bumps the resourceVersion once, so that every
    /// resourceVersion handed out so far is too old to watch from while a fresh
    /// LIST returns one that works.
    pub(super) fn expire_history(&mut self) {
        self.history.clear();
        let resource_version = self.next_resource_version();
        self.history_floor = resource_version;
        self.notify.send_replace(resource_version);
    }

    pub(super) fn record_request(&mut self, record: RequestRecord) {
        self.requests.push_back(record);
        while self.requests.len() > REQUEST_LOG_LIMIT {
            self.requests.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str, holder: &str) -> Value {
        serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"holderIdentity": holder},
        })
    }

    #[test]
    fn replace_with_stale_version_conflicts() {
        let (tx, _rx) = watch::channel(0);
        let mut store = Store::new(100, tx);
        let created = store.create(ResourceKind::Lease, lease("a", "x")).unwrap();
        let version: u64 = meta_str(&created, "resourceVersion").parse().unwrap();
        let (_, changed) = store
            .replace(ResourceKind::Lease, lease("a", "y"), Some(version))
            .unwrap();
        assert!(changed);
        let error = store
            .replace(ResourceKind::Lease, lease("a", "z"), Some(version))
            .unwrap_err();
        assert_eq!(error.code, 409);
    }

    #[test]
    fn identical_replace_keeps_resource_version() {
        let (tx, _rx) = watch::channel(0);
        let mut store = Store::new(100, tx);
        store.create(ResourceKind::Lease, lease("a", "x")).unwrap();
        let before = store.resource_version();
        let (_, changed) = store
            .replace(ResourceKind::Lease, lease("a", "x"), None)
            .unwrap();
        assert!(!changed);
        assert_eq!(store.resource_version(), before);
    }

    #[test]
    fn history_eviction_expires_old_versions() {
        let (tx, _rx) = watch::channel(0);
        let mut store = Store::new(2, tx);
        for name in ["a", "b", "c"] {
            store.create(ResourceKind::Lease, lease(name, "x")).unwrap();
        }
        assert!(store.changes_after(ResourceKind::Lease, 1).is_err());
        assert_eq!(
            store.changes_after(ResourceKind::Lease, 2).unwrap().len(),
            2
        );
    }
}
