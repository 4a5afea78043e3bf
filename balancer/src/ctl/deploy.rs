//! The deploy verbs: `save` and `resurrect` (the master writes and reads `dump.json`; these
//! only ask it), and `startup` / `unstartup`, which write or remove a systemd unit that runs
//! the master at boot as `balancer run` with no file, a `Type=notify` service that starts what
//! the last `save` wrote.

use std::path::{Path, PathBuf};

use super::reply::{Outcome, act, failed, ok, print, running_master};
use super::start::start_on_master;
use crate::cli::{EXIT_FAILED, EXIT_USAGE};
use crate::protocol::Request;
use crate::ui::Output;

/// The unit's file name, for the system manager and the user one alike.
const UNIT_NAME: &str = "balancer.service";

/// The first line of every unit `startup` writes: `unstartup` removes only files that have it.
const MARKER: &str = "# Written by `balancer startup systemd`";

/// `save`: the master writes its dump.
pub(super) fn save(home: &Path, output: Output) -> Outcome {
    act(home, &Request::Save, output)
}

/// `resurrect` (and `start` with no argument): the master starts what the dump holds,
/// launched first when none is running.
pub(super) fn resurrect(home: &Path, output: Output) -> Outcome {
    let dump = crate::home::dump_file(home);
    if !dump.exists() {
        return failed(
            EXIT_FAILED,
            format!(
                "no dump at {} (write one with `balancer save`)",
                dump.display()
            ),
        );
    }
    match running_master(home) {
        Ok(master) => start_on_master(home, master, &Request::Resurrect, output),
        Err(outcome) => outcome,
    }
}

/// Where the unit goes and how it is enabled, for root or for the current user.
struct Target {
    path: PathBuf,
    wanted_by: &'static str,
    enable: String,
}

fn target() -> Result<Target, String> {
    if nix::unistd::geteuid().is_root() {
        return Ok(Target {
            path: PathBuf::from("/etc/systemd/system").join(UNIT_NAME),
            wanted_by: "multi-user.target",
            enable: "systemctl daemon-reload && systemctl enable --now balancer".into(),
        });
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|d| !d.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })
        .ok_or("neither XDG_CONFIG_HOME nor HOME is set: cannot place a user unit")?;
    let user = std::env::var("USER").unwrap_or_else(|_| "$USER".into());
    Ok(Target {
        path: config.join("systemd/user").join(UNIT_NAME),
        wanted_by: "default.target",
        enable: format!(
            "systemctl --user daemon-reload && systemctl --user enable --now balancer \
             (and `loginctl enable-linger {user}` so it starts at boot, before you log in)"
        ),
    })
}

/// A value as systemd reads it inside double quotes: `%` is a specifier, `\` and `"` escape.
fn quoted(value: &str) -> String {
    let escaped = value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('%', "%%");
    format!("\"{escaped}\"")
}

/// The unit text. `WatchdogSec` makes the master ping every half of it from its runtime, so a
/// wedged master is restarted; `KillMode=mixed` sends the stop signal to the master alone,
/// which drains and stops its workers itself (systemd's default would SIGTERM every worker at
/// once, with no drain), and SIGKILLs what is left after `TimeoutStopSec`. `NotifyAccess=all`
/// lets the master that `balancer upgrade` (or SIGUSR2) starts speak for the service: the old
/// master sends `MAINPID=` for it, and from then on its `READY=1` and watchdog pings count.
pub fn unit(exe: &Path, home: &Path, wanted_by: &str) -> String {
    let exe = quoted(&exe.display().to_string());
    let home = quoted(&format!("BALANCER_HOME={}", home.display()));
    format!(
        "{MARKER} (balancer {version}); remove it with `balancer unstartup`.
[Unit]
Description=balancer: process manager and load balancer
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=all
Environment={home}
ExecStart={exe} run
ExecReload=/bin/kill -HUP $MAINPID
KillMode=mixed
TimeoutStartSec=120
TimeoutStopSec=120
WatchdogSec=30
Restart=on-failure
RestartSec=1
LimitNOFILE=1048576

[Install]
WantedBy={wanted_by}
",
        version = env!("CARGO_PKG_VERSION"),
    )
}

fn only_systemd(init: &str) -> Result<(), Outcome> {
    if init == "systemd" {
        Ok(())
    } else {
        Err(failed(
            EXIT_USAGE,
            format!("startup for {init:?} is not supported yet: only `systemd` is"),
        ))
    }
}

/// `startup [systemd] [--install]`.
pub(super) fn startup(home: &Path, init: &str, install: bool) -> Outcome {
    if let Err(outcome) = only_systemd(init) {
        return outcome;
    }
    let target = match target() {
        Ok(target) => target,
        Err(e) => return failed(EXIT_FAILED, e),
    };
    let exe = match std::env::current_exe().and_then(std::fs::canonicalize) {
        Ok(exe) => exe,
        Err(e) => return failed(EXIT_FAILED, format!("cannot find this binary's path: {e}")),
    };
    let home = std::path::absolute(home).unwrap_or_else(|_| home.to_path_buf());
    let text = unit(&exe, &home, target.wanted_by);
    if !install {
        print(text.trim_end());
        eprintln!(
            "balancer: to install it as {}: balancer startup systemd --install",
            target.path.display()
        );
        return ok();
    }
    let written = target
        .path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&target.path, &text));
    if let Err(e) = written {
        return failed(
            EXIT_FAILED,
            format!("cannot write {}: {e}", target.path.display()),
        );
    }
    print(format!("wrote {}", target.path.display()));
    eprintln!(
        "balancer: enable it with: {}\nbalancer: it starts what `balancer save` wrote last",
        target.enable
    );
    ok()
}

/// `unstartup [systemd]`: removes the unit `startup --install` wrote (and only such a file).
pub(super) fn unstartup(init: &str) -> Outcome {
    if let Err(outcome) = only_systemd(init) {
        return outcome;
    }
    let target = match target() {
        Ok(target) => target,
        Err(e) => return failed(EXIT_FAILED, e),
    };
    let path = &target.path;
    match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            print(format!("no unit at {}: nothing to remove", path.display()));
            ok()
        }
        Err(e) => failed(EXIT_FAILED, format!("cannot read {}: {e}", path.display())),
        Ok(text) if !text.starts_with(MARKER) => failed(
            EXIT_FAILED,
            format!(
                "{} was not written by `balancer startup`; leaving it alone",
                path.display()
            ),
        ),
        Ok(_) => match std::fs::remove_file(path) {
            Ok(()) => {
                let manager = if target.wanted_by == "default.target" {
                    "systemctl --user"
                } else {
                    "systemctl"
                };
                print(format!("removed {}", path.display()));
                eprintln!(
                    "balancer: if it was enabled, also run: {manager} disable --now balancer; {manager} daemon-reload"
                );
                ok()
            }
            Err(e) => failed(
                EXIT_FAILED,
                format!("cannot remove {}: {e}", path.display()),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_quotes_paths_and_escapes_specifiers() {
        let text = unit(
            Path::new("/opt/my tools/balancer"),
            Path::new("/srv/100%"),
            "multi-user.target",
        );
        assert!(text.starts_with(MARKER));
        assert!(
            text.contains("ExecStart=\"/opt/my tools/balancer\" run\n"),
            "{text}"
        );
        assert!(
            text.contains("Environment=\"BALANCER_HOME=/srv/100%%\"\n"),
            "{text}"
        );
        assert!(text.contains("Type=notify\n"));
        assert!(text.contains("WantedBy=multi-user.target\n"));
    }
}
