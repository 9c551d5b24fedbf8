//! The wire format: frames, the two envelope codecs, the binary header.
//!
//! Owns the bytes: turning [`Frame`]s into WebSocket messages and back, the
//! size limit checked before any parsing, and every typed decode error. It
//! must never panic or allocate more than the frame it was handed, whatever
//! the peer sends; it knows nothing of states or timers. PROTOCOL.md is the
//! human-readable version of this file and changes with it.
//!
//! * Text WebSocket messages carry JSON envelopes.
//! * Binary WebSocket messages start with a 6-byte header
//!   (`kind: u8, version: u8, length: u32 LE`) followed by `length` bytes: a
//!   MessagePack envelope (`kind = 0x01`) or a raw application datagram
//!   (`kind = 0x02`).
//! * `hello`, `welcome` and `reject` are always JSON, so a peer can read the
//!   handshake before any codec is agreed.

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use encode::{encode_handshake, encode_json, encode_msgpack, write_json_msg, write_pack_msg};
use envelope::{bounded_batch, HandshakeEnvelope, JsonEnvelope, PackEnvelope, B64};
use error::serializer_error;
use header::{push_header, seal_msgpack};
use payload::json_depth_ok;

mod buffers;
mod encode;
mod envelope;
mod error;
mod frame;
mod header;
mod payload;
#[cfg(test)]
mod tests;

pub use crate::ids::{ClientId, SessionId};
pub(crate) use buffers::Encoder;
pub use error::{DecodeError, EncodeError, InvalidMsg};
pub use frame::{
    Frame, Hello, Incoming, Msg, MsgKind, Reject, Resume, ResumeKey, Transmit, Welcome,
};
pub use header::{header_value, into_header_value, HELLO_HEADER, MAX_HELLO_HEADER, WELCOME_HEADER};
pub use payload::{Payload, PayloadError, PayloadKind};

/// The protocol version this crate speaks best.
pub const PROTOCOL_VERSION: u8 = 1;
/// Every protocol version this crate can speak, newest first.
pub const SUPPORTED_VERSIONS: &[u8] = &[1];
/// Length of the binary header in front of every binary message.
pub const BINARY_HEADER_LEN: usize = 6;
/// Binary header kind: a MessagePack envelope follows.
pub const KIND_MSGPACK: u8 = 0x01;
/// Binary header kind: a raw application datagram follows.
pub const KIND_RAW: u8 = 0x02;
/// Longest string (ids, reasons, capability names) accepted in a handshake.
pub const MAX_TOKEN_LEN: usize = 256;
/// Deepest nesting accepted in a MessagePack value, so hostile input cannot
/// exhaust the stack.
pub const MAX_MSGPACK_DEPTH: usize = 64;
/// Deepest nesting of arrays and objects in a JSON payload, as for
/// MessagePack: deeper values are refused on receipt and by
/// [`Payload::json`], so no peer's parser is asked to recurse further.
pub const MAX_JSON_DEPTH: usize = 64;

/// [`json_depth_ok`] as a decode check on the field `field`.
fn check_json_depth(json: &[u8], field: &'static str) -> Result<(), DecodeError> {
    if json_depth_ok(json) {
        Ok(())
    } else {
        Err(DecodeError::InvalidField {
            field,
            reason: "JSON nested deeper than 64 levels",
        })
    }
}

/// Longest credential accepted in an `auth` frame.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Most messages in one batch frame.
pub const MAX_BATCH: usize = 1024;
/// Most list entries (versions, codecs, capabilities) accepted in a handshake.
pub const MAX_LIST_LEN: usize = 32;

/// An envelope codec, agreed in the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// JSON in text messages: readable in any debugger. Every peer speaks it.
    Json,
    /// MessagePack in binary messages behind the binary header: compact.
    MsgPack,
}

impl Codec {
    /// The codec's name in `hello.codecs` and `welcome.codec`.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Json => "json",
            Codec::MsgPack => "msgpack",
        }
    }

    /// The codec with this wire name; unknown names are `None` (and ignored).
    pub fn from_name(name: &str) -> Option<Codec> {
        match name {
            "json" => Some(Codec::Json),
            "msgpack" => Some(Codec::MsgPack),
            _ => None,
        }
    }
}

/// Decoding limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest message accepted, in bytes, checked before parsing.
    pub max_message: usize,
    /// The negotiated protocol version, checked against the binary header.
    pub version: u8,
}

/// A `key` field: 32 hex digits when present.
fn resume_key(key: Option<Cow<'_, str>>) -> Result<Option<ResumeKey>, DecodeError> {
    key.map(|k| {
        ResumeKey::from_hex(&k).ok_or(DecodeError::InvalidField {
            field: "key",
            reason: "not 32 hex digits",
        })
    })
    .transpose()
}

/// The numbers of a `msg` (or of a batch's) whose envelope did not decode:
/// read again with every other field ignored, so that a message with a
/// malformed field still has its sequence number consumed (as a
/// [`MsgKind::Invalid`] message) instead of stalling the stream.
#[derive(Deserialize)]
struct MsgProbe<'a> {
    #[serde(borrow)]
    t: Cow<'a, str>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    id: Option<u64>,
    /// An `ack` of the wrong type is not this message's fault to carry:
    /// read as absent, so the message is still numbered.
    #[serde(default, deserialize_with = "lenient_u64")]
    ack: Option<u64>,
    #[serde(default, borrow, deserialize_with = "bounded_batch")]
    f: Option<Vec<MsgProbe<'a>>>,
}

/// A `u64`, or `None` for a value of any other type, skipped without
/// buffering it (a declared length must not make it allocate).
fn lenient_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
    struct Lenient;
    impl<'de> Visitor<'de> for Lenient {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any value")
        }
        fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
            Ok(u64::try_from(v).ok())
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_bytes<E>(self, _: &[u8]) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: serde::Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(Lenient)
        }
        fn visit_newtype_struct<D2: serde::Deserializer<'de>>(
            self,
            d: D2,
        ) -> Result<Self::Value, D2::Error> {
            IgnoredAny::deserialize(d).map(|_| None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }
    d.deserialize_any(Lenient)
}

impl MsgProbe<'_> {
    fn numbered(&self, what: InvalidMsg) -> Option<Msg> {
        match (self.seq, self.id) {
            (Some(seq), Some(id)) if seq > 0 && self.t == "msg" => {
                Some(Msg::invalid(seq, id, self.ack, what))
            }
            _ => None,
        }
    }

    /// The frame standing for this envelope: every message in it numbered
    /// and invalid. `None` if a number is missing.
    fn into_invalid(self) -> Option<Frame> {
        if self.t == "msg" {
            return self
                .numbered(InvalidMsg::named("msg", "a field has the wrong type"))
                .map(Frame::Msg);
        }
        let inner = self.f.filter(|f| self.t == "batch" && !f.is_empty())?;
        let what = InvalidMsg::named("f", "in a batch that did not decode");
        inner
            .iter()
            .map(|m| m.numbered(what))
            .collect::<Option<Vec<_>>>()
            .map(Frame::Batch)
    }
}

/// Probe used to route a text message: only the type is read first.
#[derive(Deserialize)]
struct TypeProbe<'a> {
    #[serde(borrow)]
    t: Cow<'a, str>,
}

fn is_handshake(t: &str) -> bool {
    matches!(t, "hello" | "welcome" | "reject")
}

fn json_error(e: &serde_json::Error) -> DecodeError {
    DecodeError::Json {
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    }
}

fn need<T>(v: Option<T>, frame: &'static str, field: &'static str) -> Result<T, DecodeError> {
    v.ok_or(DecodeError::MissingField { frame, field })
}

fn token(s: Cow<'_, str>, field: &'static str) -> Result<String, DecodeError> {
    if s.len() > MAX_TOKEN_LEN {
        return Err(DecodeError::InvalidField {
            field,
            reason: "longer than 256 bytes",
        });
    }
    Ok(s.into_owned())
}

fn token_list(
    v: Option<Vec<Cow<'_, str>>>,
    field: &'static str,
) -> Result<Vec<String>, DecodeError> {
    let v = v.unwrap_or_default();
    if v.len() > MAX_LIST_LEN {
        return Err(DecodeError::InvalidField {
            field,
            reason: "more than 32 entries",
        });
    }
    v.into_iter().map(|s| token(s, field)).collect()
}

/// Encodes a frame for the wire with the negotiated codec and version.
///
/// Handshake frames are always JSON; [`Frame::Raw`] always uses the binary
/// header. Fails only if a frame cannot be represented (an [`Frame::Unknown`]).
pub fn encode(frame: &Frame, codec: Codec, version: u8) -> Result<Transmit, EncodeError> {
    let mut out = Vec::new();
    let kind = encode_into(frame, codec, version, &mut out)?;
    Ok(kind.with(out.into()))
}

/// Encodes a handshake frame (`hello`, `welcome` or `reject`) as JSON text,
/// for a [`HELLO_HEADER`] or [`WELCOME_HEADER`]: compact JSON, escaped only
/// where [`header_value`] must.
pub fn handshake_header(frame: &Frame) -> Result<String, EncodeError> {
    let mut out = Vec::new();
    encode_handshake(frame, &mut out)?;
    // serde_json writes UTF-8.
    let json = String::from_utf8(out).map_err(serializer_error)?;
    Ok(into_header_value(json))
}

/// Which kind of WebSocket message an encoded frame travels in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// A text message.
    Text,
    /// A binary message.
    Binary,
}

impl FrameKind {
    #[inline]
    fn with(self, data: Bytes) -> Transmit {
        match self {
            FrameKind::Text => Transmit::Text(data),
            FrameKind::Binary => Transmit::Binary(data),
        }
    }
}

/// Encodes a frame into `out` (cleared first) and says which kind of
/// WebSocket message carries it.
#[inline]
pub fn encode_into(
    frame: &Frame,
    codec: Codec,
    version: u8,
    out: &mut Vec<u8>,
) -> Result<FrameKind, EncodeError> {
    out.clear();
    match frame {
        Frame::Hello(_) | Frame::Welcome(_) | Frame::Reject(_) => {
            encode_handshake(frame, out)?;
            Ok(FrameKind::Text)
        }
        Frame::Raw(data) => {
            out.reserve(BINARY_HEADER_LEN + data.len());
            push_header(out, KIND_RAW, version, data.len())?;
            out.extend_from_slice(data);
            Ok(FrameKind::Binary)
        }
        Frame::Unknown(_) => Err(EncodeError::Unrepresentable),
        _ => match codec {
            Codec::Json => {
                encode_json(frame, out)?;
                Ok(FrameKind::Text)
            }
            Codec::MsgPack => {
                encode_msgpack(frame, version, out)?;
                Ok(FrameKind::Binary)
            }
        },
    }
}

/// Encodes `m` with its payload detached (PROTOCOL.md, section 2.1): the
/// envelope, announcing the payload's kind and length, then the payload
/// itself as a binary message of its own, shared with `m` (no copy). Send
/// the two back to back, and only to a peer that announced the
/// [`CAP_DETACH`] capability.
pub fn encode_detached(m: &Msg, codec: Codec, version: u8) -> Result<[Transmit; 2], EncodeError> {
    let mut out = Vec::new();
    let kind = encode_detached_into(m, codec, version, &mut out)?;
    Ok([
        kind.with(out.into()),
        Transmit::Binary(m.payload.data.clone()),
    ])
}

/// Encodes the envelope of `m` with its payload detached into `out`
/// (cleared first).
fn encode_detached_into(
    m: &Msg,
    codec: Codec,
    version: u8,
    out: &mut Vec<u8>,
) -> Result<FrameKind, EncodeError> {
    out.clear();
    match codec {
        Codec::Json => {
            write_json_msg(m, out, true)?;
            Ok(FrameKind::Text)
        }
        Codec::MsgPack => {
            out.extend_from_slice(&[0; BINARY_HEADER_LEN]);
            write_pack_msg(m, out, true)?;
            seal_msgpack(out, version)?;
            Ok(FrameKind::Binary)
        }
    }
}

/// Capability: the peer can receive detached payloads (PROTOCOL.md,
/// section 2.1). Every Kitestring peer announces it.
pub const CAP_DETACH: &str = "detach";

/// Payloads from this size up are sent detached to a peer that can receive
/// them: below it, copying the payload into the envelope costs less than a
/// WebSocket message of its own.
pub const DETACH_FROM: usize = 4096;

/// Whether `m` goes detached to a peer that can (`peer_detach`) or cannot
/// receive detached payloads: the one rule the encoder and the machines'
/// batching both follow.
pub(crate) fn detaches(m: &Msg, peer_detach: bool) -> bool {
    peer_detach && m.payload.len() >= DETACH_FROM
}

/// Decodes one incoming message. The size limit is checked before parsing.
pub fn decode(msg: Incoming<'_>, limits: &Limits) -> Result<Frame, DecodeError> {
    check_size(msg.len(), limits)?;
    match decode_one(msg, limits.version)? {
        Decoded::Frame(frame) => Ok(frame),
        Decoded::Detached(_) => Err(DecodeError::InvalidField {
            field: "dj",
            reason: "a detached payload needs the stream's wire::Decoder",
        }),
    }
}

/// A message or detached payload of `size` bytes is within the limit.
fn check_size(size: usize, limits: &Limits) -> Result<(), DecodeError> {
    if size > limits.max_message {
        return Err(DecodeError::TooLarge {
            size,
            max: limits.max_message,
        });
    }
    Ok(())
}

fn decode_one(msg: Incoming<'_>, version: u8) -> Result<Decoded, DecodeError> {
    match msg {
        Incoming::Text(text) => decode_text(text),
        Incoming::Binary(bytes) => decode_binary(bytes, version, None),
        Incoming::SharedBinary(bytes) => decode_binary(bytes, version, Some(bytes)),
    }
}

/// One decoded message: a frame, or a `msg` envelope whose payload is the
/// next message.
enum Decoded {
    Frame(Frame),
    Detached(Box<Detached>),
}

/// A `msg` envelope waiting for its detached payload. The message's payload
/// has the announced kind and no bytes yet.
#[derive(Debug)]
struct Detached {
    msg: Msg,
    len: usize,
}

impl Decoded {
    /// `frame`, or the detached message it is if its envelope announced a
    /// detached payload; a numbered `msg` whose announcement is malformed
    /// is consumed as an invalid message.
    fn announced(
        frame: Frame,
        dj: Option<u64>,
        dm: Option<u64>,
        db: Option<u64>,
    ) -> Result<Self, DecodeError> {
        // The frame is not moved through a tuple: it is large, and this is
        // every message's path.
        let e = match detached_of(dj, dm, db) {
            Ok(detached) => return Ok(Decoded::of(frame, detached)),
            Err(e) => e,
        };
        match frame {
            Frame::Msg(m) if !matches!(e, DecodeError::TooLarge { .. }) => Ok(Decoded::Frame(
                Frame::Msg(Msg::invalid(m.seq, m.id, m.ack, InvalidMsg::of(&e))),
            )),
            _ => Err(e),
        }
    }

    /// `frame`, or the detached message it is if the envelope announced a
    /// detached payload of `detached` bytes.
    fn of(frame: Frame, detached: Option<(PayloadKind, u64)>) -> Self {
        match (frame, detached) {
            (Frame::Msg(msg), Some((_, len))) => Decoded::Detached(Box::new(Detached {
                msg,
                len: usize::try_from(len).unwrap_or(usize::MAX),
            })),
            (frame, _) => Decoded::Frame(frame),
        }
    }
}

/// Decodes the messages of one connection in order (PROTOCOL.md, section
/// 2.1): a `msg` envelope with a detached payload (`dj`, `dm` or `db`)
/// waits here until the next message, its payload, arrives, so a large
/// payload travels in a message of its own, never copied into an envelope
/// and, received, shared with the transport's buffer. Machines keep one per
/// connection; for anything else it behaves as [`decode`].
#[derive(Debug, Default)]
pub struct Decoder {
    pending: Option<Box<Detached>>,
}

impl Decoder {
    /// A decoder with nothing pending.
    pub fn new() -> Self {
        Decoder::default()
    }

    /// Decodes the next message of the connection. `Ok(None)`: it was a
    /// `msg` envelope whose payload is the next message.
    ///
    /// A detached payload longer than `limits.max_message` fails at the
    /// envelope. If the next message is not the payload (text, or another
    /// length), it is dropped and the envelope, numbered, comes out as a
    /// [`MsgKind::Invalid`] message saying
    /// [`DecodeError::DetachedMismatch`], for the receiver to consume and
    /// refuse.
    pub fn decode(
        &mut self,
        msg: Incoming<'_>,
        limits: &Limits,
    ) -> Result<Option<Frame>, DecodeError> {
        if let Some(pending) = self.pending.take() {
            return pending.complete(msg).map(Some);
        }
        check_size(msg.len(), limits)?;
        match decode_one(msg, limits.version)? {
            Decoded::Frame(frame) => Ok(Some(frame)),
            Decoded::Detached(d) => {
                check_size(d.len, limits)?;
                self.pending = Some(d);
                Ok(None)
            }
        }
    }

    /// The length of the detached payload the decoder waits for, if any.
    pub fn awaiting(&self) -> Option<usize> {
        self.pending.as_ref().map(|d| d.len)
    }
}

impl Detached {
    /// The message, with `msg` as its payload.
    fn complete(self, next: Incoming<'_>) -> Result<Frame, DecodeError> {
        let Detached { msg: mut m, len } = self;
        let data = match next {
            Incoming::Binary(b) if b.len() == len => Bytes::copy_from_slice(b),
            Incoming::SharedBinary(b) if b.len() == len => b.clone(),
            // The envelope was numbered: it is consumed as an invalid
            // message (refused by id) rather than dropped, so the stream
            // does not stall behind it. The message that came instead is
            // dropped with it.
            other => {
                let e = DecodeError::DetachedMismatch {
                    expected: len,
                    actual: other.len(),
                    text: matches!(other, Incoming::Text(_)),
                };
                return Ok(Frame::Msg(Msg::invalid(
                    m.seq,
                    m.id,
                    m.ack,
                    InvalidMsg::of(&e),
                )));
            }
        };
        if m.payload.kind == PayloadKind::Json {
            let checked = check_json_depth(&data, "dj").and_then(|()| {
                serde_json::from_slice::<&RawValue>(&data)
                    .map(|_| ())
                    .map_err(|_| DecodeError::InvalidField {
                        field: "dj",
                        reason: "not a JSON value",
                    })
            });
            if let Err(e) = checked {
                return Ok(Frame::Msg(Msg::invalid(
                    m.seq,
                    m.id,
                    m.ack,
                    InvalidMsg::of(&e),
                )));
            }
        }
        m.payload.data = data;
        Ok(Frame::Msg(m))
    }
}

/// The detached payload an envelope announces, if any: its kind and length.
fn detached_of(
    dj: Option<u64>,
    dm: Option<u64>,
    db: Option<u64>,
) -> Result<Option<(PayloadKind, u64)>, DecodeError> {
    match (dj, dm, db) {
        (None, None, None) => Ok(None),
        (Some(n), None, None) => Ok(Some((PayloadKind::Json, n))),
        (None, Some(n), None) => Ok(Some((PayloadKind::MsgPack, n))),
        (None, None, Some(n)) => Ok(Some((PayloadKind::Binary, n))),
        _ => Err(DecodeError::InvalidField {
            field: "dj",
            reason: "a message carries exactly one payload",
        }),
    }
}

/// The placeholder payload of a `msg` envelope that announces a detached
/// one, checked to announce nothing else.
fn detached_payload(
    detached: Option<(PayloadKind, u64)>,
    embedded: bool,
    nested: bool,
) -> Result<Option<Payload>, DecodeError> {
    let Some((kind, _)) = detached else {
        return Ok(None);
    };
    if nested {
        return Err(DecodeError::InvalidField {
            field: "f",
            reason: "a batch holds no detached payloads",
        });
    }
    if embedded {
        return Err(DecodeError::InvalidField {
            field: "dj",
            reason: "a message carries exactly one payload",
        });
    }
    Ok(Some(Payload {
        kind,
        data: Bytes::new(),
    }))
}

/// `part` as its own `Bytes`: a slice of `backing` (no copy) when `part`
/// lies in it and is most of it, a copy otherwise, so that a small payload
/// kept by the application never pins a large frame.
fn share(backing: Option<&Bytes>, part: &[u8]) -> Bytes {
    if let Some(b) = backing {
        let start = b.as_ptr() as usize;
        let at = part.as_ptr() as usize;
        let inside = at >= start && at + part.len() <= start + b.len();
        if inside && part.len() >= SHARE_FROM && part.len() >= b.len() / 2 {
            return b.slice_ref(part);
        }
    }
    Bytes::copy_from_slice(part)
}

/// Payloads from this size up are shared with the frame they came in.
const SHARE_FROM: usize = 1024;

fn decode_text(text: &str) -> Result<Decoded, DecodeError> {
    let probe: TypeProbe<'_> = serde_json::from_str(text).map_err(|e| json_error(&e))?;
    if is_handshake(&probe.t) {
        let env: HandshakeEnvelope<'_> = serde_json::from_str(text).map_err(|e| json_error(&e))?;
        return handshake_frame(env).map(Decoded::Frame);
    }
    let env: JsonEnvelope<'_> = match serde_json::from_str(text) {
        Ok(env) => env,
        Err(e) => {
            return serde_json::from_str::<MsgProbe<'_>>(text)
                .ok()
                .and_then(MsgProbe::into_invalid)
                .map(Decoded::Frame)
                .ok_or_else(|| json_error(&e))
        }
    };
    let frame = json_frame(&env, false)?;
    Decoded::announced(frame, env.dj, env.dm, env.db)
}

fn json_payload(env: &JsonEnvelope<'_>, nested: bool) -> Result<Payload, DecodeError> {
    let embedded = env.j.is_some() || env.m.is_some() || env.b.is_some();
    if let Some(p) = detached_payload(detached_of(env.dj, env.dm, env.db)?, embedded, nested)? {
        return Ok(p);
    }
    if let Some(raw) = env.j {
        if env.m.is_some() || env.b.is_some() {
            return Err(DecodeError::InvalidField {
                field: "j",
                reason: "a message carries exactly one payload",
            });
        }
        check_json_depth(raw.get().as_bytes(), "j")?;
        return Ok(Payload {
            kind: PayloadKind::Json,
            data: Bytes::copy_from_slice(raw.get().as_bytes()),
        });
    }
    let (kind, field, text) = match (&env.m, &env.b) {
        (Some(m), None) => (PayloadKind::MsgPack, "m", m),
        (None, Some(b)) => (PayloadKind::Binary, "b", b),
        (Some(_), Some(_)) => {
            return Err(DecodeError::InvalidField {
                field: "m",
                reason: "a message carries exactly one payload",
            })
        }
        (None, None) => {
            return Err(DecodeError::MissingField {
                frame: "msg",
                field: "j",
            })
        }
    };
    let data = B64
        .decode(text.as_bytes())
        .map_err(|_| DecodeError::InvalidField {
            field,
            reason: "not valid base64",
        })?;
    Ok(Payload {
        kind,
        data: data.into(),
    })
}

/// One envelope (or a batch of them) to a frame, either codec.
macro_rules! envelope_frame {
    ($name:ident, $env:ident, $nested:ident, $payload:ident) => {{
        if $env.t == "batch" {
            return batch_frame($env.f.as_deref(), $nested, |inner| $name(inner, true));
        }
        common_frame(
            &$env.t,
            $env.seq,
            $env.id,
            $env.ack,
            $env.ts,
            $env.nonce,
            $env.from,
            $env.code,
            $env.retry,
            Extra {
                within: $env.within,
                token: $env.token.as_deref(),
                rq: $env.rq,
                rs: $env.rs,
                room: $env.r.as_deref(),
                op: $env.op.as_deref(),
            },
            || $payload($env),
        )
    }};
}

fn json_frame(env: &JsonEnvelope<'_>, nested: bool) -> Result<Frame, DecodeError> {
    let payload = |env: &JsonEnvelope<'_>| json_payload(env, nested);
    envelope_frame!(json_frame, env, nested, payload)
}

fn pack_frame(
    env: &PackEnvelope<'_>,
    nested: bool,
    backing: Option<&Bytes>,
) -> Result<Frame, DecodeError> {
    let frame = |inner: &PackEnvelope<'_>, nested| pack_frame(inner, nested, backing);
    let payload = |env: &PackEnvelope<'_>| pack_payload(env, nested, backing);
    envelope_frame!(frame, env, nested, payload)
}

fn batch_frame<E>(
    inner: Option<&[E]>,
    nested: bool,
    decode: impl Fn(&E) -> Result<Frame, DecodeError>,
) -> Result<Frame, DecodeError> {
    if nested {
        return Err(DecodeError::InvalidField {
            field: "f",
            reason: "batches do not nest",
        });
    }
    let inner = need(inner, "batch", "f")?;
    if inner.is_empty() || inner.len() > MAX_BATCH {
        return Err(DecodeError::InvalidField {
            field: "f",
            reason: "a batch holds 1 to 1024 messages",
        });
    }
    let mut msgs = Vec::with_capacity(inner.len());
    for e in inner {
        match decode(e)? {
            Frame::Msg(m) => msgs.push(m),
            _ => {
                return Err(DecodeError::InvalidField {
                    field: "f",
                    reason: "a batch holds only msg frames",
                })
            }
        }
    }
    Ok(Frame::Batch(msgs))
}

fn decode_binary(
    bytes: &[u8],
    version: u8,
    backing: Option<&Bytes>,
) -> Result<Decoded, DecodeError> {
    if bytes.len() < BINARY_HEADER_LEN {
        return Err(DecodeError::ShortHeader { len: bytes.len() });
    }
    let kind = bytes[0];
    let got = bytes[1];
    let declared = u32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]) as usize;
    let body = &bytes[BINARY_HEADER_LEN..];
    if kind != KIND_MSGPACK && kind != KIND_RAW {
        return Err(DecodeError::UnknownBinaryKind { kind });
    }
    if got != version {
        return Err(DecodeError::VersionMismatch {
            got,
            expected: version,
        });
    }
    if declared != body.len() {
        return Err(DecodeError::LengthMismatch {
            declared,
            actual: body.len(),
        });
    }
    if kind == KIND_RAW {
        return Ok(Decoded::Frame(Frame::Raw(share(backing, body))));
    }
    let mut env = PackEnvelope::default();
    if quick_pack_envelope(body, &mut env).is_none() {
        env = match serde_pack_envelope(body) {
            Ok(env) => env,
            Err(e) => {
                let mut de = rmp_serde::Deserializer::from_read_ref(body);
                de.set_max_depth(MAX_MSGPACK_DEPTH);
                return MsgProbe::deserialize(&mut de)
                    .ok()
                    .and_then(MsgProbe::into_invalid)
                    .map(Decoded::Frame)
                    .ok_or(e);
            }
        };
    }
    let frame = pack_frame(&env, false, backing)?;
    Decoded::announced(frame, env.dj, env.dm, env.db)
}

/// Panics if the quick reader accepts the envelope of `msg`, a binary
/// message, and serde reads it differently or refuses it. Returns whether
/// the quick reader took it.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn assert_quick_envelope_agrees(msg: &[u8]) -> bool {
    let Some(body) = msg
        .get(BINARY_HEADER_LEN..)
        .filter(|_| msg[0] == KIND_MSGPACK)
    else {
        return false;
    };
    let mut quick = PackEnvelope::default();
    if quick_pack_envelope(body, &mut quick).is_none() {
        return false;
    }
    let by_serde = serde_pack_envelope(body)
        .unwrap_or_else(|e| panic!("the quick reader took an envelope serde refuses: {e}"));
    // Equal envelopes serialize to the same bytes, and different ones not.
    let bytes = |env: &PackEnvelope<'_>| rmp_serde::to_vec_named(env).ok();
    assert_eq!(
        bytes(&quick),
        bytes(&by_serde),
        "the quick reader and serde read different envelopes"
    );
    true
}

/// The envelope at the start of `body`, read by serde: any form rmp-serde
/// accepts, and its errors.
fn serde_pack_envelope(body: &[u8]) -> Result<PackEnvelope<'_>, DecodeError> {
    // The header's length frames the body; the envelope is the one map at its
    // start (rmp-serde's borrowing reader cannot report where the map ended).
    let mut de = rmp_serde::Deserializer::from_read_ref(body);
    de.set_max_depth(MAX_MSGPACK_DEPTH);
    PackEnvelope::deserialize(&mut de).map_err(|e| DecodeError::MsgPack {
        message: e.to_string(),
    })
}

/// Reads the envelope the way every Kitestring peer writes it, without
/// serde: one map, string keys naming envelope fields, each once, with
/// unsigned integers, booleans, strings and `bin` values, and nothing after
/// the map. `None` as soon as anything else turns up (another key, a nil
/// or negative number, a batch, a duplicate, trailing bytes), with `env`
/// partly filled: serde then reads the body and decides. What this
/// accepts, serde reads to the same envelope; the fuzz targets check that
/// on every input.
fn quick_pack_envelope<'a>(body: &'a [u8], env: &mut PackEnvelope<'a>) -> Option<()> {
    use rmp::decode::{read_bin_len, read_bool, read_int, read_map_len, read_str_len};
    fn take<'a>(rd: &mut &'a [u8], len: u32) -> Option<&'a [u8]> {
        let (b, rest) = rd.split_at_checked(usize::try_from(len).ok()?)?;
        *rd = rest;
        Some(b)
    }
    // Keys are compared as bytes: only ASCII field names are taken, so they
    // need no UTF-8 check.
    fn key<'a>(rd: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = read_str_len(rd).ok()?;
        take(rd, len)
    }
    fn str<'a>(rd: &mut &'a [u8]) -> Option<Cow<'a, str>> {
        let len = read_str_len(rd).ok()?;
        std::str::from_utf8(take(rd, len)?).ok().map(Cow::Borrowed)
    }
    fn bin<'a>(rd: &mut &'a [u8]) -> Option<&'a serde_bytes::Bytes> {
        let len = read_bin_len(rd).ok()?;
        take(rd, len).map(serde_bytes::Bytes::new)
    }
    fn uint(rd: &mut &[u8]) -> Option<u64> {
        read_int(rd).ok()
    }
    // Each field once: serde refuses a duplicate.
    macro_rules! once {
        ($field:expr, $value:expr) => {{
            if $field.is_some() {
                return None;
            }
            $field = Some($value);
        }};
    }
    let mut rd = body;
    let fields = read_map_len(&mut rd).ok()?;
    let mut has_type = false;
    for _ in 0..fields {
        match key(&mut rd)? {
            b"t" if !has_type => {
                env.t = str(&mut rd)?;
                has_type = true;
            }
            b"seq" => once!(env.seq, uint(&mut rd)?),
            b"id" => once!(env.id, uint(&mut rd)?),
            b"ack" => once!(env.ack, uint(&mut rd)?),
            b"ts" => once!(env.ts, uint(&mut rd)?),
            b"j" => once!(env.j, str(&mut rd)?),
            b"m" => once!(env.m, bin(&mut rd)?),
            b"b" => once!(env.b, bin(&mut rd)?),
            b"nonce" => once!(env.nonce, uint(&mut rd)?),
            b"from" => once!(env.from, uint(&mut rd)?),
            b"code" => once!(env.code, read_int(&mut rd).ok()?),
            b"retry" => once!(env.retry, uint(&mut rd)?),
            b"r" => once!(env.r, str(&mut rd)?),
            b"op" => once!(env.op, str(&mut rd)?),
            b"rq" => once!(env.rq, read_bool(&mut rd).ok()?),
            b"rs" => once!(env.rs, uint(&mut rd)?),
            b"within" => once!(env.within, uint(&mut rd)?),
            b"token" => once!(env.token, str(&mut rd)?),
            b"dj" => once!(env.dj, uint(&mut rd)?),
            b"dm" => once!(env.dm, uint(&mut rd)?),
            b"db" => once!(env.db, uint(&mut rd)?),
            _ => return None,
        }
    }
    (has_type && rd.is_empty()).then_some(())
}

fn pack_payload(
    env: &PackEnvelope<'_>,
    nested: bool,
    backing: Option<&Bytes>,
) -> Result<Payload, DecodeError> {
    let embedded = env.j.is_some() || env.m.is_some() || env.b.is_some();
    if let Some(p) = detached_payload(detached_of(env.dj, env.dm, env.db)?, embedded, nested)? {
        return Ok(p);
    }
    match (&env.j, env.m, env.b) {
        (Some(j), None, None) => {
            check_json_depth(j.as_bytes(), "j")?;
            serde_json::from_str::<&RawValue>(j).map_err(|_| DecodeError::InvalidField {
                field: "j",
                reason: "not a JSON value",
            })?;
            Ok(Payload {
                kind: PayloadKind::Json,
                data: share(backing, j.as_bytes()),
            })
        }
        (None, Some(m), None) => Ok(Payload {
            kind: PayloadKind::MsgPack,
            data: share(backing, m),
        }),
        (None, None, Some(b)) => Ok(Payload {
            kind: PayloadKind::Binary,
            data: share(backing, b),
        }),
        (None, None, None) => Err(DecodeError::MissingField {
            frame: "msg",
            field: "j",
        }),
        _ => Err(DecodeError::InvalidField {
            field: "m",
            reason: "a message carries exactly one payload",
        }),
    }
}

/// Fields only some frame types use.
struct Extra<'a> {
    within: Option<u64>,
    token: Option<&'a str>,
    rq: Option<bool>,
    rs: Option<u64>,
    room: Option<&'a str>,
    op: Option<&'a str>,
}

#[allow(clippy::too_many_arguments)]
fn common_frame(
    t: &str,
    seq: Option<u64>,
    id: Option<u64>,
    ack: Option<u64>,
    ts: Option<u64>,
    nonce: Option<u64>,
    from: Option<u64>,
    code: Option<u16>,
    retry: Option<u64>,
    extra: Extra<'_>,
    payload: impl FnOnce() -> Result<Payload, DecodeError>,
) -> Result<Frame, DecodeError> {
    Ok(match t {
        "ping" => Frame::Ping {
            nonce: need(nonce, "ping", "nonce")?,
        },
        "pong" => Frame::Pong {
            nonce: need(nonce, "pong", "nonce")?,
        },
        "msg" => {
            let seq = need(seq, "msg", "seq")?;
            if seq == 0 {
                return Err(DecodeError::InvalidField {
                    field: "seq",
                    reason: "sequence numbers start at 1",
                });
            }
            let id = need(id, "msg", "id")?;
            match msg_body(&extra, payload) {
                Ok((kind, room, payload)) => Frame::Msg(Msg {
                    seq,
                    id,
                    ack,
                    ts,
                    kind,
                    room,
                    payload,
                }),
                // A size over the limit closes the connection (1009).
                Err(e @ DecodeError::TooLarge { .. }) => return Err(e),
                // Numbered but unusable: the receiver consumes its number and
                // refuses it by id (PROTOCOL.md, section 9).
                Err(e) => Frame::Msg(Msg::invalid(seq, id, ack, InvalidMsg::of(&e))),
            }
        }
        "ack" => Frame::Ack {
            ack: need(ack, "ack", "ack")?,
        },
        "replay" => {
            let from = need(from, "replay", "from")?;
            if from == 0 {
                return Err(DecodeError::InvalidField {
                    field: "from",
                    reason: "sequence numbers start at 1",
                });
            }
            Frame::Replay { from }
        }
        "goaway" => Frame::GoAway {
            code: need(code, "goaway", "code")?,
            retry_after_ms: retry,
        },
        "reauth" => Frame::Reauth {
            within_ms: need(extra.within, "reauth", "within")?,
        },
        "auth" => {
            let token = need(extra.token, "auth", "token")?;
            if token.len() > MAX_TOKEN_BYTES {
                return Err(DecodeError::InvalidField {
                    field: "token",
                    reason: "longer than 16 KiB",
                });
            }
            Frame::Auth {
                token: token.to_owned(),
            }
        }
        "" => {
            return Err(DecodeError::InvalidField {
                field: "t",
                reason: "empty frame type",
            })
        }
        "batch" => {
            return Err(DecodeError::InvalidField {
                field: "t",
                reason: "batch handled by the envelope decoder",
            })
        }
        "hello" | "welcome" | "reject" => {
            return Err(DecodeError::InvalidField {
                field: "t",
                reason: "handshake frames are JSON text only",
            })
        }
        other => Frame::Unknown(token(Cow::Borrowed(other), "t")?),
    })
}

/// What a `msg` carries besides its numbers: its kind, room and payload,
/// checked. Inlined: it is on every message's path.
#[inline(always)]
fn msg_body(
    extra: &Extra<'_>,
    payload: impl FnOnce() -> Result<Payload, DecodeError>,
) -> Result<(MsgKind, Option<std::sync::Arc<str>>, Payload), DecodeError> {
    let kind = match (extra.rq, extra.rs, extra.op) {
        (None | Some(false), None, None) => MsgKind::Plain,
        (Some(true), None, None) => MsgKind::Request,
        (None | Some(false), Some(to), None) => MsgKind::Response(to),
        (None | Some(false), Some(to), Some("refused")) => MsgKind::RefusedMessage(to),
        (None | Some(false), None, Some(op)) => match op {
            "join" => MsgKind::Join,
            "leave" => MsgKind::Leave,
            "presence" => MsgKind::Presence,
            "refused" => MsgKind::Refused,
            _ => {
                return Err(DecodeError::InvalidField {
                    field: "op",
                    reason: "unknown room operation",
                })
            }
        },
        _ => {
            return Err(DecodeError::InvalidField {
                field: "rs",
                reason: "a message has at most one of rq, rs and op",
            })
        }
    };
    let room = match extra.room {
        Some(r) if r.is_empty() || r.len() > MAX_TOKEN_LEN => {
            return Err(DecodeError::InvalidField {
                field: "r",
                reason: "room names are 1 to 256 bytes",
            })
        }
        r => r.map(std::sync::Arc::from),
    };
    if kind.needs_room() && room.is_none() {
        return Err(DecodeError::MissingField {
            frame: "msg",
            field: "r",
        });
    }
    Ok((kind, room, payload()?))
}

fn handshake_frame(env: HandshakeEnvelope<'_>) -> Result<Frame, DecodeError> {
    let versions = |v: Option<Vec<u8>>, frame: &'static str| -> Result<Vec<u8>, DecodeError> {
        let v = need(v, frame, "versions")?;
        if v.len() > MAX_LIST_LEN {
            return Err(DecodeError::InvalidField {
                field: "versions",
                reason: "more than 32 entries",
            });
        }
        Ok(v)
    };
    Ok(match &*env.t {
        "hello" => {
            let client = need(env.client, "hello", "client")?;
            let client = ClientId::from_hex(&client).ok_or(DecodeError::InvalidField {
                field: "client",
                reason: "not 32 hex digits",
            })?;
            let resume = match (env.session, env.delivered) {
                (Some(s), Some(delivered)) => Some(Resume {
                    session: SessionId::from_hex(&s).ok_or(DecodeError::InvalidField {
                        field: "session",
                        reason: "not 32 hex digits",
                    })?,
                    delivered,
                    key: resume_key(env.key)?,
                }),
                (None, None) => None,
                (Some(_), None) => {
                    return Err(DecodeError::MissingField {
                        frame: "hello",
                        field: "delivered",
                    })
                }
                (None, Some(_)) => {
                    return Err(DecodeError::MissingField {
                        frame: "hello",
                        field: "session",
                    })
                }
            };
            // Every peer speaks JSON: a hello that names no codecs gets it.
            let codecs = match env.codecs {
                None => vec![Codec::Json.name().to_owned()],
                some => token_list(some, "codecs")?,
            };
            Frame::Hello(Hello {
                versions: versions(env.versions, "hello")?,
                client,
                resume,
                caps: token_list(env.caps, "caps")?,
                codecs: codecs.iter().filter_map(|c| Codec::from_name(c)).collect(),
            })
        }
        "welcome" => {
            let codec = need(env.codec, "welcome", "codec")?;
            let session = need(env.session, "welcome", "session")?;
            Frame::Welcome(Welcome {
                version: need(env.version, "welcome", "version")?,
                codec: Codec::from_name(&codec).ok_or(DecodeError::InvalidField {
                    field: "codec",
                    reason: "unknown codec",
                })?,
                session: SessionId::from_hex(&session).ok_or(DecodeError::InvalidField {
                    field: "session",
                    reason: "not 32 hex digits",
                })?,
                resumed: env.resumed.unwrap_or(false),
                lost: env.lost.map(|l| token(l, "lost")).transpose()?,
                delivered: env.delivered.unwrap_or(0),
                features: token_list(env.features, "features")?,
                ping_interval_ms: need(env.ping_ms, "welcome", "ping_ms")?,
                pong_timeout_ms: need(env.pong_ms, "welcome", "pong_ms")?,
                max_message: need(env.max, "welcome", "max")?,
                key: resume_key(env.key)?,
            })
        }
        "reject" => Frame::Reject(Reject {
            code: need(env.code, "reject", "code")?,
            reason: token(need(env.reason, "reject", "reason")?, "reason")?,
            message: env
                .message
                .map(|m| m.chars().take(MAX_TOKEN_LEN).collect())
                .unwrap_or_default(),
            versions: env.versions.unwrap_or_default(),
            retry_after_ms: env.retry,
        }),
        _ => {
            return Err(DecodeError::InvalidField {
                field: "t",
                reason: "not a handshake frame",
            })
        }
    })
}
