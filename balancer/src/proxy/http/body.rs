//! The response body the client gets: a worker's body streamed through, which holds the
//! request's [`Lease`] until its last frame (so the worker's live count and the keep-alive
//! connection are released exactly when the response is done), or a short body of our own.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::Full;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};

use super::upstream::Lease;

/// The body of a proxied response: the worker's body streamed through, holding the worker's
/// lease until it ends, or a short body the proxy made.
#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
    lease: Option<Lease>,
}

/// Where the bytes come from. One enum rather than a boxed body: no allocation per response.
#[derive(Debug)]
enum Kind {
    /// The worker's response body, frame by frame as hyper reads it.
    Upstream(Incoming),
    /// A 502/503 text, or the empty body of a 101 (the tunnel carries the rest).
    Local(Full<Bytes>),
}

impl ProxyBody {
    /// The worker's body; `lease` is released when it ends (or is dropped).
    pub(super) fn upstream(body: Incoming, lease: Lease) -> Self {
        ProxyBody {
            kind: Kind::Upstream(body),
            lease: Some(lease),
        }
    }

    /// A short answer of the proxy's own.
    pub(super) fn text(text: &'static str) -> Self {
        ProxyBody {
            kind: Kind::Local(Full::new(Bytes::from_static(text.as_bytes()))),
            lease: None,
        }
    }

    /// No body at all.
    pub(super) fn empty() -> Self {
        ProxyBody {
            kind: Kind::Local(Full::default()),
            lease: None,
        }
    }
}

/// Streams the worker's frames through untouched. The last frame releases the lease with the
/// connection reusable; an error releases it without (the connection is broken), so the
/// worker's count drops as soon as the response is over, not when hyper drops the body.
impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Upstream(body) => {
                let polled = Pin::new(body).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => {
                        if let Some(lease) = this.lease.take() {
                            lease.release(true);
                        }
                    }
                    Poll::Ready(Some(Err(_))) => {
                        this.lease.take();
                    }
                    _ => {}
                }
                polled
            }
            Kind::Local(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream(body) => body.is_end_stream(),
            Kind::Local(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream(body) => body.size_hint(),
            Kind::Local(body) => body.size_hint(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // Dropped before its end (the client went away): the worker connection is mid-response
        // and cannot be reused. Dropped at its end without a poll (an empty body): it can.
        if let Some(lease) = self.lease.take() {
            let done = match &self.kind {
                Kind::Upstream(body) => body.is_end_stream(),
                Kind::Local(_) => true,
            };
            lease.release(done);
        }
    }
}
