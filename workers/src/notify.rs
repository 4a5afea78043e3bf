//! `ready = "notify"`: each worker incarnation gets its own `$NOTIFY_SOCKET`, a unix datagram
//! socket in `$BALANCER_HOME/notify/` (private, as the home is), and is ready only once a
//! datagram holding the line `READY=1` arrives there, as systemd's `Type=notify` reads it.
//! `STATUS=` lines are logged; other sd_notify lines are accepted and have no effect.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::UnixDatagram;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Datagrams longer than this are cut; sd_notify messages are a few short lines.
const MAX_MESSAGE: usize = 4096;

/// Makes each incarnation's socket name unique: a reload's replacement keeps the old worker's
/// id while the old one still runs.
static INCARNATION: AtomicU64 = AtomicU64::new(0);

/// One worker incarnation's notify socket; removed when dropped.
#[derive(Debug)]
pub(crate) struct NotifySocket {
    path: PathBuf,
    ready: watch::Receiver<bool>,
    reader: JoinHandle<()>,
}

impl NotifySocket {
    /// Binds a fresh socket in `dir` for worker `id` of `app`.
    pub(crate) fn bind(dir: &Path, app: &str, id: u32) -> io::Result<NotifySocket> {
        std::fs::create_dir_all(dir)?;
        let n = INCARNATION.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{id}-{n}.sock"));
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot bind NOTIFY_SOCKET {}: {e}", path.display()),
            )
        })?;
        let (tx, ready) = watch::channel(false);
        let app = app.to_owned();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_MESSAGE];
            while let Ok(n) = socket.recv(&mut buf).await {
                let text = String::from_utf8_lossy(&buf[..n]);
                for line in text.lines() {
                    if line == "READY=1" {
                        tx.send_replace(true);
                    } else if let Some(status) = line.strip_prefix("STATUS=") {
                        tracing::debug!(app = %app, id, "worker status: {status}");
                    }
                }
            }
        });
        Ok(NotifySocket {
            path,
            ready,
            reader,
        })
    }

    /// The value of the worker's `$NOTIFY_SOCKET`.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Becomes `true` once the worker has sent `READY=1`.
    pub(crate) fn ready(&self) -> watch::Receiver<bool> {
        self.ready.clone()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.reader.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_comes_with_the_ready_line_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = NotifySocket::bind(dir.path(), "web", 7).expect("bind");
        let mut ready = socket.ready();
        let client = std::os::unix::net::UnixDatagram::unbound().expect("client");
        client
            .send_to(b"STATUS=warming up\nREADY=0", socket.path())
            .expect("send");
        client
            .send_to(b"STATUS=up\nREADY=1\n", socket.path())
            .expect("send");
        tokio::time::timeout(std::time::Duration::from_secs(10), ready.wait_for(|r| *r))
            .await
            .expect("READY=1 seen in time")
            .expect("reader alive");
        let path = socket.path().to_path_buf();
        drop(socket);
        assert!(!path.exists(), "the socket file is removed with it");
    }
}
