//! The `http://` listener path against a direct connection, in the same run.
//!
//! A hyper HTTP/1.1 server stands in for a worker (a real socket and a real HTTP stack, not a
//! mock), answering every request with a 64-byte body. The client is a plain blocking socket
//! writing a fixed request and reading the response by its `Content-Length`, so the client's
//! own cost is the same small constant on both paths. Two shapes, as in the peers harness:
//! `keepalive` (many requests on one client connection) and `new_connection` (a connection per
//! request, `Connection: close`). `balancer_http` is the binary's HTTP listener and proxy, with
//! its pool of keep-alive connections to the worker.
//!
//! `cargo bench --bench http_proxy` prints each ratio to `direct` at the end.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use balancer_config::Proto;
use criterion::{BenchmarkId, Criterion};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response};

mod support;

/// The body every response carries.
const BODY: &[u8; 64] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// The stand-in worker: one hyper HTTP/1.1 connection task per accepted connection.
async fn serve_http(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(|_req: Request<hyper::body::Incoming>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(BODY))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Writes `request` and reads one whole response; returns its body length.
fn exchange(stream: &mut TcpStream, request: &[u8], buf: &mut Vec<u8>) -> usize {
    stream.write_all(request).expect("write the request");
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).expect("read the response");
        assert!(n > 0, "connection closed before a whole response");
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let length = content_length(&buf[..end]).expect("a Content-Length");
        if buf.len() >= end + 4 + length {
            return length;
        }
    }
}

/// The `Content-Length` of a response head.
fn content_length(head: &[u8]) -> Option<usize> {
    let head = std::str::from_utf8(head).ok()?;
    head.split("\r\n").find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s
}

fn benches(c: &mut Criterion, targets: &[(&'static str, SocketAddr)]) {
    let keepalive = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench\r\n\r\n";
    let close = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench\r\nConnection: close\r\n\r\n";

    let mut group = c.benchmark_group("http_keepalive");
    for &(name, addr) in targets {
        let mut stream = connect(addr);
        let mut buf = Vec::with_capacity(1024);
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| assert_eq!(exchange(&mut stream, keepalive, &mut buf), BODY.len()))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("http_new_connection");
    for &(name, addr) in targets {
        let mut buf = Vec::with_capacity(1024);
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                let mut stream = connect(addr);
                assert_eq!(exchange(&mut stream, close, &mut buf), BODY.len());
            })
        });
    }
    group.finish();
}

fn main() {
    support::direct_and_proxied(
        Proto::Http,
        "balancer_http",
        &["http_keepalive", "http_new_connection"],
        || async {
            let worker = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind the worker");
            let direct = worker.local_addr().expect("addr");
            tokio::spawn(serve_http(worker));
            direct
        },
        benches,
    );
}
