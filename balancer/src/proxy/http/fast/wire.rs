//! How a fast-path connection moves its bytes: on the runtime's epoll (tokio's `TcpStream`),
//! or, once it has shown itself a keep-alive client, through an io_uring ring
//! ([`uring::driver::Stream`](crate::proxy::uring::driver::Stream)). The connection loop is
//! the same code over either; so are the worker connections it opens and keeps, each kind in
//! its own idle pool.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::super::HttpProxy;
use super::super::upstream::{ConnectError, IdlePool, Kept, open};
use super::window::Window;
use crate::proxy::uring::driver;

/// A connected socket the fast path reads and writes.
pub(super) trait Wire: Sized {
    /// The idle form of a worker connection of this kind, in [`Wire::pool`].
    type Idle: Kept + Send + 'static;

    /// Waits for bytes, holding no buffer, then reads some into `window`, which grows to
    /// `limit` at most and must have room (`window.len() < limit`). `Ok(0)` is the EOF; a
    /// readiness that held nothing is `WouldBlock`.
    async fn fill(&mut self, window: &mut Window, limit: usize) -> io::Result<usize>;

    /// Writes `parts` whole, in order.
    async fn send(&mut self, parts: &[&[u8]]) -> io::Result<()>;

    /// Sends the FIN (shuts the write side down).
    async fn finish(&mut self);

    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// Opens a connection to a worker (`upstream::open`), in this kind.
    async fn open(
        addr: SocketAddr,
        connect_timeout: Duration,
        header: Option<&[u8]>,
    ) -> Result<Self, ConnectError>;

    /// The proxy's idle worker connections of this kind.
    fn pool(proxy: &HttpProxy) -> &IdlePool<Self::Idle>;

    /// A worker connection to keep, if it can be kept.
    fn into_idle(self) -> Option<Self::Idle>;

    fn from_idle(idle: Self::Idle) -> io::Result<Self>;
}

impl Wire for TcpStream {
    type Idle = TcpStream;

    async fn fill(&mut self, window: &mut Window, limit: usize) -> io::Result<usize> {
        self.readable().await?;
        let room = window.spare(limit).expect("a window with room");
        // A short read clears the readiness it saw: no read that only says EAGAIN later.
        let read = crate::proxy::copy::read_some(self, room).map(|(n, _)| n);
        filled(window, read)
    }

    async fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        match parts {
            [a, b] if !b.is_empty() => write_two(self, a, b).await,
            _ => {
                for part in parts {
                    self.write_all(part).await?;
                }
                Ok(())
            }
        }
    }

    async fn finish(&mut self) {
        let _ = self.shutdown().await;
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpStream::local_addr(self)
    }

    async fn open(
        addr: SocketAddr,
        connect_timeout: Duration,
        header: Option<&[u8]>,
    ) -> Result<Self, ConnectError> {
        open(addr, connect_timeout, header).await
    }

    fn pool(proxy: &HttpProxy) -> &IdlePool<TcpStream> {
        &proxy.raw
    }

    fn into_idle(self) -> Option<TcpStream> {
        Some(self)
    }

    fn from_idle(idle: TcpStream) -> io::Result<Self> {
        Ok(idle)
    }
}

/// Counts a read of `read` bytes into the room `window` gave; a window left empty (an EOF, an
/// error, a readiness that held nothing) gives its buffer back.
fn filled(window: &mut Window, read: io::Result<usize>) -> io::Result<usize> {
    if let Ok(n) = read {
        window.filled(n);
    }
    if window.is_empty() {
        window.clear();
    }
    read
}

/// Writes `a` then `b`, in one `writev` when the socket takes it.
async fn write_two(stream: &mut TcpStream, mut a: &[u8], b: &[u8]) -> io::Result<()> {
    let mut b = b;
    while !a.is_empty() {
        let n = stream
            .write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n >= a.len() {
            b = &b[n - a.len()..];
            a = &[];
        } else {
            a = &a[n..];
        }
    }
    stream.write_all(b).await
}

impl Wire for driver::Stream {
    /// Kept blocking, as the ring wants it, and out of any epoll.
    type Idle = std::net::TcpStream;

    async fn fill(&mut self, window: &mut Window, limit: usize) -> io::Result<usize> {
        let read = self
            .recv(|| window.spare(limit).expect("a window with room"))
            .await;
        filled(window, read)
    }

    async fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        driver::Stream::send(self, parts).await
    }

    async fn finish(&mut self) {
        let _ = self.shutdown(Shutdown::Write);
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket().local_addr()
    }

    async fn open(
        addr: SocketAddr,
        connect_timeout: Duration,
        header: Option<&[u8]>,
    ) -> Result<Self, ConnectError> {
        // Connected on this thread's runtime, then out of its epoll and onto the ring.
        let stream = open(addr, connect_timeout, header).await?;
        stream
            .into_std()
            .and_then(driver::Stream::new)
            .map_err(ConnectError::Connect)
    }

    fn pool(proxy: &HttpProxy) -> &IdlePool<std::net::TcpStream> {
        &proxy.raw_ring
    }

    fn into_idle(self) -> Option<std::net::TcpStream> {
        self.into_idle()
    }

    fn from_idle(idle: std::net::TcpStream) -> io::Result<Self> {
        Ok(driver::Stream::kept(idle))
    }
}
