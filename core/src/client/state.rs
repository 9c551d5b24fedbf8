//! The client's state, and why a connection or the whole client ends.
//!
//! Owns [`State`] and its transition table ([`State::can_become`]);
//! `Client::set_state`, the one function that changes the state, checks the
//! edge (in debug builds) and reports the change; the reasons a connection
//! ends ([`Cause`], [`TransportError`]) and the client gives up
//! ([`FailReason`]), with the mapping from a transport error or a final cause
//! to those. Nothing here picks the next state: the lifecycle and the
//! handlers do, and every change they make goes through `set_state`.

use core::time::Duration;

use crate::close::{CloseCode, Disposition};
use crate::time::Instant;

use super::{Client, Event};

/// The client's connection state. Every change is reported as
/// [`Event::StateChanged`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum State {
    /// Created; `connect` not called yet.
    Disconnected,
    /// A transport is being opened. `attempt` is 0 for the first connection
    /// and counts consecutive failures since the last stable connection.
    Connecting {
        /// Consecutive failed attempts before this one.
        attempt: u32,
    },
    /// The transport is open and the hello is sent; waiting for a welcome.
    Handshaking {
        /// Consecutive failed attempts before this one.
        attempt: u32,
    },
    /// The session is established; messages flow.
    Open,
    /// Waiting out a backoff delay before the next attempt.
    Reconnecting {
        /// The attempt that starts at `at` (1 for the first retry).
        attempt: u32,
        /// When the next attempt starts.
        at: Instant,
        /// Why the previous connection or attempt ended.
        cause: Cause,
    },
    /// A local `close()` is waiting for the transport to finish closing.
    Closing,
    /// Finished: closed locally, or the server ended the session (1000).
    Closed {
        /// The code the session ended with.
        code: CloseCode,
    },
    /// Gave up. `reconnect()` starts again.
    Failed {
        /// Why.
        reason: FailReason,
    },
}

impl State {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            State::Disconnected => "disconnected",
            State::Connecting { .. } => "connecting",
            State::Handshaking { .. } => "handshaking",
            State::Open => "open",
            State::Reconnecting { .. } => "reconnecting",
            State::Closing => "closing",
            State::Closed { .. } => "closed",
            State::Failed { .. } => "failed",
        }
    }

    /// Whether the machine may go from `self` to `next`. This is the whole
    /// transition table; ARCHITECTURE.md draws it.
    pub fn can_become(&self, next: &State) -> bool {
        use State::*;
        matches!(
            (self, next),
            (
                Disconnected | Closed { .. } | Failed { .. },
                Connecting { .. }
            ) | (Disconnected | Failed { .. }, Closed { .. })
                | (Connecting { .. }, Handshaking { .. })
                | (Handshaking { .. }, Open)
                | (
                    Connecting { .. } | Handshaking { .. } | Open,
                    Reconnecting { .. }
                )
                | (
                    Connecting { .. } | Handshaking { .. } | Open | Reconnecting { .. },
                    Failed { .. }
                )
                | (
                    Connecting { .. } | Handshaking { .. } | Open | Reconnecting { .. },
                    Connecting { .. }
                )
                | (Handshaking { .. } | Open, Closing)
                | (
                    Connecting { .. } | Handshaking { .. } | Open | Reconnecting { .. } | Closing,
                    Closed { .. }
                )
        )
    }
}

/// Why a connection or connection attempt ended.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Cause {
    /// The peer closed the transport with this code (1006 if it just vanished).
    PeerClosed {
        /// The close code.
        code: CloseCode,
        /// The close reason text, if any.
        reason: String,
    },
    /// The transport failed (connect refused, reset, TLS, HTTP status).
    Transport(TransportError),
    /// No welcome within the connect timeout.
    ConnectTimeout,
    /// The peer stopped answering heartbeats.
    HeartbeatTimeout,
    /// Sent data stayed unacknowledged past the ack timeout.
    AckTimeout,
    /// The server refused the hello.
    Rejected {
        /// The server's close code.
        code: CloseCode,
        /// The server's machine-readable reason.
        reason: String,
    },
    /// The server asked the client to go away and come back.
    GoAway {
        /// The server's close code.
        code: CloseCode,
    },
    /// The peer broke the protocol.
    Protocol(String),
    /// `reconnect()` was called.
    Requested,
}

/// Why the client gave up.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum FailReason {
    /// Reached the configured maximum number of consecutive attempts.
    TooManyAttempts {
        /// Attempts made.
        attempts: u32,
        /// Why the last one ended.
        last: Cause,
    },
    /// Client and server share no protocol version.
    UnsupportedVersion {
        /// Versions the client offered.
        offered: Vec<u8>,
        /// Versions the server speaks, if it said.
        supported: Vec<u8>,
    },
    /// Client and server share no codec.
    UnsupportedCodec,
    /// Authentication failed and no fresh token could be had.
    Unauthorized,
    /// The server refused this identity (HTTP 403 or close 4403).
    Forbidden,
    /// The server closed with a code that rules out retrying.
    Terminal {
        /// The code.
        code: CloseCode,
        /// The reason text.
        reason: String,
    },
    /// The HTTP upgrade was refused with a status that retrying cannot fix.
    HttpStatus(u16),
}

/// A transport failure, as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportError {
    /// Connecting, reading or writing failed (refused, reset, DNS, ...).
    Io(String),
    /// The HTTP upgrade was answered with this status instead of 101.
    Http {
        /// The HTTP status.
        status: u16,
        /// The `Retry-After` header, if present and parseable.
        retry_after: Option<Duration>,
    },
    /// The TLS handshake failed.
    Tls(String),
    /// The WebSocket layer saw a protocol violation.
    WebSocket(String),
}

impl TransportError {
    pub(super) fn disposition(&self) -> Disposition {
        match self {
            TransportError::Http { status: 401, .. } => Disposition::Reauthenticate,
            TransportError::Http {
                status: 400 | 403 | 404 | 405 | 410 | 426 | 431,
                ..
            } => Disposition::Fail,
            TransportError::Http {
                status: 429 | 503, ..
            } => Disposition::ReconnectLater,
            _ => Disposition::Reconnect,
        }
    }
}

impl Client {
    pub(super) fn set_state(&mut self, new: State) {
        if new == self.state {
            return;
        }
        debug_assert!(
            self.state.can_become(&new),
            "illegal transition {:?} -> {:?}",
            self.state,
            new
        );
        let old = core::mem::replace(&mut self.state, new.clone());
        self.emit(Event::StateChanged { old, new });
    }
}

/// Why the client gives up, for a `cause` whose disposition is to fail.
pub(super) fn fail_reason(cause: &Cause, offered: &[u8]) -> FailReason {
    match cause {
        Cause::Transport(TransportError::Http { status: 403, .. }) => FailReason::Forbidden,
        Cause::Transport(TransportError::Http { status, .. }) => FailReason::HttpStatus(*status),
        Cause::PeerClosed { code, .. } | Cause::Rejected { code, .. } | Cause::GoAway { code }
            if *code == CloseCode::FORBIDDEN =>
        {
            FailReason::Forbidden
        }
        Cause::PeerClosed { code, .. } | Cause::Rejected { code, .. } | Cause::GoAway { code }
            if *code == CloseCode::UNSUPPORTED_VERSION =>
        {
            FailReason::UnsupportedVersion {
                offered: offered.to_vec(),
                supported: Vec::new(),
            }
        }
        Cause::PeerClosed { code, .. } | Cause::Rejected { code, .. } | Cause::GoAway { code }
            if *code == CloseCode::UNSUPPORTED_CODEC =>
        {
            FailReason::UnsupportedCodec
        }
        Cause::PeerClosed { code, reason } => FailReason::Terminal {
            code: *code,
            reason: reason.clone(),
        },
        Cause::Rejected { code, reason } => FailReason::Terminal {
            code: *code,
            reason: reason.clone(),
        },
        Cause::GoAway { code } => FailReason::Terminal {
            code: *code,
            reason: String::new(),
        },
        other => FailReason::Terminal {
            code: CloseCode::POLICY_VIOLATION,
            reason: describe(other),
        },
    }
}

/// Words for a cause that ended the client for good: written out rather
/// than `Debug`, whose formatting code (durations included) the browser
/// package would carry for this one line.
fn describe(cause: &Cause) -> String {
    match cause {
        Cause::PeerClosed { reason, .. } | Cause::Rejected { reason, .. } => reason.clone(),
        Cause::Transport(TransportError::Http { status, .. }) => {
            format!("the upgrade was answered with HTTP {status}")
        }
        Cause::Transport(
            TransportError::Io(e) | TransportError::Tls(e) | TransportError::WebSocket(e),
        ) => e.clone(),
        Cause::Protocol(e) => e.clone(),
        Cause::ConnectTimeout => "no welcome within the connect timeout".into(),
        Cause::HeartbeatTimeout => "the server stopped answering heartbeats".into(),
        Cause::AckTimeout => "sent messages stayed unacknowledged".into(),
        Cause::GoAway { .. } => "the server asked the client to go away".into(),
        Cause::Requested => "reconnect requested".into(),
    }
}
