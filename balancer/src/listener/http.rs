//! The public HTTP listener: accept client connections and hand each to the HTTP proxy's
//! connection driver ([`serve_connection`]); between accepts, let the proxy drop kept
//! connections to workers that left the pool.

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::proxy::http::{HttpProxy, serve_connection};

/// Accepts connections until `stop`, serving each on a task tracked by `tracker`; connections
/// then finish their requests in flight and close, or end at once when `abort` is cancelled.
pub async fn serve(listener: TcpListener, ctx: super::ServeContext) {
    let proxy = Arc::new(HttpProxy::new(&ctx));
    let super::ServeContext {
        route,
        stop,
        tracker,
        ..
    } = ctx;
    let mut changes = route.pool.subscribe();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            Ok(()) = changes.changed() => {
                proxy.forget_departed();
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                tracker.spawn(serve_connection(stream, peer, Arc::clone(&proxy)));
            }
            Err(e) => super::accept_failed(e).await,
        }
    }
}
