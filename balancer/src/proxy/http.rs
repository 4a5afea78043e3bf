//! HTTP proxying (being written).
