//! Kitestring on an application's own smol executor ([`runtime_on`]), run
//! by two threads: tasks go there, and a selection of the shared scenarios
//! holds on it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, LazyLock};

use kitestring_smol::{runtime_on, Runtime};
use smol::Executor;

/// Threads running [`EXECUTOR`] are named with this.
const THREAD: &str = "app-executor";

static EXECUTOR: LazyLock<Arc<Executor<'static>>> = LazyLock::new(|| {
    let executor = Arc::new(Executor::new());
    for i in 0..2 {
        let executor = executor.clone();
        std::thread::Builder::new()
            .name(format!("{THREAD}-{i}"))
            .spawn(move || smol::block_on(executor.run(smol::future::pending::<()>())))
            .expect("executor thread");
    }
    executor
});

fn runtime() -> Arc<dyn Runtime> {
    runtime_on(EXECUTOR.clone())
}

#[test]
fn tasks_run_on_the_executor() {
    let (tx, rx) = smol::channel::bounded(1);
    runtime().spawn(Box::pin(async move {
        let name = std::thread::current().name().map(str::to_owned);
        let _ = tx.send(name).await;
    }));
    let name = smol::block_on(rx.recv()).expect("the task ran");
    let name = name.expect("a named thread");
    assert!(name.starts_with(THREAD), "ran on {name}");
}

kitestring_scenarios::scenarios!(@one smol::block_on, runtime(),
    exchange_msgpack, resume_after_drops, server_abort_resumes, broadcast_through_cuts,
    event_shards_keep_sessions_in_order, feeds_keep_order, request_across_cut,
    fallback_through_cuts);
