//! Both I/O paths of `tcp://` (`[balancer] io`): each test runs once with `io = "epoll"` and
//! once with `io = "io_uring"`, where a connection that goes back and forth leaves epoll for a
//! ring (on a kernel that refuses io_uring, that run is skipped and says so). Where io_uring is
//! refused, made so here by a seccomp wrapper, `auto` copies with epoll and `io_uring` is an
//! error that starts nothing.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Instant;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::*;

/// Builds `tests/workers/no_uring.c` (a wrapper under which io_uring_setup fails) into `dir`.
fn build_no_uring(dir: &std::path::Path) -> String {
    let out = dir.join("no_uring");
    let status = std::process::Command::new("cc")
        .arg("-O1")
        .arg("-o")
        .arg(&out)
        .arg(root().join("tests/workers/no_uring.c"))
        .status()
        .expect("run cc");
    assert!(status.success(), "cc failed");
    out.display().to_string()
}

#[test]
fn where_io_uring_is_refused_auto_copies_with_epoll_and_io_uring_starts_nothing() {
    let tools = tempfile::tempdir().unwrap();
    let wrapper = build_no_uring(tools.path());
    // `auto`: the master says why, once, and serves on epoll.
    let (port, metrics) = (free_port(), free_port());
    let b = Balancer::start_under(
        &with_io("auto", metrics, &pid_app("chat", port, 1, "")),
        &[],
        &[&wrapper],
    );
    b.wait_ready("chat", 1);
    b.log.wait_for(1, "the fallback to epoll", |l| {
        l.contains("io_uring is not available")
    });
    let mut conn = Conn::open(loopback(port)).warm();
    conn.echo("on epoll\n").unwrap();
    assert_eq!(carried(metrics), 0, "nothing was handed to a ring");
    drop(b);
    // `io_uring`: a clear error, and nothing starts.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "balancer.toml",
        &with_io("io_uring", free_port(), &pid_app("refused", port, 1, "")),
    );
    let out = std::process::Command::new(&wrapper)
        .args([binary(), "run", path.to_str().unwrap()])
        .env("BALANCER_HOME", dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("io = \"io_uring\": the kernel refuses io_uring"),
        "{err}"
    );
    assert!(
        std::net::TcpStream::connect(loopback(port)).is_err(),
        "nothing listens"
    );
}

/// A connection to the app that has read its greeting (the worker's pid).
struct Conn {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
    pid: String,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut pid = String::new();
        reader.read_line(&mut pid).unwrap();
        Conn {
            reader,
            stream,
            pid: pid.trim().to_owned(),
        }
    }

    /// One line out and its echo back; `Err` when the connection has ended.
    fn echo(&mut self, line: &str) -> std::io::Result<()> {
        self.stream.write_all(line.as_bytes())?;
        let mut back = String::new();
        if self.reader.read_line(&mut back)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        assert_eq!(back, line, "echoed byte for byte");
        Ok(())
    }

    /// Gone back and forth enough to be carried (the greeting, then exchanges).
    fn warm(mut self) -> Conn {
        for i in 0..4 {
            self.echo(&format!("warm {i}\n")).unwrap();
        }
        self
    }
}

#[test]
fn interactive_connections_echo_byte_exact_and_pass_half_close_on_both_paths() {
    on_both_paths(|io| {
        let (port, metrics) = (free_port(), free_port());
        let b = Balancer::start(&with_io(io, metrics, &pid_app("chat", port, 2, "")));
        b.wait_ready("chat", 2);
        let addr = loopback(port);
        let mut conns: Vec<Conn> = (0..8).map(|_| Conn::open(addr)).collect();
        // Lines of many sizes, past a ring buffer's 16 KiB too.
        for round in 0..40usize {
            for (i, c) in conns.iter_mut().enumerate() {
                let len = 1 + (round * 997 + i * 131) % 40_000;
                let line: String = (0..len)
                    .map(|k| char::from(b'a' + ((k + round + i) % 26) as u8))
                    .collect();
                c.echo(&format!("{line}\n")).unwrap();
            }
        }
        let want = if io == "io_uring" { 8 } else { 0 };
        assert_eq!(
            carried(metrics),
            want,
            "connections carried by a ring on {io}"
        );
        // Half-close: the client's FIN reaches the worker, which then ends its side; what
        // was in flight arrives first.
        for c in &mut conns {
            c.stream.write_all(b"after\n").unwrap();
            c.stream.shutdown(Shutdown::Write).unwrap();
            let mut rest = String::new();
            c.reader.read_to_string(&mut rest).unwrap();
            assert_eq!(rest, "after\n", "on {io}");
        }
    });
}

#[test]
fn kill_9_of_a_worker_ends_only_its_carried_connections_on_both_paths() {
    on_both_paths(|io| {
        let port = free_port();
        let b = Balancer::start(&with_io(io, free_port(), &pid_app("chat", port, 2, "")));
        let pids = b.wait_ready("chat", 2);
        let addr = loopback(port);
        let mut conns: Vec<Conn> = (0..6).map(|_| Conn::open(addr).warm()).collect();
        let victim = pids[0];
        kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
        wait_dead(&[victim], PATIENCE);
        for c in &mut conns {
            let result = c.echo("after the kill\n");
            if c.pid == victim.to_string() {
                assert!(
                    result.is_err(),
                    "a connection to the killed worker ended, on {io}"
                );
            } else {
                result
                    .unwrap_or_else(|e| panic!("the other worker's connection lives on {io}: {e}"));
            }
        }
        // The replacement serves new connections, which are carried as before.
        b.wait_ready("chat", 2);
        let mut fresh = Conn::open(addr).warm();
        fresh.echo("fresh\n").unwrap();
    });
}

#[test]
fn a_reload_lets_carried_connections_finish_with_no_error_on_both_paths() {
    on_both_paths(|io| {
        let port = free_port();
        let b = Balancer::start(&with_io(
            io,
            free_port(),
            &pid_app("chat", port, 2, "drain_timeout = \"20s\""),
        ));
        let old = b.wait_ready("chat", 2);
        let addr = loopback(port);
        let mut conns: Vec<Conn> = (0..4).map(|_| Conn::open(addr).warm()).collect();
        // `reload` answers once the old workers are gone, which waits on these connections.
        let home = b.home();
        let reload = std::thread::spawn(move || cli(&home, &["reload", "chat"]));
        let drains = b
            .log
            .all()
            .iter()
            .filter(|l| l.contains("draining worker"))
            .count();
        b.log
            .wait_for(drains + 2, "both old workers draining", |l| {
                l.contains("draining worker")
            });
        // The old workers drain: their carried connections go on, with no error.
        for round in 0..50 {
            for c in &mut conns {
                c.echo(&format!("during the drain {round}\n"))
                    .unwrap_or_else(|e| panic!("on {io}, round {round}: {e}"));
            }
        }
        assert!(
            !reload.is_finished(),
            "the drain waits for the connections, on {io}"
        );
        for c in &conns {
            assert!(old.iter().any(|p| p.to_string() == c.pid));
        }
        // New connections reach the new workers; the old ones exit once their clients leave.
        let fresh = Conn::open(addr);
        assert!(!old.iter().any(|p| p.to_string() == fresh.pid), "on {io}");
        drop(conns);
        let (code, out, err) = reload.join().unwrap();
        assert_eq!(code, 0, "on {io}: {out}{err}");
        let left = wait_dead(&old, PATIENCE);
        assert!(
            left.is_empty(),
            "old workers still running on {io}: {left:?}"
        );
    });
}

#[test]
fn sigterm_with_carried_connections_open_stops_the_master_on_both_paths() {
    on_both_paths(|io| {
        let port = free_port();
        let mut b = Balancer::start(&with_io(
            io,
            free_port(),
            &pid_app("chat", port, 1, "drain_timeout = \"1s\""),
        ));
        b.wait_ready("chat", 1);
        let mut conn = Conn::open(loopback(port)).warm();
        let started = Instant::now();
        b.signal(Signal::SIGTERM);
        let status = b.wait_exit();
        assert!(status.success(), "on {io}: {status:?}");
        assert!(started.elapsed() < PATIENCE, "on {io}");
        // The client's connection ended with the master.
        let mut byte = [0u8; 1];
        let end = conn.reader.read(&mut byte);
        assert!(matches!(end, Ok(0) | Err(_)), "on {io}: {end:?}");
    });
}
