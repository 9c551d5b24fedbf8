//! Chaos end-to-end tests for Kitestring; this crate has no library code.
//!
//! The tests live in `tests/`: the scenarios are written once in
//! `tests/common/mod.rs`, generic over [`kitestring::Runtime`], and
//! instantiated per runtime in `tests/tokio.rs`, `tests/async_std.rs` and
//! `tests/smol.rs`. They drive the same harness as the `kitestring-demo`
//! binary: a server, the `kitestring-chaos` proxy and many clients.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
