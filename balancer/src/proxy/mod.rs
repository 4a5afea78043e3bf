//! Proxies: moving a client's bytes to the worker the policy picked.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use balancer_config::{HttpSettings, UdpSettings};
use balancer_workers::Pool;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

/// After every ready worker refused, wait this long (or for a pool change) before trying again.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Why waiting in the queue for a worker ended without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueEnd {
    /// `queue_timeout` passed.
    TimedOut,
    /// The listener is stopping.
    Stopped,
}

/// Waits after a pass over the pool found no worker to take a connection: for the pool to
/// change, or — when some worker was tried and failed (it is probably dying and about to
/// leave the pool) — a short pause, so the caller neither spins nor gives up early.
pub async fn wait_in_queue(
    changes: &mut watch::Receiver<u64>,
    tried_some: bool,
    deadline: Instant,
    stop: &CancellationToken,
) -> Result<(), QueueEnd> {
    let pause = async {
        if tried_some {
            sleep(RETRY_PAUSE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = changes.changed() => Ok(()),
        _ = pause => Ok(()),
        _ = sleep_until(deadline) => Err(QueueEnd::TimedOut),
        _ = stop.cancelled() => Err(QueueEnd::Stopped),
    }
}

pub mod http;
pub mod tcp;
pub mod udp;

/// Where one public listener (TCP, UDP or HTTP) sends its traffic: an app's pool, and the
/// settings a reload may change.
#[derive(Debug)]
pub struct Route {
    /// The app's name, for logs.
    pub app: String,
    /// The app's ready workers.
    pub pool: Arc<Pool>,
    settings: ArcSwap<RouteSettings>,
}

/// The parts of a route a reload may change; read wait-free once per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSettings {
    /// Which of the worker's private addresses belongs to this listener.
    pub listener_index: usize,
    /// Time allowed for one connect to a worker.
    pub connect_timeout: Duration,
    /// Time a connection may wait for a ready worker.
    pub queue_timeout: Duration,
    /// Flow-table limits (UDP listeners).
    pub udp: UdpSettings,
    /// Front-end limits (HTTP listeners).
    pub http: HttpSettings,
}

impl Route {
    /// A route to `pool`'s workers.
    pub fn new(app: impl Into<String>, pool: Arc<Pool>, settings: RouteSettings) -> Self {
        Route {
            app: app.into(),
            pool,
            settings: ArcSwap::from_pointee(settings),
        }
    }

    /// The current settings.
    pub fn settings(&self) -> RouteSettings {
        **self.settings.load()
    }

    /// Replaces the settings (after a reload changed the app).
    pub fn update(&self, settings: RouteSettings) {
        self.settings.store(Arc::new(settings));
    }
}
