//! `balancer start`: what its argument is (a balancer.toml, a script, an app the master knows,
//! or a command), the one-app balancer.toml built from a script's options, and launching the
//! master when none is running.

use std::path::Path;
use std::process::ExitCode;

use balancer_workers::Chain;

use super::daemon;
use super::reply::{Outcome, act, config_errors, failed, is_toml, running_master};
use crate::cli::{EXIT_FAILED, EXIT_USAGE, InstancesArg, StartArgs};
use crate::protocol::{Load, Pong, Reply, Request, Start};
use crate::ui::Output;

/// What `start`'s argument turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Program {
    /// An existing file run as the app (`script = …`).
    Script,
    /// A program name looked up in `PATH` (`command = […]`).
    Command,
}

/// `start`: a balancer.toml (an existing `.toml` file), a script (any other existing path), an
/// app or worker the master already knows (or `all`), or else a command. The order is fixed so
/// the same words always mean the same thing.
pub(super) fn start(home: &Path, args: StartArgs, output: Output) -> Outcome {
    if args.target.is_empty() {
        if args.describes_an_app() || args.env.is_some() || args.force {
            return failed(
                EXIT_USAGE,
                "these options describe an app to start: name its script, command or balancer.toml (`balancer start` alone resurrects what `balancer save` wrote)",
            );
        }
        if args.no_daemon {
            return failed(
                EXIT_USAGE,
                "`start --no-daemon` needs a target; `balancer run` with no file resurrects in the foreground",
            );
        }
        // `start` with no argument, as PM2's `pm2 resurrect`: what `save` wrote.
        return super::deploy::resurrect(home, output);
    }
    let path = Path::new(&args.target);
    if path.exists() {
        if is_toml(path) && path.is_file() {
            return start_file(home, args, output);
        }
        if super::import::is_ecosystem(path) && path.is_file() {
            return start_ecosystem(home, args, output);
        }
        return start_program(home, args, Program::Script, output);
    }
    if is_toml(path) {
        return failed(EXIT_USAGE, format!("{}: no such file", args.target));
    }
    if !args.no_daemon && !args.target.contains('/') {
        match knows(home, &args.target) {
            Ok(true) => return start_known(home, args, output),
            Ok(false) => {}
            Err(outcome) => return outcome,
        }
    }
    start_program(home, args, Program::Command, output)
}

/// Whether the master knows `target` as an app name, a worker id, or `all`. No master: no.
fn knows(home: &Path, target: &str) -> Result<bool, Outcome> {
    if target == "all" {
        return Ok(true);
    }
    let show = Request::Show {
        target: target.to_owned(),
    };
    match super::client::request(home, &show) {
        Ok(reply) => Ok(!matches!(reply, Reply::Failed { .. })),
        Err(e) if e.is_no_master() => Ok(false),
        Err(e) => Err(failed(EXIT_FAILED, Chain(&e))),
    }
}

/// `start web`, `start 3`, `start all`: start stopped apps or workers again.
fn start_known(home: &Path, args: StartArgs, output: Output) -> Outcome {
    if args.force {
        return failed(
            EXIT_USAGE,
            format!(
                "-f replaces an app with a new script or command; to start `{}` again afresh: \
                 balancer restart {} (or reload, without downtime)",
                args.target, args.target
            ),
        );
    }
    if args.describes_an_app() || args.env.is_some() {
        return failed(
            EXIT_USAGE,
            format!(
                "`{}` is already known to the master; -n, -i, -l, --policy, --env and -- ARGS \
                 describe a new app (to change its worker count: balancer scale {} N)",
                args.target, args.target
            ),
        );
    }
    let request = Request::Start(Start::Stopped {
        target: args.target,
    });
    act(home, &request, output)
}

/// `start balancer.toml [--env NAME]`.
fn start_file(home: &Path, args: StartArgs, output: Output) -> Outcome {
    if args.force {
        return failed(
            EXIT_USAGE,
            "-f goes with a script, a command or an ecosystem file: a balancer.toml already \
             applies its changes to the apps it names (to replace every worker: balancer reload \
             FILE)",
        );
    }
    if args.describes_an_app() {
        return failed(
            EXIT_USAGE,
            "-n, -i, -l, --policy and -- ARGS describe one app; with a balancer.toml, set them \
             in the file",
        );
    }
    let path = Path::new(&args.target);
    let master = match master_unless_foreground(home, args.no_daemon) {
        Ok(master) => master,
        Err(outcome) => return outcome,
    };
    let (opts, load) = Load::options(args.env.clone(), master.as_ref());
    let config = match balancer_config::load(path, &opts) {
        Ok(config) => config,
        Err(errors) => return config_errors(&errors),
    };
    if args.no_daemon {
        return Outcome::Foreground(config);
    }
    let file = match std::path::absolute(path) {
        Ok(file) => file,
        Err(e) => return failed(EXIT_FAILED, format!("{}: {e}", path.display())),
    };
    let request = Request::Start(Start::File { file, load });
    start_on_master(home, master, &request, output)
}

/// `start ecosystem.config.js|process.json|ecosystem.yaml [--env NAME] [-f]`: PM2's file,
/// mapped to balancer.toml here (every key it cannot carry named on stderr) and started as
/// command-line apps, relative paths from the file's directory as PM2 resolves them. A name
/// already running is refused without `-f`, as PM2 refuses a script already launched.
fn start_ecosystem(home: &Path, args: StartArgs, output: Output) -> Outcome {
    if args.describes_an_app() {
        return failed(
            EXIT_USAGE,
            "-n, -i, -l, --policy, PM2's options and -- ARGS describe one app; with an ecosystem \
             file, set them in the file",
        );
    }
    let path = Path::new(&args.target);
    let imported = match super::import::import(path) {
        Ok(imported) => imported,
        Err(e) => return failed(EXIT_USAGE, e),
    };
    for warning in &imported.warnings {
        eprintln!("balancer: {}: warning: {warning}", path.display());
    }
    let dir = match std::path::absolute(path) {
        Ok(file) => file.parent().map(Path::to_path_buf).unwrap_or_default(),
        Err(e) => return failed(EXIT_FAILED, format!("{}: {e}", path.display())),
    };
    let master = match master_unless_foreground(home, args.no_daemon) {
        Ok(master) => master,
        Err(outcome) => return outcome,
    };
    let (opts, load) = Load::options(args.env.clone(), master.as_ref());
    let config = match balancer_config::parse(&imported.toml, &dir.join("balancer.toml"), &opts) {
        Ok(config) => config,
        Err(errors) => {
            // Positions are in the mapped text; the messages name the keys.
            for diagnostic in &errors.0 {
                eprintln!("balancer: {}: {}", path.display(), diagnostic.message);
            }
            return Outcome::Exit(ExitCode::from(EXIT_USAGE));
        }
    };
    if args.no_daemon {
        return Outcome::Foreground(config);
    }
    let request = Request::Start(Start::Toml {
        toml: imported.toml,
        cwd: Some(dir),
        load,
        force: args.force,
    });
    start_on_master(home, master, &request, output)
}

/// `start server.js -i max -l :8080 -- --flag`, `start python3 -- -m http.server`: one app,
/// described as balancer.toml text, checked here and sent with the current directory.
fn start_program(home: &Path, args: StartArgs, program: Program, output: Output) -> Outcome {
    if program == Program::Command && args.target.contains(char::is_whitespace) {
        let mut words = args.target.split_whitespace();
        let first = words.next().unwrap_or_default();
        let rest: Vec<&str> = words.collect();
        return failed(
            EXIT_USAGE,
            format!(
                "`{}` is not a file; to run a command with arguments, put them after --: \
                 balancer start {first} -- {}",
                args.target,
                rest.join(" ")
            ),
        );
    }
    if args.target == "all" {
        return failed(
            EXIT_USAGE,
            "`all` names every app of a running master; there is none with --no-daemon",
        );
    }
    let cwd = match std::env::current_dir() {
        Ok(cwd) => cwd,
        Err(e) => {
            return failed(
                EXIT_FAILED,
                format!("cannot read the current directory: {e}"),
            );
        }
    };
    let text = match app_toml(&args, program) {
        Ok(text) => text,
        Err(e) => return failed(EXIT_USAGE, e),
    };
    if program == Program::Command
        && !args.target.contains('/')
        && !balancer_config::in_path(&args.target)
    {
        let known = if args.no_daemon {
            ""
        } else {
            " an app or worker of the running master,"
        };
        return failed(
            EXIT_USAGE,
            format!(
                "`{}` is not a file,{known} or a program in PATH",
                args.target
            ),
        );
    }
    let master = match master_unless_foreground(home, args.no_daemon) {
        Ok(master) => master,
        Err(outcome) => return outcome,
    };
    let (opts, load) = Load::options(args.env.clone(), master.as_ref());
    let config = match balancer_config::parse(&text, &cwd.join("balancer.toml"), &opts) {
        Ok(config) => config,
        Err(errors) => {
            // The positions are in text the user never saw: print the messages alone.
            for diagnostic in &errors.0 {
                eprintln!("balancer: {}", diagnostic.message);
            }
            return Outcome::Exit(ExitCode::from(EXIT_USAGE));
        }
    };
    if args.no_daemon {
        return Outcome::Foreground(config);
    }
    let request = Request::Start(Start::Toml {
        toml: text,
        cwd: Some(cwd),
        load,
        force: args.force,
    });
    start_on_master(home, master, &request, output)
}

/// The balancer.toml of one app from `start`'s options. Built as a TOML table and serialised
/// by the `toml` crate, so any name, path or argument is quoted correctly.
pub(super) fn app_toml(args: &StartArgs, program: Program) -> Result<String, String> {
    use toml::Value;

    let mut app = toml::Table::new();
    let name = match &args.name {
        Some(name) => name.clone(),
        None => default_name(&args.target, program).ok_or_else(|| {
            format!(
                "cannot name an app after `{}`; give it one with -n NAME",
                args.target
            )
        })?,
    };
    app.insert("name".into(), Value::String(name));
    let target = Value::String(args.target.clone());
    match program {
        Program::Script => app.insert("script".into(), target),
        Program::Command => app.insert("command".into(), Value::Array(vec![target])),
    };
    if !args.args.is_empty() {
        let words = args.args.iter().cloned().map(Value::String).collect();
        app.insert("args".into(), Value::Array(words));
    }
    if let Some(instances) = args.instances {
        let value = match instances {
            InstancesArg::Max => Value::String("max".into()),
            InstancesArg::Count(n) => Value::Integer(n),
        };
        app.insert("instances".into(), value);
    }
    if !args.listen.is_empty() {
        let urls = args
            .listen
            .iter()
            .map(|url| {
                balancer_config::parse_listen_url(url)
                    .map(|(proto, addr)| Value::String(format!("{}://{addr}", proto.scheme())))
                    .map_err(|e| format!("-l {url}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        app.insert("listen".into(), Value::Array(urls));
    }
    if let Some(policy) = &args.policy {
        app.insert("policy".into(), Value::String(policy.clone()));
    }
    pm2_keys(&mut app, &args.pm2);
    let mut doc = toml::Table::new();
    doc.insert("app".into(), Value::Array(vec![Value::Table(app)]));
    toml::to_string(&doc).map_err(|e| format!("cannot describe the app as TOML: {e}"))
}

/// PM2's start options as their balancer.toml keys. A duration given as a bare number is
/// milliseconds (a TOML integer), as PM2 reads it; anything else is passed as written and
/// checked by the config's own parser, so a flag and its key accept exactly the same values.
fn pm2_keys(app: &mut toml::Table, pm2: &crate::cli::Pm2Args) {
    use toml::Value;
    let text = |v: &str| Value::String(v.to_owned());
    let duration = |v: &str| match v.parse::<i64>() {
        Ok(ms) => Value::Integer(ms),
        Err(_) => text(v),
    };
    let mut set = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            app.insert(key.into(), value);
        }
    };
    set("interpreter", pm2.interpreter.as_deref().map(text));
    set(
        "interpreter_args",
        pm2.interpreter_args.as_deref().map(text),
    );
    set("restart_delay", pm2.restart_delay.as_deref().map(duration));
    set("min_uptime", pm2.min_uptime.as_deref().map(duration));
    set("kill_timeout", pm2.kill_timeout.as_deref().map(duration));
    set(
        "max_restarts",
        pm2.max_restarts.map(|n| Value::Integer(n.into())),
    );
    set(
        "max_memory_restart",
        pm2.max_memory_restart.as_deref().map(text),
    );
    set("cwd", pm2.cwd.as_deref().map(text));
    set("error_file", pm2.error_file.as_deref().map(text));
    set("out_file", pm2.out_file.as_deref().map(text));
    set("log_file", pm2.log_file.as_deref().map(text));
    if pm2.merge_logs {
        set("merge_logs", Some(Value::Boolean(true)));
    }
    if pm2.time {
        set("time", Some(Value::Boolean(true)));
    }
    set(
        "log_date_format",
        pm2.log_date_format.as_deref().map(|f| {
            // PM2's flag takes moment.js formats; balancer.toml takes strftime.
            text(&balancer_config::logging::moment_to_strftime(f).unwrap_or_else(|| f.to_owned()))
        }),
    );
    set(
        "watch",
        pm2.watch.as_ref().map(|paths| {
            if paths.is_empty() {
                Value::Boolean(true)
            } else {
                Value::Array(paths.iter().map(|p| text(p)).collect())
            }
        }),
    );
    set(
        "ignore_watch",
        pm2.ignore_watch
            .as_ref()
            .map(|globs| Value::Array(globs.iter().map(|g| text(g)).collect())),
    );
    // PM2's `--watch-delay 4` is seconds (its ecosystem key is milliseconds).
    set(
        "watch_delay",
        pm2.watch_delay.as_deref().map(|v| match v.parse::<u64>() {
            Ok(secs) => text(&format!("{secs}s")),
            Err(_) => text(v),
        }),
    );
    set("cron_restart", pm2.cron_restart.as_deref().map(text));
    if pm2.no_autorestart {
        set("autorestart", Some(Value::Boolean(false)));
    }
    if pm2.fork {
        // One worker and no listener: the app binds its own ports, as in PM2's fork mode.
        set("instances", Some(Value::Integer(1)));
    }
}

/// PM2's default name: the script's file name without its extension, or the program's name.
pub(super) fn default_name(target: &str, program: Program) -> Option<String> {
    let path = Path::new(target);
    let name = match program {
        Program::Script => path.file_stem(),
        Program::Command => path.file_name(),
    }?;
    Some(name.to_str()?.to_owned()).filter(|n| !n.is_empty())
}

/// The running master (`None`: none), unless the apps are to run in the foreground, which
/// needs none.
fn master_unless_foreground(home: &Path, foreground: bool) -> Result<Option<Pong>, Outcome> {
    if foreground {
        Ok(None)
    } else {
        running_master(home)
    }
}

/// Sends a `start`, first launching the master if none is running (`master` is `None`).
pub(super) fn start_on_master(
    home: &Path,
    master: Option<Pong>,
    request: &Request,
    output: Output,
) -> Outcome {
    if master.is_none() {
        match daemon::spawn(home) {
            Ok(pid) => {
                let home = std::path::absolute(home).unwrap_or_else(|_| home.to_path_buf());
                eprintln!(
                    "balancer: started master (pid {pid}), home {}",
                    home.display()
                );
            }
            Err(e) => return failed(EXIT_FAILED, format!("cannot start the master: {e:#}")),
        }
    }
    act(home, request, output)
}
