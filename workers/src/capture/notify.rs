//! The master's side of one worker's capture: a task that answers every `bind()` the worker's
//! process tree makes, off the proxy's hot path (it only runs when a worker binds).
//!
//! Each notification is answered exactly once, whatever happens: `CONTINUE` (the bind goes
//! ahead untouched) for every address that is not a public one of the app, and when anything
//! fails on the way, so a worker is never left hanging in `bind`. The task ends when the last
//! process under the filter has exited (the fd then polls as hung up).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::libc;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use balancer_config::Proto;

use super::Mode;
use super::redirect::{self, Redirect, To};

/// Answers the notifications on `fd` for worker `id` of `app` until the worker is gone.
pub(crate) fn spawn(fd: OwnedFd, app: String, id: u32, mode: Mode) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = serve(fd, &app, id, &mode).await {
            tracing::warn!(%app, id, "bind capture stopped: {e}");
        }
    })
}

async fn serve(fd: OwnedFd, app: &str, id: u32, mode: &Mode) -> io::Result<()> {
    // SAFETY: the fd is owned by the AsyncFd from here on and closed only when it drops.
    #[allow(unsafe_code)]
    let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE)? };
    loop {
        let mut guard = fd.readable().await?;
        let raw = fd.get_ref().as_raw_fd();
        match pending(raw)? {
            Pending::Notification => {
                if let Some(notif) = receive(raw)? {
                    match mode {
                        Mode::Redirect(redirects) => answer(raw, &notif, app, id, redirects),
                        Mode::Learn(learn) => learn_from(raw, &notif, app, id, learn),
                    }
                }
            }
            Pending::Gone => return Ok(()),
            Pending::Nothing => guard.clear_ready(),
        }
    }
}

enum Pending {
    Notification,
    Gone,
    Nothing,
}

/// What the fd says right now: a notification waits, every filtered process is gone, or
/// neither (a spurious wake-up).
fn pending(fd: RawFd) -> io::Result<Pending> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(Pending::Nothing)
        } else {
            Err(e)
        };
    }
    Ok(if pfd.revents & libc::POLLIN != 0 {
        Pending::Notification
    } else if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
        Pending::Gone
    } else {
        Pending::Nothing
    })
}

/// Takes the waiting notification; `None` when its thread was interrupted in the meantime
/// (the kernel withdrew it).
fn receive(fd: RawFd) -> io::Result<Option<libc::seccomp_notif>> {
    // SAFETY: the kernel requires a zeroed struct, which is a valid value of this plain type;
    // the ioctl writes into it.
    #[allow(unsafe_code)]
    unsafe {
        let mut notif: libc::seccomp_notif = std::mem::zeroed();
        if libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut notif) < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(notif))
    }
}

/// Whether the notification still stands (its thread has not been interrupted or died, so
/// the pid read with it still names that thread).
fn still_valid(fd: RawFd, id: u64) -> bool {
    // SAFETY: the ioctl reads one u64.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &id) };
    rc == 0
}

/// Answers `id`: `CONTINUE`, or the call's result (`error` is a negative errno, or 0).
fn respond(fd: RawFd, id: u64, error: i32, continue_: bool) {
    let resp = libc::seccomp_notif_resp {
        id,
        val: 0,
        error,
        flags: if continue_ {
            libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32
        } else {
            0
        },
    };
    // SAFETY: the ioctl reads `resp`, a valid struct alive for the call. A failure means the
    // thread is gone (ENOENT): there is nobody left to answer.
    #[allow(unsafe_code)]
    unsafe {
        libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &resp);
    }
}

/// Decides one trapped bind and answers it.
fn answer(fd: RawFd, notif: &libc::seccomp_notif, app: &str, id: u32, redirects: &[Redirect]) {
    let bind = redirect::read_bind(notif);
    if !still_valid(fd, notif.id) {
        return;
    }
    let Some(addr) = bind.addr else {
        return respond(fd, notif.id, 0, true);
    };
    if !redirects.iter().any(|r| redirect::overlaps(r.public, addr)) {
        return respond(fd, notif.id, 0, true);
    }
    let taken = match redirect::take(bind.tid, bind.fd) {
        Ok(taken) => taken,
        Err(e) => {
            tracing::warn!(%app, id, %addr, "cannot capture a bind (it goes ahead as is): {e}");
            return respond(fd, notif.id, 0, true);
        }
    };
    let kind = socket2::SockRef::from(&taken.socket).r#type();
    let Some(target) = redirects.iter().find(|r| {
        redirect::overlaps(r.public, addr)
            && kind.as_ref().is_ok_and(|k| redirect::serves(r.proto, *k))
    }) else {
        return respond(fd, notif.id, 0, true);
    };
    let result = match &target.to {
        To::Private(private) => redirect::bind_private(&taken, *private),
        To::Socket(socket) => redirect::install(fd, notif.id, bind.fd, &taken, socket),
    };
    match result {
        Ok(()) => {
            tracing::info!(
                %app, id, tid = bind.tid, %addr, public = %target.public,
                "captured the worker's bind of a public address"
            );
            respond(fd, notif.id, 0, false);
        }
        Err(e) => {
            tracing::warn!(%app, id, %addr, "cannot redirect a captured bind: {e}");
            respond(
                fd,
                notif.id,
                -e.raw_os_error().unwrap_or(libc::EADDRINUSE),
                false,
            );
        }
    }
}

/// The address a learned bind makes public: the one bound, but `[::]` (Node's default, a
/// dual-stack bind) becomes `0.0.0.0`, because the master's IPv6 listeners are IPv6-only and
/// the app's clients are IPv4 ones first; an app that wants both says so in `listen`.
fn public_of(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv4Addr::UNSPECIFIED, addr.port()).into(),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => (v4, addr.port()).into(),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// Learning (an app with no `listen`): a bind of a fixed TCP or UDP port is offered to the
/// master as the app's public address. When it is that address, this worker's socket is bound
/// to a private port instead (the master, which takes the public port, reloads the app onto
/// it, and this worker is replaced); any other bind goes ahead.
fn learn_from(fd: RawFd, notif: &libc::seccomp_notif, app: &str, id: u32, learn: &super::Learn) {
    let bind = redirect::read_bind(notif);
    if !still_valid(fd, notif.id) {
        return;
    }
    let Some(addr) = bind.addr.filter(|a| a.port() != 0) else {
        return respond(fd, notif.id, 0, true);
    };
    let Ok(taken) = redirect::take(bind.tid, bind.fd) else {
        return respond(fd, notif.id, 0, true);
    };
    let proto = match socket2::SockRef::from(&taken.socket).r#type() {
        Ok(t) if t == socket2::Type::STREAM => Proto::Tcp,
        Ok(t) if t == socket2::Type::DGRAM => Proto::Udp,
        _ => return respond(fd, notif.id, 0, true),
    };
    let public = public_of(addr);
    if !learn(app, proto, public) {
        return respond(fd, notif.id, 0, true);
    }
    let private = crate::spawn::private_port(proto)
        .map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .and_then(|private| redirect::bind_private(&taken, private).map(|()| private));
    match private {
        Ok(private) => {
            tracing::info!(
                %app, id, %addr, %private,
                "captured the worker's bind; its public address is learned"
            );
            respond(fd, notif.id, 0, false);
        }
        Err(e) => {
            tracing::warn!(%app, id, %addr, "cannot redirect a learned bind: {e}");
            respond(
                fd,
                notif.id,
                -e.raw_os_error().unwrap_or(libc::EADDRINUSE),
                false,
            );
        }
    }
}
