//! The lag bound ([`ServerConfig::max_lag`]): how far behind in time a
//! connection reads, measured in-band, and the slow consumer it makes of
//! a member that falls further behind than the bound while its client
//! keeps sending.
//!
//! Owns each open connection's `LagProbe` and the [`ServerTimer::Lag`]
//! timer. A probe is a `ping` with a nonce of its own; the client answers
//! every `ping` with a `pong` after reading everything written before it
//! (PROTOCOL.md, section 7), and the connection's frames go out in order
//! (a driver serving room feeds writes the entries published before a
//! frame ahead of it), so the `pong` comes back only once the client has
//! read up to the probe. At most one probe is outstanding per connection,
//! sent only while it can tell something (the session is in a room or has
//! messages in flight or queued) and at least `max_lag / 4` after the last
//! one was answered: a connection in no room with nothing in flight gets
//! neither probes nor timer wake-ups.
//!
//! It never ends a session whose client is silent: a probe unanswered for
//! `max_lag` ends it only if the client was heard from since the probe and
//! is awake (heard within the last `max_lag / 2`, or its next frame comes
//! without a pause); a silent peer is the idle check's (`check_idle`,
//! conn.rs: 4008, the session kept for a resume). A client heard again
//! after a pause (it slept, or lost its network) gets `max_lag` anew from
//! then: always after a silence longer than a live client keeps (`silence`),
//! and once per probe after a shorter one, so a laptop that wakes and reads
//! what waited for it keeps its session. It never reads a clock and ends a
//! session only through `end_session` (session.rs), exactly as a
//! count-based eviction does.
//!
//! [`ServerConfig::max_lag`]: crate::config::ServerConfig::max_lag

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use core::time::Duration;

use crate::close::CloseCode;
use crate::config::ServerConfig;
use crate::time::Instant;
use crate::wire::{Frame, SessionId};

use super::conn::ConnPhase;
use super::handshake::spread_hash;
use super::{ConnectionId, Server, ServerTimer, SessionEnd};

/// Nonces of lag probes lie in `2^52..2^53`: exact as a JSON number in
/// any client (a JavaScript number holds integers below `2^53`), and far
/// above the server's other pings, whose nonce is its clock in
/// milliseconds.
const NONCE_BASE: u64 = 1 << 52;

/// One connection's lag probe: created when the connection first has
/// something to measure, dropped with the connection.
#[derive(Debug)]
pub(super) struct LagProbe {
    /// The [`ServerTimer::Lag`] deadline in force (the heap may hold older
    /// ones, which are ignored); [`Instant::MAX`]: none, the connection is
    /// not watched (nothing to measure, or an overdue probe waits for the
    /// client's next frame).
    due: Instant,
    /// The outstanding probe's nonce; 0: none outstanding.
    nonce: u64,
    /// When the outstanding probe was sent; with none, when the last one
    /// was answered (or watching began).
    sent: Instant,
    /// Since when the outstanding probe's wait counts: `sent`, or when the
    /// client was heard again after a silence (it slept).
    clock: Instant,
    /// The outstanding probe waited `max_lag` and the client was not
    /// heard from since, or not lately: its next frame decides.
    overdue: bool,
    /// The outstanding probe's wait started again after a pause shorter
    /// than [`silence`] (once per probe).
    restarted: bool,
    /// Probes sent on the connection (each nonce differs).
    probes: u32,
    /// The delay of the last probe answered.
    measured: Option<Duration>,
}

impl LagProbe {
    fn new(now: Instant) -> LagProbe {
        LagProbe {
            due: Instant::MAX,
            nonce: 0,
            sent: now,
            clock: now,
            overdue: false,
            restarted: false,
            probes: 0,
            measured: None,
        }
    }

    /// How far behind the connection reads: the last probe's delay, or the
    /// outstanding one's wait if longer.
    pub(super) fn lag(&self, now: Instant) -> Option<Duration> {
        let waiting = (self.nonce != 0).then(|| now.saturating_duration_since(self.sent));
        match (self.measured, waiting) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// A frame arrived on the connection at `now`, `gap` after the one
    /// before. After a pause (the client slept: a [`silence`], or, once
    /// per probe, a gap longer than [`awake`] while the probe is overdue)
    /// the outstanding probe's wait starts again; otherwise returns
    /// whether the probe is overdue: the client is awake and behind, a
    /// slow consumer unless this frame is the probe's `pong`.
    pub(super) fn heard(
        &mut self,
        now: Instant,
        gap: Duration,
        config: &ServerConfig,
        heap: &mut BinaryHeap<Reverse<(Instant, ServerTimer)>>,
        connection: ConnectionId,
    ) -> bool {
        if self.nonce == 0 {
            return false;
        }
        let Some(max_lag) = config.max_lag else {
            return false;
        };
        let paused = self.overdue && !self.restarted && gap > awake(config, max_lag);
        if gap > silence(config) || paused {
            self.clock = now;
            if self.overdue {
                self.overdue = false;
                self.restarted = true;
                self.due = now + max_lag;
                heap.push(Reverse((self.due, ServerTimer::Lag(connection))));
            }
            return false;
        }
        self.overdue
    }
}

/// A client heard from again after a silence longer than this slept (or
/// lost its network) rather than fell behind: halfway from the ping
/// interval (a live client sends at least its `ping` that often) to the
/// idle timeout (after which it is taken for dead).
fn silence(config: &ServerConfig) -> Duration {
    let ping = config.ping_interval;
    ping + config.idle_timeout.saturating_sub(ping) / 2
}

/// A client heard from within this is awake: half the bound, and never
/// more than a [`silence`].
fn awake(config: &ServerConfig, max_lag: Duration) -> Duration {
    (max_lag / 2).min(silence(config))
}

impl Server {
    /// Whether a probe on `session`'s connection can tell something: it is
    /// in a room, or has messages in flight or queued.
    pub(super) fn lag_worth(&self, session: SessionId) -> bool {
        self.sessions.get(&session).is_some_and(|s| {
            !s.rooms.is_empty()
                || s.link.outbound.in_flight() > 0
                || s.link.outbound.waiting_len() > 0
        })
    }

    /// `session` has something to measure (it attached, joined a room, or
    /// was given a message): its connection's lag timer is armed unless it
    /// is already, or a probe is outstanding.
    pub(super) fn watch_lag(&mut self, session: SessionId) {
        let Some(max_lag) = self.config.max_lag else {
            return;
        };
        let Some(c) = self
            .sessions
            .get(&session)
            .and_then(|s| s.state.connection())
        else {
            return;
        };
        let now = self.now;
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        if !matches!(conn.phase, ConnPhase::Open { .. }) {
            return;
        }
        let lag = conn.lag.get_or_insert_with(|| Box::new(LagProbe::new(now)));
        if lag.due != Instant::MAX || lag.nonce != 0 {
            return;
        }
        let at = (lag.sent + max_lag / 4).max(now);
        lag.due = at;
        self.arm(at, ServerTimer::Lag(c));
    }

    /// [`ServerTimer::Lag`]: sends the connection's next probe when it is
    /// due and can tell something (else stops watching until
    /// [`watch_lag`](Self::watch_lag)); judges the outstanding one once it
    /// has waited `max_lag`.
    pub(super) fn on_lag_timer(&mut self, c: ConnectionId, at: Instant) {
        let Some(max_lag) = self.config.max_lag else {
            return;
        };
        let now = self.now;
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        let ConnPhase::Open { session, .. } = conn.phase else {
            return;
        };
        let last_rx = conn.last_rx;
        let Some(lag) = conn.lag.as_deref_mut() else {
            return;
        };
        if lag.due != at {
            return;
        }
        lag.due = Instant::MAX;
        if lag.nonce != 0 {
            let until = lag.clock + max_lag;
            if now < until {
                // The client was heard again after a silence: its wait
                // started again.
                lag.due = until;
                self.arm(until, ServerTimer::Lag(c));
                return;
            }
            let heard = last_rx > lag.clock;
            let lately = now.saturating_duration_since(last_rx) <= awake(&self.config, max_lag);
            if heard && lately {
                self.evict_lagging(session);
            } else {
                // Not heard from since the probe, or not lately: the idle
                // check finds a dead peer, and the next frame of a live
                // one decides.
                lag.overdue = true;
            }
            return;
        }
        let due = lag.sent + max_lag / 4;
        if now < due {
            lag.due = due;
            self.arm(due, ServerTimer::Lag(c));
            return;
        }
        if !self.lag_worth(session) {
            return;
        }
        let Some(lag) = self
            .conns
            .get_mut(&c)
            .and_then(|conn| conn.lag.as_deref_mut())
        else {
            return;
        };
        lag.probes = lag.probes.wrapping_add(1);
        let mix = c.0 ^ (u64::from(lag.probes) << 32) ^ now.as_nanos();
        let nonce = NONCE_BASE | (spread_hash(mix) & (NONCE_BASE - 1));
        lag.nonce = nonce;
        lag.sent = now;
        lag.clock = now;
        lag.overdue = false;
        lag.restarted = false;
        lag.due = now + max_lag;
        let at = lag.due;
        self.arm(at, ServerTimer::Lag(c));
        self.stats.lag_probes += 1;
        self.transmit(c, &Frame::Ping { nonce });
    }

    /// A `pong` on an open connection: if it answers the outstanding probe,
    /// the delay is recorded and the next probe is due `max_lag / 4` from
    /// now. Any other nonce (an answer to the server's other pings, or a
    /// forged one) changes nothing here.
    pub(super) fn on_pong(&mut self, c: ConnectionId, nonce: u64) {
        let Some(max_lag) = self.config.max_lag else {
            return;
        };
        let now = self.now;
        let Some(lag) = self
            .conns
            .get_mut(&c)
            .and_then(|conn| conn.lag.as_deref_mut())
        else {
            return;
        };
        if lag.nonce == 0 || lag.nonce != nonce {
            return;
        }
        lag.measured = Some(now.saturating_duration_since(lag.sent));
        lag.nonce = 0;
        lag.overdue = false;
        lag.sent = now;
        lag.due = now + max_lag / 4;
        let at = lag.due;
        self.arm(at, ServerTimer::Lag(c));
    }

    /// A frame arrived on `c` while its probe was overdue, from a client
    /// that had not gone silent (`LagProbe::heard`): unless the frame was
    /// the probe's `pong`, the client is alive and reading, just behind.
    pub(super) fn lag_heard(&mut self, c: ConnectionId) {
        let Some(conn) = self.conns.get(&c) else {
            return;
        };
        let ConnPhase::Open { session, .. } = conn.phase else {
            return;
        };
        if conn
            .lag
            .as_deref()
            .is_some_and(|lag| lag.nonce != 0 && lag.overdue)
        {
            self.evict_lagging(session);
        }
    }

    /// Ends a session whose connection reads further behind than
    /// `max_lag`, as a count-based eviction ends a slow consumer.
    fn evict_lagging(&mut self, session: SessionId) {
        if !self.sessions.contains_key(&session) {
            return;
        }
        self.stats.lag_evictions += 1;
        let close = (
            CloseCode::SLOW_CONSUMER,
            "slow consumer: behind by more than max_lag",
        );
        self.end_session(session, SessionEnd::SlowConsumer, Some(close));
    }
}
