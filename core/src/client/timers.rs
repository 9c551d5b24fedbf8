//! The client's timers, and what each does when it fires.
//!
//! Owns [`Timer`] (one slot per kind in the client's timer table),
//! [`Deadline`], the list of timers that belong to one connection and die
//! with it, the mapping of the delivery pipe's three timers onto the table,
//! and `on_timer`, which hands each expiry to the code that owns it. It never
//! reads a clock: `handle_timeout` passes the time in and pops what expired,
//! and `poll_timeout` reports the earliest slot.

use crate::close::{CloseCode, Disposition};
use crate::link::{LinkTimer, LinkTimers};
use crate::time::Instant;
use crate::timer::{TimerKind, TimerTable};

use super::{Cause, Client, State};

/// The client machine's timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Timer {
    /// The transport must be open and welcomed by now.
    Connect,
    /// The backoff delay is over: start the next attempt.
    Backoff,
    /// Send the next ping.
    Ping,
    /// Something must have arrived since the last ping by now.
    Liveness,
    /// The connection has been open long enough to reset the attempt counter.
    Stability,
    /// Send a standalone acknowledgment.
    AckDelay,
    /// The oldest unacknowledged message has waited too long.
    AckTimeout,
    /// A local close has waited long enough for the transport.
    Close,
    /// The earliest pending request times out.
    Request,
    /// The batch being collected goes out.
    Batch,
    /// A value held by `send_latest` goes out.
    Coalesce,
}

impl TimerKind for Timer {
    const COUNT: usize = 11;
    const ALL: &'static [Timer] = &[
        Timer::Connect,
        Timer::Backoff,
        Timer::Ping,
        Timer::Liveness,
        Timer::Stability,
        Timer::AckDelay,
        Timer::AckTimeout,
        Timer::Close,
        Timer::Request,
        Timer::Batch,
        Timer::Coalesce,
    ];
    fn index(self) -> usize {
        self as usize
    }
}

/// Timers that belong to one connection and die with it.
pub(super) const CONNECTION_TIMERS: [Timer; 8] = [
    Timer::Batch,
    Timer::Connect,
    Timer::Ping,
    Timer::Liveness,
    Timer::Stability,
    Timer::AckDelay,
    Timer::AckTimeout,
    Timer::Close,
];

/// The next deadline and why it is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    /// When to call `handle_timeout`.
    pub at: Instant,
    /// Which timer.
    pub timer: Timer,
}

/// The client's timer table.
pub(super) type Timers = TimerTable<Timer, 11>;

impl LinkTimers for Timers {
    fn is_set(&self, timer: LinkTimer) -> bool {
        TimerTable::is_set(self, Timer::of(timer))
    }
    fn set(&mut self, timer: LinkTimer, at: Instant) {
        TimerTable::set(self, Timer::of(timer), at);
    }
    fn stop(&mut self, timer: LinkTimer) {
        TimerTable::stop(self, Timer::of(timer));
    }
}

impl Timer {
    fn of(timer: LinkTimer) -> Timer {
        match timer {
            LinkTimer::AckDelay => Timer::AckDelay,
            LinkTimer::Batch => Timer::Batch,
            LinkTimer::AckTimeout => Timer::AckTimeout,
        }
    }
}

impl Client {
    pub(super) fn on_timer(&mut self, timer: Timer) {
        match timer {
            Timer::Connect => {
                if matches!(
                    self.state,
                    State::Connecting { .. } | State::Handshaking { .. }
                ) {
                    self.url_hello_unanswered(None);
                    self.drop_connection(CloseCode::RETRY, "connect timeout");
                    self.connection_ended(Cause::ConnectTimeout, Disposition::Reconnect, None);
                }
            }
            Timer::Backoff => {
                if matches!(self.state, State::Reconnecting { .. }) {
                    self.start_attempt();
                }
            }
            Timer::Ping => self.send_ping(),
            Timer::Liveness => self.check_liveness(),
            Timer::Stability => {
                self.failures = 0;
                self.auth_retry_used = false;
            }
            Timer::AckDelay => self.flush_ack(),
            Timer::AckTimeout => self.check_ack_timeout(),
            Timer::Request => self.expire_requests(),
            Timer::Batch => self.send_batch(),
            Timer::Coalesce => self.release_latest(false),
            Timer::Close => {
                if self.state == State::Closing {
                    self.transport = None;
                    self.finish_closed(CloseCode::NORMAL);
                }
            }
        }
    }
}
