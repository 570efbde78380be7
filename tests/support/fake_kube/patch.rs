//! PATCH bodies: JSON merge patch, JSON patch (RFC 6902), and the strategic merge
//! and apply patch types, which the fake approximates with a merge patch.

use serde_json::Value;

use super::status::ApiError;

/// The patch type, from the request's Content-Type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    /// application/merge-patch+json (RFC 7386).
    Merge,
    /// application/strategic-merge-patch+json, applied here as a merge patch.
    StrategicMerge,
    /// application/json-patch+json (RFC 6902).
    Json,
    /// application/apply-patch+yaml (server-side apply), applied here as a merge
    /// patch of a JSON body.
    Apply,
}

impl PatchType {
    pub(super) fn from_content_type(content_type: &str) -> Result<PatchType, ApiError> {
        let media_type = content_type.split(';').next().unwrap_or("").trim();
        match media_type {
            "application/merge-patch+json" => Ok(PatchType::Merge),
            "application/strategic-merge-patch+json" => Ok(PatchType::StrategicMerge),
            "application/json-patch+json" => Ok(PatchType::Json),
            "application/apply-patch+yaml" => Ok(PatchType::Apply),
            _ => Err(ApiError::unsupported_media_type(content_type)),
        }
    }
}

/// kube-apiserver's limit on operations in one JSON patch (maxJSONPatchOperations).
const MAX_JSON_PATCH_OPERATIONS: usize = 10_000;

/// Removes strategic-merge-patch directives ($patch, $retainKeys,
/// $setElementOrder/..., $deleteFromPrimitiveList/...), which a plain merge patch
/// would otherwise store as fields.
fn strip_directives(value: &mut Value) {
    if let Value::Object(map) = value {
        map.retain(|key, _| !key.starts_with('$'));
        for child in map.values_mut() {
            strip_directives(child);
        }
    }
}

/// Applies `body` to `document` the way kube-apiserver's patch handler does for the
/// status codes: an undecodable patch is 400 BadRequest, and a JSON patch whose
/// operations fail (including a failed `test`) is 422 with the generic Status body.
pub(super) fn apply_patch(
    document: &Value,
    patch_type: PatchType,
    body: &[u8],
) -> Result<Value, ApiError> {
    let mut patched = document.clone();
    match patch_type {
        PatchType::Json => {
            let operations: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|error| ApiError::bad_request(error.to_string()))?;
            if operations.0.len() > MAX_JSON_PATCH_OPERATIONS {
                return Err(ApiError::new(
                    413,
                    "RequestEntityTooLarge",
                    format!(
                        "Request entity too large: The allowed maximum operations in a JSON patch is {MAX_JSON_PATCH_OPERATIONS}, got {}",
                        operations.0.len()
                    ),
                    None,
                ));
            }
            json_patch::patch(&mut patched, &operations.0)
                .map_err(|_| ApiError::json_patch_apply_failed())?;
        }
        PatchType::Merge | PatchType::StrategicMerge | PatchType::Apply => {
            let mut patch: Value = serde_json::from_slice(body).map_err(|error| {
                let message = match patch_type {
                    PatchType::Apply => format!(
                        "error decoding YAML: {error} (fakekube accepts only JSON bodies for apply patches)"
                    ),
                    _ => format!("error decoding patch: {error}"),
                };
                ApiError::bad_request(message)
            })?;
            if !patch.is_object() {
                return Err(ApiError::bad_request(
                    "invalid JSON document: a merge patch must be a JSON object",
                ));
            }
            if patch_type == PatchType::StrategicMerge {
                strip_directives(&mut patch);
            }
            json_patch::merge(&mut patched, &patch);
        }
    }
    Ok(patched)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn failed_test_operation_is_422() {
        let document = json!({"spec": {"replicas": 0}});
        let body = br#"[{"op":"test","path":"/spec/replicas","value":1},{"op":"replace","path":"/spec/replicas","value":2}]"#;
        let error = apply_patch(&document, PatchType::Json, body).unwrap_err();
        assert_eq!(error.code, 422);
    }

    #[test]
    fn passing_test_operation_applies() {
        let document = json!({"spec": {"replicas": 0}});
        let body = br#"[{"op":"test","path":"/spec/replicas","value":0},{"op":"replace","path":"/spec/replicas","value":2}]"#;
        let patched = apply_patch(&document, PatchType::Json, body).unwrap();
        assert_eq!(patched["spec"]["replicas"], 2);
    }

    #[test]
    fn undecodable_json_patch_is_400() {
        let error = apply_patch(&json!({}), PatchType::Json, b"{not json").unwrap_err();
        assert_eq!(error.code, 400);
    }

    #[test]
    fn strategic_directives_are_dropped() {
        let document = json!({"spec": {"replicas": 0}});
        let body = br#"{"$setElementOrder/containers":[{"name":"a"}],"spec":{"replicas":3}}"#;
        let patched = apply_patch(&document, PatchType::StrategicMerge, body).unwrap();
        assert_eq!(patched, json!({"spec": {"replicas": 3}}));
    }

    #[test]
    fn unknown_content_type_is_415() {
        let error = PatchType::from_content_type("application/json").unwrap_err();
        assert_eq!(error.code, 415);
    }
}
