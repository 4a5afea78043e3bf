//! The CLI side: the PM2 verbs (`start`, `stop`, `ls`, `logs`, …). Each builds an admin
//! request, sends it to the master over its socket, and prints the reply.
//!
//! Exit codes follow [`crate::cli`]: 0 done, 1 failed (or the reply's `code`), 2 bad usage or a
//! bad config. Configs are validated here before anything is sent, so a typo in balancer.toml
//! never reaches (or starts) a master. `start` launches the master when none is running; every
//! other verb just says there is none.
//!
//! `start.rs` resolves what `start`'s argument is, `verbs.rs` holds the other verbs,
//! `import.rs` reads PM2 ecosystem files for `start` and `import` (`ecosystem.rs` maps them),
//! `reply.rs` what every verb does with the master's reply, `client.rs` is the socket client
//! and `daemon.rs` launches the background master; `deploy.rs` has `save`, `resurrect`,
//! `startup` and `unstartup`.

pub mod client;
pub mod daemon;
mod deploy;
pub mod ecosystem;
mod import;
mod reply;
mod start;
mod upgrade;
mod verbs;

use std::path::Path;

pub use reply::Outcome;

use crate::cli::{Command, EXIT_USAGE};
use crate::home;
use crate::protocol::Request;
use crate::ui::Output;
use reply::{act, failed};

/// Runs a client verb against the master of [`home::from_env`], printing for a terminal when
/// stdout is one. `run`, `check` and `daemon` are not client verbs and give a usage error.
pub fn client(command: Command) -> Outcome {
    run(command, &home::from_env(), Output::stdout())
}

fn run(command: Command, home: &Path, output: Output) -> Outcome {
    match command {
        Command::Start(args) => start::start(home, args, output),
        Command::Stop { target } => act(home, &Request::Stop { target }, output),
        Command::Restart { target } => act(home, &Request::Restart { target }, output),
        Command::Reload { target, env } => verbs::reload(home, target, env, output),
        Command::Delete { target } => act(home, &Request::Delete { target }, output),
        Command::Scale { app, to } => act(home, &Request::Scale { app, to }, output),
        Command::Ls => verbs::ls(home, output),
        Command::Jlist => verbs::jlist(home),
        Command::Show { target } => verbs::show(home, target, output),
        Command::Logs {
            target,
            lines,
            follow,
            json,
        } => verbs::logs(
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
        Command::Monit { interval } => verbs::monit(home, interval),
        Command::Ping => verbs::ping(home),
        Command::Reset { target } => act(home, &Request::Reset { target }, output),
        Command::SendSignal { signal, target } => {
            act(home, &Request::Signal { target, signal }, output)
        }
        Command::Ecosystem { file } => verbs::ecosystem(&file),
        Command::Completions { shell } => verbs::completions(shell),
        Command::Import { file } => verbs::import(&file),
        Command::Kill => verbs::kill(home, output),
        Command::Save => deploy::save(home, output),
        Command::Resurrect => deploy::resurrect(home, output),
        Command::Startup { init, install } => deploy::startup(home, &init, install),
        Command::Unstartup { init } => deploy::unstartup(&init),
        Command::Upgrade { binary, timeout } => upgrade::upgrade(home, binary, timeout),
        Command::Run { .. }
        | Command::Check { .. }
        | Command::Daemon
        | Command::TakeOver { .. }
        | Command::Shim { .. } => failed(EXIT_USAGE, "this command does not talk to a master"),
    }
}

#[cfg(test)]
mod tests {
    use super::start::{Program, app_toml, default_name};
    use super::*;
    use crate::cli::{InstancesArg, StartArgs};
    use crate::protocol::{Load, ScaleTo, Start};
    use balancer_config::LoadOptions;
    use std::io::Write;
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixListener;
    use std::process::ExitCode;
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
        let listener = UnixListener::bind(crate::home::admin_socket(home)).unwrap();
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
        let config = balancer_config::parse(&text, &path, &LoadOptions::from_env()).unwrap();
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
        assert_eq!(
            run(Command::Ls),
            ExitCode::SUCCESS,
            "no master: an empty table"
        );
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
        let start = Request::Start(Start::Stopped {
            target: "web".into(),
        });
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
        assert_eq!(requests[1], Request::Ping);
        match &requests[2] {
            Request::Start(Start::Toml {
                toml: text,
                cwd: Some(cwd),
                load,
                force: false,
            }) => {
                assert_eq!(load.env, None);
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
        let expected = Request::Start(Start::File {
            file,
            load: Load {
                env: Some("production".into()),
                policy: Some(LoadOptions::from_env().default_policy),
            },
        });
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
            to: ScaleTo::Down(1),
        };
        assert_eq!(code(run_outcome(scale(), home.path())), ExitCode::from(2));
        assert_eq!(
            code(run_outcome(Command::Jlist, home.path())),
            ExitCode::from(1)
        );
        let requests = master.join().unwrap();
        let scale = Request::Scale {
            app: "web".into(),
            to: ScaleTo::Down(1),
        };
        assert_eq!(requests, [scale, Request::List]);
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
