//! Health probes and the rise/fall hysteresis that turns their results into readiness.
//!
//! [`probe`] tests a worker's private address (the rr policy); the reuseport policy connects its
//! own, steered, probe socket and then runs the same [`http_check`] over it, so there is one
//! HTTP probe. [`Monitor`] is the probe loop's timing and hysteresis, apart from any process so
//! that tests can run it on tokio's paused clock.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use balancer_config::{Check, Proto};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a probe did not pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The worker failed it (refused, timed out, answered wrong): counts toward `fall`.
    #[error("{0}")]
    Worker(String),
    /// The master could not even make the probe (out of file descriptors or memory): says
    /// nothing about the worker, so it counts neither way.
    #[error("{0}")]
    Local(String),
}

impl From<String> for ProbeError {
    fn from(reason: String) -> Self {
        ProbeError::Worker(reason)
    }
}

/// Connects a probe; running out of descriptors or memory here is the master's problem, not
/// the worker's ([`ProbeError::Local`]).
async fn connect(addr: SocketAddr, kind: &str) -> Result<TcpStream, ProbeError> {
    TcpStream::connect(addr).await.map_err(|e| {
        let reason = format!("{kind} connect to {addr}: {e}");
        let local = matches!(
            e.raw_os_error(),
            Some(nix::libc::EMFILE | nix::libc::ENFILE | nix::libc::ENOBUFS | nix::libc::ENOMEM)
        );
        if local {
            ProbeError::Local(reason)
        } else {
            ProbeError::Worker(reason)
        }
    })
}

/// Runs one probe against a worker's first private address, served over `proto`.
///
/// A `tcp` check of a UDP port asks whether the worker has bound it: UDP has no handshake to
/// probe without knowing the app's protocol, and reading the kernel's socket table disturbs
/// nothing. `Err` carries a one-line reason for logs and `show`.
pub async fn probe(
    check: &Check,
    proto: Proto,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let attempt = async {
        match check {
            Check::None => Ok(()),
            Check::Tcp if proto == Proto::Udp => udp_bound(addr).await.map_err(ProbeError::from),
            Check::Tcp => tcp_accepted(addr).await,
            Check::Http { path } => http_get(addr, path).await,
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) if *check == Check::Tcp && proto != Proto::Udp => Err(format!(
            "tcp probe of {addr}: connected, but the worker did not accept within {timeout:?} \
             (stopped or stuck?)"
        )
        .into()),
        Err(_) => Err(format!(
            "{} probe of {addr} timed out after {timeout:?}",
            kind(check)
        )
        .into()),
    }
}

/// How often a `tcp` probe looks whether its connection was accepted.
const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// How long a `tcp` probe waits after connecting before it first looks.
const FIRST_LOOK: Duration = Duration::from_millis(2);

/// A `tcp` check: the connect must succeed **and the worker must accept it**. The kernel
/// completes a handshake into the listener's backlog by itself, so a worker that is stopped
/// (SIGSTOP) or wedged would pass a bare connect forever; the kernel's socket table says when
/// the connection got a socket of its own, i.e. was accepted ([`crate::sockdiag::accepted`]).
/// Where that table cannot be read, the connect alone decides, as before.
async fn tcp_accepted(addr: SocketAddr) -> Result<(), ProbeError> {
    let stream = connect(addr, "tcp").await?;
    let Ok(local) = stream.local_addr() else {
        return Ok(());
    };
    // Most workers accept within a few milliseconds; asking at once would nearly always
    // find the connection still in the backlog and cost a second query.
    tokio::time::sleep(FIRST_LOOK).await;
    loop {
        // An exact sock_diag lookup is a few microseconds of netlink on this thread: cheaper
        // than handing it to the blocking pool, which cost every probe two thread wake-ups.
        match crate::sockdiag::accepted(addr, local) {
            Ok(Some(false)) => tokio::time::sleep(ACCEPT_POLL).await,
            // Accepted, or already closed by the worker (which had to accept it to close it).
            Ok(Some(true) | None) => return Ok(()),
            Err(e) => {
                tracing::debug!("cannot read the kernel's socket table ({e}); a connect is enough");
                return Ok(());
            }
        }
    }
}

/// Whether some socket is bound to UDP `addr` (loopback IPv4 or a wildcard), per
/// `/proc/net/udp`.
async fn udp_bound(addr: SocketAddr) -> Result<(), String> {
    let table = tokio::fs::read_to_string("/proc/net/udp")
        .await
        .map_err(|e| format!("cannot read /proc/net/udp: {e}"))?;
    let port = format!(":{:04X}", addr.port());
    let bound = table.lines().skip(1).any(|line| {
        line.split_whitespace().nth(1).is_some_and(|local| {
            local.ends_with(&port)
                && (local.starts_with("0100007F") || local.starts_with("00000000"))
        })
    });
    if bound {
        Ok(())
    } else {
        Err(format!("nothing is bound to udp {addr}"))
    }
}

fn kind(check: &Check) -> &'static str {
    match check {
        Check::None => "no",
        Check::Tcp => "tcp",
        Check::Http { .. } => "http",
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> Result<(), ProbeError> {
    let stream = connect(addr, "http").await?;
    Ok(http_check(stream, addr, path).await?)
}

/// The HTTP check over an already connected `stream` to `addr`: `GET path` must answer 2xx.
///
/// It takes a connection rather than an address because the reuseport policy must connect
/// from a source port its steering program knows; the caller bounds it with a timeout.
pub async fn http_check(stream: TcpStream, addr: SocketAddr, path: &str) -> Result<(), String> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http handshake with {addr}: {e}"))?;
    let conn = tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "balancer-health")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad health path {path:?}: {e}"))?;
    let result = match sender.send_request(request).await {
        Ok(response) if response.status().is_success() => Ok(()),
        Ok(response) => Err(format!(
            "GET {path} on {addr} answered {}",
            response.status()
        )),
        Err(e) => Err(format!("GET {path} on {addr}: {e}")),
    };
    conn.abort();
    result
}

/// Probe period while a worker is not ready (yet, or any more), so readiness is noticed quickly.
pub const STARTING_PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// The probe loop of one incarnation: when to probe, and what the results add up to.
///
/// The first probe goes at once; then every `interval` while the worker is up, and every
/// [`STARTING_PROBE_INTERVAL`] (or `interval`, if shorter) while it is down, so a starting
/// worker joins the pool soon after it listens without probing ready ones that often.
#[derive(Debug)]
pub struct Monitor {
    hysteresis: Hysteresis,
    interval: Duration,
    first: bool,
    last_failure: String,
    results: ProbeCounters,
}

/// `balancer_health_checks_total{result}` of one worker slot: handles resolved once per
/// incarnation, not per probe.
#[derive(Debug)]
struct ProbeCounters {
    pass: metrics::Counter,
    fail: metrics::Counter,
    skipped: metrics::Counter,
}

impl ProbeCounters {
    fn noop() -> Self {
        ProbeCounters {
            pass: metrics::Counter::noop(),
            fail: metrics::Counter::noop(),
            skipped: metrics::Counter::noop(),
        }
    }
}

impl Monitor {
    /// A monitor for a worker that has not been probed yet (down).
    pub fn new(rise: u32, fall: u32, interval: Duration) -> Self {
        Monitor {
            hysteresis: Hysteresis::new(rise, fall),
            interval,
            first: true,
            last_failure: String::from("no health probe answered yet"),
            results: ProbeCounters::noop(),
        }
    }

    /// The same monitor, counting its probe results in `balancer_health_checks_total` with
    /// labels `app`, `worker` and `instance`, and `result`: `pass`, `fail`, or `skipped` (the
    /// probe could not be made here, so it says nothing about the worker).
    pub fn counting(mut self, app: &str, worker: u32, instance: u32) -> Self {
        let counter = |result: &'static str| {
            metrics::counter!(
                "balancer_health_checks_total",
                "app" => app.to_owned(),
                "worker" => worker.to_string(),
                "instance" => instance.to_string(),
                "result" => result,
            )
        };
        self.results = ProbeCounters {
            pass: counter("pass"),
            fail: counter("fail"),
            skipped: counter("skipped"),
        };
        self
    }

    /// Why the last failing probe failed, for `listen_timeout` and `unhealthy` reasons.
    pub fn last_failure(&self) -> &str {
        &self.last_failure
    }

    /// Probes on schedule until the readiness flips, and returns the flip.
    ///
    /// Only cancel it for good (the worker exited or is being stopped): a cancelled wait starts
    /// its period over.
    pub async fn next_transition<F, Fut>(&mut self, mut probe: F) -> Transition
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), ProbeError>>,
    {
        loop {
            let period = if std::mem::take(&mut self.first) {
                Duration::ZERO
            } else if self.hysteresis.is_up() {
                self.interval
            } else {
                self.interval.min(STARTING_PROBE_INTERVAL)
            };
            tokio::time::sleep(period).await;
            let ok = match probe().await {
                Ok(()) => {
                    self.results.pass.increment(1);
                    true
                }
                Err(ProbeError::Worker(e)) => {
                    self.results.fail.increment(1);
                    self.last_failure = e;
                    false
                }
                Err(ProbeError::Local(e)) => {
                    self.results.skipped.increment(1);
                    // Out of descriptors or memory here: no verdict on the worker.
                    tracing::warn!("health probe not made: {e}");
                    continue;
                }
            };
            if let Some(transition) = self.hysteresis.record(ok) {
                return transition;
            }
        }
    }
}

/// A change of readiness decided by [`Hysteresis`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// `rise` consecutive successes: the worker is ready.
    Up,
    /// `fall` consecutive failures: the worker is no longer ready.
    Down,
}

/// Consecutive-result counting, so one lucky or unlucky probe flips nothing.
#[derive(Debug, Clone)]
pub struct Hysteresis {
    rise: u32,
    fall: u32,
    streak: u32,
    up: bool,
}

impl Hysteresis {
    /// Starts down: a new worker must pass `rise` probes before it is ready.
    pub fn new(rise: u32, fall: u32) -> Self {
        Hysteresis {
            rise: rise.max(1),
            fall: fall.max(1),
            streak: 0,
            up: false,
        }
    }

    /// Whether the worker is currently considered up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Records one probe result; returns the transition it causes, if any.
    pub fn record(&mut self, ok: bool) -> Option<Transition> {
        if ok == self.up {
            // A result agreeing with the current state breaks any streak toward the other one.
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak < needed {
            return None;
        }
        self.streak = 0;
        self.up = ok;
        Some(if ok { Transition::Up } else { Transition::Down })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall_need_consecutive_results() {
        let mut h = Hysteresis::new(2, 3);
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(false), None, "a failure resets the rise streak");
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(Transition::Up));
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None, "a success resets the fall streak");
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), Some(Transition::Down));
        assert!(!h.is_up());
    }

    /// A monitor fed by a scripted probe, on the paused clock.
    fn scripted(results: Vec<bool>) -> impl FnMut() -> std::future::Ready<Result<(), ProbeError>> {
        let mut results = results.into_iter();
        move || {
            std::future::ready(match results.next() {
                Some(true) => Ok(()),
                Some(false) | None => Err(ProbeError::Worker("scripted failure".into())),
            })
        }
    }

    /// Running out of descriptors in the master says nothing about the worker: such a probe
    /// counts neither way, and a ready worker stays ready.
    #[tokio::test(start_paused = true)]
    async fn a_probe_the_master_could_not_make_counts_for_nothing() {
        let mut m = Monitor::new(1, 2, Duration::from_secs(1));
        let mut results = vec![
            Ok(()),
            Err(ProbeError::Local("EMFILE".into())),
            Err(ProbeError::Local("EMFILE".into())),
            Err(ProbeError::Local("EMFILE".into())),
            Err(ProbeError::Worker("refused".into())),
            Err(ProbeError::Worker("refused".into())),
        ]
        .into_iter();
        let mut probe = move || std::future::ready(results.next().unwrap_or(Ok(())));
        assert_eq!(m.next_transition(&mut probe).await, Transition::Up);
        let start = tokio::time::Instant::now();
        assert_eq!(m.next_transition(&mut probe).await, Transition::Down);
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(5),
            "3 skipped + 2 failed probes"
        );
        assert_eq!(m.last_failure(), "refused");
    }

    #[tokio::test(start_paused = true)]
    async fn ready_after_rise_probes_at_the_starting_interval() {
        let start = tokio::time::Instant::now();
        let mut m = Monitor::new(3, 2, Duration::from_secs(5));
        // One failure breaks the streak: probes at 0, 100 (fail), 200, 300, 400 ms.
        let probe = scripted(vec![true, false, true, true, true]);
        assert_eq!(m.next_transition(probe).await, Transition::Up);
        assert_eq!(start.elapsed(), STARTING_PROBE_INTERVAL * 4);
        assert_eq!(m.last_failure(), "scripted failure");
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_the_pool_after_fall_failures_at_the_interval_and_back_after_rise() {
        let interval = Duration::from_secs(2);
        let mut m = Monitor::new(1, 3, interval);
        assert_eq!(
            m.next_transition(scripted(vec![true])).await,
            Transition::Up
        );
        let up = tokio::time::Instant::now();
        // Up: probed every `interval`; a pass in between restarts the fall streak.
        let probe = scripted(vec![false, true, false, false, false]);
        assert_eq!(m.next_transition(probe).await, Transition::Down);
        assert_eq!(up.elapsed(), interval * 5);
        let down = tokio::time::Instant::now();
        assert_eq!(
            m.next_transition(scripted(vec![true])).await,
            Transition::Up
        );
        assert_eq!(
            down.elapsed(),
            STARTING_PROBE_INTERVAL,
            "a down worker is probed at the starting interval"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_interval_is_kept_while_starting() {
        let start = tokio::time::Instant::now();
        let mut m = Monitor::new(2, 1, Duration::from_millis(30));
        assert_eq!(
            m.next_transition(scripted(vec![true, true])).await,
            Transition::Up
        );
        assert_eq!(start.elapsed(), Duration::from_millis(30));
    }

    #[tokio::test]
    async fn tcp_probe_sees_listener_and_refusal() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepting = tokio::spawn(async move {
            loop {
                let _ = listener.accept().await;
            }
        });
        assert!(
            probe(&Check::Tcp, Proto::Tcp, addr, Duration::from_secs(2))
                .await
                .is_ok()
        );
        accepting.abort();
        let _ = accepting.await;
        assert!(
            probe(&Check::Tcp, Proto::Tcp, addr, Duration::from_secs(2))
                .await
                .is_err()
        );
    }

    /// A worker that is stopped or wedged still completes handshakes (the kernel does): the
    /// probe waits for the accept, and fails without one.
    #[tokio::test]
    async fn a_listener_that_never_accepts_fails_the_tcp_probe() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let err = probe(&Check::Tcp, Proto::Tcp, addr, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("did not accept"), "{err}");
        drop(listener);
    }

    #[tokio::test]
    async fn a_udp_port_is_up_once_bound() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let udp = |addr| probe(&Check::Tcp, Proto::Udp, addr, Duration::from_secs(2));
        assert!(udp(addr).await.is_ok());
        drop(socket);
        let err = udp(addr).await.unwrap_err();
        assert!(err.to_string().contains("nothing is bound"), "{err}");
    }

    #[tokio::test]
    async fn http_probe_wants_2xx() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0; 1024];
                let n = s.read(&mut buf).await.unwrap();
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let reply = if req.starts_with("GET /health ") {
                    "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                } else {
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
                };
                s.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        let check = |p: &str| Check::Http { path: p.into() };
        assert!(
            probe(&check("/health"), Proto::Http, addr, Duration::from_secs(2))
                .await
                .is_ok()
        );
        let err = probe(&check("/nope"), Proto::Http, addr, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("404"), "{err}");
    }
}
