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
use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use crate::ids::{ClientId, SessionId};

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

/// Whether the JSON text `json` nests arrays and objects at most
/// [`MAX_JSON_DEPTH`] deep. Only the structure is scanned (brackets outside
/// strings); validity is serde_json's to check. Values too short to reach
/// the limit are not scanned.
fn json_depth_ok(json: &[u8]) -> bool {
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

/// HTTP header of the upgrade request that carries the client's `hello`
/// (PROTOCOL.md, section 4), saving the handshake's round trip.
pub const HELLO_HEADER: &str = "kitestring-hello";
/// HTTP header of the `101` response that carries the server's answer to a
/// [`HELLO_HEADER`]: its `welcome` or `reject`.
pub const WELCOME_HEADER: &str = "kitestring-welcome";
/// Longest `hello` a client puts in [`HELLO_HEADER`]; a longer one (many
/// capabilities) goes as the first frame instead, clear of the header size
/// limits of proxies and servers.
pub const MAX_HELLO_HEADER: usize = 4 * 1024;

/// A handshake frame's JSON text as an HTTP header value: every character
/// outside printable ASCII becomes a JSON `\uXXXX` escape. The result is the
/// same JSON value, and a valid header value everywhere (RFC 9110 allows
/// only visible ASCII, space and tab without ambiguity).
///
/// Outside strings, compact JSON is printable ASCII already, so escaping
/// every such character is always correct.
pub fn header_value(json: &str) -> String {
    if is_header_safe(json) {
        return json.to_owned();
    }
    escape_header(json)
}

/// [`header_value`] for JSON the caller owns: returned as it is when it
/// needs no escape, which compact JSON of ASCII text never does.
pub fn into_header_value(json: String) -> String {
    if is_header_safe(&json) {
        return json;
    }
    escape_header(&json)
}

fn is_header_safe(json: &str) -> bool {
    json.bytes().all(|b| (0x20..0x7f).contains(&b))
}

fn escape_header(json: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if (' '..='~').contains(&c) {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\u{unit:04x}");
            }
        }
    }
    out
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
    kind: PayloadKind,
    data: Bytes,
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

/// The secret that resumes a session (PROTOCOL.md, section 6): given to the
/// client in the `welcome`, shown in the `hello` to resume. Unlike the
/// [`SessionId`], which appears in logs and events, it is never logged
/// (its `Debug` form hides it), so knowing a session's id is not enough to
/// take the session over.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResumeKey(pub [u8; 16]);

impl ResumeKey {
    /// The key as 32 lowercase hex digits, as on the wire.
    pub fn to_hex(&self) -> String {
        SessionId(self.0).to_hex()
    }

    /// Parses 32 hex digits (either case).
    pub fn from_hex(s: &str) -> Option<Self> {
        SessionId::from_hex(s).map(|id| ResumeKey(id.0))
    }

    /// Compares in time independent of where the keys differ.
    pub fn matches(&self, other: &ResumeKey) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl fmt::Debug for ResumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResumeKey(…)")
    }
}

/// The client's opening frame.
#[derive(Clone, Debug, PartialEq)]
pub struct Hello {
    /// Protocol versions the client speaks.
    pub versions: Vec<u8>,
    /// The client instance.
    pub client: ClientId,
    /// The session to resume, if any, with the last sequence number the
    /// client delivered from the server.
    pub resume: Option<Resume>,
    /// Optional features the client supports. Unknown names are ignored.
    pub caps: Vec<String>,
    /// Codecs the client speaks, preferred first. Unknown names are ignored.
    pub codecs: Vec<Codec>,
}

/// A resume request inside a [`Hello`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    /// The session to resume.
    pub session: SessionId,
    /// The last sequence number this side delivered to its application.
    pub delivered: u64,
    /// The session's resume key, from its `welcome` (`None` from a client
    /// that never got one: the resume then fails as `unknown_session`).
    pub key: Option<ResumeKey>,
}

/// The server's acceptance of a [`Hello`].
#[derive(Clone, Debug, PartialEq)]
pub struct Welcome {
    /// The chosen protocol version.
    pub version: u8,
    /// The chosen codec for every frame after this one.
    pub codec: Codec,
    /// The session this connection carries.
    pub session: SessionId,
    /// Whether the requested session was resumed.
    pub resumed: bool,
    /// Why a requested resume failed, if it did.
    pub lost: Option<String>,
    /// The last sequence number the server delivered from this client's
    /// session (0 for a new session).
    pub delivered: u64,
    /// Optional features the server will use. Unknown names are ignored.
    pub features: Vec<String>,
    /// Client ping interval, in milliseconds.
    pub ping_interval_ms: u64,
    /// How long the client waits for a pong, in milliseconds.
    pub pong_timeout_ms: u64,
    /// The largest message the server accepts, in bytes.
    pub max_message: u64,
    /// The secret to show when resuming this session (`None` from a server
    /// that does not use resume keys).
    pub key: Option<ResumeKey>,
}

/// The server's refusal of a [`Hello`].
#[derive(Clone, Debug, PartialEq)]
pub struct Reject {
    /// The close code the server closes with right after.
    pub code: u16,
    /// A machine-readable reason, e.g. `unsupported_version`.
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// The versions the server speaks (for a version mismatch).
    pub versions: Vec<u8>,
    /// How long to wait before retrying, if the server says.
    pub retry_after_ms: Option<u64>,
}

/// A sequenced application message.
#[derive(Clone, Debug, PartialEq)]
pub struct Msg {
    /// Position in the sender's stream for this session, from 1.
    pub seq: u64,
    /// The sender-assigned message id (an idempotency key together with the
    /// sender's identity).
    pub id: u64,
    /// A piggybacked cumulative acknowledgment of the reverse stream.
    pub ack: Option<u64>,
    /// The sender's timestamp in milliseconds, if it supplied one.
    pub ts: Option<u64>,
    /// Whether this is a plain message, a request, a response, or a room
    /// operation.
    pub kind: MsgKind,
    /// The room a message is published to (client to server) or was
    /// broadcast in (server to client), and the room of a room operation.
    /// Shared: a broadcast clones a reference count per member, not the name.
    pub room: Option<std::sync::Arc<str>>,
    /// The application payload.
    pub payload: Payload,
}

impl Msg {
    /// A message the decoder could number but not read (see
    /// [`MsgKind::Invalid`]).
    fn invalid(seq: u64, id: u64, ack: Option<u64>, what: InvalidMsg) -> Msg {
        Msg {
            seq,
            id,
            ack,
            ts: None,
            kind: MsgKind::Invalid(what),
            room: None,
            payload: Payload::null(),
        }
    }
}

/// What a [`Msg`] is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "fuzzing", derive(arbitrary::Arbitrary))]
pub enum MsgKind {
    /// A plain message.
    #[default]
    Plain,
    /// A request: the receiver answers with a response naming this
    /// message's `id` (`"rq":true` on the wire).
    Request,
    /// The response to the request whose `id` this is (`"rs":id` on the wire).
    Response(u64),
    /// Client to server: join the room `room` (`"op":"join"`).
    Join,
    /// Client to server: leave the room `room` (`"op":"leave"`).
    Leave,
    /// Server to client: who is in `room`; the payload is JSON
    /// `{"snapshot":bool,"joined":[member...],"left":[member...]}`
    /// (`"op":"presence"`).
    Presence,
    /// Server to client: a join or publish in `room` was refused; the payload
    /// is JSON `{"op":"join"|"publish","reason":string}` (`"op":"refused"`).
    /// A refusal that names the refused message is
    /// [`RefusedMessage`](Self::RefusedMessage).
    Refused,
    /// Server to client: the client's message with this `id` was consumed
    /// (its sequence number is used) but refused, never handed to the
    /// application (`"op":"refused","rs":id`; `r` names the room when the
    /// message was a room operation or a publish). The payload is JSON
    /// `{"op":"join"|"leave"|"publish"|"message","reason":string}` and may
    /// carry `"code"` (PROTOCOL.md, section 3.3).
    RefusedMessage(u64),
    /// A `msg` whose `seq` and `id` could be read but whose other fields
    /// could not (an unknown `op`, a bad room name, a bad payload, ...).
    /// Only ever produced by the decoder, never sent: the receiver consumes
    /// the sequence number and reports the message by id instead of
    /// dropping it, so one bad message cannot stall the stream.
    #[cfg_attr(feature = "fuzzing", arbitrary(skip))]
    Invalid(InvalidMsg),
}

/// What was wrong with a [`MsgKind::Invalid`] message: one of the decode
/// errors a numbered message can have, kept as a one-byte index so that
/// every message does not carry two string references for the rare bad one.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct InvalidMsg(u8);

/// Every `(field, reason)` an invalid message can name; the first is the
/// fallback for anything else.
const INVALID: &[(&str, &str)] = &[
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
];

impl InvalidMsg {
    /// The entry for `(field, reason)`, or the fallback.
    fn named(field: &str, reason: &str) -> InvalidMsg {
        let i = INVALID
            .iter()
            .position(|&(f, r)| f == field && r == reason)
            .unwrap_or(0);
        InvalidMsg(u8::try_from(i).unwrap_or(0))
    }

    /// What a decode error says, in the form a message can carry.
    fn of(error: &DecodeError) -> InvalidMsg {
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

impl MsgKind {
    fn op(self) -> Option<&'static str> {
        match self {
            MsgKind::Join => Some("join"),
            MsgKind::Leave => Some("leave"),
            MsgKind::Presence => Some("presence"),
            MsgKind::Refused | MsgKind::RefusedMessage(_) => Some("refused"),
            _ => None,
        }
    }

    /// The `rs` field this kind puts on the wire.
    fn rs(self) -> Option<u64> {
        match self {
            MsgKind::Response(to) | MsgKind::RefusedMessage(to) => Some(to),
            _ => None,
        }
    }

    /// Whether the kind needs a room.
    pub fn needs_room(self) -> bool {
        matches!(
            self,
            MsgKind::Join | MsgKind::Leave | MsgKind::Presence | MsgKind::Refused
        )
    }
}

/// Everything that crosses the wire.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Frame {
    /// Client opening frame.
    Hello(Hello),
    /// Server acceptance.
    Welcome(Welcome),
    /// Server refusal; the server closes right after.
    Reject(Reject),
    /// Heartbeat request; the peer answers with a pong carrying the nonce.
    Ping {
        /// Echoed in the pong.
        nonce: u64,
    },
    /// Heartbeat answer.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// A sequenced application message.
    Msg(Msg),
    /// Several messages in one frame, in order (only between peers that
    /// announced the `batch` capability).
    Batch(Vec<Msg>),
    /// Cumulative acknowledgment: every message up to `ack` was delivered.
    Ack {
        /// Highest sequence number delivered in order.
        ack: u64,
    },
    /// Gap report: send again everything from `from` on.
    Replay {
        /// The first sequence number the receiver is missing.
        from: u64,
    },
    /// The server asks the client to reconnect (rotation, shutdown, overload).
    GoAway {
        /// The close code the server will use.
        code: u16,
        /// Wait at least this long before reconnecting, if set.
        retry_after_ms: Option<u64>,
    },
    /// The server asks for a fresh credential within `within_ms`, or it
    /// closes the connection with 4401.
    Reauth {
        /// Milliseconds the client has to answer.
        within_ms: u64,
    },
    /// The client's fresh credential, answering a `reauth`.
    Auth {
        /// The credential (for example a bearer token).
        token: String,
    },
    /// An unsequenced application datagram (binary header kind 0x02).
    Raw(Bytes),
    /// A well-formed envelope of a type this version does not know. Ignored.
    Unknown(String),
}

impl Frame {
    /// The frame's type as written in the envelope's `t` field.
    pub fn type_name(&self) -> &str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::Welcome(_) => "welcome",
            Frame::Reject(_) => "reject",
            Frame::Ping { .. } => "ping",
            Frame::Pong { .. } => "pong",
            Frame::Msg(_) => "msg",
            Frame::Batch(_) => "batch",
            Frame::Ack { .. } => "ack",
            Frame::Replay { .. } => "replay",
            Frame::GoAway { .. } => "goaway",
            Frame::Reauth { .. } => "reauth",
            Frame::Auth { .. } => "auth",
            Frame::Raw(_) => "raw",
            Frame::Unknown(t) => t,
        }
    }
}

/// An incoming WebSocket message, as the transport handed it over.
#[derive(Clone, Copy, Debug)]
pub enum Incoming<'a> {
    /// A text message.
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
    /// A binary message in a shared buffer: large payloads are sliced out
    /// of it (reference-counted) instead of copied.
    SharedBinary(&'a Bytes),
}

impl Incoming<'_> {
    /// Size in bytes.
    pub fn len(&self) -> usize {
        match self {
            Incoming::Text(s) => s.len(),
            Incoming::Binary(b) => b.len(),
            Incoming::SharedBinary(b) => b.len(),
        }
    }

    /// Whether the message is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An outgoing WebSocket message for the driver to write.
#[derive(Clone, PartialEq, Eq)]
pub enum Transmit {
    /// A text message; the bytes are valid UTF-8.
    Text(Bytes),
    /// A binary message.
    Binary(Bytes),
}

impl Transmit {
    /// The message's bytes.
    pub fn data(&self) -> &Bytes {
        match self {
            Transmit::Text(b) | Transmit::Binary(b) => b,
        }
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.data().len()
    }

    /// Whether the message is empty.
    pub fn is_empty(&self) -> bool {
        self.data().is_empty()
    }

    /// The same message as an [`Incoming`], as the peer would receive it.
    pub fn as_incoming(&self) -> Incoming<'_> {
        match self {
            // Text transmits are built from serde_json output, which is UTF-8.
            Transmit::Text(b) => Incoming::Text(std::str::from_utf8(b).unwrap_or("")),
            Transmit::Binary(b) => Incoming::Binary(b),
        }
    }
}

impl fmt::Debug for Transmit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transmit::Text(b) => match std::str::from_utf8(b) {
                Ok(s) if s.len() <= 200 => write!(f, "Text({s})"),
                _ => write!(f, "Text({} bytes)", b.len()),
            },
            Transmit::Binary(b) => write!(f, "Binary({} bytes)", b.len()),
        }
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
}

/// Decoding limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest message accepted, in bytes, checked before parsing.
    pub max_message: usize,
    /// The negotiated protocol version, checked against the binary header.
    pub version: u8,
}

/// One envelope in serde form. Generated twice, for the payload
/// representations each codec uses: JSON embeds JSON payloads as raw JSON and
/// carries other payloads in base64; MessagePack embeds JSON payloads as a
/// string and other payloads as `bin`.
macro_rules! envelope {
    ($name:ident, $j:ty, $x:ty) => {
        #[derive(Serialize, Deserialize, Default)]
        struct $name<'a> {
            #[serde(borrow)]
            t: Cow<'a, str>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            seq: Option<u64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            id: Option<u64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            ack: Option<u64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            ts: Option<u64>,
            // `"j":null` is a JSON payload of null, not a missing payload.
            #[serde(
                default,
                borrow,
                deserialize_with = "present",
                skip_serializing_if = "Option::is_none"
            )]
            j: Option<$j>,
            #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
            m: Option<$x>,
            #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
            b: Option<$x>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            nonce: Option<u64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            from: Option<u64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            code: Option<u16>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            retry: Option<u64>,
            #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
            r: Option<Cow<'a, str>>,
            #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
            op: Option<Cow<'a, str>>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            rq: Option<bool>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            rs: Option<u64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            within: Option<u64>,
            #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
            token: Option<Cow<'a, str>>,
            // Never trust a declared length: a few bytes must not be able to
            // make the decoder reserve room for a huge batch.
            #[serde(
                default,
                borrow,
                deserialize_with = "bounded_batch",
                skip_serializing_if = "Option::is_none"
            )]
            f: Option<Vec<$name<'a>>>,
            // Detached payloads (last, so the fields before keep
            // their indexes): the length of a JSON, MessagePack or
            // opaque payload that follows as the next WebSocket message.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            dj: Option<u64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            dm: Option<u64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            db: Option<u64>,
        }
    };
}

std::thread_local! {
    /// Whether a batch's envelopes are being decoded on this thread: a batch
    /// inside one is refused before any of it is read.
    static IN_BATCH: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
}

/// Deserializes a batch's envelopes one by one, growing the vector as they
/// actually arrive, refusing more than [`MAX_BATCH`] and refusing a batch
/// inside a batch before reading it.
fn bounded_batch<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<T>>, D::Error> {
    struct Bounded<T>(core::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Bounded<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "an array of at most {MAX_BATCH} envelopes")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4));
            while let Some(item) = seq.next_element()? {
                if out.len() == MAX_BATCH {
                    return Err(serde::de::Error::invalid_length(MAX_BATCH + 1, &self));
                }
                out.push(item);
            }
            Ok(out)
        }
    }
    if IN_BATCH.with(|b| b.replace(true)) {
        return Err(serde::de::Error::custom("batches do not nest"));
    }
    let result = d
        .deserialize_seq(Bounded(core::marker::PhantomData))
        .map(Some);
    IN_BATCH.with(|b| b.set(false));
    result
}

/// Deserializes a field that is present as `Some`, even if its value is null.
fn present<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

envelope!(JsonEnvelope, &'a RawValue, Cow<'a, str>);
envelope!(PackEnvelope, Cow<'a, str>, &'a serde_bytes::Bytes);

/// The handshake frames, always JSON.
#[derive(Serialize, Deserialize, Default)]
struct HandshakeEnvelope<'a> {
    #[serde(borrow)]
    t: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    versions: Option<Vec<u8>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    client: Option<Cow<'a, str>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    session: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delivered: Option<u64>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    caps: Option<Vec<Cow<'a, str>>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    codecs: Option<Vec<Cow<'a, str>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<u8>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    codec: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resumed: Option<bool>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    lost: Option<Cow<'a, str>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    features: Option<Vec<Cow<'a, str>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ping_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pong_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code: Option<u16>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    reason: Option<Cow<'a, str>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    message: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry: Option<u64>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    key: Option<Cow<'a, str>>,
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

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

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

/// Bytes reserved for encoding a handshake frame (a `hello` is about 130,
/// a `welcome` about 220).
const HANDSHAKE_CAPACITY: usize = 256;

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

/// Payloads from this size up are encoded without the scratch buffer.
const DIRECT_ENCODE: usize = 1024;

/// Bytes of the blocks small frames are cut from, to start with.
const BLOCK_SIZE: usize = 1024;

/// Largest block a server's encoder grows to in bursts (a client's stays
/// at [`BLOCK_SIZE`]).
const SERVER_BLOCK_MAX: usize = 64 * 1024;

/// Full blocks a server's encoder keeps for reuse (a client's: 2).
const SERVER_SPENT_BLOCKS: usize = 16;

/// Largest encoded frame cut from a block; larger ones get their own
/// allocation.
const BLOCK_MAX_FRAME: usize = 256;

/// Most buffers a machine keeps for reuse by its large frames.
const POOL_BUFFERS: usize = 8;

/// Largest buffer a machine keeps for reuse; bigger ones are freed.
const POOL_MAX_CAPACITY: usize = 64 * 1024;

/// Encodes a machine's frames. The machines keep one each.
///
/// Small frames are encoded into a scratch buffer and appended to a block,
/// from which each frame is cut as a `Bytes` of its own (see [`Blocks`]): a
/// steady stream of small frames allocates nothing, and a burst (a
/// broadcast to thousands of members) reuses the blocks of the one before.
/// Frames over [`BLOCK_MAX_FRAME`] bytes get an allocation of their exact
/// size instead.
///
/// A frame with a large payload is encoded straight into a buffer of its
/// own, which becomes the frame without a copy; that buffer comes back to
/// the encoder when the last reference to the frame is dropped (after the
/// socket took it), so a steady stream of large frames reuses a few
/// buffers instead of allocating and freeing one per frame. Freeing a fresh
/// large buffer per frame made the system allocator hand memory back to the
/// operating system and fault it in again on every few frames. The pool is
/// bounded ([`POOL_BUFFERS`] buffers of at most [`POOL_MAX_CAPACITY`]
/// bytes); a buffer that does not fit is freed as usual.
#[derive(Default)]
pub(crate) struct Encoder {
    scratch: Vec<u8>,
    blocks: Blocks,
    pool: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// The blocks an [`Encoder`] cuts small frames from.
///
/// A block is shared and reference-counted by the frames cut from it. When
/// the current block is full it is reused in place if every frame cut from
/// it has been dropped (written by the socket). If not, frames are queued
/// faster than they are written: the block joins a short list of spent
/// blocks, and the next block is the oldest spent one whose frames are all
/// gone by now, or else a new one twice as large as the last (up to
/// `max`). Reusing blocks matters as much as not allocating: memory freed
/// after every burst was handed back to the operating system by the
/// allocator and faulted in again by the next burst. Once traffic keeps up
/// again, the spent blocks are let go and the block size halves at each
/// refill, back to [`BLOCK_SIZE`].
///
/// Memory: a queued frame keeps its whole block alive, and the encoder
/// keeps at most `max_spent` spent blocks of at most `max` bytes beside the
/// current one (a server: 16 of 64 KiB; a client: 2 of 1 KiB).
#[derive(Debug)]
struct Blocks {
    current: BytesMut,
    /// The capacity `current` was made with; 0 before the first.
    size: usize,
    /// Full blocks whose frames may still be queued, oldest first.
    spent: VecDeque<(BytesMut, usize)>,
    max: usize,
    max_spent: usize,
    /// Blocks allocated so far.
    made: u64,
}

impl Default for Blocks {
    fn default() -> Self {
        Blocks::new(BLOCK_SIZE, 2)
    }
}

impl Blocks {
    fn new(max: usize, max_spent: usize) -> Self {
        Blocks {
            current: BytesMut::new(),
            size: 0,
            spent: VecDeque::new(),
            max: max.max(BLOCK_SIZE),
            max_spent,
            made: 0,
        }
    }

    /// `frame` (at most [`BLOCK_MAX_FRAME`] bytes) as `Bytes` cut from the
    /// current block.
    fn cut(&mut self, frame: &[u8]) -> Bytes {
        if self.current.capacity() < frame.len() {
            self.refill();
        }
        self.current.extend_from_slice(frame);
        self.current.split().freeze()
    }

    fn refill(&mut self) {
        let mut full = std::mem::take(&mut self.current);
        if self.size > 0 && full.try_reclaim(self.size) {
            // Every frame cut from it is gone: writes keep up.
            self.spent.clear();
            if self.size > BLOCK_SIZE {
                self.size /= 2;
                self.made += 1;
                self.current = BytesMut::with_capacity(self.size);
            } else {
                self.current = full;
            }
            return;
        }
        if self.size > 0 && self.max_spent > 0 {
            if self.spent.len() == self.max_spent {
                // Freed once its frames are.
                self.spent.pop_front();
            }
            self.spent.push_back((full, self.size));
            if let Some((mut oldest, size)) = self.spent.pop_front() {
                if oldest.try_reclaim(size) {
                    self.current = oldest;
                    self.size = size;
                    return;
                }
                self.spent.push_front((oldest, size));
            }
        }
        self.size = (self.size * 2).clamp(BLOCK_SIZE, self.max);
        self.made += 1;
        self.current = BytesMut::with_capacity(self.size);
    }
}

impl fmt::Debug for Encoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pooled = self.pool.lock().map(|p| p.len()).unwrap_or(0);
        f.debug_struct("Encoder")
            .field("scratch_capacity", &self.scratch.capacity())
            .field("block_free", &self.blocks.current.capacity())
            .field("spent_blocks", &self.blocks.spent.len())
            .field("blocks_made", &self.blocks.made)
            .field("pooled", &pooled)
            .finish()
    }
}

/// A pooled buffer that an encoded frame's `Bytes` owns.
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if self.buf.capacity() > POOL_MAX_CAPACITY {
            return;
        }
        // A poisoned pool only means a panic elsewhere; the buffer is freed.
        if let Ok(mut pool) = self.pool.lock() {
            if pool.len() < POOL_BUFFERS {
                let mut buf = std::mem::take(&mut self.buf);
                buf.clear();
                pool.push(buf);
            }
        }
    }
}

impl Encoder {
    /// A server's encoder: its blocks grow in bursts (see [`Blocks`]).
    pub(crate) fn for_server() -> Self {
        Encoder {
            blocks: Blocks::new(SERVER_BLOCK_MAX, SERVER_SPENT_BLOCKS),
            ..Encoder::default()
        }
    }

    /// Encodes `frame` with the negotiated codec and version.
    pub(crate) fn encode(
        &mut self,
        frame: &Frame,
        codec: Codec,
        version: u8,
    ) -> Result<Transmit, EncodeError> {
        if let Frame::Msg(m) = frame {
            let len = m.payload.data().len();
            if len >= DIRECT_ENCODE {
                // Base64 in JSON grows the payload by a third.
                let want = len + len / 3 + 256;
                let mut out = self.take_buffer(want);
                let kind = encode_into(frame, codec, version, &mut out)?;
                if out.capacity() > POOL_MAX_CAPACITY {
                    return Ok(kind.with(Bytes::from(out)));
                }
                let owner = Pooled {
                    buf: out,
                    pool: Arc::clone(&self.pool),
                };
                return Ok(kind.with(Bytes::from_owner(owner)));
            }
        }
        let kind = encode_into(frame, codec, version, &mut self.scratch)?;
        Ok(kind.with(self.cut_scratch()))
    }

    /// Encodes `frame` and hands its messages to `emit`: one, or two for a
    /// `msg` whose payload goes detached, which it does when `detach` (the
    /// peer can receive it) and the payload is at least [`DETACH_FROM`]
    /// bytes.
    pub(crate) fn encode_each(
        &mut self,
        frame: &Frame,
        codec: Codec,
        version: u8,
        detach: bool,
        mut emit: impl FnMut(Transmit),
    ) -> Result<(), EncodeError> {
        match frame {
            Frame::Msg(m) if detaches(m, detach) => {
                let kind = encode_detached_into(m, codec, version, &mut self.scratch)?;
                emit(kind.with(self.cut_scratch()));
                emit(Transmit::Binary(m.payload.data.clone()));
                Ok(())
            }
            _ => {
                emit(self.encode(frame, codec, version)?);
                Ok(())
            }
        }
    }

    /// The scratch buffer's frame as `Bytes`: cut from a block if small.
    fn cut_scratch(&mut self) -> Bytes {
        let b = if self.scratch.len() > BLOCK_MAX_FRAME {
            Bytes::copy_from_slice(&self.scratch)
        } else {
            self.blocks.cut(&self.scratch)
        };
        // A rare huge frame should not pin its memory for the machine's life.
        if self.scratch.capacity() > POOL_MAX_CAPACITY {
            self.scratch = Vec::new();
        }
        b
    }

    /// Bytes of the current block not yet cut into frames.
    #[cfg(test)]
    fn block_free(&self) -> usize {
        self.blocks.current.capacity()
    }

    /// A pooled buffer with room for `want` bytes, or a new one.
    fn take_buffer(&mut self, want: usize) -> Vec<u8> {
        if want <= POOL_MAX_CAPACITY {
            if let Ok(mut pool) = self.pool.lock() {
                // The most recently returned buffer first: the socket has
                // just read it, so it is likely still in the cache.
                if let Some(i) = pool.iter().rposition(|b| b.capacity() >= want) {
                    return pool.remove(i);
                }
            }
        }
        Vec::with_capacity(want)
    }

    /// Buffers waiting for reuse.
    #[cfg(test)]
    fn pooled(&self) -> usize {
        self.pool.lock().map(|p| p.len()).unwrap_or(0)
    }
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
    fn with(self, data: Bytes) -> Transmit {
        match self {
            FrameKind::Text => Transmit::Text(data),
            FrameKind::Binary => Transmit::Binary(data),
        }
    }
}

/// Encodes a frame into `out` (cleared first) and says which kind of
/// WebSocket message carries it.
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
}

fn push_header(out: &mut Vec<u8>, kind: u8, version: u8, len: usize) -> Result<(), EncodeError> {
    let len = u32::try_from(len).map_err(|_| EncodeError::TooLarge)?;
    out.push(kind);
    out.push(version);
    out.extend_from_slice(&len.to_le_bytes());
    Ok(())
}

fn encode_handshake(frame: &Frame, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    // Room for a typical hello or welcome in one allocation.
    out.reserve(HANDSHAKE_CAPACITY);
    let mut env = HandshakeEnvelope::default();
    let hex_session;
    let hex_client;
    let hex_key;
    match frame {
        Frame::Hello(h) => {
            env.t = "hello".into();
            env.versions = Some(h.versions.clone());
            hex_client = h.client.to_hex();
            env.client = Some(hex_client.as_str().into());
            if let Some(r) = &h.resume {
                hex_session = r.session.to_hex();
                env.session = Some(hex_session.as_str().into());
                env.delivered = Some(r.delivered);
                hex_key = r.key.map(|k| k.to_hex());
                env.key = hex_key.as_deref().map(Cow::Borrowed);
            }
            env.caps = Some(h.caps.iter().map(|c| c.as_str().into()).collect());
            env.codecs = Some(h.codecs.iter().map(|c| c.name().into()).collect());
        }
        Frame::Welcome(w) => {
            env.t = "welcome".into();
            env.version = Some(w.version);
            env.codec = Some(w.codec.name().into());
            hex_session = w.session.to_hex();
            env.session = Some(hex_session.as_str().into());
            env.resumed = Some(w.resumed);
            env.lost = w.lost.as_deref().map(Cow::Borrowed);
            env.delivered = Some(w.delivered);
            env.features = Some(w.features.iter().map(|c| c.as_str().into()).collect());
            env.ping_ms = Some(w.ping_interval_ms);
            env.pong_ms = Some(w.pong_timeout_ms);
            env.max = Some(w.max_message);
            hex_key = w.key.map(|k| k.to_hex());
            env.key = hex_key.as_deref().map(Cow::Borrowed);
        }
        Frame::Reject(r) => {
            env.t = "reject".into();
            env.code = Some(r.code);
            env.reason = Some(r.reason.as_str().into());
            env.message = Some(r.message.as_str().into());
            env.versions = Some(r.versions.clone());
            env.retry = r.retry_after_ms;
        }
        _ => return Err(EncodeError::Unrepresentable),
    }
    serde_json::to_writer(out, &env).map_err(serializer_error)
}

/// Fills the fields every non-handshake envelope shares; the payload is
/// filled by the codec-specific caller.
macro_rules! fill_common {
    ($env:ident, $frame:expr) => {
        match $frame {
            Frame::Ping { nonce } => {
                $env.t = "ping".into();
                $env.nonce = Some(*nonce);
            }
            Frame::Pong { nonce } => {
                $env.t = "pong".into();
                $env.nonce = Some(*nonce);
            }
            Frame::Ack { ack } => {
                $env.t = "ack".into();
                $env.ack = Some(*ack);
            }
            Frame::Replay { from } => {
                $env.t = "replay".into();
                $env.from = Some(*from);
            }
            Frame::GoAway {
                code,
                retry_after_ms,
            } => {
                $env.t = "goaway".into();
                $env.code = Some(*code);
                $env.retry = *retry_after_ms;
            }
            Frame::Reauth { within_ms } => {
                $env.t = "reauth".into();
                $env.within = Some(*within_ms);
            }
            Frame::Auth { token } => {
                $env.t = "auth".into();
                $env.token = Some(token.as_str().into());
            }
            _ => return Err(EncodeError::Unrepresentable),
        }
    };
}

/// The envelope fields of a message, payload aside.
#[cfg(test)]
macro_rules! fill_msg {
    ($env:ident, $m:expr) => {{
        $env.t = "msg".into();
        $env.seq = Some($m.seq);
        $env.id = Some($m.id);
        $env.ack = $m.ack;
        $env.ts = $m.ts;
        $env.rq = ($m.kind == MsgKind::Request).then_some(true);
        $env.rs = $m.kind.rs();
        $env.op = $m.kind.op().map(Cow::Borrowed);
        $env.r = $m.room.as_deref().map(Cow::Borrowed);
    }};
}

/// The serde form of a `msg` envelope: the oracle the hand-written encoder
/// is checked against.
#[cfg(test)]
fn json_msg(m: &Msg) -> Result<JsonEnvelope<'_>, EncodeError> {
    let mut env = JsonEnvelope::default();
    fill_msg!(env, m);
    let data = &m.payload.data;
    match m.payload.kind {
        PayloadKind::Json => {
            // Checked at construction; a failure here means a bug, reported not panicked.
            let raw: &RawValue = serde_json::from_slice(data).map_err(serializer_error)?;
            env.j = Some(raw);
        }
        PayloadKind::MsgPack => env.m = Some(Cow::Owned(B64.encode(data))),
        PayloadKind::Binary => env.b = Some(Cow::Owned(B64.encode(data))),
    }
    Ok(env)
}

fn encode_json(frame: &Frame, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    match frame {
        // The hot path, written by hand: a JSON payload was validated when
        // the `Payload` was made and is copied in as is, not parsed again.
        Frame::Msg(m) => write_json_msg(m, out, false),
        Frame::Batch(msgs) => {
            out.extend_from_slice(br#"{"t":"batch","f":["#);
            for (i, m) in msgs.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_msg(m, out, false)?;
            }
            out.extend_from_slice(b"]}");
            Ok(())
        }
        _ => {
            let mut env = JsonEnvelope::default();
            fill_common!(env, frame);
            serde_json::to_writer(out, &env).map_err(serializer_error)
        }
    }
}

/// Appends the base64 text of `data` to `out`.
fn push_base64(out: &mut Vec<u8>, data: &[u8]) {
    let start = out.len();
    let n = base64::encoded_len(data.len(), true).unwrap_or(0);
    out.resize(start + n, 0);
    let written = B64.encode_slice(data, &mut out[start..]).unwrap_or(0);
    out.truncate(start + written);
}

/// Writes a `msg` envelope with the same field order serde would use;
/// `detached`: with the payload's length in its place (`dj`, `dm`, `db`).
fn write_json_msg(m: &Msg, out: &mut Vec<u8>, detached: bool) -> Result<(), EncodeError> {
    if let MsgKind::Invalid(_) = m.kind {
        return Err(EncodeError::Unrepresentable);
    }
    use std::io::Write as _;
    let io = |e: std::io::Error| EncodeError::Serializer(e.to_string());
    write!(out, r#"{{"t":"msg","seq":{},"id":{}"#, m.seq, m.id).map_err(io)?;
    if let Some(ack) = m.ack {
        write!(out, r#","ack":{ack}"#).map_err(io)?;
    }
    if let Some(ts) = m.ts {
        write!(out, r#","ts":{ts}"#).map_err(io)?;
    }
    let data = &m.payload.data;
    match m.payload.kind {
        _ if detached => {
            let key = detached_key(m.payload.kind);
            write!(out, r#","{key}":{}"#, data.len()).map_err(io)?;
        }
        PayloadKind::Json => {
            out.extend_from_slice(br#","j":"#);
            out.extend_from_slice(data);
        }
        PayloadKind::MsgPack => {
            out.extend_from_slice(br#","m":""#);
            push_base64(out, data);
            out.push(b'"');
        }
        PayloadKind::Binary => {
            out.extend_from_slice(br#","b":""#);
            push_base64(out, data);
            out.push(b'"');
        }
    }
    if let Some(room) = &m.room {
        out.extend_from_slice(br#","r":"#);
        serde_json::to_writer(&mut *out, &**room).map_err(serializer_error)?;
    }
    match m.kind {
        MsgKind::Plain => {}
        MsgKind::Request => out.extend_from_slice(br#","rq":true"#),
        MsgKind::Response(to) => write!(out, r#","rs":{to}"#).map_err(io)?,
        other => {
            if let Some(to) = other.rs() {
                write!(out, r#","rs":{to}"#).map_err(io)?;
            }
            if let Some(op) = other.op() {
                write!(out, r#","op":"{op}""#).map_err(io)?;
            }
        }
    }
    out.push(b'}');
    Ok(())
}

/// The serde form of a `msg` envelope in MessagePack: the oracle the
/// hand-written encoder is checked against.
#[cfg(test)]
fn pack_msg(m: &Msg) -> Result<PackEnvelope<'_>, EncodeError> {
    let mut env = PackEnvelope::default();
    fill_msg!(env, m);
    let data: &[u8] = &m.payload.data;
    match m.payload.kind {
        PayloadKind::Json => {
            let s = std::str::from_utf8(data).map_err(serializer_error)?;
            env.j = Some(s.into());
        }
        PayloadKind::MsgPack => env.m = Some(serde_bytes::Bytes::new(data)),
        PayloadKind::Binary => env.b = Some(serde_bytes::Bytes::new(data)),
    }
    Ok(env)
}

fn encode_msgpack(frame: &Frame, version: u8, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    out.reserve(BINARY_HEADER_LEN + 48 + frame_payload_len(frame));
    out.extend_from_slice(&[0; BINARY_HEADER_LEN]);
    match frame {
        // The hot path, written by hand with the same bytes serde writes
        // (checked against it in the tests).
        Frame::Msg(m) => write_pack_msg(m, out, false)?,
        Frame::Batch(msgs) => {
            let len = u32::try_from(msgs.len()).map_err(|_| EncodeError::TooLarge)?;
            rmp::encode::write_map_len(out, 2).map_err(serializer_error)?;
            rmp::encode::write_str(out, "t").map_err(serializer_error)?;
            rmp::encode::write_str(out, "batch").map_err(serializer_error)?;
            rmp::encode::write_str(out, "f").map_err(serializer_error)?;
            rmp::encode::write_array_len(out, len).map_err(serializer_error)?;
            for m in msgs {
                write_pack_msg(m, out, false)?;
            }
        }
        _ => {
            let mut env = PackEnvelope::default();
            fill_common!(env, frame);
            rmp_serde::encode::write_named(out, &env).map_err(serializer_error)?;
        }
    }
    seal_msgpack(out, version)
}

/// Fills in the binary header reserved at the start of `out` for the
/// MessagePack envelope after it.
fn seal_msgpack(out: &mut [u8], version: u8) -> Result<(), EncodeError> {
    let body = u32::try_from(out.len() - BINARY_HEADER_LEN).map_err(|_| EncodeError::TooLarge)?;
    out[0] = KIND_MSGPACK;
    out[1] = version;
    out[2..BINARY_HEADER_LEN].copy_from_slice(&body.to_le_bytes());
    Ok(())
}

/// An encoder's error as [`EncodeError::Serializer`].
fn serializer_error<E: fmt::Display>(e: E) -> EncodeError {
    EncodeError::Serializer(e.to_string())
}

/// Writes a `msg` envelope as the MessagePack map serde would write: the
/// fields in declaration order, absent ones left out, integers in their
/// shortest form. `detached`: with the payload's length in its place
/// (`dj`, `dm`, `db`).
fn write_pack_msg(m: &Msg, out: &mut Vec<u8>, detached: bool) -> Result<(), EncodeError> {
    if let MsgKind::Invalid(_) = m.kind {
        return Err(EncodeError::Unrepresentable);
    }
    use rmp::encode::{write_bin, write_bool, write_map_len, write_str, write_uint};
    let extra = match m.kind {
        MsgKind::Plain => 0,
        MsgKind::Request | MsgKind::Response(_) => 1,
        MsgKind::RefusedMessage(_) => 2,
        other => u32::from(other.op().is_some()),
    };
    let len = 4
        + u32::from(m.ack.is_some())
        + u32::from(m.ts.is_some())
        + u32::from(m.room.is_some())
        + extra;
    write_map_len(out, len).map_err(serializer_error)?;
    write_str(out, "t").map_err(serializer_error)?;
    write_str(out, "msg").map_err(serializer_error)?;
    write_str(out, "seq").map_err(serializer_error)?;
    write_uint(out, m.seq).map_err(serializer_error)?;
    write_str(out, "id").map_err(serializer_error)?;
    write_uint(out, m.id).map_err(serializer_error)?;
    if let Some(ack) = m.ack {
        write_str(out, "ack").map_err(serializer_error)?;
        write_uint(out, ack).map_err(serializer_error)?;
    }
    if let Some(ts) = m.ts {
        write_str(out, "ts").map_err(serializer_error)?;
        write_uint(out, ts).map_err(serializer_error)?;
    }
    let data: &[u8] = &m.payload.data;
    match m.payload.kind {
        _ if detached => {
            write_str(out, detached_key(m.payload.kind)).map_err(serializer_error)?;
            write_uint(out, data.len() as u64).map_err(serializer_error)?;
        }
        PayloadKind::Json => {
            // Checked at construction; a failure here means a bug, reported not panicked.
            let s = std::str::from_utf8(data).map_err(serializer_error)?;
            write_str(out, "j").map_err(serializer_error)?;
            write_str(out, s).map_err(serializer_error)?;
        }
        PayloadKind::MsgPack => {
            write_str(out, "m").map_err(serializer_error)?;
            write_bin(out, data).map_err(serializer_error)?;
        }
        PayloadKind::Binary => {
            write_str(out, "b").map_err(serializer_error)?;
            write_bin(out, data).map_err(serializer_error)?;
        }
    }
    if let Some(room) = &m.room {
        write_str(out, "r").map_err(serializer_error)?;
        write_str(out, room).map_err(serializer_error)?;
    }
    match m.kind {
        MsgKind::Plain => {}
        MsgKind::Request => {
            write_str(out, "rq").map_err(serializer_error)?;
            write_bool(out, true).map_err(serializer_error)?;
        }
        MsgKind::Response(to) | MsgKind::RefusedMessage(to) => {
            write_str(out, "rs").map_err(serializer_error)?;
            write_uint(out, to).map_err(serializer_error)?;
            if let Some(op) = m.kind.op() {
                write_str(out, "op").map_err(serializer_error)?;
                write_str(out, op).map_err(serializer_error)?;
            }
        }
        other => {
            if let Some(op) = other.op() {
                write_str(out, "op").map_err(serializer_error)?;
                write_str(out, op).map_err(serializer_error)?;
            }
        }
    }
    Ok(())
}

/// The envelope key of a detached payload of `kind`.
fn detached_key(kind: PayloadKind) -> &'static str {
    match kind {
        PayloadKind::Json => "dj",
        PayloadKind::MsgPack => "dm",
        PayloadKind::Binary => "db",
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

fn frame_payload_len(frame: &Frame) -> usize {
    match frame {
        Frame::Msg(m) => m.payload.len(),
        Frame::Batch(msgs) => msgs.iter().map(|m| m.payload.len() + 32).sum(),
        _ => 0,
    }
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

#[cfg(test)]
mod tests;
