//! Kitestring core (crate docs are written with the client machine).
#![forbid(unsafe_code)]

pub mod time;

pub use time::Instant;
