//! End-to-end tests: the real `balancer` binary, real Node and Python workers, real sockets on
//! loopback. Every test picks free ports, bounds its waits, and kills what it started.

mod balance;
mod config_errors;
mod http;
mod lifecycle;
mod operate;
mod reuseport;
mod support;
mod tcp;
mod udp;
