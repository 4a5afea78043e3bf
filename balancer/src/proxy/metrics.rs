//! What the data plane counts: metric handles resolved once per listener ([`ListenerMeters`],
//! made with the route) and once per worker and listener ([`WorkerMeters`], made on the
//! worker's first connection and kept on its handle), so a connection only bumps atomics and
//! never looks a label set up. With no recorder installed (unit tests, the bench's "off" run)
//! every handle is a no-op.

use std::sync::{Arc, OnceLock};

use balancer_workers::WorkerHandle;
use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

/// Counters of one public listener, labelled `app` and `listener`.
#[derive(Debug, Clone)]
pub struct ListenerMeters {
    app: Arc<str>,
    listener: Arc<str>,
    /// Connections accepted (TCP) or requests received (HTTP).
    pub accepted: Counter,
    /// Connect attempts that failed, after which another worker was tried.
    pub retries: Counter,
    /// Connections waiting in the queue for a ready worker now.
    pub queued: Gauge,
    /// How long queued connections waited for a worker, in seconds.
    pub queue_wait: Histogram,
    /// Connections that waited `queue_timeout` and got no worker.
    pub queue_timeouts: Counter,
    /// Connections handed to an io_uring ring once they went back and forth (`[balancer] io`).
    pub carried: Counter,
}

impl ListenerMeters {
    /// The handles of listener `listener` of `app` (registered now, with the recorder
    /// installed at this moment).
    pub fn new(app: &str, listener: &str) -> Self {
        let labels = [("app", app.to_owned()), ("listener", listener.to_owned())];
        ListenerMeters {
            app: app.into(),
            listener: listener.into(),
            accepted: counter!("balancer_tcp_connections_accepted_total", &labels),
            retries: counter!("balancer_tcp_connect_retries_total", &labels),
            queued: gauge!("balancer_tcp_queued_connections", &labels),
            queue_wait: histogram!("balancer_tcp_queue_wait_seconds", &labels),
            queue_timeouts: counter!("balancer_tcp_queue_timeouts_total", &labels),
            carried: counter!("balancer_tcp_io_uring_connections_total", &labels),
        }
    }

    /// Handles that count nothing: a route not (yet) named after its listener.
    pub fn noop(app: &str) -> Self {
        ListenerMeters {
            app: app.into(),
            listener: "".into(),
            accepted: Counter::noop(),
            retries: Counter::noop(),
            queued: Gauge::noop(),
            queue_wait: Histogram::noop(),
            queue_timeouts: Counter::noop(),
            carried: Counter::noop(),
        }
    }

    /// The handles for `worker` behind this listener (`index` in the app's `listen` list):
    /// made on its first connection and kept on the worker's handle.
    pub fn worker<'w>(&self, worker: &'w WorkerHandle, index: usize) -> Option<&'w WorkerMeters> {
        if self.listener.is_empty() {
            return None;
        }
        worker.meters(index, || {
            WorkerMeters::new(&self.app, &self.listener, worker.id, worker.instance)
        })
    }
}

/// Counters of one worker behind one listener, labelled `app`, `listener`, `worker` (the
/// stable id) and `instance`. Ids are stable across restarts, so the series are bounded by
/// the number of slots, not of processes.
#[derive(Debug)]
pub struct WorkerMeters {
    /// Connections proxied to it.
    pub connections: Counter,
    /// Connections open to it now.
    pub active: Gauge,
    /// Bytes client → worker, counted when a connection ends.
    pub bytes_to_worker: Counter,
    /// Bytes worker → client, counted when a connection ends.
    pub bytes_to_client: Counter,
    /// Connects to it that failed (refused or timed out).
    pub connect_errors: Counter,
}

impl WorkerMeters {
    fn new(app: &str, listener: &str, id: u32, instance: u32) -> Self {
        let labels = |extra: Option<&'static str>| {
            let mut l = vec![
                ("app", app.to_owned()),
                ("listener", listener.to_owned()),
                ("worker", id.to_string()),
                ("instance", instance.to_string()),
            ];
            if let Some(direction) = extra {
                l.push(("direction", direction.to_owned()));
            }
            l
        };
        WorkerMeters {
            connections: counter!("balancer_tcp_worker_connections_total", &labels(None)),
            active: gauge!("balancer_tcp_active_connections", &labels(None)),
            bytes_to_worker: counter!("balancer_tcp_bytes_total", &labels(Some("to_worker"))),
            bytes_to_client: counter!("balancer_tcp_bytes_total", &labels(Some("to_client"))),
            connect_errors: counter!("balancer_tcp_connect_errors_total", &labels(None)),
        }
    }
}

/// Methods counted by name in `balancer_http_requests_total`; any other is `other`, so a
/// client cannot grow the series with made-up methods.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];

/// Counters of one HTTP listener. The request counters are resolved on first use of each
/// (method, status class) pair and kept, so a request costs an index and an increment.
#[derive(Debug)]
pub struct HttpMeters {
    app: Arc<str>,
    listener: Arc<str>,
    requests: [[OnceLock<Counter>; 5]; METHODS.len() + 1],
    /// Time from the request to the response's head, in seconds.
    pub duration: Histogram,
    /// Requests answered 502 because the worker failed.
    pub upstream_errors: Counter,
    /// Requests answered 503 because no worker was ready.
    pub no_worker: Counter,
}

impl HttpMeters {
    /// The handles of the HTTP listener `route` counts for (no-ops if it counts nothing).
    pub fn new(route: &ListenerMeters) -> Self {
        let (app, listener) = (Arc::clone(&route.app), Arc::clone(&route.listener));
        let labels = [("app", app.to_string()), ("listener", listener.to_string())];
        let counting = !listener.is_empty();
        let make = |c: Counter| if counting { c } else { Counter::noop() };
        HttpMeters {
            requests: Default::default(),
            duration: if counting {
                histogram!("balancer_http_request_duration_seconds", &labels)
            } else {
                Histogram::noop()
            },
            upstream_errors: make(counter!("balancer_http_upstream_errors_total", &labels)),
            no_worker: make(counter!("balancer_http_no_worker_total", &labels)),
            app,
            listener,
        }
    }

    /// Counts one answered request.
    pub fn request(&self, method: &str, status: u16) {
        if self.listener.is_empty() {
            return;
        }
        let m = METHODS
            .iter()
            .position(|k| *k == method)
            .unwrap_or(METHODS.len());
        let class = usize::from(status.clamp(100, 599) / 100 - 1);
        self.requests[m][class]
            .get_or_init(|| {
                counter!(
                    "balancer_http_requests_total",
                    "app" => self.app.to_string(),
                    "listener" => self.listener.to_string(),
                    "method" => METHODS.get(m).copied().unwrap_or("other"),
                    "code" => format!("{}xx", class + 1),
                )
            })
            .increment(1);
    }
}

/// Counters of one UDP listener, labelled `app` and `listener` (a flow's worker changes as
/// it moves, so these are per listener).
#[derive(Debug)]
pub struct UdpMeters {
    /// Flows in the table now.
    pub flows: Gauge,
    /// Datagrams sent to workers.
    pub datagrams_to_worker: Counter,
    /// Bytes of those datagrams.
    pub bytes_to_worker: Counter,
    /// Replies sent back to clients.
    pub datagrams_to_client: Counter,
    /// Bytes of those replies.
    pub bytes_to_client: Counter,
    /// Flows evicted to make room for a new client (`max_flows`).
    pub evictions: Counter,
}

impl UdpMeters {
    /// The handles of the UDP listener `route` counts for (no-ops if it counts nothing).
    pub fn new(route: &ListenerMeters) -> Self {
        if route.listener.is_empty() {
            return UdpMeters {
                flows: Gauge::noop(),
                datagrams_to_worker: Counter::noop(),
                bytes_to_worker: Counter::noop(),
                datagrams_to_client: Counter::noop(),
                bytes_to_client: Counter::noop(),
                evictions: Counter::noop(),
            };
        }
        let labels = |direction: Option<&'static str>| {
            let mut l = vec![
                ("app", route.app.to_string()),
                ("listener", route.listener.to_string()),
            ];
            if let Some(d) = direction {
                l.push(("direction", d.to_owned()));
            }
            l
        };
        UdpMeters {
            flows: gauge!("balancer_udp_flows", &labels(None)),
            datagrams_to_worker: counter!(
                "balancer_udp_datagrams_total",
                &labels(Some("to_worker"))
            ),
            bytes_to_worker: counter!("balancer_udp_bytes_total", &labels(Some("to_worker"))),
            datagrams_to_client: counter!(
                "balancer_udp_datagrams_total",
                &labels(Some("to_client"))
            ),
            bytes_to_client: counter!("balancer_udp_bytes_total", &labels(Some("to_client"))),
            evictions: counter!("balancer_udp_flow_evictions_total", &labels(None)),
        }
    }

    /// One datagram of `len` bytes went to a worker.
    pub fn to_worker(&self, len: usize) {
        self.datagrams_to_worker.increment(1);
        self.bytes_to_worker.increment(len as u64);
    }

    /// One reply of `len` bytes went to a client.
    pub fn to_client(&self, len: usize) {
        self.datagrams_to_client.increment(1);
        self.bytes_to_client.increment(len as u64);
    }
}

/// Holds one in [`ListenerMeters::queued`] while a connection waits for a worker.
#[derive(Debug)]
pub struct Queued<'a> {
    meters: &'a ListenerMeters,
    since: tokio::time::Instant,
}

impl<'a> Queued<'a> {
    /// A connection starts waiting.
    pub fn enter(meters: &'a ListenerMeters) -> Self {
        meters.queued.increment(1.0);
        Queued {
            meters,
            since: tokio::time::Instant::now(),
        }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.meters.queued.decrement(1.0);
        self.meters
            .queue_wait
            .record(self.since.elapsed().as_secs_f64());
    }
}

/// Holds one in [`WorkerMeters::active`] for the life of a proxied connection.
#[derive(Debug)]
pub struct Active<'a>(&'a WorkerMeters);

impl<'a> Active<'a> {
    /// A connection to the worker is established.
    pub fn enter(meters: &'a WorkerMeters) -> Self {
        meters.connections.increment(1);
        meters.active.increment(1.0);
        Active(meters)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.decrement(1.0);
    }
}

/// Gives every family above its `# HELP` line (once, when the recorder is installed).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "balancer_tcp_connections_accepted_total",
        "Connections accepted by the listener"
    );
    describe_counter!(
        "balancer_tcp_connect_retries_total",
        "Connects to a worker that failed, after which the pick went on to another try"
    );
    describe_counter!(
        "balancer_tcp_io_uring_connections_total",
        "Connections handed from epoll to an io_uring ring once they went back and forth"
    );
    describe_gauge!(
        "balancer_tcp_queued_connections",
        "Connections (and HTTP requests) waiting for a ready worker now"
    );
    describe_histogram!(
        "balancer_tcp_queue_wait_seconds",
        Unit::Seconds,
        "Time queued connections waited for a ready worker"
    );
    describe_counter!(
        "balancer_tcp_queue_timeouts_total",
        "Connections that waited queue_timeout and got no worker"
    );
    describe_counter!(
        "balancer_tcp_worker_connections_total",
        "Connections proxied to the worker"
    );
    describe_gauge!(
        "balancer_tcp_active_connections",
        "Connections open to the worker now"
    );
    describe_counter!(
        "balancer_tcp_bytes_total",
        Unit::Bytes,
        "Bytes proxied, by direction, counted when each connection ends"
    );
    describe_counter!(
        "balancer_http_requests_total",
        "HTTP requests answered, by method and status class"
    );
    describe_histogram!(
        "balancer_http_request_duration_seconds",
        Unit::Seconds,
        "Time from an HTTP request to its response's head"
    );
    describe_counter!(
        "balancer_http_upstream_errors_total",
        "HTTP requests answered 502: the worker failed"
    );
    describe_counter!(
        "balancer_http_no_worker_total",
        "HTTP requests answered 503: no worker was ready"
    );
    describe_counter!(
        "balancer_health_checks_total",
        "Health probes of the worker, by result (pass, fail, skipped: not made here)"
    );
    describe_gauge!(
        "balancer_udp_flows",
        "UDP flows (client addresses) in the table now"
    );
    describe_counter!(
        "balancer_udp_datagrams_total",
        "UDP datagrams relayed, by direction"
    );
    describe_counter!(
        "balancer_udp_bytes_total",
        Unit::Bytes,
        "Bytes of relayed UDP datagrams, by direction"
    );
    describe_counter!(
        "balancer_udp_flow_evictions_total",
        "UDP flows evicted to make room for a new client (max_flows)"
    );
    describe_counter!(
        "balancer_tcp_connect_errors_total",
        "Connects to the worker that were refused or timed out"
    );
}
