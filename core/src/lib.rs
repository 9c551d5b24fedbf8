//! Kitestring core (crate docs are written with the client machine).
#![forbid(unsafe_code)]

pub mod time;

pub use time::Instant;

// Conflict-free shared state and per-connection flow control.
pub mod coalesce;
pub mod hlc;
pub mod lww;
pub mod ratelimit;

pub use coalesce::Coalescer;
pub use hlc::{Hlc, HlcTimestamp};
pub use lww::{LwwMap, LwwUpdate};
pub use ratelimit::{RateLimitConfig, RateLimiter};
