//! Scheduling policies: which ready worker gets the next connection.

pub mod round_robin;
