//! Kitestring on tokio: the [`Runtime`] implementation, plus everything
//! from the `kitestring` crate re-exported.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let runtime = kitestring_tokio::runtime();
//! let (client, events) = kitestring_tokio::connect(runtime, "ws://127.0.0.1:9000/", Default::default())?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

pub use kitestring::*;
use tokio_util::compat::TokioAsyncReadCompatExt;

/// [`Runtime`] on tokio. Spawns on the runtime that was current when it was
/// created.
#[derive(Clone)]
pub struct TokioRuntime {
    handle: tokio::runtime::Handle,
}

impl fmt::Debug for TokioRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokioRuntime")
    }
}

impl TokioRuntime {
    /// Uses the tokio runtime this is called from.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (as `tokio::runtime::Handle::current` does);
    /// see [`TokioRuntime::try_current`].
    pub fn current() -> Self {
        TokioRuntime {
            handle: tokio::runtime::Handle::current(),
        }
    }

    /// Uses the tokio runtime this is called from, if any.
    pub fn try_current() -> Option<Self> {
        tokio::runtime::Handle::try_current()
            .ok()
            .map(|handle| TokioRuntime { handle })
    }

    /// Uses the given tokio runtime.
    pub fn with_handle(handle: tokio::runtime::Handle) -> Self {
        TokioRuntime { handle }
    }
}

/// The current tokio runtime as a shareable [`Runtime`] (panics outside one).
pub fn runtime() -> Arc<dyn Runtime> {
    Arc::new(TokioRuntime::current())
}

pin_project_lite::pin_project! {
    /// [`AsyncTimer`] on `tokio::time::Sleep`, held in place (`Sleep` is
    /// `!Unpin`; the timer is pinned in its box), so a timer is one
    /// allocation.
    struct PinnedTimer {
        #[pin]
        sleep: tokio::time::Sleep,
    }
}

impl fmt::Debug for PinnedTimer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokioTimer")
    }
}

impl AsyncTimer for PinnedTimer {
    fn reset(self: Pin<&mut Self>, at: Instant) {
        self.project().sleep.reset(at.into());
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        std::future::Future::poll(self.project().sleep, cx)
    }
}

#[derive(Debug)]
struct Listener(tokio::net::TcpListener);

impl AsyncListener for Listener {
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(BoxIo, SocketAddr)>> {
        self.0.poll_accept(cx).map_ok(|(stream, addr)| {
            let _ = stream.set_nodelay(true);
            (Box::new(stream.compat()) as BoxIo, addr)
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

impl Runtime for TokioRuntime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn AsyncTimer>> {
        let _guard = self.handle.enter();
        Box::pin(PinnedTimer {
            sleep: tokio::time::sleep_until(at.into()),
        })
    }

    fn spawn(&self, future: BoxFuture<'static, ()>) {
        drop(self.handle.spawn(future));
    }

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn connect_tcp(&self, host: String, port: u16) -> BoxFuture<'static, io::Result<BoxIo>> {
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            let _ = stream.set_nodelay(true);
            Ok(Box::new(stream.compat()) as BoxIo)
        })
    }

    fn wrap_listener(&self, listener: std::net::TcpListener) -> io::Result<Box<dyn AsyncListener>> {
        let _guard = self.handle.enter();
        Ok(Box::new(Listener(tokio::net::TcpListener::from_std(
            listener,
        )?)))
    }
}
