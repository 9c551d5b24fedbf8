//! A futures-io socket as hyper's IO, for the HTTP fallback's client
//! (`client/http.rs`) and for the listener's HTTP connections
//! (`server/hyper.rs`), which start with bytes already read.
//!
//! It owns only that translation: it never parses or answers anything.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_io::{AsyncRead, AsyncWrite};

use crate::runtime::BoxIo;

/// A socket for hyper: `read` (bytes read from it already) comes first.
pub(crate) struct FuturesIo {
    io: BoxIo,
    read: Vec<u8>,
    at: usize,
}

impl FuturesIo {
    /// `io`, with `read` handed out before anything read from it.
    pub(crate) fn new(io: BoxIo, read: Vec<u8>) -> Self {
        FuturesIo { io, read, at: 0 }
    }
}

impl hyper::rt::Read for FuturesIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.read.len() {
            let n = buf.remaining().min(this.read.len() - this.at);
            buf.put_slice(&this.read[this.at..this.at + n]);
            this.at += n;
            if this.at == this.read.len() {
                this.read = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let mut chunk = [0u8; 8192];
        let want = buf.remaining().min(chunk.len());
        let n = ready!(Pin::new(&mut this.io).poll_read(cx, &mut chunk[..want]))?;
        buf.put_slice(&chunk[..n]);
        Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Write for FuturesIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_close(cx)
    }
}
