//! The PROXY protocol (HAProxy's, v1 text and v2 binary): sending the client's real address to
//! a worker before any client byte (`proxy_protocol`), and reading it from a load balancer in
//! front (`accept_proxy`). Encoding and parsing are the `proxy-header` crate's; this module
//! owns reading a header off a socket without taking one byte of what follows it, within a
//! deadline and a size bound.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use balancer_config::ProxyVersion;
use proxy_header::{ParseConfig, ProxiedAddress, ProxyHeader};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

/// The largest header accepted from a client. A v1 header is at most 107 bytes; v2 may carry
/// TLVs (AWS, Azure and GCP add a few dozen bytes), never kilobytes in practice.
pub const MAX_HEADER: usize = 4096;

/// The client's connection as the front load balancer saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The real client.
    pub source: SocketAddr,
    /// The address the client connected to (the front load balancer's).
    pub destination: SocketAddr,
}

/// Why a client's PROXY header was refused; the connection is closed, no worker sees it.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The header did not arrive whole within the deadline (`connect_timeout`).
    #[error("no complete PROXY header within {0:?}")]
    Slow(Duration),
    /// The bytes are not a PROXY header.
    #[error("malformed PROXY header: {0}")]
    Malformed(#[source] proxy_header::Error),
    /// Longer than [`MAX_HEADER`].
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    Oversized,
    /// The client hung up before the header ended.
    #[error("client closed the connection inside the PROXY header")]
    Closed,
    /// Reading failed.
    #[error("reading the PROXY header failed")]
    Io(#[source] io::Error),
}

/// What a buffer's first bytes are.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header of `len` bytes; `None` for v2 LOCAL / v1 UNKNOWN (health checks of the
    /// load balancer itself: the connection's own addresses stand).
    Header(Option<Addresses>, usize),
    /// A header's beginning: read more.
    Partial,
}

/// Parses the header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let config = ParseConfig {
        include_tlvs: false,
        allow_v1: true,
        allow_v2: true,
    };
    match ProxyHeader::parse(buf, config) {
        Ok((header, len)) => Ok(Parsed::Header(
            header.proxied_address().map(|a| Addresses {
                source: a.source,
                destination: a.destination,
            }),
            len,
        )),
        Err(proxy_header::Error::BufferTooShort) if buf.len() < MAX_HEADER => Ok(Parsed::Partial),
        Err(proxy_header::Error::BufferTooShort) => Err(HeaderError::Oversized),
        Err(e) => Err(HeaderError::Malformed(e)),
    }
}

/// Reads the PROXY header a client starts with, leaving every byte after it in the socket.
///
/// Bytes are peeked, not read, until a whole header is in view; then exactly the header is
/// consumed. Bytes peeked while the header is still partial are all header, so they are
/// consumed too and the next peek waits for new data (no spinning on the same bytes).
pub async fn read_header(
    stream: &mut TcpStream,
    within: Duration,
) -> Result<Option<Addresses>, HeaderError> {
    timeout(within, read_header_inner(stream))
        .await
        .map_err(|_| HeaderError::Slow(within))?
}

async fn read_header_inner(stream: &mut TcpStream) -> Result<Option<Addresses>, HeaderError> {
    let mut header = Vec::with_capacity(128);
    let mut view = vec![0u8; MAX_HEADER];
    loop {
        let room = MAX_HEADER - header.len();
        let n = stream
            .peek(&mut view[..room])
            .await
            .map_err(HeaderError::Io)?;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        let seen = header.len();
        header.extend_from_slice(&view[..n]);
        match parse(&header)? {
            Parsed::Header(addrs, len) => {
                consume(stream, len - seen).await?;
                return Ok(addrs);
            }
            Parsed::Partial if header.len() >= MAX_HEADER => return Err(HeaderError::Oversized),
            Parsed::Partial => consume(stream, n).await?,
        }
    }
}

async fn consume(stream: &mut TcpStream, n: usize) -> Result<(), HeaderError> {
    let mut sink = [0u8; 512];
    let mut left = n;
    while left > 0 {
        let k = left.min(sink.len());
        stream
            .read_exact(&mut sink[..k])
            .await
            .map_err(HeaderError::Io)?;
        left -= k;
    }
    Ok(())
}

/// The header telling a worker that `source` connected to `destination`. Mixed families (a
/// v4 client on a v6 listener's mapped address) are written as v6, which both versions allow.
pub fn encode(version: ProxyVersion, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = match (source.ip(), destination.ip()) {
        (IpAddr::V4(_), IpAddr::V6(_)) => (to_v6(source), destination),
        (IpAddr::V6(_), IpAddr::V4(_)) => (source, to_v6(destination)),
        _ => (source, destination),
    };
    let header = ProxyHeader::with_address(ProxiedAddress::stream(source, destination));
    let mut buf = Vec::with_capacity(64);
    let written = match version {
        ProxyVersion::V1 => header.encode_v1(&mut buf),
        ProxyVersion::V2 => header.encode_v2(&mut buf),
    };
    // Both only fail on mixed families (made equal above) or TLVs in v1 (none here).
    debug_assert!(written.is_ok(), "{written:?}");
    buf
}

fn to_v6(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port()),
        IpAddr::V6(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    fn any_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
        ]
    }

    fn same(a: SocketAddr, b: SocketAddr) -> bool {
        to_v6(a) == to_v6(b)
    }

    proptest! {
        /// What we send parses back to the same addresses, as long as it is, whatever follows.
        #[test]
        fn encode_then_parse_round_trips(
            source in any_addr(),
            destination in any_addr(),
            v2 in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let version = if v2 { ProxyVersion::V2 } else { ProxyVersion::V1 };
            let mut bytes = encode(version, source, destination);
            let len = bytes.len();
            bytes.extend_from_slice(&tail);
            match parse(&bytes).unwrap() {
                Parsed::Header(Some(a), n) => {
                    prop_assert_eq!(n, len);
                    prop_assert!(same(a.source, source) && same(a.destination, destination));
                }
                other => prop_assert!(false, "{:?}", other),
            }
            // Every strict prefix is partial, never a wrong header.
            for cut in 0..len {
                prop_assert_eq!(parse(&bytes[..cut]).unwrap(), Parsed::Partial);
            }
        }

        /// Random bytes never panic the parser, and what it accepts starts with a signature.
        #[test]
        fn garbage_is_refused_or_partial(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Parsed::Header(_, n)) = parse(&bytes) {
                prop_assert!(n <= bytes.len());
                prop_assert!(bytes.starts_with(b"PROXY ") || bytes.starts_with(b"\r\n\r\n\0\r\nQUIT\n"));
            }
        }
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn a_dribbled_header_is_read_exactly_and_the_payload_stays() {
        let (mut client, mut server) = pair().await;
        let source: SocketAddr = "203.0.113.7:4242".parse().unwrap();
        let destination: SocketAddr = "198.51.100.1:443".parse().unwrap();
        let header = encode(ProxyVersion::V1, source, destination);
        let writer = tokio::spawn(async move {
            for chunk in header.chunks(5) {
                client.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client.write_all(b"hello").await.unwrap();
            client
        });
        let got = read_header(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            got,
            Some(Addresses {
                source,
                destination
            })
        );
        let mut rest = [0u8; 5];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"hello");
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn garbage_slow_and_oversized_headers_are_refused() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let e = read_header(&mut server, Duration::from_secs(5)).await;
        assert!(matches!(e, Err(HeaderError::Malformed(_))), "{e:?}");

        let (mut client, mut server) = pair().await;
        client.write_all(b"PROXY TCP4 1.2.3.4").await.unwrap();
        let e = read_header(&mut server, Duration::from_millis(100)).await;
        assert!(matches!(e, Err(HeaderError::Slow(_))), "{e:?}");

        let (mut client, mut server) = pair().await;
        let mut big = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec();
        big.resize(MAX_HEADER + 10, 0);
        client.write_all(&big).await.unwrap();
        let e = read_header(&mut server, Duration::from_secs(5)).await;
        assert!(matches!(e, Err(HeaderError::Oversized)), "{e:?}");
    }
}
