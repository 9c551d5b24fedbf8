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

/// [`Runtime`] on smol's global executor.
#[derive(Clone, Copy, Debug, Default)]
pub struct SmolRuntime;

/// smol as a shareable [`Runtime`].
pub fn runtime() -> Arc<dyn Runtime> {
    Arc::new(SmolRuntime)
}

impl Runtime for SmolRuntime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(AsyncIoTimer::new(at))
    }

    fn spawn(&self, future: BoxFuture<'static, ()>) {
        smol::spawn(future).detach();
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
