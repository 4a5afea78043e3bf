//! Header rewriting between client and worker: hop-by-hop stripping (RFC 9110 §7.6.1),
//! `X-Forwarded-*` and `Forwarded` (RFC 7239), origin-form URIs, and upgrade detection. Pure
//! functions over header maps, so every rule is unit-tested without a socket.

use std::net::IpAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request;
use hyper::{Method, Request, Uri, Version};

// Names hyper has no constant for; statics so that no lookup or allocation happens per request.
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The fields that concern one connection only (RFC 9110 §7.6.1), never passed on; both paths
/// strip them, and those a `Connection` field names.
pub(super) const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether an HTTP/1.1 request asks to switch protocols (WebSocket and friends).
pub(super) fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// The options of every `Connection` header, trimmed. Several headers and comma lists are the
/// same thing on the wire (RFC 9110 §5.3), so both are split.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Makes a client's request one a worker can take: origin-form URI over HTTP/1.1, the Host
/// the client meant, no hop-by-hop headers, and who it came from.
pub(super) fn prepare_request(parts: &mut request::Parts, client: IpAddr, upgrade: bool) {
    if parts.method != Method::CONNECT && parts.uri.authority().is_some() {
        // Absolute-form (HTTP/1) or :authority (HTTP/2): it wins over any Host (RFC 9112 §3.2.2).
        if let Some(authority) = parts.uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, host);
        }
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/"));
    }
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    add_forwarded(&mut parts.headers, client);
}

/// Removes the headers that concern one connection only: those `Connection` names, and the
/// usual ones. With `upgrade`, keeps `Upgrade` and `Connection: upgrade` for the tunnel.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let upgrade_to = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // The body was framed by chunked coding, which wins over any Content-Length (RFC 9112
        // §6.3); hyper frames it anew from the body, and a stale length would desync the worker.
        headers.remove(header::CONTENT_LENGTH);
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if let Some(upgrade_to) = upgrade_to {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade_to);
    }
}

/// Adds `X-Forwarded-For` (appended), `-Proto`, `-Host` and an RFC 7239 `Forwarded` element.
fn add_forwarded(headers: &mut HeaderMap, client: IpAddr) {
    let client = client.to_canonical();
    let host = headers.get(header::HOST).cloned();

    let xff = match joined(headers, &X_FORWARDED_FOR) {
        Some(earlier) => format!("{earlier}, {client}"),
        None => client.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&xff) {
        headers.insert(&X_FORWARDED_FOR, value);
    }
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    match &host {
        Some(host) => headers.insert(&X_FORWARDED_HOST, host.clone()),
        None => headers.remove(&X_FORWARDED_HOST),
    };

    let mut forwarded = joined(headers, &header::FORWARDED)
        .map(|earlier| earlier + ", ")
        .unwrap_or_default()
        .into_bytes();
    let host = host.as_ref().and_then(|h| h.to_str().ok());
    push_forwarded_element(&mut forwarded, client, host);
    if let Ok(value) = HeaderValue::from_bytes(&forwarded) {
        headers.insert(header::FORWARDED, value);
    }
}

/// Every value of `name`, comma-joined, if there is any (values that are not text are skipped).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let first = values.next()?;
    Some(values.fold(first.to_owned(), |mut all, v| {
        all.push_str(", ");
        all.push_str(v);
        all
    }))
}

/// Appends this proxy's RFC 7239 element: `for=` the client (IPv6 bracketed and so quoted,
/// §6), `proto=http`, and `host=` the Host as a token if it is one, else quoted (RFC 9110
/// §5.6.4). Written into bytes, so the fast path's head costs no allocation for it.
pub(super) fn push_forwarded_element(out: &mut Vec<u8>, client: IpAddr, host: Option<&str>) {
    use std::io::Write;
    let _ = match client {
        IpAddr::V4(v4) => write!(out, "for={v4};proto=http"),
        IpAddr::V6(v6) => write!(out, "for=\"[{v6}]\";proto=http"),
    };
    let Some(host) = host else { return };
    out.extend_from_slice(b";host=");
    let is_tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    if !host.is_empty() && host.bytes().all(is_tchar) {
        out.extend_from_slice(host.as_bytes());
        return;
    }
    out.push(b'"');
    for c in host.bytes() {
        if c == b'"' || c == b'\\' {
            out.push(b'\\');
        }
        out.push(c);
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(build: hyper::http::request::Builder) -> request::Parts {
        build.body(()).unwrap().into_parts().0
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let mut p = parts(
            Request::get("/x")
                .header("connection", "keep-alive, X-Secret")
                .header("x-secret", "1")
                .header("keep-alive", "timeout=5")
                .header("te", "trailers")
                .header("transfer-encoding", "chunked")
                .header("content-length", "5")
                .header("upgrade", "websocket")
                .header("proxy-connection", "keep-alive")
                .header("x-kept", "yes"),
        );
        strip_hop_by_hop(&mut p.headers, false);
        let names: Vec<&str> = p.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_connection_upgrade() {
        let req = Request::get("/ws")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .header("keep-alive", "timeout=5")
            .body(())
            .unwrap();
        assert!(wants_upgrade(&req));
        let mut p = req.into_parts().0;
        strip_hop_by_hop(&mut p.headers, true);
        assert_eq!(p.headers["connection"], "upgrade");
        assert_eq!(p.headers["upgrade"], "websocket");
        assert!(!p.headers.contains_key("keep-alive"));
        let plain = Request::get("/").header("upgrade", "h2c").body(()).unwrap();
        assert!(
            !wants_upgrade(&plain),
            "Upgrade without Connection: upgrade"
        );
    }

    #[test]
    fn forwarded_headers_append_and_quote() {
        let mut p = parts(
            Request::get("/")
                .header("host", "example.com:8080")
                .header("x-forwarded-for", "10.0.0.1")
                .header("x-forwarded-for", "10.0.0.2")
                .header("forwarded", "for=10.0.0.1"),
        );
        prepare_request(&mut p, "127.0.0.1".parse().unwrap(), false);
        assert_eq!(
            p.headers["x-forwarded-for"],
            "10.0.0.1, 10.0.0.2, 127.0.0.1"
        );
        assert_eq!(p.headers["x-forwarded-proto"], "http");
        assert_eq!(p.headers["x-forwarded-host"], "example.com:8080");
        assert_eq!(
            p.headers["forwarded"],
            "for=10.0.0.1, for=127.0.0.1;proto=http;host=\"example.com:8080\""
        );

        let mut p = parts(Request::get("/").header("host", "example.com"));
        prepare_request(&mut p, "::1".parse().unwrap(), false);
        assert_eq!(p.headers["x-forwarded-for"], "::1");
        assert_eq!(
            p.headers["forwarded"],
            "for=\"[::1]\";proto=http;host=example.com"
        );

        // An IPv4 client seen through an IPv6 socket is reported as IPv4.
        let mut p = parts(Request::get("/").header("x-forwarded-host", "spoofed"));
        prepare_request(&mut p, "::ffff:192.0.2.7".parse().unwrap(), false);
        assert_eq!(p.headers["x-forwarded-for"], "192.0.2.7");
        assert_eq!(p.headers["forwarded"], "for=192.0.2.7;proto=http");
        assert!(!p.headers.contains_key("x-forwarded-host"));
    }

    #[test]
    fn absolute_form_becomes_origin_form_with_its_host() {
        let mut p = parts(
            Request::get("http://example.org:81/a/b?c=d")
                .version(Version::HTTP_2)
                .header("host", "other"),
        );
        prepare_request(&mut p, "127.0.0.1".parse().unwrap(), false);
        assert_eq!(p.uri, "/a/b?c=d");
        assert_eq!(p.version, Version::HTTP_11);
        assert_eq!(p.headers["host"], "example.org:81");
    }
}
