//! WATCH streams: newline-delimited JSON watch events, replayed from the retained
//! history and then followed live, with optional BOOKMARK events and timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::WatchEvent;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::resources::{labels, meta_str, ResourceKind};
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::store::{EventType, HistoryEntry};
use super::table::{self, IncludeObject};
use super::Inner;

/// Annotation on the BOOKMARK that ends the initial events of a watch with
/// sendInitialEvents=true.
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

pub(super) struct WatchParams {
    pub(super) kind: ResourceKind,
    pub(super) namespace: Option<String>,
    pub(super) labels: LabelSelector,
    pub(super) fields: FieldSelector,
    pub(super) resource_version: Option<String>,
    pub(super) allow_bookmarks: bool,
    pub(super) send_initial_events: bool,
    pub(super) timeout: Option<Duration>,
    /// Set when the client asked for Table objects.
    pub(super) table: Option<IncludeObject>,
}

enum Start {
    /// Synthetic ADDED events for the current objects, then changes after them.
    CurrentState,
    /// Changes after this resourceVersion.
    After(u64),
}

impl WatchParams {
    fn matches(&self, object: &Value) -> bool {
        let namespace_ok = self
            .namespace
            .as_deref()
            .is_none_or(|namespace| namespace == meta_str(object, "namespace"));
        namespace_ok && self.labels.matches(&labels(object)) && self.fields.matches(object)
    }

    /// Maps a stored change to the event this watch receives: an object that starts
    /// matching the selectors is ADDED, one that stops matching is DELETED.
    fn event_for(&self, entry: &HistoryEntry) -> Option<(EventType, Arc<Value>)> {
        let object = self.kind.stored_to_view(&entry.object);
        let matches_now = self.matches(&object);
        let event = match entry.event {
            EventType::Added | EventType::Deleted => matches_now.then_some(entry.event),
            EventType::Modified => {
                let matched_before = entry
                    .previous
                    .as_ref()
                    .is_some_and(|previous| self.matches(&self.kind.stored_to_view(previous)));
                match (matched_before, matches_now) {
                    (true, true) => Some(EventType::Modified),
                    (false, true) => Some(EventType::Added),
                    (true, false) => Some(EventType::Deleted),
                    (false, false) => None,
                }
            }
        };
        event.map(|event| (event, object))
    }
}

/// Validates the request, starts the stream and returns the receiving end of the
/// body chunks. The stream ends on timeoutSeconds, `close_watches`, `stop_api`, or
/// when the client goes away.
pub(super) fn start(
    inner: Arc<Inner>,
    params: WatchParams,
) -> Result<mpsc::Receiver<Bytes>, ApiError> {
    let start = match params.resource_version.as_deref() {
        None | Some("") | Some("0") => Start::CurrentState,
        Some(version) => Start::After(version.parse().map_err(|_| {
            ApiError::bad_request(format!(
                "invalid resourceVersion {version:?}: must be an integer"
            ))
        })?),
    };
    let (sender, receiver) = mpsc::channel(256);
    tokio::spawn(feed(inner, params, start, sender));
    Ok(receiver)
}

struct Feeder {
    params: WatchParams,
    sender: mpsc::Sender<Bytes>,
    columns_sent: bool,
}

impl Feeder {
    async fn send_line(&self, value: &Value) -> Result<(), ()> {
        let mut line = serde_json::to_vec(value).expect("watch events serialize");
        line.push(b'\n');
        self.sender.send(Bytes::from(line)).await.map_err(|_| ())
    }

    async fn send_object(&mut self, event: EventType, object: &Arc<Value>) -> Result<(), ()> {
        let payload = match self.params.table {
            Some(include) => {
                let version = meta_str(object, "resourceVersion").parse().unwrap_or(0);
                let with_columns = !self.columns_sent;
                self.columns_sent = true;
                table::render(
                    self.params.kind,
                    std::slice::from_ref(object),
                    version,
                    include,
                    with_columns,
                )
            }
            None => (**object).clone(),
        };
        let event = match event {
            EventType::Added => WatchEvent::Added(payload),
            EventType::Modified => WatchEvent::Modified(payload),
            EventType::Deleted => WatchEvent::Deleted(payload),
        };
        self.send_line(&serde_json::to_value(&event).expect("watch events serialize"))
            .await
    }

    /// Sends a BOOKMARK whose object is an empty object of the watched kind with
    /// only metadata.resourceVersion set, as the API server sends it.
    async fn send_bookmark(
        &self,
        resource_version: u64,
        annotations: Option<BTreeMap<String, String>>,
    ) -> Result<(), ()> {
        let object = self
            .params
            .kind
            .bookmark_object(resource_version, annotations);
        self.send_line(&json!({"type": "BOOKMARK", "object": object}))
            .await
    }

    async fn send_error(&self, error: &ApiError) -> Result<(), ()> {
        let event: WatchEvent<Value> = WatchEvent::ErrorStatus((*error.status).clone());
        self.send_line(&serde_json::to_value(&event).expect("watch events serialize"))
            .await
    }
}

async fn feed(inner: Arc<Inner>, params: WatchParams, start: Start, sender: mpsc::Sender<Bytes>) {
    let mut versions = inner.resource_version_rx.clone();
    let mut closes = inner.close_watches.subscribe();
    // NOTE: without timeoutSeconds the stream has no deadline, but kube-apiserver
    // closes every watch after a random 30 to 60 minutes.
    let deadline = params.timeout.map(|timeout| Instant::now() + timeout);
    let bookmark_interval = inner.options.bookmark_interval;
    let mut feeder = Feeder {
        params,
        sender,
        columns_sent: false,
    };
    versions.borrow_and_update();

    let mut cursor = match start {
        Start::CurrentState => {
            let (objects, current) = {
                let store = inner.store();
                let kind = feeder.params.kind;
                let objects: Vec<Arc<Value>> = store
                    .list(kind.storage_kind(), feeder.params.namespace.as_deref())
                    .iter()
                    .map(|object| kind.stored_to_view(object))
                    .filter(|object| feeder.params.matches(object))
                    .collect();
                (objects, store.resource_version())
            };
            for object in &objects {
                if feeder.send_object(EventType::Added, object).await.is_err() {
                    return;
                }
            }
            if feeder.params.send_initial_events {
                let annotations =
                    BTreeMap::from([(INITIAL_EVENTS_END.to_string(), "true".to_string())]);
                if feeder
                    .send_bookmark(current, Some(annotations))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            current
        }
        Start::After(version) => version,
    };

    let mut bookmarks =
        tokio::time::interval_at(Instant::now() + bookmark_interval, bookmark_interval);
    loop {
        versions.borrow_and_update();
        let changes = {
            let store = inner.store();
            store
                .changes_after(feeder.params.kind.storage_kind(), cursor)
                .map(|entries| (entries, store.resource_version()))
        };
        match changes {
            Err(oldest) => {
                let _ = feeder.send_error(&ApiError::expired(cursor, oldest)).await;
                return;
            }
            Ok((entries, current)) => {
                for entry in &entries {
                    if let Some((event, object)) = feeder.params.event_for(entry) {
                        if feeder.send_object(event, &object).await.is_err() {
                            return;
                        }
                    }
                }
                // A watch from a resourceVersion ahead of the store waits for it.
                cursor = cursor.max(current);
            }
        }

        tokio::select! {
            changed = versions.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = bookmarks.tick(), if feeder.params.allow_bookmarks => {
                if feeder.send_bookmark(cursor, None).await.is_err() {
                    return;
                }
            }
            _ = sleep_until_deadline(deadline) => return,
            _ = closes.changed() => return,
            _ = feeder.sender.closed() => return,
        }
    }
}

async fn sleep_until_deadline(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
