//! Error responses as metav1.Status bodies, with the codes, reasons and message
//! formats of k8s.io/apimachinery/pkg/api/errors.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Status, StatusCause, StatusDetails};
use serde_json::Value;

use super::resources::ResourceKind;

const MODIFIED_MESSAGE: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

/// An API error: the HTTP status code and the Status body sent with it.
#[derive(Clone, Debug)]
pub(super) struct ApiError {
    pub(super) code: u16,
    pub(super) status: Box<Status>,
    /// Seconds for a Retry-After header, sent with 429 and 503.
    pub(super) retry_after: Option<u32>,
}

fn details_for(kind: ResourceKind, name: &str) -> StatusDetails {
    StatusDetails {
        name: (!name.is_empty()).then(|| name.to_string()),
        group: (!kind.group().is_empty()).then(|| kind.group().to_string()),
        kind: Some(kind.plural().to_string()),
        ..StatusDetails::default()
    }
}

impl ApiError {
    pub(super) fn new(
        code: u16,
        reason: &str,
        message: String,
        details: Option<StatusDetails>,
    ) -> Self {
        ApiError {
            code,
            status: Box::new(Status {
                code: Some(i32::from(code)),
                details,
                message: Some(message),
                reason: (!reason.is_empty()).then(|| reason.to_string()),
                status: Some("Failure".to_string()),
                ..Status::default()
            }),
            retry_after: None,
        }
    }

    pub(super) fn not_found(kind: ResourceKind, name: &str) -> Self {
        let message = format!("{} \"{name}\" not found", kind.group_resource());
        Self::new(404, "NotFound", message, Some(details_for(kind, name)))
    }

    pub(super) fn already_exists(kind: ResourceKind, name: &str) -> Self {
        let message = format!("{} \"{name}\" already exists", kind.group_resource());
        Self::new(409, "AlreadyExists", message, Some(details_for(kind, name)))
    }

    /// 409 Conflict for a stale resourceVersion precondition.
    pub(super) fn conflict(kind: ResourceKind, name: &str) -> Self {
        let message = format!(
            "Operation cannot be fulfilled on {} \"{name}\": {MODIFIED_MESSAGE}",
            kind.group_resource()
        );
        Self::new(409, "Conflict", message, Some(details_for(kind, name)))
    }

    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message.into(), None)
    }

    /// 422 Invalid for one field, in the format of errors.NewInvalid with one
    /// field.Invalid error. `group_kind` is for example "Deployment.apps".
    pub(super) fn invalid_field(
        group_kind: &str,
        name: &str,
        field: &str,
        value: &str,
        detail: &str,
    ) -> Self {
        let cause_message = format!("Invalid value: {value}: {detail}");
        let message = format!("{group_kind} \"{name}\" is invalid: {field}: {cause_message}");
        let (kind, group) = match group_kind.split_once('.') {
            Some((kind, group)) => (kind.to_string(), Some(group.to_string())),
            None => (group_kind.to_string(), None),
        };
        let details = StatusDetails {
            name: (!name.is_empty()).then(|| name.to_string()),
            group,
            kind: (!kind.is_empty()).then_some(kind),
            causes: Some(vec![StatusCause {
                reason: Some("FieldValueInvalid".to_string()),
                message: Some(cause_message),
                field: Some(field.to_string()),
            }]),
            ..StatusDetails::default()
        };
        Self::new(422, "Invalid", message, Some(details))
    }

    /// Returns 405 for a verb that the resource does not serve. The message is the one
    /// the API server's generic handler uses.
    pub(super) fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource".to_string(),
            Some(StatusDetails::default()),
        )
    }

    /// 404 for a path that names no resource the fake serves.
    pub(super) fn path_not_found() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource".to_string(),
            Some(StatusDetails::default()),
        )
    }

    /// 410 Expired for a watch from a resourceVersion older than the retained history.
    pub(super) fn expired(requested: u64, oldest_retained: u64) -> Self {
        let message = format!("too old resource version: {requested} ({oldest_retained})");
        Self::new(410, "Expired", message, None)
    }

    pub(super) fn unsupported_media_type(content_type: &str) -> Self {
        let message = format!(
            "the body of the request was in an unknown format ({content_type:?}) - accepted media types include: \
             application/json-patch+json, application/merge-patch+json, \
             application/apply-patch+yaml, application/strategic-merge-patch+json"
        );
        Self::new(415, "UnsupportedMediaType", message, None)
    }

    /// Returns the error for a JSON patch whose operations fail to apply, including a failed
    /// `test` operation. kube-apiserver's jsonPatcher.applyJSPatch returns
    /// errors.NewGenericServerResponse(422, "", GroupResource{}, "", err, 0, false),
    /// which yields reason Invalid, a fixed message, and empty details (the
    /// json-patch error text is dropped because isUnexpectedResponse is false).
    pub(super) fn json_patch_apply_failed() -> Self {
        Self::new(
            422,
            "Invalid",
            "the server rejected our request due to an error in our request".to_string(),
            Some(StatusDetails::default()),
        )
    }

    /// Returns the error for a fault injected by a test, shaped like the real error with that code.
    pub(super) fn injected(
        code: u16,
        verb: &str,
        kind: Option<ResourceKind>,
        resource_path: &str,
        name: &str,
        namespace: &str,
    ) -> Self {
        let details = kind.map(|kind| details_for(kind, name));
        match code {
            404 => match kind {
                Some(kind) => Self::not_found(kind, name),
                None => Self::path_not_found(),
            },
            409 => match (kind, verb) {
                (Some(kind), "create") => Self::already_exists(kind, name),
                (Some(kind), _) => Self::conflict(kind, name),
                (None, _) => Self::new(409, "Conflict", "the server reported a conflict".to_string(), None),
            },
            403 => {
                let group_resource = kind.map(ResourceKind::group_resource).unwrap_or_default();
                let group = kind.map(ResourceKind::group).unwrap_or_default();
                let subject = if name.is_empty() {
                    group_resource
                } else {
                    format!("{group_resource} \"{name}\"")
                };
                let message = format!(
                    "{subject} is forbidden: User \"system:anonymous\" cannot {verb} resource \
                     \"{resource_path}\" in API group \"{group}\" in the namespace \"{namespace}\""
                );
                Self::new(403, "Forbidden", message, details)
            }
            429 => {
                let mut error = Self::new(
                    429,
                    "TooManyRequests",
                    "the server has received too many requests and has asked us to try again later".to_string(),
                    Some(StatusDetails { retry_after_seconds: Some(1), ..StatusDetails::default() }),
                );
                error.retry_after = Some(1);
                error
            }
            503 => {
                let mut error = Self::new(
                    503,
                    "ServiceUnavailable",
                    "the server is currently unable to handle the request".to_string(),
                    details,
                );
                error.retry_after = Some(1);
                error
            }
            500 => {
                let cause = "fakekube injected fault".to_string();
                Self::new(
                    500,
                    "InternalError",
                    format!("Internal error occurred: {cause}"),
                    Some(StatusDetails {
                        causes: Some(vec![StatusCause { message: Some(cause), ..StatusCause::default() }]),
                        ..StatusDetails::default()
                    }),
                )
            }
            other => Self::new(
                other,
                if other >= 500 { "InternalError" } else { "" },
                format!("the server responded with the status code {other} but did not return more information"),
                details,
            ),
        }
    }

    pub(super) fn to_json(&self) -> Value {
        serde_json::to_value(&self.status).expect("Status always serializes")
    }
}

/// The body of a successful DELETE of an object that the registry deletes at once:
/// a Success Status naming the object, as the generic registry store returns it.
pub(super) fn delete_success(kind: ResourceKind, name: &str, uid: &str) -> Value {
    let status = Status {
        details: Some(StatusDetails {
            uid: (!uid.is_empty()).then(|| uid.to_string()),
            ..details_for(kind, name)
        }),
        status: Some("Success".to_string()),
        ..Status::default()
    };
    serde_json::to_value(&status).expect("Status always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_patch_failure_body_matches_apiserver() {
        let body = ApiError::json_patch_apply_failed().to_json();
        let expected = serde_json::json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "the server rejected our request due to an error in our request",
            "reason": "Invalid",
            "details": {},
            "code": 422
        });
        assert_eq!(body, expected);
    }

    #[test]
    fn conflict_message_names_group_resource() {
        let error = ApiError::conflict(ResourceKind::Deployment, "echo");
        assert_eq!(error.code, 409);
        let message = error.status.message.unwrap();
        assert!(
            message.starts_with("Operation cannot be fulfilled on deployments.apps \"echo\""),
            "{message}"
        );
    }
}
