//! The `udp://` listener path against a direct socket, in the same run.
//!
//! A tokio UDP socket that echoes every datagram stands in for a worker. The client is one
//! blocking socket, so all its datagrams belong to one flow: `datagram_roundtrip` is a 64-byte
//! datagram out and its echo back, `balancer_udp` through the binary's dispatcher, flow table
//! and relay (the flow is made on the first datagram, before measuring, so this is the
//! established-flow path); `new_flow` is a fresh client socket per datagram, i.e. the flow
//! set-up path (pick a worker, open the flow's socket, relay task).
//!
//! `cargo bench --bench udp_proxy` prints each ratio to `direct` at the end.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use balancer_config::Proto;
use criterion::{BenchmarkId, Criterion};

mod support;

/// The stand-in worker: sends every datagram back where it came from.
async fn serve_echo(socket: tokio::net::UdpSocket) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let _ = socket.send_to(&buf[..n], from).await;
    }
}

/// A client socket on loopback, connected to `addr`, that gives up on a lost datagram after a
/// second instead of hanging the bench (loopback does not lose them unless buffers overflow).
fn client(addr: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind a client socket");
    s.connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("read timeout");
    s
}

fn roundtrip(s: &UdpSocket, out: &[u8], back: &mut [u8]) {
    s.send(out).expect("send");
    let n = s.recv(back).expect("the echo");
    assert_eq!(n, out.len());
}

fn benches(c: &mut Criterion, targets: &[(&'static str, SocketAddr)]) {
    let out = [7u8; 64];
    let mut group = c.benchmark_group("datagram_roundtrip");
    for &(name, addr) in targets {
        let s = client(addr);
        let mut back = [0u8; 2048];
        roundtrip(&s, &out, &mut back); // the flow exists before measuring
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| roundtrip(&s, &out, &mut back))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("udp_new_flow");
    for &(name, addr) in targets {
        let mut back = [0u8; 2048];
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| roundtrip(&client(addr), &out, &mut back))
        });
    }
    group.finish();
}

fn main() {
    support::direct_and_proxied(
        Proto::Udp,
        "balancer_udp",
        &["datagram_roundtrip", "udp_new_flow"],
        || async {
            let worker = tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind the worker");
            let direct = worker.local_addr().expect("addr");
            tokio::spawn(serve_echo(worker));
            direct
        },
        benches,
    );
}
