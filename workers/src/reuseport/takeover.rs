//! Rescuing what is queued on a leaving worker's socket: the master accepts on its duplicate
//! and hands each connection to the data plane's [`Rescue`] hook, which carries it to the
//! public address, where the steering program sends it to a live worker.
//!
//! Steering alone cannot save connections that were already queued (or half-open) when the
//! worker started to leave, nor what a crashed worker never accepted; closing the socket would
//! reset them all.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What the master does with a connection rescued from a leaving worker's socket: carry it to
/// the given target (the public address), where the steering program hands it to a live
/// worker. Copying bytes is the data plane's work, so the control plane only accepts and
/// hands the connection over.
pub type Rescue = Arc<dyn Fn(TcpStream, SocketAddr) + Send + Sync>;

/// While no other worker can take a connection, the takeover looks again this often.
const RETRY: Duration = Duration::from_millis(10);

/// A master accepting what is left on a leaving worker's socket.
#[derive(Debug)]
pub struct Takeover {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Takeover {
    /// Nothing to take over (a UDP socket has no accept queue).
    pub(super) fn none() -> Takeover {
        Takeover {
            stop: CancellationToken::new(),
            task: None,
        }
    }

    /// Starts accepting on `socket` (a duplicate of the leaving one), handing each connection
    /// to `rescue` with `target`, but only while `can_forward` says another worker would get
    /// it: otherwise the steering program would send it straight back here. `name` is for logs.
    pub(super) fn start(
        socket: &OwnedFd,
        name: String,
        target: SocketAddr,
        rescue: Rescue,
        can_forward: impl Fn() -> bool + Send + 'static,
    ) -> Takeover {
        let stop = CancellationToken::new();
        let listener = socket
            .try_clone()
            .map(std::net::TcpListener::from)
            .and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            });
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(listener = %name, "cannot take over a leaving socket: {e}");
                return Takeover { stop, task: None };
            }
        };
        let task = tokio::spawn(take_over(
            listener,
            name,
            target,
            rescue,
            can_forward,
            stop.clone(),
        ));
        Takeover {
            stop,
            task: Some(task),
        }
    }

    /// Stops accepting and waits until the takeover's duplicate of the socket is closed (the
    /// socket only leaves the group when its last duplicate does).
    pub(super) async fn finish(self) {
        self.stop.cancel();
        if let Some(task) = self.task {
            let _ = task.await;
        }
    }
}

/// The accept loop of one takeover; one failed accept never ends it.
async fn take_over(
    listener: tokio::net::TcpListener,
    name: String,
    target: SocketAddr,
    rescue: Rescue,
    can_forward: impl Fn() -> bool,
    stop: CancellationToken,
) {
    loop {
        if !can_forward() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RETRY) => continue,
            }
        }
        let (client, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
        };
        tracing::debug!(listener = %name, "rescuing a connection queued on a leaving worker");
        rescue(client, target);
    }
}
