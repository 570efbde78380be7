//! The TOML schema as written, before defaults and checks.
//!
//! Every field is optional and keeps its span, so that the checks in `validate` can point
//! at the offending value and a missing key can be reported in its own words.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, Visitor};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::error::{key_segment, service_name_at, Diagnostics, ServiceContext};

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a TOML document")]
pub(super) struct RawConfig {
    pub server: Option<RawServer>,
    pub log: Option<RawLog>,
    pub defaults: Option<RawSettings>,
    pub service: Option<Vec<Spanned<RawService>>>,
    pub kubernetes: Option<RawKubernetes>,
    pub openai: Option<Spanned<RawOpenAi>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawOpenAi {
    pub hosts: Option<Spanned<Vec<Spanned<String>>>>,
    pub max_body_prefix: Option<Spanned<Count>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawServer {
    pub listen: Option<Spanned<String>>,
    pub admin_listen: Option<Spanned<String>>,
    pub max_total_queued: Option<Spanned<Count>>,
    pub drain_delay: Option<Spanned<DurationValue>>,
    pub shutdown_grace: Option<Spanned<DurationValue>>,
    pub threads: Option<Spanned<Count>>,
    pub tls: Option<Spanned<RawTls>>,
    pub admin_token: Option<Spanned<String>>,
    pub admin_token_file: Option<Spanned<String>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawTls {
    pub cert_file: Option<Spanned<String>>,
    pub key_file: Option<Spanned<String>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawLog {
    pub format: Option<Spanned<String>>,
    pub filter: Option<Spanned<String>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawKubernetes {
    pub kubeconfig: Option<Spanned<String>>,
    pub namespace: Option<Spanned<String>>,
    pub lease_namespace: Option<Spanned<String>>,
    pub leader_lease: Option<Spanned<String>>,
    pub lease_duration: Option<Spanned<DurationValue>>,
    pub activity_interval: Option<Spanned<DurationValue>>,
    pub identity: Option<Spanned<String>>,
}

/// The `[defaults]` table, and the same keys as overrides in a `[[service]]` entry.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawSettings {
    pub queue_timeout: Option<Spanned<DurationValue>>,
    pub max_queued_requests: Option<Spanned<Count>>,
    pub idle_timeout: Option<Spanned<DurationValue>>,
    pub max_concurrency_per_endpoint: Option<Spanned<Count>>,
    pub startup_timeout: Option<Spanned<DurationValue>>,
    pub probe_interval: Option<Spanned<DurationValue>>,
    pub probe_timeout: Option<Spanned<DurationValue>>,
    pub connect_timeout: Option<Spanned<DurationValue>>,
    pub keep_warm: Option<Spanned<Vec<Spanned<String>>>>,
}

// The settings keys are written out again instead of `#[serde(flatten)]`, because serde
// does not support `flatten` together with `deny_unknown_fields`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawService {
    pub name: Option<Spanned<String>>,
    pub hosts: Option<Spanned<Vec<Spanned<String>>>>,
    pub path_prefix: Option<Spanned<String>>,
    pub readiness_path: Option<Spanned<String>>,
    pub protocol: Option<Spanned<String>>,
    pub readiness_probe: Option<Spanned<String>>,
    pub models: Option<Spanned<Vec<Spanned<String>>>>,
    pub queue_timeout: Option<Spanned<DurationValue>>,
    pub max_queued_requests: Option<Spanned<Count>>,
    pub idle_timeout: Option<Spanned<DurationValue>>,
    pub max_concurrency_per_endpoint: Option<Spanned<Count>>,
    pub startup_timeout: Option<Spanned<DurationValue>>,
    pub probe_interval: Option<Spanned<DurationValue>>,
    pub probe_timeout: Option<Spanned<DurationValue>>,
    pub connect_timeout: Option<Spanned<DurationValue>>,
    pub keep_warm: Option<Spanned<Vec<Spanned<String>>>>,
    pub process: Option<Spanned<RawProcess>>,
    pub kubernetes: Option<Spanned<RawServiceKubernetes>>,
}

impl RawService {
    /// Returns the settings keys that this service overrides.
    pub fn overrides(&self) -> RawSettings {
        RawSettings {
            queue_timeout: self.queue_timeout.clone(),
            max_queued_requests: self.max_queued_requests.clone(),
            idle_timeout: self.idle_timeout.clone(),
            max_concurrency_per_endpoint: self.max_concurrency_per_endpoint.clone(),
            startup_timeout: self.startup_timeout.clone(),
            probe_interval: self.probe_interval.clone(),
            probe_timeout: self.probe_timeout.clone(),
            connect_timeout: self.connect_timeout.clone(),
            keep_warm: self.keep_warm.clone(),
        }
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawProcess {
    pub command: Option<Spanned<String>>,
    pub args: Option<Vec<Spanned<String>>>,
    pub env: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    pub working_dir: Option<Spanned<String>>,
    pub stop_grace: Option<Spanned<DurationValue>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawServiceKubernetes {
    pub namespace: Option<Spanned<String>>,
    pub deployment: Option<Spanned<String>>,
    pub service: Option<Spanned<String>>,
    pub port: Option<Spanned<PortValue>>,
    pub replicas: Option<Spanned<Count>>,
}

/// A port as written, before the range and name checks. A number is an i128 so that any
/// TOML integer fits, and an out-of-range one is reported with its value.
#[derive(Debug, Clone)]
pub(super) enum PortValue {
    Number(i128),
    Name(String),
}

impl<'de> Deserialize<'de> for PortValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PortVisitor)
    }
}

struct PortVisitor;

impl Visitor<'_> for PortVisitor {
    type Value = PortValue;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a port number such as 8080 or a port name such as \"http\"")
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<PortValue, E> {
        Ok(PortValue::Number(value.into()))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<PortValue, E> {
        Ok(PortValue::Number(value.into()))
    }

    fn visit_i128<E: de::Error>(self, value: i128) -> Result<PortValue, E> {
        Ok(PortValue::Number(value))
    }

    fn visit_u128<E: de::Error>(self, value: u128) -> Result<PortValue, E> {
        // Any value above i128::MAX is out of range just the same.
        Ok(PortValue::Number(
            i128::try_from(value).unwrap_or(i128::MAX),
        ))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<PortValue, E> {
        Ok(PortValue::Name(value.to_owned()))
    }
}

/// A duration string, parsed by [`super::duration::deserialize`].
#[derive(Debug, Clone, Copy)]
pub(super) struct DurationValue(pub Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        super::duration::deserialize(deserializer).map(DurationValue)
    }
}

/// A non-negative integer. It has its own type so that `-1` fails with "expected a
/// non-negative integer" instead of serde's "expected u64".
#[derive(Debug, Clone, Copy)]
pub(super) struct Count(pub u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_u64(CountVisitor)
    }
}

struct CountVisitor;

impl Visitor<'_> for CountVisitor {
    type Value = Count;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a non-negative integer")
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Count, E> {
        Ok(Count(value))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Count, E> {
        u64::try_from(value)
            .map(Count)
            .map_err(|_| E::invalid_value(de::Unexpected::Signed(value), &self))
    }

    // toml hands integers that do not fit in i64 over as i128.
    fn visit_i128<E: de::Error>(self, value: i128) -> Result<Count, E> {
        if value < 0 {
            return Err(E::custom(format!(
                "invalid value {value}: expected a non-negative integer"
            )));
        }
        u64::try_from(value).map(Count).map_err(|_| {
            E::custom(format!(
                "invalid value {value}: too large, the maximum is {}",
                u64::MAX
            ))
        })
    }

    fn visit_u128<E: de::Error>(self, value: u128) -> Result<Count, E> {
        u64::try_from(value).map(Count).map_err(|_| {
            E::custom(format!(
                "invalid value {value}: too large, the maximum is {}",
                u64::MAX
            ))
        })
    }
}

/// Returns the field names that the derived `Deserialize` of `T` accepts, in declaration
/// order. Reading them from the derive keeps the unknown-key messages in step with the
/// structs above.
fn struct_fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    // The capture always ends with an error, after it has recorded the fields.
    let _ = T::deserialize(FieldCapture(&mut fields));
    fields
}

struct FieldCapture<'a>(&'a mut &'static [&'static str]);

impl<'de> Deserializer<'de> for FieldCapture<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("field capture supports only structs"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("fields captured"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// A table of the schema: its name as written in a config file, the dotted path of its
/// keys in diagnostics, the keys it accepts, and whether it sits inside `[[service]]`.
struct TableSchema {
    label: &'static str,
    key_prefix: &'static str,
    fields: &'static [&'static str],
    in_service: bool,
}

fn schema_tables() -> [TableSchema; 10] {
    [
        TableSchema {
            label: "the top level",
            key_prefix: "",
            fields: struct_fields::<RawConfig>(),
            in_service: false,
        },
        TableSchema {
            label: "[server]",
            key_prefix: "server.",
            fields: struct_fields::<RawServer>(),
            in_service: false,
        },
        TableSchema {
            label: "[server.tls]",
            key_prefix: "server.tls.",
            fields: struct_fields::<RawTls>(),
            in_service: false,
        },
        TableSchema {
            label: "[log]",
            key_prefix: "log.",
            fields: struct_fields::<RawLog>(),
            in_service: false,
        },
        TableSchema {
            label: "[defaults]",
            key_prefix: "defaults.",
            fields: struct_fields::<RawSettings>(),
            in_service: false,
        },
        TableSchema {
            label: "[kubernetes]",
            key_prefix: "kubernetes.",
            fields: struct_fields::<RawKubernetes>(),
            in_service: false,
        },
        TableSchema {
            label: "[openai]",
            key_prefix: "openai.",
            fields: struct_fields::<RawOpenAi>(),
            in_service: false,
        },
        TableSchema {
            label: "[[service]]",
            key_prefix: "",
            fields: struct_fields::<RawService>(),
            in_service: true,
        },
        TableSchema {
            label: "[service.process]",
            key_prefix: "process.",
            fields: struct_fields::<RawProcess>(),
            in_service: true,
        },
        TableSchema {
            label: "[service.kubernetes]",
            key_prefix: "kubernetes.",
            fields: struct_fields::<RawServiceKubernetes>(),
            in_service: true,
        },
    ]
}

/// Reports every key that its table does not accept, pointing at the key itself.
///
/// This runs before deserialization, which would stop at the first unknown key, so that one
/// run lists them all. Tables of the wrong type are skipped here and reported by
/// deserialization.
pub(super) fn check_unknown_keys(root: &DeTable<'_>, diagnostics: &mut Diagnostics<'_>) {
    let tables = schema_tables();
    let [top, server, server_tls, log, defaults, kubernetes, openai, service, process, service_kubernetes] = &tables;

    check_table(root, top, None, &tables, diagnostics);
    for (name, schema) in [
        ("server", server),
        ("log", log),
        ("defaults", defaults),
        ("kubernetes", kubernetes),
        ("openai", openai),
    ] {
        if let Some(DeValue::Table(table)) = root.get(name).map(Spanned::get_ref) {
            check_table(table, schema, None, &tables, diagnostics);
        }
    }
    if let Some(DeValue::Table(server_table)) = root.get("server").map(Spanned::get_ref) {
        if let Some(DeValue::Table(table)) = server_table.get("tls").map(Spanned::get_ref) {
            check_table(table, server_tls, None, &tables, diagnostics);
        }
    }

    let Some(DeValue::Array(entries)) = root.get("service").map(Spanned::get_ref) else {
        return;
    };
    for (index, entry) in entries.iter().enumerate() {
        let DeValue::Table(entry) = entry.get_ref() else {
            continue;
        };
        let context = ServiceContext {
            index,
            name: service_name_at(root, index),
        };
        check_table(entry, service, Some(&context), &tables, diagnostics);
        for (name, schema) in [("process", process), ("kubernetes", service_kubernetes)] {
            if let Some(DeValue::Table(table)) = entry.get(name).map(Spanned::get_ref) {
                check_table(table, schema, Some(&context), &tables, diagnostics);
            }
        }
    }
}

fn check_table(
    table: &DeTable<'_>,
    schema: &TableSchema,
    service: Option<&ServiceContext>,
    all_tables: &[TableSchema],
    diagnostics: &mut Diagnostics<'_>,
) {
    for (key, _) in table.iter() {
        let name = key.get_ref().as_ref();
        if schema.fields.contains(&name) {
            continue;
        }

        let mut message = format!(
            "unknown key; {} accepts {}",
            schema.label,
            schema.fields.join(", ")
        );
        if let Some(suggestion) = closest_field(name, schema.fields) {
            message.push_str(&format!("; did you mean {suggestion:?}?"));
        } else if let Some(home) = all_tables
            .iter()
            .filter(|other| other.label != schema.label && other.fields.contains(&name))
            // A key such as "namespace" belongs in both [kubernetes] and
            // [service.kubernetes], so name the one on the same side of [[service]].
            .min_by_key(|other| other.in_service != schema.in_service)
        {
            message.push_str(&format!("; {name:?} belongs in {}", home.label));
        } else {
            message.push_str("; remove it or correct its spelling");
        }

        diagnostics.push(
            key.span(),
            service,
            format!("{}{}", schema.key_prefix, key_segment(name)),
            message,
        );
    }
}

/// Returns the accepted field closest to `name` when `name` is likely a typo of it: one
/// character edit apart, or two for fields of 8 characters or more.
fn closest_field(name: &str, fields: &[&'static str]) -> Option<&'static str> {
    fields
        .iter()
        .map(|field| (edit_distance(name, field), *field))
        .filter(|(distance, field)| *distance <= (field.len() / 4).clamp(1, 2))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, field)| field)
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, a_char) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, b_char) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(a_char != *b_char);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_fields_reads_declaration_order() {
        assert_eq!(
            struct_fields::<RawServer>(),
            [
                "listen",
                "admin_listen",
                "max_total_queued",
                "drain_delay",
                "shutdown_grace",
                "threads",
                "tls",
                "admin_token",
                "admin_token_file"
            ]
        );
        assert_eq!(
            struct_fields::<RawConfig>(),
            ["server", "log", "defaults", "service", "kubernetes", "openai"]
        );
    }

    #[test]
    fn service_accepts_every_defaults_key() {
        let service_fields = struct_fields::<RawService>();
        for field in struct_fields::<RawSettings>() {
            assert!(
                service_fields.contains(field),
                "[[service]] does not accept {field}"
            );
        }
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("listen", "listen"), 0);
        assert_eq!(edit_distance("lisen", "listen"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("queue_timout", "queue_timeout"), 1);
    }
}
