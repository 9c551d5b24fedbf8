//! The shared end-to-end scenarios on tokio (multi-threaded, 2 workers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

kitestring_scenarios::scenarios!(block_on, kitestring_tokio::runtime());
