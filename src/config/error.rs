//! Errors of `parse` and `load`, and the helpers that give each one a line, a column and a
//! key path.

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use toml::de::{DeTable, DeValue};

/// Error from [`super::parse`] or [`super::load`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: failed to read the config file: {source}; check the path and its permissions", path.display())]
    Read {
        path: PathBuf,
        // Arc because io::Error is not Clone.
        #[source]
        source: Arc<io::Error>,
    },
    /// The text was read but is not a valid configuration. Contains at least one diagnostic,
    /// sorted by position. `Display` writes one diagnostic per line.
    #[error("{}", DisplayLines(.0))]
    Invalid(Vec<Diagnostic>),
}

impl ConfigError {
    /// Returns the located problems; empty for [`ConfigError::Read`].
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid(diagnostics) => diagnostics,
        }
    }
}

/// One problem in the configuration text, with its position.
///
/// `Display` writes `source:line:column: service "name": key: message`, leaving out the
/// service part outside `[[service]]` and the key part when no key is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// File name given to `parse`, or the path given to `load`.
    pub source: String,
    /// 1-based line of the offending key or value.
    pub line: usize,
    /// 1-based column in characters (not bytes); a tab counts as one.
    pub column: usize,
    /// 0-based position of the `[[service]]` entry when the problem is inside one.
    pub service_index: Option<usize>,
    /// Name of that service, when its `name` is a string.
    pub service_name: Option<String>,
    /// Dotted key path, relative to the `[[service]]` entry when `service_index` is set
    /// (`queue_timeout`, `process.command`, `hosts[1]`) and to the document otherwise
    /// (`server.listen`). For syntax errors the path is a best guess from the text around
    /// the error, and it is empty when nothing could be guessed.
    pub key: String,
    /// Description of the problem and its fix.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}:{}:{}: ", self.source, self.line, self.column)?;
        match (&self.service_name, self.service_index) {
            (Some(name), _) => write!(formatter, "service {name:?}: ")?,
            (None, Some(index)) => write!(formatter, "service #{}: ", index + 1)?,
            (None, None) => {}
        }
        if !self.key.is_empty() {
            write!(formatter, "{}: ", self.key)?;
        }
        formatter.write_str(&self.message)
    }
}

struct DisplayLines<'a>(&'a [Diagnostic]);

impl fmt::Display for DisplayLines<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.0.iter().enumerate() {
            if i > 0 {
                formatter.write_str("\n")?;
            }
            write!(formatter, "{diagnostic}")?;
        }
        Ok(())
    }
}

/// The `[[service]]` entry that a diagnostic belongs to.
#[derive(Debug, Clone)]
pub(super) struct ServiceContext {
    pub index: usize,
    pub name: Option<String>,
}

/// Collects diagnostics for one document and turns byte spans into lines and columns.
pub(super) struct Diagnostics<'a> {
    source: &'a str,
    text: &'a str,
    /// Byte offset at which each line starts, so that finding a line is a binary search:
    /// validation asks for the line of every host and name, and a scan from the start of
    /// the text each time made start-up quadratic in the number of services.
    line_starts: Vec<usize>,
    items: Vec<Diagnostic>,
}

impl<'a> Diagnostics<'a> {
    pub fn new(source: &'a str, text: &'a str) -> Self {
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(newline, _)| newline + 1)).collect();
        Diagnostics {
            source,
            text,
            line_starts,
            items: Vec::new(),
        }
    }

    pub fn push(
        &mut self,
        span: Range<usize>,
        service: Option<&ServiceContext>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let line = self.line_of(span.start);
        let column = column_in_line(self.text, self.line_starts[line - 1], span.start);
        self.items.push(Diagnostic {
            source: self.source.to_owned(),
            line,
            column,
            service_index: service.map(|service| service.index),
            service_name: service.and_then(|service| service.name.clone()),
            key: key.into(),
            message: message.into(),
        });
    }

    /// Returns the 1-based line of a byte offset, for messages that point at another line.
    pub fn line_of(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&start| start <= offset)
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Returns every collected diagnostic, sorted by position. Call it only when
    /// `is_empty` is false.
    pub fn into_error(mut self) -> ConfigError {
        self.items
            .sort_by_key(|diagnostic| (diagnostic.line, diagnostic.column));
        ConfigError::Invalid(self.items)
    }
}

/// Returns the 1-based column, counted in characters, of a byte offset in the line that
/// starts at `line_start`.
fn column_in_line(text: &str, line_start: usize, offset: usize) -> usize {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    text[line_start..offset.max(line_start)].chars().count() + 1
}

/// Formats one key for a dotted path, quoting it when it is not a bare TOML key.
pub(super) fn key_segment(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

enum PathSegment {
    Key(String),
    Index(usize),
}

/// Finds the key path of the innermost key or value whose span contains `span`, and the
/// `[[service]]` entry it is in, so that an error from the toml deserializer can name the
/// key like the checks that run after it.
pub(super) fn locate(root: &DeTable<'_>, span: &Range<usize>) -> (Option<ServiceContext>, String) {
    let mut path = Vec::new();
    if !locate_in_table(root, span, &mut path) {
        return (None, String::new());
    }

    let service = match (path.first(), path.get(1)) {
        (Some(PathSegment::Key(key)), Some(PathSegment::Index(index))) if key == "service" => {
            Some(ServiceContext {
                index: *index,
                name: service_name_at(root, *index),
            })
        }
        _ => None,
    };
    let relative = if service.is_some() {
        &path[2..]
    } else {
        &path[..]
    };

    let mut key = String::new();
    for segment in relative {
        match segment {
            PathSegment::Key(name) => {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(&key_segment(name));
            }
            PathSegment::Index(index) => key.push_str(&format!("[{index}]")),
        }
    }
    (service, key)
}

/// Returns the `name` string of the `index`-th `[[service]]` entry, if it has one.
pub(super) fn service_name_at(root: &DeTable<'_>, index: usize) -> Option<String> {
    let services = root.get("service")?.get_ref().as_array()?;
    let service = services.get(index)?.get_ref().as_table()?;
    let name = service.get("name")?.get_ref().as_str()?;
    Some(name.to_owned())
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

fn locate_in_table(table: &DeTable<'_>, span: &Range<usize>, path: &mut Vec<PathSegment>) -> bool {
    for (key, value) in table.iter() {
        path.push(PathSegment::Key(key.get_ref().to_string()));
        // Children first, because a table's own span may be just its header while its
        // keys sit on the following lines.
        if locate_in_value(value.get_ref(), span, path)
            || contains(&key.span(), span)
            || contains(&value.span(), span)
        {
            return true;
        }
        path.pop();
    }
    false
}

fn locate_in_value(value: &DeValue<'_>, span: &Range<usize>, path: &mut Vec<PathSegment>) -> bool {
    match value {
        DeValue::Table(table) => locate_in_table(table, span, path),
        DeValue::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                path.push(PathSegment::Index(index));
                if locate_in_value(item.get_ref(), span, path) || contains(&item.span(), span) {
                    return true;
                }
                path.pop();
            }
            false
        }
        _ => false,
    }
}

/// Guesses the dotted key path for a syntax error at `offset` from the text alone, because
/// no parsed tree exists yet: the last `[table]` header above the error, plus the key left
/// of `=` on the error's line.
///
/// NOTE: this reads single lines, so an error inside a multi-line array or string gets only
/// the table part, and a key inside `[[service]]` is reported as `service.<key>` without the
/// entry's position.
pub(super) fn guess_syntax_error_key(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |newline| newline + 1);
    let line_end = text[offset..]
        .find('\n')
        .map_or(text.len(), |newline| offset + newline);
    let line = text[line_start..line_end].trim();

    if line.starts_with('[') {
        return header_name(line).unwrap_or_default();
    }

    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| line.starts_with('['))
        .and_then(header_name);

    let key = line
        .split_once('=')
        .map(|(key, _)| key.trim())
        .filter(|key| {
            !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.\"' ".contains(c))
        });

    match (table, key) {
        (Some(table), Some(key)) => format!("{table}.{key}"),
        (Some(table), None) => table,
        (None, Some(key)) => key.to_owned(),
        (None, None) => String::new(),
    }
}

/// Returns the table name of a `[name]` or `[[name]]` header line, if it looks like one.
fn header_name(line: &str) -> Option<String> {
    let inner = line.trim_start_matches('[');
    let inner = inner.split(']').next()?.trim();
    let valid = !inner.is_empty()
        && inner
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.\"' ".contains(c));
    valid.then(|| inner.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_characters() {
        let text = "a = 1\nbé = \"x\"\r\nc = 2";
        let diagnostics = Diagnostics::new("t.toml", text);
        let line_column = |_: &str, offset: usize| {
            let line = diagnostics.line_of(offset.min(text.len()));
            (line, column_in_line(text, diagnostics.line_starts[line - 1], offset))
        };
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 4), (1, 5));
        assert_eq!(line_column(text, 6), (2, 1));
        // "é" is two bytes but one column.
        let x_offset = text.find('"').unwrap();
        assert_eq!(line_column(text, x_offset), (2, 6));
        let c_offset = text.find('c').unwrap();
        assert_eq!(line_column(text, c_offset), (3, 1));
        assert_eq!(line_column(text, text.len() + 10), (3, 6));
    }

    #[test]
    fn guess_key_uses_header_and_line() {
        let text = "[server]\nlisten = 0.0.0.0:80\n";
        let offset = text.find("0.0").unwrap();
        assert_eq!(guess_syntax_error_key(text, offset), "server.listen");
        assert_eq!(guess_syntax_error_key("[server\n", 7), "server");
        assert_eq!(guess_syntax_error_key("x = [1,\n", 7), "x");
        assert_eq!(guess_syntax_error_key("= 1\n", 0), "");
    }

    #[test]
    fn key_segment_quotes_non_bare_keys() {
        assert_eq!(key_segment("queue_timeout"), "queue_timeout");
        assert_eq!(key_segment("a.b"), "\"a.b\"");
        assert_eq!(key_segment(""), "\"\"");
    }
}
