//! Bodies of the fuzz targets that exercise this crate on its own.
//!
//! Compiled only with the `fuzzing` feature, so that ordinary builds and
//! `cargo test --features fuzzing` keep them compiling and their regression
//! tests running; the files in `fuzz/fuzz_targets/` only forward to the
//! functions here. Every target asserts: a panic here is a finding. Inputs
//! are `(setup, Vec<op>)` values built with [`arbitrary`], and the checks
//! run after every op.
//!
//! This module never changes the machines' behaviour: it drives them through
//! their public API only, as a driver would.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use arbitrary::Arbitrary;
use bytes::Bytes;
use core::time::Duration;

use crate::client::{Client, Event, Output, State, TransportError, TransportId};
use crate::close::CloseCode;
use crate::config::{ClientConfig, QueueConfig, ServerConfig};
use crate::reliable::{OverflowPolicy, ReliabilityConfig, SendError};
use crate::server::{Server, ServerOutput};
use crate::time::Instant;
use crate::wire::{
    self, ClientId, Codec, DecodeError, Frame, Hello, Incoming, Limits, Msg, MsgKind, Payload,
    Reject, Resume, ResumeKey, SessionId, Transmit, Welcome, BINARY_HEADER_LEN, KIND_MSGPACK,
    PROTOCOL_VERSION,
};

mod lww;
mod seeds;
mod server;
mod stream;
#[cfg(test)]
mod tests;

pub use lww::{lww_merge, ArbUpdate, Schedule};
pub use seeds::seed_messages;
pub use server::{server_machine, ClientFrame, ServerHarness, ServerOp, ServerSetup};
pub use stream::{
    server_stream, BadHello, DropKind, Poison, StreamHarness, StreamOp, StreamSetup, WrongDelivered,
};

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// The message size limit the decode targets configure. Inputs longer than
/// this must be refused with [`DecodeError::TooLarge`] before any parsing.
pub const FUZZ_MAX_MESSAGE: usize = 2048;

/// Heap the decoder may use per input byte, beyond [`ALLOC_SLACK`]. Parsing
/// builds owned strings, lists of tokens (24 bytes for each entry of at
/// least 3 input bytes, doubled by vector growth) and payload copies, so a
/// small constant factor is expected; anything more would mean an attacker
/// can make the decoder allocate out of proportion to what it sent.
pub const ALLOC_PER_BYTE: usize = 24;

/// Heap the decoder may use whatever the input (error messages and the like).
pub const ALLOC_SLACK: usize = 8 * 1024;

/// Measures heap use around a call. The fuzz crate implements it with a
/// counting global allocator; [`NoProbe`] measures nothing.
pub trait AllocProbe {
    /// Starts a measurement: the peak is reset to the current use.
    fn reset(&self);
    /// The largest number of bytes allocated at once since [`reset`](Self::reset),
    /// above what was allocated at the time of the reset.
    fn peak(&self) -> usize;
}

/// An [`AllocProbe`] that measures nothing (for unit tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProbe;

impl AllocProbe for NoProbe {
    fn reset(&self) {}
    fn peak(&self) -> usize {
        0
    }
}

/// A handshake header's value (`hello` or its answer), which must be
/// printable ASCII, decoded.
fn header_frame(value: &str) -> Result<Frame, DecodeError> {
    assert!(
        value.bytes().all(|b| (0x20..0x7f).contains(&b)),
        "a handshake header is not printable ASCII: {value}"
    );
    wire::decode(Incoming::Text(value), &limits())
}

fn limits() -> Limits {
    Limits {
        max_message: FUZZ_MAX_MESSAGE,
        version: PROTOCOL_VERSION,
    }
}

/// Target `decode_json`: arbitrary bytes as a text message (invalid UTF-8 is
/// replaced, as a WebSocket library would refuse it before us).
pub fn decode_json(data: &[u8], probe: &dyn AllocProbe) {
    let text = String::from_utf8_lossy(data);
    check_decode(Incoming::Text(&text), &limits(), probe);
}

/// Target `decode_msgpack`: arbitrary bytes as the body of a binary message
/// behind a valid MessagePack header, so the fuzzer spends its time in the
/// envelope parser rather than on the header.
pub fn decode_msgpack(data: &[u8], probe: &dyn AllocProbe) {
    let mut msg = Vec::with_capacity(BINARY_HEADER_LEN + data.len());
    msg.push(KIND_MSGPACK);
    msg.push(PROTOCOL_VERSION);
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    msg.extend_from_slice(&len.to_le_bytes());
    msg.extend_from_slice(data);
    check_decode(Incoming::Binary(&msg), &limits(), probe);
}

/// Target `decode_binary_header`: arbitrary bytes as a whole binary message,
/// header included.
pub fn decode_binary_header(data: &[u8], probe: &dyn AllocProbe) {
    check_decode(Incoming::Binary(data), &limits(), probe);
}

/// Target `pack_envelope`: a MessagePack envelope map built from arbitrary
/// entries (known and unknown keys, field indexes, every kind of value in
/// every width), sometimes with a wrong entry count, a wider map header or
/// bytes after the map. Most are close to what Kitestring writes, so the
/// hand-written envelope reader and serde are compared right at the border
/// of what the reader takes (see [`check_decode`]).
///
/// Returns whether the hand-written reader took the envelope.
pub fn pack_envelope(env: &ArbEnvelope, probe: &dyn AllocProbe) -> bool {
    let mut body = Vec::new();
    let entries = env.entries.len() + usize::from(env.t.is_some());
    let count = u32::try_from(entries)
        .unwrap_or(u32::MAX)
        .saturating_add_signed(i32::from(env.miscount.unwrap_or(0)));
    match env.header % 4 {
        0 => {
            let _ = rmp::encode::write_map_len(&mut body, count);
        }
        1 => {
            body.push(0xde);
            body.extend_from_slice(&(count as u16).to_be_bytes());
        }
        2 => {
            body.push(0xdf);
            body.extend_from_slice(&count.to_be_bytes());
        }
        _ => {
            let _ = rmp::encode::write_array_len(&mut body, count);
        }
    }
    if let Some((name, width)) = env.t {
        write_str_as(&mut body, b"t", Width::Smallest);
        ArbValue::Name(name, width).write(&mut body);
    }
    for (key, value) in &env.entries {
        key.write(&mut body);
        value.write(&mut body);
    }
    if let Some(trailing) = &env.trailing {
        body.extend_from_slice(trailing);
    }
    let mut msg = Vec::with_capacity(BINARY_HEADER_LEN + body.len());
    msg.push(KIND_MSGPACK);
    msg.push(PROTOCOL_VERSION);
    msg.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
    msg.extend_from_slice(&body);
    check_decode(Incoming::Binary(&msg), &limits(), probe);
    msg.len() <= FUZZ_MAX_MESSAGE && wire::assert_quick_envelope_agrees(&msg)
}

/// Input of the `pack_envelope` target.
#[derive(Arbitrary, Debug)]
pub struct ArbEnvelope {
    /// The `t` entry, first: one of [`PACK_NAMES`].
    t: Option<(u8, Width)>,
    entries: Vec<(ArbKey, ArbValue)>,
    /// Added to the entry count the header declares.
    miscount: Option<i8>,
    /// fixmap or the smallest, map16, map32, or an array.
    header: u8,
    trailing: Option<Vec<u8>>,
}

/// The envelope's field names, and a few others.
const PACK_KEYS: &[&str] = &[
    "t", "seq", "id", "ack", "ts", "j", "m", "b", "nonce", "from", "code", "retry", "r", "op",
    "rq", "rs", "within", "token", "f", "dj", "dm", "db", "", "T", "seq\0", "x",
];

/// The frame types and room operations, as `t` and `op` values.
const PACK_NAMES: &[&str] = &[
    "msg", "ack", "ping", "pong", "batch", "replay", "goaway", "reauth", "auth", "hello",
    "welcome", "reject", "join", "leave", "presence", "refused", "{}", "1", "\"a\"",
];

/// A map key of the `pack_envelope` target: one of [`PACK_KEYS`] as a str
/// of the given width, unless `other` says otherwise.
#[derive(Arbitrary, Debug)]
pub struct ArbKey {
    known: u8,
    width: Width,
    other: Option<OtherKey>,
}

/// A key that is not a field name as a plain str.
#[derive(Arbitrary, Debug)]
pub enum OtherKey {
    /// Any bytes, as a str.
    Bytes(Vec<u8>),
    /// A field index, as rmp-serde also accepts.
    Index(u8),
}

/// A value of the `pack_envelope` target.
#[derive(Arbitrary, Debug)]
pub enum ArbValue {
    /// nil.
    Nil,
    /// true or false.
    Bool(bool),
    /// An unsigned integer, in the smallest form or a given width.
    Uint(u64, Width),
    /// A signed integer, in the smallest form or a given width.
    Int(i64, Width),
    /// A float.
    Float(f64),
    /// One of [`PACK_NAMES`], as a str of the given width.
    Name(u8, Width),
    /// Any bytes, as a str.
    Str(Vec<u8>),
    /// Any bytes, as a bin of the given width.
    Bin(Vec<u8>, Width),
    /// An array or a map header with that many entries, and nothing in it.
    Array(u8),
    /// See [`ArbValue::Array`].
    Map(u8),
}

/// Which encoding of a value: the smallest, or a given number of bytes.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Width {
    /// The smallest form.
    Smallest,
    /// 8 bits.
    W8,
    /// 16 bits.
    W16,
    /// 32 bits.
    W32,
    /// 64 bits.
    W64,
}

fn write_str_as(out: &mut Vec<u8>, s: &[u8], width: Width) {
    let len = s.len();
    match width {
        Width::W8 if len <= 0xff => out.extend_from_slice(&[0xd9, len as u8]),
        Width::W16 if len <= 0xffff => {
            out.push(0xda);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        Width::W32 | Width::W64 => {
            out.push(0xdb);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
        _ => {
            let _ = rmp::encode::write_str_len(out, len as u32);
        }
    }
    out.extend_from_slice(s);
}

impl ArbKey {
    fn write(&self, out: &mut Vec<u8>) {
        match &self.other {
            None => {
                let key = PACK_KEYS[usize::from(self.known) % PACK_KEYS.len()];
                write_str_as(out, key.as_bytes(), self.width);
            }
            Some(OtherKey::Bytes(b)) => write_str_as(out, b, Width::Smallest),
            Some(OtherKey::Index(i)) => {
                let _ = rmp::encode::write_uint(out, u64::from(*i));
            }
        }
    }
}

impl ArbValue {
    fn write(&self, out: &mut Vec<u8>) {
        use rmp::encode as e;
        let _ = match *self {
            ArbValue::Nil => e::write_nil(out).map_err(drop),
            ArbValue::Bool(b) => e::write_bool(out, b).map_err(drop),
            ArbValue::Uint(v, w) => match w {
                Width::Smallest => e::write_uint(out, v).map(drop).map_err(drop),
                Width::W8 => e::write_u8(out, v as u8).map_err(drop),
                Width::W16 => e::write_u16(out, v as u16).map_err(drop),
                Width::W32 => e::write_u32(out, v as u32).map_err(drop),
                Width::W64 => e::write_u64(out, v).map_err(drop),
            },
            ArbValue::Int(v, w) => match w {
                Width::Smallest => e::write_sint(out, v).map(drop).map_err(drop),
                Width::W8 => e::write_i8(out, v as i8).map_err(drop),
                Width::W16 => e::write_i16(out, v as i16).map_err(drop),
                Width::W32 => e::write_i32(out, v as i32).map_err(drop),
                Width::W64 => e::write_i64(out, v).map_err(drop),
            },
            ArbValue::Float(f) => e::write_f64(out, f).map_err(drop),
            ArbValue::Name(i, w) => {
                write_str_as(
                    out,
                    PACK_NAMES[usize::from(i) % PACK_NAMES.len()].as_bytes(),
                    w,
                );
                Ok(())
            }
            ArbValue::Str(ref b) => {
                write_str_as(out, b, Width::Smallest);
                Ok(())
            }
            ArbValue::Bin(ref b, w) => {
                let len = b.len();
                match w {
                    Width::W16 if len <= 0xffff => {
                        out.push(0xc5);
                        out.extend_from_slice(&(len as u16).to_be_bytes());
                    }
                    Width::W32 | Width::W64 => {
                        out.push(0xc6);
                        out.extend_from_slice(&(len as u32).to_be_bytes());
                    }
                    _ => {
                        let _ = e::write_bin_len(out, len as u32);
                    }
                }
                out.extend_from_slice(b);
                Ok(())
            }
            ArbValue::Array(n) => e::write_array_len(out, u32::from(n))
                .map(drop)
                .map_err(drop),
            ArbValue::Map(n) => e::write_map_len(out, u32::from(n)).map(drop).map_err(drop),
        };
    }
}

/// Decodes one message and checks everything the decoder promises: the size
/// limit comes first, no panic, bounded allocation, and whatever decodes
/// re-encodes to a message that decodes to an equal frame.
pub fn check_decode(msg: Incoming<'_>, limits: &Limits, probe: &dyn AllocProbe) -> Option<Frame> {
    probe.reset();
    let result = wire::decode(msg, limits);
    let peak = probe.peak();
    if msg.len() > limits.max_message {
        assert_eq!(
            result,
            Err(DecodeError::TooLarge {
                size: msg.len(),
                max: limits.max_message
            }),
            "an oversized message must be refused before parsing"
        );
        assert!(
            peak <= 256,
            "refusing an oversized message allocated {peak} bytes"
        );
        return None;
    }
    let bound = ALLOC_PER_BYTE * msg.len() + ALLOC_SLACK;
    assert!(
        peak <= bound,
        "decoding {} bytes allocated {peak} bytes at peak (bound {bound})",
        msg.len()
    );
    if let Incoming::Binary(b) = msg {
        // Whatever envelope the quick MessagePack reader takes, serde reads
        // the same way.
        wire::assert_quick_envelope_agrees(b);
        // Decoding from a shared buffer (payloads sliced, not copied) must
        // give exactly the same frame or error.
        let shared = bytes::Bytes::copy_from_slice(b);
        assert_eq!(
            wire::decode(Incoming::SharedBinary(&shared), limits),
            result,
            "shared and copied decoding disagree"
        );
    }
    check_stream_decoder(msg, limits, &result);
    let frame = result.ok()?;
    let codec = match msg {
        Incoming::Text(_) => Codec::Json,
        Incoming::Binary(_) | Incoming::SharedBinary(_) => Codec::MsgPack,
    };
    assert_round_trip(&frame, codec, limits.version);
    Some(frame)
}

/// A connection's [`wire::Decoder`] agrees with [`wire::decode`] on a first
/// message; where `decode` refuses a detached envelope, the decoder waits
/// for its payload, and a payload of the announced length completes it
/// (or makes it an invalid message, for a `dj` payload that is not JSON).
fn check_stream_decoder(msg: Incoming<'_>, limits: &Limits, result: &Result<Frame, DecodeError>) {
    let mut decoder = wire::Decoder::new();
    let streamed = decoder.decode(msg, limits);
    match (streamed, result) {
        (Ok(Some(a)), Ok(b)) => assert_eq!(&a, b, "the stream decoder disagrees"),
        (Ok(None), Err(DecodeError::InvalidField { field: "dj", .. })) => {
            let Some(len) = decoder.awaiting() else {
                panic!("the decoder waits, but for no payload");
            };
            if len > 1 << 16 {
                return;
            }
            // Digits: a JSON value too, for a `dj` payload.
            let payload = Bytes::from(vec![b'1'; len]);
            match decoder.decode(Incoming::SharedBinary(&payload), limits) {
                // Nothing is not a JSON value: a `dj` payload of no bytes
                // makes the message invalid, to be refused by id.
                Ok(Some(Frame::Msg(m))) if len == 0 && matches!(m.kind, MsgKind::Invalid(_)) => {
                    assert_round_trip(&Frame::Msg(m), Codec::MsgPack, limits.version);
                }
                Ok(Some(Frame::Msg(m))) => {
                    assert_eq!(m.payload.data(), &payload, "the payload changed");
                    assert_round_trip(&Frame::Msg(m), Codec::MsgPack, limits.version);
                }
                Err(DecodeError::InvalidField { field: "dj", .. }) if len == 0 => {}
                other => panic!("a detached payload of {len} bytes gave {other:?}"),
            }
            assert_eq!(decoder.awaiting(), None);
        }
        (
            Err(DecodeError::TooLarge { size, max }),
            Err(DecodeError::InvalidField { field: "dj", .. }),
        ) => {
            assert!(size > max, "refused a detached payload within the limit");
        }
        (Err(a), Err(b)) => assert_eq!(&a, b, "the stream decoder disagrees"),
        (a, b) => panic!("the stream decoder gave {a:?}, decode gave {b:?}"),
    }
}

/// Whether `frame` is or holds a numbered `msg` that did not decode
/// otherwise ([`MsgKind::Invalid`]): the receiver refuses it by id, and
/// nothing ever sends it.
fn holds_invalid(frame: &Frame) -> bool {
    let invalid = |m: &Msg| {
        let yes = matches!(m.kind, MsgKind::Invalid(_));
        assert!(
            !yes || m.seq > 0,
            "an invalid message without its number: {m:?}"
        );
        yes
    };
    match frame {
        Frame::Msg(m) => invalid(m),
        Frame::Batch(ms) => ms.iter().filter(|m| invalid(m)).count() > 0,
        _ => false,
    }
}

/// Checks that `frame` encodes with `codec`, that the encoding decodes to an
/// equal frame, and that encoding that frame again gives the same bytes.
/// Unknown frames, and messages that decoded as invalid (numbered, to be
/// refused by id), must refuse to encode.
pub fn assert_round_trip(frame: &Frame, codec: Codec, version: u8) {
    let unsendable = matches!(frame, Frame::Unknown(_)) || holds_invalid(frame);
    let encoded = match wire::encode(frame, codec, version) {
        Ok(t) => t,
        Err(e) => {
            assert!(
                unsendable,
                "{frame:?} decoded but does not encode with {codec:?}: {e}"
            );
            return;
        }
    };
    assert!(
        !unsendable,
        "an unknown frame or an invalid message was encoded: {frame:?}"
    );
    let want_text = match frame {
        Frame::Hello(_) | Frame::Welcome(_) | Frame::Reject(_) => true,
        Frame::Raw(_) => false,
        _ => codec == Codec::Json,
    };
    assert_eq!(
        matches!(encoded, Transmit::Text(_)),
        want_text,
        "{frame:?} with {codec:?} went out as {encoded:?}"
    );
    if let Transmit::Text(b) = &encoded {
        assert!(std::str::from_utf8(b).is_ok(), "text transmit is not UTF-8");
    }
    let open = Limits {
        max_message: usize::MAX,
        version,
    };
    let back = match wire::decode(encoded.as_incoming(), &open) {
        Ok(f) => f,
        Err(e) => panic!("{frame:?} encoded with {codec:?} as {encoded:?} does not decode: {e}"),
    };
    assert_eq!(
        &back, frame,
        "round trip through {codec:?} changed the frame"
    );
    match wire::encode(&back, codec, version) {
        Ok(again) => assert_eq!(again, encoded, "encoding is not canonical"),
        Err(e) => panic!("re-encoding failed: {e}"),
    }
    if let Frame::Msg(m) = frame {
        // The same message with its payload detached comes back equal too.
        let pair = match wire::encode_detached(m, codec, version) {
            Ok(pair) => pair,
            Err(e) => panic!("{frame:?} does not encode detached with {codec:?}: {e}"),
        };
        let mut decoder = wire::Decoder::new();
        assert_eq!(
            decoder.decode(pair[0].as_incoming(), &open),
            Ok(None),
            "a detached envelope did not wait for its payload"
        );
        assert_eq!(
            decoder.decode(pair[1].as_incoming(), &open),
            Ok(Some(frame.clone())),
            "round trip detached through {codec:?} changed the frame"
        );
    }
}

// ---------------------------------------------------------------------------
// Structured frames
// ---------------------------------------------------------------------------

/// A JSON value small enough to generate, for payloads.
#[derive(Arbitrary, Clone, Debug)]
pub enum ArbJson {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float; non-finite values become `0`.
    Float(f64),
    /// A string.
    Str(String),
    /// An array.
    Array(Vec<ArbJson>),
    /// An object.
    Object(Vec<(String, ArbJson)>),
}

impl ArbJson {
    /// The value as `serde_json` sees it, nesting capped at `depth`.
    pub fn to_value(&self, depth: usize) -> serde_json::Value {
        use serde_json::Value;
        if depth == 0 {
            return Value::Null;
        }
        match self {
            ArbJson::Null => Value::Null,
            ArbJson::Bool(b) => Value::Bool(*b),
            ArbJson::Int(i) => Value::from(*i),
            ArbJson::Float(f) => {
                serde_json::Number::from_f64(*f).map_or(Value::from(0), Value::Number)
            }
            ArbJson::Str(s) => Value::String(s.clone()),
            ArbJson::Array(v) => Value::Array(v.iter().map(|x| x.to_value(depth - 1)).collect()),
            ArbJson::Object(v) => Value::Object(
                v.iter()
                    .map(|(k, x)| (k.clone(), x.to_value(depth - 1)))
                    .collect(),
            ),
        }
    }
}

/// An application payload of each kind.
#[derive(Arbitrary, Clone, Debug)]
pub enum ArbPayload {
    /// A JSON value, serialized compactly.
    Json(ArbJson),
    /// JSON text exactly as given, when it is one valid JSON value
    /// (whitespace, escapes and all).
    JsonText(String),
    /// A MessagePack value (the JSON value, packed).
    MsgPack(ArbJson),
    /// Opaque bytes.
    Binary(Vec<u8>),
}

impl ArbPayload {
    /// The payload, or `None` if the generated bytes are not a valid value of
    /// the kind.
    pub fn to_payload(&self) -> Option<Payload> {
        match self {
            ArbPayload::Json(v) => serde_json::to_vec(&v.to_value(8))
                .ok()
                .and_then(|b| Payload::json(b).ok()),
            ArbPayload::JsonText(s) => Payload::json(s.clone().into_bytes()).ok(),
            ArbPayload::MsgPack(v) => rmp_serde::to_vec(&v.to_value(8))
                .ok()
                .and_then(|b| Payload::msgpack(b).ok()),
            ArbPayload::Binary(b) => Some(Payload::binary(b.clone())),
        }
    }
}

/// A frame built from arbitrary fields.
#[derive(Arbitrary, Clone, Debug)]
pub enum ArbFrame {
    /// A hello.
    Hello {
        /// Versions offered.
        versions: Vec<u8>,
        /// Client id.
        client: [u8; 16],
        /// Resume request.
        resume: Option<([u8; 16], u64)>,
        /// Capabilities.
        caps: Vec<String>,
        /// Codecs: `true` is MessagePack.
        codecs: Vec<bool>,
    },
    /// A welcome.
    Welcome {
        /// Version.
        version: u8,
        /// Codec: `true` is MessagePack.
        msgpack: bool,
        /// Session.
        session: [u8; 16],
        /// Resumed flag.
        resumed: bool,
        /// Why a resume failed.
        lost: Option<String>,
        /// Delivered count.
        delivered: u64,
        /// Features.
        features: Vec<String>,
        /// Ping interval.
        ping: u64,
        /// Pong timeout.
        pong: u64,
        /// Largest message.
        max: u64,
    },
    /// A reject.
    Reject {
        /// Close code.
        code: u16,
        /// Reason token.
        reason: String,
        /// Detail.
        message: String,
        /// Server versions.
        versions: Vec<u8>,
        /// Retry hint.
        retry: Option<u64>,
    },
    /// A ping.
    Ping(u64),
    /// A pong.
    Pong(u64),
    /// A message.
    Msg {
        /// Sequence number.
        seq: u64,
        /// Message id.
        id: u64,
        /// Piggybacked ack.
        ack: Option<u64>,
        /// Timestamp.
        ts: Option<u64>,
        /// What the message is for.
        kind: MsgKind,
        /// Its room.
        room: Option<String>,
        /// Payload.
        payload: ArbPayload,
    },
    /// A batch of messages (sequence numbers from `first`, payloads as given).
    Batch {
        /// First sequence number.
        first: u64,
        /// Payloads.
        payloads: Vec<ArbPayload>,
    },
    /// A reauthentication request.
    Reauth(u64),
    /// A fresh token.
    Auth(String),
    /// An ack.
    Ack(u64),
    /// A replay request.
    Replay(u64),
    /// A goaway.
    GoAway(u16, Option<u64>),
    /// A raw datagram.
    Raw(Vec<u8>),
}

fn codec_of(msgpack: bool) -> Codec {
    if msgpack {
        Codec::MsgPack
    } else {
        Codec::Json
    }
}

impl ArbFrame {
    /// The frame, or `None` when the fields break a documented wire rule
    /// (sequence numbers from 1, tokens of at most 256 bytes, lists of at most
    /// 32 entries, detail text of at most 256 characters, a valid payload).
    pub fn to_frame(&self) -> Option<Frame> {
        let token_ok = |s: &String| s.len() <= wire::MAX_TOKEN_LEN;
        let list_ok = |v: &Vec<String>| v.len() <= wire::MAX_LIST_LEN && v.iter().all(token_ok);
        Some(match self {
            ArbFrame::Hello {
                versions,
                client,
                resume,
                caps,
                codecs,
            } => {
                if versions.len() > wire::MAX_LIST_LEN
                    || codecs.len() > wire::MAX_LIST_LEN
                    || !list_ok(caps)
                {
                    return None;
                }
                Frame::Hello(Hello {
                    versions: versions.clone(),
                    client: ClientId(*client),
                    resume: resume.map(|(s, delivered)| Resume {
                        session: SessionId(s),
                        delivered,
                        key: (delivered % 2 == 0).then_some(ResumeKey(s)),
                    }),
                    caps: caps.clone(),
                    codecs: codecs.iter().map(|m| codec_of(*m)).collect(),
                })
            }
            ArbFrame::Welcome {
                version,
                msgpack,
                session,
                resumed,
                lost,
                delivered,
                features,
                ping,
                pong,
                max,
            } => {
                if !list_ok(features) || lost.as_ref().is_some_and(|l| !token_ok(l)) {
                    return None;
                }
                Frame::Welcome(Welcome {
                    key: (*delivered % 2 == 1).then_some(ResumeKey(*session)),
                    version: *version,
                    codec: codec_of(*msgpack),
                    session: SessionId(*session),
                    resumed: *resumed,
                    lost: lost.clone(),
                    delivered: *delivered,
                    features: features.clone(),
                    ping_interval_ms: *ping,
                    pong_timeout_ms: *pong,
                    max_message: *max,
                })
            }
            ArbFrame::Reject {
                code,
                reason,
                message,
                versions,
                retry,
            } => {
                if !token_ok(reason) || message.chars().count() > wire::MAX_TOKEN_LEN {
                    return None;
                }
                Frame::Reject(Reject {
                    code: *code,
                    reason: reason.clone(),
                    message: message.clone(),
                    versions: versions.clone(),
                    retry_after_ms: *retry,
                })
            }
            ArbFrame::Ping(n) => Frame::Ping { nonce: *n },
            ArbFrame::Pong(n) => Frame::Pong { nonce: *n },
            ArbFrame::Msg {
                seq,
                id,
                ack,
                ts,
                kind,
                room,
                payload,
            } => {
                let kind = *kind;
                let room_ok = room
                    .as_ref()
                    .is_none_or(|r| !r.is_empty() && r.len() <= wire::MAX_TOKEN_LEN);
                if *seq == 0 || !room_ok || (kind.needs_room() && room.is_none()) {
                    return None;
                }
                Frame::Msg(Msg {
                    kind,
                    room: room.as_deref().map(std::sync::Arc::from),
                    seq: *seq,
                    id: *id,
                    ack: *ack,
                    ts: *ts,
                    payload: payload.to_payload()?,
                })
            }
            ArbFrame::Batch { first, payloads } => {
                if *first == 0 || payloads.is_empty() || payloads.len() > wire::MAX_BATCH {
                    return None;
                }
                let mut msgs = Vec::new();
                for (i, p) in payloads.iter().enumerate() {
                    msgs.push(Msg {
                        seq: first.checked_add(i as u64)?,
                        id: i as u64,
                        ack: None,
                        ts: None,
                        kind: MsgKind::Plain,
                        room: None,
                        payload: p.to_payload()?,
                    });
                }
                Frame::Batch(msgs)
            }
            ArbFrame::Reauth(ms) => Frame::Reauth { within_ms: *ms },
            ArbFrame::Auth(token) => {
                if token.len() > 4096 {
                    return None;
                }
                Frame::Auth {
                    token: token.clone(),
                }
            }
            ArbFrame::Ack(a) => Frame::Ack { ack: *a },
            ArbFrame::Replay(f) => {
                if *f == 0 {
                    return None;
                }
                Frame::Replay { from: *f }
            }
            ArbFrame::GoAway(code, retry) => Frame::GoAway {
                code: *code,
                retry_after_ms: *retry,
            },
            ArbFrame::Raw(b) => Frame::Raw(Bytes::copy_from_slice(b)),
        })
    }
}

/// Core bug found by fuzzing, fixed on main and kept as the regression test
/// `tests::json_null_payload_round_trips_in_json`: a message whose JSON
/// payload is `null` encodes as `"j":null` in the JSON codec, which the
/// decoder reads as a missing payload (`MissingField j`). The peer can
/// never decode that message, so it is retransmitted and refused forever.
/// The switch stays so that a regression can be tolerated again while it is
/// fixed; while it is `true`, `frame_roundtrip` skips the JSON codec for such
/// frames; set it to `false` once fixed.
pub const KNOWN_JSON_NULL_PAYLOAD: bool = false;

/// Core bug found by fuzzing, fixed on main and kept as the regression test
/// `tests::json_payload_bytes_survive_the_json_codec`: `Payload::json`
/// accepts a value with whitespace around it (`" 1 "`), the JSON codec
/// embeds it as a raw value without that whitespace, so the peer receives
/// different bytes (`"1"`) and `Payload` equality fails across a JSON hop.
/// The switch stays so that a regression can be tolerated again while it is
/// fixed; while it is `true`, `frame_roundtrip` skips the JSON codec for such
/// payloads; set it to `false` once fixed.
pub const KNOWN_JSON_PAYLOAD_WHITESPACE: bool = false;

fn is_known_json_null(frame: &Frame) -> bool {
    match frame {
        Frame::Msg(m) => is_known_json_payload(m),
        Frame::Batch(ms) => ms.iter().any(is_known_json_payload),
        _ => false,
    }
}

fn is_known_json_payload(m: &Msg) -> bool {
    if m.payload.kind() != crate::wire::PayloadKind::Json {
        return false;
    }
    let data = m.payload.data().as_ref();
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    (KNOWN_JSON_NULL_PAYLOAD && data == b"null")
        || (KNOWN_JSON_PAYLOAD_WHITESPACE
            && (data.first().is_some_and(ws) || data.last().is_some_and(ws)))
}

/// Decodes what a machine sent: it must always decode, except for the
/// known `null` payload bug ([`KNOWN_JSON_NULL_PAYLOAD`]), where the frame
/// is read with a `0` payload instead so its numbers still count.
fn decode_own(t: &Transmit, who: &str) -> Option<Frame> {
    let open = Limits {
        max_message: usize::MAX,
        version: PROTOCOL_VERSION,
    };
    match wire::decode(t.as_incoming(), &open) {
        Ok(f) => Some(f),
        Err(DecodeError::MissingField { field: "j", .. })
            if KNOWN_JSON_NULL_PAYLOAD
                && matches!(t, Transmit::Text(b) if b.ends_with(br#""j":null}"#)) =>
        {
            let text = std::str::from_utf8(t.data()).ok()?;
            let patched = format!("{}0}}", text.strip_suffix("null}")?);
            wire::decode(Incoming::Text(&patched), &open).ok()
        }
        Err(e) => panic!("the {who} sent an undecodable {t:?}: {e}"),
    }
}

/// Target `frame_roundtrip`: frames built from arbitrary fields encode and
/// decode to an equal frame in both codecs. Frames that break a wire rule
/// must still encode without panicking, and decoding them must not panic.
pub fn frame_roundtrip(frames: Vec<ArbFrame>) {
    for f in &frames {
        match f.to_frame() {
            Some(frame) => {
                if !is_known_json_null(&frame) {
                    assert_round_trip(&frame, Codec::Json, PROTOCOL_VERSION);
                }
                assert_round_trip(&frame, Codec::MsgPack, PROTOCOL_VERSION);
            }
            None => {
                // Still must not panic; the peer would refuse it.
                if let Some(frame) = lenient_frame(f) {
                    for codec in [Codec::Json, Codec::MsgPack] {
                        if let Ok(t) = wire::encode(&frame, codec, PROTOCOL_VERSION) {
                            let _ = wire::decode(t.as_incoming(), &limits());
                        }
                    }
                }
            }
        }
    }
}

/// The frame without the wire-rule checks (for the "must not panic" half).
fn lenient_frame(f: &ArbFrame) -> Option<Frame> {
    match f {
        ArbFrame::Msg {
            seq,
            id,
            ack,
            ts,
            kind,
            room,
            payload,
        } => Some(Frame::Msg(Msg {
            kind: *kind,
            room: room.as_deref().map(std::sync::Arc::from),
            seq: *seq,
            id: *id,
            ack: *ack,
            ts: *ts,
            payload: payload.to_payload()?,
        })),
        ArbFrame::Replay(from) => Some(Frame::Replay { from: *from }),
        ArbFrame::Reject {
            code,
            reason,
            message,
            versions,
            retry,
        } => Some(Frame::Reject(Reject {
            code: *code,
            reason: reason.clone(),
            message: message.clone(),
            versions: versions.clone(),
            retry_after_ms: *retry,
        })),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

/// Target `handshake`: arbitrary text is decoded as a handshake frame; a
/// hello (or anything) is then handed to a server connection waiting for its
/// hello, and a welcome or reject to a client waiting for its welcome. The
/// server must answer with a welcome, a reject or a close; the client must
/// end open, failed, reconnecting or closed; both only along legal paths.
pub fn handshake(data: &[u8], probe: &dyn AllocProbe) {
    let text = String::from_utf8_lossy(data);
    let frame = check_decode(Incoming::Text(&text), &limits(), probe);

    // Server side: whatever arrives first on a fresh connection.
    let mut server = match Server::new(ServerConfig {
        max_message_size: FUZZ_MAX_MESSAGE,
        ..ServerConfig::default()
    }) {
        Ok(s) => s,
        Err(e) => panic!("server config: {e}"),
    };
    let conn = server.handle_connection(Instant::ZERO, None, SessionId([9; 16]));
    server.handle_message(Instant::ZERO, conn, Incoming::Text(&text));
    let mut welcomed = false;
    let mut closed = false;
    while let Some(o) = server.poll_output() {
        match o {
            ServerOutput::Transmit(c, t) => {
                assert_eq!(c, conn);
                assert!(!closed, "transmit after disconnect");
                let f = wire::decode(
                    t.as_incoming(),
                    &Limits {
                        max_message: usize::MAX,
                        version: PROTOCOL_VERSION,
                    },
                );
                match f {
                    Ok(Frame::Welcome(_)) => welcomed = true,
                    Ok(Frame::Reject(_)) => {}
                    other => panic!("server answered a hello with {other:?}"),
                }
            }
            ServerOutput::Disconnect(c, code, _) => {
                assert_eq!(c, conn);
                assert!(code.is_sendable(), "server closes with {code:?}");
                closed = true;
            }
            ServerOutput::Event(_) => {}
        }
    }
    if matches!(frame, Some(Frame::Hello(_))) {
        assert!(
            welcomed != closed,
            "a hello must be welcomed or refused (welcomed {welcomed}, closed {closed})"
        );
    }
    assert_eq!(server.session_count(), usize::from(welcomed));

    // Server side, again: the same text in the upgrade request's header.
    // The answer goes in the response, never as a frame.
    let mut server = match Server::new(ServerConfig {
        max_message_size: FUZZ_MAX_MESSAGE,
        ..ServerConfig::default()
    }) {
        Ok(s) => s,
        Err(e) => panic!("server config: {e}"),
    };
    let (conn, answer) = server.handle_upgrade(Instant::ZERO, None, SessionId([9; 16]), &text);
    let mut closed = false;
    while let Some(o) = server.poll_output() {
        match o {
            ServerOutput::Transmit(_, t) => panic!("a frame after an upgrade hello: {t:?}"),
            ServerOutput::Disconnect(c, code, _) => {
                assert_eq!(c, conn);
                assert!(code.is_sendable(), "server closes with {code:?}");
                closed = true;
            }
            ServerOutput::Event(_) => {}
        }
    }
    let mut welcomed = false;
    if let Some(a) = &answer {
        match header_frame(a) {
            Ok(Frame::Welcome(_)) => welcomed = true,
            Ok(Frame::Reject(_)) => assert!(closed, "a reject must be followed by a close"),
            other => panic!("server answered an upgrade hello with {other:?}"),
        }
    }
    if matches!(frame, Some(Frame::Hello(_))) {
        assert!(answer.is_some(), "a hello in the upgrade went unanswered");
    }
    assert_eq!(server.session_count(), usize::from(welcomed));

    // Client side: the same text as the answer to our hello, as a frame...
    let config = ClientConfig::default();
    let mut h = ClientHarness::new(config.clone(), 1);
    h.op(ClientOp::Connect);
    h.op(ClientOp::Opened(Tr::Current));
    let tr = h.transport;
    h.now = Instant::from_millis(1);
    h.max_now = h.now;
    h.feed(tr, Incoming::Text(&text));
    h.drain(false, None);

    // ... and in the response header, after a hello in the upgrade.
    let mut h = ClientHarness::new(config, 1);
    h.op(ClientOp::Connect);
    let tr = h.transport;
    assert!(
        h.client.upgrade_hello(tr).is_some(),
        "the default client offers its hello in the upgrade"
    );
    h.now = Instant::from_millis(1);
    h.max_now = h.now;
    h.fed_reject = matches!(frame, Some(Frame::Reject(_)));
    h.client.handle_upgraded(h.now, tr, Some(&text));
    h.drain(false, None);
}

// ---------------------------------------------------------------------------
// Client machine
// ---------------------------------------------------------------------------

/// Settings for the client machine target, kept small so limits are hit.
#[derive(Arbitrary, Clone, Debug)]
pub struct ClientSetup {
    /// Speak JSON only.
    pub json_only: bool,
    /// Waiting-queue bound (messages), 1..=32.
    pub queue_messages: u8,
    /// Waiting-queue bound (bytes).
    pub queue_bytes: u16,
    /// Send window (messages), 1..=16.
    pub window_messages: u8,
    /// Send window (bytes).
    pub window_bytes: u16,
    /// Fail the session on overflow instead of refusing.
    pub fail_session: bool,
    /// Attempts before giving up; 0 retries forever.
    pub max_attempts: u8,
    /// Ack after this many deliveries, 1..=40.
    pub ack_every: u8,
    /// Standalone ack delay in milliseconds.
    pub ack_delay_ms: u8,
    /// No liveness grace.
    pub zero_grace: bool,
    /// Retry once after a 401.
    pub can_refresh_token: bool,
    /// Largest message above the 1024-byte minimum.
    pub extra_max_message: u16,
    /// Undecodable frames tolerated before a resync.
    pub max_decode_failures: u8,
    /// Jitter seed.
    pub seed: u64,
}

impl ClientSetup {
    /// The configuration (always valid).
    pub fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::default();
        if self.json_only {
            c.codecs = vec![Codec::Json];
        }
        c.queue = QueueConfig {
            max_messages: 1 + usize::from(self.queue_messages % 32),
            max_bytes: usize::from(self.queue_bytes),
        };
        c.reliability = ReliabilityConfig {
            window_messages: 1 + usize::from(self.window_messages % 16),
            window_bytes: usize::from(self.window_bytes),
            ack_every: 1 + u32::from(self.ack_every % 40),
            ack_delay: Duration::from_millis(u64::from(self.ack_delay_ms)),
            overflow: if self.fail_session {
                OverflowPolicy::FailSession
            } else {
                OverflowPolicy::Refuse
            },
            ..ReliabilityConfig::default()
        };
        c.backoff.max_attempts = match self.max_attempts % 8 {
            0 => None,
            n => Some(u32::from(n)),
        };
        if self.zero_grace {
            c.heartbeat.grace = Duration::ZERO;
        }
        c.can_refresh_token = self.can_refresh_token;
        c.max_message_size = 1024 + usize::from(self.extra_max_message % 8192);
        c.max_decode_failures = u32::from(self.max_decode_failures % 8);
        c
    }
}

/// Which transport an input names.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Tr {
    /// The one the machine asked for last.
    Current,
    /// One asked for `n + 1` attempts ago.
    Previous(u8),
    /// Any id at all.
    Any(u64),
}

/// A number relative to what the machine has seen, so that sequence
/// numbers and acks land near the interesting values.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Num {
    /// `base + 1 + d` (the next one when `d` is 0).
    Next(i8),
    /// Exactly `base`.
    Base,
    /// Any value.
    Any(u64),
}

impl Num {
    fn resolve(self, base: u64) -> u64 {
        match self {
            Num::Next(d) => {
                let d = i64::from(d);
                let v = i128::from(base) + 1 + i128::from(d);
                u64::try_from(v.max(0)).unwrap_or(u64::MAX)
            }
            Num::Base => base,
            Num::Any(v) => v,
        }
    }
}

/// A close code, biased to the ones with meaning.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Code {
    /// 1000.
    Normal,
    /// 1001.
    GoingAway,
    /// 1006.
    Abnormal,
    /// 1008.
    Policy,
    /// 1013.
    TryLater,
    /// 4000.
    Retry,
    /// 4001.
    UnsupportedVersion,
    /// 4003.
    UnsupportedCodec,
    /// 4011.
    Rotate,
    /// 4401.
    Unauthorized,
    /// 4403.
    Forbidden,
    /// Anything.
    Other(u16),
}

impl Code {
    /// The code.
    pub fn code(self) -> CloseCode {
        match self {
            Code::Normal => CloseCode::NORMAL,
            Code::GoingAway => CloseCode::GOING_AWAY,
            Code::Abnormal => CloseCode::ABNORMAL,
            Code::Policy => CloseCode::POLICY_VIOLATION,
            Code::TryLater => CloseCode::TRY_AGAIN_LATER,
            Code::Retry => CloseCode::RETRY,
            Code::UnsupportedVersion => CloseCode::UNSUPPORTED_VERSION,
            Code::UnsupportedCodec => CloseCode::UNSUPPORTED_CODEC,
            Code::Rotate => CloseCode::ROTATE,
            Code::Unauthorized => CloseCode::UNAUTHORIZED,
            Code::Forbidden => CloseCode::FORBIDDEN,
            Code::Other(c) => CloseCode(c),
        }
    }
}

/// A payload the fuzzer picks for a send.
#[derive(Arbitrary, Clone, Debug)]
pub enum PayloadChoice {
    /// `size` opaque bytes.
    Binary(u16),
    /// A JSON string of about `size` bytes.
    JsonString(u16),
    /// One of a few JSON literals (`null`, `0`, `{}`, ` 1 `, ...).
    JsonLiteral(u8),
    /// Any payload.
    Any(ArbPayload),
}

const JSON_LITERALS: &[&str] = &[
    "null",
    "0",
    "true",
    "false",
    "{}",
    "[]",
    "\"s\"",
    " 1 ",
    "[null]",
    "{\"a\":null}",
    "-0",
    "1e3",
];

impl PayloadChoice {
    /// The payload, if the choice makes a valid one.
    pub fn payload(&self) -> Option<Payload> {
        match self {
            PayloadChoice::Binary(n) => Some(Payload::binary(vec![0xa5; usize::from(*n)])),
            PayloadChoice::JsonString(n) => {
                let s = format!("\"{}\"", "x".repeat(usize::from(*n)));
                Payload::json(s.into_bytes()).ok()
            }
            PayloadChoice::JsonLiteral(i) => {
                let lit = JSON_LITERALS[usize::from(*i) % JSON_LITERALS.len()];
                Payload::json(lit.as_bytes().to_vec()).ok()
            }
            PayloadChoice::Any(p) => p.to_payload(),
        }
    }
}

/// A transport failure the fuzzer picks.
#[derive(Arbitrary, Clone, Debug)]
pub enum ErrChoice {
    /// I/O.
    Io,
    /// TLS.
    Tls,
    /// WebSocket protocol.
    WebSocket,
    /// An HTTP status, with a retry-after in milliseconds.
    Http(u16, Option<u32>),
}

impl ErrChoice {
    fn error(&self) -> TransportError {
        match self {
            ErrChoice::Io => TransportError::Io("reset".into()),
            ErrChoice::Tls => TransportError::Tls("bad cert".into()),
            ErrChoice::WebSocket => TransportError::WebSocket("bad frame".into()),
            ErrChoice::Http(status, retry) => TransportError::Http {
                status: *status,
                retry_after: retry.map(|ms| Duration::from_millis(u64::from(ms))),
            },
        }
    }
}

/// A frame the fuzzer's "server" sends to the client.
#[derive(Arbitrary, Clone, Debug)]
pub enum ServerFrame {
    /// A welcome.
    Welcome {
        /// Claim the resume succeeded.
        resumed: bool,
        /// Name the session the client holds (else `session` bytes).
        same_session: bool,
        /// Session id bytes when not the same.
        session: u8,
        /// Delivered count, relative to what the client sent.
        delivered: Num,
        /// Choose MessagePack.
        msgpack: bool,
        /// Version (1 is the only one spoken).
        version_other: Option<u8>,
        /// Ping interval, ms.
        ping_ms: u32,
        /// Pong timeout, ms.
        pong_ms: u32,
        /// Largest message.
        max: u32,
        /// Why a resume failed.
        lost: Option<String>,
    },
    /// A reject.
    Reject {
        /// Its code.
        code: Code,
        /// Retry hint, ms.
        retry: Option<u32>,
        /// Versions the server speaks.
        versions: Vec<u8>,
    },
    /// A ping.
    Ping(u64),
    /// A pong, echoing the last ping's nonce or not.
    Pong {
        /// Echo the last ping.
        echo: bool,
        /// Otherwise this nonce.
        nonce: u64,
    },
    /// A message.
    Msg {
        /// Sequence number relative to what the client delivered.
        seq: Num,
        /// Piggybacked ack relative to what the client sent.
        ack: Option<Num>,
        /// The payload.
        payload: PayloadChoice,
        /// Sender timestamp.
        ts: Option<u64>,
    },
    /// An ack, relative to what the client sent.
    Ack(Num),
    /// A replay request, relative to what the server "acked".
    Replay(Num),
    /// A goaway.
    GoAway(Code, Option<u32>),
    /// A datagram.
    Raw(Vec<u8>),
    /// A hello (nonsense from a server).
    Hello,
}

/// One input or command for the client machine.
#[derive(Arbitrary, Clone, Debug)]
pub enum ClientOp {
    /// `connect`.
    Connect,
    /// `reconnect`.
    Reconnect,
    /// `close`.
    Close,
    /// `send`, optionally with a timestamp.
    Send(PayloadChoice, Option<u64>),
    /// `send_datagram` of this many bytes.
    SendDatagram(u16),
    /// `handle_transport_opened`.
    Opened(Tr),
    /// The upgrade of a transport: `upgrade_hello` (if the first field is
    /// `true`, before the request goes out), then `handle_upgraded` with a
    /// well-formed frame (JSON, as the answer header carries it) or none.
    Upgraded(Tr, bool, Option<ServerFrame>),
    /// `handle_transport_closed`, with a close code or none.
    Closed(Tr, Option<Code>),
    /// `handle_transport_error`.
    Error(Tr, ErrChoice),
    /// A well-formed frame, in the connection's codec unless `wrong_codec`.
    Frame(Tr, ServerFrame, bool),
    /// A text message of arbitrary content.
    Text(Tr, String),
    /// A binary message of arbitrary content.
    Binary(Tr, Vec<u8>),
    /// `handle_timeout` at the next deadline (or now, if none or overdue).
    Timeout,
    /// The driver's clock moves forward this many milliseconds.
    Advance(u16),
    /// The driver's clock moves forward this many seconds.
    AdvanceSecs(u16),
    /// The driver hands in an instant this many milliseconds earlier than the
    /// last one (a clock that went backwards).
    Rewind(u16),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Outstanding,
    Acked,
    Lost,
    Failed,
}

/// Drives one [`Client`] and checks its promises after every op.
pub struct ClientHarness {
    /// The machine.
    pub client: Client,
    config: ClientConfig,
    /// The instant handed to the next call (may go backwards).
    pub now: Instant,
    /// The latest instant handed in so far.
    pub max_now: Instant,
    /// Transports asked for, oldest first.
    transports: Vec<TransportId>,
    /// The transport the machine asked for last.
    pub transport: TransportId,
    state: State,
    last_seq: u64,
    sent_seq: u64,
    last_ping: Option<u64>,
    accepted: BTreeMap<u64, Fate>,
    last_id: u64,
    /// The op fed a reject frame (see [`KNOWN_REJECT_CODE_ECHO`]).
    fed_reject: bool,
    /// What happened, for the panic message.
    pub log: String,
}

/// Core bug found by fuzzing, fixed on main and kept as the regression test
/// `tests::client_never_echoes_an_unsendable_reject_code`: the client closes
/// a rejected transport with the close code the server put in its reject
/// frame, unchecked, so a reject carrying 1005, 1006, 2000 or 5000 makes the
/// client ask its driver to send a close code RFC 6455 forbids on the wire.
/// The switch stays so that a regression can be tolerated again while it is
/// fixed; while it is `true`, the client target tolerates exactly that case so
/// that fuzzing can go on finding other bugs; set it to `false` once fixed.
pub const KNOWN_REJECT_CODE_ECHO: bool = false;

impl ClientHarness {
    /// A harness around a new client.
    pub fn new(config: ClientConfig, seed: u64) -> ClientHarness {
        let client = match Client::new(config.clone(), ClientId([0xc1; 16]), seed) {
            Ok(c) => c,
            Err(e) => panic!("client config rejected: {e}"),
        };
        ClientHarness {
            client,
            config,
            now: Instant::ZERO,
            max_now: Instant::ZERO,
            transports: Vec::new(),
            transport: TransportId(0),
            state: State::Disconnected,
            last_seq: 0,
            sent_seq: 0,
            last_ping: None,
            accepted: BTreeMap::new(),
            last_id: 0,
            fed_reject: false,
            log: String::new(),
        }
    }

    /// Hands a message to the client, noting whether it is a reject.
    pub fn feed(&mut self, transport: TransportId, msg: Incoming<'_>) {
        let open = Limits {
            max_message: usize::MAX,
            version: PROTOCOL_VERSION,
        };
        if matches!(wire::decode(msg, &open), Ok(Frame::Reject(_))) {
            self.fed_reject = true;
        }
        self.client.handle_message(self.now, transport, msg);
    }

    fn tr(&self, t: Tr) -> TransportId {
        match t {
            Tr::Current => self.transport,
            Tr::Previous(n) => {
                let back = usize::from(n) + 1;
                self.transports
                    .len()
                    .checked_sub(back + 1)
                    .and_then(|i| self.transports.get(i))
                    .copied()
                    .unwrap_or(TransportId(0))
            }
            Tr::Any(n) => TransportId(n),
        }
    }

    /// Moves the driver's clock; the machine sees it at the next call.
    fn set_now(&mut self, now: Instant) {
        self.now = now;
    }

    /// Records that the machine is handed `self.now`.
    fn hand_in(&mut self) {
        if self.now > self.max_now {
            self.max_now = self.now;
        }
    }

    fn encode_for_client(&self, frame: &Frame, wrong_codec: bool) -> Option<Transmit> {
        let codec = self.client.codec().unwrap_or(Codec::Json);
        let codec = match (codec, wrong_codec) {
            (c, false) => c,
            (Codec::Json, true) => Codec::MsgPack,
            (_, true) => Codec::Json,
        };
        wire::encode(frame, codec, PROTOCOL_VERSION).ok()
    }

    fn server_frame(&self, f: &ServerFrame) -> Option<Frame> {
        Some(match f {
            ServerFrame::Welcome {
                resumed,
                same_session,
                session,
                delivered,
                msgpack,
                version_other,
                ping_ms,
                pong_ms,
                max,
                lost,
            } => {
                let session = match (same_session, self.client.session()) {
                    (true, Some(s)) => s,
                    _ => SessionId([*session; 16]),
                };
                Frame::Welcome(Welcome {
                    key: Some(ResumeKey(session.0)),
                    version: version_other.unwrap_or(PROTOCOL_VERSION),
                    codec: codec_of(*msgpack),
                    session,
                    resumed: *resumed,
                    lost: lost
                        .as_ref()
                        .filter(|l| l.len() <= wire::MAX_TOKEN_LEN)
                        .cloned(),
                    delivered: delivered.resolve(self.sent_seq),
                    features: Vec::new(),
                    ping_interval_ms: u64::from(*ping_ms),
                    pong_timeout_ms: u64::from(*pong_ms),
                    max_message: u64::from(*max),
                })
            }
            ServerFrame::Reject {
                code,
                retry,
                versions,
            } => Frame::Reject(Reject {
                code: code.code().0,
                reason: "fuzz".into(),
                message: String::new(),
                versions: versions.iter().copied().take(wire::MAX_LIST_LEN).collect(),
                retry_after_ms: retry.map(u64::from),
            }),
            ServerFrame::Ping(n) => Frame::Ping { nonce: *n },
            ServerFrame::Pong { echo, nonce } => Frame::Pong {
                nonce: if *echo {
                    self.last_ping.unwrap_or(*nonce)
                } else {
                    *nonce
                },
            },
            ServerFrame::Msg {
                seq,
                ack,
                payload,
                ts,
            } => {
                let seq = seq.resolve(self.client.delivered()).max(1);
                Frame::Msg(Msg {
                    kind: MsgKind::Plain,
                    room: None,
                    seq,
                    id: seq,
                    ack: ack.map(|a| a.resolve(self.sent_seq)),
                    ts: *ts,
                    payload: payload.payload()?,
                })
            }
            ServerFrame::Ack(a) => Frame::Ack {
                ack: a.resolve(self.sent_seq),
            },
            ServerFrame::Replay(n) => Frame::Replay {
                from: n.resolve(self.sent_seq).max(1),
            },
            ServerFrame::GoAway(code, retry) => Frame::GoAway {
                code: code.code().0,
                retry_after_ms: retry.map(u64::from),
            },
            ServerFrame::Raw(b) => Frame::Raw(Bytes::copy_from_slice(b)),
            ServerFrame::Hello => Frame::Hello(Hello {
                versions: vec![1],
                client: ClientId([1; 16]),
                resume: None,
                caps: Vec::new(),
                codecs: vec![Codec::Json],
            }),
        })
    }

    /// Applies one op, drains every output and checks every invariant.
    pub fn op(&mut self, op: ClientOp) {
        let _ = writeln!(self.log, "{:?} {op:?}", self.now);
        let before = self.client.poll_timeout();
        let mut timeout = false;
        // The machine only learns an instant when it is called: ops that end
        // up calling nothing (an invalid payload, a frame that cannot be
        // built) hand nothing in.
        let now = self.now;
        match op {
            ClientOp::Connect => {
                self.hand_in();
                let _ = self.client.connect(now);
            }
            ClientOp::Reconnect => {
                self.hand_in();
                let _ = self.client.reconnect(now);
            }
            ClientOp::Close => {
                self.hand_in();
                let _ = self.client.close(now);
            }
            ClientOp::Send(p, ts) => {
                if let Some(payload) = p.payload() {
                    self.hand_in();
                    let r = match ts {
                        Some(ts) => self.client.send_with_timestamp(now, payload, ts),
                        None => self.client.send(now, payload),
                    };
                    match r {
                        Ok(id) => {
                            assert!(id.0 > self.last_id, "message ids must increase");
                            self.last_id = id.0;
                            self.accepted.insert(id.0, Fate::Outstanding);
                        }
                        Err(SendError::SessionFailed) => {
                            assert_eq!(
                                self.config.reliability.overflow,
                                OverflowPolicy::FailSession
                            );
                        }
                        Err(_) => {}
                    }
                }
            }
            ClientOp::SendDatagram(n) => {
                self.hand_in();
                let r = self
                    .client
                    .send_datagram(now, Bytes::from(vec![7u8; usize::from(n)]));
                if r.is_ok() {
                    assert_eq!(self.client.state(), &State::Open);
                }
            }
            ClientOp::Opened(t) => {
                let t = self.tr(t);
                self.hand_in();
                self.client.handle_transport_opened(now, t);
            }
            ClientOp::Upgraded(t, offer, answer) => {
                let t = self.tr(t);
                self.hand_in();
                if offer {
                    if let Some(hello) = self.client.upgrade_hello(t) {
                        assert!(hello.len() <= wire::MAX_HELLO_HEADER);
                        match header_frame(&hello) {
                            Ok(Frame::Hello(h)) => {
                                assert_eq!(h.resume.map(|r| r.session), self.client.session());
                            }
                            other => panic!("the upgrade hello decodes to {other:?}"),
                        }
                    }
                }
                let answer = answer
                    .and_then(|f| self.server_frame(&f))
                    .and_then(|f| wire::encode(&f, Codec::Json, PROTOCOL_VERSION).ok())
                    .and_then(|t| String::from_utf8(t.data().to_vec()).ok());
                if let Some(a) = &answer {
                    if matches!(
                        wire::decode(Incoming::Text(a), &limits()),
                        Ok(Frame::Reject(_))
                    ) {
                        self.fed_reject = true;
                    }
                }
                self.client.handle_upgraded(now, t, answer.as_deref());
            }
            ClientOp::Closed(t, code) => {
                let t = self.tr(t);
                self.hand_in();
                self.client
                    .handle_transport_closed(now, t, code.map(Code::code), "bye");
            }
            ClientOp::Error(t, e) => {
                let t = self.tr(t);
                self.hand_in();
                self.client.handle_transport_error(now, t, e.error());
            }
            ClientOp::Frame(t, f, wrong) => {
                let t = self.tr(t);
                if let Some(tx) = self
                    .server_frame(&f)
                    .and_then(|f| self.encode_for_client(&f, wrong))
                {
                    self.hand_in();
                    self.feed(t, tx.as_incoming());
                }
            }
            ClientOp::Text(t, s) => {
                let t = self.tr(t);
                self.hand_in();
                self.feed(t, Incoming::Text(&s));
            }
            ClientOp::Binary(t, b) => {
                let t = self.tr(t);
                self.hand_in();
                self.feed(t, Incoming::Binary(&b));
            }
            ClientOp::Timeout => {
                let at = before.map_or(now, |d| d.at.max(now));
                // Keep the clock far from the end of time.
                let at = at.min(self.max_now + Duration::from_secs(86_400 * 30));
                self.set_now(at);
                self.hand_in();
                self.client.handle_timeout(at);
                timeout = true;
            }
            ClientOp::Advance(ms) => self.set_now(now + Duration::from_millis(u64::from(ms))),
            ClientOp::AdvanceSecs(s) => self.set_now(now + Duration::from_secs(u64::from(s))),
            ClientOp::Rewind(ms) => self.now = now - Duration::from_millis(u64::from(ms)),
        }
        self.drain(timeout, before);
    }

    /// Drains the outputs and checks the invariants. `timeout` says whether
    /// the op was `handle_timeout`; `before` is the deadline before the op.
    pub fn drain(&mut self, timeout: bool, before: Option<crate::client::Deadline>) {
        while let Some(o) = self.client.poll_output() {
            let _ = writeln!(self.log, "  {o:?}");
            match o {
                Output::Connect(id) => {
                    assert!(
                        self.transports.last().is_none_or(|l| id > *l),
                        "transport ids must be new"
                    );
                    self.transports.push(id);
                    self.transport = id;
                }
                Output::Transmit(id, t) => {
                    assert_eq!(id, self.transport, "transmit on a transport not current");
                    let Some(frame) = decode_own(&t, "client") else {
                        continue;
                    };
                    match frame {
                        Frame::Msg(m) => {
                            assert!(
                                m.seq <= self.sent_seq + 1,
                                "sequence gap in what the client sends"
                            );
                            self.sent_seq = self.sent_seq.max(m.seq);
                            assert!(
                                t.len() <= self.config.max_message_size + 1024
                                    || m.payload.len() <= self.config.max_message_size,
                                "message over the limit went out"
                            );
                        }
                        Frame::Ping { nonce } => self.last_ping = Some(nonce),
                        Frame::Hello(h) => {
                            assert_eq!(h.resume.map(|r| r.session), self.client.session());
                        }
                        _ => {}
                    }
                }
                Output::Disconnect(id, code, why) => {
                    let known = KNOWN_REJECT_CODE_ECHO && self.fed_reject && why == "rejected";
                    assert!(
                        code.is_sendable() || known,
                        "the client asks the driver to close with the unsendable code {code:?}\n{}",
                        self.log
                    );
                    assert!(
                        self.transports.contains(&id),
                        "disconnect of a transport never asked for"
                    );
                }
                Output::Event(e) => self.event(e),
            }
        }
        self.fed_reject = false;
        assert_eq!(
            self.client.state(),
            &self.state,
            "state() disagrees with the events"
        );
        let (q, qb) = self.client.queued();
        let (w, wb) = self.client.unacknowledged();
        let qc = &self.config.queue;
        let rc = &self.config.reliability;
        assert!(
            q <= qc.max_messages,
            "queue holds {q} > {}",
            qc.max_messages
        );
        assert!(qb <= qc.max_bytes || q == 1, "queue holds {qb} bytes");
        // The machine counts a limit of 0 as 1.
        assert!(w <= rc.window_messages.max(1), "window holds {w}");
        assert!(
            wb <= rc.window_bytes.max(1) || w == 1,
            "window holds {wb} bytes ({w} messages) over a limit of {}",
            rc.window_bytes
        );
        assert_eq!(
            self.client.delivered(),
            self.last_seq,
            "delivered() disagrees with the messages\n{}",
            self.log
        );
        let outstanding = self
            .accepted
            .values()
            .filter(|f| **f == Fate::Outstanding)
            .count();
        // The machine may also hold messages of its own (room re-joins).
        assert!(
            outstanding <= q + w,
            "accepted and unresolved messages ({outstanding}) exceed what the machine holds\n{}",
            self.log
        );
        if matches!(self.state, State::Closed { .. }) {
            assert_eq!(outstanding, 0, "closed with messages unreported");
        }
        if let Some(after) = self.client.poll_timeout() {
            let t = self.max_now;
            if timeout {
                assert!(
                    after.at > t,
                    "after handle_timeout({t:?}) a deadline is still due: {after:?}\n{}",
                    self.log
                );
            } else {
                let floor = before.map_or(t, |b| b.at.min(t));
                assert!(
                    after.at >= floor,
                    "a deadline was set in the past: {after:?} < {floor:?}\n{}",
                    self.log
                );
            }
        }
    }

    fn resolve(&mut self, id: u64, fate: Fate, what: &str) {
        if id == crate::reliable::MessageId::SYSTEM.0 {
            return;
        }
        match self.accepted.get_mut(&id) {
            Some(f) if *f == Fate::Outstanding => *f = fate,
            other => panic!(
                "{what} names message {id}, which is {other:?}\n{}",
                self.log
            ),
        }
    }

    fn event(&mut self, e: Event) {
        match e {
            Event::StateChanged { old, new } => {
                assert_eq!(
                    old, self.state,
                    "StateChanged.old is not the previous state"
                );
                assert!(
                    old.can_become(&new),
                    "illegal transition {old:?} -> {new:?}"
                );
                assert_ne!(old, new, "a change to the same state");
                if matches!(new, State::Closed { .. }) {
                    // A closed session restarts numbering; `SessionLost` is
                    // only reported when messages were at stake.
                    self.last_seq = 0;
                    self.sent_seq = 0;
                }
                self.state = new;
            }
            Event::Connected {
                session, resumed, ..
            } => {
                if resumed {
                    assert_eq!(self.client.session(), Some(session));
                } else {
                    assert_eq!(self.last_seq, 0, "a new session starts numbering afresh");
                }
            }
            Event::Message(m) => {
                assert_eq!(
                    m.seq,
                    self.last_seq + 1,
                    "delivered out of order or twice\n{}",
                    self.log
                );
                self.last_seq = m.seq;
            }
            Event::Acked { first, last } => {
                assert!(first <= last);
                self.resolve(first.0, Fate::Acked, "Acked.first");
                if last != first {
                    self.resolve(last.0, Fate::Acked, "Acked.last");
                }
                let ids: Vec<u64> = self
                    .accepted
                    .range(first.0..=last.0)
                    .map(|(k, _)| *k)
                    .collect();
                for id in ids {
                    if self.accepted.get(&id) == Some(&Fate::Outstanding) {
                        self.accepted.insert(id, Fate::Acked);
                    }
                }
            }
            Event::SessionLost {
                unconfirmed,
                unsent,
                ..
            } => {
                for id in unconfirmed.iter().chain(&unsent) {
                    self.resolve(id.0, Fate::Lost, "SessionLost");
                }
                self.last_seq = 0;
                self.sent_seq = 0;
            }
            Event::SendFailed { id, .. } => self.resolve(id.0, Fate::Failed, "SendFailed"),
            _ => {}
        }
    }
}

/// Target `client_machine`: a client driven by arbitrary inputs and
/// commands, with every invariant checked after every op.
pub fn client_machine(setup: ClientSetup, ops: Vec<ClientOp>) {
    let mut h = ClientHarness::new(setup.config(), setup.seed);
    for op in ops {
        h.op(op);
    }
}
