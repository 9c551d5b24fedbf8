//! The server's record of one connection (`ConnRecord`): its phase
//! (awaiting its `hello`, or open with the session it carries and what was
//! negotiated), the identity from the upgrade, its decoder, rate limiter
//! and deadlines, and its lag probe (lag.rs runs it); the idle check with
//! its grace (`check_idle`), re-authentication
//! ([`Server::request_reauth`], [`Server::accept_token`]), and the decoder
//! a driver may take to decode outside its lock ([`ConnDecoder`]).
//!
//! A record holds no session state: the session lives in the registry and
//! outlives its connections. Nothing here closes a connection but through
//! `disconnect` (session.rs); the idle check closes a silent connection
//! and keeps its session, and never ends one (ending a slow consumer is
//! the lag bound's, lag.rs, and only for a client still heard from).

use core::time::Duration;

use crate::close::CloseCode;
use crate::ratelimit::RateLimiter;
use crate::time::Instant;
use crate::wire::{self, Codec, DecodeError, Frame, Incoming, Limits, SessionId, PROTOCOL_VERSION};

use super::admission::Limited;
use super::lag::LagProbe;
use super::{duration_ms, ConnectionId, Server, ServerTimer};

// Named only in links in the docs.
#[cfg(doc)]
use super::ServerEvent;

/// Where a connection is: waiting for its `hello`, or open, carrying a
/// session with what its handshake negotiated.
#[derive(Debug)]
pub(super) enum ConnPhase {
    AwaitingHello,
    Open {
        session: SessionId,
        codec: Codec,
        version: u8,
        batches: bool,
        /// Whether the client can receive detached payloads.
        detach: bool,
        /// Whether the client asked to be pinged ([`wire::CAP_PING`]).
        pinged: bool,
        /// Whether the connection agreed on compression
        /// ([`wire::CAP_DEFLATE`]).
        deflate: bool,
        /// Whether the client takes synced maps' frames
        /// ([`wire::CAP_MAPS`]).
        maps: bool,
    },
}

/// The server's record of one connection, from its acceptance to its close.
#[derive(Debug)]
pub(super) struct ConnRecord {
    pub(super) phase: ConnPhase,
    pub(super) identity: Option<String>,
    pub(super) fresh_session: SessionId,
    pub(super) last_rx: Instant,
    pub(super) in_grace: bool,
    pub(super) decode_failures: u32,
    /// Decodes this connection's messages, in order; `None` once a driver
    /// took it ([`Server::take_decoder`]).
    pub(super) decoder: Option<wire::Decoder>,
    pub(super) hello_deadline: Option<Instant>,
    pub(super) reauth_deadline: Option<Instant>,
    pub(super) limiter: Option<Box<RateLimiter>>,
    /// What the rate limit did since the last [`ServerEvent::RateLimited`],
    /// reported once per interval; also when reading may resume.
    pub(super) limited: Option<Box<Limited>>,
    /// The lag probe (lag.rs), from when the connection first has
    /// something to measure.
    pub(super) lag: Option<Box<LagProbe>>,
}

impl ConnRecord {
    /// What this connection's messages are decoded against: the largest
    /// message, and the protocol version (the latest until the `hello`
    /// agreed one).
    pub(super) fn limits(&self, max_message: usize) -> Limits {
        let version = match self.phase {
            ConnPhase::Open { version, .. } => version,
            ConnPhase::AwaitingHello => PROTOCOL_VERSION,
        };
        Limits {
            max_message,
            version,
        }
    }
}

/// An open connection's decoder, taken by a driver
/// ([`Server::take_decoder`]) to decode the connection's messages itself,
/// outside whatever guards the server: the decoder's state (a detached
/// payload it waits for, compression) and the limits the connection's
/// messages are held to.
#[derive(Debug)]
pub struct ConnDecoder {
    pub(super) decoder: wire::Decoder,
    pub(super) limits: Limits,
}

impl ConnDecoder {
    /// Decodes the connection's next message, for
    /// [`Server::handle_decoded`]. Never fails here: a message that does not
    /// decode is reported, counted and acted on there, as
    /// [`Server::handle_message`] would.
    pub fn decode(&mut self, msg: Incoming<'_>) -> Decoded {
        Decoded {
            len: msg.len(),
            result: self.decoder.decode(msg, &self.limits),
        }
    }
}

/// One message a [`ConnDecoder`] decoded, for [`Server::handle_decoded`]:
/// its length, and its frame, nothing yet (an envelope whose payload is the
/// next message), or why it did not decode.
#[derive(Debug)]
pub struct Decoded {
    pub(super) len: usize,
    pub(super) result: Result<Option<wire::Frame>, DecodeError>,
}

impl Server {
    /// Tells a connection's client that its credential is expiring: it must
    /// send a fresh one within `within` (answered by
    /// [`ServerEvent::TokenReceived`]) or the connection is closed with 4401.
    pub fn request_reauth(&mut self, now: Instant, connection: ConnectionId, within: Duration) {
        self.advance(now);
        let Some(conn) = self.conns.get_mut(&connection) else {
            return;
        };
        if !matches!(conn.phase, ConnPhase::Open { .. }) {
            return;
        }
        let at = self.now + within;
        conn.reauth_deadline = Some(at);
        self.arm(at, ServerTimer::Reauth(connection));
        self.transmit(
            connection,
            &Frame::Reauth {
                within_ms: duration_ms(within),
            },
        );
    }

    /// The credential from [`ServerEvent::TokenReceived`] is valid: cancels
    /// the re-authentication deadline.
    pub fn accept_token(&mut self, now: Instant, connection: ConnectionId) {
        self.advance(now);
        if let Some(conn) = self.conns.get_mut(&connection) {
            conn.reauth_deadline = None;
        }
    }

    /// Pings a client that asked for it ([`wire::CAP_PING`]): a page in a
    /// hidden tab, whose own timers the browser may hold back for a minute,
    /// answers from its message handler, which runs at once. Its `pong`
    /// keeps the connection from looking idle, and its driver runs its
    /// overdue timers (acknowledgments, its own ping) when the `ping`
    /// arrives.
    pub(super) fn ping(&mut self, c: ConnectionId) {
        let pinged = matches!(
            self.conns.get(&c).map(|conn| &conn.phase),
            Some(ConnPhase::Open { pinged: true, .. })
        );
        if !pinged {
            return;
        }
        let nonce = self.now.as_millis();
        self.transmit(c, &Frame::Ping { nonce });
        let at = self.now + self.config.ping_interval;
        self.arm(at, ServerTimer::Ping(c));
    }

    pub(super) fn check_idle(&mut self, c: ConnectionId) {
        let idle = self.config.idle_timeout;
        let grace = self.config.grace;
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        let due = conn.last_rx + idle;
        if self.now < due {
            // Traffic arrived since this deadline was set: look again then.
            self.arm(due, ServerTimer::Idle(c));
            return;
        }
        if !conn.in_grace && !grace.is_zero() {
            // Overdue, perhaps because the process slept: frames already in
            // the socket get read before the client is declared dead.
            conn.in_grace = true;
            let at = self.now + grace;
            self.arm(at, ServerTimer::Idle(c));
            return;
        }
        self.stats.heartbeat_timeouts += 1;
        self.disconnect(c, CloseCode::HEARTBEAT_TIMEOUT, "heartbeat timeout");
    }
}
