//! Test support: run the real `balancer` binary in a temporary directory with real workers,
//! watch what it logs, and clean up every process it started.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// The generous bound every wait in these tests gets: long enough for a loaded 2-core machine,
/// short enough that a broken feature fails the test instead of hanging it.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The compiled binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_balancer")
}

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A test worker script under `tests/workers/`.
pub fn worker(name: &str) -> String {
    root()
        .join("tests/workers")
        .join(name)
        .display()
        .to_string()
}

/// An example under `examples/`.
pub fn example(name: &str) -> String {
    root().join("examples").join(name).display().to_string()
}

/// A one-app balancer.toml: `script` (a file under `tests/workers/`, or an absolute path) run as `instances`
/// workers behind `listen`, with `extra` lines appended to the `[[app]]` table.
pub fn app_toml(name: &str, script: &str, listen: &str, instances: u32, extra: &str) -> String {
    format!(
        "\n[[app]]\nname = \"{name}\"\nscript = \"{}\"\ninstances = {instances}\nlisten = [\"{listen}\"]\n{extra}\n",
        worker(script)
    )
}

/// `pid_server.js` (greets with its pid, then echoes) as `instances` workers on a TCP port.
pub fn pid_app(name: &str, port: u16, instances: u32, extra: &str) -> String {
    app_toml(
        name,
        "pid_server.js",
        &format!("tcp://127.0.0.1:{port}"),
        instances,
        extra,
    )
}

/// The example Node HTTP server as app `web`, `instances` workers on a TCP port, ready when
/// `GET /health` answers.
pub fn node_web(port: u16, instances: u32) -> String {
    format!(
        "\n[[app]]\nname = \"web\"\nscript = \"{}\"\ninstances = {instances}\nlisten = [\"tcp://127.0.0.1:{port}\"]\nhealth = {{ check = \"http\", path = \"/health\" }}\n",
        example("node/server.js")
    )
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// Public ports for tests are handed out from here, below the masters' private ports (20000 up
/// to the kernel's ephemeral range, see `balancer_workers::spawn`) and so below the ephemeral
/// range too: a port the kernel gave out (`bind(:0)`) can be taken a moment later as the source
/// port of another test's outgoing connection, and the master's bind of it then fails with
/// EADDRINUSE (seen in CI: a learned capture address).
const TEST_PORTS: std::ops::Range<u32> = 10_000..20_000;
/// The next candidate, shared by TCP and UDP so no two tests of this binary get the same port.
static NEXT_TEST_PORT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A test port that is free (for `free`, on loopback and the wildcard) now, and that no other
/// test of this run was given.
pub fn test_port(free: impl Fn(u16) -> bool) -> u16 {
    let span = TEST_PORTS.end - TEST_PORTS.start;
    // Different runs start at different places.
    let _ = NEXT_TEST_PORT.compare_exchange(
        0,
        (std::process::id().wrapping_mul(2_654_435_761) % span) | 1,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let step = NEXT_TEST_PORT.fetch_add(1, Ordering::Relaxed);
        let port = (TEST_PORTS.start + step % span) as u16;
        if free(port) {
            return port;
        }
    }
    panic!("no free test port in {TEST_PORTS:?}");
}

/// A TCP port for a test's public listener.
pub fn free_port() -> u16 {
    test_port(|port| {
        TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("0.0.0.0", port)).is_ok()
    })
}

/// Locks `m` even if a test panicked while holding it (a failed `wait_for` assertion), so one
/// failing test does not poison the lines every later one reads.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Lines a child process has written, shared with a reader thread.
#[derive(Clone, Default)]
pub struct Lines(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Lines {
    /// Collects `stream` line by line on a thread, echoing to the test's stderr for diagnosis.
    pub fn collect(stream: impl Read + Send + 'static, tag: &'static str) -> Self {
        let lines = Lines::default();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{tag}] {line}");
                let (all, cond) = &*sink.0;
                lock(all).push(line);
                cond.notify_all();
            }
        });
        lines
    }

    /// Every line so far.
    pub fn all(&self) -> Vec<String> {
        lock(&self.0.0).clone()
    }

    /// Waits until `count` lines match `pred`; returns them. Panics after `PATIENCE`.
    pub fn wait_for(&self, count: usize, what: &str, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        let (all, cond) = &*self.0;
        let mut guard = lock(all);
        loop {
            let hits: Vec<String> = guard.iter().filter(|l| pred(l)).cloned().collect();
            if hits.len() >= count {
                return hits;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out waiting for {count} × {what}; got {}:\n{}",
                hits.len(),
                guard.join("\n")
            );
            guard = cond
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Extracts `key=value` from a tracing line (values are unquoted numbers or words).
pub fn field(line: &str, key: &str) -> Option<String> {
    let needle = format!(" {key}=");
    let start = line.find(&needle)? + needle.len();
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"').to_string())
}

/// A running `balancer run` in its own temporary directory.
pub struct Balancer {
    child: Child,
    /// The temporary directory holding balancer.toml and the home.
    pub dir: tempfile::TempDir,
    /// Everything the master wrote to stderr.
    pub log: Lines,
    /// Every worker pid the master reported starting (killed on drop, in case).
    exited: Option<ExitStatus>,
}

impl Balancer {
    /// Writes `toml` to a fresh `balancer.toml` and starts `balancer run` on it.
    pub fn start(toml: &str) -> Balancer {
        Self::start_with(toml, &[])
    }

    /// Like [`start`](Self::start), with extra environment variables for the master.
    pub fn start_with(toml: &str, env: &[(&str, &str)]) -> Balancer {
        Self::start_under(toml, env, &[])
    }

    /// Like [`start_with`](Self::start_with), run through `wrapper` (e.g. `prlimit --nofile=…
    /// --`), which must exec the master so that its pid is the master's.
    pub fn start_under(toml: &str, env: &[(&str, &str)], wrapper: &[&str]) -> Balancer {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("balancer.toml");
        std::fs::write(&file, toml).expect("write balancer.toml");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(binary());
                cmd
            }
            None => Command::new(binary()),
        };
        cmd.arg("run")
            .arg(&file)
            .env("BALANCER_HOME", dir.path().join("home"))
            .env("BALANCER_LOG", "info,balancer_workers=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn balancer");
        let log = Lines::collect(child.stderr.take().expect("stderr"), "master");
        Balancer {
            child,
            dir,
            log,
            exited: None,
        }
    }

    /// The master's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The home directory given to the master.
    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// Runs `balancer ARGS…` against this master's home; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        cli(&self.home(), args)
    }

    /// `balancer jlist`, parsed.
    pub fn jlist(&self) -> Vec<serde_json::Value> {
        jlist(&self.home())
    }

    /// The pids of `app`'s ready workers, as `jlist` reports them.
    pub fn ready_pids(&self, app: &str) -> Vec<u64> {
        ready_pids(&self.jlist(), app)
    }

    /// Waits until "master running" was logged (the admin socket is up by then).
    pub fn wait_running(&self) {
        self.log
            .wait_for(1, "master running", |l| l.contains("master running"));
    }

    /// Waits until `n` "worker ready" events were logged for `app`; returns their pids.
    pub fn wait_ready(&self, app: &str, n: usize) -> Vec<u32> {
        self.log
            .wait_for(n, &format!("{app} worker ready"), |l| {
                l.contains("worker ready") && field(l, "app").as_deref() == Some(app)
            })
            .iter()
            .filter_map(|l| field(l, "pid")?.parse().ok())
            .collect()
    }

    /// Every worker pid the master reported starting.
    pub fn started_pids(&self) -> Vec<u32> {
        self.log
            .all()
            .iter()
            .filter(|l| l.contains("worker started"))
            .filter_map(|l| field(l, "pid")?.parse().ok())
            .collect()
    }

    /// Sends `signal` to the master.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).expect("signal the master");
    }

    /// Waits for the master to exit (panics after `PATIENCE`).
    pub fn wait_exit(&mut self) -> ExitStatus {
        if let Some(status) = self.exited {
            return status;
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(status);
                return status;
            }
            assert!(Instant::now() < deadline, "balancer did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if self.exited.is_none() && self.child.try_wait().ok().flatten().is_none() {
            let _ = kill(Pid::from_raw(self.pid() as i32), Signal::SIGKILL);
            let _ = self.child.wait();
        }
        // Workers die with the master (PDEATHSIG); make sure of it for the ones we saw.
        for pid in self.started_pids() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// Runs `balancer ARGS…` with `BALANCER_HOME=home`; returns (exit code, stdout, stderr).
pub fn cli(home: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary())
        .args(args)
        .env("BALANCER_HOME", home)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run balancer");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    eprintln!(
        "$ balancer {} → {:?}\n{stdout}{stderr}",
        args.join(" "),
        out.status.code()
    );
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

/// `balancer jlist` against `home`, parsed.
pub fn jlist(home: &Path) -> Vec<serde_json::Value> {
    let (code, stdout, stderr) = cli(home, &["jlist"]);
    assert_eq!(code, 0, "jlist failed: {stderr}");
    serde_json::from_str(&stdout).expect("jlist prints a JSON array")
}

/// The pids of `app`'s ready workers in a `jlist`.
pub fn ready_pids(workers: &[serde_json::Value], app: &str) -> Vec<u64> {
    let mut pids: Vec<u64> = workers
        .iter()
        .filter(|w| w["app"] == app && w["status"] == "ready")
        .filter_map(|w| w["pid"].as_u64())
        .collect();
    pids.sort_unstable();
    pids
}

/// Whether a process is still alive (a zombie counts as dead).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state is the first field after the parenthesised command name.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Waits until none of `pids` is alive; returns the ones still alive after `within`.
pub fn wait_dead(pids: &[u32], within: Duration) -> Vec<u32> {
    let deadline = Instant::now() + within;
    loop {
        let living: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if living.is_empty() || Instant::now() >= deadline {
            return living;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connects, reads the first line (the pid_server greeting), and closes.
pub fn greeting(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, PATIENCE)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    let mut line = String::new();
    BufReader::new(&mut stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before the greeting",
        ));
    }
    Ok(line.trim().to_string())
}

/// One HTTP/1.0 GET over a fresh connection; returns the body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, PATIENCE)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head[8..].starts_with(" 200") => {
            Ok(body.to_string())
        }
        _ => Err(std::io::Error::other(format!("bad response: {response:?}"))),
    }
}

/// CPU time (user + system, in clock ticks) a process has used.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // After the command: state(0) ppid(1) … utime(11) stime(12).
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Path helper for writing extra files into a test's directory.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path
}

/// A bounded load of fresh connections, counting successes and failures per answering pid.
pub struct Load {
    stop: Arc<AtomicBool>,
    /// Connections that got their greeting.
    pub ok: Arc<AtomicU64>,
    /// Connections that did not.
    pub failed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<HashMap<String, u64>>>,
}

impl Load {
    /// Starts `clients` threads, each opening fresh connections in a loop.
    pub fn start(addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    let mut seen = HashMap::new();
                    let started = Instant::now();
                    // Bounded in time and count whatever happens.
                    for _ in 0..20_000 {
                        if stop.load(Ordering::Relaxed)
                            || started.elapsed() > Duration::from_secs(60)
                        {
                            break;
                        }
                        match greeting(addr) {
                            Ok(pid) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                *seen.entry(pid).or_default() += 1;
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                // When and how, so a failure in CI says which step lost it.
                                eprintln!(
                                    "load: connection failed at {:?} ({}): {e}",
                                    started.elapsed(),
                                    utc_time_of_day()
                                );
                            }
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    seen
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            threads,
        }
    }

    /// Stops the load; returns (ok, failed, answers per pid).
    pub fn finish(self) -> (u64, u64, HashMap<String, u64>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut seen = HashMap::new();
        for t in self.threads {
            for (pid, n) in t.join().unwrap() {
                *seen.entry(pid).or_default() += n;
            }
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            seen,
        )
    }
}

/// The wall clock as UTC `HH:MM:SS.ffffff`, to line a test's events up with the master's log.
pub fn utc_time_of_day() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let s = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        now.subsec_micros()
    )
}

/// Whether this kernel gives this process rings the master can use: the master's own check
/// (rings, provided buffers, a multishot receive).
pub fn uring_here() -> bool {
    match balancer::proxy::uring::available() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("io_uring is refused here ({e}): the io_uring runs are skipped");
            false
        }
    }
}

/// `toml` with `[balancer] io = "<io>"` in front, and a metrics endpoint on `metrics`.
pub fn with_io(io: &str, metrics: u16, toml: &str) -> String {
    format!("[balancer]\nio = \"{io}\"\nmetrics = \"127.0.0.1:{metrics}\"\n{toml}")
}

/// Runs `test` on each I/O path that this machine has.
pub fn on_both_paths(test: impl Fn(&str)) {
    test("epoll");
    if uring_here() {
        test("io_uring");
    }
}

/// `balancer_tcp_io_uring_connections_total` summed over listeners: the
/// connections (`tcp://` and `http://`) that moved to an io_uring ring.
pub fn carried(metrics: u16) -> u64 {
    let text = http_get(loopback(metrics), "/metrics").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("balancer_tcp_io_uring_connections_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Asserts that at least `at_least` connections moved to a ring with `io = "io_uring"` (within
/// a few seconds: the count follows the response that made a connection move), and none with
/// `io = "epoll"`.
pub fn assert_moved(io: &str, metrics: u16, at_least: u64) {
    if io == "epoll" {
        assert_eq!(carried(metrics), 0, "io = epoll moves nothing");
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let moved = carried(metrics);
        if moved >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{io}: {moved} connections moved, not {at_least}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
