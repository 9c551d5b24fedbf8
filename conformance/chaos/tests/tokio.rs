//! The chaos scenarios on tokio (multi-threaded, 2 workers), including the
//! 1 000-session stress test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

chaos_tests!(
    block_on,
    kitestring_tokio::runtime(),
    chaos_mixed,
    stress_cut_all_1000,
    slow_client_closed,
    slow_client_closed_4009,
    dead_peer_detected,
);
