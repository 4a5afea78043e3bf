//! UDP flow proxying (being written).
