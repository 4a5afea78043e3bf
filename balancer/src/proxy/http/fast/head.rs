//! Message heads on the fast path: parsing a client's request head and a worker's response
//! head with `httparse`, deciding whether the fast path may carry the request at all, and
//! writing each head anew for the other side with the same rules as the hyper path
//! (`headers`): hop-by-hop fields stripped, `X-Forwarded-*` and `Forwarded` added.
//!
//! Everything here is a pure function over bytes, so every rule is unit-tested without a socket.
//! Fields are copied through byte for byte, in the order and case the sender wrote them.

use std::mem::MaybeUninit;
use std::net::IpAddr;

use super::framing::Framing;
use crate::proxy::http::headers::{HOP_BY_HOP, push_forwarded_element};

/// Fields a head may have before the fast path leaves it to hyper (hyper's own limit).
const MAX_FIELDS: usize = 100;
/// Request bodies the fast path buffers whole before it picks a worker; a longer one goes to
/// hyper, which streams it.
pub(crate) const MAX_BUFFERED_BODY: u64 = 16 * 1024;

/// What parsing the start of the client's buffer came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// A request the fast path carries; its head for the worker is in the output buffer.
    Fast(RequestHead),
    /// Something the fast path leaves to hyper (which also answers malformed heads): the
    /// reason, for the debug log.
    Hyper(&'static str),
}

/// A request the fast path carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestHead {
    /// Bytes of the head in the client's buffer.
    pub(crate) len: usize,
    /// Bytes of body after it (`Content-Length`, at most [`MAX_BUFFERED_BODY`]).
    pub(crate) body: usize,
    /// The client asked to close after this response (`Connection: close`).
    pub(crate) close: bool,
    pub(crate) method: hyper::Method,
}

/// Parses the request head at the start of `buf` and, if the fast path carries it, writes the
/// head the worker gets into `out` (cleared first) for a client at `client`.
///
/// Left to hyper: anything but HTTP/1.1, a target that is not origin-form, `CONNECT`,
/// `Upgrade`, `Expect`, `Transfer-Encoding`, a `Content-Length` that is not one plain number
/// or is over [`MAX_BUFFERED_BODY`], more than [`MAX_FIELDS`] fields, and malformed heads.
pub(crate) fn parse_request(buf: &[u8], client: IpAddr, out: &mut Vec<u8>) -> Parsed {
    // Uninitialized: no 3 KiB of empty fields written per head.
    let mut fields = [const { MaybeUninit::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::Hyper("too many fields"),
        Err(_) => return Parsed::Hyper("malformed head"),
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Hyper("not HTTP/1.1");
    };
    if !path.starts_with('/') || method == "CONNECT" {
        return Parsed::Hyper("not origin-form");
    }
    // Standard methods (and short extension ones) are not allocated.
    let Ok(method) = hyper::Method::from_bytes(method.as_bytes()) else {
        return Parsed::Hyper("unusual method");
    };
    let fields = &*req.headers;
    let mut body = 0u64;
    let mut lengths = 0;
    for f in fields {
        let name = f.name;
        if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
        {
            return Parsed::Hyper("transfer-encoding, upgrade or expect");
        }
        if name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            match plain_number(f.value) {
                Some(n) if lengths == 1 => body = n,
                _ => return Parsed::Hyper("unusual content-length"),
            }
        }
    }
    if body > MAX_BUFFERED_BODY {
        return Parsed::Hyper("long body");
    }
    let connection = Connection::of(fields);

    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut host = None;
    for f in fields {
        let name = f.name;
        if name.eq_ignore_ascii_case("host") {
            host.get_or_insert(f.value);
        }
        if is_hop_by_hop(name) || connection.names(name) || is_forwarding(name) {
            continue;
        }
        push_field(out, name.as_bytes(), f.value);
    }
    add_forwarded(out, fields, client, host);
    out.extend_from_slice(b"\r\n");
    Parsed::Fast(RequestHead {
        len,
        body: body as usize,
        close: connection.close,
        method,
    })
}

/// A worker's response head, read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ResponseHead {
    /// Bytes of the head in the worker's buffer.
    pub(crate) len: usize,
    pub(crate) status: u16,
    /// How its body ends.
    pub(crate) framing: Framing,
    /// The worker keeps the connection open after this response.
    pub(crate) keep_alive: bool,
}

/// Why a worker's response cannot be passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadResponse {
    /// Not an HTTP/1 response head.
    #[error("malformed response head")]
    Malformed,
    /// Longer than the proxy reads.
    #[error("response head over {0} bytes")]
    TooLarge(usize),
    /// A `Content-Length` that is not one number.
    #[error("bad or conflicting content-length")]
    Length,
}

/// Parses the response head at the start of `buf` (`None`: not complete yet) to a request
/// whose method was `HEAD` if `head`, and writes the head the client gets into `out`: the
/// worker's status and fields without hop-by-hop ones, plus `Connection: close` if `close`
/// (the proxy closes the client connection after it; a body that ends at the worker's close
/// forces it).
pub(crate) fn parse_response(
    buf: &[u8],
    head: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, BadResponse> {
    let mut fields = [const { MaybeUninit::uninit() }; MAX_FIELDS];
    let mut res = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_response_with_uninit_headers(&mut res, buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(BadResponse::Malformed),
    };
    let (Some(version), Some(status)) = (res.version, res.code) else {
        return Err(BadResponse::Malformed);
    };
    let fields = &*res.headers;
    let connection = Connection::of(fields);
    let mut chunked = None;
    let mut length = None;
    for f in fields {
        if f.name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding decides (RFC 9112 §6.3): chunked last, or the body runs to close.
            chunked = Some(last_coding_is_chunked(f.value));
        } else if f.name.eq_ignore_ascii_case("content-length") {
            let n = plain_number(f.value).ok_or(BadResponse::Length)?;
            if length.is_some_and(|l| l != n) {
                return Err(BadResponse::Length);
            }
            length = Some(n);
        }
    }
    let framing = if head || (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) | (None, None) => Framing::UntilClose,
            (None, Some(n)) => Framing::Length(n),
        }
    };
    let keep_alive = version == 1 && !connection.close && framing != Framing::UntilClose;

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa3(status).as_slice());
    out.push(b' ');
    out.extend_from_slice(res.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for f in fields {
        let name = f.name;
        // Framing fields stay: the body goes through as the worker framed it. A length next
        // to a chunked coding is dropped, as chunked wins (RFC 9112 §6.3).
        let framing_field =
            name.eq_ignore_ascii_case("transfer-encoding") || name.eq_ignore_ascii_case("trailer");
        if (!framing_field && is_hop_by_hop(name))
            || connection.names(name)
            || (chunked.is_some() && name.eq_ignore_ascii_case("content-length"))
        {
            continue;
        }
        push_field(out, name.as_bytes(), f.value);
    }
    if (close || framing == Framing::UntilClose) && !(100..200).contains(&status) {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(ResponseHead {
        len,
        status,
        framing,
        keep_alive,
    }))
}

/// A response's status as three digits (httparse allows only 100–999).
fn itoa3(status: u16) -> [u8; 3] {
    let s = status.min(999);
    [
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
    ]
}

/// The options of a head's `Connection` fields (RFC 9110 §7.6.1), read where they stand:
/// no list is built per head.
struct Connection<'h, 'b> {
    close: bool,
    fields: &'h [httparse::Header<'b>],
}

impl<'h, 'b> Connection<'h, 'b> {
    fn of(fields: &'h [httparse::Header<'b>]) -> Self {
        let close = options(fields).any(|o| o.eq_ignore_ascii_case("close"));
        Connection { close, fields }
    }

    /// Whether `name` is one of the fields the `Connection` options name.
    fn names(&self, name: &str) -> bool {
        options(self.fields).any(|o| o.eq_ignore_ascii_case(name))
    }
}

/// Every option of every `Connection` field, trimmed (several fields and comma lists are the
/// same thing on the wire).
fn options<'h, 'b>(fields: &'h [httparse::Header<'b>]) -> impl Iterator<Item = &'b str> + 'h {
    fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("connection"))
        .filter_map(|f| std::str::from_utf8(f.value).ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|o| !o.is_empty())
}

/// Fields about one connection only, never passed on (the hyper path's list).
fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// The fields the proxy writes itself.
fn is_forwarding(name: &str) -> bool {
    [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `X-Forwarded-For` (appended to the client's), `-Proto`, `-Host` (the `Host`, or none) and
/// an RFC 7239 `Forwarded` element appended to the client's, as the hyper path writes them.
fn add_forwarded(
    out: &mut Vec<u8>,
    fields: &[httparse::Header<'_>],
    client: IpAddr,
    host: Option<&[u8]>,
) {
    use std::io::Write;
    let client = client.to_canonical();
    out.extend_from_slice(b"x-forwarded-for: ");
    if push_joined(out, fields, "x-forwarded-for") {
        out.extend_from_slice(b", ");
    }
    let _ = write!(out, "{client}\r\nx-forwarded-proto: http\r\n");
    let host = host.and_then(|h| std::str::from_utf8(h).ok());
    if let Some(host) = host {
        push_field(out, b"x-forwarded-host", host.as_bytes());
    }
    out.extend_from_slice(b"forwarded: ");
    if push_joined(out, fields, "forwarded") {
        out.extend_from_slice(b", ");
    }
    push_forwarded_element(out, client, host);
    out.extend_from_slice(b"\r\n");
}

/// Appends every text value of the `name` fields, comma-joined; whether there was any.
fn push_joined(out: &mut Vec<u8>, fields: &[httparse::Header<'_>], name: &str) -> bool {
    let mut any = false;
    let values = fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case(name))
        .filter_map(|f| std::str::from_utf8(f.value).ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    for v in values {
        if any {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(v.as_bytes());
        any = true;
    }
    any
}

/// A `Content-Length` value: digits only, no sign, no list (RFC 9110 §8.6).
fn plain_number(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

fn last_coding_is_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn request(raw: &str) -> (Parsed, String) {
        let mut out = Vec::new();
        let parsed = parse_request(raw.as_bytes(), LOCAL, &mut out);
        (parsed, String::from_utf8(out).unwrap())
    }

    #[test]
    fn a_plain_get_is_rewritten_with_forwarding_fields_and_no_hop_by_hop_ones() {
        let raw = "GET /a?b=c HTTP/1.1\r\nHost: example.com:8080\r\nConnection: keep-alive, X-Secret\r\n\
                   X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: x\r\n\
                   X-Forwarded-For: 10.0.0.1\r\nx-forwarded-for: 10.0.0.2\r\nX-Forwarded-Host: spoofed\r\n\
                   Forwarded: for=10.0.0.1\r\nAccept: */*\r\n\r\nGET /next";
        let (parsed, out) = request(raw);
        let Parsed::Fast(head) = parsed else {
            panic!("{parsed:?}")
        };
        assert_eq!(head.len, raw.len() - "GET /next".len());
        assert_eq!(
            (head.body, head.close, head.method),
            (0, false, hyper::Method::GET)
        );
        assert_eq!(
            out,
            "GET /a?b=c HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\n\
             x-forwarded-for: 10.0.0.1, 10.0.0.2, 127.0.0.1\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: example.com:8080\r\n\
             forwarded: for=10.0.0.1, for=127.0.0.1;proto=http;host=\"example.com:8080\"\r\n\r\n"
        );
    }

    #[test]
    fn forwarding_fields_quote_ipv6_and_canonicalize_mapped_ipv4() {
        let mut out = Vec::new();
        let raw = b"GET / HTTP/1.1\r\nhost: example.com\r\n\r\n";
        parse_request(raw, "::1".parse().unwrap(), &mut out);
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("x-forwarded-for: ::1\r\n"), "{out}");
        assert!(
            out.contains("forwarded: for=\"[::1]\";proto=http;host=example.com\r\n"),
            "{out}"
        );
        let mut out = Vec::new();
        parse_request(
            b"GET / HTTP/1.1\r\n\r\n",
            "::ffff:192.0.2.7".parse().unwrap(),
            &mut out,
        );
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("x-forwarded-for: 192.0.2.7\r\n"), "{out}");
        assert!(
            out.contains("forwarded: for=192.0.2.7;proto=http\r\n"),
            "{out}"
        );
        assert!(!out.contains("x-forwarded-host"), "{out}");
    }

    #[test]
    fn a_short_body_and_connection_close_are_read() {
        let raw = "POST /p HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
        let (parsed, out) = request(raw);
        assert_eq!(
            parsed,
            Parsed::Fast(RequestHead {
                len: raw.len() - 5,
                body: 5,
                close: true,
                method: hyper::Method::POST
            })
        );
        assert!(out.contains("Content-Length: 5\r\n"), "{out}");
        assert!(!out.to_ascii_lowercase().contains("connection:"), "{out}");
    }

    #[test]
    fn what_the_fast_path_does_not_carry_goes_to_hyper() {
        for raw in [
            "GET / HTTP/1.0\r\n\r\n",
            "GET http://example.com/ HTTP/1.1\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\n\r\n",
            "CONNECT example.com:443 HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 16385\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
            "GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GARBAGE\r\n\r\n",
        ] {
            assert!(matches!(request(raw).0, Parsed::Hyper(_)), "{raw}");
        }
        let many: String = (0..=MAX_FIELDS).map(|i| format!("x-{i}: y\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(request(&raw).0, Parsed::Hyper("too many fields"));
        assert_eq!(request("GET / HTTP/1.1\r\nHost: a").0, Parsed::Partial);
    }

    fn response(raw: &str, head: bool, close: bool) -> (ResponseHead, String) {
        let mut out = Vec::new();
        let parsed = parse_response(raw.as_bytes(), head, close, &mut out)
            .unwrap()
            .unwrap();
        (parsed, String::from_utf8(out).unwrap())
    }

    #[test]
    fn a_response_keeps_its_framing_fields_and_loses_hop_by_hop_ones() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\
                   Content-Length: 99\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n";
        let (head, out) = response(raw, false, false);
        assert_eq!(head.len, raw.len());
        assert_eq!(head.framing, Framing::Chunked);
        assert!(head.keep_alive);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        let (head, out) = response(
            "HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n\r\n",
            false,
            true,
        );
        assert_eq!((head.status, head.framing), (404, Framing::Length(3)));
        assert_eq!(
            out,
            "HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn bodiless_responses_and_close_delimited_ones_are_framed_right() {
        let len = "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n";
        assert_eq!(response(len, true, false).0.framing, Framing::Empty);
        for status in ["204 No Content", "304 Not Modified", "103 Early Hints"] {
            let raw = format!("HTTP/1.1 {status}\r\nContent-Length: 7\r\n\r\n");
            assert_eq!(response(&raw, false, false).0.framing, Framing::Empty);
        }
        let (head, out) = response("HTTP/1.1 200 OK\r\n\r\n", false, false);
        assert_eq!(head.framing, Framing::UntilClose);
        assert!(!head.keep_alive);
        assert!(out.ends_with("connection: close\r\n\r\n"), "{out}");
        let gzip_only = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n";
        assert_eq!(
            response(gzip_only, false, false).0.framing,
            Framing::UntilClose
        );
        let (head, _) = response(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n",
            false,
            false,
        );
        assert!(!head.keep_alive);
        let (head, _) = response("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", false, false);
        assert!(!head.keep_alive);
    }

    #[test]
    fn a_bad_response_head_is_refused() {
        let mut out = Vec::new();
        for (raw, want) in [
            ("HTTP/1.1 OK\r\n\r\n", BadResponse::Malformed),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
                BadResponse::Length,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                BadResponse::Length,
            ),
        ] {
            assert_eq!(
                parse_response(raw.as_bytes(), false, false, &mut out),
                Err(want),
                "{raw}"
            );
        }
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\n", false, false, &mut out),
            Ok(None)
        );
    }
}
