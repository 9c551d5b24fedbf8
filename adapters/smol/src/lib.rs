//! Kitestring on smol: the [`Runtime`] implementation, plus everything from
//! the `kitestring` crate re-exported. Timers and listeners come from the
//! async-io module shared with `kitestring-async-std`.
//!
//! ```no_run
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! smol::block_on(async {
//!     let (client, events) = kitestring_smol::connect(kitestring_smol::runtime(), "ws://127.0.0.1:9000/", Default::default())?;
//!     Ok::<_, Box<dyn std::error::Error>>(())
//! })
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use kitestring::async_io::{connect_any, AsyncIoListener, AsyncIoTimer};
pub use kitestring::*;
use smol::Executor;

/// [`Runtime`] on smol: its global executor ([`runtime`]), or an executor
/// of the application's ([`runtime_on`]).
#[derive(Clone, Debug, Default)]
pub struct SmolRuntime {
    /// Where tasks go; `None` for smol's global executor.
    executor: Option<Arc<Executor<'static>>>,
}

/// smol's global executor as a shareable [`Runtime`].
///
/// That executor runs on one thread unless the `SMOL_THREADS` environment
/// variable says otherwise when it is first used: a server that should use
/// more than one core either sets it or runs on an executor of its own
/// ([`runtime_on`]).
pub fn runtime() -> Arc<dyn Runtime> {
    Arc::new(SmolRuntime::default())
}

/// A [`Runtime`] whose tasks go to `executor`, which the application runs
/// on as many threads as it likes (each calling [`Executor::run`]).
/// Timers and sockets still come from async-io's reactor.
///
/// ```no_run
/// use std::sync::Arc;
/// # fn demo() {
/// let executor = Arc::new(smol::Executor::new());
/// let (stop, stopped) = smol::channel::unbounded::<()>();
/// for _ in 0..2 {
///     let (executor, stopped) = (executor.clone(), stopped.clone());
///     std::thread::spawn(move || smol::block_on(executor.run(stopped.recv())));
/// }
/// let runtime = kitestring_smol::runtime_on(executor.clone());
/// // ... bind a server or connect clients with `runtime` ...
/// # drop((runtime, stop));
/// # }
/// ```
pub fn runtime_on(executor: Arc<Executor<'static>>) -> Arc<dyn Runtime> {
    Arc::new(SmolRuntime {
        executor: Some(executor),
    })
}

impl Runtime for SmolRuntime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(AsyncIoTimer::new(at))
    }

    fn spawn(&self, future: BoxFuture<'static, ()>) {
        match &self.executor {
            Some(executor) => executor.spawn(future).detach(),
            None => smol::spawn(future).detach(),
        }
    }

    fn connect_tcp(&self, host: String, port: u16) -> BoxFuture<'static, io::Result<BoxIo>> {
        Box::pin(async move {
            let addrs = smol::net::resolve((host.as_str(), port)).await?;
            connect_any(addrs).await
        })
    }

    fn wrap_listener(&self, listener: std::net::TcpListener) -> io::Result<Box<dyn AsyncListener>> {
        Ok(Box::new(AsyncIoListener::new(listener)?))
    }
}
