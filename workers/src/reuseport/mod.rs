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
//!   has stayed empty does the master take the socket out of the group (shutdown, then close);
//! - the group's socket order is mirrored here (the kernel numbers sockets in `listen` order
//!   and moves the last into a closed one's slot), and the program installed around a close is
//!   valid for the order before and after it.
//!
//! UDP groups are plain: datagrams have no accept queue to lose (what a closing socket still
//! holds in its receive buffer is lost, as UDP allows), and the kernel's 4-tuple hash keeps a
//! client's datagrams on one worker while the group does not change.

//! This module is the [`Group`] API the slots call; who is in a group and which program that
//! calls for is [`membership`]; rescuing queued connections is [`takeover`].

pub mod bpf;
mod membership;
mod takeover;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use balancer_config::{Check, Listener, Proto};
use socket2::{Domain, Socket, Type};
use tokio::net::TcpSocket;

pub use membership::MemberKey;
use membership::{Members, State};
pub use takeover::{Rescue, Takeover};

/// A leaving worker's socket is closed once its queue has been empty this long.
const QUIET_BEFORE_CLOSE: Duration = Duration::from_millis(300);
/// With no other worker to take them, connections queued on a closing socket wait this long
/// for one (a crashed worker's replacement) before the socket closes anyway.
const LAST_MEMBER_GRACE: Duration = Duration::from_secs(5);
/// How often the accept queue is looked at.
const QUEUE_POLL: Duration = Duration::from_millis(10);

/// The `SO_REUSEPORT` group of one public listener of one app.
pub struct Group {
    listener: Listener,
    members: Mutex<Members>,
    rescue: Rescue,
    /// The steering program belongs to another master now (this one handed over, or is
    /// handing over, in `upgrade`): nothing is attached from here.
    frozen: AtomicBool,
    /// This master has adopted the previous one's sockets and has not taken over yet: its own
    /// workers get probes only, the previous master's keep the traffic.
    held: AtomicBool,
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
            frozen: AtomicBool::new(false),
            held: AtomicBool::new(false),
        })
    }

    /// `upgrade`, old side: from now on another master steers this group; this one attaches
    /// no program (its own view of the group's order would be wrong once the other's sockets
    /// join). Its leaving members are still rescued and closed as usual.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// The upgrade failed: this master steers again.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
        let members = self.members();
        self.steer(&members, None);
    }

    /// `upgrade`, old side: duplicates of the group's sockets in the kernel's order, for the
    /// new master to [`adopt`](Self::adopt). UDP groups have no steering and hand nothing
    /// over (their flows move to the new workers' sockets once).
    pub fn sockets(&self) -> io::Result<Vec<OwnedFd>> {
        if self.listener.proto == Proto::Udp {
            return Ok(Vec::new());
        }
        self.members()
            .list
            .iter()
            .map(|m| m.socket.try_clone())
            .collect()
    }

    /// `upgrade`, new side, before any worker joins: the previous master's sockets, in the
    /// kernel's order, as ready members at the front of the group; the group is held until
    /// [`release`](Self::release).
    pub fn adopt(&self, sockets: Vec<OwnedFd>) {
        let mut members = self.members();
        for socket in sockets {
            members.adopt(Arc::new(socket));
        }
        self.held.store(true, Ordering::SeqCst);
    }

    /// `upgrade`, new side, on taking over: this master's ready workers get the traffic and
    /// the adopted sockets are steered away from (what is queued there is rescued by
    /// [`drop_adopted`](Self::drop_adopted), or by the old master while it lives).
    pub fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
        let mut members = self.members();
        for m in &mut members.list {
            if m.adopted {
                m.state = State::Leaving;
            } else if m.ready_on_release {
                m.state = State::Ready;
            }
            m.ready_on_release = false;
        }
        self.steer(&members, None);
    }

    /// `upgrade`, new side, once the old master has exited (so its workers' and its own
    /// descriptors are closed): rescue what is still queued on the adopted sockets, then
    /// close them, each leaving the group as any member does.
    pub async fn drop_adopted(self: &Arc<Self>) {
        let adopted: Vec<MemberKey> = self
            .members()
            .list
            .iter()
            .filter(|m| m.adopted)
            .map(|m| m.key)
            .collect();
        for key in adopted {
            self.leave(key, None).await;
        }
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
        // The socket joins the kernel's group at its `listen`, and the mirror must take it in
        // that same order: two slots spawning at once would otherwise listen in one order and
        // push in the other, and every program after would name the wrong sockets (the swap
        // shows only once a member leaves and the kernel moves the last into its slot).
        let mut members = self.members();
        let socket = Arc::new(new_socket(&self.listener)?);
        let for_worker = socket.try_clone()?;
        let key = members.push(socket);
        self.steer(&members, None);
        Ok((key, for_worker))
    }

    /// The worker passed (or failed) its health check.
    pub fn set_ready(&self, key: MemberKey, ready: bool) {
        let mut members = self.members();
        if let Some(i) = members.index(key)
            && members.list[i].state != State::Leaving
        {
            let held = self.held.load(Ordering::SeqCst);
            members.list[i].state = if ready && !held {
                State::Ready
            } else {
                State::Starting
            };
            members.list[i].ready_on_release = ready && held;
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
        if self.listener.proto == Proto::Udp {
            return Some(Takeover::none());
        }
        let group = Arc::clone(self);
        Some(Takeover::start(
            &socket,
            self.listener.to_string(),
            loopback_of(self.listener.addr),
            Arc::clone(&self.rescue),
            move || group.has_other_target(key),
        ))
    }

    /// The member's worker has exited: once its queue has stayed empty for a moment (or, with
    /// no other worker to send it to, after [`LAST_MEMBER_GRACE`]), close the master's
    /// duplicate, with a program valid before and after the kernel reorders the group.
    pub async fn leave(self: &Arc<Self>, key: MemberKey, takeover: Option<Takeover>) {
        let takeover = takeover.or_else(|| self.start_leaving(key));
        // This clone must be gone before the close below: the socket leaves the group when
        // its last duplicate closes, and that has to happen between the two programs.
        let socket = self.members().socket(key);
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
        if let Some(takeover) = takeover {
            takeover.finish().await;
        }
        // One critical section from the program that avoids both moving slots, through the
        // close, to the program for the new order: no join can slip in between.
        let mut members = self.members();
        if let Some(i) = members.index(key) {
            let last = members.list.len() - 1;
            if i != last {
                self.steer(&members, Some(last));
            }
            let gone = members.list.swap_remove(i);
            debug_assert_eq!(
                Arc::strong_count(&gone.socket),
                1,
                "a duplicate of ours outlives the close"
            );
            // The socket must leave the group here, under the program that avoids both moving
            // slots: the kernel moves the last socket into the gap at that moment, and once the
            // program for the new order is in, a connection sent to a socket still closing is
            // reset. A close alone is not enough: the socket leaves only when its last
            // descriptor closes, and another process may hold one a while longer (a child
            // between fork and exec in another slot's spawn, a worker's own child). Shutting
            // down a listener's read side stops it listening for every descriptor at once.
            // Not on a frozen group: its sockets are the next master's too, and it says when
            // they leave.
            if self.listener.proto != Proto::Udp && !self.frozen.load(Ordering::SeqCst) {
                let _ = socket2::SockRef::from(&*gone.socket).shutdown(std::net::Shutdown::Read);
            }
            drop(gone);
            self.steer(&members, None);
        }
    }

    /// Whether a member other than `key` can take connections.
    fn has_other_target(&self, key: MemberKey) -> bool {
        self.members().has_other_target(key)
    }

    fn steer(&self, members: &Members, also_avoid: Option<usize>) {
        if self.listener.proto == Proto::Udp || self.frozen.load(Ordering::SeqCst) {
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
            let stream = probe
                .connect(target)
                .await
                .map_err(|e| format!("probe connect to {target}: {e}"))?;
            match check {
                Check::Http { path } => crate::health::http_check(stream, target, path).await,
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
    use tokio::net::TcpStream;

    fn tcp_listener(port: u16) -> Listener {
        Listener::new(Proto::Tcp, SocketAddr::from(([127, 0, 0, 1], port)), "PORT")
    }

    /// A port free now, taken below the ephemeral range: a port `bind(:0)` gave out can be
    /// taken a moment later as the source port of another test's connection, and the group's
    /// bind of it would then fail (as the integration tests' `test_port` explains).
    fn free_port() -> u16 {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        const PORTS: std::ops::Range<u32> = 10_000..20_000;
        let span = PORTS.end - PORTS.start;
        let _ = NEXT.compare_exchange(
            0,
            (std::process::id().wrapping_mul(2_654_435_761) % span) | 1,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        (0..span)
            .map(|_| (PORTS.start + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16)
            .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
            .expect("a free test port")
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

    #[test]
    fn members_joining_at_once_are_mirrored_in_the_kernels_order() {
        let port = free_port();
        let group = Group::new(tcp_listener(port), rescue());
        let start = std::sync::Barrier::new(8);
        // Worker descriptors stay open, as the workers' would.
        let fds: Vec<OwnedFd> = std::thread::scope(|scope| {
            let joins: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| {
                        start.wait();
                        (0..4).map(|_| group.join().unwrap().1).collect::<Vec<_>>()
                    })
                })
                .collect();
            joins.into_iter().flat_map(|j| j.join().unwrap()).collect()
        });
        assert_eq!(fds.len(), 32);
        let mirror: Vec<Arc<OwnedFd>> = group
            .members()
            .list
            .iter()
            .map(|m| Arc::clone(&m.socket))
            .collect();
        bpf::assert_order(SocketAddr::from(([127, 0, 0, 1], port)), &mirror);
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
    async fn members_leaving_under_a_connection_storm_reset_nothing() {
        use std::sync::atomic::AtomicU64;
        let port = free_port();
        let group = Group::new(tcp_listener(port), rescue());
        // A "worker" that accepts until told to exit, then closes its socket.
        let worker = |fd: OwnedFd| {
            let exit = Arc::new(AtomicBool::new(false));
            let listener = std::net::TcpListener::from(fd);
            listener.set_nonblocking(true).unwrap();
            let flag = exit.clone();
            let thread = std::thread::spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.write_all(b"w");
                        }
                        Err(_) => std::thread::sleep(Duration::from_micros(200)),
                    }
                }
            });
            (exit, thread)
        };
        let (first, fd) = group.join().unwrap();
        let mut workers = vec![(first, worker(fd))];
        group.set_ready(first, true);
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let clients: Vec<_> = (0..2)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let mut out = String::new();
                        let answered = std::net::TcpStream::connect(("127.0.0.1", port))
                            .and_then(|mut s| s.read_to_string(&mut out));
                        match answered {
                            Ok(_) if out == "w" => ok.fetch_add(1, Ordering::Relaxed),
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            })
            .collect();
        // Each round: a member joins at the end, serves, and an earlier one leaves, so the
        // kernel moves the last socket into the gap while connections keep arriving.
        for _ in 0..8 {
            let (key, fd) = group.join().unwrap();
            workers.push((key, worker(fd)));
            group.set_ready(key, true);
            let (leaving, (exit, thread)) = workers.remove(0);
            let takeover = group.start_leaving(leaving);
            exit.store(true, Ordering::Relaxed);
            thread.join().unwrap();
            group.leave(leaving, takeover).await;
        }
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.join().unwrap();
        }
        let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
        assert!(ok > 100, "the storm really ran: {ok}");
        assert_eq!(failed, 0, "{failed} of {} connections failed", ok + failed);
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
