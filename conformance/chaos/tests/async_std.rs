//! The chaos scenarios on async-std.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

chaos_tests!(
    async_std::task::block_on,
    kitestring_async_std::runtime(),
    chaos_mixed,
    stress_cut_all_1000,
    slow_client_closed,
    slow_client_closed_4009,
    dead_peer_detected,
);
