//! Kitestring on async-std: the [`Runtime`] implementation, plus everything
//! from the `kitestring` crate re-exported.
//!
//! async-std is discontinued upstream (its maintainers recommend smol). It
//! keeps working here because applications still run on it; new projects
//! should prefer `kitestring-smol`, which shares this crate's async-io
//! based timer and listener, so moving over changes one line.
//!
//! ```no_run
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! async_std::task::block_on(async {
//!     let (client, events) = kitestring_async_std::connect(kitestring_async_std::runtime(), "ws://127.0.0.1:9000/", Default::default())?;
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

use async_std::net::ToSocketAddrs;
use kitestring::async_io::{connect_any, AsyncIoListener, AsyncIoTimer};
pub use kitestring::*;

/// [`Runtime`] on async-std's executor.
#[derive(Clone, Copy, Debug, Default)]
pub struct AsyncStdRuntime;

/// async-std as a shareable [`Runtime`].
pub fn runtime() -> Arc<dyn Runtime> {
    Arc::new(AsyncStdRuntime)
}

impl Runtime for AsyncStdRuntime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(AsyncIoTimer::new(at))
    }

    fn spawn(&self, future: BoxFuture<'static, ()>) {
        drop(async_std::task::spawn(future));
    }

    fn connect_tcp(&self, host: String, port: u16) -> BoxFuture<'static, io::Result<BoxIo>> {
        Box::pin(async move {
            let addrs: Vec<_> = (host.as_str(), port).to_socket_addrs().await?.collect();
            connect_any(addrs).await
        })
    }

    fn wrap_listener(&self, listener: std::net::TcpListener) -> io::Result<Box<dyn AsyncListener>> {
        Ok(Box::new(AsyncIoListener::new(listener)?))
    }
}
