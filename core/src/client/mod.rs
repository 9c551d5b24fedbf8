//! The client session machine.
//!
//! Owns one client's whole lifecycle: connecting, the handshake, heartbeats,
//! reconnecting with backoff, resuming the session, and reliable delivery in
//! both directions. Every state change happens in this module, through
//! `Client::set_state`, and only along the edges [`State::can_become`]
//! lists. It never touches a socket, a clock or the OS: the driver feeds it
//! inputs and carries out its outputs (see the crate docs for the loop).
//!
//! # Map
//!
//! [`Client`] is defined here; each other file adds the methods of one
//! behaviour, in an `impl Client` block of its own. The public types are
//! re-exported here, so every path stays `client::X`.
//!
//! * `mod.rs`: the struct and `ConnSettings` (the settings in force on the
//!   current connection), the constructor, the getters, the commands
//!   `connect`, `reconnect`, `close`, `send`, `send_with_timestamp`,
//!   `send_datagram`, `send_token`, `join`, `leave` and `publish`, the
//!   inputs `handle_message`, `handle_transport_closed`,
//!   `handle_transport_error` and `handle_timeout`, `poll_output` and
//!   `poll_timeout`, and `on_frame`, which hands each decoded frame to the
//!   file that handles it.
//! * `state.rs`: [`State`] and its transition table, `set_state` (the only
//!   way the state changes), why a connection ends ([`Cause`],
//!   [`TransportError`]) and why the client gives up ([`FailReason`]).
//! * `lifecycle.rs`: starting an attempt, dropping and forgetting a
//!   connection, the retry decision (`connection_ended`: what each cause
//!   leads to), backoff and the attempt limit (`schedule_retry`), the end
//!   of a close, and giving a session up (`discard_session`).
//! * `handshake.rs`: the `hello` (`upgrade_hello`, `handle_upgraded`,
//!   `handle_transport_opened`) and the server's answers to it: `welcome`,
//!   `reject`, `goaway`.
//! * `heartbeat.rs`: pings, pongs and round-trip times, the liveness
//!   check, the acknowledgment timeout.
//! * `timers.rs`: [`Timer`] and [`Deadline`], the timers that die with a
//!   connection, and what each one does when it fires (`on_timer`).
//! * `requests.rs`: `request`, `cancel_request`, `respond`, the request
//!   deadlines, and `send_latest` with its coalescing.
//! * `delivery.rs`: the glue to the session's delivery pipe (`Link`, in
//!   `link.rs`): accepting messages into the send queue, handing delivered
//!   messages on (to the application, a pending request, a room's presence,
//!   a refusal), acknowledgments, replays, and every frame that goes out.
//! * `streams.rs`: room streams: where each room's stream stands, entries
//!   delivered once in offset order, what was missed ([`Event::Missed`]),
//!   and the positions a resumed session hands back;
//! * `snapshot.rs`: [`Snapshot`]: a session carried across the end of its
//!   process (`suspend`, `restore`), such as a browser page's reload;
//! * `event.rs`: what the driver and the application are handed:
//!   [`Output`], [`Event`] and its reasons, [`UsageError`], [`ClientStats`],
//!   [`TransportId`].
//! * [`transport`]: which transport the driver's next connection takes
//!   (WebSocket or the HTTP fallback), and when it tries WebSocket again;
//!   a machine of its own beside [`Client`], which never sees transports.
//! * `tests.rs`: unit tests.

mod delivery;
mod event;
mod handshake;
mod heartbeat;
mod lifecycle;
mod maps;
mod requests;
mod snapshot;
mod state;
mod streams;
mod timers;
pub mod transport;

pub use self::event::{
    ClientStats, Event, LostReason, Output, RequestError, TransportId, UsageError,
};
pub use self::maps::MAX_MAP_ENTRIES_KEPT;
pub use self::snapshot::{RestoreError, Snapshot};
pub use self::state::{Cause, FailReason, State, TransportError};
pub use self::streams::MAX_LATEST_TRACKED;
pub use self::timers::{Deadline, Timer};
pub use crate::link::{Received, CAP_BATCH};

use std::collections::VecDeque;

use bytes::Bytes;
use core::time::Duration;

use crate::close::{CloseCode, Disposition};
use crate::coalesce::Coalescer;
use crate::config::{ClientConfig, ConfigError};
use crate::link::Link;
use crate::reliable::{MessageId, Outbound, Outgoing, RoomName, SendError};
use crate::rng::Rng;
use crate::time::Instant;
use crate::timer::TimerTable;
use crate::vecmap::{VecMap, VecSet};
use crate::wire::{
    self, ClientId, Codec, DecodeError, Frame, Incoming, Limits, MsgKind, Payload, ResumeKey,
    SessionId, PROTOCOL_VERSION,
};

use self::timers::Timers;

/// Settings in force on the current connection.
#[derive(Clone, Debug)]
struct ConnSettings {
    id: TransportId,
    version: u8,
    codec: Codec,
    ping_interval: Duration,
    pong_timeout: Duration,
    peer_max_message: usize,
    /// Whether the server said it can receive batch frames.
    peer_batches: bool,
    /// Whether the server said it can receive detached payloads.
    peer_detach: bool,
    /// Whether the connection agreed on compression (PROTOCOL.md, section
    /// 2.2): the client offered it and the server's welcome agreed.
    deflate: bool,
    /// The outstanding ping, for round-trip time.
    ping: Option<(u64, Instant)>,
    /// The last time anything arrived.
    last_rx: Instant,
    /// Whether the liveness deadline has already been extended by the grace.
    in_grace: bool,
}

/// The client session machine.
///
/// Methods come in four kinds, as in quinn-proto:
///
/// * getters: [`state`](Self::state), [`session`](Self::session),
///   [`rtt`](Self::rtt), [`stats`](Self::stats), ...
/// * `handle_*`: feed an input (transport opened, message received,
///   transport closed or failed, time passed);
/// * commands: [`connect`](Self::connect), [`send`](Self::send),
///   [`close`](Self::close), [`reconnect`](Self::reconnect);
/// * `poll_*`: drain outputs: [`poll_output`](Self::poll_output) until it
///   returns `None`, then [`poll_timeout`](Self::poll_timeout) for when to
///   call [`handle_timeout`](Self::handle_timeout).
///
/// After any `handle_*` or command, drain `poll_output` completely, then read
/// `poll_timeout`. Time only moves forward: an instant earlier than one seen
/// before is treated as that earlier-seen instant.
#[derive(Debug)]
pub struct Client {
    config: ClientConfig,
    /// Every `hello`'s `caps`, from the configuration.
    hello_caps: Vec<crate::wire::CapName>,
    client_id: ClientId,
    rng: Rng,
    now: Instant,
    state: State,
    transport: Option<TransportId>,
    next_transport: u64,
    /// Consecutive failed attempts since the last stable connection.
    failures: u32,
    /// The driver said the network is gone ([`handle_network`](Self::handle_network)).
    offline: bool,
    /// The current attempt began while [`offline`](Self::offline).
    attempt_offline: bool,
    auth_retry_used: bool,
    retry_hint: Option<Duration>,
    timers: Timers,
    coalescer: Coalescer<String, Payload>,
    rooms: VecSet<RoomName>,
    /// Where each room's stream stands (rooms the server streams to this
    /// client: those it asked to join, and those the server put it in).
    streams: VecMap<RoomName, streams::Position>,
    /// Leaves not yet acknowledged, whose rooms' streams are still
    /// followed (one per leave message queued or in flight).
    leaving: Vec<(MessageId, RoomName)>,
    /// The latest value of each room and key this client has (epoch,
    /// version), at most [`MAX_LATEST_TRACKED`](streams::MAX_LATEST_TRACKED).
    latest: VecMap<(RoomName, std::sync::Arc<str>), (u64, u64)>,
    /// The synced maps of its rooms, and its writes to them (`maps.rs`).
    maps: maps::Maps,
    requests: VecMap<MessageId, Instant>,
    request_deadlines: VecSet<(Instant, MessageId)>,
    conn: Option<ConnSettings>,
    session: Option<SessionId>,
    /// The secret that resumes `session`, from its `welcome`.
    resume_key: Option<ResumeKey>,
    /// Numbering, windows, batching, acknowledgments and retransmission.
    link: Link,
    next_id: u64,
    next_nonce: u64,
    decode_failures: u32,
    /// Decodes the current transport's messages, in order.
    decoder: wire::Decoder,
    rtt: Option<Duration>,
    /// The transport whose upgrade request carries the `hello`.
    hello_upgrade: Option<TransportId>,
    /// Joins taken from the front of the waiting queue into the `hello` of
    /// a new session (its `join`), until the `welcome` says whether the
    /// server took them; back to the queue otherwise. At most 32.
    hello_joins: Vec<crate::reliable::Waiting>,
    /// The rooms and ids of the joins the last `welcome`'s server took from
    /// the `hello`: a refusal of one names id 0 and its room. At most 32.
    hello_joined: Vec<(RoomName, MessageId)>,
    /// The rooms a resuming `hello` listed, for the server to join should
    /// the session be lost; while a lost session is given up, those the
    /// server took (no `join` message goes for them). At most 32.
    hello_rooms: Vec<RoomName>,
    /// A server left a `hello` in the upgrade unanswered: from then on the
    /// `hello` goes as the first frame.
    hello_upgrade_refused: bool,
    /// The transport whose request URL carries the `hello`
    /// ([`url_hello`](Self::url_hello)); its answer comes as the first frame.
    hello_url: Option<TransportId>,
    /// A server never answered a `hello` in the URL: from then on the
    /// `hello` goes as the first frame.
    hello_url_refused: bool,
    outputs: VecDeque<Output>,
    /// Encodes every frame: a scratch buffer and a pool of large buffers.
    encoder: wire::Encoder,
    stats: ClientStats,
}

impl Client {
    /// A machine in [`State::Disconnected`]. `client_id` identifies this
    /// client instance to the server; `seed` drives jitter (the same seed
    /// replays the same delays).
    pub fn new(
        config: ClientConfig,
        client_id: ClientId,
        seed: u64,
    ) -> Result<Client, ConfigError> {
        config.validate()?;
        let outbound = Outbound::new(&config.queue, &config.reliability);
        let coalescer = Coalescer::new(config.coalesce_interval, config.coalesce_keys);
        Ok(Client {
            hello_caps: config.hello_caps(),
            config,
            client_id,
            rng: Rng::new(seed),
            now: Instant::ZERO,
            state: State::Disconnected,
            transport: None,
            next_transport: 1,
            failures: 0,
            offline: false,
            attempt_offline: false,
            auth_retry_used: false,
            retry_hint: None,
            timers: TimerTable::new(),
            coalescer,
            rooms: VecSet::new(),
            streams: VecMap::new(),
            leaving: Vec::new(),
            latest: VecMap::new(),
            maps: maps::Maps::default(),
            requests: VecMap::new(),
            request_deadlines: VecSet::new(),
            conn: None,
            session: None,
            resume_key: None,
            link: Link::new(outbound),
            next_id: 1,
            next_nonce: 1,
            decode_failures: 0,
            decoder: wire::Decoder::new(),
            rtt: None,
            hello_upgrade: None,
            hello_joins: Vec::new(),
            hello_joined: Vec::new(),
            hello_rooms: Vec::new(),
            hello_upgrade_refused: false,
            hello_url: None,
            hello_url_refused: false,
            outputs: VecDeque::new(),
            encoder: wire::Encoder::default(),
            stats: ClientStats::default(),
        })
    }

    // ---- getters ----------------------------------------------------------

    /// The current state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The session, once a welcome has named one.
    pub fn session(&self) -> Option<SessionId> {
        self.session
    }

    /// The latest round-trip time sample.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// Counters.
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// This client instance's id.
    pub fn client_id(&self) -> ClientId {
        self.client_id
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The codec of the current connection, if open.
    pub fn codec(&self) -> Option<Codec> {
        self.conn.as_ref().map(|c| c.codec)
    }

    /// Messages accepted and waiting for a sequence number (offline or
    /// window full), and their bytes.
    pub fn queued(&self) -> (usize, usize) {
        (
            self.link.outbound.waiting_len(),
            self.link.outbound.waiting_bytes(),
        )
    }

    /// Messages sent and not yet acknowledged, and their bytes.
    pub fn unacknowledged(&self) -> (usize, usize) {
        (
            self.link.outbound.in_flight(),
            self.link.outbound.in_flight_bytes(),
        )
    }

    /// Whether a message sent now would go into the send window at once
    /// (nothing queued ahead of it, the window below its limits). A sender
    /// that waits for this before each send never holds more than one
    /// message beyond the window, so it paces itself to what the link and
    /// the peer acknowledge instead of filling the queue.
    pub fn has_room(&self) -> bool {
        self.link.outbound.has_room()
    }

    /// The last sequence number delivered to the application.
    pub fn delivered(&self) -> u64 {
        self.link.inbound.delivered()
    }

    /// Consecutive failed attempts since the last stable connection.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    // ---- commands ---------------------------------------------------------
    // (`request`, `cancel_request`, `respond` and `send_latest` are in
    // requests.rs.)

    /// Starts connecting. Valid from `Disconnected`, `Closed` and `Failed`.
    pub fn connect(&mut self, now: Instant) -> Result<(), UsageError> {
        self.advance(now);
        match self.state {
            State::Disconnected | State::Closed { .. } | State::Failed { .. } => {
                self.failures = 0;
                self.auth_retry_used = false;
                self.retry_hint = None;
                self.start_attempt();
                Ok(())
            }
            State::Closing => Err(UsageError::Closing),
            ref s => Err(UsageError::AlreadyActive(s.name())),
        }
    }

    /// Connects again now: from `Failed` or `Closed` (starting the attempt
    /// count afresh), from `Reconnecting` (skipping the rest of the delay), or
    /// from a live connection (abandoning it with 4000 and resuming the
    /// session on a new one).
    pub fn reconnect(&mut self, now: Instant) -> Result<(), UsageError> {
        self.advance(now);
        match self.state {
            State::Closing => Err(UsageError::Closing),
            State::Disconnected | State::Closed { .. } | State::Failed { .. } => self.connect(now),
            State::Reconnecting { .. } => {
                self.timers.stop(Timer::Backoff);
                self.start_attempt();
                Ok(())
            }
            State::Connecting { .. } | State::Handshaking { .. } | State::Open => {
                self.drop_connection(CloseCode::RETRY, "reconnect requested");
                self.start_attempt();
                Ok(())
            }
        }
    }

    /// Closes the session: sends 1000, never reconnects. Messages not yet
    /// acknowledged are reported in [`Event::SessionLost`].
    pub fn close(&mut self, now: Instant) -> Result<(), UsageError> {
        self.advance(now);
        match self.state {
            State::Closed { .. } => Err(UsageError::AlreadyClosed),
            State::Closing => Err(UsageError::Closing),
            State::Handshaking { .. } | State::Open => {
                // The final value of every key goes out before the close.
                self.release_latest(true);
                self.flush_ack();
                // Keep the transport id: its close completing is what ends `Closing`.
                if let Some(id) = self.transport {
                    self.outputs.push_back(Output::Disconnect(
                        id,
                        CloseCode::NORMAL,
                        "client closed",
                    ));
                }
                self.forget_connection();
                self.set_state(State::Closing);
                self.timers
                    .set(Timer::Close, self.now + self.config.close_timeout);
                Ok(())
            }
            _ => {
                self.drop_connection(CloseCode::NORMAL, "client closed");
                self.timers.stop(Timer::Backoff);
                self.finish_closed(CloseCode::NORMAL);
                Ok(())
            }
        }
    }

    /// Queues a message for reliable, ordered, exactly-once delivery.
    /// Returns its id; [`Event::Acked`] reports when the peer has it.
    ///
    /// Accepted in every state but `Closing`, `Closed` and `Failed`: while not
    /// open, messages wait (bounded by [`ClientConfig::queue`]) and go out in
    /// order once the session is open.
    pub fn send(&mut self, now: Instant, payload: Payload) -> Result<MessageId, SendError> {
        self.send_inner(now, payload, None)
    }

    /// Like [`send`](Self::send), with the sender's wall-clock timestamp in
    /// milliseconds carried to the receiver.
    pub fn send_with_timestamp(
        &mut self,
        now: Instant,
        payload: Payload,
        timestamp_ms: u64,
    ) -> Result<MessageId, SendError> {
        self.send_inner(now, payload, Some(timestamp_ms))
    }

    /// Sends an unsequenced datagram (binary header kind 0x02): no ack, no
    /// retransmission, no queueing. Only on an open connection.
    pub fn send_datagram(&mut self, now: Instant, data: Bytes) -> Result<(), SendError> {
        self.advance(now);
        let Some(conn) = &self.conn else {
            return Err(SendError::NotOpen);
        };
        if self.state != State::Open {
            return Err(SendError::NotOpen);
        }
        let max = conn
            .peer_max_message
            .saturating_sub(wire::BINARY_HEADER_LEN);
        SendError::check_size(data.len(), max)?;
        self.transmit(&Frame::Raw(data));
        Ok(())
    }

    /// Sends a fresh credential, answering [`Event::TokenExpiring`]. Only on
    /// an open connection (a new connection carries its token in the upgrade).
    pub fn send_token(&mut self, now: Instant, token: String) -> Result<(), SendError> {
        self.advance(now);
        if self.state != State::Open {
            return Err(SendError::NotOpen);
        }
        SendError::check_size(token.len(), wire::MAX_TOKEN_BYTES)?;
        self.transmit(&Frame::Auth { token });
        Ok(())
    }

    fn send_inner(
        &mut self,
        now: Instant,
        payload: Payload,
        ts: Option<u64>,
    ) -> Result<MessageId, SendError> {
        self.enqueue(now, Outgoing::new(MsgKind::Plain, payload).at(ts))
    }

    /// Joins a room. The server checks its policy and answers with
    /// [`Event::Presence`] (a snapshot of the members) or [`Event::Refused`].
    /// Membership belongs to the session: it survives reconnects, and if the
    /// session is lost the client rejoins its rooms in the new one by itself.
    pub fn join(&mut self, now: Instant, room: &str) -> Result<MessageId, SendError> {
        let name = room_name(room)?;
        let join = Outgoing::new(MsgKind::Join, Payload::null()).in_room(name.clone());
        let id = self.enqueue(now, join)?;
        self.rooms.insert(name);
        Ok(id)
    }

    /// Leaves a room.
    pub fn leave(&mut self, now: Instant, room: &str) -> Result<MessageId, SendError> {
        let name = room_name(room)?;
        let leave = Outgoing::new(MsgKind::Leave, Payload::null()).in_room(name.clone());
        let id = self.enqueue(now, leave)?;
        self.rooms.remove(&name);
        // Entries broadcast before the server takes the leave still come:
        // the room's stream is followed until the leave is acknowledged.
        if self.streams.contains_key(&name) {
            self.leaving.push((id, name));
        }
        Ok(id)
    }

    /// Publishes to a room this client has joined: the server checks its
    /// policy and delivers the message to every other member, each exactly
    /// once and in order. A refusal comes back as [`Event::Refused`].
    pub fn publish(
        &mut self,
        now: Instant,
        room: &str,
        payload: Payload,
    ) -> Result<MessageId, SendError> {
        let name = room_name(room)?;
        self.enqueue(now, Outgoing::new(MsgKind::Plain, payload).in_room(name))
    }

    /// The rooms this client has asked to be in.
    pub fn rooms(&self) -> impl Iterator<Item = &str> {
        self.rooms.iter().map(|r| &**r)
    }

    // ---- inputs -----------------------------------------------------------
    // (`upgrade_hello`, `handle_transport_opened` and `handle_upgraded` are
    // in handshake.rs.)

    /// A WebSocket message arrived on `transport`.
    pub fn handle_message(&mut self, now: Instant, transport: TransportId, msg: Incoming<'_>) {
        self.advance(now);
        if self.transport != Some(transport) {
            return;
        }
        self.stats.traffic.frames_in += 1;
        self.stats.traffic.bytes_in += msg.len() as u64;
        // Any inbound message proves the peer is alive, even an undecodable one.
        if let Some(conn) = &mut self.conn {
            conn.last_rx = self.now;
            conn.in_grace = false;
            self.timers.stop(Timer::Liveness);
        }
        let limits = Limits {
            max_message: self.config.max_message_size,
            version: self.conn.as_ref().map_or(PROTOCOL_VERSION, |c| c.version),
        };
        match self.decoder.decode(msg, &limits) {
            Ok(Some(frame)) => {
                self.decode_failures = 0;
                self.on_frame(frame);
            }
            // A message whose payload is the next message.
            Ok(None) => {}
            #[cfg(feature = "compression")]
            Err(error @ DecodeError::Compression { .. }) => {
                // The server compressed what cannot be inflated: this
                // connection cannot carry the session on (1002); the
                // next one resumes it.
                let message = format!("{error}");
                self.stats.traffic.decode_failures += 1;
                self.emit(Event::DecodeFailed(error));
                self.protocol_error(message);
            }
            Err(error) => self.on_decode_error(error),
        }
    }

    /// The transport closed. `code` is the peer's close code, `None` when the
    /// transport ended without a close frame (reported as 1006).
    pub fn handle_transport_closed(
        &mut self,
        now: Instant,
        transport: TransportId,
        code: Option<CloseCode>,
        reason: &str,
    ) {
        self.advance(now);
        if self.transport != Some(transport) {
            return;
        }
        if code.is_some() {
            self.url_hello_unanswered(code);
        }
        self.transport = None;
        if self.state == State::Closing {
            self.finish_closed(CloseCode::NORMAL);
            return;
        }
        let code = code.unwrap_or(CloseCode::ABNORMAL);
        let cause = Cause::PeerClosed {
            code,
            reason: reason.chars().take(123).collect(),
        };
        self.connection_ended(cause, code.disposition(), None);
    }

    /// Opening, reading or writing the transport failed.
    pub fn handle_transport_error(
        &mut self,
        now: Instant,
        transport: TransportId,
        error: TransportError,
    ) {
        self.advance(now);
        if self.transport != Some(transport) {
            return;
        }
        self.transport = None;
        if self.state == State::Closing {
            self.finish_closed(CloseCode::NORMAL);
            return;
        }
        let disposition = error.disposition();
        let hint = match &error {
            TransportError::Http { retry_after, .. } => *retry_after,
            _ => None,
        };
        self.connection_ended(Cause::Transport(error), disposition, hint);
    }

    /// Time passed. Call at (or after) the instant from `poll_timeout`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        // Each expiry clears its slot, and re-armed timers lie in the future,
        // so this loop ends; the bound is a guard, not a limit in practice.
        for _ in 0..64 {
            let Some(timer) = self.timers.pop_expired(self.now) else {
                break;
            };
            self.on_timer(timer);
        }
    }

    // ---- outputs ----------------------------------------------------------

    /// The next thing the driver must do, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When `handle_timeout` must be called next, and why.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Deadline> {
        self.timers.next().map(|(at, timer)| Deadline { at, timer })
    }

    // ---- internals --------------------------------------------------------

    fn advance(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
    }

    fn emit(&mut self, event: Event) {
        self.outputs.push_back(Output::Event(event));
    }

    fn on_decode_error(&mut self, error: DecodeError) {
        self.stats.traffic.decode_failures += 1;
        self.decode_failures += 1;
        let too_large = matches!(error, DecodeError::TooLarge { .. });
        self.emit(Event::DecodeFailed(error));
        if too_large {
            // The peer ignored our limit; it would resend the same message
            // after a resume, so the connection cannot make progress.
            self.drop_connection(CloseCode::MESSAGE_TOO_BIG, "message too big");
            self.connection_ended(
                Cause::Protocol("peer sent a message over the size limit".into()),
                Disposition::Reconnect,
                None,
            );
            return;
        }
        if self.decode_failures > self.config.max_decode_failures {
            self.decode_failures = 0;
            self.emit(Event::Resync);
        }
    }

    fn on_frame(&mut self, frame: Frame) {
        match (&self.state, frame) {
            (State::Handshaking { .. }, Frame::Welcome(w)) => self.on_welcome(w),
            (State::Handshaking { .. }, Frame::Reject(r)) => self.on_reject(r),
            (
                State::Handshaking { .. },
                Frame::GoAway {
                    code,
                    retry_after_ms,
                },
            ) => self.on_goaway(CloseCode(code), retry_after_ms),
            (State::Handshaking { .. }, f) => {
                self.protocol_error(format!("`{}` before the welcome", f.type_name()))
            }
            (State::Open, Frame::Ping { nonce }) => self.transmit(&Frame::Pong { nonce }),
            (State::Open, Frame::Pong { nonce }) => self.on_pong(nonce),
            (State::Open, Frame::Msg(m)) => self.on_msg(m),
            (State::Open, Frame::Batch(msgs)) => {
                for m in msgs {
                    self.on_msg(m);
                    if self.state != State::Open {
                        break;
                    }
                }
            }
            (State::Open, Frame::Ack { ack }) => self.on_ack(ack),
            (State::Open, Frame::Replay { from }) => self.on_replay(from),
            (
                State::Open,
                Frame::GoAway {
                    code,
                    retry_after_ms,
                },
            ) => self.on_goaway(CloseCode(code), retry_after_ms),
            (State::Open, Frame::Raw(data)) => self.emit(Event::Datagram(data)),
            (State::Open, Frame::Sub(pos)) => self.on_sub(pos),
            (State::Open, Frame::Pub(e)) => self.on_stream_entry(e.room.clone(), e.offset, Some(e)),
            (State::Open, Frame::Skip { room, offset }) => self.on_stream_entry(room, offset, None),
            (State::Open, Frame::Latest(v)) => self.on_latest(v),
            (State::Open, Frame::MapSnapshot(s)) => self.on_map_snapshot(s),
            (State::Open, Frame::MapValue(v)) => self.on_map_value(v),
            (State::Open, Frame::Reauth { within_ms }) => self.emit(Event::TokenExpiring {
                within: Duration::from_millis(within_ms),
            }),
            (_, Frame::Unknown(_)) => self.stats.unknown_frames += 1,
            (State::Open, f) => {
                self.protocol_error(format!("unexpected `{}` on an open session", f.type_name()))
            }
            // Closing: the transport is being shut; whatever arrives is moot.
            _ => {}
        }
    }
}

fn room_name(room: &str) -> Result<RoomName, SendError> {
    if room.is_empty() || room.len() > wire::MAX_TOKEN_LEN {
        return Err(SendError::BadRoom);
    }
    Ok(RoomName::from(room))
}

#[cfg(test)]
mod tests;
