//! Bad balancer.toml files: `file:line:col: message`, exit code 2, nothing started.

use std::process::Command;

use crate::support::*;

/// Runs `balancer <verb> FILE` on `toml`; returns (exit code, stderr, whether a home appeared).
fn run_bad(verb: &str, toml: &str) -> (Option<i32>, String, bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "balancer.toml", toml);
    let home = dir.path().join("home");
    let out = Command::new(binary())
        .arg(verb)
        .arg(&file)
        .env("BALANCER_HOME", &home)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
        home.exists(),
        file.display().to_string(),
    )
}

fn assert_bad(toml: &str, line_col: &str, words: &[&str]) {
    for verb in ["run", "check"] {
        let (code, stderr, home_created, file) = run_bad(verb, toml);
        assert_eq!(code, Some(2), "{verb}: {stderr}");
        assert!(
            stderr.contains(&format!("{file}:{line_col}: ")),
            "{verb}: expected {file}:{line_col} in:\n{stderr}"
        );
        for w in words {
            assert!(stderr.contains(w), "{verb}: expected {w:?} in:\n{stderr}");
        }
        assert!(!home_created, "{verb} started something");
    }
}

fn app(body: &str) -> String {
    format!(
        "[[app]]\nname = \"web\"\nscript = \"{}\"\n{body}",
        example("node/server.js")
    )
}

#[test]
fn a_typo_in_a_key_is_named_with_a_suggestion() {
    assert_bad(&app("instnces = 2\n"), "4:1", &["instnces", "instances"]);
}

#[test]
fn a_wrong_type_is_named() {
    assert_bad(&app("instances = true\n"), "4:13", &["instances"]);
}

#[test]
fn a_bad_address_is_named() {
    assert_bad(
        &app("listen = [\"tcp://127.0.0.1:99999\"]\n"),
        "4:11",
        &["99999"],
    );
}

#[test]
fn a_duplicate_app_name_is_named() {
    let toml = format!("{}\n{}", app(""), app(""));
    assert_bad(&toml, "6:8", &["web"]);
}

#[test]
fn check_accepts_the_example() {
    let out = Command::new(binary())
        .args(["check", &example("balancer.toml")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (2 apps, 4 workers)"));
}

#[test]
fn errors_show_the_source_line_with_a_caret_under_the_mistake() {
    let (code, stderr, _, file) = run_bad("check", &app("instnces = 2\nkill_timeout = \"soon\"\n"));
    assert_eq!(code, Some(2), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines[0].starts_with(&format!("{file}:4:1: unknown key `instnces`")),
        "{stderr}"
    );
    assert_eq!(lines[2], "4 | instnces = 2", "{stderr}");
    assert_eq!(lines[3], "  | ^^^^^^^^", "{stderr}");
    assert!(
        stderr.contains(&format!("\n{file}:5:16: `kill_timeout`")),
        "the next error starts its own greppable line: {stderr}"
    );
    assert!(
        stderr.contains("5 | kill_timeout = \"soon\"\n  |                ^^^^^^"),
        "{stderr}"
    );
}
