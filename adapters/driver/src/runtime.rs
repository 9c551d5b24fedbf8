//! The small interface every async runtime implements.
//!
//! Everything else in this crate (the client driver, the server, TLS) is
//! written once against [`Runtime`]. An implementation supplies timers,
//! task spawning, a monotonic clock and TCP sockets; the runtime crates
//! (`kitestring-tokio`, `kitestring-async-std`, `kitestring-smol`) are each
//! about a hundred lines. The trait is object safe: drivers hold an
//! `Arc<dyn Runtime>`, so the driver code is compiled once, not once per
//! runtime.
//!
//! This module owns no state and never blocks.

use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_io::{AsyncRead, AsyncWrite};

/// A boxed future that can move between threads.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A byte stream (TCP, or TLS over TCP) in futures-io terms.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A type-erased byte stream: every socket the driver touches has this type,
/// whichever runtime and whether or not TLS is in between.
pub type BoxIo = Box<dyn Io>;

/// A resettable timer, implemented directly on the runtime's sleep type
/// (`tokio::time::Sleep`, `async_io::Timer`).
pub trait AsyncTimer: Send + Debug + 'static {
    /// Moves the deadline to `at`.
    fn reset(self: Pin<&mut Self>, at: Instant);
    /// Ready once the deadline has passed.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()>;
}

/// A listening TCP socket.
pub trait AsyncListener: Send + Sync + Debug + 'static {
    /// Accepts the next connection.
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(BoxIo, SocketAddr)>>;
    /// The bound address (useful after binding port 0).
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// What a driver needs from an async runtime.
pub trait Runtime: Send + Sync + Debug + 'static {
    /// A timer that fires at `at`.
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn AsyncTimer>>;
    /// Runs `future` in the background.
    fn spawn(&self, future: BoxFuture<'static, ()>);
    /// The runtime's monotonic clock (tokio's can be paused in tests).
    fn now(&self) -> Instant {
        Instant::now()
    }
    /// Opens a TCP connection to `host:port` (resolving the name if needed).
    fn connect_tcp(&self, host: String, port: u16) -> BoxFuture<'static, io::Result<BoxIo>>;
    /// Adopts a bound, non-blocking std listener. Binding is done by the
    /// caller with `std::net::TcpListener::bind`, so no runtime needs an
    /// async bind.
    fn wrap_listener(&self, listener: std::net::TcpListener) -> io::Result<Box<dyn AsyncListener>>;
}
