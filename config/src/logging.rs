//! The log keys of an `[[app]]`: `time`, `log_date_format`, `merge_logs`, `log_max_size`,
//! `log_retain` and `log_compress`, from the spanned table to [`Logging`].
//!
//! Kept apart from `validate.rs` because they decide one thing together (whether the master
//! relays a worker's output instead of handing it the file) and their checks cross each other:
//! `log_retain` without `log_max_size` would be a key accepted and ignored, so it is refused.

use chrono::format::{Item, StrftimeItems};
use toml::de::DeValue;

use crate::defaults;
use crate::model::{Logging, Rotation};
use crate::raw::{self, Reader};
use crate::values::parse_size;

/// The keys this module reads (they belong to `[[app]]`).
pub(crate) const KEYS: &[&str] = &[
    "time",
    "log_date_format",
    "merge_logs",
    "log_max_size",
    "log_retain",
    "log_compress",
];

/// Reads the log keys of one app; problems are reported where they are written and the
/// defaults kept, like every other key.
pub(crate) fn logging(r: &mut Reader<'_, '_, '_, '_>) -> Logging {
    let time = r.boolean("time");
    let format = r.parsed("log_date_format", check_format);
    // PM2: a `log_date_format` alone turns timestamps on; `time = false` with one is a
    // contradiction, not a preference.
    if time == Some(false)
        && let (Some(span), Some(_)) = (r.key_span("log_date_format"), r.value("time"))
    {
        r.error(
            span,
            "`log_date_format` formats the timestamps `time = false` turns off; remove one of them",
        );
    }
    let time = match (time, format) {
        (Some(false), _) => None,
        (_, Some(format)) => Some(format),
        (Some(true), None) => Some(defaults::LOG_DATE_FORMAT.to_owned()),
        (None, None) => None,
    };
    let merge = r.boolean("merge_logs").unwrap_or(false);
    let max_size = max_size(r);
    let retain = r.count("log_retain", 0);
    let compress = r.boolean("log_compress");
    if max_size.is_none() {
        for key in ["log_retain", "log_compress"] {
            if let Some(span) = r.key_span(key) {
                r.error(
                    span,
                    format!(
                        "`{key}` applies to rotated files, and nothing rotates without \
                         `log_max_size`; add `log_max_size = \"10M\"` or remove `{key}`"
                    ),
                );
            }
        }
    }
    Logging {
        time,
        merge,
        rotate: max_size.map(|max_size| Rotation {
            max_size,
            retain: retain.unwrap_or(defaults::LOG_RETAIN),
            compress: compress.unwrap_or(false),
        }),
    }
}

/// `log_max_size`: a size (`"10M"`, or an integer of bytes), at least
/// [`defaults::LOG_MIN_SIZE`] so a typo cannot make the master rotate at every line.
fn max_size(r: &mut Reader<'_, '_, '_, '_>) -> Option<u64> {
    let value = r.value("log_max_size")?;
    let parsed = match value.get_ref() {
        DeValue::String(s) => parse_size(s),
        DeValue::Integer(_) => match raw::integer(r.sink, "log_max_size", value)? {
            n if n <= 0 => Err(format!("must be positive, found {n}")),
            n => Ok(n.unsigned_abs()),
        },
        _ => {
            raw::wrong_type(
                r.sink,
                "log_max_size",
                value,
                "a size such as \"10M\" or an integer of bytes",
            );
            return None;
        }
    };
    let min = defaults::LOG_MIN_SIZE;
    match parsed {
        Ok(n) if n < min => {
            r.error(
                value.span(),
                format!(
                    "`log_max_size`: at least {} KiB, found {n} bytes",
                    min / 1024
                ),
            );
            None
        }
        Ok(n) => Some(n),
        Err(e) => {
            r.error(value.span(), format!("`log_max_size`: {e}"));
            None
        }
    }
}

/// A `log_date_format` is a strftime format (chrono's: `%Y-%m-%d %H:%M:%S%.3f`). PM2 writes
/// moment.js formats (`YYYY-MM-DD HH:mm:ss`); one of those is refused with its strftime
/// translation rather than printed as literal letters on every line.
pub fn check_format(format: &str) -> Result<String, String> {
    if format.is_empty() {
        return Err("must not be empty".into());
    }
    if format.contains('\n') {
        return Err("must be on one line".into());
    }
    if let Some(strftime) = moment_to_strftime(format) {
        return Err(format!(
            "{format:?} looks like a moment.js format (PM2's); balancer takes strftime: \
             write {strftime:?}"
        ));
    }
    let items: Vec<Item<'_>> = StrftimeItems::new(format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(format!(
            "{format:?} is not a valid strftime format (e.g. \"%Y-%m-%d %H:%M:%S%.3f\")"
        ));
    }
    if !items
        .iter()
        .any(|i| matches!(i, Item::Numeric(..) | Item::Fixed(..)))
    {
        return Err(format!(
            "{format:?} has no date or time field (strftime: %Y, %H, %M, %S, …)"
        ));
    }
    Ok(format.to_owned())
}

/// The strftime form of a moment.js format (`YYYY-MM-DD HH:mm:ss Z`), or `None` when `format`
/// has a `%` or no moment token, i.e. is not one.
pub fn moment_to_strftime(format: &str) -> Option<String> {
    if format.contains('%') {
        return None;
    }
    // Longest tokens first, so `YYYY` is not read as two `YY`.
    const TOKENS: &[(&str, &str)] = &[
        ("YYYY", "%Y"),
        ("SSS", "%3f"),
        ("MMM", "%b"),
        ("ddd", "%a"),
        ("YY", "%y"),
        ("MM", "%m"),
        ("DD", "%d"),
        ("HH", "%H"),
        ("hh", "%I"),
        ("mm", "%M"),
        ("ss", "%S"),
        ("ZZ", "%z"),
        ("Z", "%:z"),
        ("A", "%p"),
    ];
    let mut out = String::new();
    let mut rest = format;
    let mut found = false;
    'outer: while !rest.is_empty() {
        for (moment, strftime) in TOKENS {
            if let Some(after) = rest.strip_prefix(moment) {
                out.push_str(strftime);
                rest = after;
                found = true;
                continue 'outer;
            }
        }
        let c = rest.chars().next()?;
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    // `%3f` is only valid after a dot in chrono: `ss.SSS` → `%S%.3f`.
    let out = out.replace(".%3f", "%.3f");
    found.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats_pass_and_moment_ones_get_their_translation() {
        assert!(check_format("%Y-%m-%d %H:%M:%S%.3f").is_ok());
        assert!(check_format(defaults::LOG_DATE_FORMAT).is_ok());
        let e = check_format("YYYY-MM-DD HH:mm:ss.SSS Z").unwrap_err();
        assert!(e.contains("\"%Y-%m-%d %H:%M:%S%.3f %:z\""), "{e}");
        assert!(check_format("%Q").is_err());
        assert!(check_format("plain").unwrap_err().contains("no date"));
        assert!(check_format("").is_err());
    }
}
