//! The file as TOML sees it: a spanned document, and the few readers validation uses to get a
//! typed value out of it or say, at the value's position, why it cannot.
//!
//! We read toml's spanned document by hand rather than through serde: serde's
//! `deny_unknown_fields` stops at the first problem and cannot express `env_<name>` keys, while a
//! user fixing a file wants every problem at once, each at its line and column.

use std::ops::Range;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::defaults;
use crate::error::Sink;
use crate::values::parse_duration;

/// A TOML value with its byte span in the file.
pub(crate) type Value<'i> = Spanned<DeValue<'i>>;
/// A TOML table; keys and values keep their spans.
pub(crate) type Table<'i> = DeTable<'i>;

/// Parses `source`, reporting every syntax error; `None` if there was any, since a
/// recovered document would only add confusing follow-up errors.
pub(crate) fn document<'i>(source: &'i str, sink: &mut Sink<'_>) -> Option<Table<'i>> {
    let (doc, errors) = DeTable::parse_recoverable(source);
    for error in &errors {
        sink.error(
            error.span().unwrap_or(0..0),
            format!("invalid TOML: {}", error.message()),
        );
    }
    errors.is_empty().then(|| doc.into_inner())
}

/// Reports that `label` holds the wrong kind of value: "`args`: expected X, found integer".
pub(crate) fn wrong_type(sink: &mut Sink<'_>, label: &str, value: &Value<'_>, expected: &str) {
    let found = value.get_ref().type_str();
    sink.error(
        value.span(),
        format!("`{label}`: expected {expected}, found {found}"),
    );
}

/// The string in `value`.
pub(crate) fn string<'v>(
    sink: &mut Sink<'_>,
    label: &str,
    value: &'v Value<'_>,
) -> Option<&'v str> {
    match value.get_ref() {
        DeValue::String(s) => Some(s),
        _ => {
            wrong_type(sink, label, value, "a string");
            None
        }
    }
}

/// The integer in `value`, if it fits an `i64`.
pub(crate) fn integer(sink: &mut Sink<'_>, label: &str, value: &Value<'_>) -> Option<i64> {
    match value.get_ref() {
        DeValue::Integer(n) => match i64::from_str_radix(n.as_str(), n.radix()) {
            Ok(n) => Some(n),
            Err(_) => {
                sink.error(value.span(), format!("`{label}`: {n} is out of range"));
                None
            }
        },
        _ => {
            wrong_type(sink, label, value, "an integer");
            None
        }
    }
}

/// The table in `value`.
pub(crate) fn table<'v, 'i>(
    sink: &mut Sink<'_>,
    label: &str,
    value: &'v Value<'i>,
) -> Option<&'v Table<'i>> {
    match value.get_ref() {
        DeValue::Table(t) => Some(t),
        _ => {
            wrong_type(sink, label, value, "a table");
            None
        }
    }
}

/// A list of words: an array of strings, or one string split like a shell would (quotes and
/// backslashes, no expansion; nothing is ever run through a shell).
pub(crate) fn words(sink: &mut Sink<'_>, label: &str, value: &Value<'_>) -> Option<Vec<String>> {
    let words = words_unchecked(sink, label, value)?;
    if let Some(long) = words.iter().find(|w| w.len() > defaults::MAX_ARG_LEN) {
        sink.error(
            value.span(),
            format!(
                "`{label}`: an argument of {} bytes is longer than the {} bytes the kernel passes \
                 to a program",
                long.len(),
                defaults::MAX_ARG_LEN
            ),
        );
        return None;
    }
    Some(words)
}

fn words_unchecked(sink: &mut Sink<'_>, label: &str, value: &Value<'_>) -> Option<Vec<String>> {
    match value.get_ref() {
        DeValue::String(s) => {
            let split = shlex::split(s);
            if split.is_none() {
                sink.error(
                    value.span(),
                    format!("`{label}`: unbalanced quote or trailing backslash in {s:?}"),
                );
            }
            split
        }
        DeValue::Array(items) => {
            let mut words = Vec::with_capacity(items.len());
            for item in items.iter() {
                match item.get_ref() {
                    DeValue::String(s) => words.push(s.to_string()),
                    _ => wrong_type(sink, label, item, "a string"),
                }
            }
            (words.len() == items.len()).then_some(words)
        }
        _ => {
            wrong_type(sink, label, value, "a string or an array of strings");
            None
        }
    }
}

/// A duration: a string such as `"5s"`, or an integer of milliseconds.
pub(crate) fn duration(sink: &mut Sink<'_>, label: &str, value: &Value<'_>) -> Option<Duration> {
    let parsed = match value.get_ref() {
        DeValue::String(s) => parse_duration(s),
        DeValue::Integer(_) => match integer(sink, label, value)? {
            n if n < 0 => Err(format!("a duration cannot be negative, found {n}")),
            n => Ok(Duration::from_millis(n.unsigned_abs())),
        },
        _ => {
            wrong_type(
                sink,
                label,
                value,
                "a duration such as \"5s\" or an integer of milliseconds",
            );
            return None;
        }
    };
    parsed
        .map_err(|e| sink.error(value.span(), format!("`{label}`: {e}")))
        .ok()
}

/// The closest of `known` to a mistyped `word`, when one is close enough to be a good guess:
/// PM2's name for the same thing, the snake_case of a camelCase key, or a small edit away.
pub(crate) fn did_you_mean<'k>(word: &str, known: &[&'k str]) -> Option<&'k str> {
    const ALIASES: &[(&str, &str)] = &[
        ("exec", "script"),
        ("cmd", "command"),
        ("exec_interpreter", "interpreter"),
        ("node_args", "interpreter_args"),
        ("port", "listen"),
        ("apps", "app"),
    ];
    let find = |name: &str| known.iter().copied().find(|k| *k == name);
    if let Some(k) = ALIASES
        .iter()
        .find(|(alias, _)| *alias == word)
        .and_then(|(_, to)| find(to))
    {
        return Some(k);
    }
    let snake: String = word
        .chars()
        .flat_map(|c| {
            if c.is_ascii_uppercase() {
                vec!['_', c.to_ascii_lowercase()]
            } else {
                vec![c]
            }
        })
        .collect();
    if let Some(k) = find(&snake) {
        return Some(k);
    }
    // `port` for `port_env`: a unique key that the word begins.
    let mut longer = known
        .iter()
        .filter(|k| word.len() >= 4 && k.starts_with(word));
    if let (Some(k), None) = (longer.next(), longer.next()) {
        return Some(k);
    }
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(word, k), *k))
        .filter(|(distance, k)| *distance <= (k.chars().count() / 3).max(1))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, k)| k)
}

/// Reads the keys of one table, reporting each problem at the value (or key) it concerns.
///
/// Every reader returns `None` both when the key is absent and when its value was wrong (after
/// reporting it), so a caller writes `r.duration("kill_timeout").unwrap_or(DEFAULT)`.
pub(crate) struct Reader<'t, 'i, 'k, 's> {
    /// The table being read.
    pub(crate) table: &'t Table<'i>,
    /// Prepended to keys in messages: `"health."` makes `rise` read `health.rise`.
    prefix: &'static str,
    /// Where problems go.
    pub(crate) sink: &'k mut Sink<'s>,
}

impl<'t, 'i, 'k, 's> Reader<'t, 'i, 'k, 's> {
    /// A reader of `table`, naming its keys `prefix` + key in messages.
    pub(crate) fn new(sink: &'k mut Sink<'s>, table: &'t Table<'i>, prefix: &'static str) -> Self {
        Reader {
            table,
            prefix,
            sink,
        }
    }

    /// How `key` is named in messages.
    pub(crate) fn label(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The raw value of `key`.
    pub(crate) fn value(&self, key: &str) -> Option<&'t Value<'i>> {
        self.table.get(key)
    }

    /// Where `key` itself is written.
    pub(crate) fn key_span(&self, key: &str) -> Option<Range<usize>> {
        self.table.get_key_value(key).map(|(k, _)| k.span())
    }

    /// Records a problem at `span`.
    pub(crate) fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.sink.error(span, message);
    }

    /// A string value.
    pub(crate) fn string(&mut self, key: &str) -> Option<&'t str> {
        let value = self.value(key)?;
        string(self.sink, &self.label(key), value)
    }

    /// A boolean value.
    pub(crate) fn boolean(&mut self, key: &str) -> Option<bool> {
        let value = self.value(key)?;
        match value.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                wrong_type(
                    self.sink,
                    &self.label(key),
                    value,
                    "a boolean (true or false)",
                );
                None
            }
        }
    }

    /// An integer in `min..=u32::MAX`.
    pub(crate) fn count(&mut self, key: &str, min: u32) -> Option<u32> {
        let value = self.value(key)?;
        let label = self.label(key);
        let n = integer(self.sink, &label, value)?;
        if n < i64::from(min) {
            self.error(
                value.span(),
                format!("`{label}`: must be at least {min}, found {n}"),
            );
            return None;
        }
        u32::try_from(n)
            .map_err(|_| self.error(value.span(), format!("`{label}`: {n} is too large")))
            .ok()
    }

    /// A duration (string or integer milliseconds).
    pub(crate) fn duration(&mut self, key: &str) -> Option<Duration> {
        let value = self.value(key)?;
        duration(self.sink, &self.label(key), value)
    }

    /// A duration that must not be zero, because nothing could ever happen within it.
    pub(crate) fn positive_duration(&mut self, key: &str) -> Option<Duration> {
        let value = self.value(key)?;
        let d = self.duration(key)?;
        if d.is_zero() {
            self.error(
                value.span(),
                format!("`{}`: must be longer than 0", self.label(key)),
            );
            return None;
        }
        Some(d)
    }

    /// A list of words (array of strings, or one string split like a shell).
    pub(crate) fn words(&mut self, key: &str) -> Option<Vec<String>> {
        let value = self.value(key)?;
        words(self.sink, &self.label(key), value)
    }

    /// A sub-table.
    pub(crate) fn table(&mut self, key: &str) -> Option<&'t Table<'i>> {
        let value = self.value(key)?;
        table(self.sink, &self.label(key), value)
    }

    /// A string turned into a `T` by `parse`, whose error message is reported at the value.
    pub(crate) fn parsed<T>(
        &mut self,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let value = self.value(key)?;
        let s = self.string(key)?;
        parse(s)
            .map_err(|e| self.error(value.span(), format!("`{}`: {e}", self.label(key))))
            .ok()
    }

    /// Reports every key that is neither in `known` nor accepted by `also`, with a suggestion
    /// when one is close. `place` says where, as in "unknown key `x` in [[app]]".
    pub(crate) fn unknown_keys(
        &mut self,
        place: &str,
        known: &[&str],
        also: impl Fn(&str) -> bool,
    ) {
        for key in self.table.keys() {
            let name = key.get_ref().as_ref();
            if known.contains(&name) || also(name) {
                continue;
            }
            // A short list of choices helps; a long one is noise.
            let hint = match did_you_mean(name, known) {
                Some(k) => format!("; did you mean `{}{k}`?", self.prefix),
                None if known.len() <= 8 => format!("; expected one of: {}", known.join(", ")),
                None => String::new(),
            };
            self.sink.error(
                key.span(),
                format!("unknown key `{}{name}` in {place}{hint}", self.prefix),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_only_when_close() {
        let known = [
            "name",
            "script",
            "instances",
            "interpreter",
            "interpreter_args",
            "kill_timeout",
        ];
        assert_eq!(did_you_mean("instnaces", &known), Some("instances"));
        assert_eq!(did_you_mean("instance", &known), Some("instances"));
        assert_eq!(did_you_mean("nme", &known), Some("name"));
        assert_eq!(did_you_mean("node_args", &known), Some("interpreter_args"));
        assert_eq!(did_you_mean("killTimeout", &known), Some("kill_timeout"));
        assert_eq!(did_you_mean("exec", &known), Some("script"));
        assert_eq!(did_you_mean("kill", &known), Some("kill_timeout"));
        assert_eq!(did_you_mean("inst", &known), Some("instances"));
        assert_eq!(did_you_mean("interp", &known), None);
        assert_eq!(did_you_mean("watch", &known), None);
        assert_eq!(did_you_mean("cwd", &known), None);
    }
}
