//! Capture: unmodified servers that bind a hard-coded port (here `APP_PORT`, picked free by the
//! test; never `$PORT`) are clustered by trapping their `bind()` (seccomp user notification).

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::*;

/// A master whose environment (so every worker's) holds `APP_PORT`, running one idle app so
/// that apps can be started into it from the command line.
fn master_with_app_port(port: u16, extra_env: &[(&str, &str)]) -> Balancer {
    let toml = "\n[[app]]\nname = \"idle\"\ncommand = [\"sleep\", \"1000\"]\n";
    let port = port.to_string();
    let mut env = vec![("APP_PORT", port.as_str())];
    env.extend_from_slice(extra_env);
    let b = Balancer::start_with(toml, &env);
    b.wait_running();
    b
}

/// Greets `addr` until `n` distinct pids have answered (each connection may still be queued
/// while the app's first workers are being replaced); returns them.
fn distinct_greeters(addr: SocketAddr, n: usize) -> HashSet<String> {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = HashSet::new();
    while seen.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} workers answered on {addr}: {seen:?}",
            seen.len()
        );
        match greeting(addr) {
            Ok(pid) => {
                seen.insert(pid);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    seen
}

/// Waits until `app`'s `n` ready workers all show the captured listener in `jlist`.
fn wait_captured(b: &Balancer, app: &str, n: usize) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let workers = b.jlist();
        let captured = workers
            .iter()
            .filter(|w| w["app"] == app && w["status"] == "ready")
            .filter(|w| {
                w["listeners"].as_array().is_some_and(|l| {
                    l.iter()
                        .any(|l| l.as_str().is_some_and(|s| s.ends_with("(captured)")))
                })
            })
            .count();
        if captured == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{app} never had {n} captured workers: {workers:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `balancer start fixed_port.js -i 4` (no `-l`) under `policy`: the port is learned from the
/// first worker's bind, 4 distinct pids answer on it, and a reload under load fails nothing.
fn clustered_with_no_listen(policy: &str) {
    let port = free_port();
    let b = master_with_app_port(port, &[]);
    let script = worker("fixed_port.js");
    let (code, out, err) = b.cli(&["start", &script, "-n", "web", "-i", "4", "--policy", policy]);
    assert_eq!(code, 0, "{out}{err}");
    wait_captured(&b, "web", 4);
    let pids = distinct_greeters(loopback(port), 4);
    let ready: HashSet<String> = b.ready_pids("web").iter().map(u64::to_string).collect();
    assert_eq!(pids, ready, "the answering pids are the 4 ready workers");
    let (_, ls, _) = b.cli(&["ls"]);
    assert!(
        ls.contains("(captured)"),
        "ls says the port was captured: {ls}"
    );
    let (_, show, _) = b.cli(&["show", "web"]);
    assert!(show.contains("captured"), "show says so too: {show}");

    let load = Load::start(loopback(port), 4);
    std::thread::sleep(Duration::from_millis(300));
    let (code, out, err) = b.cli(&["reload", "web"]);
    assert_eq!(code, 0, "{out}{err}");
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed, seen) = load.finish();
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed across the reload: {seen:?}",
        ok + failed
    );
    assert!(ok > 0);
    let after: HashSet<String> = b.ready_pids("web").iter().map(u64::to_string).collect();
    assert_eq!(after.len(), 4);
    assert!(after.is_disjoint(&pids), "the reload replaced every worker");
    assert!(
        seen.keys().any(|pid| after.contains(pid)),
        "the new workers answer on the captured port: {seen:?}"
    );
}

#[test]
fn a_node_server_that_hard_codes_its_port_is_clustered_with_no_listen_and_reloads_losing_nothing() {
    clustered_with_no_listen("rr");
}

#[test]
fn the_same_under_reuseport() {
    clustered_with_no_listen("reuseport");
}

/// Builds `tests/workers/fixed_port.c` into `dir`: static when the static C library is there
/// (the case LD_PRELOAD could never reach), else dynamic; says which.
fn build_c_server(dir: &Path) -> String {
    let out = dir.join("fixed_port");
    let source = root().join("tests/workers/fixed_port.c");
    let static_libc = [
        "/usr/lib/x86_64-linux-gnu/libc.a",
        "/usr/lib/aarch64-linux-gnu/libc.a",
        "/usr/lib/libc.a",
    ]
    .iter()
    .any(|p| Path::new(p).exists());
    let mut cc = std::process::Command::new("cc");
    if static_libc {
        cc.arg("-static");
    }
    let status = cc
        .arg("-O1")
        .arg("-o")
        .arg(&out)
        .arg(&source)
        .status()
        .expect("run cc");
    assert!(status.success(), "cc failed");
    eprintln!(
        "built {} ({})",
        out.display(),
        if static_libc { "static" } else { "dynamic" }
    );
    out.display().to_string()
}

#[test]
fn python_http_server_a_static_c_server_and_a_python_udp_server_behind_listen_and_an_unrelated_bind_untouched()
 {
    let (http, c, udp, node, admin) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let dir = tempfile::tempdir().unwrap();
    let c_server = build_c_server(dir.path());
    let toml = format!(
        "\n[[app]]\nname = \"py\"\ncommand = [\"python3\", \"{py}\"]\ninstances = 3\n\
         listen = [\"tcp://127.0.0.1:{http}\"]\nenv = {{ APP_PORT = \"{http}\" }}\n\
         \n[[app]]\nname = \"c\"\ncommand = [\"{c_server}\"]\ninstances = 2\n\
         listen = [\"tcp://127.0.0.1:{c}\"]\nenv = {{ APP_PORT = \"{c}\" }}\n\
         \n[[app]]\nname = \"dns\"\ncommand = [\"python3\", \"{udp_py}\"]\ninstances = 2\n\
         listen = [\"udp://127.0.0.1:{udp}\"]\nenv = {{ APP_PORT = \"{udp}\" }}\n\
         \n[[app]]\nname = \"node\"\nscript = \"{node_js}\"\ninstances = 1\n\
         listen = [\"tcp://127.0.0.1:{node}\"]\nenv = {{ APP_PORT = \"{node}\", ADMIN_PORT = \"{admin}\" }}\n",
        py = worker("fixed_http.py"),
        udp_py = worker("fixed_udp.py"),
        node_js = worker("fixed_port.js"),
    );
    let b = Balancer::start(&toml);
    b.wait_ready("py", 3);
    b.wait_ready("c", 2);
    b.wait_ready("dns", 2);
    b.wait_ready("node", 1);
    b.wait_running();

    // Python's http.server: 3 distinct pids behind the configured listener.
    let mut seen = HashSet::new();
    for _ in 0..30 {
        seen.insert(
            http_get(loopback(http), "/")
                .expect("GET")
                .trim()
                .to_string(),
        );
    }
    let ready: HashSet<String> = b.ready_pids("py").iter().map(u64::to_string).collect();
    assert_eq!(
        seen, ready,
        "every http.server worker answers, and only they do"
    );
    assert_eq!(seen.len(), 3);

    // The C server: 2 distinct pids.
    let c_pids = distinct_greeters(loopback(c), 2);
    let ready: HashSet<String> = b.ready_pids("c").iter().map(u64::to_string).collect();
    assert_eq!(c_pids, ready);

    // UDP: client sockets are spread over both workers, and each one sticks to its worker.
    let mut by_client: HashMap<u16, HashSet<String>> = HashMap::new();
    for _ in 0..8 {
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(PATIENCE)).unwrap();
        let me = client.local_addr().unwrap().port();
        for i in 0..4 {
            client
                .send_to(format!("hello {i}").as_bytes(), loopback(udp))
                .unwrap();
            let mut buf = [0u8; 256];
            let n = client.recv(&mut buf).expect("a UDP answer");
            let answer = String::from_utf8_lossy(&buf[..n]).to_string();
            let (pid, payload) = answer.split_once(' ').unwrap();
            assert_eq!(payload, format!("hello {i}"));
            by_client.entry(me).or_default().insert(pid.to_string());
        }
    }
    assert!(
        by_client.values().all(|pids| pids.len() == 1),
        "each flow sticks: {by_client:?}"
    );
    let spread: HashSet<&String> = by_client.values().flatten().collect();
    assert_eq!(
        spread.len(),
        2,
        "flows are spread over both workers: {by_client:?}"
    );

    // An unrelated bind (the admin port) goes ahead untouched: the worker itself holds it.
    let node_pid = b.ready_pids("node")[0].to_string();
    assert_eq!(
        greeting(loopback(node)).unwrap(),
        node_pid,
        "the public port is captured"
    );
    assert_eq!(
        greeting(loopback(admin)).unwrap(),
        format!("admin {node_pid}"),
        "the admin port is the worker's own"
    );
    let private: Vec<String> = b
        .jlist()
        .iter()
        .filter(|w| w["app"] == "node")
        .flat_map(|w| w["private"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    assert!(
        !private.iter().any(|a| a.ends_with(&format!(":{admin}"))),
        "{private:?}"
    );
}

#[test]
fn capture_forced_off_for_an_app_that_needs_it_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "balancer.toml",
        &format!(
            "[[app]]\nname = \"web\"\nscript = \"{}\"\ninstances = 2\ncapture = false\n",
            worker("fixed_port.js")
        ),
    );
    let home = dir.path().join("home");
    let (code, out, err) = cli(&home, &["run", &file.display().to_string()]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains(
            "app `web`: 2 instances and no `listen` need capture, which is off (capture = false)"
        ) && err.contains("give the app `listen` and make it read $PORT"),
        "{err}"
    );
    assert!(!home.join("logs/web-0-out.log").exists(), "nothing started");
}
