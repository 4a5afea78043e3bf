//! The public UDP listener (being written).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::proxy::Route;

/// Binds a public UDP socket.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Serves UDP flows until `stop`.
pub async fn serve(
    _socket: UdpSocket,
    _route: Arc<Route>,
    stop: CancellationToken,
    _abort: CancellationToken,
    _tracker: TaskTracker,
) {
    stop.cancelled().await;
}
