//! The frames, and the WebSocket messages that carry them.
//!
//! Owns the types the machines hand to the encoder and get from the decoder:
//! [`Frame`] and the handshake and message types inside it, [`Incoming`] and
//! [`Transmit`]. Plain data: it never encodes or decodes, and what a peer
//! may send is the decoder's to check.

use std::fmt;

use bytes::Bytes;

use super::{ClientId, Codec, InvalidMsg, Payload, SessionId};
use crate::hlc::HlcTimestamp;

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

    /// The key's hex digits on the stack.
    pub(crate) fn hex(&self) -> crate::ids::Hex32 {
        crate::ids::Hex32::of(&self.0)
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
    pub caps: Vec<super::CapName>,
    /// Codecs the client speaks, preferred first. Unknown names are ignored.
    pub codecs: Vec<Codec>,
    /// Rooms to join when this `hello` opens a new session (one without
    /// `resume`, or one whose session could not be resumed): each joined
    /// as a `join` message would be, its answer right after the `welcome`
    /// (PROTOCOL.md, section 4). At most 32, each 1 to 256 bytes.
    pub join: Vec<std::sync::Arc<str>>,
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
    /// The highest of this side's own sequence numbers the other side has
    /// acknowledged: what a server that lost the session's state (its
    /// node crashed) needs to take it up again (`welcome` `recovered`).
    pub acked: Option<u64>,
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
    /// Shared: a server answers every `hello` with the same list.
    pub features: std::sync::Arc<[super::CapName]>,
    /// Client ping interval, in milliseconds.
    pub ping_interval_ms: u64,
    /// How long the client waits for a pong, in milliseconds.
    pub pong_timeout_ms: u64,
    /// The largest message the server accepts, in bytes.
    pub max_message: u64,
    /// The secret to show when resuming this session (`None` from a server
    /// that does not use resume keys).
    pub key: Option<ResumeKey>,
    /// The session was taken up again after the server that held it was
    /// lost: whatever that server had sent after the client's `delivered`
    /// and not yet seen acknowledged may be gone (PROTOCOL.md, section 6).
    pub recovered: bool,
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
    pub(super) fn invalid(seq: u64, id: u64, ack: Option<u64>, what: InvalidMsg) -> Msg {
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
    /// Client to server: a write to one of `room`'s synced maps
    /// (`"op":"mset"`). The payload, JSON or MessagePack, is the write
    /// (PROTOCOL.md, section 3.6), made and read by
    /// [`MapWriteBody`](super::MapWriteBody): `{"n":map,"k":key}` and the
    /// value as `"vj"`, `"vm"` or `"vb"` (none of them: the entry is
    /// deleted), with the writer's stamp as `"h":[ms,logical,node]` when
    /// the map lets peers stamp.
    MapWrite,
    /// A `msg` whose `seq` and `id` could be read but whose other fields
    /// could not (an unknown `op`, a bad room name, a bad payload, ...).
    /// Only ever produced by the decoder, never sent: the receiver consumes
    /// the sequence number and reports the message by id instead of
    /// dropping it, so one bad message cannot stall the stream.
    #[cfg_attr(feature = "fuzzing", arbitrary(skip))]
    Invalid(InvalidMsg),
}

impl MsgKind {
    pub(super) fn op(self) -> Option<&'static str> {
        match self {
            MsgKind::Join => Some("join"),
            MsgKind::Leave => Some("leave"),
            MsgKind::Presence => Some("presence"),
            MsgKind::Refused | MsgKind::RefusedMessage(_) => Some("refused"),
            MsgKind::MapWrite => Some("mset"),
            _ => None,
        }
    }

    /// The `rs` field this kind puts on the wire.
    pub(super) fn rs(self) -> Option<u64> {
        match self {
            MsgKind::Response(to) | MsgKind::RefusedMessage(to) => Some(to),
            _ => None,
        }
    }

    /// Whether the kind needs a room.
    pub fn needs_room(self) -> bool {
        matches!(
            self,
            MsgKind::Join
                | MsgKind::Leave
                | MsgKind::Presence
                | MsgKind::Refused
                | MsgKind::MapWrite
        )
    }
}

/// An entry of a room's stream (`pub`), as every member of the room gets
/// it: the same bytes for all (PROTOCOL.md, section 3.4).
#[derive(Clone, Debug, PartialEq)]
pub struct StreamEntry {
    /// The room.
    pub room: std::sync::Arc<str>,
    /// The entry's place in the room's stream, from 1, without gaps.
    pub offset: u64,
    /// [`MsgKind::Plain`] (a broadcast or a publish) or
    /// [`MsgKind::Presence`] (a membership diff).
    pub kind: MsgKind,
    /// The publisher's timestamp in milliseconds, if it set one.
    pub ts: Option<u64>,
    /// The payload.
    pub payload: Payload,
}

/// A room's latest value of a key (`lv`), as every member that announced
/// `latest` gets it: unsequenced and unacknowledged, each superseding the
/// ones before it (PROTOCOL.md, section 3.5).
#[derive(Clone, Debug, PartialEq)]
pub struct LatestValue {
    /// The room.
    pub room: std::sync::Arc<str>,
    /// The key, 1 to 256 bytes.
    pub key: std::sync::Arc<str>,
    /// The identity of the room's values: values made again (the room
    /// emptied, or another server took it) have another epoch. Below
    /// [`MAX_EPOCH`](super::MAX_EPOCH).
    pub epoch: u64,
    /// The value's version within the epoch, from 1: a greater version
    /// of a key supersedes a smaller one.
    pub version: u64,
    /// The payload.
    pub payload: Payload,
}

/// An entry of one of a room's synced maps (`mv`), as the server sends
/// it to the room's members: unsequenced, superseded by any later stamp
/// of the same key (PROTOCOL.md, section 3.6).
#[derive(Clone, Debug, PartialEq)]
pub struct MapValue {
    /// The room.
    pub room: std::sync::Arc<str>,
    /// The map's name within the room (`n`).
    pub map: std::sync::Arc<str>,
    /// The entry's key (`k`).
    pub key: std::sync::Arc<str>,
    /// The write's stamp (`ts`, `hl`, `hn`): of two values of a key, the
    /// greater stamp wins.
    pub stamp: HlcTimestamp,
    /// The value; `None`: the entry was deleted (no payload field).
    pub value: Option<Payload>,
    /// Only in the copy sent to the writer (`id`): the id of the
    /// receiving client's `mset` this settles. The entry is then
    /// what the key holds after that write, whether it won or an entry
    /// with a greater stamp did.
    pub settles: Option<u64>,
}

/// The start of a synced map's snapshot (`ms`): the map holds exactly the
/// `entries` entries sent next as `mv` frames, and nothing else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapSnapshot {
    /// The room.
    pub room: std::sync::Arc<str>,
    /// The map's name within the room (`n`).
    pub map: std::sync::Arc<str>,
    /// How many `mv` frames follow (`seq`), each an entry the map holds.
    pub entries: u64,
}

/// Where a member's copy of a room's stream stands (`sub`): after
/// `offset` in the stream `epoch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamPos {
    /// The room.
    pub room: std::sync::Arc<str>,
    /// The stream's identity: a room whose stream was lost and started
    /// again (the server forgot it) has another epoch. Below
    /// [`MAX_EPOCH`](super::MAX_EPOCH).
    pub epoch: u64,
    /// The last offset the member has (0: none yet).
    pub offset: u64,
    /// From the server only: the entries from this offset through
    /// `offset` are gone from its history and will never come; the
    /// member reports them missed.
    pub missed_from: Option<u64>,
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
    /// Server to client: an entry of a room's stream (only to a client that
    /// announced `stream`).
    Pub(StreamEntry),
    /// Server to client: the entry at `offset` of `room`'s stream is not
    /// for this member (it was excluded from the broadcast); its offset is
    /// used all the same.
    Skip {
        /// The room.
        room: std::sync::Arc<str>,
        /// The offset used.
        offset: u64,
    },
    /// Server to client: the member's stream of a room continues after the
    /// given position; sent when a member starts receiving a room's stream
    /// on a connection, before any entry of it.
    Sub(StreamPos),
    /// Client to server, right after a resumed `welcome`: where each of its
    /// room streams stands, so the server sends what it missed.
    Subs(Vec<StreamPos>),
    /// Server to client: a room's latest value of a key (only to a client
    /// that announced `latest`).
    Latest(LatestValue),
    /// Server to client: an entry of a room's synced map.
    MapValue(MapValue),
    /// Server to client: a synced map's snapshot follows.
    MapSnapshot(MapSnapshot),
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
            Frame::Pub(_) => "pub",
            Frame::Latest(_) => "lv",
            Frame::MapValue(_) => "mv",
            Frame::MapSnapshot(_) => "ms",
            Frame::Skip { .. } => "skip",
            Frame::Sub(_) => "sub",
            Frame::Subs(_) => "subs",
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
