//! The PM2 verbs (`start`, `stop`, `ls`, `logs`, …): each builds an admin request, sends it to
//! the master over its socket, and prints the reply.
//!
//! Exit codes follow [`crate::cli`]: 0 done, 1 failed (or the reply's `code`), 2 bad usage or a
//! bad config. Configs are validated here before anything is sent, so a typo in balancer.toml
//! never reaches (or starts) a master. `start` launches the master when none is running; every
//! other verb just says there is none.

use std::fmt::Display;
use std::io::{self, Write};
use std::ops::ControlFlow;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use balancer_config::{Config, ConfigErrors, LoadOptions};
use balancer_workers::Chain;

use crate::admin::client::{self, Client};
use crate::admin::protocol::{Reply, Request};
use crate::cli::{self, Command, EXIT_FAILED, EXIT_USAGE, InstancesArg, StartArgs};
use crate::daemon;
use crate::ui::{self, Output};

/// How long `ping` waits for the master.
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `kill` waits for the master to be gone after it said yes.
const KILL_WAIT: Duration = Duration::from_secs(120);

/// What `main` should do once a client verb is done.
#[derive(Debug)]
pub enum Outcome {
    /// Exit with this code; everything has been printed.
    Exit(ExitCode),
    /// `start --no-daemon`: run this config in the foreground, as `run` does.
    Foreground(Config),
}

/// Runs a client verb against the master of [`cli::home`], printing for a terminal when stdout
/// is one. `run`, `check` and `daemon` are not client verbs and give a usage error.
pub fn client(command: Command) -> Outcome {
    run(command, &cli::home(), Output::stdout())
}

fn run(command: Command, home: &Path, output: Output) -> Outcome {
    match command {
        Command::Start(args) => start(home, args, output),
        Command::Stop { target } => act(home, &Request::Stop { target }, output),
        Command::Restart { target } => act(home, &Request::Restart { target }, output),
        Command::Reload { target, env } => reload(home, target, env, output),
        Command::Delete { target } => act(home, &Request::Delete { target }, output),
        Command::Scale { app, to } => act(home, &Request::Scale { app, to }, output),
        Command::Ls => ls(home, output),
        Command::Jlist => jlist(home),
        Command::Show { target } => show(home, target, output),
        Command::Logs {
            target,
            lines,
            follow,
            json,
        } => logs(
            home,
            Request::Logs {
                target,
                lines,
                follow,
            },
            json,
            output,
        ),
        Command::Flush { target } => act(home, &Request::Flush { target }, output),
        Command::Ping => ping(home),
        Command::Kill => kill(home, output),
        Command::Run { .. }
        | Command::Check { .. }
        | Command::Daemon
        | Command::ExecShim { .. } => failed(EXIT_USAGE, "this command does not talk to a master"),
    }
}

// ---- start -------------------------------------------------------------------------------

/// What `start`'s argument turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Program {
    /// An existing file run as the app (`script = …`).
    Script,
    /// A program name looked up in `PATH` (`command = […]`).
    Command,
}

/// `start`: a balancer.toml (an existing `.toml` file), a script (any other existing path), an
/// app or worker the master already knows (or `all`), or else a command. The order is fixed so
/// the same words always mean the same thing.
fn start(home: &Path, args: StartArgs, output: Output) -> Outcome {
    let path = Path::new(&args.target);
    if path.exists() {
        if is_toml(path) && path.is_file() {
            return start_file(home, args, output);
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
    match client::request(home, &show) {
        Ok(reply) => Ok(reply.ok),
        Err(e) if e.is_no_master() => Ok(false),
        Err(e) => Err(failed(EXIT_FAILED, Chain(&e).to_string())),
    }
}

/// `start web`, `start 3`, `start all`: start stopped apps or workers again.
fn start_known(home: &Path, args: StartArgs, output: Output) -> Outcome {
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
    let request = Request::Start {
        file: None,
        env: None,
        toml: None,
        cwd: None,
        target: Some(args.target),
    };
    act(home, &request, output)
}

/// `start balancer.toml [--env NAME]`.
fn start_file(home: &Path, args: StartArgs, output: Output) -> Outcome {
    if args.describes_an_app() {
        return failed(
            EXIT_USAGE,
            "-n, -i, -l, --policy and -- ARGS describe one app; with a balancer.toml, set them \
             in the file",
        );
    }
    let path = Path::new(&args.target);
    let config = match balancer_config::load(path, &load_options(args.env.clone())) {
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
    let request = Request::Start {
        file: Some(file),
        env: args.env,
        toml: None,
        cwd: None,
        target: None,
    };
    start_on_master(home, &request, output)
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
    if program == Program::Command && !args.target.contains('/') && !in_path(&args.target) {
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
    let config = match balancer_config::parse(
        &text,
        &cwd.join("balancer.toml"),
        &load_options(args.env.clone()),
    ) {
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
    let request = Request::Start {
        file: None,
        env: args.env,
        toml: Some(text),
        cwd: Some(cwd),
        target: None,
    };
    start_on_master(home, &request, output)
}

/// The balancer.toml of one app from `start`'s options. Built as a TOML table and serialised
/// by the `toml` crate, so any name, path or argument is quoted correctly.
fn app_toml(args: &StartArgs, program: Program) -> Result<String, String> {
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
    let mut doc = toml::Table::new();
    doc.insert("app".into(), Value::Array(vec![Value::Table(app)]));
    toml::to_string(&doc).map_err(|e| format!("cannot describe the app as TOML: {e}"))
}

/// PM2's default name: the script's file name without its extension, or the program's name.
fn default_name(target: &str, program: Program) -> Option<String> {
    let path = Path::new(target);
    let name = match program {
        Program::Script => path.file_stem(),
        Program::Command => path.file_name(),
    }?;
    Some(name.to_str()?.to_owned()).filter(|n| !n.is_empty())
}

/// Whether `program` names an executable file in one of `PATH`'s directories. Checked here
/// because the master would only find out by crash-looping the app.
fn in_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(program))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Sends a `start`, first launching the master if none is running.
fn start_on_master(home: &Path, request: &Request, output: Output) -> Outcome {
    match client::request_within(home, &Request::Ping {}, PING_TIMEOUT) {
        Ok(_) => {}
        Err(e) if e.is_no_master() => match daemon::spawn(home) {
            Ok(pid) => {
                let home = std::path::absolute(home).unwrap_or_else(|_| home.to_path_buf());
                eprintln!(
                    "balancer: started master (pid {pid}), home {}",
                    home.display()
                );
            }
            Err(e) => return failed(EXIT_FAILED, format!("cannot start the master: {e:#}")),
        },
        Err(e) => return failed(EXIT_FAILED, Chain(&e).to_string()),
    }
    act(home, request, output)
}

// ---- the other verbs ---------------------------------------------------------------------

/// `reload NAME|ID|all`, or `reload balancer.toml [--env NAME]` (checked here first).
fn reload(home: &Path, target: String, env: Option<String>, output: Output) -> Outcome {
    let path = Path::new(&target);
    let request = if path.is_file() {
        if let Err(errors) = balancer_config::load(path, &load_options(env.clone())) {
            return config_errors(&errors);
        }
        match std::path::absolute(path) {
            Ok(file) => Request::Reload {
                target: None,
                file: Some(file),
                env,
            },
            Err(e) => return failed(EXIT_FAILED, format!("{target}: {e}")),
        }
    } else if is_toml(path) {
        return failed(EXIT_USAGE, format!("{target}: no such file"));
    } else if env.is_some() {
        return failed(
            EXIT_USAGE,
            "--env goes with a balancer.toml: balancer reload FILE --env NAME",
        );
    } else {
        Request::Reload {
            target: Some(target),
            file: None,
            env: None,
        }
    };
    act(home, &request, output)
}

/// `ls`: the workers table.
fn ls(home: &Path, output: Output) -> Outcome {
    match send(home, &Request::List {}) {
        Ok(reply) => {
            let workers = reply.workers.unwrap_or_default();
            print(ui::table::workers(&workers, output));
            ok()
        }
        Err(outcome) => outcome,
    }
}

/// `jlist`: the workers as one line of JSON, exactly as the master sent them.
fn jlist(home: &Path) -> Outcome {
    match send(home, &Request::List {}) {
        Ok(reply) => match serde_json::to_string(&reply.workers.unwrap_or_default()) {
            Ok(json) => {
                print(json);
                ok()
            }
            Err(e) => failed(
                EXIT_FAILED,
                format!("cannot print the workers as JSON: {e}"),
            ),
        },
        Err(outcome) => outcome,
    }
}

/// `show NAME|ID`: the app page, or (if the master sent only workers) their table and notes.
fn show(home: &Path, target: String, output: Output) -> Outcome {
    let reply = match send(home, &Request::Show { target }) {
        Ok(reply) => reply,
        Err(outcome) => return outcome,
    };
    if let Some(app) = &reply.app {
        print(ui::table::app(app, output).trim_end());
    } else if let Some(workers) = &reply.workers {
        print(ui::table::workers(workers, output));
        for note in ui::table::worker_notes(workers) {
            print(note);
        }
    } else if let Some(message) = &reply.message {
        print(message);
    }
    ok()
}

/// `logs`: past lines, then (with `follow`) new ones until interrupted or stdout closes.
fn logs(home: &Path, request: Request, json: bool, output: Output) -> Outcome {
    let mut client = match Client::connect(home) {
        Ok(client) => client,
        Err(e) => return failed(EXIT_FAILED, Chain(&e).to_string()),
    };
    let mut refused = None;
    let streamed = client.stream(&request, |reply| {
        if !reply.ok {
            refused = Some(reply);
            return ControlFlow::Break(());
        }
        if let Some(log) = &reply.log {
            let line = if json {
                serde_json::to_string(log).unwrap_or_default()
            } else {
                ui::log_line(log, output)
            };
            if write_line(&line).is_err() {
                // Whoever read our stdout is gone (`| head`): so is the point of going on.
                return ControlFlow::Break(());
            }
        }
        if reply.done == Some(true) {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    if let Some(reply) = refused {
        return refusal(&reply);
    }
    match streamed {
        Ok(()) => ok(),
        Err(e) => failed(EXIT_FAILED, Chain(&e).to_string()),
    }
}

/// `ping`: the master's pid and version, or that there is none (exit 1).
fn ping(home: &Path) -> Outcome {
    let reply = match client::request_within(home, &Request::Ping {}, PING_TIMEOUT) {
        Ok(reply) if reply.ok => reply,
        Ok(reply) => return refusal(&reply),
        Err(e) => return failed(EXIT_FAILED, Chain(&e).to_string()),
    };
    let pid = reply.pid.map_or_else(|| "?".to_owned(), |p| p.to_string());
    let version = reply.version.as_deref().unwrap_or("?");
    print(format!("master running: pid {pid}, version {version}"));
    let ours = env!("CARGO_PKG_VERSION");
    if reply.version.as_deref().is_some_and(|v| v != ours) {
        eprintln!(
            "balancer: the master runs version {version} and this CLI is {ours}; \
             `balancer kill` and start again to upgrade"
        );
    }
    ok()
}

/// `kill`: stop everything and the master, and wait until it is gone. No master is fine.
fn kill(home: &Path, output: Output) -> Outcome {
    let reply = match client::request(home, &Request::Kill {}) {
        Ok(reply) if reply.ok => reply,
        Ok(reply) => return refusal(&reply),
        Err(e) if e.is_no_master() => {
            eprintln!("balancer: {e}");
            return ok();
        }
        Err(e) => return failed(EXIT_FAILED, Chain(&e).to_string()),
    };
    report(&reply, output);
    // The reply can come before the master has exited; a `start` right after `kill` must not
    // find the old one still answering.
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        match client::request_within(home, &Request::Ping {}, Duration::from_secs(1)) {
            Err(e) if e.is_no_master() => return ok(),
            _ if Instant::now() >= deadline => {
                return failed(
                    EXIT_FAILED,
                    format!(
                        "the master is still running {} after `kill`",
                        humantime::format_duration(KILL_WAIT)
                    ),
                );
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

// ---- plumbing ----------------------------------------------------------------------------

/// Sends `request` and prints what was done: the message, then the workers touched.
fn act(home: &Path, request: &Request, output: Output) -> Outcome {
    match send(home, request) {
        Ok(reply) => {
            report(&reply, output);
            ok()
        }
        Err(outcome) => outcome,
    }
}

/// One request, one successful reply; anything else is printed and becomes the exit code.
fn send(home: &Path, request: &Request) -> Result<Reply, Outcome> {
    match client::request(home, request) {
        Ok(reply) if reply.ok => Ok(reply),
        Ok(reply) => Err(refusal(&reply)),
        Err(e) => Err(failed(EXIT_FAILED, Chain(&e).to_string())),
    }
}

fn report(reply: &Reply, output: Output) {
    if let Some(message) = &reply.message {
        print(message);
    }
    if let Some(workers) = reply.workers.as_deref().filter(|w| !w.is_empty()) {
        print(ui::table::workers(workers, output));
    }
}

/// A reply with `ok: false`: its error, and its code (1 if it gave none, or 0).
fn refusal(reply: &Reply) -> Outcome {
    let code = reply.code.filter(|c| *c != 0).unwrap_or(EXIT_FAILED);
    let error = reply
        .error
        .as_deref()
        .unwrap_or("the master refused (no reason given)");
    failed(code, error)
}

fn config_errors(errors: &ConfigErrors) -> Outcome {
    eprintln!("{errors}");
    Outcome::Exit(ExitCode::from(EXIT_USAGE))
}

fn load_options(env: Option<String>) -> LoadOptions {
    LoadOptions {
        env,
        ..LoadOptions::from_env()
    }
}

fn is_toml(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "toml")
}

fn failed(code: u8, message: impl Display) -> Outcome {
    eprintln!("balancer: {message}");
    Outcome::Exit(ExitCode::from(code))
}

fn ok() -> Outcome {
    Outcome::Exit(ExitCode::SUCCESS)
}

/// Prints to stdout; a closed stdout is not worth a panic.
fn print(text: impl Display) {
    let _ = write_line(&text.to_string());
}

fn write_line(line: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixListener;
    use std::thread::JoinHandle;

    fn args(target: &str) -> StartArgs {
        StartArgs {
            target: target.into(),
            ..StartArgs::default()
        }
    }

    fn run_outcome(command: Command, home: &Path) -> Outcome {
        run(command, home, Output::Plain)
    }

    fn code(outcome: Outcome) -> ExitCode {
        match outcome {
            Outcome::Exit(code) => code,
            Outcome::Foreground(config) => panic!("foreground {config:?}"),
        }
    }

    /// A fake master: for each expected connection, reads one request and writes its replies.
    /// Joining it gives the requests, in order.
    fn fake_master(home: &Path, connections: Vec<Vec<&'static str>>) -> JoinHandle<Vec<Request>> {
        let listener = UnixListener::bind(client::socket_path(home)).unwrap();
        std::thread::spawn(move || {
            let mut requests = Vec::new();
            for replies in connections {
                let (stream, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                requests.push(serde_json::from_str(&line).unwrap());
                let mut stream = stream;
                for reply in replies {
                    if writeln!(stream, "{reply}").is_err() {
                        break;
                    }
                }
            }
            requests
        })
    }

    fn script(dir: &Path, name: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, "#!/bin/sh\nexec sleep 1000\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.to_str().unwrap().to_owned()
    }

    #[test]
    fn a_script_becomes_one_app() {
        let start = StartArgs {
            instances: Some(InstancesArg::Max),
            listen: vec!["8080".into(), "http://127.0.0.1:8081/".into()],
            policy: Some("rr".into()),
            args: vec!["--port".into(), "x".into()],
            ..args("server.js")
        };
        let text = app_toml(&start, Program::Script).unwrap();
        assert_eq!(
            text,
            "[[app]]\n\
             args = [\"--port\", \"x\"]\n\
             instances = \"max\"\n\
             listen = [\"tcp://0.0.0.0:8080\", \"http://127.0.0.1:8081\"]\n\
             name = \"server\"\n\
             policy = \"rr\"\n\
             script = \"server.js\"\n"
        );
    }

    #[test]
    fn a_command_becomes_one_app_with_negative_instances() {
        let start = StartArgs {
            name: Some("api".into()),
            instances: Some(InstancesArg::Count(-1)),
            args: vec!["-m".into(), "http.server".into()],
            ..args("python3")
        };
        let text = app_toml(&start, Program::Command).unwrap();
        assert_eq!(
            text,
            "[[app]]\n\
             args = [\"-m\", \"http.server\"]\n\
             command = [\"python3\"]\n\
             instances = -1\n\
             name = \"api\"\n"
        );
    }

    #[test]
    fn awkward_strings_survive_the_round_trip() {
        let nasty = "a \"quoted\" \\ back\\slash\nnew line \u{e9} ' ''' \"\"\" $HOME\t#";
        let start = StartArgs {
            name: Some("x".into()),
            args: vec![nasty.into(), String::new()],
            ..args("/opt/my app/run it.sh")
        };
        let text = app_toml(&start, Program::Script).unwrap();
        let doc: toml::Table = toml::from_str(&text).unwrap();
        let app = doc["app"].as_array().unwrap()[0].as_table().unwrap();
        assert_eq!(app["script"].as_str(), Some("/opt/my app/run it.sh"));
        let got: Vec<&str> = app["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(got, [nasty, ""]);
    }

    #[test]
    fn names_default_like_pm2() {
        let name = |target, program| default_name(target, program);
        assert_eq!(
            name("server.js", Program::Script).as_deref(),
            Some("server")
        );
        assert_eq!(
            name("./bin/app.py", Program::Script).as_deref(),
            Some("app")
        );
        assert_eq!(
            name("python3", Program::Command).as_deref(),
            Some("python3")
        );
        assert_eq!(
            name("/usr/bin/node", Program::Command).as_deref(),
            Some("node")
        );
        assert_eq!(name("..", Program::Script), None);
        let err = app_toml(&args(".."), Program::Script).unwrap_err();
        assert!(err.contains("-n NAME"), "{err}");
    }

    #[test]
    fn listen_addresses_are_checked_and_written_canonically() {
        let start = StartArgs {
            listen: vec![":9000".into(), "udp://[::1]:53".into()],
            ..args("x")
        };
        let text = app_toml(&start, Program::Command).unwrap();
        assert!(
            text.contains("listen = [\"tcp://0.0.0.0:9000\", \"udp://[::1]:53\"]"),
            "{text}"
        );
        let bad = StartArgs {
            listen: vec!["web:80".into()],
            ..args("x")
        };
        let err = app_toml(&bad, Program::Command).unwrap_err();
        assert!(err.starts_with("-l web:80: invalid host"), "{err}");
    }

    #[test]
    fn the_generated_app_is_a_valid_config() {
        let dir = tempfile::tempdir().unwrap();
        let script = script(dir.path(), "srv.sh");
        let start = StartArgs {
            instances: Some(InstancesArg::Count(3)),
            listen: vec!["127.0.0.1:18080".into()],
            ..args(&script)
        };
        let text = app_toml(&start, Program::Script).unwrap();
        let path = dir.path().join("balancer.toml");
        let config = balancer_config::parse(&text, &path, &load_options(None)).unwrap();
        let app = &config.apps[0];
        assert_eq!(app.name, "srv");
        assert_eq!(app.instances, 3);
        assert_eq!(app.listen[0].to_string(), "tcp://127.0.0.1:18080");
    }

    #[test]
    fn without_a_master_verbs_fail_but_kill_is_fine() {
        let home = tempfile::tempdir().unwrap();
        let run = |command| code(run_outcome(command, home.path()));
        let web = || "web".to_owned();
        assert_eq!(run(Command::Stop { target: web() }), ExitCode::from(1));
        assert_eq!(run(Command::Ls), ExitCode::from(1));
        assert_eq!(run(Command::Ping), ExitCode::from(1));
        assert_eq!(run(Command::Kill), ExitCode::SUCCESS);
        let all = StartArgs {
            no_daemon: true,
            ..args("all")
        };
        assert_eq!(run(Command::Start(all)), ExitCode::from(2));
    }

    #[test]
    fn usage_errors_send_nothing() {
        // No master listens: a request would fail with exit 1, not 2.
        let home = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let run = |command| code(run_outcome(command, home.path()));
        let missing = dir.path().join("missing.toml");
        let missing = missing.to_str().unwrap();
        assert_eq!(run(Command::Start(args(missing))), ExitCode::from(2));

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[[app]]\nname = \"x\"\ninstnaces = 2\n").unwrap();
        let bad = bad.to_str().unwrap();
        assert_eq!(run(Command::Start(args(bad))), ExitCode::from(2));
        let reload = Command::Reload {
            target: bad.to_owned(),
            env: None,
        };
        assert_eq!(run(reload), ExitCode::from(2));

        let good = dir.path().join("good.toml");
        let script = script(dir.path(), "s.sh");
        std::fs::write(
            &good,
            format!("[[app]]\nname = \"x\"\nscript = {script:?}\n"),
        )
        .unwrap();
        let good = good.to_str().unwrap();
        let shaped = StartArgs {
            instances: Some(InstancesArg::Count(2)),
            ..args(good)
        };
        assert_eq!(run(Command::Start(shaped)), ExitCode::from(2));
        let reload = Command::Reload {
            target: "web".into(),
            env: Some("production".into()),
        };
        assert_eq!(run(reload), ExitCode::from(2));
        let spaced = StartArgs {
            no_daemon: true,
            ..args("python3 -m http.server")
        };
        assert_eq!(run(Command::Start(spaced)), ExitCode::from(2));
        let unknown = StartArgs {
            no_daemon: true,
            ..args("no-such-program-anywhere")
        };
        assert_eq!(run(Command::Start(unknown)), ExitCode::from(2));
        let bad_listen = StartArgs {
            no_daemon: true,
            listen: vec!["tcp://nowhere:80".into()],
            ..args("python3")
        };
        assert_eq!(run(Command::Start(bad_listen)), ExitCode::from(2));

        let foreground = StartArgs {
            no_daemon: true,
            ..args(good)
        };
        match run_outcome(Command::Start(foreground), home.path()) {
            Outcome::Foreground(config) => assert_eq!(config.apps[0].name, "x"),
            Outcome::Exit(code) => panic!("exit {code:?}"),
        }
    }

    #[test]
    fn start_of_a_known_app_starts_it_again() {
        let home = tempfile::tempdir().unwrap();
        let master = fake_master(
            home.path(),
            vec![
                vec![r#"{"ok":true,"app":{"name":"web","config":{},"logs":[],"workers":[]}}"#],
                vec![r#"{"ok":true,"message":"started web"}"#],
            ],
        );
        let outcome = run_outcome(Command::Start(args("web")), home.path());
        assert_eq!(code(outcome), ExitCode::SUCCESS);
        let requests = master.join().unwrap();
        let start = Request::Start {
            file: None,
            env: None,
            toml: None,
            cwd: None,
            target: Some("web".into()),
        };
        let show = Request::Show {
            target: "web".into(),
        };
        assert_eq!(requests, [show, start]);
    }

    #[test]
    fn start_of_an_unknown_word_runs_it_as_a_command() {
        let home = tempfile::tempdir().unwrap();
        let master = fake_master(
            home.path(),
            vec![
                vec![r#"{"ok":false,"error":"no such app or worker: sleep","code":1}"#],
                vec![r#"{"ok":true,"pid":1,"version":"0.1.0"}"#],
                vec![r#"{"ok":true,"message":"started sleep"}"#],
            ],
        );
        let start = StartArgs {
            args: vec!["1000".into()],
            ..args("sleep")
        };
        let outcome = run_outcome(Command::Start(start), home.path());
        assert_eq!(code(outcome), ExitCode::SUCCESS);
        let requests = master.join().unwrap();
        assert_eq!(requests[1], Request::Ping {});
        match &requests[2] {
            Request::Start {
                toml: Some(text),
                cwd: Some(cwd),
                file: None,
                target: None,
                env: None,
            } => {
                assert!(text.contains("command = [\"sleep\"]"), "{text}");
                assert_eq!(cwd, &std::env::current_dir().unwrap());
            }
            other => panic!("sent {other:?}"),
        }
    }

    #[test]
    fn start_of_a_file_sends_its_absolute_path() {
        let home = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("balancer.toml");
        let script = script(dir.path(), "s.sh");
        let body = format!(
            "[[app]]\nname = \"x\"\nscript = {script:?}\nenv_production = {{ A = \"1\" }}\n"
        );
        std::fs::write(&file, body).unwrap();
        let master = fake_master(
            home.path(),
            vec![
                vec![r#"{"ok":true,"pid":1}"#],
                vec![r#"{"ok":true,"message":"started x","workers":[]}"#],
            ],
        );
        let start = StartArgs {
            env: Some("production".into()),
            ..args(file.to_str().unwrap())
        };
        let outcome = run_outcome(Command::Start(start), home.path());
        assert_eq!(code(outcome), ExitCode::SUCCESS);
        let requests = master.join().unwrap();
        let expected = Request::Start {
            file: Some(file),
            env: Some("production".into()),
            toml: None,
            cwd: None,
            target: None,
        };
        assert_eq!(requests[1], expected);
    }

    #[test]
    fn a_refusal_exits_with_its_code() {
        let home = tempfile::tempdir().unwrap();
        let master = fake_master(
            home.path(),
            vec![
                vec![r#"{"ok":false,"error":"no such app: web","code":2}"#],
                vec![r#"{"ok":false,"error":"boom"}"#],
            ],
        );
        let scale = || Command::Scale {
            app: "web".into(),
            to: "-1".into(),
        };
        assert_eq!(code(run_outcome(scale(), home.path())), ExitCode::from(2));
        assert_eq!(
            code(run_outcome(Command::Jlist, home.path())),
            ExitCode::from(1)
        );
        let requests = master.join().unwrap();
        let scale = Request::Scale {
            app: "web".into(),
            to: "-1".into(),
        };
        assert_eq!(requests, [scale, Request::List {}]);
    }

    #[test]
    fn logs_stop_at_done_and_report_a_refusal() {
        let home = tempfile::tempdir().unwrap();
        let master = fake_master(
            home.path(),
            vec![
                vec![
                    r#"{"ok":true,"log":{"app":"web","instance":0,"stream":"out","line":"hi"}}"#,
                    r#"{"ok":true,"done":true}"#,
                ],
                vec![r#"{"ok":false,"error":"no such app: nope","code":1}"#],
            ],
        );
        let logs = |target: &str| Command::Logs {
            target: Some(target.into()),
            lines: 5,
            follow: false,
            json: false,
        };
        assert_eq!(
            code(run_outcome(logs("web"), home.path())),
            ExitCode::SUCCESS
        );
        assert_eq!(
            code(run_outcome(logs("nope"), home.path())),
            ExitCode::from(1)
        );
        let requests = master.join().unwrap();
        let expected = Request::Logs {
            target: Some("web".into()),
            lines: 5,
            follow: false,
        };
        assert_eq!(requests[0], expected);
    }
}
