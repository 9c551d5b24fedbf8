//! Flood protection: each connection's rate limit, charged for each client
//! message and datagram it would hand over (`admit`) and applied under its
//! policy; what it did, reported once per interval
//! ([`RATE_REPORT_INTERVAL`], [`ServerEvent::RateLimited`]); the reading
//! pause under [`RateLimitPolicy::Throttle`]
//! ([`Server::read_paused_until`]); and refusing a client message by its id
//! (`refuse_msg`), which invalid messages and room refusals use too.
//!
//! It decides about one message at a time, and closes a connection only
//! under a policy that says so. A refused message is answered by its id in
//! the session's stream; when the session's buffers cannot hold the
//! refusal, the session ends instead.

use core::time::Duration;

use crate::ratelimit::{Limit, RateDecision, RateLimitPolicy};
use crate::reliable::{MessageId, Outgoing, RoomName};
use crate::rooms::Refusal;
use crate::time::Instant;
use crate::wire::{MsgKind, Payload, SessionId};

use super::conn::ConnPhase;
use super::{ConnectionId, Server, ServerEvent, ServerTimer};

/// How often a rate-limited connection is reported
/// ([`ServerEvent::RateLimited`]).
pub const RATE_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// A connection's rate limiting since it was last reported.
#[derive(Debug, Default)]
pub(super) struct Limited {
    /// Reading pauses until then ([`RateLimitPolicy::Throttle`]).
    paused_until: Option<Instant>,
    /// Messages read late, refused, and datagrams dropped since the report.
    delayed: u64,
    refused: u64,
    datagrams_dropped: u64,
    limit: Option<Limit>,
    /// Whether a report is due (its timer is armed).
    report_armed: bool,
}

/// What the rate limit decided for one message.
pub(super) enum Admission {
    Admit,
    Refuse(Limit),
    Closed,
}

impl Server {
    /// Charges a message to its connection's rate limit, and says what to
    /// do with it under the policy (PROTOCOL.md, section 9).
    pub(super) fn admit(
        &mut self,
        connection: ConnectionId,
        bytes: usize,
        datagram: bool,
    ) -> Admission {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(&connection) else {
            return Admission::Closed;
        };
        let Some(limiter) = conn.limiter.as_mut() else {
            return Admission::Admit;
        };
        let policy = limiter.config().policy;
        let (admission, limit) = if policy == RateLimitPolicy::Throttle {
            let Some((wait, limit)) = limiter.throttle(now, bytes) else {
                return Admission::Admit;
            };
            let limited = conn.limited.get_or_insert_with(Default::default);
            limited.paused_until = Some(now + wait);
            limited.delayed += 1;
            (Admission::Admit, limit)
        } else {
            let RateDecision::Exceeded { which, .. } = limiter.check(now, bytes) else {
                return Admission::Admit;
            };
            if let Some(code) = policy.close_code() {
                self.stats.rate_limited += 1;
                self.disconnect(connection, code, "rate limit exceeded");
                return Admission::Closed;
            }
            let limited = conn.limited.get_or_insert_with(Default::default);
            if datagram {
                limited.datagrams_dropped += 1;
            } else {
                limited.refused += 1;
            }
            (Admission::Refuse(which), which)
        };
        self.stats.rate_limited += 1;
        let limited = conn.limited.get_or_insert_with(Default::default);
        limited.limit = Some(limit);
        if !limited.report_armed {
            limited.report_armed = true;
            self.arm(
                now + RATE_REPORT_INTERVAL,
                ServerTimer::RateReport(connection),
            );
        }
        admission
    }

    /// Reports what a connection's rate limit did in the interval just
    /// ended.
    pub(super) fn report_rate(&mut self, connection: ConnectionId) {
        let Some(conn) = self.conns.get_mut(&connection) else {
            return;
        };
        let ConnPhase::Open { session, .. } = conn.phase else {
            return;
        };
        let Some(limited) = conn.limited.as_mut() else {
            return;
        };
        let paused_until = limited.paused_until.filter(|&t| t > self.now);
        let report = std::mem::replace(
            limited.as_mut(),
            Limited {
                paused_until,
                ..Limited::default()
            },
        );
        if paused_until.is_none() {
            conn.limited = None;
        }
        if let Some(limit) = report.limit {
            self.emit(ServerEvent::RateLimited {
                connection,
                session,
                delayed: report.delayed,
                refused: report.refused,
                datagrams_dropped: report.datagrams_dropped,
                limit,
            });
        }
    }

    /// When reading `connection` may resume, if its rate limit paused it
    /// ([`RateLimitPolicy::Throttle`]): the driver reads nothing more from
    /// it before then, so a flooding client is slowed by its own transport
    /// instead of having its messages dropped.
    pub fn read_paused_until(&self, connection: ConnectionId) -> Option<Instant> {
        self.conns
            .get(&connection)?
            .limited
            .as_ref()?
            .paused_until
            .filter(|&t| t > self.now)
    }

    /// Refuses a client message that was consumed (its sequence number is
    /// used) but will never be handed over: the client hears of it by the
    /// message's id, in the session's stream, before any acknowledgment
    /// covers it (PROTOCOL.md, section 3.3).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn refuse_msg(
        &mut self,
        session: SessionId,
        seq: u64,
        id: MessageId,
        room: Option<RoomName>,
        op: &str,
        code: &'static str,
        reason: String,
    ) {
        self.stats.refused += 1;
        let refusal = Refusal {
            op: op.to_owned(),
            reason,
            code: Some(code.to_owned()),
        };
        let Ok(payload) = serde_json::to_vec(&refusal)
            .map_err(|_| ())
            .and_then(|j| Payload::json(j).map_err(|_| ()))
        else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        // The refusal's id is the next one given out. A join of the
        // `hello` (sequence number 0) holds nothing back.
        if seq != 0 {
            s.link.inbound.hold(seq, self.next_id);
        }
        let mut refusal = Outgoing::new(MsgKind::RefusedMessage(id.0), payload).own();
        refusal.room = room;
        match self.enqueue_raw(session, refusal) {
            Ok(_) => {}
            // Buffers full: the session ends and the client hears of the
            // message as unconfirmed instead.
            Err(_) => {
                if !self.evictions.contains(&session) {
                    self.evictions.push(session);
                }
            }
        }
    }
}
