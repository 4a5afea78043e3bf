//! The reuseport policy's sockets: one `SO_REUSEPORT` socket per worker on the public address,
//! handed to the worker as fd 3 (systemd's `LISTEN_FDS`), with the master keeping a duplicate.
//!
//! The kernel spreads connections over a group's sockets; closing one resets every connection
//! still queued on it. We never let that happen (see `workers/LIFECYCLE.md`, "reuseport"):
//!
//! - a classic BPF program ([`bpf`]) on each TCP group steers new connections only to the
//!   sockets of ready workers, and health probes to the one socket they test;
//! - a worker leaving (drained, crashed, scaled down) is first steered away from; the master
//!   then accepts whatever is still queued on its socket (through its duplicate) and proxies it
//!   to the public address, where the program sends it to a live worker; only when that queue
//!   has stayed empty does the master close its duplicate;
//! - the group's socket order is mirrored here (the kernel numbers sockets in `listen` order
//!   and moves the last into a closed one's slot), and the program installed around a close is
//!   valid for the order before and after it.
//!
//! UDP groups are plain: datagrams have no accept queue to lose (what a closing socket still
//! holds in its receive buffer is lost, as UDP allows), and the kernel's 4-tuple hash keeps a
//! client's datagrams on one worker while the group does not change.

pub mod bpf;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use balancer_config::{Check, Listener, Proto};
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

/// A leaving worker's socket is closed once its queue has been empty this long.
const QUIET_BEFORE_CLOSE: Duration = Duration::from_millis(300);
/// With no other worker to take them, connections queued on a closing socket wait this long
/// for one (a crashed worker's replacement) before the socket closes anyway.
const LAST_MEMBER_GRACE: Duration = Duration::from_secs(5);
/// How often the accept queue is looked at.
const QUEUE_POLL: Duration = Duration::from_millis(10);

/// What the master does with a connection rescued from a leaving worker's socket: carry it to
/// the given target (the public address), where the steering program hands it to a live
/// worker. Copying bytes is the data plane's work, so the control plane only accepts and
/// hands the connection over.
pub type Rescue = Arc<dyn Fn(TcpStream, SocketAddr) + Send + Sync>;

/// Identifies a socket within its group.
pub type MemberKey = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Its worker is starting: only probes go there, unless no worker is ready at all.
    Starting,
    /// Its worker is ready: new connections go there.
    Ready,
    /// Its worker is leaving: nothing new goes there.
    Leaving,
}

#[derive(Debug)]
struct Member {
    key: MemberKey,
    socket: Arc<OwnedFd>,
    state: State,
}

#[derive(Debug, Default)]
struct Members {
    /// In the kernel's order.
    list: Vec<Member>,
    /// Probes in flight: (source port, member).
    probes: Vec<(u16, MemberKey)>,
    next_key: MemberKey,
}

impl Members {
    fn index(&self, key: MemberKey) -> Option<usize> {
        self.list.iter().position(|m| m.key == key)
    }

    /// The program for the current order, leaving out `also_avoid` (a slot about to change).
    fn program(&self, also_avoid: Option<usize>) -> Option<Vec<nix::libc::sock_filter>> {
        let usable = |i: &usize| Some(*i) != also_avoid;
        let pick = |state: State| -> Vec<u32> {
            (0..self.list.len())
                .filter(usable)
                .filter(|&i| self.list[i].state == state)
                .map(|i| i as u32)
                .collect()
        };
        let mut targets = pick(State::Ready);
        if targets.is_empty() {
            // Nobody is ready: queue on starting workers rather than refuse or reset.
            targets = pick(State::Starting);
        }
        if targets.is_empty() {
            return None;
        }
        let probes: Vec<(u16, u32)> = self
            .probes
            .iter()
            .filter_map(|&(port, key)| Some((port, self.index(key)? as u32)))
            .filter(|(_, i)| usable(&(*i as usize)))
            .collect();
        Some(bpf::program(&probes, &targets))
    }
}

/// A master accepting what is left on a leaving worker's socket.
#[derive(Debug)]
pub struct Takeover {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// The `SO_REUSEPORT` group of one public listener of one app.
pub struct Group {
    listener: Listener,
    members: Mutex<Members>,
    rescue: Rescue,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("listener", &self.listener)
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

impl Group {
    /// A group for `listener` (no socket yet); what is rescued from leaving sockets goes to
    /// `rescue`.
    pub fn new(listener: Listener, rescue: Rescue) -> Arc<Group> {
        Arc::new(Group {
            listener,
            members: Mutex::new(Members::default()),
            rescue,
        })
    }

    /// The public listener this group serves.
    pub fn listener(&self) -> &Listener {
        &self.listener
    }

    /// Checks that the address can be shared (nothing without `SO_REUSEPORT` holds it). The
    /// probe socket is bound but never listens, so it never joins the group's traffic.
    pub fn check_bind(listener: &Listener) -> io::Result<()> {
        bound_socket(listener).map(drop)
    }

    fn members(&self) -> std::sync::MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new socket in the group for a starting worker: returns its key and a duplicate to
    /// hand to the worker.
    pub fn join(&self) -> io::Result<(MemberKey, OwnedFd)> {
        let socket = Arc::new(new_socket(&self.listener)?);
        let for_worker = socket.try_clone()?;
        let mut members = self.members();
        let key = members.next_key;
        members.next_key += 1;
        members.list.push(Member {
            key,
            socket,
            state: State::Starting,
        });
        self.steer(&members, None);
        Ok((key, for_worker))
    }

    /// The worker passed (or failed) its health check.
    pub fn set_ready(&self, key: MemberKey, ready: bool) {
        let mut members = self.members();
        if let Some(i) = members.index(key)
            && members.list[i].state != State::Leaving
        {
            members.list[i].state = if ready { State::Ready } else { State::Starting };
            self.steer(&members, None);
        }
    }

    /// Steers new connections away from the member and starts accepting what is queued on
    /// its socket, proxying it to the public address (so to a live worker). The returned
    /// takeover goes to [`leave`](Self::leave) once the worker has exited.
    pub fn start_leaving(self: &Arc<Self>, key: MemberKey) -> Option<Takeover> {
        let socket = {
            let mut members = self.members();
            let i = members.index(key)?;
            members.list[i].state = State::Leaving;
            self.steer(&members, None);
            Arc::clone(&members.list[i].socket)
        };
        let stop = CancellationToken::new();
        let task = (self.listener.proto != Proto::Udp).then(|| {
            let group = Arc::clone(self);
            tokio::spawn(group.take_over(key, socket, stop.clone()))
        });
        Some(Takeover { stop, task })
    }

    /// The member's worker has exited: once its queue has stayed empty for a moment (or, with
    /// no other worker to send it to, after [`LAST_MEMBER_GRACE`]), close the master's
    /// duplicate, with a program valid before and after the kernel reorders the group.
    pub async fn leave(self: &Arc<Self>, key: MemberKey, takeover: Option<Takeover>) {
        let takeover = takeover.or_else(|| self.start_leaving(key));
        let socket = {
            let members = self.members();
            members
                .index(key)
                .map(|i| Arc::clone(&members.list[i].socket))
        };
        if let Some(socket) = socket
            && self.listener.proto != Proto::Udp
        {
            let (mut quiet, mut waited) = (Duration::ZERO, Duration::ZERO);
            while quiet < QUIET_BEFORE_CLOSE {
                if waited >= LAST_MEMBER_GRACE && !self.has_other_target(key) {
                    tracing::warn!(listener = %self.listener, "no worker left to take the connections queued on a closing socket");
                    break;
                }
                tokio::time::sleep(QUEUE_POLL).await;
                waited += QUEUE_POLL;
                match bpf::accept_queue_len(socket.as_fd()) {
                    Ok(0) => quiet += QUEUE_POLL,
                    Ok(_) => quiet = Duration::ZERO,
                    Err(_) => break,
                }
            }
        }
        // The takeover holds a duplicate too: the socket leaves the group when the last one
        // closes, so end it first.
        if let Some(Takeover { stop, task }) = takeover {
            stop.cancel();
            if let Some(task) = task {
                let _ = task.await;
            }
        }
        // One critical section from the program that avoids both moving slots, through the
        // close, to the program for the new order: no join can slip in between.
        let mut members = self.members();
        if let Some(i) = members.index(key) {
            let last = members.list.len() - 1;
            if i != last {
                self.steer(&members, Some(last));
            }
            members.list.swap_remove(i);
            self.steer(&members, None);
        }
    }

    /// Whether a member other than `key` can take connections.
    fn has_other_target(&self, key: MemberKey) -> bool {
        self.members()
            .list
            .iter()
            .any(|m| m.key != key && m.state != State::Leaving)
    }

    fn steer(&self, members: &Members, also_avoid: Option<usize>) {
        if self.listener.proto == Proto::Udp {
            return;
        }
        let (Some(program), Some(anchor)) = (members.program(also_avoid), members.list.first())
        else {
            return;
        };
        if let Err(e) = bpf::attach(anchor.socket.as_fd(), &program) {
            tracing::error!(listener = %self.listener, "cannot steer the reuseport group: {e}");
        }
    }

    /// Accepts connections left on a leaving worker's socket and proxies each to the public
    /// address, where the steering program sends it to a live worker.
    async fn take_over(
        self: Arc<Self>,
        key: MemberKey,
        socket: Arc<OwnedFd>,
        stop: CancellationToken,
    ) {
        let listener = match socket
            .try_clone()
            .map(std::net::TcpListener::from)
            .and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            }) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(listener = %self.listener, "cannot take over a leaving socket: {e}");
                return;
            }
        };
        let target = loopback_of(self.listener.addr);
        loop {
            if !self.has_other_target(key) {
                // Proxying to the public address now would come straight back here.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(QUEUE_POLL) => continue,
                }
            }
            let (client, _) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(_) => continue,
                },
            };
            tracing::debug!(listener = %self.listener, "rescuing a connection queued on a leaving worker");
            (self.rescue)(client, target);
        }
    }

    /// Health probe of one member: a connection steered to its socket must be accepted (the
    /// socket's accept queue empties) and, for `check = "http"`, answered with a 2xx status.
    pub async fn probe(
        &self,
        key: MemberKey,
        check: &Check,
        timeout: Duration,
    ) -> Result<(), String> {
        if self.listener.proto == Proto::Udp || *check == Check::None {
            return Ok(());
        }
        let target = loopback_of(self.listener.addr);
        let probe = if target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .and_then(|s| {
            s.bind(SocketAddr::new(target.ip(), 0))?;
            Ok(s)
        })
        .map_err(|e| format!("cannot create a probe socket: {e}"))?;
        let port = probe.local_addr().map_err(|e| e.to_string())?.port();
        let socket = {
            let mut members = self.members();
            let i = members
                .index(key)
                .ok_or_else(|| "the worker's socket is gone".to_string())?;
            members.probes.push((port, key));
            self.steer(&members, None);
            Arc::clone(&members.list[i].socket)
        };
        let result = tokio::time::timeout(timeout, async {
            let mut stream = probe
                .connect(target)
                .await
                .map_err(|e| format!("probe connect to {target}: {e}"))?;
            match check {
                Check::Http { path } => http_probe(&mut stream, path, target).await,
                _ => loop {
                    match bpf::accept_queue_len(socket.as_fd()) {
                        Ok(0) => break Ok(()),
                        Ok(_) => tokio::time::sleep(QUEUE_POLL).await,
                        Err(e) => break Err(format!("cannot read the accept queue: {e}")),
                    }
                },
            }
        })
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the worker did not accept a probe within {timeout:?}: under the reuseport policy it \
                 must accept on its inherited socket, fd 3 (LISTEN_FDS; see the worker contract)"
            ))
        });
        let mut members = self.members();
        members.probes.retain(|&(p, _)| p != port);
        self.steer(&members, None);
        result
    }
}

async fn http_probe(stream: &mut TcpStream, path: &str, target: SocketAddr) -> Result<(), String> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: balancer-health\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let mut head = [0u8; 16];
    let n = stream
        .read(&mut head)
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let status = std::str::from_utf8(&head[..n]).unwrap_or("");
    if status.starts_with("HTTP/1.") && status.get(9..10) == Some("2") {
        Ok(())
    } else {
        Err(format!("GET {path} answered {:?}", status.trim()))
    }
}

/// Where the master itself reaches a listener: its address, or loopback for a wildcard.
pub fn loopback_of(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// A bound `SO_REUSEPORT` socket on the listener's address.
fn bound_socket(listener: &Listener) -> io::Result<Socket> {
    let addr = listener.addr;
    let kind = match listener.proto {
        Proto::Udp => Type::DGRAM,
        Proto::Tcp | Proto::Http => Type::STREAM,
    };
    let socket = Socket::new(Domain::for_address(addr), kind, None)?;
    socket.set_reuse_port(true)?;
    if kind == Type::STREAM {
        socket.set_reuse_address(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// A bound (and, for TCP, listening) `SO_REUSEPORT` socket: a new member of the group.
fn new_socket(listener: &Listener) -> io::Result<OwnedFd> {
    let socket = bound_socket(listener)?;
    if listener.proto != Proto::Udp {
        socket.listen(crate::LISTEN_BACKLOG)?;
    }
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn tcp_listener(port: u16) -> Listener {
        Listener {
            proto: Proto::Tcp,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            port_env: "PORT".into(),
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// A "worker": accepts on its socket and greets with its name.
    fn serve(fd: OwnedFd, name: &'static str) -> std::thread::JoinHandle<()> {
        let listener = std::net::TcpListener::from(fd);
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                let _ = s.write_all(name.as_bytes());
            }
        })
    }

    /// The test's stand-in for the master's data plane: copy a rescued connection on.
    fn rescue() -> Rescue {
        Arc::new(|mut client, target| {
            tokio::spawn(async move {
                if let Ok(mut upstream) = TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        })
    }

    fn hello(port: u16) -> String {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_ready_members_get_connections_and_probes_reach_their_target() {
        let port = free_port();
        let group = Group::new(tcp_listener(port), rescue());
        let (a, fd_a) = group.join().unwrap();
        let (b, fd_b) = group.join().unwrap();
        let _wa = serve(fd_a, "a");
        let _wb = serve(fd_b, "b");
        group.set_ready(a, true);
        let answers: Vec<String> = (0..20).map(|_| hello(port)).collect();
        assert!(
            answers.iter().all(|x| x == "a"),
            "b is not ready: {answers:?}"
        );
        // b is probed even though no traffic goes there.
        group
            .probe(b, &Check::Tcp, Duration::from_secs(5))
            .await
            .unwrap();
        group.set_ready(b, true);
        let answers: Vec<String> = (0..40).map(|_| hello(port)).collect();
        assert!(answers.contains(&"a".into()) && answers.contains(&"b".into()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_member_whose_worker_never_accepts_fails_its_probe() {
        let port = free_port();
        let group = Group::new(tcp_listener(port), rescue());
        let (a, _fd_nobody_accepts) = group.join().unwrap();
        let err = group
            .probe(a, &Check::Tcp, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(err.contains("fd 3"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_queued_on_a_leaving_socket_are_rescued() {
        let port = free_port();
        let group = Group::new(tcp_listener(port), rescue());
        let (a, fd_a) = group.join().unwrap();
        let (b, fd_b) = group.join().unwrap();
        group.set_ready(a, true);
        // a's worker never accepts: connections queue on its socket.
        let queued: Vec<_> = (0..5)
            .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let _wb = serve(fd_b, "b");
        group.set_ready(b, true);
        drop(fd_a); // the worker died without accepting
        group.leave(a, None).await;
        for mut s in queued {
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            assert_eq!(out, "b", "rescued and served by b");
        }
        assert_eq!(hello(port), "b");
    }
}
