//! Datagrams held while no worker is ready: the UDP counterpart of a TCP connection waiting in
//! the backlog. The queue lives in [`Flows`] (the dispatcher owns it, no lock); this module holds
//! the limits and the dispatcher's methods that fill, flush and expire it.

use std::collections::VecDeque;
use std::net::SocketAddr;

use tokio::time::Instant;

use super::{Flows, WARN_EVERY};

/// Datagrams held per flow while no worker is ready.
pub const HOLD_PER_FLOW: usize = 4;
/// Datagrams held in all while no worker is ready.
pub const HOLD_MAX: usize = 1024;
/// Bytes held in all while no worker is ready.
pub const HOLD_BYTES: usize = 1 << 20;

/// A datagram held for a flow that waits for a ready worker.
#[derive(Debug)]
pub(super) struct Held {
    /// When it arrived: it is dropped `queue_timeout` later.
    pub(super) at: Instant,
    pub(super) client: SocketAddr,
    /// The flow's table id: a datagram outlives an evicted flow and must not go to its successor.
    pub(super) flow: u64,
    pub(super) data: Box<[u8]>,
}

/// The hold queue's half of the dispatcher. A second `impl` block rather than a queue type of
/// its own: flushing binds flows and sends on them, which is the dispatcher's state, and a
/// separate type would have to borrow all of it back.
impl Flows {
    /// Holds a datagram for a flow waiting for a worker, within the limits.
    pub(super) fn hold(&mut self, client: SocketAddr, data: &[u8], now: Instant) {
        let timeout = self.route.settings().queue_timeout;
        let fits = !timeout.is_zero()
            && self.held.len() < HOLD_MAX
            && self.held_bytes + data.len() <= HOLD_BYTES;
        match self.table.get_mut(&client) {
            Some(flow) if fits && flow.held < HOLD_PER_FLOW => {
                flow.held += 1;
                self.held_bytes += data.len();
                self.held.push_back(Held {
                    at: now,
                    client,
                    flow: flow.id,
                    data: data.into(),
                });
                self.stats.held += 1;
            }
            _ => self.drop_unroutable(now, 1),
        }
    }

    /// Counts datagrams dropped for want of a worker; warns at most every [`WARN_EVERY`].
    fn drop_unroutable(&mut self, now: Instant, count: u64) {
        self.stats.dropped += count;
        self.dropped_since_warning += count;
        if self.warned_at.is_none_or(|at| now >= at + WARN_EVERY) {
            tracing::warn!(
                app = %self.route.app,
                dropped = self.dropped_since_warning,
                "udp datagrams dropped for want of a ready worker (held up to queue_timeout {:?})",
                self.route.settings().queue_timeout
            );
            self.warned_at = Some(now);
            self.dropped_since_warning = 0;
        }
    }

    /// Sends held datagrams, in arrival order, to the workers now ready; keeps the rest.
    pub(super) fn flush(&mut self, now: Instant) {
        let timeout = self.route.settings().queue_timeout;
        let mut keep = VecDeque::new();
        let mut expired = 0;
        let mut no_worker = false;
        for held in std::mem::take(&mut self.held) {
            let flow = match self.table.get_mut(&held.client) {
                Some(flow) if flow.id == held.flow => flow,
                // Its flow was evicted or expired meanwhile.
                _ => {
                    self.held_bytes -= held.data.len();
                    expired += 1;
                    continue;
                }
            };
            if held.at + timeout <= now {
                flow.held -= 1;
                self.held_bytes -= held.data.len();
                expired += 1;
                continue;
            }
            let bound = flow.upstream.is_some() || (!no_worker && self.bind(held.client, None));
            if !bound {
                no_worker = true;
                keep.push_back(held);
                continue;
            }
            if let Some(flow) = self.table.get_mut(&held.client) {
                flow.held -= 1;
            }
            self.held_bytes -= held.data.len();
            self.send(held.client, &held.data);
        }
        self.held = keep;
        if expired > 0 {
            self.drop_unroutable(now, expired);
        }
    }

    /// The pool changed: a worker may be ready for the held datagrams.
    pub fn pool_changed(&mut self) {
        if !self.held.is_empty() && !self.stopping {
            self.flush(Instant::now());
        }
    }

    /// Drops held datagrams past `queue_timeout` (the oldest are at the front).
    pub(super) fn expire_held(&mut self, now: Instant) {
        let timeout = self.route.settings().queue_timeout;
        let mut expired = 0;
        while self.held.front().is_some_and(|h| h.at + timeout <= now) {
            let Some(held) = self.held.pop_front() else {
                break;
            };
            self.held_bytes -= held.data.len();
            if let Some(flow) = self.table.get_mut(&held.client)
                && flow.id == held.flow
            {
                flow.held -= 1;
            }
            expired += 1;
        }
        if expired > 0 {
            self.drop_unroutable(now, expired);
        }
    }
}
