//! The public HTTP listener (being written).

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::proxy::Route;

/// Serves HTTP until `stop`.
pub async fn serve(
    _listener: TcpListener,
    _route: Arc<Route>,
    stop: CancellationToken,
    _abort: CancellationToken,
    _tracker: TaskTracker,
) {
    stop.cancelled().await;
}
