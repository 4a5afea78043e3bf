//! End-to-end tests: the real `balancer` binary, real Node and Python workers, real sockets on
//! loopback. Every test picks free ports, bounds its waits, and kills what it started.

mod balance;
mod capture;
mod cli;
mod config_errors;
mod deploy;
mod hardening;
mod http;
mod http_wire;
mod io_paths;
mod lifecycle;
mod logs;
mod metrics;
mod monit;
mod observe;
mod operate;
mod reuseport;
mod soak;
mod support;
mod tcp;
mod triggers;
mod udp;
mod upgrade;
