//! The wire format: frames, the two envelope codecs, the binary header.
//!
//! Owns the bytes: turning [`Frame`]s into WebSocket messages and back, the
//! size limit checked before any parsing, and every typed decode error. It
//! must never panic or allocate more than the frame it was handed, whatever
//! the peer sends; it knows nothing of states or timers. PROTOCOL.md is the
//! human-readable version of this module and changes with it.
//!
//! * Text WebSocket messages carry JSON envelopes.
//! * Binary WebSocket messages start with a 6-byte header
//!   (`kind: u8, version: u8, length: u32 LE`) followed by `length` bytes: a
//!   MessagePack envelope (`kind = 0x01`) or a raw application datagram
//!   (`kind = 0x02`).
//! * `hello`, `welcome` and `reject` are always JSON, so a peer can read the
//!   handshake before any codec is agreed.
//!
//! Here are the constants, the limits and the entry points ([`encode`],
//! [`decode`] and their kin). The rest is split by direction, so that no
//! two of the files below import each other:
//!
//! * `frame`, `payload`, `error`: the types both directions share;
//!   `header`: the binary header and the upgrade headers; `envelope`: the
//!   envelopes in serde form; `mapwrite`: the body of a synced-map write
//!   (the payload of a `mset` message), both ways ([`MapWriteBody`]).
//! * `encode`: frames to bytes; `buffers`: the memory the machines'
//!   `Encoder` encodes into.
//! * `compress`: per-message compression, the compressor and the bounded
//!   inflation ([`CompressionConfig`], [`CAP_DEFLATE`]); `deflated`: the
//!   envelopes that carry deflated payloads, both ways.
//! * `decode`: bytes to envelopes, and detached payloads ([`Decoder`]);
//!   `quick`: the hand-written MessagePack envelope reader; `json`: the
//!   hand-written JSON reader (envelopes, handshakes, the one-value check
//!   of JSON payloads) and string escaping; `fields`: envelopes to frames,
//!   every field checked.
//! * [`records`]: the HTTP fallback's bodies, records carrying the same
//!   messages a WebSocket would.
//!
//! [`encode`]: fn@encode
//! [`decode`]: fn@decode

use bytes::Bytes;

use decode::{check_size, decode_one, Decoded};
use encode::{encode_handshake, encode_json, encode_msgpack, write_json_msg, write_pack_msg, Form};
#[cfg(any(feature = "server", test))]
use encode::{json_map_value, pack_map_value, write_json_envelope, write_pack_envelope};
use error::serializer_error;
use header::{push_header, seal_msgpack};

mod buffers;
mod compress;
#[cfg(all(test, feature = "compression"))]
mod compress_tests;
mod decode;
#[cfg(feature = "compression")]
mod deflated;
mod encode;
mod envelope;
mod error;
mod fields;
mod frame;
mod header;
mod json;
mod mapwrite;
mod packwrite;
mod payload;
mod quick;
pub mod records;
#[cfg(test)]
mod tests;

pub use crate::ids::{ClientId, SessionId};
pub(crate) use buffers::Encoder;
pub use compress::{CompressionConfig, CAP_DEFLATE, COMPRESSION_BUILT, KIND_DEFLATE_RAW};
pub use decode::Decoder;
pub use error::{DecodeError, EncodeError, InvalidMsg};
pub use frame::{
    Frame, Hello, Incoming, LatestValue, MapSnapshot, MapValue, Msg, MsgKind, Reject, Resume,
    ResumeKey, StreamEntry, StreamPos, Transmit, Welcome,
};
pub use header::{
    header_value, into_header_value, HELLO_HEADER, HELLO_PARAM, MAX_HELLO_HEADER, WELCOME_HEADER,
};
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use json::assert_quick_json_agrees;
pub(crate) use json::push_uint;
pub use json::{push_json_str, JsonReader};
pub use mapwrite::{MapWriteBody, MapWriteError};
pub use payload::{Payload, PayloadError, PayloadKind};
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use quick::assert_quick_envelope_agrees;

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

/// Longest credential accepted in an `auth` frame.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Most messages in one batch frame.
pub const MAX_BATCH: usize = 1024;
/// Most list entries (versions, codecs, capabilities) accepted in a handshake.
pub const MAX_LIST_LEN: usize = 32;

/// A capability (`hello` `caps`) or feature (`welcome` `features`) name.
/// The names Kitestring knows are borrowed from its constants, so a
/// handshake that carries only those decodes without allocating them;
/// any other name is kept as sent.
pub type CapName = std::borrow::Cow<'static, str>;

/// Every capability and feature name this version knows: the names
/// decoded as borrowed [`CapName`]s.
pub(crate) const KNOWN_CAPS: [&str; 8] = [
    crate::link::CAP_BATCH,
    CAP_DETACH,
    CAP_STREAM,
    CAP_PING,
    CAP_LATEST,
    CAP_MAPS,
    CAP_DEFLATE,
    FEATURE_JOIN,
];

/// `name` as a [`CapName`]: borrowed when this version knows it.
pub(crate) fn cap_name(name: std::borrow::Cow<'_, str>) -> CapName {
    match KNOWN_CAPS.iter().find(|known| **known == name) {
        Some(known) => std::borrow::Cow::Borrowed(*known),
        None => std::borrow::Cow::Owned(name.into_owned()),
    }
}

/// Capability: the peer can receive detached payloads (PROTOCOL.md,
/// section 2.1). Every Kitestring peer announces it.
pub const CAP_DETACH: &str = "detach";

/// Capability: the peer takes room broadcasts as room streams, `pub`,
/// `skip` and `sub` frames with offsets, and resumes them with `subs`
/// (PROTOCOL.md, section 3.4). Every Kitestring peer announces it.
pub const CAP_STREAM: &str = "stream";

/// Capability: the client asks the server to ping it every `ping_ms`
/// (PROTOCOL.md, section 7), so that it can prove itself alive by answering
/// from its message handler when its own timers are held back (a browser
/// throttles a hidden tab's timers to once a minute).
pub const CAP_PING: &str = "ping";

/// The capability (client) and feature (server) that announces "I can
/// receive `lv` frames": a room's latest values (PROTOCOL.md, section
/// 3.5).
pub const CAP_LATEST: &str = "latest";

/// The feature (server) that announces "I join the rooms a `hello`'s
/// `join` lists when it opens a new session" (PROTOCOL.md, section 4). A
/// client that got a `welcome` without it joins those rooms with `join`
/// messages instead.
pub const FEATURE_JOIN: &str = "join";

/// The capability (client) and feature (server) that announces "I can
/// receive `ms` and `mv` frames": the synced maps of the rooms the session
/// is in (PROTOCOL.md, section 3.6).
pub const CAP_MAPS: &str = "maps";

/// Room stream epochs are below this, and so are the physical time (`ts`)
/// and the node (`hn`) of a synced map entry's stamp, so that a JavaScript
/// number holds them exactly.
pub const MAX_EPOCH: u64 = 1 << 53;

/// Most entries a synced map's snapshot announces (an `ms` frame's `seq`):
/// a larger count is a decode failure.
pub const MAX_MAP_ENTRIES: u64 = 65_536;

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
    encode_msg_into(m, Form::Detached, codec, version, out)
}

/// Encodes the envelope of `m`, its payload carried as `form` says, into
/// `out` (cleared first).
fn encode_msg_into(
    m: &Msg,
    form: Form<'_>,
    codec: Codec,
    version: u8,
    out: &mut Vec<u8>,
) -> Result<FrameKind, EncodeError> {
    out.clear();
    match codec {
        Codec::Json => {
            write_json_msg(m, out, form)?;
            Ok(FrameKind::Text)
        }
        Codec::MsgPack => {
            out.extend_from_slice(&[0; BINARY_HEADER_LEN]);
            write_pack_msg(m, out, form)?;
            seal_msgpack(out, version)?;
            Ok(FrameKind::Binary)
        }
    }
}

/// Encodes the envelope of `v`, its value carried as `form` says, into
/// `out` (cleared first).
#[cfg(any(feature = "server", test))]
fn encode_map_value_into(
    v: &MapValue,
    form: Form<'_>,
    codec: Codec,
    version: u8,
    out: &mut Vec<u8>,
) -> Result<FrameKind, EncodeError> {
    out.clear();
    match codec {
        Codec::Json => {
            write_json_envelope(&json_map_value(v, form)?, out);
            Ok(FrameKind::Text)
        }
        Codec::MsgPack => {
            out.extend_from_slice(&[0; BINARY_HEADER_LEN]);
            write_pack_envelope(&pack_map_value(v, form)?, out)?;
            seal_msgpack(out, version)?;
            Ok(FrameKind::Binary)
        }
    }
}

/// Encodes `frame` as [`encode`] and [`encode_detached`] do, for a peer
/// that agreed on compression ([`CAP_DEFLATE`], PROTOCOL.md section 2.2):
/// the payload of a `msg` or `pub` (each of a `batch`'s), the value of an
/// `mv`, or a datagram, of at least `config.threshold` bytes is deflated at
/// `config.level`, and sent so if that makes the message smaller. Returns
/// the messages to send back to back: one, or two for a `msg` or `mv` whose
/// payload goes detached (`detach`: the peer can receive detached payloads,
/// and the payload, deflated or not, is large enough: see
/// [`DETACH_FROM`]).
///
/// The machines keep their compressor; this makes one per call, so it is
/// for tools and tests. Without the `compression` feature nothing is
/// deflated.
///
/// [`encode`]: fn@encode
pub fn encode_compressed(
    frame: &Frame,
    codec: Codec,
    version: u8,
    config: &CompressionConfig,
    detach: bool,
) -> Result<Vec<Transmit>, EncodeError> {
    let mut out = Vec::with_capacity(2);
    Encoder::default().encode_each(frame, codec, version, detach, Some(config), |t| out.push(t))?;
    Ok(out)
}

/// Decodes one incoming message. The size limit is checked before parsing.
pub fn decode(msg: Incoming<'_>, limits: &Limits) -> Result<Frame, DecodeError> {
    check_size(msg.len(), limits)?;
    match decode_one(msg, limits.version, compress::Inflation::OFF)? {
        Decoded::Frame(frame) => Ok(frame),
        Decoded::Detached(_) => Err(DecodeError::InvalidField {
            field: "dj",
            reason: "a detached payload needs the stream's wire::Decoder",
        }),
    }
}
