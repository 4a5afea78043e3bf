//! The public HTTP listener: accept client connections and hand each to the HTTP proxy's
//! connection driver ([`serve_connection`]); between accepts, let the proxy drop kept
//! connections to workers that left the pool.

use std::sync::Arc;

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::proxy::http::{HttpProxy, serve_connection};
use crate::proxy::proxy_protocol::read_header;

/// Accepts connections until `stop`, serving each on a task tracked by `tracker`; connections
/// then finish their requests in flight and close, or end at once when `abort` is cancelled.
pub async fn serve(listener: TcpListener, ctx: super::ServeContext) {
    let proxy = Arc::new(HttpProxy::new(&ctx));
    let super::ServeContext {
        route,
        stop,
        tracker,
        abort,
        budget,
    } = ctx;
    let mut changes = route.pool.subscribe();
    loop {
        // The connection's descriptors first (the client's, and a worker connection's):
        // past the budget, clients wait in the backlog.
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            Ok(()) = changes.changed() => {
                proxy.forget_departed();
                continue;
            }
            permit = Arc::clone(&budget).acquire_many_owned(crate::proxy::FDS_PER_CONNECTION) => permit,
        };
        let Ok(permit) = permit else { return };
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) if route.settings().accept_proxy => {
                let proxy = Arc::clone(&proxy);
                let abort = abort.clone();
                tracker.spawn(async move {
                    let _permit = permit;
                    behind_proxy(stream, peer, proxy, abort).await;
                });
            }
            Ok((stream, peer)) => {
                let proxy = Arc::clone(&proxy);
                tracker.spawn(async move {
                    let _permit = permit;
                    serve_connection(stream, peer, proxy).await;
                });
            }
            Err(e) => super::accept_failed(e).await,
        }
    }
}

/// `accept_proxy`: reads the client's PROXY header (within `connect_timeout`) and serves the
/// connection as coming from the client it names, so `X-Forwarded-For` and `Forwarded` carry
/// the real client. A refused header closes the connection before hyper ever sees it.
async fn behind_proxy(
    mut stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<HttpProxy>,
    abort: CancellationToken,
) {
    let route = Arc::clone(proxy.route());
    let within = route.settings().connect_timeout;
    let client = tokio::select! {
        read = read_header(&mut stream, within) => read,
        _ = abort.cancelled() => return,
    };
    match client {
        Ok(addrs) => {
            let client = addrs.map_or(peer, |a| a.source);
            serve_connection(stream, client, proxy).await;
        }
        Err(e) => {
            let refused = route.header_refused();
            tracing::debug!(app = %route.app, %peer, refused, "connection closed: {}", balancer_workers::Chain(&e));
        }
    }
}
