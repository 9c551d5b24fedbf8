//! Application payloads: the bytes and how they are encoded.
//!
//! Owns [`Payload`], checked when constructed so that a payload the core
//! accepted can always be embedded in an envelope the peer can read, and the
//! JSON depth scan the decoder shares. It never copies a payload's bytes
//! once made (clones share them) and never looks inside opaque ones.

use std::fmt;

use super::json::json_value;
use super::{MAX_JSON_DEPTH, MAX_MSGPACK_DEPTH};
use bytes::Bytes;

/// Where the MessagePack value at the start of `data` ends, checked as
/// rmp-serde checks a value it skips: every marker known, every length
/// within the data, arrays and maps nested fewer than
/// [`MAX_MSGPACK_DEPTH`] deep, as rmp-serde counts them (strings are not
/// checked for UTF-8, extension types are taken).
/// Written by hand so that the MessagePack codec needs no serde
/// deserializer; the tests check it against rmp-serde.
pub(super) fn msgpack_value_end(data: &[u8]) -> Result<usize, &'static str> {
    const TRUNCATED: &str = "truncated MessagePack value";
    // Values still to read in each open array or map, innermost last.
    let mut open: Vec<u64> = Vec::new();
    let mut at = 0usize;
    loop {
        let marker = *data.get(at).ok_or(TRUNCATED)?;
        at += 1;
        // A big-endian length of `n` bytes after the marker.
        let mut len = |n: usize| -> Result<u64, &'static str> {
            let bytes = data.get(at..at + n).ok_or(TRUNCATED)?;
            at += n;
            Ok(bytes.iter().fold(0u64, |v, &b| (v << 8) | u64::from(b)))
        };
        // The bytes that follow, and whether it opens a container of how
        // many values.
        let (skip, container): (u64, Option<u64>) = match marker {
            0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => (0, None),
            0x80..=0x8f => (0, Some(2 * u64::from(marker & 0x0f))),
            0x90..=0x9f => (0, Some(u64::from(marker & 0x0f))),
            0xa0..=0xbf => (u64::from(marker & 0x1f), None),
            0xc4 | 0xd9 => (len(1)?, None),
            0xc5 | 0xda => (len(2)?, None),
            0xc6 | 0xdb => (len(4)?, None),
            // Extensions: the type byte, then the data.
            0xc7 => (len(1)? + 1, None),
            0xc8 => (len(2)? + 1, None),
            0xc9 => (len(4)? + 1, None),
            0xd4 => (2, None),
            0xd5 => (3, None),
            0xd6 => (5, None),
            0xd7 => (9, None),
            0xd8 => (17, None),
            0xcc | 0xd0 => (1, None),
            0xcd | 0xd1 => (2, None),
            0xca | 0xce | 0xd2 => (4, None),
            0xcb | 0xcf | 0xd3 => (8, None),
            0xdc => (0, Some(len(2)?)),
            0xdd => (0, Some(len(4)?)),
            0xde => (0, Some(2 * len(2)?)),
            0xdf => (0, Some(2 * len(4)?)),
            0xc1 => return Err("reserved MessagePack marker 0xc1"),
        };
        let skip = usize::try_from(skip).map_err(|_| TRUNCATED)?;
        at = at
            .checked_add(skip)
            .filter(|&end| end <= data.len())
            .ok_or(TRUNCATED)?;
        // This value fills one place in the container around it.
        if let Some(left) = open.last_mut() {
            *left -= 1;
        }
        if let Some(values) = container {
            if open.len() + 1 >= MAX_MSGPACK_DEPTH {
                return Err("MessagePack value nested too deep");
            }
            open.push(values);
        }
        while open.last() == Some(&0) {
            open.pop();
        }
        if open.is_empty() {
            return Ok(at);
        }
    }
}

/// Whether the JSON text `json` nests arrays and objects at most
/// [`MAX_JSON_DEPTH`] deep. Only the structure is scanned (brackets outside
/// strings); validity is `json_value`'s to check. Values too short to reach
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
        let (start, end) = json_value(&data).map_err(|at| invalid_json(&data, at))?;
        // Keep only the value's own text: surrounding whitespace would not
        // survive embedding in a JSON envelope, and payloads must arrive as
        // they were sent, byte for byte.
        let data = data.slice(start..end);
        Ok(Payload {
            kind: PayloadKind::Json,
            data,
        })
    }

    /// A MessagePack payload. Fails unless `data` is exactly one MessagePack value.
    pub fn msgpack(data: impl Into<Bytes>) -> Result<Payload, PayloadError> {
        let data = data.into();
        let end = msgpack_value_end(&data).map_err(|e| PayloadError::InvalidMsgPack(e.into()))?;
        if end != data.len() {
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

/// Why `data` is not one JSON value, the hand-written check having found
/// a fault at byte `at`: in serde_json's words, with `json-serde`.
#[cfg(feature = "json-serde")]
fn invalid_json(data: &[u8], at: usize) -> PayloadError {
    match serde_json::from_slice::<&serde_json::value::RawValue>(data) {
        Err(e) => PayloadError::InvalidJson(e.to_string()),
        Ok(_) => PayloadError::InvalidJson(format!("not one JSON value (byte {at})")),
    }
}

/// Why `data` is not one JSON value: a fault at byte `at`.
#[cfg(not(feature = "json-serde"))]
fn invalid_json(_: &[u8], at: usize) -> PayloadError {
    PayloadError::InvalidJson(format!("not one JSON value (byte {at})"))
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
