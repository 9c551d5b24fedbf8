//! Body of the `server_machine` target: a [`Server`] with many connections
//! and sessions driven by arbitrary inputs and commands, every invariant
//! checked after every op.
//!
//! This file owns the server target's inputs ([`ServerSetup`],
//! [`ServerOp`], the frames its fake clients send) and [`ServerHarness`].
//! The harness never reaches into the machine: it calls the server's public
//! API as a driver would (and the crate-private `Server::resume_key`, for
//! the key a real client has from its welcome), and checks what the server
//! reports against a model it keeps from the outputs.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use arbitrary::Arbitrary;
use bytes::Bytes;
use core::time::Duration;

use crate::close::CloseCode;
use crate::config::{Acknowledge, QueueConfig, ServerConfig};
use crate::reliable::{OverflowPolicy, ReliabilityConfig, SendError};
use crate::server::{ConnectionId, Server, ServerEvent, ServerOutput, SessionImage};
use crate::time::Instant;
use crate::wire::{
    self, ClientId, Codec, Frame, Hello, Incoming, Msg, MsgKind, Resume, SessionId, StreamEntry,
    StreamPos, Transmit, PROTOCOL_VERSION,
};

use super::{codec_of, decode_own, header_frame, Code, Fate, FeedModel, Num, PayloadChoice};

/// Settings for the server machine target, kept small so limits are hit.
#[derive(Arbitrary, Clone, Debug)]
pub struct ServerSetup {
    /// Speak JSON only.
    pub json_only: bool,
    /// Most sessions, 1..=8.
    pub max_sessions: u8,
    /// Per-session queue bound (messages), 1..=32.
    pub queue_messages: u8,
    /// Per-session queue bound (bytes).
    pub queue_bytes: u16,
    /// Per-session window (messages), 1..=16.
    pub window_messages: u8,
    /// Per-session window (bytes).
    pub window_bytes: u16,
    /// End the session on overflow instead of refusing.
    pub fail_session: bool,
    /// Ack after this many deliveries, 1..=40.
    pub ack_every: u8,
    /// Grace period of a detached session, seconds.
    pub session_grace_secs: u8,
    /// No idle grace.
    pub zero_grace: bool,
    /// Undecodable frames tolerated before closing.
    pub max_decode_failures: u8,
    /// Serve room streams through feeds ([`FeedModel`] writes them).
    pub room_feeds: bool,
    /// Acknowledge only what the application handled
    /// ([`Acknowledge::AfterHandled`]).
    pub after_handled: bool,
}

impl ServerSetup {
    /// The configuration (always valid).
    pub fn config(&self) -> ServerConfig {
        let mut c = ServerConfig::default();
        if self.json_only {
            c.codecs = vec![Codec::Json];
        }
        c.max_sessions = 1 + usize::from(self.max_sessions % 8);
        c.queue = QueueConfig {
            max_messages: 1 + usize::from(self.queue_messages % 32),
            max_bytes: usize::from(self.queue_bytes),
        };
        c.reliability = ReliabilityConfig {
            window_messages: 1 + usize::from(self.window_messages % 16),
            window_bytes: usize::from(self.window_bytes),
            ack_every: 1 + u32::from(self.ack_every % 40),
            overflow: if self.fail_session {
                OverflowPolicy::FailSession
            } else {
                OverflowPolicy::Refuse
            },
            ..ReliabilityConfig::default()
        };
        c.session_grace = Duration::from_secs(u64::from(self.session_grace_secs));
        if self.after_handled {
            c.acknowledge = Acknowledge::AfterHandled;
        }
        if self.zero_grace {
            c.grace = Duration::ZERO;
        }
        c.max_decode_failures = u32::from(self.max_decode_failures % 8);
        c.max_message_size = 4096;
        c
    }
}

/// A frame the fuzzer's "client" sends on an open connection.
#[derive(Arbitrary, Clone, Debug)]
pub enum ClientFrame {
    /// A message; `seq` relative to what the server delivered.
    Msg {
        /// Sequence number.
        seq: Num,
        /// Piggybacked ack relative to what the server sent.
        ack: Option<Num>,
        /// Payload.
        payload: PayloadChoice,
    },
    /// An ack, relative to what the server sent.
    Ack(Num),
    /// A replay request, relative to what the server sent.
    Replay(Num),
    /// A ping.
    Ping(u64),
    /// A pong; 0 answers the last `ping` the server sent on the connection
    /// (a lag probe, or a ping the client asked for), as a client that has
    /// read up to it would.
    Pong(u64),
    /// A datagram.
    Raw(Vec<u8>),
    /// A goaway (nonsense from a client).
    GoAway(u16),
    /// A second hello.
    Hello,
    /// Where the client's room streams stand: (room, epoch, offset).
    Subs(Vec<(u8, u8, u16)>),
}

/// The rooms the room ops name.
const ROOMS: [&str; 2] = ["a", "b"];

/// One input or command for the server machine.
#[derive(Arbitrary, Clone, Debug)]
pub enum ServerOp {
    /// A new connection, with one of a few identities and a session id byte.
    Connect {
        /// Identity index (`None`: anonymous).
        identity: Option<u8>,
        /// Fresh session id byte (collisions on purpose).
        fresh: u8,
    },
    /// A hello on a connection.
    Hello {
        /// Connection index.
        conn: u8,
        /// Versions offered (`None`: the right ones).
        versions: Option<Vec<u8>>,
        /// Codecs: `true` is MessagePack (`None`: both).
        codecs: Option<Vec<bool>>,
        /// Resume a known session (by index) or an unknown one, with a
        /// delivered count relative to what the server sent.
        resume: Option<(u8, bool, Num)>,
        /// Announce `stream`.
        stream: bool,
    },
    /// A new connection whose upgrade request carries a hello
    /// (`handle_upgrade`); the fields are those of `Connect` and `Hello`.
    Upgrade {
        /// Identity index (`None`: anonymous).
        identity: Option<u8>,
        /// Fresh session id byte.
        fresh: u8,
        /// Versions offered (`None`: the right ones).
        versions: Option<Vec<u8>>,
        /// Codecs: `true` is MessagePack (`None`: both).
        codecs: Option<Vec<bool>>,
        /// Resume, as in `Hello`.
        resume: Option<(u8, bool, Num)>,
        /// Announce `stream`.
        stream: bool,
    },
    /// `join` a session (by index) to room `1 % 2`.
    Join(u8, u8),
    /// `leave`.
    Leave(u8, u8),
    /// `broadcast` to a room, excluding a session (by index) or none.
    Broadcast(u8, PayloadChoice, Option<u8>),
    /// A frame on a connection, in its codec unless `wrong_codec`.
    Frame(u8, ClientFrame, bool),
    /// Arbitrary text on a connection.
    Text(u8, String),
    /// Arbitrary bytes on a connection.
    Binary(u8, Vec<u8>),
    /// The transport closed.
    Closed(u8, Option<Code>),
    /// `send` to a session (by index, or a made-up one).
    Send(u8, PayloadChoice),
    /// `send_datagram` to a session.
    SendDatagram(u8, u16),
    /// `go_away` on a connection.
    GoAway(u8, Code, Option<u16>),
    /// `close_session`.
    CloseSession(u8),
    /// A session (by index) exported, carried through MessagePack and
    /// imported again: it must come back whole.
    Bounce(u8),
    /// The application handled a session's (by index) messages through a
    /// sequence number (`None`: everything it was given).
    Handled(u8, Option<u16>),
    /// `disconnect_connection`.
    Disconnect(u8, Code),
    /// `handle_timeout` at the next deadline.
    Timeout,
    /// Time passes, milliseconds.
    Advance(u16),
    /// Time passes, seconds.
    AdvanceSecs(u8),
    /// An earlier instant is handed in.
    Rewind(u16),
}

#[derive(Debug, Default)]
struct SessionModel {
    delivered: u64,
    sent_seq: u64,
    conn: Option<ConnectionId>,
    accepted: BTreeMap<u64, Fate>,
    /// It joined a room: the server queues messages of its own for it
    /// (presence, and room messages for a client without streams).
    in_rooms: bool,
    /// With `after_handled`: messages handed to the application and not
    /// yet handled (`ServerOp::Handled`). An exported image counts as
    /// delivered only what came before the first of them, so the client
    /// sends them again after a `Bounce`.
    unhandled: std::collections::BTreeSet<u64>,
}

#[derive(Debug)]
struct ConnModel {
    codec: Option<Codec>,
    session: Option<SessionId>,
    /// Per room: the last stream offset sent on this connection, from its
    /// `sub` on.
    rooms: BTreeMap<std::sync::Arc<str>, u64>,
    /// The nonce of the last `ping` the server sent on it (0: none).
    last_ping: u64,
}

/// Drives one [`Server`] and checks its promises after every op.
pub struct ServerHarness {
    server: Server,
    config: ServerConfig,
    now: Instant,
    max_now: Instant,
    conns: BTreeMap<ConnectionId, ConnModel>,
    all_conns: Vec<ConnectionId>,
    sessions: BTreeMap<SessionId, SessionModel>,
    ever_sessions: Vec<SessionId>,
    /// Writes the feed outputs (with feeds on).
    feeds: FeedModel,
    /// Every frame written, in order, with its connection.
    written: Vec<(ConnectionId, Transmit)>,
    log: String,
}

const IDENTITIES: &[&str] = &["alice", "bob", "carol"];

impl ServerHarness {
    /// A harness around a new server.
    pub fn new(config: ServerConfig) -> ServerHarness {
        let history = config.history;
        let server = match Server::new(config.clone()) {
            Ok(s) => s,
            Err(e) => panic!("server config rejected: {e}"),
        };
        ServerHarness {
            server,
            config,
            now: Instant::ZERO,
            max_now: Instant::ZERO,
            conns: BTreeMap::new(),
            all_conns: Vec::new(),
            sessions: BTreeMap::new(),
            ever_sessions: Vec::new(),
            feeds: FeedModel::new(history),
            written: Vec::new(),
            log: String::new(),
        }
    }

    fn conn(&self, i: u8) -> ConnectionId {
        if self.all_conns.is_empty() {
            return ConnectionId(0);
        }
        // Bias towards recent connections.
        let n = self.all_conns.len();
        self.all_conns[n - 1 - usize::from(i) % n]
    }

    fn session(&self, i: u8) -> SessionId {
        if self.ever_sessions.is_empty() {
            return SessionId([i; 16]);
        }
        let n = self.ever_sessions.len();
        self.ever_sessions[n - 1 - usize::from(i) % n]
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

    /// Starts modelling a connection the server just opened.
    fn track(&mut self, id: ConnectionId) {
        assert!(!self.all_conns.contains(&id), "connection id reused");
        self.all_conns.push(id);
        self.conns.insert(
            id,
            ConnModel {
                codec: None,
                session: None,
                rooms: BTreeMap::new(),
                last_ping: 0,
            },
        );
    }

    /// The hello a `Hello` or `Upgrade` op describes.
    fn hello(
        &self,
        versions: Option<Vec<u8>>,
        codecs: Option<Vec<bool>>,
        resume: Option<(u8, bool, Num)>,
        stream: bool,
    ) -> Frame {
        let resume = resume.map(|(i, known, d)| {
            let session = if known {
                self.session(i)
            } else {
                SessionId([i ^ 0x5a; 16])
            };
            let base = self.sessions.get(&session).map_or(0, |s| s.sent_seq);
            Resume {
                session,
                delivered: d.resolve(base),
                // The right key for a known session, as a real client has
                // it from the welcome; none for an unknown one.
                key: known.then(|| self.server.resume_key(session)),
                acked: None,
            }
        });
        Frame::Hello(Hello {
            versions: versions
                .map(|v| v.into_iter().take(wire::MAX_LIST_LEN).collect())
                .unwrap_or_else(|| vec![PROTOCOL_VERSION]),
            client: ClientId([0xc1; 16]),
            resume,
            caps: if stream {
                vec![wire::CAP_STREAM.into()]
            } else {
                Vec::new()
            },
            codecs: codecs
                .map(|v| {
                    v.into_iter()
                        .take(wire::MAX_LIST_LEN)
                        .map(codec_of)
                        .collect()
                })
                .unwrap_or_else(|| vec![Codec::MsgPack, Codec::Json]),
            join: Vec::new(),
        })
    }

    fn send_frame(&mut self, conn: ConnectionId, frame: &Frame, wrong: bool) {
        let codec = self
            .conns
            .get(&conn)
            .and_then(|c| c.codec)
            .unwrap_or(Codec::Json);
        let codec = match (codec, wrong) {
            (c, false) => c,
            (Codec::Json, true) => Codec::MsgPack,
            (_, true) => Codec::Json,
        };
        if let Ok(t) = wire::encode(frame, codec, PROTOCOL_VERSION) {
            self.server.handle_message(self.now, conn, t.as_incoming());
        }
    }

    /// Applies one op, drains every output and checks every invariant.
    pub fn op(&mut self, op: ServerOp) {
        let _ = writeln!(self.log, "{:?} {op:?}", self.now);
        let before = self.server.poll_timeout();
        let mut timeout = false;
        if !matches!(
            op,
            ServerOp::Advance(_) | ServerOp::AdvanceSecs(_) | ServerOp::Rewind(_)
        ) {
            self.hand_in();
        }
        let now = self.now;
        match op {
            ServerOp::Connect { identity, fresh } => {
                let identity =
                    identity.map(|i| IDENTITIES[usize::from(i) % IDENTITIES.len()].to_string());
                let id = self
                    .server
                    .handle_connection(now, identity, SessionId([fresh; 16]));
                self.track(id);
            }
            ServerOp::Hello {
                conn,
                versions,
                codecs,
                resume,
                stream,
            } => {
                let conn = self.conn(conn);
                let hello = self.hello(versions, codecs, resume, stream);
                self.send_frame(conn, &hello, false);
            }
            ServerOp::Upgrade {
                identity,
                fresh,
                versions,
                codecs,
                resume,
                stream,
            } => {
                let identity =
                    identity.map(|i| IDENTITIES[usize::from(i) % IDENTITIES.len()].to_string());
                let hello = self.hello(versions, codecs, resume, stream);
                let Ok(Transmit::Text(json)) = wire::encode(&hello, Codec::Json, PROTOCOL_VERSION)
                else {
                    panic!("a hello must encode as JSON text");
                };
                let text = String::from_utf8_lossy(&json).into_owned();
                let (id, answer) =
                    self.server
                        .handle_upgrade(now, identity, SessionId([fresh; 16]), &text);
                self.track(id);
                match answer {
                    Some(a) => match header_frame(&a) {
                        Ok(Frame::Welcome(w)) => {
                            if let Some(c) = self.conns.get_mut(&id) {
                                c.codec = Some(w.codec);
                            }
                        }
                        Ok(Frame::Reject(_)) => {}
                        other => panic!("an upgrade hello answered with {other:?}"),
                    },
                    // Refused at once (shutting down, a session id
                    // collision): the connection is already closed.
                    None => assert!(
                        !self.server.connections().any(|c| c == id),
                        "a well-formed upgrade hello left unanswered\n{}",
                        self.log
                    ),
                }
            }
            ServerOp::Frame(conn, f, wrong) => {
                let conn = self.conn(conn);
                let session = self.conns.get(&conn).and_then(|c| c.session);
                let (delivered, sent) = session
                    .and_then(|s| self.sessions.get(&s))
                    .map_or((0, 0), |s| (s.delivered, s.sent_seq));
                let last_ping = self.conns.get(&conn).map_or(0, |c| c.last_ping);
                let frame = match f {
                    ClientFrame::Msg { seq, ack, payload } => payload.payload().map(|payload| {
                        let seq = seq.resolve(delivered).max(1);
                        Frame::Msg(Msg {
                            kind: MsgKind::Plain,
                            room: None,
                            seq,
                            id: seq,
                            ack: ack.map(|a| a.resolve(sent)),
                            ts: None,
                            payload,
                        })
                    }),
                    ClientFrame::Ack(a) => Some(Frame::Ack {
                        ack: a.resolve(sent),
                    }),
                    ClientFrame::Replay(n) => Some(Frame::Replay {
                        from: n.resolve(sent).max(1),
                    }),
                    ClientFrame::Ping(n) => Some(Frame::Ping { nonce: n }),
                    ClientFrame::Pong(0) => Some(Frame::Pong { nonce: last_ping }),
                    ClientFrame::Pong(n) => Some(Frame::Pong { nonce: n }),
                    ClientFrame::Raw(b) => Some(Frame::Raw(Bytes::from(b))),
                    ClientFrame::GoAway(code) => Some(Frame::GoAway {
                        code,
                        retry_after_ms: None,
                    }),
                    ClientFrame::Hello => Some(Frame::Hello(Hello {
                        versions: vec![1],
                        client: ClientId([2; 16]),
                        resume: None,
                        caps: Vec::new(),
                        codecs: vec![Codec::Json],
                        join: Vec::new(),
                    })),
                    ClientFrame::Subs(list) => Some(Frame::Subs(
                        list.into_iter()
                            .map(|(r, e, o)| StreamPos {
                                room: ROOMS[usize::from(r % 2)].into(),
                                epoch: u64::from(e),
                                offset: u64::from(o),
                                missed_from: None,
                            })
                            .collect(),
                    )),
                };
                if let Some(frame) = frame {
                    self.send_frame(conn, &frame, wrong);
                }
            }
            ServerOp::Join(s, r) => {
                let session = self.session(s);
                let joined = self.server.join(now, session, ROOMS[usize::from(r % 2)]);
                if joined.is_ok() {
                    match self.sessions.get_mut(&session) {
                        Some(m) => m.in_rooms = true,
                        None => panic!("joined an unknown session"),
                    }
                }
            }
            ServerOp::Leave(s, r) => {
                let session = self.session(s);
                self.server.leave(now, session, ROOMS[usize::from(r % 2)]);
            }
            ServerOp::Broadcast(r, p, except) => {
                if let Some(payload) = p.payload() {
                    let except = except.map(|e| self.session(e));
                    let _ = self
                        .server
                        .broadcast(now, ROOMS[usize::from(r % 2)], payload, except);
                }
            }
            ServerOp::Text(conn, s) => {
                let conn = self.conn(conn);
                self.server.handle_message(now, conn, Incoming::Text(&s));
            }
            ServerOp::Binary(conn, b) => {
                let conn = self.conn(conn);
                self.server.handle_message(now, conn, Incoming::Binary(&b));
            }
            ServerOp::Closed(conn, code) => {
                let conn = self.conn(conn);
                self.server
                    .handle_connection_closed(now, conn, code.map(Code::code));
                self.feeds.closed(conn);
                self.conns.remove(&conn);
            }
            ServerOp::Send(s, p) => {
                let session = self.session(s);
                if let Some(payload) = p.payload() {
                    match self.server.send(now, session, payload) {
                        Ok(id) => {
                            let m = self.sessions.get_mut(&session);
                            let m = match m {
                                Some(m) => m,
                                None => panic!("send to an unknown session accepted"),
                            };
                            m.accepted.insert(id.0, Fate::Outstanding);
                        }
                        Err(SendError::UnknownSession) => {
                            assert!(!self.sessions.contains_key(&session));
                        }
                        Err(_) => {}
                    }
                }
            }
            ServerOp::SendDatagram(s, n) => {
                let session = self.session(s);
                let _ =
                    self.server
                        .send_datagram(now, session, Bytes::from(vec![1u8; usize::from(n)]));
            }
            ServerOp::GoAway(conn, code, retry) => {
                let conn = self.conn(conn);
                self.server.go_away(
                    now,
                    conn,
                    sendable(code.code()),
                    retry.map(|ms| Duration::from_millis(u64::from(ms))),
                );
            }
            ServerOp::CloseSession(s) => {
                let session = self.session(s);
                let r = self.server.close_session(now, session);
                assert_eq!(r.is_ok(), self.sessions.contains_key(&session));
            }
            ServerOp::Handled(s, through) => {
                let session = self.session(s);
                let through = through.map_or(u64::MAX, u64::from);
                let r = self.server.handled(now, session, through);
                assert_eq!(r.is_ok(), self.sessions.contains_key(&session));
                if let Some(m) = self.sessions.get_mut(&session) {
                    m.unhandled.retain(|seq| *seq > through);
                }
            }
            ServerOp::Bounce(s) => {
                let session = self.session(s);
                match self.server.export_session(now, session) {
                    Some(image) => {
                        let bytes = rmp_serde::to_vec_named(&image)
                            .unwrap_or_else(|e| panic!("an image does not serialize: {e}"));
                        let back: SessionImage = rmp_serde::from_slice(&bytes)
                            .unwrap_or_else(|e| panic!("an image does not read back: {e}"));
                        assert_eq!(back, image, "an image changed through MessagePack");
                        if let Err(e) = self.server.import_session(now, &back) {
                            panic!(
                                "a session exported here does not import here: {e}\n{}",
                                self.log
                            );
                        }
                        // What the application had not handled comes again.
                        if let Some(m) = self.sessions.get_mut(&session) {
                            if let Some(&first) = m.unhandled.first() {
                                m.delivered = first - 1;
                            }
                            m.unhandled.clear();
                        }
                    }
                    None => assert!(
                        !self.sessions.contains_key(&session),
                        "a live session was not exported\n{}",
                        self.log
                    ),
                }
            }
            ServerOp::Disconnect(conn, code) => {
                let conn = self.conn(conn);
                self.server
                    .disconnect_connection(now, conn, sendable(code.code()));
            }
            ServerOp::Timeout => {
                let at = before.map_or(now, |d| d.at.max(now));
                let at = at.min(self.max_now + Duration::from_secs(86_400 * 30));
                self.set_now(at);
                self.hand_in();
                self.server.handle_timeout(at);
                timeout = true;
            }
            ServerOp::Advance(ms) => self.set_now(now + Duration::from_millis(u64::from(ms))),
            ServerOp::AdvanceSecs(s) => self.set_now(now + Duration::from_secs(u64::from(s))),
            ServerOp::Rewind(ms) => self.now = now - Duration::from_millis(u64::from(ms)),
        }
        self.drain(timeout);
    }

    fn resolve(&mut self, session: SessionId, id: u64, fate: Fate, what: &str) {
        let f = self
            .sessions
            .get_mut(&session)
            .and_then(|s| s.accepted.get_mut(&id));
        match f {
            Some(f) if *f == Fate::Outstanding => *f = fate,
            other => panic!(
                "{what} names message {id} of {session:?}, which is {other:?}\n{}",
                self.log
            ),
        }
    }

    fn drain(&mut self, timeout: bool) {
        let mut expanded = Vec::new();
        while let Some(o) = self.server.poll_output() {
            let _ = writeln!(self.log, "  {o:?}");
            self.feeds.expand(o, &mut expanded, &self.log);
            for o in expanded.drain(..) {
                self.take(o);
            }
        }
        self.check(timeout);
    }

    /// Carries out one output, as a driver would.
    fn take(&mut self, o: ServerOutput) {
        {
            match o {
                ServerOutput::Transmit(c, t) => {
                    assert!(
                        self.conns.contains_key(&c),
                        "transmit on a closed or unknown connection {c:?}\n{}",
                        self.log
                    );
                    self.written.push((c, t.clone()));
                    let Some(frame) = decode_own(&t, "server") else {
                        return;
                    };
                    let conn = self.conns.get_mut(&c);
                    match (frame, conn) {
                        (Frame::Welcome(w), Some(conn)) => conn.codec = Some(w.codec),
                        (Frame::Ping { nonce }, Some(conn)) => {
                            conn.last_ping = nonce;
                            // A lag probe (nonces from 2^52, exact in any
                            // JSON reader) only while it can tell
                            // something: the session is in a room or has
                            // messages outstanding.
                            if nonce >= 1 << 52 {
                                assert!(nonce < 1 << 53, "a ping nonce beyond 2^53\n{}", self.log);
                                let s = conn.session.and_then(|s| self.sessions.get(&s));
                                let worth = s.is_some_and(|s| {
                                    s.in_rooms
                                        || s.accepted.values().any(|f| *f == Fate::Outstanding)
                                });
                                assert!(worth, "a lag probe with nothing to measure\n{}", self.log);
                            }
                        }
                        (Frame::Sub(pos), Some(conn)) => {
                            conn.rooms.insert(pos.room.clone(), pos.offset);
                        }
                        (Frame::Pub(StreamEntry { room, offset, .. }), Some(conn))
                        | (Frame::Skip { room, offset }, Some(conn)) => {
                            let last = conn.rooms.get_mut(&room);
                            let Some(last) = last else {
                                panic!("room {room} entry {offset} before its sub\n{}", self.log)
                            };
                            assert_eq!(
                                offset,
                                *last + 1,
                                "room {room}: offsets not contiguous on a connection\n{}",
                                self.log
                            );
                            *last = offset;
                        }
                        (Frame::Msg(m), Some(conn)) => {
                            let s = conn.session.and_then(|s| self.sessions.get_mut(&s));
                            if let Some(s) = s {
                                assert!(m.seq <= s.sent_seq + 1, "gap in what the server sends");
                                s.sent_seq = s.sent_seq.max(m.seq);
                            } else {
                                panic!("a message on a connection without a session");
                            }
                        }
                        _ => {}
                    }
                }
                ServerOutput::Disconnect(c, code, _) => {
                    assert!(
                        code.is_sendable(),
                        "the server closes with the unsendable code {code:?}\n{}",
                        self.log
                    );
                    assert!(
                        self.conns.remove(&c).is_some(),
                        "disconnect of a connection already gone {c:?}\n{}",
                        self.log
                    );
                }
                ServerOutput::Event(e) => self.event(e),
                ServerOutput::Feed(f) => panic!("a feed output the model kept: {f:?}"),
                ServerOutput::Cluster(c) => panic!("a cluster output with shared rooms off: {c:?}"),
                ServerOutput::Latest(_, v) => panic!("a latest value with slots off: {v:?}"),
                ServerOutput::Map(u) => panic!("a synced-map update with shared rooms off: {u:?}"),
            }
        }
    }

    /// The invariants that hold between operations.
    fn check(&mut self, timeout: bool) {
        assert_eq!(
            self.server.connection_count(),
            self.conns.len(),
            "connection count disagrees with the outputs\n{}",
            self.log
        );
        assert_eq!(
            self.server.session_count(),
            self.sessions.len(),
            "session count disagrees with the events\n{}",
            self.log
        );
        assert!(self.sessions.len() <= self.config.max_sessions);
        for (id, m) in &self.sessions {
            let info = match self.server.session(*id) {
                Some(i) => i,
                None => panic!("session {id:?} vanished without SessionEnded"),
            };
            assert!(info.queued <= self.config.queue.max_messages);
            assert!(info.in_flight <= self.config.reliability.window_messages);
            assert_eq!(info.delivered, m.delivered);
            let outstanding = m
                .accepted
                .values()
                .filter(|f| **f == Fate::Outstanding)
                .count();
            let held = info.queued + info.in_flight;
            assert!(
                outstanding == held || (m.in_rooms && outstanding <= held),
                "accepted and unresolved messages of {id:?} ({outstanding}) are not what the session holds ({held})\n{}",
                self.log
            );
            if let Some(c) = m.conn {
                assert_eq!(info.connection, Some(c));
                assert_eq!(self.server.session_of(c), Some(*id));
            }
        }
        if let Some(after) = self.server.poll_timeout() {
            if timeout {
                assert!(
                    after.at > self.max_now,
                    "after handle_timeout a deadline is still due: {after:?}"
                );
            }
        }
    }

    fn event(&mut self, e: ServerEvent) {
        match e {
            ServerEvent::SessionOpened {
                connection,
                session,
                resumed,
                ..
            } => {
                let c = match self.conns.get_mut(&connection) {
                    Some(c) => c,
                    None => panic!("SessionOpened on an unknown connection"),
                };
                c.session = Some(session);
                if resumed {
                    let s = match self.sessions.get_mut(&session) {
                        Some(s) => s,
                        None => panic!("resumed a session that does not exist\n{}", self.log),
                    };
                    s.conn = Some(connection);
                } else {
                    assert!(
                        !self.sessions.contains_key(&session),
                        "a new session reuses a live id"
                    );
                    self.sessions.insert(
                        session,
                        SessionModel {
                            conn: Some(connection),
                            ..SessionModel::default()
                        },
                    );
                    self.ever_sessions.push(session);
                }
                // A connection carrying another session was replaced.
                for (id, s) in &mut self.sessions {
                    if *id != session && s.conn == Some(connection) {
                        s.conn = None;
                    }
                }
            }
            ServerEvent::SessionDetached { session, .. } => {
                let s = match self.sessions.get_mut(&session) {
                    Some(s) => s,
                    None => panic!("SessionDetached of an unknown session"),
                };
                s.conn = None;
            }
            // Only a bounce moves a session, and it comes straight back:
            // the model keeps it, detached.
            ServerEvent::SessionMoved { session } => {
                let s = match self.sessions.get_mut(&session) {
                    Some(s) => s,
                    None => panic!("SessionMoved of an unknown session"),
                };
                s.conn = None;
            }
            ServerEvent::SessionArrived { session, .. } => assert!(
                self.sessions.contains_key(&session),
                "SessionArrived of a session never here"
            ),
            ServerEvent::SessionEnded {
                session,
                unconfirmed,
                ..
            } => {
                assert!(
                    self.sessions.contains_key(&session),
                    "SessionEnded of an unknown session\n{}",
                    self.log
                );
                for id in &unconfirmed {
                    self.resolve(session, id.0, Fate::Lost, "SessionEnded");
                }
                if let Some(s) = self.sessions.remove(&session) {
                    let left = s
                        .accepted
                        .iter()
                        .filter(|(_, f)| **f == Fate::Outstanding)
                        .count();
                    assert_eq!(left, 0, "a session ended with messages unreported");
                }
            }
            ServerEvent::Message { session, message } => {
                let s = match self.sessions.get_mut(&session) {
                    Some(s) => s,
                    None => panic!("a message for an unknown session"),
                };
                assert_eq!(
                    message.seq,
                    s.delivered + 1,
                    "delivered out of order or twice\n{}",
                    self.log
                );
                s.delivered = message.seq;
                if self.config.acknowledge == Acknowledge::AfterHandled {
                    s.unhandled.insert(message.seq);
                }
            }
            ServerEvent::Acked {
                session,
                first,
                last,
            } => {
                assert!(first <= last);
                self.resolve(session, first.0, Fate::Acked, "Acked.first");
                if first != last {
                    self.resolve(session, last.0, Fate::Acked, "Acked.last");
                }
                if let Some(s) = self.sessions.get_mut(&session) {
                    for (_, f) in s.accepted.range_mut(first.0..=last.0) {
                        if *f == Fate::Outstanding {
                            *f = Fate::Acked;
                        }
                    }
                }
            }
            ServerEvent::Datagram { session, .. } => {
                assert!(self.sessions.contains_key(&session));
            }
            ServerEvent::Rejected {
                connection, code, ..
            } => {
                assert!(self.conns.contains_key(&connection));
                assert!(code.is_sendable());
            }
            ServerEvent::ConnectionClosed { connection, .. } => {
                // Reported for connections that never carried a session;
                // the model drops it when the Disconnect or close comes.
                if let Some(c) = self.conns.get(&connection) {
                    assert!(c.session.is_none());
                }
            }
            _ => {}
        }
    }
}

/// The application is trusted to pass close codes it may send: the server
/// forwards the codes of `go_away` and `disconnect_connection` unchecked.
fn sendable(code: CloseCode) -> CloseCode {
    if code.is_sendable() {
        code
    } else {
        CloseCode::GOING_AWAY
    }
}

/// Target `server_machine`: a server with many connections and sessions
/// driven by arbitrary inputs and commands, with every invariant checked
/// after every op.
pub fn server_machine(setup: ServerSetup, ops: Vec<ServerOp>) {
    let mut h = ServerHarness::new(setup.config());
    if !setup.room_feeds {
        for op in ops {
            h.op(op);
        }
        return;
    }
    // With feeds: the same run without them, in step, must write the same
    // frames to the same connections in the same order.
    let mut fed = ServerHarness::new(setup.config());
    fed.server.set_room_feeds(true);
    for op in ops {
        h.op(op.clone());
        fed.op(op);
        let by_conn = |w: &mut Vec<(ConnectionId, Transmit)>| {
            let mut m: BTreeMap<ConnectionId, Vec<Transmit>> = BTreeMap::new();
            for (c, t) in w.drain(..) {
                m.entry(c).or_default().push(t);
            }
            m
        };
        let (plain, feeds) = (by_conn(&mut h.written), by_conn(&mut fed.written));
        assert!(
            plain == feeds,
            "feeds changed what a connection was sent\nwithout feeds:\n{}\nwith feeds:\n{}",
            h.log,
            fed.log
        );
    }
    if std::env::var("FEED_LOG").is_ok() {
        eprintln!("{}", fed.log);
    }
}
