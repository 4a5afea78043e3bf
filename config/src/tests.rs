//! Tests of the whole pipeline through [`parse`] and [`load`]: what a user writes in
//! `balancer.toml` and what they get back, values or `line:col: message`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use super::*;

/// A directory holding a `balancer.toml` and whatever files it names.
struct Project {
    dir: TempDir,
}

impl Project {
    fn new() -> Self {
        Project {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes `rel` (executable when `exec`), creating parent directories.
    fn file(&self, rel: &str, exec: bool) -> &Self {
        let path = self.path(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "#!/bin/sh\n").unwrap();
        let mode = if exec { 0o755 } else { 0o644 };
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        self
    }

    fn parse_with(&self, toml: &str, opts: &LoadOptions) -> Result<Config, ConfigErrors> {
        parse(toml, &self.path("balancer.toml"), opts)
    }

    fn parse(&self, toml: &str) -> Result<Config, ConfigErrors> {
        self.parse_with(toml, &opts())
    }

    /// The only app of a file that must be valid.
    fn app(&self, toml: &str) -> App {
        let config = self
            .parse(toml)
            .unwrap_or_else(|e| panic!("unexpected errors:\n{e}"));
        assert_eq!(config.apps.len(), 1);
        config.apps.into_iter().next().unwrap()
    }

    /// The diagnostics of a file that must be invalid, as `line:col: message`.
    fn errors(&self, toml: &str) -> Vec<String> {
        errors_of(self.parse(toml))
    }
}

fn opts() -> LoadOptions {
    LoadOptions {
        env: None,
        default_policy: Policy::RoundRobin,
        cpus: 4,
    }
}

fn errors_of(result: Result<Config, ConfigErrors>) -> Vec<String> {
    let errors = result.expect_err("expected errors");
    errors
        .0
        .iter()
        .map(|d| match (d.line, d.col) {
            (Some(line), Some(col)) => format!("{line}:{col}: {}", d.message),
            _ => d.message.clone(),
        })
        .collect()
}

/// Asserts one error, at `at` ("line:col"), whose message contains `substance`.
fn assert_one(errors: &[String], at: &str, substance: &str) {
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    assert!(
        errors[0].starts_with(&format!("{at}: ")),
        "expected {at}, got {:?}",
        errors[0]
    );
    assert!(
        errors[0].contains(substance),
        "expected {substance:?} in {:?}",
        errors[0]
    );
}

const CMD: &str = "command = [\"python3\", \"app.py\"]\n";

#[test]
fn defaults_are_applied() {
    let p = Project::new();
    let app = p.app(&format!("[[app]]\nname = \"web\"\n{CMD}"));
    assert_eq!(app.program, "python3");
    assert_eq!(app.args, ["app.py"]);
    assert_eq!(app.cwd, p.dir.path());
    assert_eq!(
        (app.instances, app.instances_spec),
        (1, Instances::Count(1))
    );
    assert!(app.listen.is_empty());
    assert_eq!(app.policy, Policy::RoundRobin);
    assert!(app.env.is_empty());
    assert_eq!(
        app.health,
        Health {
            check: Check::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            rise: 1,
            fall: 2
        }
    );
    assert_eq!(app.kill_signal, Signal::SIGTERM);
    assert_eq!(app.kill_timeout, Duration::from_secs(5));
    assert_eq!(app.drain_timeout, Duration::from_secs(30));
    assert_eq!(app.listen_timeout, Duration::from_secs(8));
    assert_eq!(app.queue_timeout, Duration::from_secs(10));
    assert_eq!(app.connect_timeout, Duration::from_secs(3));
    assert!(app.autorestart);
    assert_eq!(app.max_restarts, 16);
    assert_eq!(app.min_uptime, Duration::from_secs(1));
    assert_eq!(app.restart_delay, Duration::ZERO);
    assert_eq!(
        app.exp_backoff_restart_delay,
        Some(Duration::from_millis(100))
    );
    assert_eq!(app.max_memory_restart, None);
    let config = p.parse(&format!("[[app]]\nname = \"web\"\n{CMD}")).unwrap();
    assert_eq!(config.balancer.sample_interval, Duration::from_secs(1));
    assert_eq!(Global::default().sample_interval, Duration::from_secs(1));
    assert_eq!(config.balancer.io, Io::Auto);
}

#[test]
fn every_key_is_read() {
    let p = Project::new();
    p.file("node/server.js", false);
    let config = p
        .parse(
            r#"
[balancer]
sample_interval = "250ms"
io = "epoll"

[[app]]
name = "web"
script = "node/server.js"
args = "--x --y"
interpreter_args = ["--max-old-space-size=512"]
instances = 2
listen = ["tcp://0.0.0.0:9000"]
policy = "rr"
env = { NODE_ENV = "development" }
health = { check = "http", path = "/health", interval = "2s", timeout = "500ms", rise = 3, fall = 4 }
kill_signal = "int"
kill_timeout = "6s"
drain_timeout = "1m"
listen_timeout = 9000
queue_timeout = "11s"
connect_timeout = "4s"
autorestart = false
max_restarts = 0
min_uptime = "2s"
restart_delay = "250ms"
exp_backoff_restart_delay = false
max_memory_restart = "300M"
"#,
        )
        .unwrap();
    assert_eq!(config.source, p.path("balancer.toml"));
    assert_eq!(config.balancer.metrics, None);
    assert_eq!(config.balancer.sample_interval, Duration::from_millis(250));
    assert_eq!(config.balancer.io, Io::Epoll);
    let app = &config.apps[0];
    let script = p.path("node/server.js").to_string_lossy().into_owned();
    assert_eq!(app.program, "node");
    assert_eq!(
        app.args,
        ["--max-old-space-size=512", &script, "--x", "--y"]
    );
    assert_eq!(app.instances, 2);
    assert_eq!(
        app.health.check,
        Check::Http {
            path: "/health".into()
        }
    );
    assert_eq!(
        (app.health.interval, app.health.timeout),
        (Duration::from_secs(2), Duration::from_millis(500))
    );
    assert_eq!((app.health.rise, app.health.fall), (3, 4));
    assert_eq!(app.kill_signal, Signal::SIGINT);
    assert_eq!(app.kill_timeout, Duration::from_secs(6));
    assert_eq!(app.drain_timeout, Duration::from_secs(60));
    assert_eq!(app.listen_timeout, Duration::from_secs(9));
    assert_eq!(app.queue_timeout, Duration::from_secs(11));
    assert_eq!(app.connect_timeout, Duration::from_secs(4));
    assert!(!app.autorestart);
    assert_eq!(app.max_restarts, 0);
    assert_eq!(app.min_uptime, Duration::from_secs(2));
    assert_eq!(app.restart_delay, Duration::from_millis(250));
    assert_eq!(app.exp_backoff_restart_delay, None);
    assert_eq!(app.max_memory_restart, Some(300 * 1024 * 1024));
}

#[test]
fn typo_key_suggests_the_right_one() {
    let p = Project::new();
    let errors = p.errors(&format!("[[app]]\nname = \"web\"\n{CMD}instnaces = 2\n"));
    assert_one(
        &errors,
        "4:1",
        "unknown key `instnaces` in app `web`; did you mean `instances`?",
    );
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}health = {{ chek = \"tcp\" }}\n"
    ));
    assert_one(
        &errors,
        "4:12",
        "unknown key `health.chek` in app `web`; did you mean `health.check`?",
    );
    let errors = p.errors(&format!("[[app]]\nname = \"web\"\n{CMD}wacth = true\n"));
    assert_one(
        &errors,
        "4:1",
        "unknown key `wacth` in app `web`; did you mean `watch`?",
    );
}

#[test]
fn unknown_top_level_table() {
    let p = Project::new();
    let errors = p.errors(&format!(
        "[balancr]\nmetrics = \"127.0.0.1:9615\"\n[[app]]\nname = \"web\"\n{CMD}"
    ));
    assert_one(
        &errors,
        "1:2",
        "unknown table `[balancr]`; did you mean `[balancer]`?",
    );
    let errors = p.errors(&format!("[[apps]]\nname = \"web\"\n{CMD}"));
    assert_one(
        &errors,
        "1:3",
        "unknown table `[[apps]]`; did you mean `[[app]]`?",
    );
    let errors = p.errors(&format!(
        "[balancer]\nmetric = \":9615\"\n[[app]]\nname = \"web\"\n{CMD}"
    ));
    assert_one(
        &errors,
        "2:1",
        "unknown key `metric` in [balancer]; did you mean `metrics`?",
    );
}

#[test]
fn wrong_types_say_what_was_expected() {
    let p = Project::new();
    let errors = p.errors(&format!("[[app]]\nname = \"web\"\n{CMD}args = 5\n"));
    assert_one(
        &errors,
        "4:8",
        "`args`: expected a string or an array of strings, found integer",
    );
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}args = [\"a\", 1]\n"
    ));
    assert_one(&errors, "4:14", "`args`: expected a string, found integer");
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}autorestart = \"yes\"\n"
    ));
    assert_one(
        &errors,
        "4:15",
        "`autorestart`: expected a boolean (true or false), found string",
    );
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}kill_timeout = true\n"
    ));
    assert_one(&errors, "4:16", "`kill_timeout`: expected a duration");
    let errors = p.errors(&format!("[[app]]\nname = 1\n{CMD}"));
    assert_one(&errors, "2:8", "`name`: expected a string, found integer");
}

#[test]
fn bad_values_point_at_the_value() {
    let p = Project::new();
    let app = |line: &str| p.errors(&format!("[[app]]\nname = \"web\"\n{CMD}{line}\n"));
    assert_one(
        &app("kill_timeout = \"5 parsecs\""),
        "4:16",
        "`kill_timeout`: invalid duration `5 parsecs`",
    );
    assert_one(
        &app("max_memory_restart = \"300X\""),
        "4:22",
        "`max_memory_restart`: invalid size `300X`",
    );
    assert_one(
        &app("kill_signal = \"SIGSTOP\""),
        "4:15",
        "`kill_signal`: SIGSTOP cannot stop a worker",
    );
    assert_one(
        &app("kill_signal = \"SIGNOPE\""),
        "4:15",
        "`kill_signal`: unknown signal `SIGNOPE`",
    );
    assert_one(
        &app("policy = \"random\""),
        "4:10",
        "`policy`: unknown policy \"random\"",
    );
    assert_one(
        &app("health = { check = \"udp\" }"),
        "4:20",
        "`health.check`: unknown check \"udp\"",
    );
    assert_one(
        &app("health = { check = \"http\", path = \"health\" }"),
        "4:35",
        "`health.path`: \"health\" must start with `/`",
    );
    assert_one(
        &app("health = { path = \"/x\" }"),
        "4:12",
        "`health.path` is only used with check = \"http\"",
    );
    assert_one(
        &app("health = { fall = 0 }"),
        "4:19",
        "`health.fall`: must be at least 1, found 0",
    );
    assert_one(
        &app("health = { interval = \"0s\" }"),
        "4:23",
        "`health.interval`: must be longer than 0",
    );
    assert_one(
        &app("max_restarts = -1"),
        "4:16",
        "`max_restarts`: must be at least 0, found -1",
    );
    assert_one(
        &app("instances = \"lots\""),
        "4:13",
        "`instances`: expected an integer or \"max\", found \"lots\"",
    );
    assert_one(
        &app("env = { A = [1] }"),
        "4:13",
        "`env.A`: expected a string, number or boolean, found array",
    );
    assert_one(
        &app("env_production = 3"),
        "4:18",
        "`env_production`: expected a table, found integer",
    );
}

#[test]
fn bad_listen_address() {
    let p = Project::new();
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}listen = [\"tcp://0.0.0.0:99999\"]\n"
    ));
    assert_one(
        &errors,
        "4:11",
        "`listen`: port 99999 is out of range; expected 1 to 65535 in `tcp://0.0.0.0:99999`",
    );
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}listen = [\"tcp://example.com:80\"]\n"
    ));
    assert_one(&errors, "4:11", "invalid host `example.com`");
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}listen = [{{ port_env = \"P\" }}]\n"
    ));
    assert_one(&errors, "4:11", "`listen`: this table needs a `url`");
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}listen = [{{ url = \":80\", port = \"P\" }}]\n"
    ));
    assert_one(
        &errors,
        "4:26",
        "unknown key `listen.port` in app `web`; did you mean `listen.port_env`?",
    );
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}listen = [{{ url = \":80\", port_env = \"1X\" }}]\n"
    ));
    assert_one(
        &errors,
        "4:37",
        "`listen.port_env`: \"1X\" is not a valid variable name",
    );
    let global = |line: &str| {
        p.errors(&format!(
            "[balancer]\n{line}\n[[app]]\nname = \"web\"\n{CMD}"
        ))
    };
    assert_one(
        &global("sample_interval = \"50ms\""),
        "2:19",
        "`sample_interval`: at least 100ms",
    );
    assert_one(
        &global("sample_interval = 0"),
        "2:19",
        "`sample_interval`: must be longer than 0",
    );
    assert_one(
        &global("io = \"kqueue\""),
        "2:6",
        "unknown io \"kqueue\"; expected \"auto\", \"epoll\" or \"io_uring\"",
    );
    for (text, io) in [
        ("auto", Io::Auto),
        ("epoll", Io::Epoll),
        ("io_uring", Io::IoUring),
    ] {
        let config = p
            .parse(&format!(
                "[balancer]\nio = \"{text}\"\n[[app]]\nname = \"web\"\n{CMD}"
            ))
            .unwrap();
        assert_eq!(config.balancer.io, io);
        assert_eq!(io.as_str(), text);
    }
}

#[test]
fn duplicate_app_name_points_at_the_second() {
    let p = Project::new();
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}\n[[app]]\nname = \"web\"\n{CMD}"
    ));
    assert_one(
        &errors,
        "6:8",
        "duplicate app name `web` (first defined at line 2)",
    );
}

#[test]
fn bad_app_names() {
    let p = Project::new();
    let named = |name: &str| p.errors(&format!("[[app]]\nname = \"{name}\"\n{CMD}"));
    assert_one(&named("my app"), "2:8", "may only contain letters, digits");
    assert_one(&named("42"), "2:8", "is all digits");
    assert_one(&named("all"), "2:8", "\"all\" is reserved");
    assert_one(&named(""), "2:8", "must not be empty");
    assert_one(
        &p.errors(&format!("[[app]]\n{CMD}")),
        "1:1",
        "missing `name`",
    );
}

#[test]
fn address_clashes_name_the_holder() {
    let p = Project::new();
    let two = |a: &str, b: &str| {
        p.errors(&format!("[[app]]\nname = \"a\"\n{CMD}listen = [\"{a}\"]\n[[app]]\nname = \"b\"\n{CMD}listen = [\"{b}\"]\n"))
    };
    assert_one(
        &two("tcp://0.0.0.0:8080", "tcp://127.0.0.1:8080"),
        "8:11",
        "clashes with tcp://0.0.0.0:8080 of app `a`, at line 4",
    );
    assert_one(
        &two(":8080", "tcp://0.0.0.0:8080"),
        "8:11",
        "tcp://0.0.0.0:8080 is already used by app `a`, at line 4",
    );
    assert_one(
        &two("[::]:53", "tcp://[::1]:53"),
        "8:11",
        "clashes with tcp://[::]:53 of app `a`, at line 4",
    );
    // Different ports, addresses or families do not clash.
    assert!(
        p.parse(&format!(
            "[[app]]\nname = \"a\"\n{CMD}listen = [\":80\", \"127.0.0.1:81\", \"[::1]:81\"]\n"
        ))
        .is_ok()
    );
    assert!(p.parse(&format!("[[app]]\nname = \"a\"\n{CMD}listen = [\"127.0.0.1:80\", \"127.0.0.2:80\", \"[::]:80\"]\n")).is_ok());
    // One app twice.
    let errors = p.errors(&format!(
        "[[app]]\nname = \"a\"\n{CMD}listen = [\":80\", \":80\"]\n"
    ));
    assert!(
        errors.iter().any(|e| e.starts_with("4:18: ")
            && e.contains("tcp://0.0.0.0:80 is listed twice (first at line 4)")),
        "{errors:#?}"
    );
    // HTTP shares TCP's ports, UDP does not.
    let errors = two("tcp://0.0.0.0:80", "http://127.0.0.1:80");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("clashes with tcp://0.0.0.0:80 of app `a`")),
        "{errors:#?}"
    );
    assert!(
        p.parse(&format!("[[app]]\nname = \"a\"\n{CMD}listen = [\"tcp://0.0.0.0:53\"]\n[[app]]\nname = \"b\"\n{CMD}listen = [\"udp://0.0.0.0:53\"]\n"))
            .is_ok()
    );
}

#[test]
fn metrics_is_served_and_claims_its_port() {
    let p = Project::new();
    let config = p
        .parse(&format!(
            "[balancer]\nmetrics = \"127.0.0.1:9615\"\n[[app]]\nname = \"a\"\n{CMD}"
        ))
        .unwrap_or_else(|e| panic!("unexpected errors:\n{e}"));
    assert_eq!(
        config.balancer.metrics,
        Some("127.0.0.1:9615".parse().unwrap())
    );
    let errors = p.errors(&format!(
        "[balancer]\nmetrics = \"127.0.0.1:9615\"\n[[app]]\nname = \"a\"\n{CMD}\
         listen = [\"tcp://127.0.0.1:9615\"]\n"
    ));
    assert!(
        errors
            .iter()
            .any(|e| e.contains("9615") && e.contains("[balancer] metrics")),
        "{errors:?}"
    );
    let errors = p.errors(&format!(
        "[balancer]\nmetrics = \"nowhere\"\n[[app]]\nname = \"a\"\n{CMD}"
    ));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("2:"), "{errors:?}");
}

#[test]
fn log_files_resolve_against_cwd_and_log_file_takes_both_streams() {
    let p = Project::new();
    let app = |line: &str| p.app(&format!("[[app]]\nname = \"web\"\n{CMD}{line}\n"));
    let app = app("out_file = \"logs/out.log\"\nerror_file = \"/tmp/e.log\"");
    assert_eq!(app.out_file, Some(p.path("logs/out.log")));
    assert_eq!(app.error_file, Some("/tmp/e.log".into()));
    let app = p.app(&format!(
        "[[app]]\nname = \"web\"\n{CMD}log_file = \"all.log\"\n"
    ));
    assert_eq!(app.out_file, Some(p.path("all.log")));
    assert_eq!(app.error_file, app.out_file);
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}out_file = \"o.log\"\nlog_file = \"all.log\"\n"
    ));
    assert_one(
        &errors,
        "5:1",
        "`log_file` sends stdout and stderr to one file",
    );
}

#[test]
fn syntax_errors_use_the_toml_span() {
    let p = Project::new();
    let errors = p.errors("[[app]]\nname = \"web\"\ninstances = \n");
    assert_one(
        &errors,
        "3:13",
        "invalid TOML: string values must be quoted",
    );
    let errors = p.errors(&format!("[[app]]\nname = \"web\"\nname = \"x\"\n{CMD}"));
    assert_one(&errors, "3:1", "invalid TOML: duplicate key");
}

#[test]
fn all_errors_are_reported_at_once_in_file_order() {
    let p = Project::new();
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}kill_timeout = \"soon\"\ninstnaces = 2\n[[app]]\nname = \"web\"\nscript = \"missing.js\"\n"
    ));
    assert_eq!(errors.len(), 4, "{errors:#?}");
    assert!(errors[0].starts_with("4:16: `kill_timeout`"), "{errors:#?}");
    assert!(
        errors[1].starts_with("5:1: unknown key `instnaces`"),
        "{errors:#?}"
    );
    assert!(
        errors[2].starts_with("7:8: duplicate app name"),
        "{errors:#?}"
    );
    assert!(
        errors[3].starts_with("8:10: `script`: `missing.js` not found"),
        "{errors:#?}"
    );
}

#[test]
fn script_and_cwd_must_exist() {
    let p = Project::new();
    let errors = p.errors("[[app]]\nname = \"web\"\nscript = \"server.js\"\n");
    assert_one(&errors, "3:10", "`script`: `server.js` not found in");
    let errors = p.errors("[[app]]\nname = \"web\"\nscript = \"/nowhere/x.js\"\n");
    assert_one(&errors, "3:10", "`script`: `/nowhere/x.js` not found");
    assert!(
        !errors[0].contains(" in "),
        "an absolute path names no folder: {errors:?}"
    );
    let errors = p.errors("[[app]]\nname = \"web\"\ncwd = \"nope\"\nscript = \"server.js\"\n");
    assert_one(&errors, "3:7", "`cwd`: `nope` not found");
    p.file("srv/server.js", false);
    let app = p.app("[[app]]\nname = \"web\"\ncwd = \"./srv\"\nscript = \"server.js\"\n");
    assert_eq!(app.cwd, p.path("srv"));
    assert_eq!(app.args, [p.path("srv/server.js").to_string_lossy()]);
    let errors = p.errors("[[app]]\nname = \"web\"\nscript = \"srv\"\ninterpreter = \"node\"\n");
    assert_one(&errors, "3:10", "`script`: `srv` is a directory");
}

#[test]
fn script_xor_command() {
    let p = Project::new();
    p.file("a.js", false);
    let errors = p.errors("[[app]]\nname = \"web\"\nscript = \"a.js\"\ncommand = \"node a.js\"\n");
    assert_one(
        &errors,
        "4:1",
        "`script` and `command` are both set; keep one",
    );
    let errors = p.errors("[[app]]\nname = \"web\"\n");
    assert_one(&errors, "1:1", "missing `script` or `command`");
    let errors = p.errors("[[app]]\nname = \"web\"\ncommand = []\n");
    assert_one(&errors, "3:11", "`command`: the program is missing");
    let errors =
        p.errors("[[app]]\nname = \"web\"\ncommand = \"node a.js\"\ninterpreter = \"node\"\n");
    assert_one(&errors, "4:1", "`interpreter` only goes with `script`");
    let errors = p.errors("[[app]]\nname = \"web\"\ncommand = \"node 'a.js\"\n");
    assert_one(&errors, "3:11", "`command`: unbalanced quote");
}

#[test]
fn interpreter_inferred_from_extension() {
    let p = Project::new();
    // The mapping itself, whatever is installed here…
    assert_eq!(defaults::interpreter_for(Path::new("a.rb")), Some("ruby"));
    // …and the apps it gives, for interpreters this machine has (they must be in PATH).
    for (script, interpreter) in [
        ("a.js", "node"),
        ("a.mjs", "node"),
        ("a.py", "python3"),
        ("a.sh", "bash"),
    ] {
        p.file(script, false);
        let app = p.app(&format!(
            "[[app]]\nname = \"web\"\nscript = \"{script}\"\nargs = [\"--port\", \"1\"]\n"
        ));
        assert_eq!(app.program, interpreter, "{script}");
        assert_eq!(
            app.args,
            [&*p.path(script).to_string_lossy(), "--port", "1"],
            "{script}"
        );
    }
    // Anything else is exec'd itself, and so must be executable.
    p.file("server", true);
    let app = p.app("[[app]]\nname = \"web\"\nscript = \"server\"\nargs = \"-v\"\n");
    assert_eq!(app.program, p.path("server").to_string_lossy());
    assert_eq!(app.args, ["-v"]);
    p.file("plain", false);
    let errors = p.errors("[[app]]\nname = \"web\"\nscript = \"plain\"\n");
    assert_one(&errors, "3:10", "`script`: `plain` is not executable");
    // "none" runs even a .js directly; an explicit interpreter wins over the extension.
    p.file("tool.js", true);
    let app = p.app("[[app]]\nname = \"web\"\nscript = \"tool.js\"\ninterpreter = \"none\"\n");
    assert_eq!(app.program, p.path("tool.js").to_string_lossy());
    let app = p.app("[[app]]\nname = \"web\"\nscript = \"tool.js\"\ninterpreter = \"python3\"\ninterpreter_args = \"-u\"\n");
    assert_eq!((app.program.as_str(), app.args.len()), ("python3", 2));
    assert_eq!(app.args[0], "-u");
    // A missing interpreter is found out here, not by a crash loop.
    let errors = p.errors(
        "[[app]]\nname = \"web\"\nscript = \"tool.js\"\ninterpreter = \"no-such-interpreter-x\"\n",
    );
    assert_one(
        &errors,
        "4:15",
        "`no-such-interpreter-x` is not a program in PATH",
    );
    let errors =
        p.errors("[[app]]\nname = \"web\"\nscript = \"server\"\ninterpreter_args = \"-x\"\n");
    assert_one(&errors, "4:1", "`interpreter_args` needs an interpreter");
}

#[test]
fn command_string_is_split_without_a_shell() {
    let p = Project::new();
    let app = p.app("[[app]]\nname = \"web\"\ncommand = \"python3 app.py --x 'a b' $HOME;\"\nargs = [\"--y\"]\n");
    assert_eq!(app.program, "python3");
    assert_eq!(app.args, ["app.py", "--x", "a b", "$HOME;", "--y"]);
    // A program given as a path is resolved against cwd and must exist.
    p.file("bin/server", true);
    let app = p.app("[[app]]\nname = \"web\"\ncommand = [\"./bin/server\", \"-p\"]\n");
    assert_eq!(app.program, p.path("bin/server").to_string_lossy());
    let errors = p.errors("[[app]]\nname = \"web\"\ncommand = [\"./bin/nope\"]\n");
    assert_one(&errors, "3:11", "`command`: `./bin/nope` not found");
}

#[test]
fn instances_max_negative_and_zero() {
    let p = Project::new();
    let count = |spec: &str| {
        let app = p.app(&format!(
            "[[app]]\nname = \"web\"\n{CMD}instances = {spec}\n"
        ));
        (app.instances, app.instances_spec)
    };
    assert_eq!(count("\"max\""), (4, Instances::Max));
    assert_eq!(count("-1"), (3, Instances::CpusMinus(1)));
    assert_eq!(count("-3"), (1, Instances::CpusMinus(3)));
    // Minus as many CPUs as there are, or more, leaves nothing: an error, not a silent 1.
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}instances = -1000\n"
    ));
    assert_one(&errors, "4:13", "leaves no worker");
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}instances = 1000000\n"
    ));
    assert_one(&errors, "4:13", "more than 1024 workers");
    assert_eq!(count("0"), (0, Instances::Count(0)));
    assert_eq!(count("7"), (7, Instances::Count(7)));
}

#[test]
fn env_name_selects_its_table() {
    let p = Project::new();
    let toml = format!(
        "[[app]]\nname = \"web\"\n{CMD}env = {{ NODE_ENV = \"development\", DEBUG = true, N = 3, F = 1.5 }}\nenv_production = {{ NODE_ENV = \"production\", EXTRA = \"1\" }}\nenv_staging = {{ NODE_ENV = \"staging\" }}\n"
    );
    let app = p.app(&toml);
    let env: Vec<_> = app.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    assert_eq!(env, ["DEBUG=true", "F=1.5", "N=3", "NODE_ENV=development"]);
    let production = LoadOptions {
        env: Some("production".into()),
        ..opts()
    };
    let app = p.parse_with(&toml, &production).unwrap().apps.remove(0);
    assert_eq!(app.env["NODE_ENV"], "production");
    assert_eq!(app.env["EXTRA"], "1");
    assert_eq!(app.env["DEBUG"], "true");
    // Tables not selected are still checked.
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}env_staging = {{ A = {{ b = 1 }} }}\n"
    ));
    assert_one(
        &errors,
        "4:21",
        "`env_staging.A`: expected a string, number or boolean, found table",
    );
}

#[test]
fn port_env_defaults_by_position() {
    let p = Project::new();
    let app = p.app(&format!(
        "[[app]]\nname = \"web\"\n{CMD}listen = [\":9000\", \"tcp://127.0.0.1:9001\", {{ url = \":9002\", port_env = \"ADMIN_PORT\" }}, \":9003\"]\n"
    ));
    let envs: Vec<_> = app
        .listen
        .iter()
        .map(|l| (l.to_string(), l.port_env.as_str()))
        .collect();
    assert_eq!(
        envs,
        [
            ("tcp://0.0.0.0:9000".to_owned(), "PORT"),
            ("tcp://127.0.0.1:9001".to_owned(), "PORT_1"),
            ("tcp://0.0.0.0:9002".to_owned(), "ADMIN_PORT"),
            ("tcp://0.0.0.0:9003".to_owned(), "PORT_3"),
        ]
    );
    let single = p.app(&format!("[[app]]\nname = \"web\"\n{CMD}listen = \":80\"\n"));
    assert_eq!(single.listen[0].port_env, "PORT");
    let errors = p.errors(&format!("[[app]]\nname = \"web\"\n{CMD}listen = [\":80\", {{ url = \":81\", port_env = \"PORT\" }}]\n"));
    assert_one(
        &errors,
        "4:44",
        "port_env `PORT` is also used by the listener at line 4",
    );
}

#[test]
fn udp_and_http_listeners_with_their_port_variables() {
    let p = Project::new();
    let app = p.app(&format!("[[app]]\nname = \"mixed\"\n{CMD}listen = [\"http://localhost:8080\", {{ url = \"udp://0.0.0.0:5353\", port_env = \"DNS_PORT\" }}, \"tcp://:9000\"]\nmax_flows = 10\nudp_idle_timeout = \"5s\"\nhttp_max_header_size = \"16K\"\n"));
    let listeners: Vec<_> = app
        .listen
        .iter()
        .map(|l| (l.proto, l.port_env.as_str()))
        .collect();
    assert_eq!(
        listeners,
        [
            (Proto::Http, "PORT"),
            (Proto::Udp, "DNS_PORT"),
            (Proto::Tcp, "PORT_2")
        ]
    );
    assert_eq!(app.udp.max_flows, 10);
    assert_eq!(app.udp.idle_timeout, Duration::from_secs(5));
    assert_eq!(app.http.max_header_size, 16 * 1024);
    assert_eq!(app.http.header_timeout, Duration::from_secs(10));
    let errors = p.errors(&format!("[[app]]\nname = \"web\"\n{CMD}max_flows = 0\n"));
    assert_one(&errors, "4:13", "`max_flows`: must be at least 1, found 0");
}

#[test]
fn policy_precedence_app_then_environment_then_rr() {
    let p = Project::new();
    let plain = format!("[[app]]\nname = \"web\"\n{CMD}");
    let chosen = |policy: &str| format!("{plain}policy = \"{policy}\"\n");
    let reuseport = LoadOptions {
        default_policy: Policy::ReusePort,
        ..opts()
    };
    // Nothing said anywhere: rr.
    assert_eq!(p.app(&plain).policy, Policy::RoundRobin);
    // The environment's default applies to apps that do not say…
    assert_eq!(
        p.parse_with(&plain, &reuseport).unwrap().apps[0].policy,
        Policy::ReusePort
    );
    // …and the app's own choice wins over it, both ways.
    assert_eq!(p.app(&chosen("reuseport")).policy, Policy::ReusePort);
    let app = p.parse_with(&chosen("rr"), &reuseport).unwrap();
    assert_eq!(app.apps[0].policy, Policy::RoundRobin);
    let errors = p.errors(&chosen("random"));
    assert!(errors.iter().any(|e| e.starts_with("4:10: ")), "{errors:?}");
}

#[test]
fn backoff_and_memory_forms() {
    let p = Project::new();
    let app = |line: &str| p.app(&format!("[[app]]\nname = \"web\"\n{CMD}{line}\n"));
    assert_eq!(
        app("exp_backoff_restart_delay = \"0ms\"").exp_backoff_restart_delay,
        None
    );
    assert_eq!(
        app("exp_backoff_restart_delay = 0").exp_backoff_restart_delay,
        None
    );
    assert_eq!(
        app("exp_backoff_restart_delay = 250").exp_backoff_restart_delay,
        Some(Duration::from_millis(250))
    );
    assert_eq!(
        app("max_memory_restart = 1048576").max_memory_restart,
        Some(1 << 20)
    );
    assert_eq!(
        app("max_memory_restart = \"1G\"").max_memory_restart,
        Some(1 << 30)
    );
    assert_eq!(
        app("kill_signal = \"SIGKILL\"").kill_signal,
        Signal::SIGKILL
    );
    assert_eq!(app("kill_signal = 15").kill_signal, Signal::SIGTERM);
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}max_memory_restart = 0\n"
    ));
    assert_one(&errors, "4:22", "must be more than 0");
}

#[test]
fn diagnostics_display_with_the_path() {
    let p = Project::new();
    let errors = p.parse("[[app]]\nname = \"web\"\n").unwrap_err();
    let path = p.path("balancer.toml");
    assert_eq!(
        errors.0[0].to_string(),
        format!(
            "{}:1:1: missing `script` or `command`: what should this app run?",
            path.display()
        )
    );
    // Relative paths are shown as given.
    let errors = parse("[[app]]\n", Path::new("balancer.toml"), &opts()).unwrap_err();
    assert!(
        errors
            .0
            .iter()
            .all(|d| d.path == Path::new("balancer.toml"))
    );
    assert_eq!(errors.0.len(), 2);
}

#[test]
fn no_apps_is_an_error() {
    let p = Project::new();
    let errors = p.errors("[balancer]\n");
    assert_eq!(errors, ["no [[app]] table: nothing to run"]);
    let errors = p.errors(&format!("[app]\nname = \"web\"\n{CMD}"));
    assert_one(
        &errors,
        "1:1",
        "write [[app]] (an array of tables), not [app]",
    );
}

#[test]
fn load_reads_the_file_or_says_why_not() {
    let p = Project::new();
    let errors = load(&p.path("missing.toml"), &opts()).unwrap_err();
    assert_eq!(errors.0.len(), 1);
    assert_eq!((errors.0[0].line, errors.0[0].col), (None, None));
    assert!(
        errors.0[0]
            .to_string()
            .contains("missing.toml: cannot read the file"),
        "{errors}"
    );
    fs::write(
        p.path("balancer.toml"),
        format!("[[app]]\nname = \"web\"\n{CMD}"),
    )
    .unwrap();
    let config = load(&p.path("balancer.toml"), &opts()).unwrap();
    assert_eq!(config.apps[0].name, "web");
}

#[test]
fn load_options_from_env_has_at_least_one_cpu() {
    let opts = LoadOptions::from_env();
    assert!(opts.cpus >= 1);
    assert_eq!(opts.env, None);
}

/// How a set of typical mistakes reads, whole, as `check` prints it: reviewed as snapshots so
/// that any change to the wording or the positions shows up in review.
#[test]
fn typical_mistakes_read_well() {
    let p = Project::new();
    p.file("app.py", false);
    let cases = [
        (
            "typo_in_a_key",
            format!("[[app]]\nname = \"web\"\n{CMD}instnaces = 2\n"),
        ),
        (
            "wrong_type",
            format!("[[app]]\nname = \"web\"\n{CMD}instances = true\n"),
        ),
        (
            "bad_listen_address",
            format!("[[app]]\nname = \"web\"\n{CMD}listen = [\"tcp://127.0.0.1:99999\"]\n"),
        ),
        (
            "duplicate_app_name",
            format!("[[app]]\nname = \"web\"\n{CMD}\n[[app]]\nname = \"web\"\n{CMD}"),
        ),
        ("toml_syntax", format!("[[app]]\nname = \"web\n{CMD}")),
        (
            "several_at_once",
            format!(
                "[[app]]\nname = \"web\"\n{CMD}instances = \"many\"\nkill_timeout = \"soon\"\n\
                 [app.health]\ncheck = \"ping\"\n"
            ),
        ),
        (
            "missing_script",
            "[[app]]\nname = \"web\"\nscript = \"nowhere.js\"\n".to_string(),
        ),
        (
            "listener_twice_in_one_app",
            format!("[[app]]\nname = \"web\"\n{CMD}listen = [\":8080\", \":8080\"]\n"),
        ),
        (
            "bad_cron_restart",
            format!("[[app]]\nname = \"web\"\n{CMD}cron_restart = \"0 25 * * *\"\n"),
        ),
    ];
    let dir = p.dir.path().display().to_string();
    for (name, toml) in cases {
        let errors = p.parse(&toml).expect_err(name);
        let text = errors
            .to_string()
            .replace(&format!("{dir}/"), "")
            .replace(&dir, "[project]");
        insta::assert_snapshot!(name, text, &toml);
    }
}

/// Values that pass TOML but would fail at run time, or harm the host, are refused here.
#[test]
fn careless_values_are_refused_before_anything_runs() {
    let p = Project::new();
    let app = |body: &str| p.errors(&format!("[[app]]\nname = \"web\"\n{CMD}{body}\n"));
    let named = |name: &str| p.errors(&format!("[[app]]\nname = \"{name}\"\n{CMD}"));
    assert_one(&named(".."), "2:8", "must not start with `.` or `-`");
    assert_one(&named("."), "2:8", "must not start with `.` or `-`");
    assert_one(&named("-rf"), "2:8", "must not start with `.` or `-`");
    assert_one(
        &named(&"a".repeat(300)),
        "2:8",
        "300 characters is too long",
    );
    assert!(
        p.parse(&format!("[[app]]\nname = \"{}\"\n{CMD}", "a".repeat(64)))
            .is_ok()
    );
    assert_one(
        &app("listen = [{ url = \":8080\", port_env = \"PATH\" }]"),
        "4:39",
        "\"PATH\" is set by balancer or the system",
    );
    assert_one(
        &app("health = { check = \"http\", path = \"/x\\r\\nX-Evil: 1\" }"),
        "4:35",
        "control character",
    );
    let huge = "x".repeat(200 * 1024);
    assert_one(
        &app(&format!("args = [\"{huge}\"]")),
        "4:8",
        "longer than the 131072 bytes",
    );
    assert_one(
        &app(&format!("env = {{ BIG = \"{huge}\" }}")),
        "4:15",
        "longer than the 131072 bytes",
    );
    let many = vec![format!("\"{}\"", "y".repeat(100 * 1024)); 12].join(", ");
    assert_one(&app(&format!("args = [{many}]")), "1:1", "add up to");
    let errors = p.errors("[[app]]\nname = \"web\"\ncommand = [\"no-such-program-x\"]\n");
    assert_one(
        &errors,
        "3:11",
        "`no-such-program-x` is not a program in PATH",
    );
}

/// `start /dev/zero`, a FIFO or a huge file must neither hang nor exhaust memory.
#[test]
fn only_a_bounded_regular_file_is_read() {
    let p = Project::new();
    let message = |path: &Path| {
        let errors = load(path, &opts()).expect_err("refused");
        errors.0[0].message.clone()
    };
    assert!(message(Path::new("/dev/zero")).contains("not a regular file"));
    let fifo = p.path("fifo.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    assert!(
        message(&fifo).contains("not a regular file"),
        "no writer, no hang"
    );
    assert!(message(p.dir.path()).contains("not a regular file"));
    let big = p.path("big.toml");
    std::fs::write(&big, vec![b'#'; 2 * 1024 * 1024]).unwrap();
    assert!(message(&big).contains("too large"));
    assert!(message(&p.path("missing.toml")).contains("cannot read the file"));
}

#[test]
fn balancing_keys_are_read_with_their_defaults() {
    let p = Project::new();
    let app = p.app(&format!("[[app]]\nname = \"web\"\n{CMD}"));
    assert_eq!((app.balance, app.max_conns), (Balance::RoundRobin, None));
    let app = p.app(&format!(
        "[[app]]\nname = \"web\"\n{CMD}balance = \"least_conn\"\nmax_conns = 3\n\
         listen = [\"tcp://127.0.0.1:7001\", {{ url = \"tcp://127.0.0.1:7002\", \
         proxy_protocol = \"v2\", accept_proxy = true }}, \
         {{ url = \"http://127.0.0.1:7003\", accept_proxy = true }}]\n"
    ));
    assert_eq!((app.balance, app.max_conns), (Balance::LeastConn, Some(3)));
    let options: Vec<_> = app
        .listen
        .iter()
        .map(|l| (l.proxy_protocol, l.accept_proxy))
        .collect();
    assert_eq!(
        options,
        [(None, false), (Some(ProxyVersion::V2), true), (None, true)]
    );
    for (word, balance) in [
        ("round_robin", Balance::RoundRobin),
        ("p2c", Balance::P2c),
        ("source", Balance::Source),
    ] {
        let app = p.app(&format!(
            "[[app]]\nname = \"web\"\n{CMD}balance = \"{word}\"\n"
        ));
        assert_eq!(app.balance, balance);
    }
}

#[test]
fn bad_balancing_keys_name_their_position() {
    let p = Project::new();
    let head = format!("[[app]]\nname = \"web\"\n{CMD}");
    assert_one(
        &p.errors(&format!("{head}balance = \"leastconns\"\n")),
        "4:11",
        "unknown balance \"leastconns\"; expected \"round_robin\", \"least_conn\"",
    );
    assert_one(
        &p.errors(&format!("{head}max_conns = 0\n")),
        "4:13",
        "`max_conns`: must be at least 1",
    );
    assert_one(
        &p.errors(&format!(
            "{head}listen = [{{ url = \"tcp://127.0.0.1:7001\", proxy_protocol = \"v3\" }}]\n"
        )),
        "4:60",
        "unknown PROXY protocol version \"v3\"",
    );
    assert_one(
        &p.errors(&format!(
            "{head}listen = [{{ url = \"tcp://127.0.0.1:7001\", proxy_protocl = \"v1\" }}]\n"
        )),
        "4:43",
        "did you mean `listen.proxy_protocol`?",
    );
    assert_one(
        &p.errors(&format!(
            "{head}listen = [{{ url = \"udp://127.0.0.1:7001\", proxy_protocol = \"v1\" }}]\n"
        )),
        "4:60",
        "not supported yet on udp:// listeners",
    );
    assert_one(
        &p.errors(&format!(
            "{head}listen = [{{ url = \"udp://127.0.0.1:7001\", accept_proxy = true }}]\n"
        )),
        "4:58",
        "`listen.accept_proxy`: not supported yet on udp:// listeners",
    );
}

#[test]
fn reuseport_refuses_what_only_the_master_can_do() {
    let p = Project::new();
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}policy = \"reuseport\"\nbalance = \"source\"\n\
         max_conns = 2\nlisten = [{{ url = \"tcp://127.0.0.1:7001\", proxy_protocol = \"v1\" }}]\n"
    ));
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(errors[0].starts_with("5:11: `balance`: not possible with policy = \"reuseport\""));
    assert!(errors[1].starts_with("6:13: `max_conns`: not possible with policy = \"reuseport\""));
    assert!(
        errors[2]
            .starts_with("7:60: `listen.proxy_protocol`: not possible with policy = \"reuseport\"")
    );
    assert!(errors[2].contains("use policy = \"rr\""));
}

#[test]
fn ready_is_health_by_default_notify_on_request_and_nothing_else() {
    let p = Project::new();
    let app = p.app(&format!("[[app]]\nname = \"web\"\n{CMD}"));
    assert_eq!(app.ready, Ready::Health);
    let app = p.app(&format!(
        "[[app]]\nname = \"web\"\n{CMD}\nready = \"notify\""
    ));
    assert_eq!(app.ready, Ready::Notify);
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}\nready = \"sd_notify\""
    ));
    assert_one(&errors, "5:9", "unknown readiness \"sd_notify\"");
}

#[test]
fn log_keys_build_the_relay_settings_and_refuse_what_would_be_ignored() {
    let p = Project::new();
    let app = p.app(&format!(
        "[[app]]\nname = \"web\"\n{CMD}time = true\nmerge_logs = true\nlog_max_size = \"1M\"\n\
         log_retain = 3\nlog_compress = true\n"
    ));
    assert_eq!(
        app.logs.time.as_deref(),
        Some(crate::defaults::LOG_DATE_FORMAT)
    );
    assert!(app.logs.merge && app.logs.relayed());
    let rotate = app.logs.rotate.unwrap();
    assert_eq!(
        (rotate.max_size, rotate.retain, rotate.compress),
        (1 << 20, 3, true)
    );
    // PM2: a format alone turns timestamps on.
    let app = p.app(&format!(
        "[[app]]\nname = \"web\"\n{CMD}log_date_format = \"%H:%M:%S\"\n"
    ));
    assert_eq!(app.logs.time.as_deref(), Some("%H:%M:%S"));
    assert!(app.logs.rotate.is_none() && !app.logs.merge);
    let plain = p.app(&format!("[[app]]\nname = \"web\"\n{CMD}"));
    assert!(!plain.logs.relayed(), "plain files by default");
    for (line, message) in [
        (
            "log_date_format = \"YYYY-MM-DD HH:mm:ss\"",
            "write \"%Y-%m-%d %H:%M:%S\"",
        ),
        ("log_date_format = \"%Q\"", "not a valid strftime format"),
        ("log_retain = 3", "nothing rotates without `log_max_size`"),
        (
            "log_compress = true",
            "nothing rotates without `log_max_size`",
        ),
        ("log_max_size = \"1K\"", "at least 64 KiB"),
        ("log_max_size = true", "a size such as"),
        ("log_max_sise = \"1M\"", "did you mean `log_max_size`?"),
    ] {
        let errors = p.errors(&format!("[[app]]\nname = \"web\"\n{CMD}{line}\n"));
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].starts_with("4:") && errors[0].contains(message),
            "{errors:?}"
        );
    }
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}time = false\nlog_date_format = \"%H\"\n"
    ));
    assert_one(&errors, "5:1", "remove one of them");
}

#[test]
fn capture_is_unset_on_or_off_and_only_a_boolean() {
    let p = Project::new();
    let app = p.app(&format!("[[app]]\nname = \"web\"\n{CMD}"));
    assert_eq!(app.capture, None, "unset: on where the kernel has it");
    for (value, want) in [("true", Some(true)), ("false", Some(false))] {
        let app = p.app(&format!(
            "[[app]]\nname = \"web\"\n{CMD}capture = {value}\n"
        ));
        assert_eq!(app.capture, want);
    }
    let errors = p.errors(&format!(
        "[[app]]\nname = \"web\"\n{CMD}capture = \"auto\"\n"
    ));
    assert_one(
        &errors,
        "4:11",
        "`capture`: expected a boolean (true or false), found string",
    );
}

#[test]
fn watch_resolves_paths_against_cwd_and_keeps_its_options() {
    let p = Project::new();
    p.file("src/app.js", false).file("config/a.json", false);
    let dir = p.dir.path().to_path_buf();
    let app = p.app(&format!("[[app]]\nname = \"web\"\n{CMD}watch = true\n"));
    let watch = app.watch.expect("watched");
    assert_eq!(watch.paths, vec![dir.clone()], "true is the cwd");
    assert!(
        watch.ignore.is_empty(),
        "the defaults are applied by the watcher"
    );
    assert_eq!(watch.delay, defaults::WATCH_DELAY);

    let app = p.app(&format!(
        "[[app]]\nname = \"web\"\n{CMD}watch = [\"src\", \"./config\", \"src\"]\n\
         ignore_watch = [\"*.log\", \"src/gen/**\"]\nwatch_delay = \"250ms\"\n"
    ));
    let watch = app.watch.expect("watched");
    assert_eq!(watch.paths, [dir.join("src"), dir.join("config")]);
    assert_eq!(watch.ignore, ["*.log", "src/gen/**"]);
    assert_eq!(watch.delay, Duration::from_millis(250));

    let app = p.app(&format!(
        "[[app]]\nname = \"web\"\n{CMD}watch = \"src\"\nignore_watch = \"*.tmp\"\nwatch_delay = 0\n"
    ));
    let watch = app.watch.expect("watched");
    assert_eq!(
        (watch.paths, watch.ignore, watch.delay),
        (
            vec![dir.join("src")],
            vec!["*.tmp".to_owned()],
            Duration::ZERO
        )
    );
    let app = p.app(&format!("[[app]]\nname = \"web\"\n{CMD}watch = false\n"));
    assert_eq!(app.watch, None);
    assert_eq!(app.cron_restart, None);
}

#[test]
fn bad_watch_keys_are_refused_where_written() {
    let p = Project::new();
    let app = |body: &str| p.errors(&format!("[[app]]\nname = \"web\"\n{CMD}{body}\n"));
    assert_one(
        &app("watch = [\"nowhere\"]"),
        "4:9",
        "`watch`: `nowhere` not found",
    );
    assert_one(&app("watch = []"), "4:9", "an empty list watches nothing");
    assert_one(
        &app("watch = 3"),
        "4:9",
        "`watch`: expected true (the app's cwd)",
    );
    assert_one(
        &app("ignore_watch = [\"*.log\"]"),
        "4:1",
        "`ignore_watch` goes with `watch`, which this app does not set",
    );
    assert_one(
        &app("watch_delay = \"1s\""),
        "4:1",
        "`watch_delay` goes with `watch`",
    );
    assert_one(
        &app("watch = true\nignore_watch = [\"[a\"]"),
        "5:16",
        "`ignore_watch`: \"[a\" is not a glob",
    );
    assert_one(
        &app("watch = true\nwatch_delay = \"soon\""),
        "5:15",
        "`watch_delay`",
    );
}

#[test]
fn cron_restart_takes_five_or_six_fields_and_refuses_the_rest() {
    let p = Project::new();
    let cron = |pattern: &str| {
        p.app(&format!(
            "[[app]]\nname = \"web\"\n{CMD}cron_restart = \"{pattern}\"\n"
        ))
        .cron_restart
        .map(|c| c.pattern)
    };
    assert_eq!(cron("0 3 * * *").as_deref(), Some("0 3 * * *"));
    assert_eq!(cron("*/5 * * * * *").as_deref(), Some("*/5 * * * * *"));
    assert_eq!(cron("@daily").as_deref(), Some("@daily"));
    let app = |body: &str| p.errors(&format!("[[app]]\nname = \"web\"\n{CMD}{body}\n"));
    assert_one(
        &app("cron_restart = \"0 25 * * *\""),
        "4:16",
        "`cron_restart`: ",
    );
    assert_one(
        &app("cron_restart = \"often\""),
        "4:16",
        "expected 5 fields",
    );
    assert_one(&app("cron_restart = \"0 0 30 2 *\""), "4:16", "never comes");
    assert_one(
        &app("cron_restart = 5"),
        "4:16",
        "`cron_restart`: expected a string",
    );
}
