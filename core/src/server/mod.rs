//! The server machine: every connection's handshake and heartbeat, and the
//! session registry behind them.
//!
//! Owns, per connection, the hello/welcome exchange (version and codec
//! selection, rejections), idle detection and close codes; and per session,
//! the sequencing state, the outbound buffer kept through a grace period
//! after the connection drops, the binding to the identity that created it,
//! and its expiry. Sessions belong to the registry, not to connections, so a
//! client that reconnects finds its session and nothing is lost. It never
//! does IO and never reads a clock; deadlines for many thousands of
//! connections sit in one heap, so finding the next one costs O(log n), not a
//! scan.
//!
//! One file per behaviour:
//!
//! - `mod.rs` (this file): [`Server`] and [`ConnectionId`]; the getters; the
//!   `handle_*` inputs, with decoding and the limit on undecodable frames
//!   (`handle_message`); the commands that are only entry points; `poll_*`;
//!   and the deadline heap: `arm`, and `on_timer`, which checks each due
//!   timer against its owner's current deadline and handles a missing
//!   hello, an expired credential, rotation and a session's expiry there,
//!   the other timers in the files that own them. It re-exports every
//!   public item of the other files, so each is
//!   `kitestring_core::server::Item` wherever it lives.
//! - `event.rs`: what the application sees: [`ServerOutput`],
//!   [`ServerEvent`] and what it carries, [`SessionInfo`], [`ServerMetrics`],
//!   [`ServerStats`], [`ServerTimer`] and [`ServerDeadline`].
//! - `handshake.rs`: `hello` to `welcome` or `reject`: version and codec
//!   selection, the resume checks (key, identity, numbers), the session
//!   limit, the resume key, the answer in the upgrade response.
//! - `handover.rs`: [`SessionImage`]: a session exported from one server
//!   and imported into another, and the checks an imported image passes.
//! - `session.rs`: [`SessionState`] and its table; the one function that
//!   attaches and detaches a session (it arms the grace period); the one
//!   path that closes a connection; how a session ends, slow consumers
//!   included.
//! - `conn.rs`: the server's record of one connection and its phase; the
//!   idle (heartbeat) check; re-authentication.
//! - `lag.rs`: the lag bound: per connection, at most one lag probe (a
//!   `ping` whose `pong` says the client has read up to it), the measured
//!   lag, and the slow consumer a client that keeps sending but stays
//!   behind for `max_lag` becomes.
//! - `admission.rs`: the per-connection rate limit, its reports
//!   ([`RATE_REPORT_INTERVAL`]) and the reading pause; refusing a client
//!   message by its id.
//! - `rooms.rs`: joins, leaves, broadcasts, membership and presence, the
//!   room policy, and the room messages clients send.
//! - `streams.rs`: room streams: which members get an entry, a `skip` or
//!   nothing, the `sub` that starts a member's stream, and the recovery of
//!   a resumed member from the room's history;
//! - `latest.rs`: latest values: each room's newest value per key, the
//!   `lv` frames that carry them and the snapshot a member's connection
//!   gets when it opens or joins.
//! - `maps.rs`: synced maps: each room's last-writer-wins maps, the
//!   application's and the members' writes to them, and the `ms`/`mv`
//!   frames that keep every member's copy in step.
//! - `cluster.rs`: rooms shared by the servers of a cluster: the
//!   [`ClusterOutput`]s a client's room operations become, and the entry
//!   points the driver calls with what the cluster numbered and decided.
//! - `delivery.rs`: the glue to each session's delivery pipe (`Link`, in
//!   link.rs): queuing messages, the frames of an open session (messages,
//!   acknowledgments, replays, pings and pongs, datagrams), the
//!   acknowledgment timeout.
//! - `tests.rs`: the unit tests. The size test (`size`) stays in this file.

mod admission;
mod cluster;
mod conn;
mod delivery;
mod event;
mod handover;
mod handshake;
mod lag;
mod latest;
mod maps;
mod rooms;
mod session;
mod streams;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use bytes::Bytes;
use core::time::Duration;

use crate::close::CloseCode;
use crate::config::{ConfigError, ServerConfig};
use crate::link::LinkTimer;
pub use crate::link::Received;
use crate::ratelimit::RateLimiter;
use crate::reliable::{MessageId, Outgoing, RoomName, SendError};
use crate::rooms::{AllowAll, RoomPolicy, Rooms};
use crate::stream::RoomStream;
use crate::time::Instant;
use crate::wire::{self, Codec, DecodeError, Frame, Incoming, MsgKind, Payload, SessionId};

// The public items of the other files, each at `kitestring_core::server::Item`.
pub use crate::stream::RoomEntry;
pub use admission::RATE_REPORT_INTERVAL;
pub use cluster::{ClientOp, ClusterOutput, EntryOutcome, JoinedAt, SharedEntry};
pub use conn::{ConnDecoder, Decoded};
pub use event::{
    FeedOutput, MapUpdate, RoomError, RoomOp, ServerDeadline, ServerEvent, ServerMetrics,
    ServerOutput, ServerStats, ServerTimer, SessionEnd, SessionInfo,
};
pub use handover::{ImportError, SessionImage, SessionRecord};
pub use handshake::UpgradeRefusal;
pub use latest::LatestOut;
pub use maps::{MapError, MapOptions, MapWriters, Stamping};
pub use session::SessionState;

use conn::{ConnPhase, ConnRecord};
use session::Session;

/// Deterministic hashing: iteration order must not depend on the process.
/// FxHash, because keys are either sequential (connections) or 128 random
/// bits the server chose (sessions): nothing a peer can aim collisions at.
type Map<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;

/// Identifies one accepted transport on the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

/// The server machine.
///
/// Like the client: getters, `handle_*` inputs, commands ([`send`](Self::send),
/// [`go_away`](Self::go_away), [`close_session`](Self::close_session)), and
/// `poll_*` outputs. After any input or command, drain
/// [`poll_output`](Self::poll_output) until `None`, then read
/// [`poll_timeout`](Self::poll_timeout). Time only moves forward.
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    /// The `welcome`'s features without and with `deflate`.
    features: [std::sync::Arc<[crate::wire::CapName]>; 2],
    now: Instant,
    // Boxed: a hash table's spare capacity is then a pointer per slot,
    // not a whole record (a table grown to twice its entries would hold
    // as much again of 152- and 312-byte records).
    conns: Map<ConnectionId, Box<ConnRecord>>,
    sessions: Map<SessionId, Box<Session>>,
    timers: BinaryHeap<Reverse<(Instant, ServerTimer)>>,
    outputs: VecDeque<ServerOutput>,
    /// Encodes every frame: a scratch buffer and a pool of large buffers.
    encoder: wire::Encoder,
    next_conn: u64,
    next_id: u64,
    stats: ServerStats,
    rooms: Rooms,
    policy: Box<dyn RoomPolicy>,
    /// Sessions whose buffers overflowed during a broadcast or presence
    /// update, to be ended once the current operation is done.
    evictions: Vec<SessionId>,
    shutting_down: bool,
    /// While [`Server::handle_upgrade`] runs: the connection whose handshake
    /// answer goes in the upgrade response, and that answer once made.
    upgrade: Option<(ConnectionId, Option<String>)>,
    /// Each room's stream, while the room has members.
    streams: Map<RoomName, RoomStream>,
    /// Streams made so far (for their epochs).
    streams_made: u64,
    /// Stream members are served through [`FeedOutput`]s, not frames of
    /// their own ([`Server::set_room_feeds`]).
    room_feeds: bool,
    /// Rooms are shared with a cluster ([`Server::set_shared_rooms`]).
    shared_rooms: bool,
    /// Each room's latest values, while the room has members.
    latest: Map<RoomName, latest::LatestRoom>,
    /// Latest values go to the driver as [`ServerOutput::Latest`]
    /// ([`Server::set_latest_slots`]).
    latest_slots: bool,
    /// Each room's synced maps, open until the application closes them.
    maps: Map<RoomName, std::collections::BTreeMap<std::sync::Arc<str>, maps::SyncedMap>>,
    /// The clock that stamps synced-map writes, made on first use.
    hlc: Option<crate::hlc::Hlc>,
    /// The wall-clock time at an instant ([`Server::set_wall_clock`]).
    wall: Option<(Instant, u64)>,
}

impl Server {
    /// A server with no connections.
    pub fn new(config: ServerConfig) -> Result<Server, ConfigError> {
        config.validate()?;
        let features = [false, true].map(|deflate| Server::welcome_features(&config, deflate));
        Ok(Server {
            features,
            config,
            now: Instant::ZERO,
            conns: Map::default(),
            sessions: Map::default(),
            timers: BinaryHeap::new(),
            outputs: VecDeque::new(),
            encoder: wire::Encoder::for_server(),
            next_conn: 1,
            next_id: 1,
            stats: ServerStats::default(),
            rooms: Rooms::default(),
            policy: Box::new(AllowAll),
            evictions: Vec::new(),
            shutting_down: false,
            upgrade: None,
            streams: Map::default(),
            streams_made: 0,
            room_feeds: false,
            shared_rooms: false,
            latest: Map::default(),
            latest_slots: false,
            maps: Map::default(),
            hlc: None,
            wall: None,
        })
    }

    /// Serves the members of room streams through shared feeds: a
    /// broadcast becomes one [`FeedOutput::Publish`] instead of a
    /// [`ServerOutput::Transmit`] per member, and the driver writes the
    /// entry to the room's followers ([`FeedOutput`] says how). For
    /// drivers that hand connections their frames from other threads,
    /// where one write per member to each connection's queue costs more
    /// than the members reading one shared feed. Off by default; set it
    /// before the first connection.
    pub fn set_room_feeds(&mut self, on: bool) {
        self.room_feeds = on;
    }

    // ---- getters ----------------------------------------------------------

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Sessions held (attached or in their grace period).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// A session's state, if it exists.
    pub fn session(&self, id: SessionId) -> Option<SessionInfo> {
        self.sessions.get(&id).map(|s| SessionInfo {
            lag: s
                .state
                .connection()
                .and_then(|c| self.conns.get(&c)?.lag.as_deref()?.lag(self.now)),
            id,
            client: s.client,
            identity: s.identity.clone(),
            state: s.state,
            connection: s.state.connection(),
            expires_at: match s.state {
                SessionState::Detached { expires_at, .. } => Some(expires_at),
                SessionState::Attached(_) => None,
            },
            in_flight: s.link.outbound.in_flight(),
            queued: s.link.outbound.waiting_len(),
            delivered: s.link.inbound.delivered(),
        })
    }

    /// Whether a message sent to `session` now would go into its send window
    /// at once (nothing queued ahead of it, the window below its limits);
    /// `None` for an unknown session. A sender that waits for this paces
    /// itself to what the client acknowledges.
    pub fn has_room(&self, session: SessionId) -> Option<bool> {
        self.sessions
            .get(&session)
            .map(|s| s.link.outbound.has_room())
    }

    /// The codec negotiated on a session's current connection (`None` while
    /// it is detached or unknown). Encode typed payloads for that session
    /// with it.
    pub fn session_codec(&self, session: SessionId) -> Option<Codec> {
        let conn = self.sessions.get(&session)?.state.connection()?;
        match self.conns.get(&conn)?.phase {
            ConnPhase::Open { codec, .. } => Some(codec),
            ConnPhase::AwaitingHello => None,
        }
    }

    /// The codec of the session's current connection, or of its last one
    /// while it is detached (`None` for a session this server has not seen
    /// connected, and for none at all): the codec to encode typed payloads
    /// for it with.
    pub fn last_codec(&self, session: SessionId) -> Option<Codec> {
        self.sessions.get(&session)?.codec
    }

    /// The connection a session is attached to, if any.
    pub fn connection_of(&self, session: SessionId) -> Option<ConnectionId> {
        self.sessions.get(&session)?.state.connection()
    }

    /// The session a connection carries, once its handshake is done.
    pub fn session_of(&self, connection: ConnectionId) -> Option<SessionId> {
        match self.conns.get(&connection)?.phase {
            ConnPhase::Open { session, .. } => Some(session),
            ConnPhase::AwaitingHello => None,
        }
    }

    // ---- inputs -----------------------------------------------------------

    /// A WebSocket connection was accepted (after the HTTP upgrade and its
    /// authentication). `identity` is who the upgrade authenticated, if
    /// anyone; `fresh_session` is 16 bytes from a cryptographic source, used
    /// if this connection starts a new session.
    pub fn handle_connection(
        &mut self,
        now: Instant,
        identity: Option<String>,
        fresh_session: SessionId,
    ) -> ConnectionId {
        self.advance(now);
        let id = ConnectionId(self.next_conn);
        self.next_conn += 1;
        let deadline = self.now + self.config.hello_timeout;
        self.conns.insert(
            id,
            Box::new(ConnRecord {
                phase: ConnPhase::AwaitingHello,
                identity,
                fresh_session,
                last_rx: self.now,
                in_grace: false,
                decode_failures: 0,
                decoder: Some(wire::Decoder::new()),
                hello_deadline: Some(deadline),
                reauth_deadline: None,
                limiter: self
                    .config
                    .rate_limit
                    .and_then(|cfg| RateLimiter::new(cfg, self.now).ok())
                    .map(Box::new),
                limited: None,
                lag: None,
            }),
        );
        self.stats.connections_opened += 1;
        self.timers
            .push(Reverse((deadline, ServerTimer::Hello(id))));
        if self.shutting_down {
            self.disconnect(id, CloseCode::GOING_AWAY, "shutting down");
        }
        id
    }

    /// A WebSocket upgrade request is being accepted, and it carries the
    /// client's `hello` in its [`wire::HELLO_HEADER`] header (PROTOCOL.md,
    /// section 4): [`handle_connection`](Self::handle_connection) and that
    /// `hello` in one step, before the `101` response goes out.
    ///
    /// Returns the connection and, when the `hello` was handled, the answer
    /// (`welcome` or `reject`, printable ASCII) to put in the response's
    /// [`wire::WELCOME_HEADER`] header instead of sending it as a frame.
    /// Whatever else the `hello` caused (a resumed session's retransmissions,
    /// the close after a `reject`) comes from [`poll_output`](Self::poll_output)
    /// as usual, to follow the `101`.
    ///
    /// `None`: the `hello` could not be used (it did not decode, or the
    /// connection was refused at once). Answer without the header; the
    /// client then sends its `hello` as the first frame.
    pub fn handle_upgrade(
        &mut self,
        now: Instant,
        identity: Option<String>,
        fresh_session: SessionId,
        hello: &str,
    ) -> (ConnectionId, Option<String>) {
        let connection = self.handle_connection(now, identity, fresh_session);
        self.upgrade = Some((connection, None));
        self.handle_message(now, connection, Incoming::Text(hello));
        let answer = self.upgrade.take().and_then(|(_, answer)| answer);
        (connection, answer)
    }

    /// A connection whose request URL carried its `hello` (the query
    /// parameter [`wire::HELLO_PARAM`], from a client that can neither set
    /// request headers nor read the response's: PROTOCOL.md, section 4.2).
    /// The `hello` is handled as the connection's first frame, and so is
    /// its answer: the `welcome` or `reject` is the connection's first
    /// output, sent after the `101` like any frame. A `hello` that does not
    /// decode is answered with `reject` `bad_hello` at once.
    pub fn handle_request_hello(
        &mut self,
        now: Instant,
        identity: Option<String>,
        fresh_session: SessionId,
        hello: &str,
    ) -> ConnectionId {
        let connection = self.handle_connection(now, identity, fresh_session);
        self.handle_message(now, connection, Incoming::Text(hello));
        connection
    }

    /// A connection the driver accepts only to refuse it in-band, for
    /// clients that cannot read an HTTP status (PROTOCOL.md, section 1): a
    /// `reject` with `code` (4401, 4403 or 4429), `reason`, `message` and
    /// `retry_after_ms`, then the close with `code`. With `in_upgrade`, the
    /// `reject` is returned for the `101`'s [`wire::WELCOME_HEADER`] (the
    /// request carried its `hello` there) instead of queued as the first
    /// frame. No session is opened or looked at.
    pub fn handle_refused_upgrade(
        &mut self,
        now: Instant,
        refusal: UpgradeRefusal,
        in_upgrade: bool,
    ) -> (ConnectionId, Option<String>) {
        let connection = self.handle_connection(now, None, SessionId([0; 16]));
        if in_upgrade {
            self.upgrade = Some((connection, None));
        }
        self.refuse_upgrade(connection, refusal);
        let answer = self.upgrade.take().and_then(|(_, answer)| answer);
        (connection, answer)
    }

    /// Refuses in-band a connection still waiting for its `hello` (one
    /// sent as its first frame, which a driver may need to look at before
    /// it runs: a resume whose session must first be claimed from another
    /// server): the `reject` and close of
    /// [`handle_refused_upgrade`](Self::handle_refused_upgrade). Does
    /// nothing to a connection past its handshake, or unknown.
    pub fn refuse_hello(
        &mut self,
        now: Instant,
        connection: ConnectionId,
        refusal: UpgradeRefusal,
    ) {
        self.advance(now);
        let waiting = self
            .conns
            .get(&connection)
            .is_some_and(|c| matches!(c.phase, ConnPhase::AwaitingHello));
        if waiting {
            self.refuse_upgrade(connection, refusal);
        }
    }

    /// A WebSocket message arrived on `connection`.
    ///
    /// Decoded here with the connection's decoder, unless a driver took it
    /// ([`take_decoder`](Self::take_decoder)): a message passed here after
    /// that is decoded without the taken decoder's state (a detached
    /// payload it waits for, compression); decode it with the
    /// [`ConnDecoder`] and pass the result to
    /// [`handle_decoded`](Self::handle_decoded) instead.
    pub fn handle_message(&mut self, now: Instant, connection: ConnectionId, msg: Incoming<'_>) {
        let max_message = self.config.max_message_size;
        let Some(conn) = self.conns.get_mut(&connection) else {
            self.advance(now);
            return;
        };
        let limits = conn.limits(max_message);
        let len = msg.len();
        let result = match conn.decoder.as_mut() {
            Some(decoder) => decoder.decode(msg, &limits),
            None => wire::Decoder::new().decode(msg, &limits),
        };
        self.on_decoded(now, connection, len, result);
    }

    /// Hands an open connection's decoder to the caller, which from then on
    /// decodes the connection's messages itself ([`ConnDecoder::decode`])
    /// and passes each result to [`handle_decoded`](Self::handle_decoded),
    /// in order. A driver that guards the server with a lock decodes that
    /// way before taking it. `None` before the connection's `hello` was
    /// answered (its decoding depends on what the `hello` agrees), once it
    /// is gone, or once its decoder was taken.
    pub fn take_decoder(&mut self, connection: ConnectionId) -> Option<ConnDecoder> {
        let max_message = self.config.max_message_size;
        let conn = self.conns.get_mut(&connection)?;
        if !matches!(conn.phase, ConnPhase::Open { .. }) {
            return None;
        }
        let limits = conn.limits(max_message);
        conn.decoder
            .take()
            .map(|decoder| ConnDecoder { decoder, limits })
    }

    /// A message of `connection` arrived and was decoded by the
    /// [`ConnDecoder`] taken for it: exactly what
    /// [`handle_message`](Self::handle_message) does with a message after
    /// decoding it.
    pub fn handle_decoded(&mut self, now: Instant, connection: ConnectionId, message: Decoded) {
        self.on_decoded(now, connection, message.len, message.result);
    }

    /// A message of `len` bytes arrived on `connection` and decoded to
    /// `result`.
    fn on_decoded(
        &mut self,
        now: Instant,
        connection: ConnectionId,
        len: usize,
        result: Result<Option<Frame>, DecodeError>,
    ) {
        self.advance(now);
        let Some(conn) = self.conns.get_mut(&connection) else {
            return;
        };
        self.stats.traffic.frames_in += 1;
        self.stats.traffic.bytes_in += len as u64;
        let gap = self.now.saturating_duration_since(conn.last_rx);
        conn.last_rx = self.now;
        conn.in_grace = false;
        // Whether an overdue lag probe makes this client a slow consumer
        // (unless the frame is the probe's `pong`).
        let behind = conn.lag.as_deref_mut().is_some_and(|lag| {
            lag.heard(self.now, gap, &self.config, &mut self.timers, connection)
        });
        match result {
            Ok(Some(frame)) => {
                conn.decode_failures = 0;
                self.on_frame(connection, frame);
                if behind {
                    self.lag_heard(connection);
                }
                self.process_evictions();
            }
            // A message whose payload is the next message.
            Ok(None) => {}
            Err(error) => {
                conn.decode_failures += 1;
                let failures = conn.decode_failures;
                let awaiting_hello = matches!(conn.phase, ConnPhase::AwaitingHello);
                self.stats.traffic.decode_failures += 1;
                let too_large = matches!(error, DecodeError::TooLarge { .. });
                let in_upgrade = matches!(self.upgrade, Some((c, _)) if c == connection);
                if awaiting_hello && !too_large && !in_upgrade {
                    // A first frame that is not a usable hello: say why at
                    // once instead of waiting out the hello timeout. (A hello
                    // in the upgrade header that does not decode is only
                    // unused: the client then sends it as a frame.)
                    let message = format!("the first frame must be a valid hello: {error}");
                    self.emit(ServerEvent::DecodeFailed { connection, error });
                    self.reject_hello(connection, message);
                    return;
                }
                let compression = matches!(error, DecodeError::Compression { .. });
                self.emit(ServerEvent::DecodeFailed { connection, error });
                if too_large {
                    self.disconnect(connection, CloseCode::MESSAGE_TOO_BIG, "message too big");
                } else if compression {
                    let why = "a compressed payload that cannot be inflated";
                    self.disconnect(connection, CloseCode::PROTOCOL_ERROR, why);
                } else if failures > self.config.max_decode_failures {
                    self.disconnect(
                        connection,
                        CloseCode::INVALID_PAYLOAD,
                        "too many undecodable frames",
                    );
                }
            }
        }
    }

    /// The transport closed (`None`: without a close frame, reported as 1006).
    pub fn handle_connection_closed(
        &mut self,
        now: Instant,
        connection: ConnectionId,
        code: Option<CloseCode>,
    ) {
        self.advance(now);
        if !self.conns.contains_key(&connection) {
            return;
        }
        // A browser page closes with 41xx where it cannot send 10xx.
        let code = code.map_or(CloseCode::ABNORMAL, CloseCode::canonical);
        self.close_conn(connection, code, None);
        self.process_evictions();
    }

    /// Time passed. Call at (or after) the instant from `poll_timeout`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        while let Some(Reverse((at, timer))) = self.timers.peek().copied() {
            if at > self.now {
                break;
            }
            self.timers.pop();
            self.on_timer(at, timer);
        }
        self.process_evictions();
    }

    // ---- commands ---------------------------------------------------------

    /// Queues a message to a session's client for reliable, ordered,
    /// exactly-once delivery, wherever its connection is. A detached session
    /// buffers it (bounded) for the resume.
    pub fn send(
        &mut self,
        now: Instant,
        session: SessionId,
        payload: Payload,
    ) -> Result<MessageId, SendError> {
        self.send_inner(now, session, payload, None)
    }

    /// Like [`send`](Self::send), carrying a sender timestamp in milliseconds.
    pub fn send_with_timestamp(
        &mut self,
        now: Instant,
        session: SessionId,
        payload: Payload,
        timestamp_ms: u64,
    ) -> Result<MessageId, SendError> {
        self.send_inner(now, session, payload, Some(timestamp_ms))
    }

    /// Answers a request a session's client sent (a [`Received`] with
    /// `request: true`), reliably, wherever the session's connection is.
    pub fn respond(
        &mut self,
        now: Instant,
        session: SessionId,
        request: MessageId,
        payload: Payload,
    ) -> Result<MessageId, SendError> {
        self.enqueue(
            now,
            session,
            Outgoing::new(MsgKind::Response(request.0), payload),
        )
    }

    /// Sends an unsequenced datagram to a session's client, if connected.
    pub fn send_datagram(
        &mut self,
        now: Instant,
        session: SessionId,
        data: Bytes,
    ) -> Result<(), SendError> {
        self.advance(now);
        let s = self
            .sessions
            .get(&session)
            .ok_or(SendError::UnknownSession)?;
        let conn = s.state.connection().ok_or(SendError::NotOpen)?;
        let max = self
            .config
            .max_message_size
            .saturating_sub(wire::BINARY_HEADER_LEN);
        SendError::check_size(data.len(), max)?;
        self.transmit(conn, &Frame::Raw(data));
        Ok(())
    }

    /// Asks a connection's client to reconnect (and resume): for rotation use
    /// [`CloseCode::ROTATE`], for shutdown [`CloseCode::GOING_AWAY`], for
    /// overload [`CloseCode::TRY_AGAIN_LATER`]. Sends a `goaway`, then closes.
    pub fn go_away(
        &mut self,
        now: Instant,
        connection: ConnectionId,
        code: CloseCode,
        retry_after: Option<Duration>,
    ) {
        self.advance(now);
        if !self.conns.contains_key(&connection) {
            return;
        }
        let retry_after_ms = retry_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        if matches!(
            self.conns.get(&connection).map(|c| &c.phase),
            Some(ConnPhase::Open { .. })
        ) {
            self.transmit(
                connection,
                &Frame::GoAway {
                    code: code.0,
                    retry_after_ms,
                },
            );
        }
        self.disconnect(connection, code, "go away");
    }

    /// The application handled `session`'s messages up to sequence number
    /// `through` ([`Received::seq`]). With [`Acknowledge::AfterHandled`],
    /// only this lets them be acknowledged to the client; otherwise it
    /// does nothing. Cumulative: handling message 7 handles 1 to 7.
    ///
    /// [`Acknowledge::AfterHandled`]: crate::config::Acknowledge::AfterHandled
    pub fn handled(
        &mut self,
        now: Instant,
        session: SessionId,
        through: u64,
    ) -> Result<(), SendError> {
        self.advance(now);
        let s = self
            .sessions
            .get_mut(&session)
            .ok_or(SendError::UnknownSession)?;
        let mut timers = delivery::SessionTimers {
            session,
            deadlines: &mut s.deadlines,
            heap: &mut self.timers,
        };
        let rel = &self.config.reliability;
        if s.link.handled(self.now, through, rel, &mut timers) {
            self.flush_ack(session);
        }
        Ok(())
    }

    /// Ends a session now: closes its connection with 1000 and forgets it.
    pub fn close_session(&mut self, now: Instant, session: SessionId) -> Result<(), SendError> {
        self.advance(now);
        let state = self
            .sessions
            .get(&session)
            .ok_or(SendError::UnknownSession)?
            .state;
        if state.connection().is_some() {
            self.flush_ack(session);
        }
        let close = (CloseCode::NORMAL, "session closed");
        self.end_session(session, SessionEnd::ServerClosed, Some(close));
        Ok(())
    }

    /// Closes a connection with `code`; its session, if any, is kept for the
    /// grace period.
    pub fn disconnect_connection(
        &mut self,
        now: Instant,
        connection: ConnectionId,
        code: CloseCode,
    ) {
        self.advance(now);
        self.disconnect(connection, code, "closed by server");
    }

    /// Every connection, for shutdown and rotation sweeps.
    pub fn connections(&self) -> impl Iterator<Item = ConnectionId> + '_ {
        self.conns.keys().copied()
    }

    // ---- lifecycle ----------------------------------------------------------

    /// Starts a graceful shutdown: new connections are refused with 1001,
    /// and every connection gets a `goaway` and a close with 1001 (so
    /// clients reconnect with backoff, to another instance or to this one
    /// restarted). Sessions stay in the registry: a server that keeps its
    /// registry across the restart lets every client resume.
    pub fn shutdown(&mut self, now: Instant, retry_after: Option<Duration>) {
        self.advance(now);
        self.shutting_down = true;
        let sessions: Vec<SessionId> = self.sessions.keys().copied().collect();
        for s in sessions {
            self.send_batch(s);
            self.flush_ack(s);
        }
        let conns: Vec<ConnectionId> = self.conns.keys().copied().collect();
        for c in conns {
            self.go_away(now, c, CloseCode::GOING_AWAY, retry_after);
        }
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// A snapshot of counters and gauges.
    pub fn metrics(&self) -> ServerMetrics {
        let mut in_flight = 0;
        let mut queued = 0;
        let mut detached = 0;
        for s in self.sessions.values() {
            in_flight += s.link.outbound.in_flight();
            queued += s.link.outbound.waiting_len();
            detached += usize::from(s.state.connection().is_none());
        }
        let (history_entries, history_bytes) = self
            .streams
            .values()
            .map(RoomStream::held)
            .fold((0, 0), |(e, b), (de, db)| (e + de, b + db));
        ServerMetrics {
            connections: self.conns.len(),
            sessions: self.sessions.len(),
            detached_sessions: detached,
            rooms: self.rooms.count(),
            memberships: self.rooms.memberships(),
            messages_in_flight: in_flight,
            messages_queued: queued,
            history_entries,
            history_bytes,
            counters: self.stats.clone(),
        }
    }

    // ---- outputs ----------------------------------------------------------

    /// The next thing the driver must do, in order.
    pub fn poll_output(&mut self) -> Option<ServerOutput> {
        self.outputs.pop_front()
    }

    /// When `handle_timeout` must be called next. May be earlier than needed
    /// (a deadline that moved later is re-checked then), never later.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<ServerDeadline> {
        self.timers
            .peek()
            .map(|Reverse((at, timer))| ServerDeadline {
                at: *at,
                timer: *timer,
            })
    }

    // ---- internals --------------------------------------------------------

    pub(super) fn advance(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
    }

    pub(super) fn emit(&mut self, event: ServerEvent) {
        self.outputs.push_back(ServerOutput::Event(event));
    }

    pub(super) fn arm(&mut self, at: Instant, timer: ServerTimer) {
        self.timers.push(Reverse((at, timer)));
    }

    fn on_timer(&mut self, at: Instant, timer: ServerTimer) {
        match timer {
            ServerTimer::Hello(c) => {
                if let Some(conn) = self.conns.get(&c) {
                    if matches!(conn.phase, ConnPhase::AwaitingHello)
                        && conn.hello_deadline == Some(at)
                    {
                        self.disconnect(c, CloseCode::BAD_HANDSHAKE, "no hello in time");
                    }
                }
            }
            ServerTimer::Idle(c) => self.check_idle(c),
            ServerTimer::Ping(c) => self.ping(c),
            ServerTimer::Lag(c) => self.on_lag_timer(c, at),
            ServerTimer::Rotate(c) => {
                if self.conns.contains_key(&c) {
                    self.stats.rotations += 1;
                    let now = self.now;
                    self.go_away(now, c, CloseCode::ROTATE, None);
                }
            }
            ServerTimer::Batch(s) => {
                if self
                    .sessions
                    .get(&s)
                    .and_then(|s| s.deadlines.get(LinkTimer::Batch))
                    == Some(at)
                {
                    self.send_batch(s);
                }
            }
            ServerTimer::Reauth(c) => {
                if self
                    .conns
                    .get(&c)
                    .is_some_and(|conn| conn.reauth_deadline == Some(at))
                {
                    self.disconnect(c, CloseCode::UNAUTHORIZED, "credential expired");
                }
            }
            ServerTimer::AckDelay(s) => {
                if self
                    .sessions
                    .get(&s)
                    .and_then(|s| s.deadlines.get(LinkTimer::AckDelay))
                    == Some(at)
                {
                    self.flush_ack(s);
                }
            }
            ServerTimer::AckTimeout(s) => self.check_ack_timeout(s, at),
            ServerTimer::RateReport(c) => self.report_rate(c),
            ServerTimer::Expiry(s) => {
                let expired = self.sessions.get(&s).is_some_and(|sess| {
                    matches!(sess.state, SessionState::Detached { expires_at, .. } if expires_at <= self.now)
                });
                if expired {
                    self.end_session(s, SessionEnd::Expired, None);
                }
            }
        }
    }

    fn on_frame(&mut self, connection: ConnectionId, frame: Frame) {
        let Some(conn) = self.conns.get(&connection) else {
            return;
        };
        match (&conn.phase, frame) {
            (ConnPhase::AwaitingHello, Frame::Hello(h)) => self.on_hello(connection, h),
            (ConnPhase::AwaitingHello, other) => {
                let message = format!(
                    "the first frame must be a hello, not a `{}`",
                    other.type_name()
                );
                self.reject_hello(connection, message);
            }
            // Every message's path: the message alone is moved on, not the
            // whole frame.
            (ConnPhase::Open { session, .. }, Frame::Msg(m)) => {
                let session = *session;
                self.on_msg(connection, session, m);
            }
            (ConnPhase::Open { session, .. }, frame) => {
                let session = *session;
                self.on_session_frame(connection, session, frame);
            }
        }
    }
}

pub(super) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod size {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// Idle sessions are multiplied by tens of thousands: keep them small.
    /// The figure is recorded in ARCHITECTURE.md; raise the bound only with a
    /// reason written there.
    #[test]
    fn idle_session_state_stays_small() {
        let session = core::mem::size_of::<Session>();
        let conn = core::mem::size_of::<ConnRecord>();
        println!("Session: {session} bytes, ConnRecord: {conn} bytes");
        assert!(session <= 320, "Session grew to {session} bytes");
        assert!(conn <= 160, "ConnRecord grew to {conn} bytes");
    }
}
