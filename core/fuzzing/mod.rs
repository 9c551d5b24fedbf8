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

use arbitrary::Arbitrary;
use bytes::Bytes;

use crate::close::CloseCode;
use crate::wire::{
    self, ClientId, Codec, DecodeError, Frame, Hello, Incoming, Limits, Msg, MsgKind, Payload,
    Reject, Resume, ResumeKey, SessionId, Transmit, Welcome, BINARY_HEADER_LEN, KIND_MSGPACK,
    PROTOCOL_VERSION,
};

mod client;
mod handshake;
mod lww;
mod seeds;
mod server;
mod stream;
#[cfg(test)]
mod tests;

pub use client::{
    client_machine, ClientHarness, ClientOp, ClientSetup, ErrChoice, ServerFrame, Tr,
    KNOWN_REJECT_CODE_ECHO,
};
pub use handshake::handshake;
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Outstanding,
    Acked,
    Lost,
    Failed,
}
