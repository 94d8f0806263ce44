//! Reading `pool.toml` with the line of every key: the file is parsed into
//! spanned tables (`toml::de::DeTable`), so a problem points at the line of
//! the key it concerns, dotted keys and inline tables included; a
//! `CLX_POOL_*` variable lays its value over the `[pool]` key of the same
//! name, and a problem with it names the variable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::{DeserializeOwned, IntoDeserializer};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::{Problem, Source};

/// Where a value came from; a relative path from a variable is relative to
/// the current directory, from the file to the file's folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    File,
    Env,
}

struct FileValue<'t> {
    line: usize,
    value: Spanned<DeValue<'t>>,
}

/// One table of the file (`[pool]`, one `[[workers]]` entry), with the
/// `CLX_POOL_*` values laid over it.
pub(super) struct Table<'t> {
    /// `pool`, `workers[1]`.
    pub label: String,
    /// The line of the table's header (or first key), if it is in the file.
    pub line: Option<usize>,
    entries: BTreeMap<String, FileValue<'t>>,
    /// key → (variable name, text).
    env: BTreeMap<String, (String, String)>,
}

/// The file, and every problem found so far.
pub(super) struct Reader<'t> {
    pub path: PathBuf,
    text: &'t str,
    pub problems: Vec<Problem>,
}

impl<'t> Reader<'t> {
    pub fn new(path: &Path, text: &'t str) -> Reader<'t> {
        Reader {
            path: path.to_path_buf(),
            text,
            problems: Vec::new(),
        }
    }

    fn line(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    /// The source text of a value, for messages ("got ..."); a table
    /// written as dotted keys is shown as an inline table.
    fn raw(&self, v: &Spanned<DeValue<'t>>) -> String {
        if let DeValue::Table(t) = v.get_ref() {
            let inner: Vec<String> = t
                .iter()
                .map(|(k, v)| format!("{} = {}", k.get_ref(), self.raw(v)))
                .collect();
            return format!("{{ {} }}", inner.join(", "));
        }
        let span = v.span();
        self.text.get(span.start..span.end).unwrap_or("?").trim().to_string()
    }

    /// Parses the document into its top-level entries; a syntax error is a
    /// problem (with its line) and yields nothing.
    pub fn document(&mut self) -> Option<Table<'t>> {
        match DeTable::parse(self.text) {
            Ok(doc) => Some(self.table("", Some(1), doc.into_inner())),
            Err(e) => {
                let line = e.span().map(|s| self.line(s.start));
                self.problems.push(Problem {
                    source: Source::File {
                        path: self.path.clone(),
                        line,
                    },
                    field: String::new(),
                    message: format!("not valid TOML: {}", e.message().trim()),
                });
                None
            }
        }
    }

    fn table(&self, label: &str, line: Option<usize>, t: DeTable<'t>) -> Table<'t> {
        let entries = t
            .into_iter()
            .map(|(k, v)| {
                let line = self.line(k.span().start);
                (k.into_inner().into_owned(), FileValue { line, value: v })
            })
            .collect();
        Table {
            label: label.to_string(),
            line,
            entries,
            env: BTreeMap::new(),
        }
    }

    /// The sub-table `key` of `parent` (e.g. `[pool]`), empty if absent; a
    /// value of another kind is a problem.
    pub fn sub_table(&mut self, parent: &mut Table<'t>, key: &str) -> Table<'t> {
        match parent.entries.remove(key) {
            None => self.table(key, None, DeTable::new()),
            Some(FileValue { line, value }) => match value.into_inner() {
                DeValue::Table(t) => self.table(key, Some(line), t),
                _ => {
                    self.at(parent, Some(line), key, "must be a table ([pool])".into());
                    self.table(key, Some(line), DeTable::new())
                }
            },
        }
    }

    /// The array of tables `key` of `parent` (e.g. `[[workers]]`).
    pub fn table_array(&mut self, parent: &mut Table<'t>, key: &str) -> Vec<Table<'t>> {
        let Some(FileValue { line, value }) = parent.entries.remove(key) else {
            return Vec::new();
        };
        let DeValue::Array(items) = value.into_inner() else {
            self.at(
                parent,
                Some(line),
                key,
                format!("must be an array of tables ([[{key}]])"),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let item_line = self.line(item.span().start);
            let label = format!("{key}[{i}]");
            match item.into_inner() {
                DeValue::Table(t) => {
                    // The span of a [[table]] starts at its header.
                    out.push(self.table(&label, Some(item_line), t));
                }
                _ => self.problems.push(Problem {
                    source: self.file_source(Some(item_line)),
                    field: label,
                    message: format!("must be a table ([[{key}]])"),
                }),
            }
        }
        out
    }

    /// Lays `CLX_POOL_<KEY>` variables over `table`; returns the names of
    /// variables that name no key (warnings, not errors: other tools may
    /// share the prefix).
    pub fn overlay_env(&mut self, table: &mut Table<'t>, env: &[(String, String)], known: &[&str]) -> Vec<String> {
        let mut unknown = Vec::new();
        for (name, value) in env {
            let Some(key) = name.strip_prefix(crate::contract::env::cli::POOL_OVERRIDE_PREFIX) else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            if known.contains(&key.as_str()) {
                table.env.insert(key, (name.clone(), value.clone()));
            } else {
                unknown.push(name.clone());
            }
        }
        unknown
    }

    fn file_source(&self, line: Option<usize>) -> Source {
        Source::File {
            path: self.path.clone(),
            line,
        }
    }

    fn at(&mut self, table: &Table, line: Option<usize>, key: &str, message: String) {
        self.problems.push(Problem {
            source: self.file_source(line.or(table.line)),
            field: field(table, key),
            message,
        });
    }

    /// A problem with `key` of `table` (or with the table itself): at the
    /// key's line, or naming its variable if it came from one.
    pub fn problem(&mut self, table: &Table, key: Option<&str>, field_key: &str, message: String) {
        if let Some(key) = key
            && let Some((var, _)) = table.env.get(key)
        {
            self.problems.push(Problem {
                source: Source::Env(var.clone()),
                field: String::new(),
                message,
            });
            return;
        }
        let line = key.and_then(|k| table.entries.get(k)).map(|v| v.line);
        self.at(table, line, field_key, message);
    }

    /// The value of `key`, if set, deserialized as `T`; a value that is not
    /// a `T` is a problem ("expected {expect}, got ...") and yields None.
    pub fn get<T: DeserializeOwned>(&mut self, table: &Table<'t>, key: &str, expect: &str) -> Option<(T, Origin)> {
        if let Some((var, text)) = table.env.get(key) {
            // The variable's text is read as TOML (a number, a list), or
            // else as a string.
            let as_toml = DeValue::parse(text)
                .ok()
                .and_then(|v| T::deserialize(v.into_deserializer()).ok());
            let value = as_toml.or_else(|| {
                let string = Spanned::new(0..text.len(), DeValue::String(text.clone().into()));
                T::deserialize(string.into_deserializer()).ok()
            });
            return match value {
                Some(v) => Some((v, Origin::Env)),
                None => {
                    self.problems.push(Problem {
                        source: Source::Env(var.clone()),
                        field: String::new(),
                        message: format!("expected {expect}, got {text:?}"),
                    });
                    None
                }
            };
        }
        let entry = table.entries.get(key)?;
        match T::deserialize(entry.value.clone().into_deserializer()) {
            Ok(v) => Some((v, Origin::File)),
            Err(_) => {
                let message = format!("expected {expect}, got {}", self.raw(&entry.value));
                let line = Some(entry.line);
                self.at(table, line, key, message);
                None
            }
        }
    }

    /// Whether `key` is set (in the file or a variable).
    pub fn has(&self, table: &Table, key: &str) -> bool {
        table.env.contains_key(key) || table.entries.contains_key(key)
    }

    /// The line of `key` in the file, or of the table.
    pub fn line_of(&self, table: &Table, key: &str) -> Option<usize> {
        table.entries.get(key).map(|v| v.line).or(table.line)
    }

    /// Reports every key of `table` that is not in `known`, with the
    /// nearest known key as a suggestion.
    pub fn unknown_keys(&mut self, table: &Table, known: &[&str]) {
        let unknown: Vec<(String, usize)> = table
            .entries
            .iter()
            .filter(|(k, _)| !known.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.line))
            .collect();
        for (key, line) in unknown {
            let message = match suggest(&key, known) {
                Some(s) => format!("unknown key `{key}`; did you mean `{s}`?"),
                None => format!("unknown key `{key}`; the keys here are {}", known.join(", ")),
            };
            self.at(table, Some(line), &key, message);
        }
    }
}

/// `pool.key`, `workers[1].key`, or just `key` at the top.
pub(super) fn field(table: &Table, key: &str) -> String {
    if table.label.is_empty() {
        key.to_string()
    } else {
        format!("{}.{key}", table.label)
    }
}

/// The known key closest to `key`, if close enough to be a typo.
/// The known word `key` most likely meant (a prefix, or a near spelling).
pub fn suggest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    if let Some(k) = known.iter().find(|k| key.len() >= 4 && k.starts_with(key)) {
        return Some(k);
    }
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_catch_typos_only() {
        let known = ["count", "command", "worker_type", "heartbeat_timeout"];
        assert_eq!(suggest("cuont", &known), Some("count"));
        assert_eq!(suggest("worker-type", &known), Some("worker_type"));
        assert_eq!(suggest("hearbeat_timeout", &known), Some("heartbeat_timeout"));
        assert_eq!(suggest("image_name", &known), None);
    }
}
