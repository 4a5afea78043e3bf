//! What the bind-capture filter costs a worker: the same C server (`tests/workers/fixed_port.c`)
//! run by the real `balancer` binary twice in one master, once captured (its `bind()` of the
//! public port trapped and redirected: the seccomp filter is on every syscall it makes) and
//! once with `capture = false` (it binds its own port), each connected to **directly** (the
//! captured one on its private port), in the same run, so the machine's load affects both.
//!
//! Two shapes: a fresh connection per iteration (accept, write, read, close in the worker) and
//! a 64-byte round trip on one connection (one read and one write in the worker): the second is
//! nearly all syscalls, the filter's worst case. The ratio `captured / uncaptured` is the
//! filter's cost. Since Linux 5.11 the kernel caches "always allowed" per syscall number, so a
//! filter that only looks at `bind` should cost nothing measurable on the others.
//!
//! `cargo bench --bench capture_cost`

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

const BINARY: &str = env!("CARGO_BIN_EXE_balancer");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The master and the two workers' direct addresses.
struct Setup {
    master: Child,
    _dir: tempfile::TempDir,
    captured: SocketAddr,
    uncaptured: SocketAddr,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.master.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.master.wait();
    }
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = dir.path().join("fixed_port");
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workers/fixed_port.c");
    let status = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&server)
        .arg(source)
        .status()
        .expect("run cc");
    assert!(status.success(), "cc failed");
    let (public, own) = (free_port(), free_port());
    let toml = format!(
        "[[app]]\nname = \"captured\"\ncommand = [\"{s}\"]\nlisten = [\"tcp://127.0.0.1:{public}\"]\n\
         env = {{ APP_PORT = \"{public}\" }}\n\
         [[app]]\nname = \"uncaptured\"\ncommand = [\"{s}\"]\ncapture = false\n\
         env = {{ APP_PORT = \"{own}\" }}\n",
        s = server.display()
    );
    let file = dir.path().join("balancer.toml");
    std::fs::write(&file, toml).expect("write balancer.toml");
    let home = dir.path().join("home");
    let master = Command::new(BINARY)
        .arg("run")
        .arg(&file)
        .env("BALANCER_HOME", &home)
        .env("BALANCER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start balancer");
    let deadline = Instant::now() + Duration::from_secs(30);
    let private = loop {
        assert!(Instant::now() < deadline, "the workers never became ready");
        std::thread::sleep(Duration::from_millis(200));
        let Ok(out) = Command::new(BINARY)
            .arg("jlist")
            .env("BALANCER_HOME", &home)
            .output()
        else {
            continue;
        };
        let Ok(workers) = serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout) else {
            continue;
        };
        let ready = |app: &str| {
            workers
                .iter()
                .find(|w| w["app"] == app && w["status"] == "ready")
                .cloned()
        };
        if let (Some(c), Some(_)) = (ready("captured"), ready("uncaptured")) {
            let pid = c["pid"].as_u64().expect("pid");
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
            assert!(
                status.lines().any(|l| l == "Seccomp_filters:\t1"),
                "the captured worker runs under the filter"
            );
            break c["private"][0]
                .as_str()
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .expect("a private address");
        }
    };
    Setup {
        master,
        _dir: dir,
        captured: private,
        uncaptured: SocketAddr::from(([127, 0, 0, 1], own)),
    }
}

/// One connection: connect, read the greeting, close.
fn fresh_connection(addr: SocketAddr) {
    let stream = TcpStream::connect(addr).expect("connect");
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("greeting");
    assert!(!line.is_empty());
}

/// `reps` alternating runs of `n` round trips on each target, back to back, so both see the
/// same moments of a shared machine; prints each side's median and the median of the per-rep
/// ratios (the figure to quote: criterion's groups below run one side after the other).
fn interleaved(what: &str, reps: usize, n: usize, mut off: impl FnMut(), mut on: impl FnMut()) {
    let run = |op: &mut dyn FnMut()| {
        let started = Instant::now();
        for _ in 0..n {
            op();
        }
        started.elapsed().as_secs_f64()
    };
    let (mut offs, mut ons, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        // ABBA: every other rep starts with the captured side, so a drift in the machine's
        // load does not favour the side that always runs first.
        let (a, b) = if rep % 2 == 0 {
            let a = run(&mut off);
            (a, run(&mut on))
        } else {
            let b = run(&mut on);
            (run(&mut off), b)
        };
        offs.push(a);
        ons.push(b);
        ratios.push(b / a);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (off_m, on_m, ratio_m) = (median(&mut offs), median(&mut ons), median(&mut ratios));
    println!(
        "interleaved {what}, {reps} reps x {n}: uncaptured {:.0}/s, captured {:.0}/s; \
         median per-rep ratio captured/uncaptured throughput {:.4} (time ratio {:.4})",
        n as f64 / off_m,
        n as f64 / on_m,
        1.0 / ratio_m,
        ratio_m
    );
}

fn bench(c: &mut Criterion) {
    let s = setup();
    let connect = |addr| {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut line = String::new();
        BufReader::new(&mut stream)
            .read_line(&mut line)
            .expect("greeting");
        stream
    };
    let round_trip = |stream: &mut TcpStream| {
        let payload = [7u8; 64];
        let mut back = [0u8; 64];
        stream.write_all(&payload).expect("write");
        stream.read_exact(&mut back).expect("read");
    };
    {
        let (mut off, mut on) = (connect(s.uncaptured), connect(s.captured));
        interleaved(
            "64 B round trips",
            31,
            5000,
            || round_trip(&mut off),
            || round_trip(&mut on),
        );
    }
    interleaved(
        "fresh connections",
        31,
        300,
        || fresh_connection(s.uncaptured),
        || fresh_connection(s.captured),
    );
    let targets = [("uncaptured", s.uncaptured), ("captured", s.captured)];
    let mut group = c.benchmark_group("worker_fresh_connection");
    for (name, addr) in targets {
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| fresh_connection(addr))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("worker_round_trip_64B");
    for (name, addr) in targets {
        let mut stream = connect(addr);
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| round_trip(&mut stream))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
