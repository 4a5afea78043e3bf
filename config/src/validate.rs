//! From the spanned document to the model: one function per table, each applying its defaults
//! and reporting every problem where it is written; then the checks that span apps (unique
//! names, no two listeners on one address).
//!
//! A function that finds a problem reports it and carries on with the default, so one pass finds
//! everything; the caller discards the result when anything was reported.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use toml::de::DeValue;

use crate::LoadOptions;
use crate::defaults;
use crate::error::Sink;
use crate::model::{
    App, Check, Config, Global, Health, HttpSettings, Instances, Listener, Policy, Proto,
    ProxyVersion, Ready, Signal, UdpSettings,
};
use crate::raw::{self, Reader, Table, Value};
use crate::values::{parse_host_port, parse_listen_url, parse_signal, parse_size};

/// Keys of `[[app]]`, besides any `env_<name>`.
const APP_KEYS: &[&str] = &[
    "name",
    "script",
    "command",
    "args",
    "interpreter",
    "interpreter_args",
    "cwd",
    "instances",
    "listen",
    "policy",
    "env",
    "health",
    "ready",
    "kill_signal",
    "kill_timeout",
    "drain_timeout",
    "listen_timeout",
    "queue_timeout",
    "connect_timeout",
    "autorestart",
    "max_restarts",
    "min_uptime",
    "restart_delay",
    "exp_backoff_restart_delay",
    "max_memory_restart",
    "reload_batch",
    "watch",
    "ignore_watch",
    "watch_delay",
    "cron_restart",
    "max_flows",
    "udp_idle_timeout",
    "http_header_timeout",
    "http_max_header_size",
    "http_idle_timeout",
    "out_file",
    "error_file",
    "log_file",
    "balance",
    "max_conns",
    "capture",
];
const BALANCER_KEYS: &[&str] = &["metrics", "sample_interval", "io"];
/// The shortest `sample_interval`.
const MIN_SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
/// PM2 keys of `[[app]]` whose behaviour is not built yet: refused where they are written,
/// never accepted and ignored, with what to do meanwhile.
const NOT_YET_APP_KEYS: &[(&str, &str)] = &[];
/// Keys of `[balancer]` whose behaviour is not built yet.
const NOT_YET_BALANCER_KEYS: &[(&str, &str)] = &[];
const HEALTH_KEYS: &[&str] = &["check", "path", "interval", "timeout", "rise", "fall"];
const LISTENER_KEYS: &[&str] = &["url", "port_env", "proxy_protocol", "accept_proxy"];

/// What validation needs besides the document.
pub(crate) struct Context<'o> {
    /// The absolute path of the file; relative paths in it are relative to its directory.
    pub(crate) source: PathBuf,
    /// The command line's choices and the machine's CPU count.
    pub(crate) opts: &'o LoadOptions,
}

impl Context<'_> {
    /// The directory of the file: default `cwd`, and base of relative paths.
    fn dir(&self) -> &Path {
        self.source.parent().unwrap_or(Path::new("/"))
    }
}

/// What earlier tables hold, so a later one repeating it is caught where it repeats it.
#[derive(Default)]
struct Taken {
    /// App names and where they are written.
    names: Vec<(String, Range<usize>)>,
    /// Public addresses and who holds them.
    addrs: Vec<Claim>,
}

/// One public address in use.
struct Claim {
    proto: Proto,
    addr: SocketAddr,
    /// "app `web`" or "[balancer] metrics", for messages.
    holder: String,
    span: Range<usize>,
}

impl Claim {
    /// Whether binding `proto://addr` would fail because of this claim: TCP and HTTP share the
    /// TCP port space, UDP has its own, and a wildcard address takes the port on every address
    /// of its family.
    fn clashes(&self, proto: Proto, addr: SocketAddr) -> bool {
        let udp = |p: Proto| p == Proto::Udp;
        udp(self.proto) == udp(proto)
            && self.addr.port() == addr.port()
            && self.addr.is_ipv4() == addr.is_ipv4()
            && (self.addr.ip() == addr.ip()
                || self.addr.ip().is_unspecified()
                || addr.ip().is_unspecified())
    }
}

/// Validates a whole document. Apps with errors are left out; the caller must check the sink.
pub(crate) fn config(doc: &Table<'_>, ctx: &Context<'_>, sink: &mut Sink<'_>) -> Config {
    let mut taken = Taken::default();
    top_level_keys(doc, sink);
    let mut r = Reader::new(sink, doc, "");
    let balancer = match r.table("balancer") {
        Some(table) => global(&mut Reader::new(r.sink, table, ""), &mut taken),
        None => Global::default(),
    };
    let mut apps = Vec::new();
    match r.value("app") {
        // A misspelt [[apps]] has been reported already; saying there is no [[app]] adds nothing.
        None if r.sink.is_empty() => r.sink.whole_file("no [[app]] table: nothing to run"),
        None => {}
        Some(value) => match value.get_ref() {
            DeValue::Array(items) if items.is_empty() => {
                r.error(value.span(), "`app`: no apps: nothing to run")
            }
            DeValue::Array(items) => apps.extend(
                items
                    .iter()
                    .filter_map(|item| app(item, ctx, &mut taken, r.sink)),
            ),
            DeValue::Table(_) => r.error(
                value.span(),
                "`app`: write [[app]] (an array of tables), not [app]",
            ),
            _ => raw::wrong_type(r.sink, "app", value, "an array of tables ([[app]])"),
        },
    }
    Config {
        source: ctx.source.clone(),
        balancer,
        apps,
    }
}

/// Reports keys at the top level other than `[balancer]` and `[[app]]`.
fn top_level_keys(doc: &Table<'_>, sink: &mut Sink<'_>) {
    let header = |key: &str| {
        if key == "app" {
            "[[app]]".to_owned()
        } else {
            format!("[{key}]")
        }
    };
    for (key, value) in doc.iter() {
        let name = key.get_ref().as_ref();
        if name == "balancer" || name == "app" {
            continue;
        }
        let hint = raw::did_you_mean(name, &["balancer", "app"])
            .map_or("; expected [balancer] or [[app]]".to_owned(), |k| {
                format!("; did you mean `{}`?", header(k))
            });
        let what = match value.get_ref() {
            DeValue::Table(_) => format!("table `[{name}]`"),
            DeValue::Array(items)
                if items.iter().all(|i| i.get_ref().is_table()) && !items.is_empty() =>
            {
                format!("table `[[{name}]]`")
            }
            _ => format!("top-level key `{name}`"),
        };
        sink.error(key.span(), format!("unknown {what}{hint}"));
    }
}

/// The `[balancer]` table.
fn global(r: &mut Reader<'_, '_, '_, '_>, taken: &mut Taken) -> Global {
    not_yet(r, NOT_YET_BALANCER_KEYS);
    r.unknown_keys("[balancer]", BALANCER_KEYS, |key| {
        NOT_YET_BALANCER_KEYS.iter().any(|(k, _)| *k == key)
    });
    let metrics = r.parsed("metrics", parse_host_port);
    if let (Some(addr), Some(value)) = (metrics, r.value("metrics"))
        && addr.port() != 0
    {
        claim(
            r.sink,
            taken,
            Proto::Http,
            addr,
            "[balancer] metrics".to_owned(),
            value.span(),
            "metrics",
        );
    }
    let sample_interval = match (
        r.positive_duration("sample_interval"),
        r.value("sample_interval"),
    ) {
        // Each sample reads /proc/PID/stat of every process on the machine.
        (Some(d), Some(value)) if d < MIN_SAMPLE_INTERVAL => {
            r.error(
                value.span(),
                format!(
                    "`sample_interval`: at least {MIN_SAMPLE_INTERVAL:?} (each sample reads /proc)"
                ),
            );
            None
        }
        (d, _) => d,
    }
    .unwrap_or(defaults::SAMPLE_INTERVAL);
    let io = r.parsed("io", str::parse).unwrap_or_default();
    Global {
        metrics,
        sample_interval,
        io,
    }
}

/// One `[[app]]`; `None` when it has no usable name or program (already reported).
fn app(
    value: &Value<'_>,
    ctx: &Context<'_>,
    taken: &mut Taken,
    sink: &mut Sink<'_>,
) -> Option<App> {
    let header = value.span();
    let table = raw::table(sink, "app", value)?;
    let mut r = Reader::new(sink, table, "");
    let name = name(&mut r, header.clone(), taken);
    let place = name
        .as_ref()
        .map_or("[[app]]".to_owned(), |n| format!("app `{n}`"));
    not_yet(&mut r, NOT_YET_APP_KEYS);
    r.unknown_keys(&place, &[APP_KEYS, crate::logging::KEYS].concat(), |key| {
        env_suffix(key).is_some() || NOT_YET_APP_KEYS.iter().any(|(k, _)| *k == key)
    });

    let cwd = cwd(&mut r, ctx);
    let program = program(&mut r, header.clone(), cwd.as_deref());
    let instances_spec = r
        .value("instances")
        .and_then(|v| instances(r.sink, v, ctx.opts.cpus));
    let instances_spec = instances_spec.unwrap_or(Instances::Count(defaults::INSTANCES));
    let holder = name.as_ref().map_or_else(
        || format!("the [[app]] at line {}", r.sink.line_of(&header)),
        |_| place.clone(),
    );
    let policy = policy(&mut r, ctx.opts.default_policy);
    let listen = listeners(&mut r, &place, &holder, taken, policy);
    let balance = r.parsed("balance", str::parse).unwrap_or(defaults::BALANCE);
    let max_conns = r.count("max_conns", 1).or(defaults::MAX_CONNS);
    master_only(&mut r, policy, &["balance", "max_conns"]);
    let env = env(&mut r, ctx.opts.env.as_deref());
    let health = match r.table("health") {
        Some(table) => health(&mut Reader::new(r.sink, table, "health."), &place),
        None => Health::default(),
    };
    let ready = r
        .parsed("ready", |s| match s {
            "health" => Ok(Ready::Health),
            "notify" => Ok(Ready::Notify),
            _ => Err(format!(
                "unknown readiness {s:?}; expected \"health\" (the health check) or \"notify\" (READY=1 on $NOTIFY_SOCKET)"
            )),
        })
        .unwrap_or_default();
    let kill_signal = kill_signal(&mut r).unwrap_or(defaults::KILL_SIGNAL);
    let kill_timeout = r.duration("kill_timeout").unwrap_or(defaults::KILL_TIMEOUT);
    let drain_timeout = r
        .duration("drain_timeout")
        .unwrap_or(defaults::DRAIN_TIMEOUT);
    let listen_timeout = r
        .positive_duration("listen_timeout")
        .unwrap_or(defaults::LISTEN_TIMEOUT);
    let queue_timeout = r
        .duration("queue_timeout")
        .unwrap_or(defaults::QUEUE_TIMEOUT);
    let connect_timeout = r
        .positive_duration("connect_timeout")
        .unwrap_or(defaults::CONNECT_TIMEOUT);
    let autorestart = r.boolean("autorestart").unwrap_or(defaults::AUTORESTART);
    let max_restarts = r.count("max_restarts", 0).unwrap_or(defaults::MAX_RESTARTS);
    let min_uptime = r.duration("min_uptime").unwrap_or(defaults::MIN_UPTIME);
    let restart_delay = r
        .duration("restart_delay")
        .unwrap_or(defaults::RESTART_DELAY);
    let exp_backoff_restart_delay =
        exp_backoff(&mut r).unwrap_or(defaults::EXP_BACKOFF_RESTART_DELAY);
    let max_memory_restart = max_memory(&mut r).unwrap_or(defaults::MAX_MEMORY_RESTART);
    let reload_batch = r.count("reload_batch", 1).unwrap_or(defaults::RELOAD_BATCH);
    let udp = UdpSettings {
        max_flows: r.count("max_flows", 1).unwrap_or(defaults::MAX_FLOWS),
        idle_timeout: r
            .positive_duration("udp_idle_timeout")
            .unwrap_or(defaults::UDP_IDLE_TIMEOUT),
    };
    let http = HttpSettings {
        header_timeout: r
            .positive_duration("http_header_timeout")
            .unwrap_or(defaults::HTTP_HEADER_TIMEOUT),
        max_header_size: size(&mut r, "http_max_header_size")
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(defaults::HTTP_MAX_HEADER_SIZE),
        idle_timeout: r
            .positive_duration("http_idle_timeout")
            .unwrap_or(defaults::HTTP_IDLE_TIMEOUT),
    };

    let (out_file, error_file) = log_files(&mut r, cwd.as_deref());
    let logs = crate::logging::logging(&mut r);
    let capture = r.boolean("capture");
    let (watch, cron_restart) = crate::triggers::triggers(&mut r, cwd.as_deref());

    let (program, args) = program?;
    let total: usize = args.iter().map(|a| a.len() + 1).sum::<usize>()
        + env
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum::<usize>();
    if total > defaults::MAX_ARGS_TOTAL {
        r.error(
            header,
            format!(
                "the arguments and environment of `{}` add up to {total} bytes; at most {} can be \
                 passed to a program",
                name.as_deref().unwrap_or("[[app]]"),
                defaults::MAX_ARGS_TOTAL
            ),
        );
        return None;
    }
    Some(App {
        name: name?,
        program,
        args,
        cwd: cwd?,
        instances: instances_spec.resolve(ctx.opts.cpus),
        instances_spec,
        listen,
        policy,
        balance,
        max_conns,
        env,
        health,
        ready,
        kill_signal,
        kill_timeout,
        drain_timeout,
        listen_timeout,
        queue_timeout,
        connect_timeout,
        autorestart,
        max_restarts,
        min_uptime,
        restart_delay,
        exp_backoff_restart_delay,
        max_memory_restart,
        reload_batch,
        udp,
        http,
        out_file,
        error_file,
        logs,
        capture,
        watch,
        cron_restart,
    })
}

/// Refuses each key of `keys` the table has: its behaviour is not built yet.
fn not_yet(r: &mut Reader<'_, '_, '_, '_>, keys: &[(&str, &str)]) {
    for (key, instead) in keys {
        if let Some(span) = r.key_span(key) {
            let label = r.label(key);
            r.error(
                span,
                format!(
                    "`{label}` is not supported yet (it would be ignored); remove it: {instead}"
                ),
            );
        }
    }
}

/// `out_file`, `error_file` and `log_file` (both streams in one file), resolved against the
/// app's `cwd` as PM2 does. `log_file` with either of the others is refused: writing a line
/// to two files would need the master to copy every line, which workers writing straight into
/// their files is there to avoid.
fn log_files(
    r: &mut Reader<'_, '_, '_, '_>,
    cwd: Option<&Path>,
) -> (Option<PathBuf>, Option<PathBuf>) {
    let path = |r: &mut Reader<'_, '_, '_, '_>, key: &str| -> Option<PathBuf> {
        let value = r.value(key)?;
        let given = r.string(key)?;
        if given.is_empty() {
            r.error(value.span(), format!("`{key}`: must not be empty"));
            return None;
        }
        let path = clean(&cwd?.join(given));
        if path.is_dir() {
            r.error(
                value.span(),
                format!("`{key}`: `{given}` is a directory; name a file in it"),
            );
            return None;
        }
        Some(path)
    };
    let out = path(r, "out_file");
    let err = path(r, "error_file");
    let Some(both) = path(r, "log_file") else {
        return (out, err);
    };
    if let Some(span) = r.key_span("log_file")
        && (r.value("out_file").is_some() || r.value("error_file").is_some())
    {
        r.error(
            span,
            "`log_file` sends stdout and stderr to one file, so it replaces `out_file` and \
             `error_file`; keep either `log_file` or those two",
        );
    }
    (Some(both.clone()), Some(both))
}

/// `name`: required, unique, and usable on the command line.
fn name(r: &mut Reader<'_, '_, '_, '_>, header: Range<usize>, taken: &mut Taken) -> Option<String> {
    let Some(value) = r.value("name") else {
        r.error(header, "missing `name`: every [[app]] needs one");
        return None;
    };
    let name = r.string("name")?;
    let problem = if name.is_empty() {
        Some("`name`: must not be empty".to_owned())
    } else if name.len() > defaults::MAX_NAME_LEN {
        Some(format!(
            "`name`: {} characters is too long; at most {} (it names log files)",
            name.chars().count(),
            defaults::MAX_NAME_LEN
        ))
    } else if name.starts_with(['.', '-']) {
        Some(format!(
            "`name`: {name:?} must not start with `.` or `-` (a hidden file, or an option)"
        ))
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        Some(format!(
            "`name`: {name:?} may only contain letters, digits, `_`, `.` and `-`"
        ))
    } else if name.chars().all(|c| c.is_ascii_digit()) {
        Some(format!(
            "`name`: {name:?} is all digits, which the command line reads as a worker id"
        ))
    } else if name == "all" {
        Some("`name`: \"all\" is reserved (as in `balancer stop all`)".to_owned())
    } else if let Some((_, first)) = taken.names.iter().find(|(n, _)| n == name) {
        Some(format!(
            "duplicate app name `{name}` (first defined at line {})",
            r.sink.line_of(first)
        ))
    } else {
        None
    };
    if let Some(problem) = problem {
        r.error(value.span(), problem);
        return None;
    }
    taken.names.push((name.to_owned(), value.span()));
    Some(name.to_owned())
}

/// `cwd`: the directory of the file unless given; `None` when the given one is unusable.
fn cwd(r: &mut Reader<'_, '_, '_, '_>, ctx: &Context<'_>) -> Option<PathBuf> {
    let Some(value) = r.value("cwd") else {
        return Some(ctx.dir().to_path_buf());
    };
    let given = r.string("cwd")?;
    let dir = clean(&ctx.dir().join(given));
    if dir.is_dir() {
        return Some(dir);
    }
    let problem = if dir.exists() {
        "is not a directory"
    } else {
        "not found"
    };
    r.error(
        value.span(),
        format!("`cwd`: `{given}` {problem} (resolved to {})", dir.display()),
    );
    None
}

/// `script` or `command`, with `interpreter`, `interpreter_args` and `args`: what to exec.
fn program(
    r: &mut Reader<'_, '_, '_, '_>,
    header: Range<usize>,
    cwd: Option<&Path>,
) -> Option<(String, Vec<String>)> {
    let args = r.words("args").unwrap_or_default();
    let interpreter = r.string("interpreter");
    let interpreter_args = r.words("interpreter_args");
    if interpreter == Some("") {
        let span = r.value("interpreter").map(Value::span).unwrap_or_default();
        r.error(
            span,
            "`interpreter`: must not be empty; use \"none\" to run the script itself",
        );
    }
    match (r.key_span("script"), r.key_span("command")) {
        (None, None) => {
            r.error(
                header,
                "missing `script` or `command`: what should this app run?",
            );
            None
        }
        (Some(script), Some(command)) => {
            let later = if script.start > command.start {
                script
            } else {
                command
            };
            r.error(later, "`script` and `command` are both set; keep one");
            None
        }
        (None, Some(_)) => {
            for key in ["interpreter", "interpreter_args"] {
                if let Some(span) = r.key_span(key) {
                    r.error(span, format!("`{key}` only goes with `script`; put the interpreter first in `command`"));
                }
            }
            let value = r.value("command")?;
            let words = r.words("command")?;
            let Some((first, rest)) = words.split_first().filter(|(first, _)| !first.is_empty())
            else {
                r.error(value.span(), "`command`: the program is missing");
                return None;
            };
            let program = executable(r, "command", value, first, cwd?)?;
            Some((program, rest.iter().cloned().chain(args).collect()))
        }
        (Some(_), None) => {
            let value = r.value("script")?;
            let script = r.string("script")?;
            let interpreter = match interpreter {
                Some("none") => None,
                Some(given) => {
                    let value = r.value("interpreter")?;
                    Some(executable(r, "interpreter", value, given, cwd?)?)
                }
                None => match defaults::interpreter_for(Path::new(script)) {
                    Some(inferred) if !in_path(inferred) => {
                        r.error(
                            value.span(),
                            format!(
                                "`script`: `{script}` runs with `{inferred}`, which is not a \
                                 program in PATH; install it, or set `interpreter`"
                            ),
                        );
                        return None;
                    }
                    inferred => inferred.map(str::to_owned),
                },
            };
            let cwd = cwd?;
            let path = clean(&cwd.join(script));
            let problem = if !path.exists() {
                Some(not_found("script", script, cwd))
            } else if path.is_dir() {
                Some(format!("`script`: `{script}` is a directory"))
            } else if interpreter.is_none() && !is_executable(&path) {
                Some(format!(
                    "`script`: `{script}` is not executable; `chmod +x` it or set `interpreter`"
                ))
            } else {
                None
            };
            if let Some(problem) = problem {
                r.error(value.span(), problem);
            }
            if interpreter.is_none()
                && let Some(span) = r.key_span("interpreter_args")
            {
                r.error(
                    span,
                    format!(
                        "`interpreter_args` needs an interpreter, but `{script}` runs by itself"
                    ),
                );
            }
            let path = path.to_string_lossy().into_owned();
            match interpreter {
                Some(interpreter) => {
                    let words = interpreter_args
                        .unwrap_or_default()
                        .into_iter()
                        .chain([path])
                        .chain(args);
                    Some((interpreter, words.collect()))
                }
                None => Some((path, args)),
            }
        }
    }
}

/// A program named in `label`: a bare name is looked up in `PATH` when spawned; a path is
/// resolved against `cwd` here (the child's cwd would be ambiguous) and must exist.
fn executable(
    r: &mut Reader<'_, '_, '_, '_>,
    label: &str,
    value: &Value<'_>,
    program: &str,
    cwd: &Path,
) -> Option<String> {
    if !program.contains('/') {
        if !in_path(program) {
            r.error(
                value.span(),
                format!(
                    "`{label}`: `{program}` is not a program in PATH; install it, or give its path"
                ),
            );
            return None;
        }
        return Some(program.to_owned());
    }
    let path = clean(&cwd.join(program));
    if !path.is_file() {
        r.error(value.span(), not_found(label, program, cwd));
        return None;
    }
    if !is_executable(&path) {
        r.error(
            value.span(),
            format!("`{label}`: `{program}` is not executable"),
        );
        return None;
    }
    Some(path.to_string_lossy().into_owned())
}

/// Whether `program` names an executable file in one of `PATH`'s directories, as exec will
/// look it up (the master spawns with the environment it was started with).
pub fn in_path(program: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        let candidate = dir.join(program);
        candidate.is_file() && is_executable(&candidate)
    })
}

/// "`script`: `x.js` not found in /srv/app": the directory only when the path was relative
/// to it (an absolute path was looked for where it says).
fn not_found(label: &str, given: &str, cwd: &Path) -> String {
    if Path::new(given).is_absolute() {
        format!("`{label}`: `{given}` not found")
    } else {
        format!("`{label}`: `{given}` not found in {}", cwd.display())
    }
}

/// Whether any execute bit is set.
fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
}

/// `path` without `.` components. Symlinks are deliberately not resolved: a deploy that
/// switches a `current` symlink must be picked up by the next reload.
fn clean(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| *c != Component::CurDir)
        .collect()
}

/// `instances`: a count (at most [`defaults::MAX_INSTANCES`]), `"max"`, or a negative count
/// meaning CPUs minus that many (which must leave at least one).
fn instances(sink: &mut Sink<'_>, value: &Value<'_>, cpus: u32) -> Option<Instances> {
    let parsed = match value.get_ref() {
        DeValue::Integer(_) => Instances::from_integer(raw::integer(sink, "instances", value)?),
        DeValue::String(s) if s == "max" => Ok(Instances::Max),
        DeValue::String(s) => Err(format!("expected an integer or \"max\", found {s:?}")),
        _ => {
            raw::wrong_type(sink, "instances", value, "an integer or \"max\"");
            return None;
        }
    };
    let checked = parsed.and_then(|spec| match spec {
        Instances::Count(n) if n > defaults::MAX_INSTANCES => Err(format!(
            "{n} is more than {} workers for one app",
            defaults::MAX_INSTANCES
        )),
        // `-1` (every CPU but one) is kept portable: on one CPU it still runs one worker.
        Instances::CpusMinus(n) if n >= cpus && n > 1 => Err(format!(
            "-{n} means {cpus} CPUs minus {n}, which leaves no worker; use a count, or \"max\""
        )),
        spec => Ok(spec),
    });
    checked
        .map_err(|e| sink.error(value.span(), format!("`instances`: {e}")))
        .ok()
}

/// `listen`: one address or an array of addresses and `{ url, port_env }` tables.
fn listeners(
    r: &mut Reader<'_, '_, '_, '_>,
    place: &str,
    holder: &str,
    taken: &mut Taken,
    policy: Policy,
) -> Vec<Listener> {
    let Some(value) = r.value("listen") else {
        return Vec::new();
    };
    let items: Vec<&Value<'_>> = match value.get_ref() {
        DeValue::String(_) => vec![value],
        DeValue::Array(items) => items.iter().collect(),
        _ => {
            raw::wrong_type(
                r.sink,
                "listen",
                value,
                "a listen address or an array of them",
            );
            return Vec::new();
        }
    };
    let mut listeners: Vec<(Listener, Range<usize>)> = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        let mut options = ListenerOptions::default();
        let (url, port_env) = match item.get_ref() {
            DeValue::String(_) => (item, None),
            DeValue::Table(table) => {
                let mut lr = Reader::new(r.sink, table, "listen.");
                lr.unknown_keys(place, LISTENER_KEYS, |_| false);
                let port_env = lr.value("port_env").zip(lr.parsed("port_env", env_name));
                options = listener_options(&mut lr, policy);
                let Some(url) = lr.value("url") else {
                    lr.error(item.span(), "`listen`: this table needs a `url`");
                    continue;
                };
                (url, port_env)
            }
            _ => {
                raw::wrong_type(
                    r.sink,
                    "listen",
                    item,
                    "a listen address or a { url, port_env } table",
                );
                continue;
            }
        };
        let Some(text) = raw::string(r.sink, "listen.url", url) else {
            continue;
        };
        let (proto, addr) = match parse_listen_url(text) {
            Ok(parsed) => parsed,
            Err(e) => {
                r.error(url.span(), format!("`listen`: {e}"));
                continue;
            }
        };
        claim(
            r.sink,
            taken,
            proto,
            addr,
            holder.to_owned(),
            url.span(),
            "listen",
        );
        options.check_proto(r.sink, proto);
        let (port_env, env_span) = match port_env {
            Some((value, name)) => (name, value.span()),
            None => (defaults::port_env(index), url.span()),
        };
        if let Some((_, first)) = listeners.iter().find(|(l, _)| l.port_env == port_env) {
            let line = r.sink.line_of(first);
            r.error(
                env_span.clone(),
                format!(
                    "`listen`: port_env `{port_env}` is also used by the listener at line {line}"
                ),
            );
        }
        listeners.push((
            Listener {
                proto,
                addr,
                port_env,
                proxy_protocol: options.proxy_protocol.map(|(v, _)| v),
                accept_proxy: options.accept_proxy.is_some_and(|(on, _)| on),
                captured: false,
            },
            env_span,
        ));
    }
    listeners.into_iter().map(|(l, _)| l).collect()
}

/// A listener table's PROXY protocol options, with where each was written (for errors that
/// only the URL's scheme can reveal).
#[derive(Default)]
struct ListenerOptions {
    proxy_protocol: Option<(ProxyVersion, Range<usize>)>,
    accept_proxy: Option<(bool, Range<usize>)>,
}

/// `proxy_protocol` and `accept_proxy` of one listener table. Both need the master in the data
/// path, so under reuseport (where workers accept from the kernel and see the client's address
/// themselves) they are refused rather than silently ignored.
fn listener_options(lr: &mut Reader<'_, '_, '_, '_>, policy: Policy) -> ListenerOptions {
    let span = |lr: &Reader<'_, '_, '_, '_>, key: &str| lr.value(key).map(|v| v.span());
    let proxy_protocol = lr
        .parsed("proxy_protocol", str::parse)
        .zip(span(lr, "proxy_protocol"));
    let accept_proxy = lr.boolean("accept_proxy").zip(span(lr, "accept_proxy"));
    if policy == Policy::ReusePort {
        if let Some((_, at)) = &proxy_protocol {
            lr.error(
                at.clone(),
                "`listen.proxy_protocol`: not possible with policy = \"reuseport\": workers accept \
                 from the kernel and see the client's address themselves; use policy = \"rr\" \
                 to have the master send a PROXY header",
            );
        }
        if let Some((true, at)) = &accept_proxy {
            lr.error(
                at.clone(),
                "`listen.accept_proxy`: not possible with policy = \"reuseport\": the master is \
                 not in the data path to read the header; use policy = \"rr\"",
            );
        }
    }
    ListenerOptions {
        proxy_protocol,
        accept_proxy,
    }
}

impl ListenerOptions {
    /// Refuses what a listener's protocol cannot do yet, at the option's position.
    fn check_proto(&self, sink: &mut Sink<'_>, proto: Proto) {
        if let (Some((_, at)), Proto::Udp) = (&self.proxy_protocol, proto) {
            sink.error(
                at.clone(),
                "`listen.proxy_protocol`: not supported yet on udp:// listeners; use a tcp:// or \
                 http:// listener for a PROXY header",
            );
        }
        if let (Some((true, at)), Proto::Udp) = (&self.accept_proxy, proto) {
            sink.error(
                at.clone(),
                "`listen.accept_proxy`: not supported yet on udp:// listeners; use it on tcp:// \
                 or http:// listeners",
            );
        }
    }
}

/// Refuses `keys` of an app whose policy leaves the master out of the data path (reuseport):
/// the kernel, not the master, picks the worker there, so they could only be ignored.
fn master_only(r: &mut Reader<'_, '_, '_, '_>, policy: Policy, keys: &[&str]) {
    if policy != Policy::ReusePort {
        return;
    }
    for key in keys {
        if let Some(value) = r.value(key) {
            r.error(
                value.span(),
                format!(
                    "`{key}`: not possible with policy = \"reuseport\": the kernel spreads \
                     connections over the workers' sockets; use policy = \"rr\" to have the \
                     master balance them"
                ),
            );
        }
    }
}

/// Records that `holder` binds `proto://addr` (written at `span`), reporting the first earlier
/// holder it clashes with.
fn claim(
    sink: &mut Sink<'_>,
    taken: &mut Taken,
    proto: Proto,
    addr: SocketAddr,
    holder: String,
    span: Range<usize>,
    label: &str,
) {
    if let Some(other) = taken.addrs.iter().find(|c| c.clashes(proto, addr)) {
        let line = sink.line_of(&other.span);
        let (mine, theirs) = (
            format!("{}://{addr}", proto.scheme()),
            format!("{}://{}", other.proto.scheme(), other.addr),
        );
        let message = if other.holder == holder && mine == theirs {
            format!("`{label}`: {mine} is listed twice (first at line {line})")
        } else if other.holder == holder {
            format!("`{label}`: {mine} clashes with {theirs}, also listed (at line {line})")
        } else if mine == theirs {
            format!(
                "`{label}`: {mine} is already used by {}, at line {line}",
                other.holder
            )
        } else {
            format!(
                "`{label}`: {mine} clashes with {theirs} of {}, at line {line}",
                other.holder
            )
        };
        sink.error(span.clone(), message);
    }
    taken.addrs.push(Claim {
        proto,
        addr,
        holder,
        span,
    });
}

/// A valid environment variable name, for `port_env`, that the worker contract does not use.
fn env_name(name: &str) -> Result<String, String> {
    if defaults::RESERVED_ENV.contains(&name) {
        return Err(format!(
            "{name:?} is set by balancer or the system for every worker; choose another name"
        ));
    }
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "{name:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"
        ))
    }
}

/// `policy`, or the default (from `BALANCER_SCHED_POLICY`) when the app does not say.
fn policy(r: &mut Reader<'_, '_, '_, '_>, default: Policy) -> Policy {
    if r.value("policy").is_none() {
        return default;
    }
    r.parsed("policy", str::parse).unwrap_or(default)
}

/// The `<name>` of an `env_<name>` key.
fn env_suffix(key: &str) -> Option<&str> {
    key.strip_prefix("env_").filter(|name| !name.is_empty())
}

/// `env`, with `env_<selected>` on top. Every `env_<name>` table is checked, selected or not.
fn env(r: &mut Reader<'_, '_, '_, '_>, selected: Option<&str>) -> BTreeMap<String, String> {
    let mut env = r
        .table("env")
        .map(|t| env_vars(r.sink, "env", t))
        .unwrap_or_default();
    let table = r.table;
    for (key, value) in table.iter() {
        let Some(name) = env_suffix(key.get_ref()) else {
            continue;
        };
        let Some(table) = raw::table(r.sink, key.get_ref(), value) else {
            continue;
        };
        let vars = env_vars(r.sink, key.get_ref(), table);
        if selected == Some(name) {
            env.extend(vars);
        }
    }
    env
}

/// The variables of one env table; numbers and booleans become their text.
fn env_vars(sink: &mut Sink<'_>, label: &str, table: &Table<'_>) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for (key, value) in table.iter() {
        let name = key.get_ref();
        if name.is_empty() || name.contains(['=', '\0']) {
            sink.error(
                key.span(),
                format!("`{label}`: {name:?} is not a usable variable name"),
            );
            continue;
        }
        let text = match value.get_ref() {
            DeValue::String(s) if s.contains('\0') => {
                sink.error(
                    value.span(),
                    format!("`{label}.{name}`: a value cannot contain a NUL character"),
                );
                continue;
            }
            DeValue::String(s) if s.len() > defaults::MAX_ARG_LEN => {
                sink.error(
                    value.span(),
                    format!(
                        "`{label}.{name}`: a value of {} bytes is longer than the {} bytes the \
                         kernel passes to a program",
                        s.len(),
                        defaults::MAX_ARG_LEN
                    ),
                );
                continue;
            }
            DeValue::String(s) => s.to_string(),
            DeValue::Integer(_) => match raw::integer(sink, label, value) {
                Some(n) => n.to_string(),
                None => continue,
            },
            DeValue::Float(f) => f.as_str().to_owned(),
            DeValue::Boolean(b) => b.to_string(),
            _ => {
                raw::wrong_type(
                    sink,
                    &format!("{label}.{name}"),
                    value,
                    "a string, number or boolean",
                );
                continue;
            }
        };
        vars.insert(name.to_string(), text);
    }
    vars
}

/// The `health` table.
fn health(r: &mut Reader<'_, '_, '_, '_>, place: &str) -> Health {
    r.unknown_keys(place, HEALTH_KEYS, |_| false);
    let check = r.parsed("check", |s| match s {
        "tcp" => Ok(Check::Tcp),
        "http" => Ok(Check::Http {
            path: defaults::HEALTH_PATH.to_owned(),
        }),
        "none" => Ok(Check::None),
        _ => Err(format!(
            "unknown check {s:?}; expected \"tcp\", \"http\" or \"none\""
        )),
    });
    let check_is_valid = check.is_some() || r.value("check").is_none();
    let path = r.parsed("path", |s| {
        if !s.starts_with('/') {
            Err(format!("{s:?} must start with `/`"))
        } else if s.chars().any(|c| c.is_control() || c == ' ') {
            Err(format!(
                "{s:?} contains a space or a control character; percent-encode it (`%20`)"
            ))
        } else {
            Ok(s.to_owned())
        }
    });
    let check = match check.unwrap_or(defaults::HEALTH_CHECK) {
        Check::Http { path: default } => Check::Http {
            path: path.unwrap_or(default),
        },
        other => {
            if let Some(span) = r.key_span("path").filter(|_| check_is_valid) {
                r.error(span, "`health.path` is only used with check = \"http\"");
            }
            other
        }
    };
    Health {
        check,
        interval: r
            .positive_duration("interval")
            .unwrap_or(defaults::HEALTH_INTERVAL),
        timeout: r
            .positive_duration("timeout")
            .unwrap_or(defaults::HEALTH_TIMEOUT),
        rise: r.count("rise", 1).unwrap_or(defaults::HEALTH_RISE),
        fall: r.count("fall", 1).unwrap_or(defaults::HEALTH_FALL),
    }
}

/// `kill_signal`: a name, or a number.
fn kill_signal(r: &mut Reader<'_, '_, '_, '_>) -> Option<Signal> {
    let value = r.value("kill_signal")?;
    let parsed = match value.get_ref() {
        DeValue::String(s) => parse_signal(s),
        DeValue::Integer(_) => {
            parse_signal(&raw::integer(r.sink, "kill_signal", value)?.to_string())
        }
        _ => {
            raw::wrong_type(
                r.sink,
                "kill_signal",
                value,
                "a signal name such as \"SIGTERM\"",
            );
            return None;
        }
    };
    parsed
        .map_err(|e| r.error(value.span(), format!("`kill_signal`: {e}")))
        .ok()
}

/// `exp_backoff_restart_delay`: a duration, with 0 or `false` turning the backoff off.
fn exp_backoff(r: &mut Reader<'_, '_, '_, '_>) -> Option<Option<Duration>> {
    match r.value("exp_backoff_restart_delay")?.get_ref() {
        DeValue::Boolean(false) => Some(None),
        DeValue::Boolean(true) => Some(defaults::EXP_BACKOFF_RESTART_DELAY),
        _ => r
            .duration("exp_backoff_restart_delay")
            .map(|d| Some(d).filter(|d| !d.is_zero())),
    }
}

/// A size key that must be positive (`"64K"` or an integer of bytes).
fn size(r: &mut Reader<'_, '_, '_, '_>, label: &str) -> Option<u64> {
    let value = r.value(label)?;
    let parsed = match value.get_ref() {
        DeValue::String(s) => parse_size(s),
        DeValue::Integer(_) => match raw::integer(r.sink, label, value)? {
            n if n <= 0 => Err(format!("must be positive, found {n}")),
            n => Ok(n.unsigned_abs()),
        },
        _ => {
            raw::wrong_type(
                r.sink,
                label,
                value,
                "a size such as \"64K\" or an integer of bytes",
            );
            return None;
        }
    };
    match parsed {
        Ok(0) => {
            r.error(value.span(), format!("`{label}`: must be positive"));
            None
        }
        Ok(n) => Some(n),
        Err(e) => {
            r.error(value.span(), format!("`{label}`: {e}"));
            None
        }
    }
}

/// `max_memory_restart`: a size string (`"300M"`) or an integer of bytes.
fn max_memory(r: &mut Reader<'_, '_, '_, '_>) -> Option<Option<u64>> {
    const LABEL: &str = "max_memory_restart";
    let value = r.value(LABEL)?;
    let parsed = match value.get_ref() {
        DeValue::String(s) => parse_size(s),
        DeValue::Integer(_) => match raw::integer(r.sink, LABEL, value)? {
            n if n < 0 => Err(format!("a size cannot be negative, found {n}")),
            n => Ok(n.unsigned_abs()),
        },
        _ => {
            raw::wrong_type(
                r.sink,
                LABEL,
                value,
                "a size such as \"300M\" or an integer of bytes",
            );
            return None;
        }
    };
    match parsed {
        Ok(0) => r.error(
            value.span(),
            format!("`{LABEL}`: must be more than 0; leave it out for no limit"),
        ),
        Ok(bytes) => return Some(Some(bytes)),
        Err(e) => r.error(value.span(), format!("`{LABEL}`: {e}")),
    }
    None
}
