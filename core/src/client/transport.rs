//! Which transport a client's next connection takes: WebSocket, or the HTTP
//! fallback (PROTOCOL.md, section 1.1) once upgrades were found blocked on
//! the way; and when a client carried by the fallback tries WebSocket again.
//!
//! Owns only that choice, as a small machine driven by the caller's time:
//! which answers to an upgrade mean "blocked" ([`upgrade_blocked`]), how
//! long the finding is remembered, and when a probe is due. It never opens
//! anything and never reads a clock; the drivers (the Rust one and the
//! browser's) carry it out, so that the rule lives once.

use core::time::Duration;

use crate::time::Instant;

/// The transports a client may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Transports {
    /// WebSocket, and the HTTP fallback when upgrades are blocked.
    #[default]
    Auto,
    /// WebSocket only.
    WebSocket,
    /// The HTTP fallback only.
    Http,
}

/// What carries a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// A WebSocket.
    WebSocket,
    /// The HTTP fallback: polls and sends.
    Http,
}

/// Whether an upgrade answered with HTTP `status` (instead of `101`) was
/// blocked on the way rather than refused by the server: a `426` (a proxy
/// stripped the `Upgrade` header, and the server saw a plain request), or
/// any status without the server's refusal header (a proxy answered).
/// A Kitestring server's own refusals (401, 403, 503, ...) carry the
/// header and are not blocks.
pub fn upgrade_blocked(status: u16, server_refusal: bool) -> bool {
    status == 426 || (status != 101 && !server_refusal)
}

/// The transport choice of one client.
#[derive(Clone, Debug)]
pub struct TransportChoice {
    allowed: Transports,
    memory: Duration,
    /// Upgrades were found blocked; remembered until then.
    blocked_until: Option<Instant>,
}

impl TransportChoice {
    /// A choice among `allowed`, remembering a block for `memory`.
    pub fn new(allowed: Transports, memory: Duration) -> Self {
        TransportChoice {
            allowed,
            memory,
            blocked_until: None,
        }
    }

    /// The transport a new connection tries first.
    pub fn first(&self, now: Instant) -> TransportKind {
        match self.allowed {
            Transports::WebSocket => TransportKind::WebSocket,
            Transports::Http => TransportKind::Http,
            Transports::Auto if self.blocked_until.is_some_and(|t| now < t) => TransportKind::Http,
            Transports::Auto => TransportKind::WebSocket,
        }
    }

    /// Whether a WebSocket attempt that failed this way may fall back to
    /// HTTP: only under [`Transports::Auto`], and only for a block.
    pub fn may_fall_back(&self, blocked: bool) -> bool {
        self.allowed == Transports::Auto && blocked
    }

    /// Upgrades are blocked (an upgrade was, and the fallback worked, or a
    /// probe was blocked again): connect over HTTP until `memory` passes.
    pub fn blocked(&mut self, now: Instant) {
        if self.allowed == Transports::Auto {
            self.blocked_until = Some(now + self.memory);
        }
    }

    /// An upgrade went through: WebSocket from now on.
    pub fn unblocked(&mut self) {
        self.blocked_until = None;
    }

    /// While a connection is carried by the fallback: when a probe (a bare
    /// upgrade, closed at once) should test whether WebSocket works again.
    /// `None` if the client may not move.
    pub fn probe_at(&self, on: TransportKind) -> Option<Instant> {
        match (self.allowed, on) {
            (Transports::Auto, TransportKind::Http) => {
                Some(self.blocked_until.unwrap_or(Instant::ZERO))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Instant {
        Instant::ZERO + Duration::from_secs(s)
    }

    #[test]
    fn blocks_are_remembered_then_probed() {
        let mut c = TransportChoice::new(Transports::Auto, Duration::from_secs(60));
        assert_eq!(c.first(at(0)), TransportKind::WebSocket);
        assert!(c.may_fall_back(true));
        assert!(!c.may_fall_back(false));
        c.blocked(at(10));
        assert_eq!(c.first(at(69)), TransportKind::Http);
        assert_eq!(c.probe_at(TransportKind::Http), Some(at(70)));
        assert_eq!(c.probe_at(TransportKind::WebSocket), None);
        assert_eq!(c.first(at(70)), TransportKind::WebSocket);
        // A probe blocked again: another period.
        c.blocked(at(70));
        assert_eq!(c.probe_at(TransportKind::Http), Some(at(130)));
        c.unblocked();
        assert_eq!(c.first(at(71)), TransportKind::WebSocket);
    }

    #[test]
    fn fixed_choices_never_move() {
        let mut ws = TransportChoice::new(Transports::WebSocket, Duration::from_secs(60));
        ws.blocked(at(0));
        assert_eq!(ws.first(at(1)), TransportKind::WebSocket);
        assert!(!ws.may_fall_back(true));
        let http = TransportChoice::new(Transports::Http, Duration::from_secs(60));
        assert_eq!(http.first(at(0)), TransportKind::Http);
        assert_eq!(http.probe_at(TransportKind::Http), None);
    }

    #[test]
    fn only_answers_without_the_servers_mark_are_blocks() {
        assert!(upgrade_blocked(426, true));
        assert!(upgrade_blocked(426, false));
        assert!(upgrade_blocked(400, false));
        assert!(upgrade_blocked(403, false));
        assert!(upgrade_blocked(200, false));
        assert!(!upgrade_blocked(401, true));
        assert!(!upgrade_blocked(403, true));
        assert!(!upgrade_blocked(503, true));
        assert!(!upgrade_blocked(101, false));
    }
}
