//! What can go wrong on the wire: the typed decode and encode errors.
//!
//! Owns [`DecodeError`], [`EncodeError`], and [`InvalidMsg`], the one-byte
//! form of a decode error that a numbered but unreadable message carries.
//! It never decides what an error costs the connection; the machines do.

use std::fmt;

use super::BINARY_HEADER_LEN;

/// What was wrong with a [`MsgKind::Invalid`] message: one of the decode
/// errors a numbered message can have, kept as a one-byte index so that
/// every message does not carry two string references for the rare bad one.
///
/// [`MsgKind::Invalid`]: super::MsgKind::Invalid
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct InvalidMsg(u8);

/// Every `(field, reason)` an invalid message can name; the first is the
/// fallback for anything else.
pub(super) const INVALID: &[(&str, &str)] = &[
    ("msg", "malformed message"),
    ("msg", "a field has the wrong type"),
    ("f", "in a batch that did not decode"),
    ("f", "a batch holds no detached payloads"),
    (
        "payload",
        "the detached payload did not follow its envelope",
    ),
    ("op", "unknown room operation"),
    ("rs", "a message has at most one of rq, rs and op"),
    ("r", "room names are 1 to 256 bytes"),
    ("r", "missing"),
    ("j", "missing"),
    ("j", "not a JSON value"),
    ("j", "JSON nested deeper than 64 levels"),
    ("j", "a message carries exactly one payload"),
    ("m", "a message carries exactly one payload"),
    ("m", "not valid base64"),
    ("b", "not valid base64"),
    ("dj", "not a JSON value"),
    ("dj", "JSON nested deeper than 64 levels"),
    ("dj", "a message carries exactly one payload"),
    ("dm", "a message carries exactly one payload"),
    ("db", "a message carries exactly one payload"),
    ("dj", "a detached payload needs the stream's wire::Decoder"),
    ("dm", "a detached payload needs the stream's wire::Decoder"),
    ("db", "a detached payload needs the stream's wire::Decoder"),
    ("zj", "a message carries exactly one payload"),
    ("zj", "not valid base64"),
    ("zm", "not valid base64"),
    ("zb", "not valid base64"),
    ("zj", "not a JSON value"),
    ("zj", "JSON nested deeper than 64 levels"),
];

impl InvalidMsg {
    /// The entry for `(field, reason)`, or the fallback.
    pub(super) fn named(field: &str, reason: &str) -> InvalidMsg {
        let i = INVALID
            .iter()
            .position(|&(f, r)| f == field && r == reason)
            .unwrap_or(0);
        InvalidMsg(u8::try_from(i).unwrap_or(0))
    }

    /// What a decode error says, in the form a message can carry.
    pub(super) fn of(error: &DecodeError) -> InvalidMsg {
        match *error {
            DecodeError::InvalidField { field, reason } => InvalidMsg::named(field, reason),
            DecodeError::MissingField { field, .. } => InvalidMsg::named(field, "missing"),
            DecodeError::DetachedMismatch { .. } => InvalidMsg::named(
                "payload",
                "the detached payload did not follow its envelope",
            ),
            _ => InvalidMsg(0),
        }
    }

    /// The field at fault (`"msg"` when the envelope as a whole was
    /// malformed).
    pub fn field(self) -> &'static str {
        INVALID.get(usize::from(self.0)).map_or("msg", |e| e.0)
    }

    /// What is wrong with it.
    pub fn reason(self) -> &'static str {
        INVALID
            .get(usize::from(self.0))
            .map_or("malformed message", |e| e.1)
    }

    /// The decode error this stands for.
    pub fn error(self) -> DecodeError {
        DecodeError::InvalidField {
            field: self.field(),
            reason: self.reason(),
        }
    }
}

impl fmt::Debug for InvalidMsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InvalidMsg({:?}: {:?})", self.field(), self.reason())
    }
}

impl fmt::Display for InvalidMsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field `{}`: {}", self.field(), self.reason())
    }
}

/// Why an incoming message could not be decoded. Each variant names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Bigger than the configured maximum; rejected before any parsing.
    #[error("message of {size} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The message's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A text message that is not a JSON envelope.
    #[error("invalid JSON envelope at line {line}, column {column}: {message}")]
    Json {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// The parser's description.
        message: String,
    },
    /// A binary message whose body is not a MessagePack envelope.
    #[error("invalid MessagePack envelope: {message}")]
    MsgPack {
        /// The parser's description.
        message: String,
    },
    /// A binary message shorter than the binary header.
    #[error("binary message of {len} bytes is shorter than the {BINARY_HEADER_LEN}-byte header")]
    ShortHeader {
        /// The message's size.
        len: usize,
    },
    /// The binary header's kind byte is not one this version knows.
    #[error("binary header kind 0x{kind:02x} is unknown")]
    UnknownBinaryKind {
        /// The kind byte.
        kind: u8,
    },
    /// The binary header's version byte is not the negotiated version.
    #[error("binary header version {got}, the session speaks {expected}")]
    VersionMismatch {
        /// The version byte received.
        got: u8,
        /// The negotiated version.
        expected: u8,
    },
    /// The binary header's length disagrees with the message.
    #[error("binary header declares {declared} bytes, the message carries {actual}")]
    LengthMismatch {
        /// Length from the header.
        declared: usize,
        /// Bytes after the header.
        actual: usize,
    },
    /// A frame lacks a field its type requires.
    #[error("`{frame}` frame lacks required field `{field}`")]
    MissingField {
        /// The frame type.
        frame: &'static str,
        /// The missing field.
        field: &'static str,
    },
    /// A field is present but its value is unusable.
    #[error("field `{field}`: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A `msg` envelope announced a detached payload, and the next message
    /// is not that payload: not a binary message, or not of the announced
    /// length. The envelope is dropped with it.
    #[error("expected a detached payload of {expected} bytes, got a {} message of {actual} bytes", if *.text { "text" } else { "binary" })]
    DetachedMismatch {
        /// The length the envelope announced.
        expected: usize,
        /// The length of the message that came instead.
        actual: usize,
        /// Whether that message was a text message.
        text: bool,
    },
    /// A compressed payload or datagram (PROTOCOL.md, section 2.2) that
    /// cannot be taken: compression was not agreed on the connection, the
    /// envelope's compression fields do not go together, or the bytes are
    /// not one raw deflate stream inflating to exactly the announced
    /// length. A protocol error: the receiver closes with 1002. (An
    /// announced length over the receiver's limit is
    /// [`TooLarge`](Self::TooLarge) instead, and closes with 1009.)
    #[error("compressed payload: {reason}")]
    Compression {
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A frame could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The frame type cannot be sent (an unknown frame received from a peer).
    #[error("this frame type cannot be encoded")]
    Unrepresentable,
    /// The frame is larger than the binary header can describe (4 GiB).
    #[error("frame too large for the binary header")]
    TooLarge,
    /// The serializer failed.
    #[error("serializer failed: {0}")]
    Serializer(String),
    /// A value breaks a rule of the wire that the receiver would refuse it
    /// for (a synced map's name of more than 256 bytes, say).
    #[error("field `{field}`: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// What is wrong with its value.
        reason: &'static str,
    },
}

/// An encoder's error as [`EncodeError::Serializer`].
pub(super) fn serializer_error<E: fmt::Display>(e: E) -> EncodeError {
    EncodeError::Serializer(e.to_string())
}
