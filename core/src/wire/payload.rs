//! Application payloads: the bytes and how they are encoded.
//!
//! Owns [`Payload`], checked when constructed so that a payload the core
//! accepted can always be embedded in an envelope the peer can read, and the
//! JSON depth scan the decoder shares. It never copies a payload's bytes
//! once made (clones share them) and never looks inside opaque ones.

use std::fmt;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{MAX_JSON_DEPTH, MAX_MSGPACK_DEPTH};

/// Whether the JSON text `json` nests arrays and objects at most
/// [`MAX_JSON_DEPTH`] deep. Only the structure is scanned (brackets outside
/// strings); validity is serde_json's to check. Values too short to reach
/// the limit are not scanned.
pub(super) fn json_depth_ok(json: &[u8]) -> bool {
    if json.len() <= 2 * MAX_JSON_DEPTH {
        return true;
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// How an application payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PayloadKind {
    /// A JSON value.
    Json,
    /// A MessagePack value.
    MsgPack,
    /// Opaque bytes.
    Binary,
}

/// An application payload: bytes plus how they are encoded.
///
/// JSON and MessagePack payloads are checked when constructed, so a payload
/// the core accepted can always be embedded in an envelope the peer can read.
/// Cloning is cheap (the bytes are reference-counted), which is how a
/// broadcast shares one encoding among many receivers.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Payload {
    pub(super) kind: PayloadKind,
    pub(super) data: Bytes,
}

/// A payload was not what its constructor was promised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PayloadError {
    /// The bytes are not one valid JSON value.
    #[error("payload is not valid JSON: {0}")]
    InvalidJson(String),
    /// The bytes are not exactly one valid MessagePack value.
    #[error("payload is not valid MessagePack: {0}")]
    InvalidMsgPack(String),
    /// JSON arrays and objects nested deeper than [`MAX_JSON_DEPTH`].
    #[error("JSON payload nested deeper than {MAX_JSON_DEPTH} levels")]
    TooDeep,
}

impl Payload {
    /// A JSON payload. Fails unless `data` is exactly one JSON value.
    pub fn json(data: impl Into<Bytes>) -> Result<Payload, PayloadError> {
        let data = data.into();
        if !json_depth_ok(&data) {
            return Err(PayloadError::TooDeep);
        }
        let raw = serde_json::from_slice::<&RawValue>(&data)
            .map_err(|e| PayloadError::InvalidJson(e.to_string()))?;
        // Keep only the value's own text: surrounding whitespace would not
        // survive embedding in a JSON envelope, and payloads must arrive as
        // they were sent, byte for byte.
        let data = data.slice_ref(raw.get().as_bytes());
        Ok(Payload {
            kind: PayloadKind::Json,
            data,
        })
    }

    /// A MessagePack payload. Fails unless `data` is exactly one MessagePack value.
    pub fn msgpack(data: impl Into<Bytes>) -> Result<Payload, PayloadError> {
        let data = data.into();
        let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(&data[..]));
        de.set_max_depth(MAX_MSGPACK_DEPTH);
        serde::de::IgnoredAny::deserialize(&mut de)
            .map_err(|e| PayloadError::InvalidMsgPack(e.to_string()))?;
        if de.position() != data.len() as u64 {
            return Err(PayloadError::InvalidMsgPack(
                "trailing bytes after the value".into(),
            ));
        }
        Ok(Payload {
            kind: PayloadKind::MsgPack,
            data,
        })
    }

    /// The JSON value `null` (the payload of room operations).
    pub fn null() -> Payload {
        Payload {
            kind: PayloadKind::Json,
            data: Bytes::from_static(b"null"),
        }
    }

    /// An opaque binary payload.
    pub fn binary(data: impl Into<Bytes>) -> Payload {
        Payload {
            kind: PayloadKind::Binary,
            data: data.into(),
        }
    }

    /// How the bytes are encoded.
    pub fn kind(&self) -> PayloadKind {
        self.kind
    }

    /// The bytes.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            PayloadKind::Json => match std::str::from_utf8(&self.data) {
                Ok(s) if s.len() <= 64 => write!(f, "Json({s})"),
                _ => write!(f, "Json({} bytes)", self.data.len()),
            },
            PayloadKind::MsgPack => write!(f, "MsgPack({} bytes)", self.data.len()),
            PayloadKind::Binary => write!(f, "Binary({} bytes)", self.data.len()),
        }
    }
}
