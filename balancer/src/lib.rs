//! balancer: PM2's cluster mode for servers in any language.
//!
//! A master process forks N workers per app on private loopback ports, owns the public
//! listeners, and spreads connections over the ready workers. This crate is the data plane
//! (`listener`, `policy`, `proxy`), the running master (`master`) and the CLI (`cli`, `ctl`,
//! `ui`, and the `monit` dashboard), which speak `protocol` over the admin socket; `balancer-workers` is the control plane
//! and `balancer-config` the configuration.

pub mod cli;
pub mod ctl;
pub mod home;
pub mod listener;
pub mod master;
pub mod monit;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod ui;
