//! Label and field selectors in the query-string syntax of the API server.

use std::collections::BTreeMap;

use serde_json::Value;

use super::resources::{lookup_path, meta_str, ResourceKind};

#[derive(Clone, Debug, PartialEq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed `labelSelector`. The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

/// Splits on commas that are not inside parentheses, so `a in (x,y),b` has two terms.
fn split_terms(selector: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (index, ch) in selector.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&selector[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    terms
        .into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn validate_key(key: &str, selector: &str) -> Result<String, String> {
    let valid = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if valid {
        Ok(key.to_string())
    } else {
        Err(format!(
            "unable to parse requirement: invalid label key {key:?} in selector {selector:?}"
        ))
    }
}

fn parse_set(values: &str, selector: &str) -> Result<Vec<String>, String> {
    let inner = values
        .trim()
        .strip_prefix('(')
        .and_then(|v| v.strip_suffix(')'))
        .ok_or_else(|| {
            format!("found '{values}', expected: '(' and ')' in selector {selector:?}")
        })?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    pub(super) fn parse(selector: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in split_terms(selector) {
            let requirement = if let Some(key) = term.strip_prefix('!') {
                LabelRequirement::NotExists(validate_key(key.trim(), selector)?)
            } else if let Some((key, values)) = term.split_once(" notin ") {
                LabelRequirement::NotIn(
                    validate_key(key.trim(), selector)?,
                    parse_set(values, selector)?,
                )
            } else if let Some((key, values)) = term.split_once(" in ") {
                LabelRequirement::In(
                    validate_key(key.trim(), selector)?,
                    parse_set(values, selector)?,
                )
            } else if let Some((key, value)) = term.split_once("!=") {
                LabelRequirement::NotEquals(
                    validate_key(key.trim(), selector)?,
                    value.trim().to_string(),
                )
            } else if let Some((key, value)) = term.split_once("==") {
                LabelRequirement::Equals(
                    validate_key(key.trim(), selector)?,
                    value.trim().to_string(),
                )
            } else if let Some((key, value)) = term.split_once('=') {
                LabelRequirement::Equals(
                    validate_key(key.trim(), selector)?,
                    value.trim().to_string(),
                )
            } else {
                LabelRequirement::Exists(validate_key(term, selector)?)
            };
            requirements.push(requirement);
        }
        Ok(LabelSelector { requirements })
    }

    pub(super) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements
            .iter()
            .all(|requirement| match requirement {
                LabelRequirement::Equals(k, v) => labels.get(k) == Some(v),
                LabelRequirement::NotEquals(k, v) => labels.get(k) != Some(v),
                LabelRequirement::Exists(k) => labels.contains_key(k),
                LabelRequirement::NotExists(k) => !labels.contains_key(k),
                LabelRequirement::In(k, values) => {
                    labels.get(k).is_some_and(|v| values.contains(v))
                }
                LabelRequirement::NotIn(k, values) => {
                    labels.get(k).is_none_or(|v| !values.contains(v))
                }
            })
    }
}

/// Field paths that the API server accepts in a fieldSelector for each kind
/// (a subset of the real lists: the ones a client of this fake is likely to use).
fn supported_fields(kind: ResourceKind) -> &'static [&'static str] {
    match kind {
        ResourceKind::Pod => &[
            "metadata.name",
            "metadata.namespace",
            "spec.nodeName",
            "status.phase",
            "status.podIP",
        ],
        ResourceKind::CoreEvent => &[
            "metadata.name",
            "metadata.namespace",
            "involvedObject.kind",
            "involvedObject.name",
            "involvedObject.namespace",
            "involvedObject.uid",
            "reason",
            "type",
        ],
        ResourceKind::EventsEvent => &[
            "metadata.name",
            "metadata.namespace",
            "regarding.kind",
            "regarding.name",
            "regarding.namespace",
            "regarding.uid",
            "reason",
            "type",
        ],
        _ => &["metadata.name", "metadata.namespace"],
    }
}

/// A parsed `fieldSelector` of `path=value`, `path==value` and `path!=value` terms.
#[derive(Clone, Debug, Default)]
pub(super) struct FieldSelector {
    terms: Vec<(String, String, bool)>,
}

impl FieldSelector {
    pub(super) fn parse(kind: ResourceKind, selector: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in split_terms(selector) {
            let (path, value, equal) = if let Some((p, v)) = term.split_once("!=") {
                (p, v, false)
            } else if let Some((p, v)) = term.split_once("==") {
                (p, v, true)
            } else if let Some((p, v)) = term.split_once('=') {
                (p, v, true)
            } else {
                return Err(format!(
                    "invalid selector: '{selector}'; can't understand '{term}'"
                ));
            };
            let path = path.trim();
            if !supported_fields(kind).contains(&path) {
                return Err(format!("field label not supported: {path}"));
            }
            terms.push((path.to_string(), value.trim().to_string(), equal));
        }
        Ok(FieldSelector { terms })
    }

    pub(super) fn matches(&self, object: &Value) -> bool {
        self.terms.iter().all(|(path, expected, equal)| {
            let actual = match path.as_str() {
                "metadata.name" => meta_str(object, "name"),
                "metadata.namespace" => meta_str(object, "namespace"),
                other => lookup_path(object, other)
                    .and_then(Value::as_str)
                    .unwrap_or(""),
            };
            (actual == expected) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn equality_terms() {
        let selector = LabelSelector::parse("app=echo,tier!=db,owner").unwrap();
        assert!(selector.matches(&labels(&[("app", "echo"), ("owner", "x")])));
        assert!(!selector.matches(&labels(&[("app", "echo"), ("owner", "x"), ("tier", "db")])));
        assert!(!selector.matches(&labels(&[("app", "echo")])));
        assert!(!selector.matches(&labels(&[("app", "other"), ("owner", "x")])));
    }

    #[test]
    fn set_terms() {
        let selector = LabelSelector::parse("app in (a, b),!legacy,tier notin (db)").unwrap();
        assert!(selector.matches(&labels(&[("app", "b")])));
        assert!(!selector.matches(&labels(&[("app", "c")])));
        assert!(!selector.matches(&labels(&[("app", "a"), ("legacy", "1")])));
        assert!(!selector.matches(&labels(&[("app", "a"), ("tier", "db")])));
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(LabelSelector::parse("").unwrap().matches(&labels(&[])));
    }

    #[test]
    fn field_selector_rejects_unknown_field() {
        let error = FieldSelector::parse(ResourceKind::Lease, "spec.holderIdentity=x").unwrap_err();
        assert_eq!(error, "field label not supported: spec.holderIdentity");
    }

    #[test]
    fn field_selector_by_name() {
        let selector = FieldSelector::parse(ResourceKind::Lease, "metadata.name=a").unwrap();
        assert!(selector.matches(&serde_json::json!({"metadata": {"name": "a"}})));
        assert!(!selector.matches(&serde_json::json!({"metadata": {"name": "b"}})));
    }
}
