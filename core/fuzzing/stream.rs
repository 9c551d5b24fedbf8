//! Body of the `server_stream` target: one well-behaved client model and a
//! [`Server`], with faults injected between the client's messages.
//!
//! This file owns the target's inputs ([`StreamSetup`], [`StreamOp`] and
//! the faults they name, with the bytes a [`Poison`] message is on the
//! wire), the record of what happened to every message, and
//! [`StreamHarness`] with its server's side: taking the server's outputs
//! and events. The client model is in `stream/client.rs`, the ops and the
//! quiet phase in `stream/ops.rs`. The server is driven through its public
//! API only (the client model reads its session's key with the
//! crate-private `Server::resume_key`, as a real client has it from its
//! welcome); the client model never misbehaves unless an op says so.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use arbitrary::Arbitrary;
use bytes::Bytes;
use core::time::Duration;

use crate::close::CloseCode;
use crate::config::{QueueConfig, ServerConfig};
use crate::server::{ConnectionId, Server, ServerEvent, ServerOutput};
use crate::time::Instant;
use crate::wire::{
    self, Codec, Frame, Incoming, Payload, SessionId, Transmit, KIND_MSGPACK, PROTOCOL_VERSION,
};

use super::decode_own;

mod client;
mod ops;

/// Settings of the `server_stream` target.
#[derive(Arbitrary, Clone, Debug)]
pub struct StreamSetup {
    /// The client prefers MessagePack (else it offers JSON only).
    pub msgpack: bool,
    /// The server's send window (messages), 1..=16.
    pub server_window: u8,
    /// The server acknowledges after this many deliveries, 1..=40.
    pub server_ack_every: u8,
    /// The client's send window (messages), 1..=16.
    pub client_window: u8,
    /// The client acknowledges after this many deliveries, 1..=8.
    pub client_ack_every: u8,
    /// The server batches what it sends (the client announces `batch`).
    pub batch: bool,
    /// The client offers its `hello` in the upgrade request.
    pub upgrade: bool,
}

impl StreamSetup {
    /// The server's configuration: buffers and session limit large enough
    /// that no session is ever lost to them in a run, so every loss the
    /// model sees is one it asked for.
    pub fn config(&self) -> ServerConfig {
        let mut c = ServerConfig {
            queue: QueueConfig {
                max_messages: 1 << 16,
                max_bytes: 1 << 26,
            },
            ..ServerConfig::default()
        };
        c.reliability.window_messages = 1 + usize::from(self.server_window % 16);
        c.reliability.ack_every = 1 + u32::from(self.server_ack_every % 40);
        if self.batch {
            c.batch = Some(crate::reliable::BatchConfig::default());
        }
        c
    }

    fn client_window(&self) -> usize {
        1 + usize::from(self.client_window % 16)
    }

    fn client_ack_every(&self) -> u64 {
        1 + u64::from(self.client_ack_every % 8)
    }
}

/// A numbered client message that the server can never accept (its `seq`
/// and `id` are readable, something else is wrong): the server must consume
/// it and refuse it by id (PROTOCOL.md, section 3.3).
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poison {
    /// `r` empty (`false`) or longer than 256 bytes (`true`).
    BadRoom(bool),
    /// An `op` nobody knows.
    UnknownOp,
    /// `join` (`false`) or `leave` (`true`) without `r`.
    OpWithoutRoom(bool),
    /// `presence` (`false`) or `refused` (`true`), which only servers send.
    ServerOnlyOp(bool),
    /// Both `rq` and `rs`.
    RequestAndResponse,
    /// A field of the wrong type: `ts`, `r`, `rq`, `rs`, `op`, `ack`.
    WrongType(u8),
    /// A payload that cannot be read: bad base64 in JSON, a `j` that is not
    /// JSON in MessagePack.
    BadPayload,
    /// Two payloads.
    TwoPayloads,
    /// No payload.
    NoPayload,
    /// A JSON payload nested 65 deep.
    TooDeep,
    /// A detached JSON payload (PROTOCOL.md, section 2.1) that is not JSON.
    DetachedNotJson,
}

/// A `delivered` that is not the client's true one, for a resume.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum WrongDelivered {
    /// Below what the client acknowledged, by `1 + n`: inconsistent.
    BelowAcked(u8),
    /// Above anything the server can have sent: inconsistent.
    AboveSent(u8),
    /// Between what the client acknowledged and what it delivered (a
    /// client that lost track of some deliveries): the server sends them
    /// again and the client drops the duplicates.
    Behind(u8),
    /// A session the server never had: `unknown_session`.
    UnknownSession,
}

/// A first frame that is not a usable `hello`.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum BadHello {
    /// Not JSON.
    NotJson,
    /// Another frame type (`ping`, `ack`, `msg`, an unknown type).
    NotAHello(u8),
    /// A `hello` without `client`.
    MissingClient,
    /// A `hello` whose `client` is not 32 hex digits.
    BadClient,
    /// A `hello` offering 33 versions.
    TooManyVersions,
    /// A `hello` naming the client's session without `delivered`.
    SessionWithoutDelivered,
    /// A `hello` in a MessagePack envelope.
    MsgPack,
    /// An empty text message.
    Empty,
    /// A `Kitestring-Hello` header that does not decode: the server answers
    /// without one and waits for the `hello` frame, which the client sends
    /// (this becomes its connection).
    UpgradeGarbage,
}

/// How a connection drops.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum DropKind {
    /// The transport closes (1006); both sides see it.
    Closed,
    /// The client's side dies silently; the server finds out later (idle
    /// timeout, or the next connection taking the session over).
    HalfOpen,
    /// The server closes the connection (`disconnect_connection`, 4000).
    ServerClosed,
    /// The server asks the client to go (`go_away`: rotation or going away).
    GoAway(bool),
}

/// One step of the `server_stream` target.
#[derive(Arbitrary, Clone, Debug)]
pub enum StreamOp {
    /// The client application sends a message.
    Send,
    /// The client sends a numbered message the server cannot accept.
    Poison(Poison),
    /// The server application sends `1 + n % 4` messages.
    ServerSend(u8),
    /// Up to `1 + n % 8` frames reach the client from the server.
    Deliver(u8),
    /// The client acknowledges what it delivered.
    Ack,
    /// The client connects (taking its session over if it still has a
    /// connection) and resumes with its true `delivered`; `true`: the
    /// `hello` in the upgrade request.
    Connect(bool),
    /// The client's connection closes and it resumes with a wrong
    /// `delivered`.
    WrongResume(WrongDelivered),
    /// A fresh connection whose first frame is not a usable `hello`.
    BadHello(BadHello),
    /// The connection drops.
    Drop(DropKind),
    /// Time passes (milliseconds): the client reads what arrives, keeps its
    /// heartbeat and acknowledges.
    Advance(u16),
    /// A little time passes (milliseconds) with the client reading nothing.
    Wait(u8),
}

/// What happened to one client message.
#[derive(Debug, Default)]
pub(super) struct StreamMsg {
    pub(super) poison: Option<Poison>,
    /// Its `seq` in the session it was numbered in (0: not yet).
    pub(super) seq: u64,
    /// Handed to the server's application.
    pub(super) delivered: u32,
    /// Refusals the client received for it.
    pub(super) refused: u32,
    /// Covered by a cumulative acknowledgment.
    pub(super) acked: bool,
    /// Its session was lost while it was unacknowledged: unconfirmed.
    pub(super) lost: bool,
}

/// What happened to one message of the server application.
#[derive(Debug)]
struct ServerSent {
    session: SessionId,
    /// Times the client delivered it.
    delivered: u32,
    /// The server reported it acknowledged.
    acked: bool,
    /// The server reported it unconfirmed (its session ended).
    lost: bool,
}

/// A frame or the close, on its way from the server to the client.
#[derive(Debug)]
enum Wire {
    Frame(Transmit),
    Close(CloseCode),
}

/// Where a resume's `delivered` stands, so the model knows the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Claim {
    /// Between what the client acknowledged and what it delivered.
    Consistent,
    /// Below what the client acknowledged, or above what was sent.
    Inconsistent,
    /// An unknown session.
    Unknown,
}

/// The client's acknowledgment timeout: data unacknowledged this long with
/// no progress and the client resumes on a new connection.
const STREAM_ACK_TIMEOUT: Duration = Duration::from_secs(45);

/// The client's heartbeat while time passes.
const STREAM_PING_EVERY: Duration = Duration::from_secs(5);

/// Bound of the quiet phase, in steps of [`QUIET_STEP`].
const QUIET_STEPS: u32 = 3000;

/// One step of the quiet phase.
const QUIET_STEP: Duration = Duration::from_millis(100);

/// A [`Server`] and one well-behaved client model speaking the wire
/// protocol to it (numbering its messages, retransmitting on `replay` and
/// after a resume, acknowledging cumulatively), with faults injected
/// between its messages. See [`server_stream`].
pub struct StreamHarness {
    server: Server,
    setup: StreamSetup,
    codec: Codec,
    now: Instant,
    /// The connection the client uses, and whether it is welcomed.
    conn: Option<ConnectionId>,
    open: bool,
    /// Server to client, on `conn`, in order.
    wire: std::collections::VecDeque<Wire>,
    /// Since when the client has had no open connection.
    detached_since: Option<Instant>,
    session: Option<SessionId>,
    /// Client messages not yet numbered, by id.
    pub(super) waiting: std::collections::VecDeque<u64>,
    /// Numbered, unacknowledged: `(seq, id)`.
    window: std::collections::VecDeque<(u64, u64)>,
    next_seq: u64,
    /// The highest acknowledgment the client received in this session.
    acked: u64,
    /// When an acknowledgment last released a message (or the connection
    /// opened).
    progress_at: Instant,
    /// The highest `seq` the client delivered from the server.
    delivered: u64,
    /// The highest acknowledgment the server received from the client.
    acked_sent: u64,
    /// Server messages the client delivered and has not acknowledged yet.
    unacked_in: u64,
    /// The last server message id delivered in this session.
    last_in_id: u64,
    pub(super) msgs: BTreeMap<u64, StreamMsg>,
    pub(super) next_id: u64,
    server_msgs: BTreeMap<u64, ServerSent>,
    /// Last `seq` the server's application got, per session.
    app_seq: BTreeMap<SessionId, u64>,
    ended: std::collections::BTreeSet<SessionId>,
    /// Connections the server closed.
    closed: std::collections::BTreeSet<ConnectionId>,
    /// A connection tested with a bad first frame, and what it got.
    side: Option<ConnectionId>,
    side_out: Vec<Wire>,
    next_fresh: u64,
    nonce: u64,
    last_ping: Instant,
    log: String,
}

impl StreamHarness {
    /// A harness around a new server.
    pub fn new(setup: StreamSetup) -> StreamHarness {
        let server = match Server::new(setup.config()) {
            Ok(s) => s,
            Err(e) => panic!("server config rejected: {e}"),
        };
        StreamHarness {
            server,
            codec: if setup.msgpack {
                Codec::MsgPack
            } else {
                Codec::Json
            },
            setup,
            now: Instant::ZERO,
            conn: None,
            open: false,
            wire: Default::default(),
            detached_since: Some(Instant::ZERO),
            session: None,
            waiting: Default::default(),
            window: Default::default(),
            next_seq: 1,
            acked: 0,
            progress_at: Instant::ZERO,
            delivered: 0,
            acked_sent: 0,
            unacked_in: 0,
            last_in_id: 0,
            msgs: BTreeMap::new(),
            next_id: 1,
            server_msgs: BTreeMap::new(),
            app_seq: BTreeMap::new(),
            ended: Default::default(),
            closed: Default::default(),
            side: None,
            side_out: Vec::new(),
            next_fresh: 1,
            nonce: 1,
            last_ping: Instant::ZERO,
            log: String::new(),
        }
    }

    fn fail(&self, what: impl core::fmt::Display) -> ! {
        panic!("{what}\n{}", self.log)
    }

    fn fresh_session(&mut self) -> SessionId {
        let mut b = [0x5e; 16];
        b[..8].copy_from_slice(&self.next_fresh.to_le_bytes());
        self.next_fresh += 1;
        SessionId(b)
    }

    /// Takes every output of the server: frames and closes for the client's
    /// connection go on the wire, the side connection's are kept, older
    /// connections' are lost with them; events update the record.
    fn drain(&mut self) {
        while let Some(o) = self.server.poll_output() {
            let _ = writeln!(self.log, "  {o:?}");
            match o {
                ServerOutput::Transmit(c, t) => {
                    if self.closed.contains(&c) {
                        self.fail(format_args!("a transmit on {c:?} after its close"));
                    }
                    if decode_own(&t, "server").is_none() {
                        continue;
                    }
                    if Some(c) == self.conn {
                        self.wire.push_back(Wire::Frame(t));
                    } else if Some(c) == self.side {
                        self.side_out.push(Wire::Frame(t));
                    }
                }
                ServerOutput::Disconnect(c, code, _) => {
                    if !code.is_sendable() {
                        self.fail(format_args!("the server closes with {code:?}"));
                    }
                    if !self.closed.insert(c) {
                        self.fail(format_args!("{c:?} closed twice"));
                    }
                    if Some(c) == self.conn {
                        self.wire.push_back(Wire::Close(code));
                    } else if Some(c) == self.side {
                        self.side_out.push(Wire::Close(code));
                    }
                }
                ServerOutput::Event(e) => self.server_event(e),
                ServerOutput::Feed(f) => {
                    self.fail(format_args!("a feed output with feeds off: {f:?}"))
                }
                ServerOutput::Cluster(c) => self.fail(format_args!(
                    "a cluster output with shared rooms off: {c:?}"
                )),
                ServerOutput::Latest(_, v) => {
                    self.fail(format_args!("a latest value with slots off: {v:?}"))
                }
                ServerOutput::Map(u) => self.fail(format_args!(
                    "a synced-map update with shared rooms off: {u:?}"
                )),
            }
        }
    }

    fn server_event(&mut self, e: ServerEvent) {
        match e {
            ServerEvent::Message { session, message } => {
                if Some(session) != self.session {
                    self.fail(format_args!(
                        "a message for {session:?}, not the client's session"
                    ));
                }
                // In order; refused messages leave holes.
                let last = self.app_seq.get(&session).copied().unwrap_or(0);
                if message.seq <= last {
                    self.fail(format_args!(
                        "the application got seq {} after {last}",
                        message.seq
                    ));
                }
                self.app_seq.insert(session, message.seq);
                let id = message.id.0;
                let want = Payload::json(id.to_string().into_bytes()).ok();
                let Some(m) = self.msgs.get_mut(&id) else {
                    self.fail(format_args!("the application got unknown message {id}"));
                };
                m.delivered += 1;
                let (poison, delivered, seq) = (m.poison, m.delivered, m.seq);
                if let Some(p) = poison {
                    self.fail(format_args!("message {id} ({p:?}) reached the application"));
                }
                if delivered > 1 {
                    self.fail(format_args!("message {id} delivered twice"));
                }
                if seq != message.seq || Some(&message.payload) != want.as_ref() {
                    self.fail(format_args!("message {id} delivered changed: {message:?}"));
                }
            }
            ServerEvent::Acked {
                session,
                first,
                last,
            } => {
                let ids: Vec<u64> = self
                    .server_msgs
                    .range(first.0..=last.0)
                    .filter(|(_, m)| m.session == session)
                    .map(|(id, _)| *id)
                    .collect();
                for id in ids {
                    let Some(m) = self.server_msgs.get_mut(&id) else {
                        continue;
                    };
                    let (delivered, lost, acked) = (m.delivered, m.lost, m.acked);
                    m.acked = true;
                    if delivered == 0 || lost || acked {
                        self.fail(format_args!(
                            "server message {id} acknowledged (delivered {delivered}, lost {lost}, acked {acked})"
                        ));
                    }
                }
            }
            ServerEvent::SessionEnded {
                session,
                unconfirmed,
                ..
            } => {
                self.ended.insert(session);
                for id in unconfirmed {
                    if let Some(m) = self.server_msgs.get_mut(&id.0) {
                        m.lost = true;
                        if m.acked {
                            self.fail(format_args!(
                                "server message {} reported both acknowledged and unconfirmed",
                                id.0
                            ));
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Whether the server still has `conn`.
    fn server_has(&self, conn: ConnectionId) -> bool {
        self.server.session_of(conn).is_some()
    }

    /// Sends one message to the server on the client's connection; lost if
    /// the server already closed it.
    fn send_to_server(&mut self, msg: Incoming<'_>) -> bool {
        let Some(conn) = self.conn else { return false };
        if !self.server_has(conn) {
            return false;
        }
        self.server.handle_message(self.now, conn, msg);
        self.drain();
        true
    }

    fn send_frame(&mut self, frame: &Frame) -> bool {
        match wire::encode(frame, self.codec, PROTOCOL_VERSION) {
            Ok(t) => self.send_to_server(t.as_incoming()),
            Err(e) => self.fail(format_args!("the client cannot encode {frame:?}: {e}")),
        }
    }
}

/// The messages a poison message is on the wire: its envelope (and, for a
/// detached payload, the payload after it).
pub(super) fn poison_messages(
    p: Poison,
    codec: Codec,
    seq: u64,
    id: u64,
    ack: u64,
) -> Vec<Transmit> {
    use serde_json::{json, Value};
    let mut env = serde_json::Map::new();
    env.insert("t".into(), json!("msg"));
    env.insert("seq".into(), json!(seq));
    env.insert("id".into(), json!(id));
    env.insert("ack".into(), json!(ack));
    let deep = format!("{}1{}", "[".repeat(65), "]".repeat(65));
    // The payload as the codec carries it: JSON inline, or JSON text in
    // MessagePack.
    let j = |text: &str| -> Value {
        match codec {
            Codec::Json => serde_json::from_str::<Value>(text).unwrap_or(Value::Null),
            Codec::MsgPack => Value::String(text.to_owned()),
        }
    };
    let mut payload = Some(j("1"));
    match p {
        Poison::BadRoom(long) => {
            let room = if long { "r".repeat(257) } else { String::new() };
            env.insert("r".into(), json!(room));
        }
        Poison::UnknownOp => {
            env.insert("op".into(), json!("dance"));
            env.insert("r".into(), json!("lobby"));
        }
        Poison::OpWithoutRoom(leave) => {
            env.insert("op".into(), json!(if leave { "leave" } else { "join" }));
        }
        Poison::ServerOnlyOp(refused) => {
            env.insert(
                "op".into(),
                json!(if refused { "refused" } else { "presence" }),
            );
            env.insert("r".into(), json!("lobby"));
        }
        Poison::RequestAndResponse => {
            env.insert("rq".into(), json!(true));
            env.insert("rs".into(), json!(1));
        }
        Poison::WrongType(n) => {
            let (k, v) = match n % 6 {
                0 => ("ts", json!("x")),
                1 => ("r", json!([1])),
                2 => ("rq", json!("yes")),
                3 => ("rs", json!("x")),
                4 => ("op", json!(5)),
                _ => ("ack", json!("x")),
            };
            env.insert(k.into(), v);
        }
        Poison::BadPayload => {
            payload = None;
            match codec {
                Codec::Json => env.insert("b".into(), json!("!!not base64!!")),
                Codec::MsgPack => env.insert("j".into(), json!("{")),
            };
        }
        Poison::TwoPayloads => {
            env.insert("b".into(), json!("AA=="));
        }
        Poison::NoPayload => payload = None,
        Poison::TooDeep => payload = Some(j(&deep)),
        Poison::DetachedNotJson => {
            payload = None;
            env.insert("dj".into(), json!(5));
        }
    }
    if let Some(v) = payload {
        env.insert("j".into(), v);
    }
    let env = Value::Object(env);
    let mut out = vec![match codec {
        Codec::Json => Transmit::Text(Bytes::from(env.to_string().into_bytes())),
        Codec::MsgPack => {
            let body = rmp_serde::to_vec(&env).unwrap_or_default();
            let mut msg = vec![KIND_MSGPACK, PROTOCOL_VERSION];
            msg.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_le_bytes());
            msg.extend_from_slice(&body);
            Transmit::Binary(Bytes::from(msg))
        }
    }];
    if let Poison::DetachedNotJson = p {
        out.push(Transmit::Binary(Bytes::from_static(b"]]]]]")));
    }
    out
}

/// Target `server_stream`: one well-behaved client model and a server,
/// with the fuzzer injecting, between the client's messages, poison
/// messages, bad first frames, wrong resumes, drops, time and server
/// sends; then a quiet phase. Asserts (see `fuzz/README.md`): (a) the
/// stream never stalls, every client message ends delivered once or
/// refused once, acknowledged; (b) no acknowledgment covers a refused
/// message before its refusal reached the client; (c) every `hello` is
/// answered in the same step; (d) a resume answered `resumed:true` never
/// leads to a gap or a stall, and a consistent resume of a live session is
/// never refused.
pub fn server_stream(setup: StreamSetup, ops: Vec<StreamOp>) {
    let mut h = StreamHarness::new(setup);
    let resume = h.true_resume();
    let upgrade = h.setup.upgrade;
    h.connect(upgrade, false, resume);
    for op in ops {
        h.op(op);
    }
    h.quiet();
}
