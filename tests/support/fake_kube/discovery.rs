//! Legacy (non-aggregated) discovery documents and /version.
//!
//! Clients that ask for aggregated discovery (apidiscovery.k8s.io/v2, as kubectl
//! 1.32 does first) get these documents with Content-Type application/json, which
//! client-go takes as "aggregated discovery not supported" and falls back to the
//! per-group-version documents.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    APIGroup, APIGroupList, APIResource, APIResourceList, APIVersions, GroupVersionForDiscovery,
    ServerAddressByClientCIDR,
};
use k8s_openapi::apimachinery::pkg::version::Info;
use serde_json::Value;

use super::resources::{ResourceKind, ALL_KINDS};
use super::Verb;

/// API groups listed by /apis.
const GROUPS: [&str; 4] = [
    "apps",
    "coordination.k8s.io",
    "discovery.k8s.io",
    "events.k8s.io",
];

/// API groups with discovery documents. autoscaling/v1 has none of its own
/// resources here (Scale is only a subresource of deployments), and client-go
/// reports a listed group version without resources as a discovery failure, so
/// /apis leaves it out while /apis/autoscaling/v1 still answers.
const SERVED_GROUPS: [&str; 5] = [
    "apps",
    "autoscaling",
    "coordination.k8s.io",
    "discovery.k8s.io",
    "events.k8s.io",
];

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("discovery documents serialize")
}

fn verbs(list: &[Verb]) -> Vec<String> {
    let mut names: Vec<String> = list.iter().map(|verb| verb.as_str().to_string()).collect();
    names.sort();
    names
}

fn resource_entry(kind: ResourceKind) -> APIResource {
    let strings =
        |items: &[&str]| (!items.is_empty()).then(|| items.iter().map(|s| s.to_string()).collect());
    APIResource {
        name: kind.plural().to_string(),
        singular_name: kind.singular().to_string(),
        namespaced: true,
        kind: kind.kind().to_string(),
        verbs: verbs(kind.verbs()),
        short_names: strings(kind.short_names()),
        categories: strings(kind.categories()),
        ..APIResource::default()
    }
}

fn resource_list(group: &str, version: &str) -> Option<Value> {
    if version != "v1" || !(group.is_empty() || SERVED_GROUPS.contains(&group)) {
        return None;
    }
    let mut resources: Vec<APIResource> = ALL_KINDS
        .into_iter()
        .filter(|kind| kind.group() == group)
        .map(resource_entry)
        .collect();
    if group == "apps" {
        resources.push(APIResource {
            name: "deployments/scale".to_string(),
            singular_name: String::new(),
            namespaced: true,
            group: Some("autoscaling".to_string()),
            version: Some("v1".to_string()),
            kind: "Scale".to_string(),
            verbs: verbs(&[Verb::Get, Verb::Patch, Verb::Update]),
            ..APIResource::default()
        });
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(to_json(&APIResourceList {
        group_version,
        resources,
    }))
}

fn group_document(group: &str) -> APIGroup {
    let version = GroupVersionForDiscovery {
        group_version: format!("{group}/v1"),
        version: "v1".to_string(),
    };
    APIGroup {
        name: group.to_string(),
        preferred_version: Some(version.clone()),
        versions: vec![version],
        server_address_by_client_cidrs: None,
    }
}

/// Returns the discovery document at `path`, or None if the path is not a
/// discovery path.
pub(super) fn document(path: &str, server_address: &str) -> Option<Value> {
    let segments: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match segments.as_slice() {
        ["version"] => Some(to_json(&Info {
            major: "1".to_string(),
            minor: "33".to_string(),
            git_version: "v1.33.0-fakekube".to_string(),
            git_commit: "0000000000000000000000000000000000000000".to_string(),
            git_tree_state: "clean".to_string(),
            build_date: "2025-04-23T00:00:00Z".to_string(),
            go_version: "go1.24.2".to_string(),
            compiler: "gc".to_string(),
            platform: "linux/amd64".to_string(),
            ..Info::default()
        })),
        ["api"] => Some(to_json(&APIVersions {
            versions: vec!["v1".to_string()],
            server_address_by_client_cidrs: vec![ServerAddressByClientCIDR {
                client_cidr: "0.0.0.0/0".to_string(),
                server_address: server_address.to_string(),
            }],
        })),
        ["api", version] => resource_list("", version),
        ["apis"] => Some(to_json(&APIGroupList {
            groups: GROUPS.iter().map(|g| group_document(g)).collect(),
        })),
        ["apis", group] if SERVED_GROUPS.contains(group) => Some(to_json(&group_document(group))),
        ["apis", group, version] => resource_list(group, version),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apps_lists_scale_subresource() {
        let list = document("/apis/apps/v1", "127.0.0.1:1").unwrap();
        let names: Vec<&str> = list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["deployments", "deployments/scale"]);
    }

    #[test]
    fn unknown_group_has_no_document() {
        assert!(document("/apis/batch/v1", "127.0.0.1:1").is_none());
        assert!(document("/openapi/v2", "127.0.0.1:1").is_none());
    }
}
