//! The public UDP listener: bind it, and hand it to the dispatcher that reads every client
//! datagram ([`crate::proxy::udp`], which explains the design). UDP has no accept: binding is
//! all this side does.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use crate::proxy::udp::dispatch;

/// Kernel buffers asked for the public socket (the kernel caps them at `net.core.rmem_max` /
/// `wmem_max`): bursts from many clients wait there while the dispatcher is busy.
const SOCKET_BUFFER: usize = 2 << 20;

/// Binds a public UDP socket with large kernel buffers; IPv6 wildcards are v6-only so `[::]` and
/// `0.0.0.0` can be bound side by side. No SO_REUSEADDR: for UDP it would let a second process
/// bind the same port and silently take its datagrams.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Best effort: a smaller buffer only means more drops under bursts.
    if let Err(e) = socket.set_recv_buffer_size(SOCKET_BUFFER) {
        tracing::debug!(%addr, "SO_RCVBUF: {e}");
    }
    if let Err(e) = socket.set_send_buffer_size(SOCKET_BUFFER) {
        tracing::debug!(%addr, "SO_SNDBUF: {e}");
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Serves UDP flows: the dispatcher ([`dispatch`]) reads client datagrams until `stop`, then
/// lets established flows relay the replies still coming (until quiet) and returns; `abort`
/// ends everything at once. Relays run on `tracker`.
pub async fn serve(socket: UdpSocket, ctx: super::ServeContext) {
    dispatch(socket, ctx).await;
}
