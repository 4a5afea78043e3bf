//! The keys that make the master reload an app by itself: `watch`, `ignore_watch`,
//! `watch_delay` (reload when files change) and `cron_restart` (reload on a schedule).
//!
//! Both are reloads, never PM2's restarts, so the keys only say *when*; the supervisor's
//! triggers (`workers/src/triggers.rs`) do the rest. Kept out of `validate.rs`, which calls
//! [`triggers`] once per app.

use std::path::{Path, PathBuf};

use toml::de::DeValue;

use crate::defaults;
use crate::model::{CronRestart, Watch};
use crate::raw::{self, Reader};

/// `watch` (with `ignore_watch` and `watch_delay`) and `cron_restart`. `cwd` is the app's
/// working directory, `None` when it was wrong (already reported): paths are not checked then.
pub(crate) fn triggers(
    r: &mut Reader<'_, '_, '_, '_>,
    cwd: Option<&Path>,
) -> (Option<Watch>, Option<CronRestart>) {
    (watch(r, cwd), cron_restart(r))
}

/// `watch = true | "src" | ["src", "config"]`: `true` is the app's `cwd`, paths are relative to
/// it and must exist. `ignore_watch` and `watch_delay` without `watch` are refused: they would
/// be accepted and do nothing.
fn watch(r: &mut Reader<'_, '_, '_, '_>, cwd: Option<&Path>) -> Option<Watch> {
    let ignore = ignore_watch(r);
    let delay = r.duration("watch_delay");
    let paths = match r.value("watch") {
        None => None,
        Some(value) => match value.get_ref() {
            DeValue::Boolean(true) => cwd.map(|c| vec![c.to_path_buf()]),
            DeValue::Boolean(false) => None,
            DeValue::String(_) | DeValue::Array(_) => watch_paths(r, cwd),
            _ => {
                raw::wrong_type(
                    r.sink,
                    "watch",
                    value,
                    "true (the app's cwd), a path or an array of paths",
                );
                None
            }
        },
    };
    if paths.is_none() && r.value("watch").is_none() {
        for key in ["ignore_watch", "watch_delay"] {
            if let Some(span) = r.key_span(key) {
                r.error(
                    span,
                    format!(
                        "`{key}` goes with `watch`, which this app does not set; add \
                         `watch = true` (its cwd) or `watch = [\"src\"]`, or remove `{key}`"
                    ),
                );
            }
        }
    }
    Some(Watch {
        paths: paths?,
        ignore: ignore.unwrap_or_default(),
        delay: delay.unwrap_or(defaults::WATCH_DELAY),
    })
}

/// The paths of `watch = "src"` or `watch = ["src", …]`, resolved against `cwd`.
fn watch_paths(r: &mut Reader<'_, '_, '_, '_>, cwd: Option<&Path>) -> Option<Vec<PathBuf>> {
    let value = r.value("watch")?;
    let given = match value.get_ref() {
        DeValue::String(s) => vec![s.to_string()],
        _ => r.words("watch")?,
    };
    if given.is_empty() {
        r.error(
            value.span(),
            "`watch`: an empty list watches nothing; write `watch = true` for the app's cwd, \
             or name the paths",
        );
        return None;
    }
    let cwd = cwd?;
    let mut paths = Vec::with_capacity(given.len());
    for path in &given {
        let full: PathBuf = cwd
            .join(path)
            .components()
            .filter(|c| *c != std::path::Component::CurDir)
            .collect();
        if !full.exists() {
            r.error(
                value.span(),
                format!(
                    "`watch`: `{path}` not found (resolved to {}); paths are relative to the \
                     app's cwd",
                    full.display()
                ),
            );
            return None;
        }
        if !paths.contains(&full) {
            paths.push(full);
        }
    }
    Some(paths)
}

/// `ignore_watch = ["node_modules", "*.log"]`: shell globs, each checked here.
fn ignore_watch(r: &mut Reader<'_, '_, '_, '_>) -> Option<Vec<String>> {
    let value = r.value("ignore_watch")?;
    let patterns = match value.get_ref() {
        DeValue::String(s) => vec![s.to_string()],
        _ => r.words("ignore_watch")?,
    };
    for pattern in &patterns {
        if pattern.is_empty() {
            r.error(value.span(), "`ignore_watch`: a pattern must not be empty");
            return None;
        }
        if let Err(e) = glob::Pattern::new(pattern) {
            r.error(
                value.span(),
                format!(
                    "`ignore_watch`: {pattern:?} is not a glob: {} at character {}",
                    e.msg, e.pos
                ),
            );
            return None;
        }
    }
    Some(patterns)
}

/// `cron_restart = "0 3 * * *"`: checked with the parser the supervisor uses, and refused when
/// it can never fire (`"0 0 30 2 *"`).
fn cron_restart(r: &mut Reader<'_, '_, '_, '_>) -> Option<CronRestart> {
    let parsed = r.parsed("cron_restart", |s| {
        let cron = parse_cron(s)?;
        cron.find_next_occurrence(&chrono::Local::now(), false)
            .map_err(|_| format!("{s:?} never comes (no such date)"))?;
        Ok(s.trim().to_owned())
    });
    parsed.map(|pattern| CronRestart { pattern })
}

/// Parses a `cron_restart` pattern: PM2's five fields (minute hour day-of-month month
/// day-of-week), or six with seconds first, `@daily`-style nicknames, `L`, `#` and `W` (the
/// `croner` parser, the Rust port of the one PM2 uses). The error says what was expected.
pub fn parse_cron(pattern: &str) -> Result<croner::Cron, String> {
    use croner::errors::CronError;
    croner::parser::CronParser::new()
        .parse(pattern)
        .map_err(|e| {
            let why = match &e {
                CronError::InvalidPattern(m)
                | CronError::IllegalCharacters(m)
                | CronError::ComponentError(m) => m.trim_end_matches('.').to_owned(),
                other => other.to_string().trim_end_matches('.').to_owned(),
            };
            format!(
                "{why} in {pattern:?}; expected 5 fields (minute hour day month weekday, e.g. \
             \"0 3 * * *\") or 6 with seconds first (\"*/30 * * * * *\")"
            )
        })
}
