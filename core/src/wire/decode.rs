//! Bytes to envelopes: routing each message to its codec, and detached
//! payloads.
//!
//! Owns [`Decoder`], which joins a `msg` or `mv` envelope to the detached
//! payload that follows it, the size check made before any parsing, the binary
//! header's checks, and the probes that still number a message whose
//! envelope did not decode. It must never panic or allocate more than the
//! message it was handed, whatever the peer sends; what an envelope's fields
//! may say is the `fields` module's to check.

#[cfg(any(feature = "msgpack-serde", feature = "json-serde"))]
use std::borrow::Cow;
#[cfg(any(feature = "msgpack-serde", feature = "json-serde"))]
use std::fmt;

use bytes::Bytes;
#[cfg(any(feature = "msgpack-serde", feature = "json-serde"))]
use serde::Deserialize;

use super::compress::Inflation;
#[cfg(feature = "compression")]
use super::compress::{KIND_DEFLATE_RAW, NOT_AGREED, RAW_LEN_PREFIX};
#[cfg(any(feature = "msgpack-serde", feature = "json-serde"))]
use super::envelope::bounded_batch;
use super::envelope::{HandshakeEnvelope, JsonEnvelope, PackEnvelope};
use super::fields::{
    check_json_depth, detached_of, handshake_frame, json_frame, pack_frame, share,
};
use super::json::{
    json_value, quick_json_envelope, quick_json_handshake, quick_json_type, JsonReader,
};
use super::quick::quick_pack_envelope;
#[cfg(feature = "msgpack-serde")]
use super::quick::serde_pack_envelope;
#[cfg(feature = "msgpack-serde")]
use super::MAX_MSGPACK_DEPTH;
use super::{
    DecodeError, Frame, Incoming, InvalidMsg, Limits, MapValue, Msg, Payload, PayloadKind,
    BINARY_HEADER_LEN, KIND_MSGPACK, KIND_RAW,
};

/// An envelope's `z`: the length its payload inflates to, if compressed
/// (always `None` without the `compression` feature, which reads no `z`).
macro_rules! z_of {
    ($env:expr) => {{
        #[cfg(feature = "compression")]
        let z = $env.z;
        #[cfg(not(feature = "compression"))]
        let z: Option<u64> = None;
        z
    }};
}

/// A message or detached payload of `size` bytes is within the limit.
pub(super) fn check_size(size: usize, limits: &Limits) -> Result<(), DecodeError> {
    if size > limits.max_message {
        return Err(DecodeError::TooLarge {
            size,
            max: limits.max_message,
        });
    }
    Ok(())
}

pub(super) fn decode_one(
    msg: Incoming<'_>,
    version: u8,
    zip: Inflation,
) -> Result<Decoded, DecodeError> {
    match msg {
        Incoming::Text(text) => decode_text(text, zip),
        Incoming::Binary(bytes) => decode_binary(bytes, version, None, zip),
        Incoming::SharedBinary(bytes) => decode_binary(bytes, version, Some(bytes), zip),
    }
}

/// One decoded message: a frame, or a `msg` or `mv` envelope whose payload
/// is the next message.
pub(super) enum Decoded {
    Frame(Frame),
    Detached(Box<Detached>),
}

/// A `msg` or `mv` envelope waiting for its detached payload.
#[derive(Debug)]
pub(super) struct Detached {
    frame: Waiting,
    len: usize,
    /// A deflated payload (`z`): its length once inflated, and what the
    /// receiver allows.
    inflate: Option<(u64, Inflation)>,
}

/// The frame a detached payload completes: its payload (an `mv`'s value)
/// has the announced kind and no bytes yet.
#[derive(Debug)]
enum Waiting {
    /// Numbered: what goes wrong with its payload makes it an invalid
    /// message, to be refused by id.
    Msg(Msg),
    /// Not numbered: what goes wrong with its value is a decode failure.
    MapValue(MapValue),
}

impl Decoded {
    /// `frame`, or the detached message it is if its envelope announced a
    /// detached payload; a numbered `msg` whose announcement is malformed
    /// is consumed as an invalid message.
    fn announced(
        frame: Frame,
        [dj, dm, db]: [Option<u64>; 3],
        z: Option<u64>,
        zip: Inflation,
    ) -> Result<Self, DecodeError> {
        // The frame is not moved through a tuple: it is large, and this is
        // every message's path.
        let e = match detached_of(dj, dm, db) {
            Ok(detached) => return Ok(Decoded::of(frame, detached, z.map(|z| (z, zip)))),
            Err(e) => e,
        };
        match frame {
            Frame::Msg(m) if !closes(&e) => Ok(Decoded::Frame(Frame::Msg(Msg::invalid(
                m.seq,
                m.id,
                m.ack,
                InvalidMsg::of(&e),
            )))),
            _ => Err(e),
        }
    }

    /// `frame`, or the detached message it is if the envelope announced a
    /// detached payload of `detached` bytes (`inflate`: deflated).
    fn of(
        frame: Frame,
        detached: Option<(PayloadKind, u64)>,
        inflate: Option<(u64, Inflation)>,
    ) -> Self {
        let len = |len: u64| usize::try_from(len).unwrap_or(usize::MAX);
        match (frame, detached) {
            (Frame::Msg(msg), Some((_, n))) => Decoded::Detached(Box::new(Detached {
                frame: Waiting::Msg(msg),
                len: len(n),
                inflate,
            })),
            (Frame::MapValue(v), Some((_, n))) if v.value.is_some() => {
                Decoded::Detached(Box::new(Detached {
                    frame: Waiting::MapValue(v),
                    len: len(n),
                    inflate,
                }))
            }
            (frame, _) => Decoded::Frame(frame),
        }
    }
}

/// Decodes the messages of one connection in order (PROTOCOL.md, section
/// 2.1): a `msg` or `mv` envelope with a detached payload (`dj`, `dm` or
/// `db`) waits here until the next message, its payload, arrives, so a large
/// payload travels in a message of its own, never copied into an envelope
/// and, received, shared with the transport's buffer. Machines keep one per
/// connection; for anything else it behaves as [`decode`].
///
/// [`decode`]: fn@super::decode
#[derive(Debug, Default)]
pub struct Decoder {
    pending: Option<Box<Detached>>,
    /// The connection agreed on compression (PROTOCOL.md, section 2.2).
    compression: bool,
}

impl Decoder {
    /// A decoder with nothing pending, taking no compressed payloads.
    pub fn new() -> Self {
        Decoder::default()
    }

    /// Whether the connection agreed on compression ([`CAP_DEFLATE`]):
    /// from now on, compressed payloads and datagrams are inflated (never
    /// past the limit the messages are decoded with); until then, one is a
    /// [`DecodeError::Compression`].
    ///
    /// [`CAP_DEFLATE`]: super::CAP_DEFLATE
    pub fn set_compression(&mut self, agreed: bool) {
        self.compression = agreed;
    }

    /// Whether compressed payloads are taken ([`set_compression`](Self::set_compression)).
    pub fn compression(&self) -> bool {
        self.compression
    }

    /// Decodes the next message of the connection. `Ok(None)`: it was a
    /// `msg` or `mv` envelope whose payload is the next message.
    ///
    /// A detached payload longer than `limits.max_message` fails at the
    /// envelope. If the next message is not the payload (text, or another
    /// length), it is dropped and a `msg` envelope, numbered, comes out as
    /// a [`MsgKind::Invalid`] message saying
    /// [`DecodeError::DetachedMismatch`], for the receiver to consume and
    /// refuse; an `mv`, not numbered, fails with that error.
    ///
    /// [`MsgKind::Invalid`]: super::MsgKind::Invalid
    pub fn decode(
        &mut self,
        msg: Incoming<'_>,
        limits: &Limits,
    ) -> Result<Option<Frame>, DecodeError> {
        if let Some(pending) = self.pending.take() {
            return pending.complete(msg).map(Some);
        }
        check_size(msg.len(), limits)?;
        let zip = Inflation::new(self.compression, limits.max_message);
        match decode_one(msg, limits.version, zip)? {
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

impl Waiting {
    /// The frame with `data` as its payload.
    fn with(self, data: Bytes) -> Frame {
        let fill = |p: &mut Payload| p.data = data;
        match self {
            Waiting::Msg(mut m) => {
                fill(&mut m.payload);
                Frame::Msg(m)
            }
            Waiting::MapValue(mut v) => {
                if let Some(p) = v.value.as_mut() {
                    fill(p);
                }
                Frame::MapValue(v)
            }
        }
    }

    /// What `e`, an error of the payload, makes of the frame: a numbered
    /// message is consumed as an invalid one (refused by id) rather than
    /// dropped, so the stream does not stall behind it; a map value fails.
    fn failed(self, e: DecodeError) -> Result<Frame, DecodeError> {
        match self {
            Waiting::Msg(m) => Ok(Frame::Msg(Msg::invalid(
                m.seq,
                m.id,
                m.ack,
                InvalidMsg::of(&e),
            ))),
            Waiting::MapValue(_) => Err(e),
        }
    }

    fn kind(&self) -> Option<PayloadKind> {
        match self {
            Waiting::Msg(m) => Some(m.payload.kind),
            Waiting::MapValue(v) => v.value.as_ref().map(Payload::kind),
        }
    }
}

impl Detached {
    /// The frame, with `next` as its payload.
    fn complete(self, next: Incoming<'_>) -> Result<Frame, DecodeError> {
        let Detached {
            frame,
            len,
            inflate,
        } = self;
        let data = match next {
            Incoming::Binary(b) if b.len() == len => Bytes::copy_from_slice(b),
            Incoming::SharedBinary(b) if b.len() == len => b.clone(),
            // The message that came instead is dropped with the envelope.
            other => {
                return frame.failed(DecodeError::DetachedMismatch {
                    expected: len,
                    actual: other.len(),
                    text: matches!(other, Incoming::Text(_)),
                });
            }
        };
        // A deflated payload is inflated first; one that does not inflate
        // as announced closes the connection (1002).
        #[cfg(feature = "compression")]
        let data = match inflate {
            Some((z, zip)) => Bytes::from(zip.inflate(&data, z)?),
            None => data,
        };
        #[cfg(not(feature = "compression"))]
        let _ = inflate;
        if frame.kind() == Some(PayloadKind::Json) {
            let checked = check_json_depth(&data, "dj").and_then(|()| {
                json_value(&data)
                    .map(|_| ())
                    .map_err(|_| DecodeError::InvalidField {
                        field: "dj",
                        reason: "not a JSON value",
                    })
            });
            if let Err(e) = checked {
                return frame.failed(e);
            }
        }
        Ok(frame.with(data))
    }
}

/// Whether a payload's error closes the connection rather than being
/// refused by id: over the size limit (1009), or a compressed payload that
/// cannot be taken (1002).
pub(super) fn closes(e: &DecodeError) -> bool {
    matches!(
        e,
        DecodeError::TooLarge { .. } | DecodeError::Compression { .. }
    )
}

fn decode_text(text: &str, zip: Inflation) -> Result<Decoded, DecodeError> {
    // The hand-written reader first; serde (with `json-serde`) for anything
    // it leaves, as before it.
    let mut rd = JsonReader::new(text);
    let quick_type = quick_json_type(&mut rd);
    let mut rd = JsonReader::new(text);
    if quick_type.as_deref().is_some_and(is_handshake) {
        let mut env = HandshakeEnvelope::default();
        if quick_json_handshake(&mut rd, &mut env).is_some() {
            return handshake_frame(env).map(Decoded::Frame);
        }
    } else if quick_type.is_some() {
        let mut env = JsonEnvelope::default();
        if quick_json_envelope(&mut rd, &mut env).is_some() {
            let frame = json_frame(&env, false, zip)?;
            return Decoded::announced(frame, [env.dj, env.dm, env.db], z_of!(env), zip);
        }
    }
    serde_text(text, rd.position(), zip)
}

/// serde's reading of a text message the hand-written reader left.
#[cfg(feature = "json-serde")]
fn serde_text(text: &str, _: usize, zip: Inflation) -> Result<Decoded, DecodeError> {
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
    let frame = json_frame(&env, false, zip)?;
    Decoded::announced(frame, [env.dj, env.dm, env.db], z_of!(env), zip)
}

/// Without serde, only envelopes in the forms the hand-written reader takes
/// are read; the error is placed where it gave up (`at`).
#[cfg(not(feature = "json-serde"))]
fn serde_text(text: &str, at: usize, _: Inflation) -> Result<Decoded, DecodeError> {
    let before = &text.as_bytes()[..at.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count();
    let column = before.len()
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
    Err(DecodeError::Json {
        line: line + 1,
        column: column + 1,
        message: "not a JSON envelope in a form this build reads".into(),
    })
}

fn decode_binary(
    bytes: &[u8],
    version: u8,
    backing: Option<&Bytes>,
    zip: Inflation,
) -> Result<Decoded, DecodeError> {
    if bytes.len() < BINARY_HEADER_LEN {
        return Err(DecodeError::ShortHeader { len: bytes.len() });
    }
    let kind = bytes[0];
    let got = bytes[1];
    let declared = u32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]) as usize;
    let body = &bytes[BINARY_HEADER_LEN..];
    let deflated = cfg!(feature = "compression") && kind == super::KIND_DEFLATE_RAW;
    if kind != KIND_MSGPACK && kind != KIND_RAW && !deflated {
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
    #[cfg(feature = "compression")]
    if kind == KIND_DEFLATE_RAW {
        return deflated_datagram(body, zip).map(Decoded::Frame);
    }
    let mut env = PackEnvelope::default();
    if quick_pack_envelope(body, &mut env).is_none() {
        env = match fallback(body)? {
            Fallback::Envelope(env) => env,
            Fallback::Invalid(frame) => return Ok(Decoded::Frame(frame)),
        };
    }
    let frame = pack_frame(&env, false, backing, zip)?;
    Decoded::announced(frame, [env.dj, env.dm, env.db], z_of!(env), zip)
}

/// A compressed datagram's body: its inflated length (u32 little-endian),
/// then the deflate stream.
#[cfg(feature = "compression")]
fn deflated_datagram(body: &[u8], zip: Inflation) -> Result<Frame, DecodeError> {
    if !zip.agreed {
        return Err(NOT_AGREED);
    }
    let Some((len, stream)) = body.split_first_chunk::<RAW_LEN_PREFIX>() else {
        return Err(DecodeError::Compression {
            reason: "a compressed datagram shorter than its length",
        });
    };
    let data = zip.inflate(stream, u64::from(u32::from_le_bytes(*len)))?;
    Ok(Frame::Raw(Bytes::from(data)))
}

/// What the fallback made of a MessagePack body the quick reader left
/// (without `msgpack-serde`, nothing: it is always an error).
#[cfg_attr(not(feature = "msgpack-serde"), allow(dead_code))]
// Returned on the rare path only, and taken apart at once.
#[allow(clippy::large_enum_variant)]
enum Fallback<'a> {
    Envelope(PackEnvelope<'a>),
    /// Not an envelope serde reads either, but a `msg` (or a batch of them)
    /// whose numbers could be read: consumed as invalid.
    Invalid(Frame),
}

/// serde's reading of a body the quick reader left, or, if serde refuses
/// it too, the numbered invalid message it stands for if it is one.
#[cfg(feature = "msgpack-serde")]
fn fallback(body: &[u8]) -> Result<Fallback<'_>, DecodeError> {
    match serde_pack_envelope(body) {
        Ok(env) => Ok(Fallback::Envelope(env)),
        Err(e) => {
            let mut de = rmp_serde::Deserializer::from_read_ref(body);
            de.set_max_depth(MAX_MSGPACK_DEPTH);
            MsgProbe::deserialize(&mut de)
                .ok()
                .and_then(MsgProbe::into_invalid)
                .map(Fallback::Invalid)
                .ok_or(e)
        }
    }
}

/// Without serde, only the form Kitestring writes is read.
#[cfg(not(feature = "msgpack-serde"))]
fn fallback(_body: &[u8]) -> Result<Fallback<'_>, DecodeError> {
    Err(DecodeError::MsgPack {
        message: "not an envelope in the form Kitestring writes".into(),
    })
}

/// The numbers of a `msg` (or of a batch's) whose envelope did not decode:
/// read again with every other field ignored, so that a message with a
/// malformed field still has its sequence number consumed (as a
/// [`MsgKind::Invalid`] message) instead of stalling the stream.
///
/// [`MsgKind::Invalid`]: super::MsgKind::Invalid
#[cfg(any(feature = "msgpack-serde", feature = "json-serde"))]
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
#[cfg(any(feature = "msgpack-serde", feature = "json-serde"))]
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

#[cfg(any(feature = "msgpack-serde", feature = "json-serde"))]
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
#[cfg(feature = "json-serde")]
#[derive(Deserialize)]
struct TypeProbe<'a> {
    #[serde(borrow)]
    t: Cow<'a, str>,
}

fn is_handshake(t: &str) -> bool {
    matches!(t, "hello" | "welcome" | "reject")
}

#[cfg(feature = "json-serde")]
fn json_error(e: &serde_json::Error) -> DecodeError {
    DecodeError::Json {
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    }
}
