//! The chaos scenarios on smol (tasks on smol's global executor).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

chaos_tests!(
    smol::block_on,
    kitestring_smol::runtime(),
    chaos_mixed,
    stress_cut_all_1000,
    slow_client_closed,
    slow_client_closed_4009,
    dead_peer_detected,
);
