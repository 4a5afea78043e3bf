//! balancer: PM2's cluster mode for servers in any language.
//!
//! A master process forks N workers per app on private loopback ports, owns the public
//! listeners, and spreads connections over the ready workers. This crate is the data plane and
//! the CLI; `balancer-workers` is the control plane and `balancer-config` the configuration.

pub mod admin;
pub mod cli;
pub mod commands;
pub mod daemon;
pub mod home;
pub mod listener;
pub mod master;
pub mod policy;
pub mod proxy;
pub mod ui;
