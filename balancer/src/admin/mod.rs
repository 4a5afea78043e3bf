//! The admin socket: the protocol, the master's server, and the CLI's client.

pub mod client;
pub mod protocol;
pub mod server;
