//! End-to-end tests: the real `balancer` binary, real Node and Python workers, real sockets on
//! loopback. Every test picks free ports, bounds its waits, and kills what it started.

mod balance;
mod cli;
mod config_errors;
mod deploy;
mod hardening;
mod http;
mod lifecycle;
mod metrics;
mod observe;
mod operate;
mod reuseport;
mod soak;
mod support;
mod tcp;
mod triggers;
mod udp;
