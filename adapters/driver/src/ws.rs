//! The WebSocket layer: tungstenite settings sized for many connections,
//! conversions between tungstenite messages and the core's frames, and TLS
//! (rustls through futures-rustls, so it works on every runtime).
//!
//! This module never interprets Kitestring frames: it only moves bytes.

use std::borrow::Cow;
use std::sync::Arc;

use std::pin::Pin;

use async_tungstenite::tungstenite::error::ProtocolError;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use async_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use async_tungstenite::tungstenite::protocol::frame::Frame;
use async_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use async_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use futures_io::{AsyncRead, AsyncWrite};
use kitestring_core::close::CloseCode;
use kitestring_core::wire::Transmit;

use crate::runtime::BoxIo;

/// The socket type every driver uses: a WebSocket over a type-erased stream.
pub type Ws = async_tungstenite::WebSocketStream<BoxIo>;

/// Read buffer per connection: 4 KiB, not tungstenite's 128 KiB default
/// (about 6.7 KiB instead of 135 KiB per idle socket).
pub const READ_BUFFER: usize = 4 * 1024;

/// Frames written together up to this many bytes go to the socket in one
/// system call: the drivers hand tungstenite every frame that is ready and
/// flush once (a message larger than this is written at once).
pub const WRITE_BATCH: usize = 16 * 1024;

/// The tungstenite settings for a peer whose largest accepted message is
/// `max_message` bytes: 4 KiB read buffer, writes coalesced up to
/// [`WRITE_BATCH`] until the driver flushes, and a write buffer bounded at
/// twice the largest message plus 64 KiB so a stalled peer creates
/// backpressure instead of unbounded memory.
pub fn websocket_config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BATCH)
        .max_write_buffer_size(max_message.saturating_mul(2).saturating_add(64 * 1024))
        .max_message_size(Some(max_message.saturating_add(1024)))
        .max_frame_size(Some(max_message.saturating_add(1024)))
}

/// A core transmit as a tungstenite message.
pub(crate) fn to_message(t: Transmit) -> Message {
    match t {
        Transmit::Text(b) => match Utf8Bytes::try_from(b.clone()) {
            Ok(s) => Message::Text(s),
            // The core only builds text frames from serde_json output; should
            // that ever break, a binary frame fails to decode at the peer
            // instead of panicking here.
            Err(_) => Message::Binary(b),
        },
        Transmit::Binary(b) => Message::Binary(b),
    }
}

/// Appends a text or binary message to `out` as a server's WebSocket
/// frame (unmasked, final), as tungstenite would write it; false, and
/// nothing appended, for any other kind of message.
pub(crate) fn append_frame(message: &Message, out: &mut Vec<u8>) -> bool {
    let opcode = match message {
        Message::Text(_) => Data::Text,
        Message::Binary(_) => Data::Binary,
        _ => return false,
    };
    let frame = Frame::message(message.clone().into_data(), OpCode::Data(opcode), true);
    // Writing into a vector does not fail.
    frame.format(out).is_ok()
}

/// A close message with the core's code.
pub(crate) fn close_message(code: CloseCode, reason: &'static str) -> Message {
    Message::Close(Some(close_frame(code, reason)))
}

/// A close frame with the core's code and `reason`, cut to the 123 bytes a
/// close frame's reason may have; a static reason is not copied.
pub(crate) fn close_frame(code: CloseCode, reason: impl Into<Cow<'static, str>>) -> CloseFrame {
    let reason = reason.into();
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = match reason {
        Cow::Borrowed(r) => Utf8Bytes::from_static(&r[..end]),
        Cow::Owned(mut r) => {
            r.truncate(end);
            Utf8Bytes::from(r)
        }
    };
    CloseFrame {
        code: WsCloseCode::from(code.0),
        reason,
    }
}

/// The core's view of a received close frame.
pub(crate) fn close_code(frame: &Option<CloseFrame>) -> (Option<CloseCode>, String) {
    match frame {
        Some(f) => (
            Some(CloseCode(u16::from(f.code))),
            f.reason.as_str().to_owned(),
        ),
        None => (Some(CloseCode(1005)), String::new()),
    }
}

/// What a failed read means for the peer: the close code RFC 6455 asks for
/// (section 7.4.1) and a short reason, or `None` when the transport itself
/// ended or failed (EOF, reset, an IO error) and no close frame is owed.
///
/// - a message or frame over the limit (`Error::Capacity`): 1009;
/// - a text message that is not UTF-8 (`Error::Utf8`): 1007;
/// - any other violation of the framing (`Error::Protocol`: an unmasked
///   client frame, RSV bits without an extension, a reserved opcode, a
///   control frame over 125 bytes or fragmented, a continuation without a
///   start, a bad close frame, ...): 1002.
///
/// tungstenite leaves its write side usable after these errors (the state
/// stays active), so the close frame can still go out through the stream;
/// its read side must not be used again (after a frame header over the
/// limit, it would go on to read the body).
pub(crate) fn read_error_close(e: &WsError) -> Option<(CloseCode, &'static str)> {
    match e {
        WsError::Capacity(_) => Some((CloseCode::MESSAGE_TOO_BIG, "message too big")),
        WsError::Utf8(_) => Some((CloseCode::INVALID_PAYLOAD, "text message is not UTF-8")),
        WsError::Protocol(p) => {
            let reason = match p {
                // The peer dropped the transport: nothing to answer.
                ProtocolError::ResetWithoutClosingHandshake => return None,
                ProtocolError::UnmaskedFrameFromClient => "unmasked client frame",
                ProtocolError::MaskedFrameFromServer => "masked server frame",
                ProtocolError::NonZeroReservedBits => "reserved bits set",
                ProtocolError::UnknownControlFrameType(_)
                | ProtocolError::UnknownDataFrameType(_)
                | ProtocolError::InvalidOpcode(_) => "reserved opcode",
                ProtocolError::ControlFrameTooBig => "control frame over 125 bytes",
                ProtocolError::FragmentedControlFrame => "fragmented control frame",
                ProtocolError::UnexpectedContinueFrame => "continuation without a start",
                ProtocolError::ExpectedFragment(_) => "expected a continuation frame",
                ProtocolError::InvalidCloseSequence => "invalid close frame",
                ProtocolError::ReceivedAfterClosing => "frame after close",
                _ => "protocol error",
            };
            Some((CloseCode::PROTOCOL_ERROR, reason))
        }
        _ => None,
    }
}

/// After a close frame went out on a connection whose reads failed (its
/// framing can no longer be trusted): ends the write half (the peer reads
/// the close frame, then EOF) and reads and discards what the peer still
/// sends, at most `limit` bytes through a 1 KiB buffer, until it closes.
/// Closing a socket with unread bytes makes the kernel send a reset, which
/// can destroy the close frame before the peer read it. The caller bounds
/// the time.
pub(crate) async fn linger<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, limit: usize) {
    if futures_util::future::poll_fn(|cx| Pin::new(&mut *io).poll_close(cx))
        .await
        .is_err()
    {
        return;
    }
    let mut buf = [0u8; 1024];
    let mut left = limit;
    while left > 0 {
        match futures_util::future::poll_fn(|cx| Pin::new(&mut *io).poll_read(cx, &mut buf)).await {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// The rustls crypto provider of [`ClientTls::with_roots`] and
/// [`ServerTls::new`]: *ring*.
///
/// Chosen deliberately over aws-lc-rs, rustls's default: *ring* builds
/// with nothing but a Rust toolchain and a C compiler, where aws-lc-rs
/// needs cmake (and, on some targets, nasm or Go) on every machine that
/// builds it. rustls 0.23.48 deprecated *ring*'s provider because it offers
/// no post-quantum key exchange; applications that want that build their
/// own `rustls` configuration on aws-lc-rs and hand it over with
/// [`ClientTls::from_config`] and [`ServerTls::from_config`].
#[allow(deprecated)]
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS settings for clients (`wss://`).
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub(crate) config: Arc<rustls::ClientConfig>,
}

impl ClientTls {
    /// Trusts exactly the certificates in `roots` (for private CAs and tests).
    pub fn with_roots(roots: rustls::RootCertStore) -> Result<Self, rustls::Error> {
        let config = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(ClientTls {
            config: Arc::new(config),
        })
    }

    /// Uses a complete rustls configuration as is.
    pub fn from_config(config: Arc<rustls::ClientConfig>) -> Self {
        ClientTls { config }
    }
}

/// TLS settings for servers: a certificate chain and its private key.
#[derive(Clone)]
pub struct ServerTls {
    pub(crate) acceptor: futures_rustls::TlsAcceptor,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

impl ServerTls {
    /// A server presenting `chain` (leaf first) with `key`.
    pub fn new(
        chain: Vec<rustls_pki_types::CertificateDer<'static>>,
        key: rustls_pki_types::PrivateKeyDer<'static>,
    ) -> Result<Self, rustls::Error> {
        let config = rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        Ok(Self::from_config(Arc::new(config)))
    }

    /// Uses a complete rustls configuration as is.
    pub fn from_config(config: Arc<rustls::ServerConfig>) -> Self {
        ServerTls {
            acceptor: futures_rustls::TlsAcceptor::from(config),
        }
    }
}
