//! One trapped `bind()`: reading its address out of the worker, deciding whether it is a public
//! address of the app, and swapping the worker's socket for the one the policy wants.
//!
//! Under **rr** the worker's own socket is taken (`pidfd_getfd`) and bound by the master to the
//! worker's private address, then the `bind` is answered with success: the socket keeps every
//! option the worker set on it (`SO_REUSEADDR`, `IPV6_V6ONLY`, buffer sizes…), its fd number and
//! its flags, because it is the same socket. Under **reuseport** the worker's fd is replaced by
//! the worker's socket of the `SO_REUSEPORT` group (`SECCOMP_IOCTL_NOTIF_ADDFD` with
//! `SECCOMP_ADDFD_FLAG_SETFD`: same fd number, the worker's close-on-exec, its `O_NONBLOCK` set
//! on the group socket), then the `bind` is answered with success in a second ioctl. The atomic
//! `SECCOMP_ADDFD_FLAG_SEND` is not used: it makes the syscall return the new fd number, and
//! `bind` must return 0 (libuv treats any other value as a failure).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use balancer_config::Proto;
use nix::libc;

/// Where a captured bind of one public address goes.
#[derive(Debug)]
pub enum To {
    /// rr: bind the worker's socket to this private address.
    Private(SocketAddr),
    /// reuseport: install this socket (the worker's member of the group) in its place.
    Socket(OwnedFd),
}

/// One public address of the app and what a worker's bind of it becomes.
#[derive(Debug)]
pub struct Redirect {
    /// The listener's protocol (TCP for `tcp://` and `http://`, UDP for `udp://`).
    pub proto: Proto,
    /// The public address.
    pub public: SocketAddr,
    /// The swap.
    pub to: To,
}

/// The trapped call, as read from the notification and the worker's memory.
#[derive(Debug, Clone, Copy)]
pub struct Bind {
    /// The thread that called `bind`.
    pub tid: u32,
    /// The fd it passed.
    pub fd: RawFd,
    /// The address, when it is an IPv4 or IPv6 one.
    pub addr: Option<SocketAddr>,
}

/// Reads the call's arguments: the address is copied out of the worker with
/// `process_vm_readv` (the caller re-checks the notification id afterwards, so the pid still
/// names the thread that is waiting).
pub fn read_bind(notif: &libc::seccomp_notif) -> Bind {
    let args = notif.data.args;
    let len = (args[2] as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    #[allow(unsafe_code)]
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let local = libc::iovec {
        iov_base: (&mut storage as *mut libc::sockaddr_storage).cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: args[1] as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: `local` points at `storage`, `len` bytes long at most; the remote iovec is only
    // read by the kernel, in the other process, which checks it.
    #[allow(unsafe_code)]
    let read =
        unsafe { libc::process_vm_readv(notif.pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    let addr = if read >= 0 && read as usize == len {
        sockaddr(&storage, len)
    } else {
        None
    };
    Bind {
        tid: notif.pid,
        fd: args[0] as RawFd,
        addr,
    }
}

/// An IPv4 or IPv6 socket address from raw bytes.
fn sockaddr(storage: &libc::sockaddr_storage, len: usize) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, and it is big enough.
            #[allow(unsafe_code)]
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            #[allow(unsafe_code)]
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Whether a bind of `bind` would take `public`: the same port, and addresses that overlap
/// (the same one, or either a wildcard: `[::]` dual-stack holds IPv4 too).
pub fn overlaps(public: SocketAddr, bind: SocketAddr) -> bool {
    let ip = |a: SocketAddr| match a.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    public.port() == bind.port()
        && (public.ip().is_unspecified() || bind.ip().is_unspecified() || ip(public) == ip(bind))
}

/// Whether a socket of `kind` (`SOCK_STREAM`, `SOCK_DGRAM`) serves `proto`.
pub fn serves(proto: Proto, kind: socket2::Type) -> bool {
    match proto {
        Proto::Udp => kind == socket2::Type::DGRAM,
        Proto::Tcp | Proto::Http => kind == socket2::Type::STREAM,
    }
}

/// The worker's socket behind `fd`, duplicated into the master (`pidfd_getfd`), and its fd
/// flags there (`O_CLOEXEC`, `O_NONBLOCK`) read from `/proc`.
pub struct Taken {
    /// The master's duplicate of the worker's socket (same open file).
    pub socket: OwnedFd,
    /// The worker's fd had close-on-exec.
    pub cloexec: bool,
    /// The socket is non-blocking.
    pub nonblock: bool,
}

/// Takes the socket of thread `tid`'s `fd`.
pub fn take(tid: u32, fd: RawFd) -> io::Result<Taken> {
    let tgid = tgid(tid)?;
    // SAFETY: pidfd_open and pidfd_getfd take integers and return new fds owned by nobody else.
    #[allow(unsafe_code)]
    let socket = unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, tgid, 0);
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as RawFd);
        let socket = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if socket < 0 {
            return Err(io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(socket as RawFd)
    };
    let flags = fdinfo_flags(tgid, fd)?;
    Ok(Taken {
        socket,
        cloexec: flags & libc::O_CLOEXEC as u32 != 0,
        nonblock: flags & libc::O_NONBLOCK as u32 != 0,
    })
}

/// The process a thread belongs to (`Tgid:` in `/proc/TID/status`).
fn tgid(tid: u32) -> io::Result<i32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no Tgid"))
}

/// The `flags:` line of `/proc/PID/fdinfo/FD` (octal: `O_*` of the open file plus the fd's
/// `O_CLOEXEC`).
fn fdinfo_flags(pid: i32, fd: RawFd) -> io::Result<u32> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no flags in fdinfo"))
}

/// rr: binds the worker's socket to its private address. An IPv6 socket (an app that binds
/// `[::]`) is bound to the IPv4-mapped form of the private address, so the master's IPv4
/// connects reach it; that needs the socket to be dual-stack, as a `[::]` bind is by default.
pub fn bind_private(taken: &Taken, private: SocketAddr) -> io::Result<()> {
    let sock = socket2::SockRef::from(&taken.socket);
    let domain = sock.domain()?;
    let addr = match (domain, private) {
        (d, SocketAddr::V4(v4)) if d == socket2::Domain::IPV6 => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        _ => private,
    };
    sock.bind(&addr.into())
}

/// reuseport: puts `socket` in place of the worker's `fd` (same number; the worker's
/// close-on-exec; its blocking mode, set on the group socket it now shares).
pub fn install(
    notif_fd: RawFd,
    id: u64,
    fd: RawFd,
    taken: &Taken,
    socket: &OwnedFd,
) -> io::Result<()> {
    socket2::SockRef::from(socket).set_nonblocking(taken.nonblock)?;
    let addfd = libc::seccomp_notif_addfd {
        id,
        flags: libc::SECCOMP_ADDFD_FLAG_SETFD as u32,
        srcfd: socket.as_fd().as_raw_fd() as u32,
        newfd: fd as u32,
        newfd_flags: if taken.cloexec {
            libc::O_CLOEXEC as u32
        } else {
            0
        },
    };
    // SAFETY: the ioctl reads `addfd`, a valid struct alive for the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(notif_fd, libc::SECCOMP_IOCTL_NOTIF_ADDFD, &addfd) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn overlapping_addresses() {
        assert!(overlaps(a("127.0.0.1:3000"), a("127.0.0.1:3000")));
        assert!(overlaps(a("127.0.0.1:3000"), a("0.0.0.0:3000")));
        assert!(overlaps(a("127.0.0.1:3000"), a("[::]:3000")));
        assert!(overlaps(a("0.0.0.0:3000"), a("127.0.0.1:3000")));
        assert!(overlaps(a("127.0.0.1:3000"), a("[::ffff:127.0.0.1]:3000")));
        assert!(!overlaps(a("127.0.0.1:3000"), a("127.0.0.1:3001")));
        assert!(!overlaps(a("127.0.0.1:3000"), a("127.0.0.2:3000")));
        assert!(!overlaps(a("127.0.0.1:3000"), a("[::1]:3000")));
    }
}
