//! The public TCP listener: bind it, and accept forever, whatever accept says.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use crate::proxy::tcp::{TcpProxyError, proxy};

/// Binds a public TCP listener (SO_REUSEADDR so a restarted master can rebind at once; IPv6
/// wildcards are v6-only so `[::]` and `0.0.0.0` can be bound side by side).
///
/// The listener has `TCP_NODELAY`, which Linux copies to every connection it accepts: the
/// proxies rely on it rather than spend a `setsockopt` per client (see [`nodelay`]).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(balancer_workers::LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Gives a public listener received from elsewhere (an older master's, in `upgrade`) the
/// `TCP_NODELAY` its accepted connections inherit.
pub fn nodelay(listener: &TcpListener) -> io::Result<()> {
    socket2::SockRef::from(listener).set_tcp_nodelay(true)
}

/// Accepts connections until `stop` is cancelled, proxying each on a task tracked by `tracker`.
/// Connection tasks end early when `abort` is cancelled (the end of a shutdown).
pub async fn serve(listener: TcpListener, ctx: super::ServeContext) {
    let super::ServeContext {
        route,
        stop,
        abort,
        tracker,
        budget,
    } = ctx;
    loop {
        // The connection's descriptors first: past the budget, clients wait in the backlog.
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            permit = Arc::clone(&budget).acquire_many_owned(crate::proxy::FDS_PER_CONNECTION) => permit,
        };
        let Ok(permit) = permit else { return };
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                let route = Arc::clone(&route);
                let (stop, abort) = (stop.clone(), abort.clone());
                tracker.spawn(async move {
                    let _permit = permit;
                    tokio::select! {
                        // `stop` ends only the wait for a worker: once shutdown starts, no new
                        // worker will become ready. Established copies go on until `abort`.
                        result = proxy(client, peer, &route, &stop) => match result {
                            Ok(_) | Err(TcpProxyError::Shutdown) => {}
                            Err(e @ TcpProxyError::NoWorker(_)) => {
                                tracing::warn!(app = %route.app, %peer, "connection closed: {e}");
                            }
                            Err(TcpProxyError::Header(e)) => {
                                let refused = route.header_refused();
                                tracing::debug!(app = %route.app, %peer, refused, "connection closed: {}", balancer_workers::Chain(&e));
                            }
                            Err(e) => tracing::debug!(app = %route.app, %peer, "{e}"),
                        },
                        _ = abort.cancelled() => {}
                    }
                });
            }
            Err(e) => super::accept_failed(e).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_from_the_listener() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap(), "the proxies count on it");

        // A listener bound elsewhere without it gets it from `nodelay`.
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        nodelay(&plain).unwrap();
        let _client = tokio::net::TcpStream::connect(plain.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = plain.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
