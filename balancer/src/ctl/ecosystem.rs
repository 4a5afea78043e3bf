//! PM2's ecosystem files (`ecosystem.config.js`, `process.json`, a JSON list of apps, YAML)
//! as balancer.toml: a pure mapping from the file's JSON value to balancer.toml text, plus a
//! warning for every key that has no equivalent, so nothing is ever dropped silently.
//!
//! It lives in `ctl/` because only the CLI reads these files: `start FILE` sends the master
//! the balancer.toml this produces (as it does for `start SCRIPT`), and `import FILE` prints
//! it. The master never sees a PM2 file. Reading the file (JavaScript is evaluated by `node`,
//! never by a JS engine of ours) is in `import.rs`; this module does no I/O but asking whether
//! a `script` exists, which decides between `script` and `command`, as PM2 does.

use std::path::Path;

use serde_json::Value as Json;
use toml::Value;

/// Whether PM2 would watch `app`: `watch` is true, a path or a non-empty list.
fn watched(app: &serde_json::Map<String, Json>) -> bool {
    match app.get("watch") {
        Some(Json::Bool(b)) => *b,
        Some(Json::String(s)) => s != "false" && !s.is_empty(),
        Some(Json::Array(items)) => !items.is_empty(),
        _ => false,
    }
}

/// The balancer.toml of an ecosystem file, and what could not be carried over.
#[derive(Debug, Clone, PartialEq)]
pub struct Imported {
    /// balancer.toml text: one `[[app]]` per PM2 app, each key it could not carry as a comment.
    pub toml: String,
    /// One line per key with no equivalent: "`pid_file` (app `api`, line 12): …".
    pub warnings: Vec<String>,
}

/// Keys balancer.toml has under the same name and meaning, copied as they are (a number of
/// milliseconds stays one, as both read a bare integer as milliseconds or bytes).
const SAME: &[&str] = &[
    "name",
    "interpreter",
    "interpreter_args",
    "cwd",
    "autorestart",
    "max_restarts",
    "min_uptime",
    "restart_delay",
    "exp_backoff_restart_delay",
    "kill_timeout",
    "listen_timeout",
    "max_memory_restart",
    "out_file",
    "error_file",
    "log_file",
    "cron_restart",
];

/// PM2's other spellings of those keys.
const RENAMED: &[(&str, &str)] = &[
    ("exec_interpreter", "interpreter"),
    ("node_args", "interpreter_args"),
    ("output", "out_file"),
    ("error", "error_file"),
    ("log", "log_file"),
    ("cron", "cron_restart"),
];

/// PM2 keys with no balancer equivalent, and what to do instead.
const NONE: &[(&str, &str)] = &[
    ("pid_file", "`balancer jlist` gives every worker's pid"),
    (
        "wait_ready",
        "a worker is ready when its `health` check passes",
    ),
    ("namespace", "name apps apart instead"),
    (
        "instance_var",
        "the instance is in BALANCER_INSTANCE and NODE_APP_INSTANCE",
    ),
    (
        "source_map_support",
        "pass --enable-source-maps in `interpreter_args`",
    ),
    ("vizion", "balancer reads no version-control metadata"),
    ("pmx", "balancer injects nothing into workers"),
    ("automation", "balancer injects nothing into workers"),
    ("shutdown_with_message", "workers get `kill_signal`"),
    ("increment_var", "use BALANCER_INSTANCE"),
    ("filter_env", "the master's environment is passed on"),
];

/// Maps an ecosystem file's value (`{ apps: [...] }`, a list of apps, or one app) to
/// balancer.toml. `source` is the file's text, to find a key's line for its warning; `dir` is
/// the file's directory, which PM2 resolves `script` and `cwd` against.
pub fn to_toml(value: &Json, source: &str, dir: &Path) -> Result<Imported, String> {
    let apps: &[Json] = match value {
        Json::Object(o) if o.contains_key("apps") => match &o["apps"] {
            Json::Array(apps) => apps,
            Json::Object(_) => std::slice::from_ref(&o["apps"]),
            other => return Err(format!("`apps` should be a list of apps, found {other}")),
        },
        Json::Object(_) => std::slice::from_ref(value),
        Json::Array(apps) => apps,
        other => return Err(format!("expected an object with `apps`, found {other}")),
    };
    if apps.is_empty() {
        return Err("the file lists no apps".into());
    }
    let mut out = Imported {
        toml: String::new(),
        warnings: Vec::new(),
    };
    let mut lines = Lines::new(source);
    for (index, app) in apps.iter().enumerate() {
        let Json::Object(app) = app else {
            return Err(format!("app {} is not an object: {app}", index + 1));
        };
        let text = one_app(app, dir, &mut lines, &mut out.warnings)?;
        if index > 0 {
            out.toml.push('\n');
        }
        out.toml.push_str(&text);
    }
    Ok(out)
}

/// Finds keys' lines in the source. Each app's keys come after the previous app's, so the
/// search for an app starts past the furthest key found for the one before.
struct Lines<'s> {
    source: &'s str,
    from: usize,
    furthest: usize,
}

impl<'s> Lines<'s> {
    fn new(source: &'s str) -> Self {
        Lines {
            source,
            from: 0,
            furthest: 0,
        }
    }

    /// The next app starts: search past what the previous one's keys were found at.
    fn next_app(&mut self) {
        self.from = self.furthest;
    }

    /// The 1-based line where `key` is next written (`"key"`, `'key'` or `key:`), if found.
    fn of(&mut self, key: &str) -> Option<usize> {
        let rest = &self.source[self.from..];
        let found = [format!("\"{key}\""), format!("'{key}'"), format!("{key}:")]
            .iter()
            .filter_map(|needle| {
                rest.match_indices(needle.as_str())
                    .find(|(at, _)| {
                        // A whole key: not the tail of a longer name.
                        let before = rest[..*at].chars().next_back();
                        !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
                    })
                    .map(|(at, _)| at)
            })
            .min()?;
        let at = self.from + found;
        self.furthest = self.furthest.max(at + 1);
        Some(self.source[..at].matches('\n').count() + 1)
    }
}

fn one_app(
    app: &serde_json::Map<String, Json>,
    dir: &Path,
    lines: &mut Lines<'_>,
    warnings: &mut Vec<String>,
) -> Result<String, String> {
    let script = app.get("script").and_then(Json::as_str);
    let name = match app.get("name").and_then(Json::as_str) {
        Some(name) => name.to_owned(),
        None => script
            .and_then(|s| Path::new(s).file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .ok_or("an app has neither `name` nor `script`")?,
    };
    lines.next_app();
    let mut keys = toml::Table::new();
    let mut notes: Vec<String> = Vec::new();
    let mut tables: Vec<(String, toml::Table)> = Vec::new();
    let mut warn = |key: &str, why: String, lines: &mut Lines<'_>, notes: &mut Vec<String>| {
        let line = lines
            .of(key)
            .map(|l| format!(", line {l}"))
            .unwrap_or_default();
        warnings.push(format!("`{key}` (app `{name}`{line}): {why}"));
        let value = app.get(key).map(|v| v.to_string()).unwrap_or_default();
        notes.push(format!("# {key} = {value}  # not carried over: {why}"));
    };
    keys.insert("name".into(), Value::String(name.clone()));

    let cwd = app
        .get("cwd")
        .and_then(Json::as_str)
        .map_or(dir.to_path_buf(), |c| dir.join(c));
    match script {
        Some(script) if cwd.join(script).exists() || script.contains('/') => {
            keys.insert("script".into(), Value::String(script.into()));
        }
        // PM2 runs a name that is not a file as a program from PATH (`pm2 start npm`).
        Some(program) => {
            keys.insert(
                "command".into(),
                Value::Array(vec![Value::String(program.into())]),
            );
        }
        None => return Err(format!("app `{name}` has no `script`")),
    }

    for (key, value) in app {
        let key = key.as_str();
        if key == "name" || key == "script" {
            continue;
        }
        let ours = RENAMED
            .iter()
            .find(|(pm2, _)| *pm2 == key)
            .map(|(_, ours)| *ours)
            .or_else(|| SAME.contains(&key).then_some(key));
        if let Some(ours) = ours {
            match scalar(value) {
                Some(v) => {
                    keys.insert(ours.into(), v);
                }
                None => warn(
                    key,
                    format!("expected a string, number or boolean, found {value}"),
                    lines,
                    &mut notes,
                ),
            }
            continue;
        }
        match key {
            "args" => match value {
                Json::String(s) => {
                    keys.insert("args".into(), Value::String(s.clone()));
                }
                Json::Array(items) => {
                    let words = items.iter().map(|w| Value::String(text(w))).collect();
                    keys.insert("args".into(), Value::Array(words));
                }
                other => warn(
                    key,
                    format!("expected a string or a list, found {other}"),
                    lines,
                    &mut notes,
                ),
            },
            // `true`, one path, or a list of paths (PM2 files often say "true"/"false").
            "watch" => match value {
                Json::Bool(b) => {
                    keys.insert("watch".into(), Value::Boolean(*b));
                }
                Json::String(s) if s == "true" || s == "false" => {
                    keys.insert("watch".into(), Value::Boolean(s == "true"));
                }
                Json::String(s) => {
                    keys.insert("watch".into(), Value::String(s.clone()));
                }
                Json::Array(items) if items.iter().all(Json::is_string) => {
                    let items = items.iter().map(|w| Value::String(text(w))).collect();
                    keys.insert("watch".into(), Value::Array(items));
                }
                other => warn(
                    key,
                    format!("expected true, a path or a list of paths, found {other}"),
                    lines,
                    &mut notes,
                ),
            },
            // As in PM2, these do nothing unless the app is watched; here they would be refused.
            "ignore_watch" | "ignoreWatch" | "watch_delay" if !watched(app) => warn(
                key,
                "has no effect without `watch` (as in PM2)".into(),
                lines,
                &mut notes,
            ),
            "watch_delay" => match scalar(value) {
                Some(v) => {
                    keys.insert("watch_delay".into(), v);
                }
                None => warn(
                    key,
                    format!("expected milliseconds, found {value}"),
                    lines,
                    &mut notes,
                ),
            },
            "ignore_watch" | "ignoreWatch" => {
                let items: Vec<&str> = match value {
                    Json::String(s) => vec![s.as_str()],
                    Json::Array(items) => items.iter().filter_map(Json::as_str).collect(),
                    _ => Vec::new(),
                };
                // PM2's own default (dot-entries, as a regular expression) is always applied here.
                let (dots, globs): (Vec<&str>, Vec<&str>) = items
                    .into_iter()
                    .partition(|i| i.starts_with("[\\/\\\\]\\."));
                if !dots.is_empty() {
                    notes.push(format!(
                        "# {key}: {dots:?} is PM2's dot-file rule; balancer always ignores dot-entries"
                    ));
                }
                if globs.is_empty() && dots.is_empty() {
                    warn(
                        key,
                        format!("expected globs, found {value}"),
                        lines,
                        &mut notes,
                    );
                } else if !globs.is_empty() {
                    let globs = globs.into_iter().map(|g| Value::String(g.into())).collect();
                    keys.insert("ignore_watch".into(), Value::Array(globs));
                }
            }
            "instances" => match instances(value) {
                Ok(v) => {
                    keys.insert("instances".into(), v);
                }
                Err(why) => warn(key, why, lines, &mut notes),
            },
            "exec_mode" => {
                let mode = value.as_str().unwrap_or_default();
                match mode.trim_end_matches("_mode") {
                    // Balancing is what balancer does with `listen`; PM2's cluster mode shared
                    // the port the app bound, which needs `listen` here.
                    "cluster" if !app.contains_key("port") => notes.push(
                        "# exec_mode = \"cluster\": balancer balances the listeners in `listen`; \
                         add listen = [\"tcp://0.0.0.0:PORT\"] and have the app listen on $PORT"
                            .into(),
                    ),
                    "cluster" => {}
                    "fork" => notes.push(
                        "# exec_mode = \"fork\": no `listen`, so the app binds its own ports"
                            .into(),
                    ),
                    _ => warn(
                        key,
                        format!("unknown mode {value}; expected cluster or fork"),
                        lines,
                        &mut notes,
                    ),
                }
            }
            "port" => match value.as_u64().or_else(|| value.as_str()?.parse().ok()) {
                // PM2 sets PORT for the app to bind; here the master binds the public port and
                // the app gets a private one in $PORT.
                Some(port) => {
                    keys.insert(
                        "listen".into(),
                        Value::Array(vec![Value::String(format!("tcp://0.0.0.0:{port}"))]),
                    );
                }
                None => warn(
                    key,
                    format!("expected a port number, found {value}"),
                    lines,
                    &mut notes,
                ),
            },
            "kill_signal" => match value.as_str() {
                Some(s) => {
                    keys.insert("kill_signal".into(), Value::String(s.into()));
                }
                None => warn(key, "expected a signal name".into(), lines, &mut notes),
            },
            "env" => match env_table(value) {
                Ok(t) => tables.push(("env".into(), t)),
                Err(why) => warn(key, why, lines, &mut notes),
            },
            k if k.starts_with("env_") => match env_table(value) {
                Ok(t) => tables.push((k.to_owned(), t)),
                Err(why) => warn(key, why, lines, &mut notes),
            },
            "merge_logs" | "combine_logs" | "time" => match value.as_bool() {
                Some(b) => {
                    let ours = if key == "time" { "time" } else { "merge_logs" };
                    keys.insert(ours.into(), Value::Boolean(b));
                }
                None => warn(
                    key,
                    format!("expected true or false, found {value}"),
                    lines,
                    &mut notes,
                ),
            },
            // PM2 formats dates with moment.js; balancer.toml takes strftime.
            "log_date_format" => match value.as_str() {
                Some(format) => {
                    let ours = balancer_config::logging::moment_to_strftime(format)
                        .unwrap_or_else(|| format.to_owned());
                    if ours != format {
                        notes.push(format!(
                            "# log_date_format: PM2's moment.js format {format:?} as strftime"
                        ));
                    }
                    keys.insert("log_date_format".into(), Value::String(ours));
                }
                None => warn(
                    key,
                    format!("expected a string, found {value}"),
                    lines,
                    &mut notes,
                ),
            },
            k => {
                let why = NONE
                    .iter()
                    .find(|(pm2, _)| *pm2 == k)
                    .map_or("no balancer equivalent".to_owned(), |(_, instead)| {
                        format!("no balancer equivalent; {instead}")
                    });
                warn(key, why, lines, &mut notes);
            }
        }
    }

    // The name first, as people write it; the other keys in order.
    let mut text = String::from("[[app]]\n");
    let first: toml::Table = keys.remove_entry("name").into_iter().collect();
    for part in [first, keys] {
        text.push_str(&toml::to_string(&part).map_err(|e| format!("app `{name}`: {e}"))?);
    }
    for note in notes {
        text.push_str(&note);
        text.push('\n');
    }
    for (table, vars) in tables {
        text.push_str(&format!("[app.{table}]\n"));
        text.push_str(&toml::to_string(&vars).map_err(|e| format!("app `{name}`: {e}"))?);
    }
    Ok(text)
}

/// A JSON scalar as TOML (strings, integers, booleans; PM2 writes numbers as strings often,
/// which balancer.toml reads the same way).
fn scalar(value: &Json) -> Option<Value> {
    match value {
        Json::String(s) => Some(Value::String(s.clone())),
        Json::Bool(b) => Some(Value::Boolean(*b)),
        Json::Number(n) => n.as_i64().map(Value::Integer),
        _ => None,
    }
}

/// A JSON value as an environment variable's text.
fn text(value: &Json) -> String {
    match value {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `instances`: PM2's `"max"`, `0` (also max), `-1`, numbers and numeric strings.
fn instances(value: &Json) -> Result<Value, String> {
    let n = match value {
        Json::String(s) if s == "max" => return Ok(Value::String("max".into())),
        Json::String(s) => s.trim().parse::<i64>().ok(),
        Json::Number(n) => n.as_i64(),
        _ => None,
    };
    match n {
        Some(0) => Ok(Value::String("max".into())),
        Some(n) => Ok(Value::Integer(n)),
        None => Err(format!("expected a number or \"max\", found {value}")),
    }
}

/// An `env` object as a table of strings (PM2 passes numbers and booleans as their text).
fn env_table(value: &Json) -> Result<toml::Table, String> {
    let Json::Object(vars) = value else {
        return Err(format!("expected an object of variables, found {value}"));
    };
    Ok(vars
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(text(v))))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imported(json: &str, dir: &Path) -> Imported {
        let value: Json = serde_json::from_str(json).unwrap();
        to_toml(&value, json, dir).unwrap()
    }

    #[test]
    fn log_keys_map_and_moment_formats_become_strftime() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.js"), "").unwrap();
        let json = r#"{"apps": [{"name": "api", "script": "app.js", "time": true,
  "combine_logs": true, "log_date_format": "YYYY-MM-DD HH:mm:ss Z"}]}"#;
        let got = imported(json, dir.path());
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
        let doc: toml::Table = toml::from_str(&got.toml).unwrap();
        let api = doc["app"].as_array().unwrap()[0].as_table().unwrap();
        assert_eq!(api["time"].as_bool(), Some(true));
        assert_eq!(api["merge_logs"].as_bool(), Some(true));
        assert_eq!(
            api["log_date_format"].as_str(),
            Some("%Y-%m-%d %H:%M:%S %:z")
        );
        assert!(got.toml.contains("moment.js format"), "{}", got.toml);
    }

    #[test]
    fn keys_map_and_the_rest_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.js"), "").unwrap();
        let json = r#"{"apps": [{
  "name": "api",
  "script": "app.js",
  "instances": "4",
  "exec_mode": "cluster",
  "node_args": "--inspect",
  "env": {"NODE_ENV": "development", "N": 3},
  "env_production": {"NODE_ENV": "production"},
  "out_file": "./logs/out.log",
  "max_memory_restart": "300M",
  "pid_file": "./x.pid",
  "watch": ["src"],
  "ignoreWatch": "*.log",
  "watch_delay": 500,
  "cron": "0 3 * * *",
  "merge_logs": true
}, {"script": "npm", "args": "run start", "instances": 0}]}"#;
        let got = imported(json, dir.path());
        let doc: toml::Table = toml::from_str(&got.toml).unwrap();
        let apps = doc["app"].as_array().unwrap();
        let api = apps[0].as_table().unwrap();
        assert_eq!(api["instances"].as_integer(), Some(4));
        assert_eq!(api["interpreter_args"].as_str(), Some("--inspect"));
        assert_eq!(api["env"]["N"].as_str(), Some("3"));
        assert_eq!(
            api["env_production"]["NODE_ENV"].as_str(),
            Some("production")
        );
        assert_eq!(api["out_file"].as_str(), Some("./logs/out.log"));
        let npm = apps[1].as_table().unwrap();
        assert_eq!(npm["name"].as_str(), Some("npm"));
        assert_eq!(npm["command"].as_array().unwrap()[0].as_str(), Some("npm"));
        assert_eq!(npm["instances"].as_str(), Some("max"), "PM2's 0 is max");
        assert_eq!(got.warnings.len(), 1, "{:?}", got.warnings);
        assert!(
            got.warnings[0].starts_with("`pid_file` (app `api`, line 11)"),
            "{:?}",
            got.warnings
        );
        assert_eq!(api["merge_logs"].as_bool(), Some(true));
        assert_eq!(api["watch"].as_array().unwrap()[0].as_str(), Some("src"));
        assert_eq!(api["ignore_watch"][0].as_str(), Some("*.log"));
        assert_eq!(
            api["watch_delay"].as_integer(),
            Some(500),
            "milliseconds, as PM2"
        );
        assert_eq!(api["cron_restart"].as_str(), Some("0 3 * * *"));
        assert!(
            got.toml
                .contains("# pid_file = \"./x.pid\"  # not carried over"),
            "{}",
            got.toml
        );
        assert!(
            got.toml.contains("# exec_mode = \"cluster\""),
            "{}",
            got.toml
        );
    }

    #[test]
    fn a_bare_list_and_bad_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let got = imported(r#"[{"name": "a", "script": "./a.js"}]"#, dir.path());
        assert!(
            got.toml
                .starts_with("[[app]]\nname = \"a\"\nscript = \"./a.js\"\n"),
            "{}",
            got.toml
        );
        assert!(to_toml(&Json::from(3), "", dir.path()).is_err());
        assert!(to_toml(&serde_json::json!({"apps": []}), "", dir.path()).is_err());
    }

    #[test]
    fn watch_keys_follow_pm2s_meaning() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.js"), "").unwrap();
        let json = r#"{"apps": [
  {"name": "off", "script": "app.js", "watch": "false", "ignoreWatch": ["node_modules"]},
  {"name": "on", "script": "app.js", "watch": "true",
   "ignore_watch": ["[\\/\\\\]\\./", "*.log"], "watch_delay": 250}
]}"#;
        let got = imported(json, dir.path());
        let doc: toml::Table = toml::from_str(&got.toml).unwrap();
        let apps = doc["app"].as_array().unwrap();
        assert_eq!(
            apps[0]["watch"].as_bool(),
            Some(false),
            "\"false\" is false"
        );
        assert!(apps[0].get("ignore_watch").is_none());
        assert!(
            got.warnings[0].contains("`ignoreWatch` (app `off`")
                && got.warnings[0].contains("no effect without `watch`"),
            "{:?}",
            got.warnings
        );
        assert_eq!(apps[1]["watch"].as_bool(), Some(true));
        let ignore: Vec<&str> = apps[1]["ignore_watch"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(ignore, ["*.log"], "PM2's dot-file regex is ours by default");
        assert_eq!(apps[1]["watch_delay"].as_integer(), Some(250));
        assert_eq!(got.warnings.len(), 1, "{:?}", got.warnings);
    }
}
