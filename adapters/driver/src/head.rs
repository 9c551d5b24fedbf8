//! HTTP/1.1 heads for the WebSocket upgrade, on both sides: reading one
//! into a single bounded buffer (the bytes behind it kept, as the start of
//! the WebSocket stream), finding tokens in header values, checking that a
//! `welcome` may travel as a header value, and writing a head out. The server's `server/http.rs` and the client's
//! `client/upgrade.rs` parse and check what is read here.
//!
//! It owns bytes only: it never decides what a head means, and never
//! parses one (`httparse` does, in the callers).

use std::io;
use std::pin::Pin;

use futures_io::{AsyncRead, AsyncWrite};

/// Largest head read (start line and headers): 64 KiB, as tungstenite's
/// own handshake. The server answers a longer request 431; the client
/// fails an upgrade whose answer is longer.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Most header lines parsed (tungstenite's number); the server answers a
/// request with more 431, the client fails such an answer.
pub(crate) const MAX_HEADERS: usize = 124;
/// The first read's buffer: an upgrade request with a `hello` and a token
/// fits, as does a `101` with a `welcome`.
const FIRST_READ: usize = 4 * 1024;

/// Why no head could be read.
#[derive(Debug)]
pub(crate) enum HeadError {
    /// Over [`MAX_HEAD`] bytes without the end of the head.
    TooLarge,
    /// The peer closed (or the read failed) before the head was complete.
    Closed(Option<io::Error>),
}

/// Reads from `io` until `buf` holds a complete head (a request's or a
/// response's); returns the head's length. Bytes past it (the start of the
/// WebSocket stream) stay in `buf`. Only the bytes each read added are
/// searched for the end of the head, so a peer trickling bytes costs no
/// repeated scans.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
) -> Result<usize, HeadError> {
    buf.clear();
    buf.resize(FIRST_READ, 0);
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            if buf.len() > MAX_HEAD {
                return Err(HeadError::TooLarge);
            }
            // One byte over the limit tells a head of exactly the limit
            // from a longer one.
            let grown = (buf.len() * 2).min(MAX_HEAD + 1);
            buf.resize(grown, 0);
        }
        let n = match futures_util::future::poll_fn(|cx| {
            Pin::new(&mut *io).poll_read(cx, &mut buf[filled..])
        })
        .await
        {
            Ok(0) => {
                buf.truncate(filled);
                return Err(HeadError::Closed(None));
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                buf.truncate(filled);
                return Err(HeadError::Closed(Some(e)));
            }
        };
        let from = filled.saturating_sub(3);
        filled += n;
        if let Some(end) = head_end(&buf[from..filled]) {
            let end = from + end;
            if end > MAX_HEAD {
                return Err(HeadError::TooLarge);
            }
            buf.truncate(filled);
            return Ok(end);
        }
    }
}

/// Where the head in `bytes` ends: after the first empty line (`\r\n\r\n`,
/// or `\n\n` as httparse also accepts).
fn head_end(bytes: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', bytes).find_map(|nl| match bytes.get(nl + 1) {
        Some(b'\n') => Some(nl + 2),
        Some(b'\r') if bytes.get(nl + 2) == Some(&b'\n') => Some(nl + 3),
        _ => None,
    })
}

/// Whether `value` is a header value of visible ASCII, spaces and tabs:
/// what a `Kitestring-Welcome` must be to be sent or taken as it is.
pub(crate) fn is_visible_ascii(value: &[u8]) -> bool {
    // Every byte checked without an early exit, which vectorizes: a
    // welcome is a few hundred bytes and almost always valid.
    value.iter().fold(true, |ok, &b| {
        ok & ((b == b'\t') | (0x20..0x7f).contains(&b))
    })
}

/// Whether a comma-separated header value holds `token` (any case).
pub(crate) fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Writes all of `bytes` and flushes.
pub(crate) async fn write_all<S: AsyncWrite + Unpin>(
    io: &mut S,
    mut bytes: &[u8],
) -> io::Result<()> {
    while !bytes.is_empty() {
        let n =
            futures_util::future::poll_fn(|cx| Pin::new(&mut *io).poll_write(cx, bytes)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
    }
    futures_util::future::poll_fn(|cx| Pin::new(&mut *io).poll_flush(cx)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_the_head_is_found_in_any_split() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\nA: b\n\nrest"), Some(21));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
        assert_eq!(head_end(b"A: b\r\n\r"), None);
        assert_eq!(head_end(b"A: b\r\n\rX\r\n\r\n"), Some(12));
        assert_eq!(head_end(b"\n\r\n"), Some(3));
        assert_eq!(head_end(b""), None);
        // Past the first lines, as in a long head read at once.
        let long = format!("GET / HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(100));
        assert_eq!(head_end(long.as_bytes()), Some(long.len()));
    }

    #[test]
    fn a_welcome_is_taken_only_as_visible_ascii() {
        assert!(is_visible_ascii(b"{\"t\":\"welcome\",\"a\":\"b\tc ~\"}"));
        assert!(is_visible_ascii(b""));
        let long = [b'x'; 300];
        assert!(is_visible_ascii(&long));
        for bad in [&b"a\r\nb"[..], "caf\u{e9}".as_bytes(), b"\x7f", b"\0"] {
            assert!(!is_visible_ascii(bad), "{bad:?}");
            // Anywhere in a long value.
            let mut v = long.to_vec();
            v.extend_from_slice(bad);
            assert!(!is_visible_ascii(&v), "{bad:?} at the end");
        }
    }

    #[test]
    fn tokens_are_found_in_lists_in_any_case() {
        assert!(has_token(b"keep-alive, Upgrade", "upgrade"));
        assert!(has_token(b"websocket", "websocket"));
        assert!(!has_token(b"upgrades", "upgrade"));
        assert!(!has_token(b"", "upgrade"));
    }
}
