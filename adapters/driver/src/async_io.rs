//! Runtime pieces shared by every runtime built on `async-io` (smol and
//! async-std): the timer and the TCP listener. A runtime crate adds only
//! spawning and name resolution.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use async_io::{Async, Timer};
use futures_util::StreamExt;

use crate::runtime::{AsyncListener, AsyncTimer, BoxIo};

/// [`AsyncTimer`] on `async_io::Timer`.
pub struct AsyncIoTimer(Timer);

impl AsyncIoTimer {
    /// A timer firing at `at`.
    pub fn new(at: Instant) -> Self {
        AsyncIoTimer(Timer::at(at))
    }
}

impl fmt::Debug for AsyncIoTimer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AsyncIoTimer")
    }
}

impl AsyncTimer for AsyncIoTimer {
    fn reset(mut self: Pin<&mut Self>, at: Instant) {
        self.0.set_at(at);
    }

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // `Timer` is a stream of instants; one tick is enough for a deadline.
        match self.0.poll_next_unpin(cx) {
            Poll::Ready(_) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// [`AsyncListener`] on `async_io::Async<TcpListener>`.
#[derive(Debug)]
pub struct AsyncIoListener(Async<TcpListener>);

impl AsyncIoListener {
    /// Adopts a bound std listener.
    pub fn new(listener: TcpListener) -> io::Result<Self> {
        Ok(AsyncIoListener(Async::new(listener)?))
    }
}

impl AsyncListener for AsyncIoListener {
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(BoxIo, SocketAddr)>> {
        loop {
            match self.0.get_ref().accept() {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let stream = Async::new(stream)?;
                    return Poll::Ready(Ok((Box::new(stream), addr)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => match self.0.poll_readable(cx) {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                },
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().local_addr()
    }
}

/// Connects to the first address of `addrs` that accepts, with async-io.
pub async fn connect_any(addrs: Vec<SocketAddr>) -> io::Result<BoxIo> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address to connect to");
    for addr in addrs {
        match Async::<TcpStream>::connect(addr).await {
            Ok(stream) => {
                let _ = stream.get_ref().set_nodelay(true);
                return Ok(Box::new(stream));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}
