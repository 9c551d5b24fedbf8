//! The HTTP fallback's bodies (PROTOCOL.md, section 1.1): a sequence of
//! records, each `kind: u8, length: u32 big-endian, payload`, carrying the
//! same messages a WebSocket would (text, binary, close) and the `open`
//! record that names a fallback connection.
//!
//! Owns only the framing of those bodies: writing records and reading them
//! back with a typed error for every malformed body (and the WebSocket
//! close code the error calls for). It never interprets a frame inside a
//! record, never does IO, and never allocates more than the body it reads.

use bytes::Bytes;

use crate::close::CloseCode;

/// The query parameter that marks a fallback request: `open`, or the
/// connection's id.
pub const HTTP_PARAM: &str = "kitestring-http";

/// The query parameter numbering a connection's polls and sends, each from
/// 0.
pub const HTTP_SEQ_PARAM: &str = "kitestring-n";

/// The header a Kitestring server puts on every HTTP refusal of its own
/// (its value is the status), so that a client can tell it from a proxy's
/// answer: an upgrade refused without it was blocked on the way.
pub const REFUSAL_HEADER: &str = "kitestring-refusal";

/// Bytes before each record's payload.
pub const RECORD_HEADER: usize = 5;

/// A text message: a JSON envelope.
pub const RECORD_TEXT: u8 = 0x01;
/// A binary message, its 6-byte header included.
pub const RECORD_BINARY: u8 = 0x02;
/// A close: 2-byte big-endian code, then the reason in UTF-8.
pub const RECORD_CLOSE: u8 = 0x08;
/// The server's first record in an `open` answer: a JSON object naming the
/// connection.
pub const RECORD_OPEN: u8 = 0x10;

/// One record of a fallback body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A text message (checked to be UTF-8).
    Text(Bytes),
    /// A binary message.
    Binary(Bytes),
    /// The end of the connection, with its close code and reason.
    Close {
        /// The close code.
        code: CloseCode,
        /// The reason, at most 123 bytes.
        reason: String,
    },
    /// The `open` record's JSON object.
    Open(Bytes),
}

/// A body that is not a sequence of well-formed records.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The body ends inside a record's header or payload.
    #[error("the body ends inside a record")]
    Truncated,
    /// A kind this version does not define.
    #[error("unknown record kind {0:#04x}")]
    UnknownKind(u8),
    /// A record over the message size limit.
    #[error("a record of {len} bytes is over the limit of {max}")]
    TooLarge {
        /// The record's declared length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A text record that is not UTF-8.
    #[error("a text record is not UTF-8")]
    NotUtf8,
    /// A close record shorter than its code, or with a reason that is not
    /// UTF-8 or over 123 bytes.
    #[error("a malformed close record")]
    BadClose,
}

impl RecordError {
    /// The close code a WebSocket would close with for the same fault:
    /// 1009 for a message over the limit, 1007 for text that is not UTF-8,
    /// 1002 for bad framing.
    pub fn close_code(&self) -> CloseCode {
        match self {
            RecordError::TooLarge { .. } => CloseCode::MESSAGE_TOO_BIG,
            RecordError::NotUtf8 => CloseCode::INVALID_PAYLOAD,
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }
}

/// Appends one record of `kind` with `payload`.
pub fn push_record(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    out.push(kind);
    // Payloads are bounded by the message limit, far below 4 GiB; a larger
    // one is cut at the length it declares rather than wrapping.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&payload[..len as usize]);
}

/// Appends a close record; the reason is cut at 123 bytes on a character
/// boundary, as a WebSocket close frame's is.
pub fn push_close(out: &mut Vec<u8>, code: CloseCode, reason: &str) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.0.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    push_record(out, RECORD_CLOSE, &payload);
}

/// Reads the records of a body in order. Each is a slice of the body, not a
/// copy. After the first error it yields nothing more.
#[derive(Debug)]
pub struct Records {
    body: Bytes,
    at: usize,
    max: usize,
    failed: bool,
}

impl Records {
    /// The records of `body`; a record's payload may be at most `max`
    /// bytes.
    pub fn new(body: Bytes, max: usize) -> Self {
        Records {
            body,
            at: 0,
            max,
            failed: false,
        }
    }

    fn next_record(&mut self) -> Result<Record, RecordError> {
        let rest = &self.body[self.at..];
        if rest.len() < RECORD_HEADER {
            return Err(RecordError::Truncated);
        }
        let kind = rest[0];
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if !matches!(
            kind,
            RECORD_TEXT | RECORD_BINARY | RECORD_CLOSE | RECORD_OPEN
        ) {
            return Err(RecordError::UnknownKind(kind));
        }
        if len > self.max {
            return Err(RecordError::TooLarge { len, max: self.max });
        }
        if rest.len() - RECORD_HEADER < len {
            return Err(RecordError::Truncated);
        }
        let start = self.at + RECORD_HEADER;
        let payload = self.body.slice(start..start + len);
        self.at = start + len;
        Ok(match kind {
            RECORD_TEXT => {
                if std::str::from_utf8(&payload).is_err() {
                    return Err(RecordError::NotUtf8);
                }
                Record::Text(payload)
            }
            RECORD_BINARY => Record::Binary(payload),
            RECORD_OPEN => Record::Open(payload),
            _ => {
                if payload.len() < 2 || payload.len() > 125 {
                    return Err(RecordError::BadClose);
                }
                let code = CloseCode(u16::from_be_bytes([payload[0], payload[1]]));
                let reason = std::str::from_utf8(&payload[2..])
                    .map_err(|_| RecordError::BadClose)?
                    .to_owned();
                Record::Close { code, reason }
            }
        })
    }
}

impl Iterator for Records {
    type Item = Result<Record, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.at == self.body.len() {
            return None;
        }
        let r = self.next_record();
        self.failed = r.is_err();
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(body: Vec<u8>, max: usize) -> Vec<Result<Record, RecordError>> {
        Records::new(Bytes::from(body), max).collect()
    }

    #[test]
    fn records_round_trip() {
        let mut body = Vec::new();
        push_record(&mut body, RECORD_OPEN, br#"{"id":"ab"}"#);
        push_record(&mut body, RECORD_TEXT, br#"{"t":"ping"}"#);
        push_record(&mut body, RECORD_BINARY, &[1, 1, 0, 0, 0, 0]);
        push_record(&mut body, RECORD_TEXT, b"");
        push_close(&mut body, CloseCode(4000), "bye");
        assert_eq!(
            all(body, 64),
            vec![
                Ok(Record::Open(Bytes::from_static(br#"{"id":"ab"}"#))),
                Ok(Record::Text(Bytes::from_static(br#"{"t":"ping"}"#))),
                Ok(Record::Binary(Bytes::from_static(&[1, 1, 0, 0, 0, 0]))),
                Ok(Record::Text(Bytes::new())),
                Ok(Record::Close {
                    code: CloseCode(4000),
                    reason: "bye".into()
                }),
            ]
        );
        assert!(all(Vec::new(), 64).is_empty());
    }

    #[test]
    fn every_malformed_body_is_a_typed_error() {
        let mut ok = Vec::new();
        push_record(&mut ok, RECORD_TEXT, b"{}");
        for cut in 1..ok.len() {
            let r = all(ok[..cut].to_vec(), 64);
            assert_eq!(r, vec![Err(RecordError::Truncated)], "cut at {cut}");
        }
        assert_eq!(
            all(vec![7, 0, 0, 0, 0], 64),
            vec![Err(RecordError::UnknownKind(7))]
        );
        let mut big = Vec::new();
        push_record(&mut big, RECORD_BINARY, &[0; 65]);
        assert_eq!(
            all(big, 64),
            vec![Err(RecordError::TooLarge { len: 65, max: 64 })]
        );
        // A huge declared length is refused before anything is read.
        assert_eq!(
            all(vec![1, 0xff, 0xff, 0xff, 0xff], 64),
            vec![Err(RecordError::TooLarge {
                len: u32::MAX as usize,
                max: 64
            })]
        );
        let mut bad = Vec::new();
        push_record(&mut bad, RECORD_TEXT, &[0xff, 0xfe]);
        push_record(&mut bad, RECORD_TEXT, b"{}");
        assert_eq!(all(bad, 64), vec![Err(RecordError::NotUtf8)]);
        let mut close = Vec::new();
        push_record(&mut close, RECORD_CLOSE, &[3]);
        assert_eq!(all(close, 64), vec![Err(RecordError::BadClose)]);
        assert_eq!(
            RecordError::TooLarge { len: 2, max: 1 }.close_code(),
            CloseCode::MESSAGE_TOO_BIG
        );
        assert_eq!(
            RecordError::NotUtf8.close_code(),
            CloseCode::INVALID_PAYLOAD
        );
        assert_eq!(
            RecordError::Truncated.close_code(),
            CloseCode::PROTOCOL_ERROR
        );
    }

    #[test]
    fn a_long_close_reason_is_cut_on_a_character_boundary() {
        let mut body = Vec::new();
        push_close(&mut body, CloseCode(1000), &"é".repeat(100));
        match all(body, 1024).pop() {
            Some(Ok(Record::Close { reason, .. })) => {
                assert_eq!(reason.len(), 122);
            }
            other => panic!("{other:?}"),
        }
    }
}
