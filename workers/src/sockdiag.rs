//! The kernel's own view of TCP sockets, through `NETLINK_SOCK_DIAG` (inet_diag): whether a
//! worker has accepted a connection, and which connections a worker still holds.
//!
//! Two questions the master cannot answer from its side of a socket:
//! - **Was this connection accepted?** A connect completes as soon as the kernel finishes the
//!   handshake into the listener's backlog, even if the worker is stopped (SIGSTOP) or wedged
//!   and never calls `accept`. A queued connection has no socket inode yet; `accept` gives it
//!   one, so an exact lookup of the connection tells the two apart ([`accepted`]).
//! - **Which connections does a worker hold?** Under the reuseport policy the master never sees
//!   them; the kernel lists every established connection on the public port with its inode,
//!   and the worker's `/proc/PID/fd` links name its inodes ([`established_on`]).
//!
//! The requests are built and parsed here by hand (the structures are small and fixed:
//! `linux/inet_diag.h`); no privilege is needed for these queries.

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};

use nix::libc;
use socket2::{Domain, Protocol, Socket, Type};

/// `SOCK_DIAG_BY_FAMILY`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `NLMSG_ERROR`, `NLMSG_DONE`.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `INET_DIAG_NOCOOKIE`.
const NO_COOKIE: u32 = !0;
/// `TCP_ESTABLISHED` (and its bit in a states mask).
pub const TCP_ESTABLISHED: u8 = 1;
/// Sizes of `nlmsghdr`, `inet_diag_req_v2` and `inet_diag_msg`.
const NLMSG_HDR: usize = 16;
const REQ_LEN: usize = 56;
const MSG_LEN: usize = 72;

/// One socket as inet_diag reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockInfo {
    /// Local address.
    pub local: SocketAddr,
    /// Remote address.
    pub remote: SocketAddr,
    /// TCP state (`TCP_ESTABLISHED`, …).
    pub state: u8,
    /// The socket's inode: 0 while a connection waits in a listener's accept queue.
    pub inode: u32,
}

/// The socket id fields of a request, in network order where the kernel wants it.
fn sockid(local: Option<SocketAddr>, remote: Option<SocketAddr>) -> [u8; 48] {
    let mut id = [0u8; 48];
    let put_addr = |buf: &mut [u8], addr: IpAddr| match addr {
        IpAddr::V4(v4) => buf[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => buf.copy_from_slice(&v6.octets()),
    };
    if let Some(local) = local {
        id[0..2].copy_from_slice(&local.port().to_be_bytes());
        put_addr(&mut id[4..20], local.ip());
    }
    if let Some(remote) = remote {
        id[2..4].copy_from_slice(&remote.port().to_be_bytes());
        put_addr(&mut id[20..36], remote.ip());
    }
    // idiag_if (36..40) stays 0; the cookie (40..48) says "any".
    id[40..44].copy_from_slice(&NO_COOKIE.to_ne_bytes());
    id[44..48].copy_from_slice(&NO_COOKIE.to_ne_bytes());
    id
}

/// One request: an exact lookup of `local`/`remote` (`dump` false) or a dump of every TCP
/// socket of the family in `states`.
fn request(family: u8, states: u32, id: [u8; 48], dump: bool) -> Vec<u8> {
    let len = NLMSG_HDR + REQ_LEN;
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let flags = libc::NLM_F_REQUEST as u16 | if dump { libc::NLM_F_DUMP as u16 } else { 0 };
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel fills it in
    msg.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    msg.extend_from_slice(&states.to_ne_bytes());
    msg.extend_from_slice(&id);
    msg
}

/// Sends `request` and collects the sockets of the reply, until `NLMSG_DONE` (or, for an
/// exact lookup, the one answer). A lookup of a socket that does not exist is `Ok(empty)`.
fn query(request: &[u8], dump: bool) -> io::Result<Vec<SockInfo>> {
    let socket = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::DGRAM.cloexec(),
        Some(Protocol::from(libc::NETLINK_SOCK_DIAG)),
    )?;
    socket.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    // Unconnected netlink sockets send to the kernel.
    socket.send(request)?;
    let mut found = Vec::new();
    let mut buf = vec![MaybeUninit::<u8>::uninit(); 64 * 1024];
    loop {
        let n = socket.recv(&mut buf)?;
        // SAFETY: `recv` initialised the first `n` bytes.
        #[allow(unsafe_code)]
        let data: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), n) };
        let mut at = 0;
        while at + NLMSG_HDR <= data.len() {
            let len = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap_or_default()) as usize;
            let kind = u16::from_ne_bytes(data[at + 4..at + 6].try_into().unwrap_or_default());
            if len < NLMSG_HDR || at + len > data.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "short netlink message",
                ));
            }
            let body = &data[at + NLMSG_HDR..at + len];
            match kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => {
                    let errno = body
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap_or_default()));
                    return match -errno {
                        0 => Ok(found),
                        libc::ENOENT => Ok(Vec::new()),
                        e => Err(io::Error::from_raw_os_error(e)),
                    };
                }
                SOCK_DIAG_BY_FAMILY => {
                    if let Some(info) = parse(body) {
                        found.push(info);
                    }
                    if !dump {
                        return Ok(found);
                    }
                }
                _ => {}
            }
            // Messages are 4-byte aligned.
            at += (len + 3) & !3;
        }
    }
}

/// One `inet_diag_msg`.
fn parse(body: &[u8]) -> Option<SockInfo> {
    if body.len() < MSG_LEN {
        return None;
    }
    let family = i32::from(body[0]);
    let state = body[1];
    let id = &body[4..52];
    let addr = |bytes: &[u8], port: u16| -> Option<SocketAddr> {
        let ip = match family {
            libc::AF_INET => IpAddr::from(<[u8; 4]>::try_from(&bytes[..4]).ok()?),
            libc::AF_INET6 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    };
    let sport = u16::from_be_bytes([id[0], id[1]]);
    let dport = u16::from_be_bytes([id[2], id[3]]);
    let inode = u32::from_ne_bytes(body[68..72].try_into().ok()?);
    Some(SockInfo {
        local: addr(&id[4..20], sport)?,
        remote: addr(&id[20..36], dport)?,
        state,
        inode,
    })
}

fn family_of(addr: &SocketAddr) -> u8 {
    if addr.is_ipv4() {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    }
}

/// Whether the connection from `client` to the listener at `server` has been accepted (it has
/// a socket inode); `Ok(None)` when the kernel knows no such connection.
pub fn accepted(server: SocketAddr, client: SocketAddr) -> io::Result<Option<bool>> {
    let states = 1u32 << TCP_ESTABLISHED;
    let req = request(
        family_of(&server),
        states,
        sockid(Some(server), Some(client)),
        false,
    );
    // An exact lookup that finds no connection falls back to the listener: only the
    // connection itself answers the question.
    Ok(query(&req, false)?
        .into_iter()
        .find(|s| s.state == TCP_ESTABLISHED && s.remote == client)
        .map(|s| s.inode != 0))
}

/// Every established TCP connection whose local port is `port` (both families).
pub fn established_on(port: u16) -> io::Result<Vec<SockInfo>> {
    let states = 1u32 << TCP_ESTABLISHED;
    let mut all = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let req = request(family, states, sockid(None, None), true);
        all.extend(
            query(&req, true)?
                .into_iter()
                .filter(|s| s.local.port() == port),
        );
    }
    Ok(all)
}

/// The socket inodes `pid` holds open (`/proc/PID/fd/N -> socket:[INODE]`).
pub fn socket_inodes(pid: u32) -> Vec<u32> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.filter_map(|fd| {
        let link = std::fs::read_link(fd.ok()?.path()).ok()?;
        let link = link.to_str()?;
        link.strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse()
            .ok()
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_queued_connection_is_told_from_an_accepted_one() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = TcpStream::connect(server).unwrap();
        let local = client.local_addr().unwrap();
        assert_eq!(
            accepted(server, local).unwrap(),
            Some(false),
            "in the queue"
        );
        let (accepted_stream, _) = listener.accept().unwrap();
        assert_eq!(accepted(server, local).unwrap(), Some(true), "accepted");
        let gone: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(accepted(server, gone).unwrap(), None);

        let held = established_on(server.port()).unwrap();
        assert_eq!(held.len(), 1, "{held:?}");
        assert_eq!(held[0].remote, local);
        let ours = socket_inodes(std::process::id());
        assert!(ours.contains(&held[0].inode), "{ours:?} {held:?}");
        drop(accepted_stream);
    }
}
