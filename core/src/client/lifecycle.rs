//! The connection lifecycle: starting attempts, ending connections, and
//! deciding what comes next.
//!
//! Owns `start_attempt` (a fresh transport id for every attempt),
//! `drop_connection` and `forget_connection` (which clear every
//! connection-scoped timer), `connection_ended`, which decides between
//! reconnecting, backing off longer, reauthenticating, failing and
//! stopping, and its shortcuts (`connection_ended_with` fails with a given
//! reason, `protocol_error` closes with 1002 first); `schedule_retry`
//! (backoff, the server's retry-after hint, the attempt limit), the end of
//! a close, and `discard_session`, which gives a session up and reports
//! what was at stake. It never reads or sends a frame: the handlers come
//! here once they know a connection is over.

use core::time::Duration;

use crate::backoff::Jitter;
use crate::close::{CloseCode, Disposition};
use crate::reliable::{MessageId, Waiting};
use crate::rng::Rng;
use crate::time::Instant;
use crate::wire::{self, MsgKind, Payload};

use super::state::fail_reason;
use super::timers::CONNECTION_TIMERS;
use super::{
    Cause, Client, Event, FailReason, LostReason, Output, RequestError, State, Timer,
    TransportError, TransportId,
};

impl Client {
    /// The device's network went away (`online: false`) or came back, as
    /// the driver's platform reports it (a page's `offline` and `online`
    /// events). While it is away, failed attempts do not count toward
    /// [`BackoffConfig::max_attempts`](crate::backoff::BackoffConfig::max_attempts)
    /// and the delay between them does not grow; once it is back, a client
    /// waiting out a delay connects at once. An open connection is left to
    /// the heartbeat: a short outage may not have broken it.
    pub fn handle_network(&mut self, now: Instant, online: bool) {
        self.advance(now);
        let was_offline = core::mem::replace(&mut self.offline, !online);
        if !online || !was_offline {
            return;
        }
        match self.state {
            State::Reconnecting { .. } => {
                self.timers.stop(Timer::Backoff);
                self.start_attempt();
            }
            // An attempt begun while offline may hang until its timeout:
            // a fresh one goes out now instead.
            State::Connecting { .. } | State::Handshaking { .. } if self.attempt_offline => {
                self.drop_connection(CloseCode::RETRY, "network back");
                self.start_attempt();
            }
            _ => {}
        }
    }

    /// Whether the driver last said the network is gone.
    pub fn offline(&self) -> bool {
        self.offline
    }

    pub(super) fn start_attempt(&mut self) {
        self.attempt_offline = self.offline;
        let id = TransportId(self.next_transport);
        self.next_transport += 1;
        self.transport = Some(id);
        self.decoder = wire::Decoder::new();
        self.stats.connects += 1;
        self.set_state(State::Connecting {
            attempt: self.failures,
        });
        self.timers
            .set(Timer::Connect, self.now + self.config.connect_timeout);
        self.outputs.push_back(Output::Connect(id));
    }

    /// Tells the driver to close the current transport and forgets it and
    /// everything that belonged to it.
    pub(super) fn drop_connection(&mut self, code: CloseCode, reason: &'static str) {
        if let Some(id) = self.transport.take() {
            self.outputs.push_back(Output::Disconnect(id, code, reason));
        }
        self.forget_connection();
    }

    pub(super) fn forget_connection(&mut self) {
        self.restore_hello_joins();
        self.hello_rooms.clear();
        self.conn = None;
        self.link.connection_lost(&mut self.timers);
        for t in CONNECTION_TIMERS {
            self.timers.stop(t);
        }
    }

    /// The current connection or attempt is over; decide what comes next.
    pub(super) fn connection_ended(
        &mut self,
        cause: Cause,
        disposition: Disposition,
        hint: Option<Duration>,
    ) {
        self.forget_connection();
        // The application closed: whatever ended the connection meanwhile
        // (a bad frame, a timeout) only ends it sooner; never reconnect.
        if self.state == State::Closing {
            self.transport = None;
            self.finish_closed(CloseCode::NORMAL);
            return;
        }
        if let Some(h) = hint {
            self.retry_hint = Some(h.min(self.config.max_retry_after));
        }
        match disposition {
            Disposition::Stop => {
                let code = match &cause {
                    Cause::PeerClosed { code, .. } => *code,
                    _ => CloseCode::NORMAL,
                };
                self.finish_closed(code);
            }
            Disposition::Fail => {
                let reason = fail_reason(&cause, &self.config.versions);
                self.set_state(State::Failed { reason });
            }
            Disposition::Reauthenticate => {
                if self.config.can_refresh_token && !self.auth_retry_used {
                    self.auth_retry_used = true;
                    self.schedule_retry(cause, Some(Duration::ZERO));
                } else {
                    self.set_state(State::Failed {
                        reason: FailReason::Unauthorized,
                    });
                }
            }
            Disposition::ReconnectLater => {
                // A server that said "later" in-band (1013, a `reject`
                // with 4429) is waited for at least `try_later_delay`
                // without a `retry`; a 429 or 503 without `Retry-After`
                // backs off as any failed attempt (PROTOCOL.md, section 8).
                let http = matches!(cause, Cause::Transport(TransportError::Http { .. }));
                if !http {
                    let floor = self.retry_hint.unwrap_or(self.config.try_later_delay);
                    self.retry_hint = Some(floor);
                }
                self.schedule_retry(cause, None);
            }
            Disposition::Reconnect => self.schedule_retry(cause, None),
        }
    }

    pub(super) fn connection_ended_with(&mut self, reason: FailReason) {
        self.forget_connection();
        self.set_state(State::Failed { reason });
    }

    pub(super) fn protocol_error(&mut self, what: String) {
        self.drop_connection(CloseCode::PROTOCOL_ERROR, "protocol error");
        self.connection_ended(Cause::Protocol(what), Disposition::Reconnect, None);
    }

    /// Counts a failed attempt and waits out the backoff, or gives up.
    /// `exact` overrides the delay (rotation, token refresh).
    fn schedule_retry(&mut self, cause: Cause, exact: Option<Duration>) {
        // Offline, an attempt cannot succeed: it is not held against the
        // server, nor against the attempt limit.
        if !self.offline {
            self.failures = self.failures.saturating_add(1);
        }
        if let Some(max) = self.config.backoff.max_attempts {
            if self.failures > max {
                self.set_state(State::Failed {
                    reason: FailReason::TooManyAttempts {
                        attempts: self.failures - 1,
                        last: cause,
                    },
                });
                return;
            }
        }
        let delay = match exact {
            Some(d) => d,
            None => {
                let backoff = self
                    .config
                    .backoff
                    .delay(self.failures.max(1), &mut self.rng);
                match self.retry_hint.take() {
                    Some(hint) if hint > backoff => {
                        hint + jitter_for_hint(&self.config.backoff.jitter, hint, &mut self.rng)
                    }
                    _ => backoff,
                }
            }
        };
        let at = self.now + delay;
        self.timers.set(Timer::Backoff, at);
        self.set_state(State::Reconnecting {
            attempt: self.failures,
            at,
            cause,
        });
    }

    pub(super) fn finish_closed(&mut self, code: CloseCode) {
        self.forget_connection();
        self.timers.stop(Timer::Backoff);
        self.discard_session(LostReason::Closed, true);
        self.set_state(State::Closed { code });
    }

    /// Gives up the session: reports what is at stake and restarts numbering.
    /// `drop_waiting` also drops (and reports) messages never sent.
    pub(super) fn discard_session(&mut self, reason: LostReason, drop_waiting: bool) {
        let unconfirmed = self.link.outbound.reset_session();
        let unsent = if drop_waiting {
            self.link.outbound.drain_waiting()
        } else {
            Vec::new()
        };
        // The streams belonged to the lost session: a new one starts them
        // again from its joins.
        self.streams.clear();
        self.leaving.clear();
        if !matches!(reason, LostReason::Closed) {
            // Membership belonged to the lost session: ask again, first
            // thing, for the rooms the `hello` did not already ask for.
            let asked = std::mem::take(&mut self.hello_rooms);
            for room in self.rooms.iter().rev().filter(|r| !asked.contains(r)) {
                self.link.outbound.push_front_system(Waiting {
                    id: MessageId::SYSTEM,
                    ts: None,
                    kind: MsgKind::Join,
                    room: Some(room.clone()),
                    payload: Payload::null(),
                    own: true,
                });
            }
        } else {
            self.rooms.clear();
        }
        // Writes to synced maps sent and not confirmed: the new session's
        // snapshots say what the server has.
        self.maps_session_lost(&unconfirmed);
        let still_queued = self.link.outbound.waiting_ids();
        let error = match reason {
            LostReason::Closed => RequestError::Closed,
            _ => RequestError::SessionLost,
        };
        self.link.inbound.reset_session();
        let had_session = self.session.take().is_some();
        // A replaced session always matters (server-side state is gone); a
        // closed one only if messages were at stake.
        let replaced = had_session && !matches!(reason, LostReason::Closed);
        if replaced || !unconfirmed.is_empty() || !unsent.is_empty() {
            self.stats.sessions_lost += 1;
            self.emit(Event::SessionLost {
                reason,
                unconfirmed,
                unsent,
            });
        }
        self.fail_requests(error, &still_queued);
    }
}

/// Jitter added on top of a server's retry-after hint, so that every client
/// told "come back in 10 s" does not come back in exactly 10 s.
fn jitter_for_hint(jitter: &Jitter, hint: Duration, rng: &mut Rng) -> Duration {
    let span = match jitter {
        Jitter::None => return Duration::ZERO,
        Jitter::Proportional(f) if f.is_finite() && *f > 0.0 => {
            crate::backoff::scale(hint, f.min(10.0))
        }
        Jitter::Proportional(_) => return Duration::ZERO,
        Jitter::Full => hint / 2,
    };
    let nanos = u64::try_from(span.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.below_inclusive(nanos))
}
