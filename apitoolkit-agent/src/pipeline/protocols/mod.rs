//! Protocol reassembly: each protocol turns one connection's byte streams into exchanges.

pub mod content;
pub mod http1;
