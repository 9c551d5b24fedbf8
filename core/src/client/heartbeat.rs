//! Liveness: pings, pongs, and the acknowledgment timeout.
//!
//! Owns sending pings at the interval the welcome set, round-trip times
//! from their pongs, the liveness check (with a grace for a process that was
//! asleep) and the check that sent messages are acknowledged in time. Any
//! inbound message counts as a sign of life (`handle_message` records it),
//! not only a pong. A check that fails drops the connection and hands it to
//! `connection_ended`; nothing here changes the session or its messages.

use crate::close::{CloseCode, Disposition};
use crate::time::Instant;
use crate::wire::Frame;

use super::{Cause, Client, Event, State, Timer};

impl Client {
    pub(super) fn send_ping(&mut self) {
        let Some(conn) = &mut self.conn else { return };
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        conn.ping = Some((nonce, self.now));
        let interval = conn.ping_interval;
        let timeout = conn.pong_timeout;
        if !self.timers.is_set(Timer::Liveness) {
            self.timers.set(Timer::Liveness, self.now + timeout);
        }
        self.timers.set(Timer::Ping, self.now + interval);
        self.transmit(&Frame::Ping { nonce });
    }

    pub(super) fn check_liveness(&mut self) {
        let grace = self.config.heartbeat.grace;
        let Some(conn) = &mut self.conn else { return };
        let ping_sent = conn.ping.map_or(Instant::ZERO, |(_, at)| at);
        if conn.last_rx >= ping_sent {
            return;
        }
        if !conn.in_grace && !grace.is_zero() {
            // The deadline may be overdue because the process was asleep; give
            // frames already waiting in the socket a chance to be read first.
            conn.in_grace = true;
            self.timers.set(Timer::Liveness, self.now + grace);
            return;
        }
        self.drop_connection(CloseCode::HEARTBEAT_TIMEOUT, "heartbeat timeout");
        self.connection_ended(Cause::HeartbeatTimeout, Disposition::Reconnect, None);
    }

    pub(super) fn check_ack_timeout(&mut self) {
        if self.state != State::Open {
            return;
        }
        let timeout = self.config.reliability.ack_timeout;
        if self.link.ack_timed_out(self.now, &mut self.timers, timeout) {
            self.drop_connection(CloseCode::ACK_TIMEOUT, "ack timeout");
            self.connection_ended(Cause::AckTimeout, Disposition::Reconnect, None);
        }
    }

    pub(super) fn on_pong(&mut self, nonce: u64) {
        let Some(conn) = &mut self.conn else { return };
        if let Some((expected, sent)) = conn.ping {
            if expected == nonce {
                conn.ping = None;
                let rtt = self.now.saturating_duration_since(sent);
                self.rtt = Some(rtt);
                self.emit(Event::Rtt(rtt));
            }
        }
    }
}
