//! Headers: the binary header, and the upgrade headers that carry the
//! handshake.
//!
//! Owns the writing of the 6-byte header in front of every binary message
//! (the decoder checks it on the way in), and the escaping that makes a
//! handshake frame's JSON a valid HTTP header value for [`HELLO_HEADER`] and
//! [`WELCOME_HEADER`]. It never parses HTTP: the driver carries the headers.

use super::{EncodeError, BINARY_HEADER_LEN, KIND_MSGPACK};

/// HTTP header of the upgrade request that carries the client's `hello`
/// (PROTOCOL.md, section 4), saving the handshake's round trip.
pub const HELLO_HEADER: &str = "kitestring-hello";
/// The query parameter of the request URL that carries the `hello`
/// (percent-encoded) for clients that cannot set request headers or read
/// the response's, such as browser pages (PROTOCOL.md, section 4.2): the
/// answer is then the server's first frame. At most
/// [`MAX_HELLO_HEADER`] bytes once decoded.
pub const HELLO_PARAM: &str = "kitestring-hello";
/// HTTP header of the `101` response that carries the server's answer to a
/// [`HELLO_HEADER`]: its `welcome` or `reject`.
pub const WELCOME_HEADER: &str = "kitestring-welcome";
/// Longest `hello` a client puts in [`HELLO_HEADER`]; a longer one (many
/// capabilities) goes as the first frame instead, clear of the header size
/// limits of proxies and servers.
pub const MAX_HELLO_HEADER: usize = 4 * 1024;

/// A handshake frame's JSON text as an HTTP header value: every character
/// outside printable ASCII becomes a JSON `\uXXXX` escape. The result is the
/// same JSON value, and a valid header value everywhere (RFC 9110 allows
/// only visible ASCII, space and tab without ambiguity).
///
/// Outside strings, compact JSON is printable ASCII already, so escaping
/// every such character is always correct.
pub fn header_value(json: &str) -> String {
    if is_header_safe(json) {
        return json.to_owned();
    }
    escape_header(json)
}

/// [`header_value`] for JSON the caller owns: returned as it is when it
/// needs no escape, which compact JSON of ASCII text never does.
pub fn into_header_value(json: String) -> String {
    if is_header_safe(&json) {
        return json;
    }
    escape_header(&json)
}

fn is_header_safe(json: &str) -> bool {
    // No early exit: a check of every byte vectorizes, and a handshake's
    // JSON (a few hundred bytes) almost always passes.
    json.bytes()
        .fold(true, |safe, b| safe & (0x20..0x7f).contains(&b))
}

fn escape_header(json: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if (' '..='~').contains(&c) {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\u{unit:04x}");
            }
        }
    }
    out
}

pub(super) fn push_header(
    out: &mut Vec<u8>,
    kind: u8,
    version: u8,
    len: usize,
) -> Result<(), EncodeError> {
    let len = u32::try_from(len).map_err(|_| EncodeError::TooLarge)?;
    out.push(kind);
    out.push(version);
    out.extend_from_slice(&len.to_le_bytes());
    Ok(())
}

/// Fills in the binary header reserved at the start of `out` for the
/// MessagePack envelope after it.
#[inline]
pub(super) fn seal_msgpack(out: &mut [u8], version: u8) -> Result<(), EncodeError> {
    let body = u32::try_from(out.len() - BINARY_HEADER_LEN).map_err(|_| EncodeError::TooLarge)?;
    out[0] = KIND_MSGPACK;
    out[1] = version;
    out[2..BINARY_HEADER_LEN].copy_from_slice(&body.to_le_bytes());
    Ok(())
}
