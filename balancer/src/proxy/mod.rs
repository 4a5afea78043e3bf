//! Proxies: moving a client's bytes to the worker the policy picked.

pub mod tcp;
