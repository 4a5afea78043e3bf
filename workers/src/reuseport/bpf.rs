//! The classic BPF program that steers a `SO_REUSEPORT` group, and the two socket calls that
//! neither socket2 nor nix wraps: attaching it, and reading a listener's accept-queue length.
//!
//! The kernel runs the program for every new connection (every SYN) to the group; it returns an
//! index into the group's socket array. Ours sends a health probe (recognised by its source
//! port) to the one socket it is meant for, and everything else at random to the sockets of
//! ready workers — never to a draining one. An index past the group's end makes the kernel fall
//! back to its own hash over every socket, so the caller only ever installs programs whose
//! indices are valid (see `Group` in `mod.rs`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::libc;

use crate::cbpf::*;

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h; not exported by libc for every target).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Loads at this offset are relative to the network (IP) header.
const NET: u32 = libc::SKF_NET_OFF as u32;
/// `SKF_AD_OFF + SKF_AD_RANDOM`: a pseudo-random u32.
const RANDOM: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32;

/// Builds the steering program.
///
/// `probes` maps a probe's TCP source port to the group index it must reach; `targets` are the
/// group indices new connections are spread over at random (must not be empty).
pub fn program(probes: &[(u16, u32)], targets: &[u32]) -> Vec<libc::sock_filter> {
    assert!(!targets.is_empty(), "a steering program needs a target");
    let mut p = Vec::new();
    if !probes.is_empty() {
        // A = IP version. IPv4: X = header length, A = source port at X; IPv6: fixed 40 bytes.
        p.push(stmt(BPF_LD | BPF_B | BPF_ABS, NET));
        p.push(stmt(BPF_ALU | BPF_RSH | BPF_K, 4));
        p.push(jump(BPF_JMP | BPF_JEQ | BPF_K, 6, 6, 0));
        p.push(stmt(BPF_LD | BPF_B | BPF_ABS, NET));
        p.push(stmt(BPF_ALU | BPF_AND | BPF_K, 0x0f));
        p.push(stmt(BPF_ALU | BPF_LSH | BPF_K, 2));
        p.push(stmt(BPF_MISC | BPF_TAX, 0));
        p.push(stmt(BPF_LD | BPF_H | BPF_IND, NET));
        p.push(jump(BPF_JMP | BPF_JA, 1, 0, 0));
        p.push(stmt(BPF_LD | BPF_H | BPF_ABS, NET.wrapping_add(40)));
        for &(port, index) in probes {
            p.push(jump(BPF_JMP | BPF_JEQ | BPF_K, u32::from(port), 0, 1));
            p.push(stmt(BPF_RET | BPF_K, index));
        }
    }
    p.push(stmt(BPF_LD | BPF_W | BPF_ABS, RANDOM));
    p.push(stmt(BPF_ALU | BPF_MOD | BPF_K, targets.len() as u32));
    for (i, &index) in targets.iter().enumerate() {
        p.push(jump(BPF_JMP | BPF_JEQ | BPF_K, i as u32, 0, 1));
        p.push(stmt(BPF_RET | BPF_K, index));
    }
    p.push(stmt(BPF_RET | BPF_K, targets[0]));
    p
}

/// Installs `program` on the reuseport group `socket` belongs to (it applies to the group).
pub fn attach(socket: BorrowedFd<'_>, program: &[libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: u16::try_from(program.len())
            .map_err(|_| io::Error::other("steering program too long"))?,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points at `program`, which outlives the call; the kernel copies the
    // instructions before returning and validates them (an invalid program is EINVAL).
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&raw const fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Connections waiting in a listening TCP socket's accept queue (`TCP_INFO`'s `tcpi_unacked`,
/// which the kernel fills with the accept backlog for listeners).
pub fn accept_queue_len(socket: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: tcp_info is plain data; zeroed is a valid value for it.
    #[allow(unsafe_code)]
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of the sizes given; the kernel writes at
    // most `len` bytes and updates `len`.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(info.tcpi_unacked)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asserts that the kernel's order of the group listening on `addr` is `all`'s: a program
/// naming index i sends a connection to `all[i]` (tests; leaves the last program attached).
#[cfg(test)]
pub(super) fn assert_order(addr: std::net::SocketAddr, all: &[impl std::os::fd::AsFd]) {
    for (index, socket) in all.iter().enumerate() {
        attach(all[0].as_fd(), &program(&[], &[index as u32])).unwrap();
        let before = accept_queue_len(socket.as_fd()).unwrap();
        let _c = std::net::TcpStream::connect(addr).unwrap();
        assert_eq!(
            accept_queue_len(socket.as_fd()).unwrap(),
            before + 1,
            "index {index}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, SockRef, Socket, Type};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::os::fd::AsFd;

    fn group(n: usize) -> (SocketAddr, Vec<TcpListener>) {
        let first = reuseport_listener("127.0.0.1:0".parse().unwrap());
        let addr = first.local_addr().unwrap();
        let mut all = vec![first];
        all.extend((1..n).map(|_| reuseport_listener(addr)));
        for l in &all {
            l.set_nonblocking(true).unwrap();
        }
        (addr, all)
    }

    fn reuseport_listener(addr: SocketAddr) -> TcpListener {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_reuse_port(true).unwrap();
        s.bind(&addr.into()).unwrap();
        s.listen(128).unwrap();
        s.into()
    }

    fn queued(all: &[TcpListener]) -> Vec<u32> {
        all.iter()
            .map(|l| accept_queue_len(l.as_fd()).unwrap())
            .collect()
    }

    #[test]
    fn random_steering_reaches_only_the_targets() {
        let (addr, all) = group(3);
        attach(all[0].as_fd(), &program(&[], &[0, 2])).unwrap();
        let _clients: Vec<_> = (0..40).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let q = queued(&all);
        assert_eq!(q[1], 0, "index 1 is not a target: {q:?}");
        assert_eq!(q[0] + q[2], 40);
        assert!(q[0] > 0 && q[2] > 0, "both targets get some: {q:?}");
    }

    #[test]
    fn a_probe_reaches_the_socket_its_source_port_names() {
        let (addr, all) = group(3);
        for target in [1u32, 2, 0] {
            let probe = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            probe
                .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
                .unwrap();
            let port = probe.local_addr().unwrap().as_socket().unwrap().port();
            attach(all[0].as_fd(), &program(&[(port, target)], &[0])).unwrap();
            let before = queued(&all);
            probe.connect(&addr.into()).unwrap();
            let after = queued(&all);
            let grew: Vec<usize> = (0..3).filter(|&i| after[i] > before[i]).collect();
            assert_eq!(grew, [target as usize], "{before:?} → {after:?}");
        }
    }

    #[test]
    fn group_order_is_listen_order_and_close_moves_the_last_into_the_gap() {
        let (addr, mut all) = group(4);
        // Close index 1: the kernel moves the last socket (old index 3) into slot 1.
        drop(all.remove(1));
        let moved = all.pop().unwrap();
        all.insert(1, moved);
        assert_order(addr, &all);
    }

    #[test]
    fn a_shut_down_listener_leaves_its_group_though_a_duplicate_is_open() {
        let (addr, mut all) = group(4);
        let leaving = all.remove(1);
        let still_open = leaving.try_clone().unwrap();
        SockRef::from(&leaving)
            .shutdown(std::net::Shutdown::Read)
            .unwrap();
        // Gone from the group at once, as at its last close: the last moves into its slot.
        let moved = all.pop().unwrap();
        all.insert(1, moved);
        assert_order(addr, &all);
        assert!(still_open.accept().is_err(), "it listens no more");
    }
}
