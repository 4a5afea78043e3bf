//! Public listeners owned by the master: one socket per `listen` entry, bound before anything
//! starts, and served by the protocol's accept loop.

use std::io;
use std::time::Duration;

use balancer_config::{Listener, Proto};
use tokio::net::{TcpListener, UdpSocket};

pub use crate::proxy::ServeContext;

pub mod http;
pub mod tcp;
pub mod udp;

/// Pause after running out of file descriptors, so an accept loop does not spin on EMFILE.
const FD_EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);

/// What an accept loop does with an error: it never stops. Running out of descriptors or
/// memory pauses it briefly; anything else (ECONNABORTED and friends) concerns one connection.
pub(crate) async fn accept_failed(e: io::Error) {
    let exhausted = matches!(
        e.raw_os_error(),
        Some(code) if code == nix::libc::EMFILE || code == nix::libc::ENFILE
            || code == nix::libc::ENOBUFS || code == nix::libc::ENOMEM
    );
    if exhausted {
        tracing::error!("accept: {e}; pausing {FD_EXHAUSTED_PAUSE:?}");
        tokio::time::sleep(FD_EXHAUSTED_PAUSE).await;
    } else {
        tracing::debug!("accept: {e}");
    }
}

/// A bound public socket.
#[derive(Debug)]
pub enum Bound {
    /// `tcp://` and `http://` listeners.
    Stream(TcpListener),
    /// `udp://` listeners.
    Datagram(UdpSocket),
}

/// Binds the socket for `listener`.
pub fn bind(listener: &Listener) -> io::Result<Bound> {
    match listener.proto {
        Proto::Tcp | Proto::Http => tcp::bind(listener.addr).map(Bound::Stream),
        Proto::Udp => udp::bind(listener.addr).map(Bound::Datagram),
    }
}

/// Serves `socket` as `proto` until `ctx.stop`; connection tasks go on `ctx.tracker` and end
/// early when `ctx.abort` is cancelled.
pub async fn serve(proto: Proto, socket: Bound, ctx: ServeContext) {
    match (proto, socket) {
        (Proto::Tcp, Bound::Stream(l)) => tcp::serve(l, ctx).await,
        (Proto::Http, Bound::Stream(l)) => http::serve(l, ctx).await,
        (Proto::Udp, Bound::Datagram(s)) => udp::serve(s, ctx).await,
        (proto, socket) => {
            tracing::error!(
                ?proto,
                ?socket,
                "listener bound with the wrong kind of socket"
            )
        }
    }
}
