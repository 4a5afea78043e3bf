//! Public listeners owned by the master.

pub mod tcp;
