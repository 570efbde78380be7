//! Maps a request's Host and path to a configured service.
//!
//! Only the `Host` header (or the HTTP/2 `:authority`) decides the route. `X-Forwarded-Host`
//! is ignored on purpose: a client could set it to reach any service, which would make
//! coldgate a way around whatever guards the Host-based routes in front of it.

use std::collections::HashMap;

/// Lowercases a Host value and strips its port, or returns `None` when it is not a valid
/// host name, IPv4 or bracketed IPv6 literal.
pub fn normalize_host(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // Bracketed IPv6 literal, optionally followed by ":port".
        let end = rest.find(']')?;
        let after = &rest[end + 1..];
        if !(after.is_empty() || valid_port_suffix(after)) {
            return None;
        }
        &raw[..end + 2]
    } else {
        match raw.rsplit_once(':') {
            Some((name, port)) if valid_port_suffix(&raw[name.len()..]) && !port.is_empty() => name,
            Some(_) => return None,
            None => raw,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > 253 {
        return None;
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '[' | ']' | ':');
    if !host.chars().all(allowed) {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

fn valid_port_suffix(suffix: &str) -> bool {
    suffix
        .strip_prefix(':')
        .is_some_and(|port| !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit()))
}

/// A route table built once per configuration: host -> path prefixes, longest first.
#[derive(Debug, Default, Clone)]
pub struct Router {
    by_host: HashMap<String, Vec<(String, usize)>>,
}

impl Router {
    /// Builds the table from `(host, path_prefix, service index)` triples. Hosts must already
    /// be normalised; the configuration loader lowercases them and rejects ports.
    pub fn new<'a>(routes: impl IntoIterator<Item = (&'a str, &'a str, usize)>) -> Self {
        let mut by_host: HashMap<String, Vec<(String, usize)>> = HashMap::new();
        for (host, prefix, index) in routes {
            by_host
                .entry(host.to_ascii_lowercase())
                .or_default()
                .push((prefix.to_string(), index));
        }
        for prefixes in by_host.values_mut() {
            prefixes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        }
        Router { by_host }
    }

    /// Returns the index of the service for this normalised host and request path. The
    /// longest matching prefix wins; a prefix matches at a segment boundary, so "/v1" matches
    /// "/v1" and "/v1/x" but not "/v1x".
    pub fn route(&self, host: &str, path: &str) -> Option<usize> {
        let prefixes = self.by_host.get(host)?;
        prefixes
            .iter()
            .find(|(prefix, _)| prefix_matches(prefix, path))
            .map(|(_, index)| *index)
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_host_strips_port_and_case() {
        assert_eq!(normalize_host("Iris.Models.LOCAL:8080").as_deref(), Some("iris.models.local"));
        assert_eq!(normalize_host("iris.models.local.").as_deref(), Some("iris.models.local"));
        assert_eq!(normalize_host("127.0.0.1:80").as_deref(), Some("127.0.0.1"));
        assert_eq!(normalize_host("[::1]:8080").as_deref(), Some("[::1]"));
        assert_eq!(normalize_host("[::1]").as_deref(), Some("[::1]"));
    }

    #[test]
    fn normalize_host_rejects_garbage() {
        for bad in ["", ":80", "a b", "host:port", "host:", "[::1", "[::1]x", "a/b", "a@b", "host:123456"] {
            assert_eq!(normalize_host(bad), None, "{bad:?} should be rejected");
        }
    }

    #[test]
    fn router_prefers_longest_prefix() {
        let router = Router::new([("a.local", "/", 0), ("a.local", "/v1", 1), ("a.local", "/v1/chat", 2)]);
        assert_eq!(router.route("a.local", "/other"), Some(0));
        assert_eq!(router.route("a.local", "/v1"), Some(1));
        assert_eq!(router.route("a.local", "/v1/models"), Some(1));
        assert_eq!(router.route("a.local", "/v1/chat/completions"), Some(2));
        assert_eq!(router.route("a.local", "/v1x"), Some(0));
    }

    #[test]
    fn router_unknown_host_is_none() {
        let router = Router::new([("a.local", "/v1", 0)]);
        assert_eq!(router.route("b.local", "/v1"), None);
        assert_eq!(router.route("a.local", "/v2"), None);
    }
}
