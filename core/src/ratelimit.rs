//! Per-connection rate limits on messages and bytes.
//!
//! This module owns [`RateLimiter`], two token buckets (one counting messages,
//! one counting bytes) that decide whether an inbound message may be
//! processed, and what to do when it may not ([`RateLimitPolicy`]). It never
//! reads a clock, never sleeps and never queues: the caller passes the time
//! and the message size, gets a [`RateDecision`] back (or, to push back, a
//! time to stop reading from [`RateLimiter::throttle`]), and acts on it:
//! read the connection later, refuse the message by id, or close the
//! connection with code 1008.
//!
//! # Arithmetic
//!
//! Buckets are kept in fixed point: one token is 10⁹ units, so a rate of `r`
//! tokens per second adds exactly `r` units per nanosecond of [`Instant`].
//! Everything is integer arithmetic on `u128`, with no rounding except one
//! ceiling when computing `retry_after`, so the same inputs always give the
//! same decisions on every platform, and no amount of elapsed time can
//! overflow.
//!
//! # Zero rates
//!
//! A zero rate or a zero burst is refused by [`RateLimitConfig::validate`]
//! (and so by [`RateLimiter::new`]). Reading zero as "unlimited" would turn a
//! miscomputed limit into no limit at all, and reading it as "nothing allowed"
//! would make a connection useless; neither is worth guessing. To leave one
//! dimension effectively unlimited, set its rate and burst to their maximum
//! values.
//!
//! ```
//! use core::time::Duration;
//! use kitestring_core::ratelimit::{Limit, RateDecision, RateLimitConfig, RateLimitPolicy, RateLimiter};
//! use kitestring_core::Instant;
//!
//! let config = RateLimitConfig {
//!     messages_per_sec: 10,
//!     message_burst: 2,
//!     bytes_per_sec: 1_000,
//!     byte_burst: 1_000,
//!     policy: RateLimitPolicy::Refuse,
//! };
//! let t0 = Instant::from_secs(1);
//! let mut limiter = RateLimiter::new(config, t0).unwrap();
//! assert_eq!(limiter.check(t0, 10), RateDecision::Allow);
//! assert_eq!(limiter.check(t0, 10), RateDecision::Allow);
//! assert_eq!(
//!     limiter.check(t0, 10),
//!     RateDecision::Exceeded {
//!         policy: RateLimitPolicy::Refuse,
//!         retry_after: Duration::from_millis(100),
//!         which: Limit::Messages,
//!     }
//! );
//! assert_eq!(limiter.check(t0 + Duration::from_millis(100), 10), RateDecision::Allow);
//! ```

use core::time::Duration;

use crate::close::CloseCode;
use crate::time::Instant;

/// Fixed-point units per token; also nanoseconds per second, which is what
/// makes a rate in tokens per second a rate in units per nanosecond.
const UNIT: u128 = 1_000_000_000;

/// What to do with a connection that exceeds its limits. No policy drops
/// a reliable message silently: it is processed late, refused by id, or the
/// connection is closed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RateLimitPolicy {
    /// Push back: every message is processed, and the connection is not
    /// read again until the limits allow what it sent
    /// ([`RateLimiter::throttle`]). The sender's own flow control (TCP,
    /// then its send window) slows it down; nothing is refused or lost.
    #[default]
    Throttle,
    /// Refuse each message over the limit: its sequence number is used, it
    /// is not handed to the application, and the sender is told by the
    /// message's id (PROTOCOL.md, section 3.3). Datagrams over the limit are
    /// dropped and counted.
    Refuse,
    /// Close the connection with [`CloseCode::POLICY_VIOLATION`] (1008).
    Close,
}

impl RateLimitPolicy {
    /// The WebSocket close code to send, if the policy closes.
    pub const fn close_code(self) -> Option<CloseCode> {
        match self {
            RateLimitPolicy::Throttle | RateLimitPolicy::Refuse => None,
            RateLimitPolicy::Close => Some(CloseCode::POLICY_VIOLATION),
        }
    }
}

/// Which limit a decision or an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Limit {
    /// The message count.
    Messages,
    /// The byte count.
    Bytes,
}

/// Limits for one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RateLimitConfig {
    /// Sustained messages per second.
    pub messages_per_sec: u32,
    /// Messages that may arrive at once after a quiet period.
    pub message_burst: u32,
    /// Sustained bytes per second.
    pub bytes_per_sec: u64,
    /// Bytes that may arrive at once after a quiet period. It is also the
    /// largest message that can ever pass.
    pub byte_burst: u64,
    /// What to do when a limit is exceeded.
    pub policy: RateLimitPolicy,
}

impl Default for RateLimitConfig {
    /// 1 000 messages per second with bursts of 2 000, 4 MiB per second
    /// with bursts of 8 MiB, throttling what exceeds them: an interactive
    /// client (even one sending 60 updates a second in several rooms) never
    /// meets them, while one connection cannot flood a server.
    fn default() -> Self {
        RateLimitConfig {
            messages_per_sec: 1_000,
            message_burst: 2_000,
            bytes_per_sec: 4 * 1024 * 1024,
            byte_burst: 8 * 1024 * 1024,
            policy: RateLimitPolicy::Throttle,
        }
    }
}

impl RateLimitConfig {
    /// Checks that every rate and burst is non-zero (see the module docs on
    /// zero rates).
    ///
    /// # Errors
    ///
    /// The first zero field found, messages before bytes, rate before burst.
    pub const fn validate(&self) -> Result<(), RateLimitConfigError> {
        if self.messages_per_sec == 0 {
            return Err(RateLimitConfigError::ZeroRate {
                which: Limit::Messages,
            });
        }
        if self.message_burst == 0 {
            return Err(RateLimitConfigError::ZeroBurst {
                which: Limit::Messages,
            });
        }
        if self.bytes_per_sec == 0 {
            return Err(RateLimitConfigError::ZeroRate {
                which: Limit::Bytes,
            });
        }
        if self.byte_burst == 0 {
            return Err(RateLimitConfigError::ZeroBurst {
                which: Limit::Bytes,
            });
        }
        Ok(())
    }
}

/// Why a [`RateLimitConfig`] was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RateLimitConfigError {
    /// A rate of zero per second.
    #[error("rate limit for {which:?} has a zero rate")]
    ZeroRate {
        /// The dimension at fault.
        which: Limit,
    },
    /// A burst of zero.
    #[error("rate limit for {which:?} has a zero burst")]
    ZeroBurst {
        /// The dimension at fault.
        which: Limit,
    },
}

/// The verdict on one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
#[non_exhaustive]
pub enum RateDecision {
    /// Within limits; the message has been counted.
    Allow,
    /// Over a limit; the message has not been counted, so dropping it costs
    /// the connection nothing.
    Exceeded {
        /// The configured policy: what the caller should do now.
        policy: RateLimitPolicy,
        /// How long until a message of the same size would be allowed, if
        /// nothing else arrives. [`Duration::MAX`] means never: the message is
        /// larger than the byte burst.
        retry_after: Duration,
        /// The limit that needs the longer wait (messages on a tie).
        which: Limit,
    },
}

/// One token bucket in fixed point (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bucket {
    level: u128,
    capacity: u128,
    /// Units per nanosecond, which equals tokens per second.
    rate: u128,
}

impl Bucket {
    fn full(rate: u64, burst: u64) -> Self {
        let capacity = u128::from(burst) * UNIT;
        Bucket {
            level: capacity,
            capacity,
            rate: u128::from(rate),
        }
    }

    fn refill(&mut self, elapsed_nanos: u64) {
        // Both factors fit in 64 bits, so the product fits in 128; only the
        // sum can overflow, and it is capped anyway.
        let minted = self.rate * u128::from(elapsed_nanos);
        self.level = self.level.saturating_add(minted).min(self.capacity);
    }

    /// Takes `need` units that are not all there: the bucket is left with
    /// what `wait` more of refilling gives beyond `need` (the caller
    /// restarts the refill clock `wait` later).
    fn borrow(&mut self, need: u128, wait: Duration) {
        let minted = self.rate * wait.as_nanos();
        self.level = self
            .level
            .saturating_add(minted)
            .saturating_sub(need)
            .min(self.capacity);
    }

    /// `None` if `need` units are available now, else how long to wait.
    fn wait_for(&self, need: u128) -> Option<Duration> {
        if self.level >= need {
            return None;
        }
        if need > self.capacity || self.rate == 0 {
            return Some(Duration::MAX);
        }
        let nanos = (need - self.level).div_ceil(self.rate);
        Some(Duration::from_nanos(
            u64::try_from(nanos).unwrap_or(u64::MAX),
        ))
    }
}

/// Token buckets for one connection; see the [module docs](self).
///
/// Both buckets start full. A message is allowed only if both buckets hold
/// enough (one message token, and one byte token per byte); then both are
/// charged. A message that is not allowed charges nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimiter {
    config: RateLimitConfig,
    messages: Bucket,
    bytes: Bucket,
    last: Instant,
}

impl RateLimiter {
    /// A limiter with full buckets at `now`.
    ///
    /// # Errors
    ///
    /// The config's [`validate`](RateLimitConfig::validate) error.
    pub fn new(config: RateLimitConfig, now: Instant) -> Result<Self, RateLimitConfigError> {
        config.validate()?;
        Ok(RateLimiter {
            config,
            messages: Bucket::full(
                u64::from(config.messages_per_sec),
                u64::from(config.message_burst),
            ),
            bytes: Bucket::full(config.bytes_per_sec, config.byte_burst),
            last: now,
        })
    }

    /// The limits in force.
    pub const fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// Decides on a message of `bytes` bytes arriving at `now`, and counts it
    /// if it is allowed.
    ///
    /// If `now` is earlier than a time seen before, no tokens are added and
    /// the limiter keeps its latest time, so a clock that jumps back and forth
    /// cannot mint tokens by replaying the same interval twice.
    pub fn check(&mut self, now: Instant, bytes: usize) -> RateDecision {
        if now > self.last {
            let elapsed = now.as_nanos() - self.last.as_nanos();
            self.messages.refill(elapsed);
            self.bytes.refill(elapsed);
            self.last = now;
        }

        let need_messages = UNIT;
        let need_bytes = u128::try_from(bytes)
            .unwrap_or(u128::MAX)
            .saturating_mul(UNIT);
        let (which, retry_after) = match (
            self.messages.wait_for(need_messages),
            self.bytes.wait_for(need_bytes),
        ) {
            (None, None) => {
                self.messages.level -= need_messages;
                self.bytes.level -= need_bytes;
                return RateDecision::Allow;
            }
            (Some(m), None) => (Limit::Messages, m),
            (None, Some(b)) => (Limit::Bytes, b),
            (Some(m), Some(b)) if b > m => (Limit::Bytes, b),
            (Some(m), Some(_)) => (Limit::Messages, m),
        };
        RateDecision::Exceeded {
            policy: self.config.policy,
            retry_after,
            which,
        }
    }

    /// Counts a message of `bytes` bytes arriving at `now` whatever the
    /// limits say, and returns how long the connection must then wait
    /// before its next message is read, if at all: the time the buckets
    /// need to pay for this one ([`RateLimitPolicy::Throttle`]). A message
    /// larger than the byte burst waits as long as the byte rate takes to
    /// carry it.
    pub fn throttle(&mut self, now: Instant, bytes: usize) -> Option<(Duration, Limit)> {
        match self.check(now, bytes) {
            RateDecision::Allow => None,
            RateDecision::Exceeded { which, .. } => {
                let need_bytes = u128::try_from(bytes)
                    .unwrap_or(u128::MAX)
                    .saturating_mul(UNIT);
                let wait_for = |b: &Bucket, need: u128| -> Duration {
                    if b.level >= need {
                        return Duration::ZERO;
                    }
                    let nanos = (need - b.level).div_ceil(b.rate.max(1));
                    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
                };
                // Measured from the buckets' clock, which runs ahead of
                // `now` while earlier messages are still being paid for.
                let wait = wait_for(&self.messages, UNIT).max(wait_for(&self.bytes, need_bytes));
                self.messages.borrow(UNIT, wait);
                self.bytes.borrow(need_bytes, wait);
                // The refill that pays for this message happens during the
                // wait: the buckets' clock restarts after it.
                self.last = self.last.max(now) + wait;
                Some((self.last.saturating_duration_since(now), which))
            }
        }
    }
}

#[cfg(test)]
// A failed unwrap is a failed test, which is what a test should do.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn config(
        messages_per_sec: u32,
        message_burst: u32,
        bytes_per_sec: u64,
        byte_burst: u64,
    ) -> RateLimitConfig {
        RateLimitConfig {
            messages_per_sec,
            message_burst,
            bytes_per_sec,
            byte_burst,
            policy: RateLimitPolicy::Refuse,
        }
    }

    fn exceeded(which: Limit, retry_after: Duration) -> RateDecision {
        RateDecision::Exceeded {
            policy: RateLimitPolicy::Refuse,
            retry_after,
            which,
        }
    }

    fn ms(millis: u64) -> Instant {
        Instant::from_millis(millis)
    }

    #[test]
    fn burst_passes_then_the_next_message_waits_one_token() {
        let mut limiter = RateLimiter::new(config(4, 3, 1_000_000, 1_000_000), ms(0)).unwrap();
        for _ in 0..3 {
            assert_eq!(limiter.check(ms(0), 1), RateDecision::Allow);
        }
        assert_eq!(
            limiter.check(ms(0), 1),
            exceeded(Limit::Messages, Duration::from_millis(250))
        );
        // One nanosecond early is still too early.
        let almost = ms(250) - Duration::from_nanos(1);
        assert_eq!(
            limiter.check(almost, 1),
            exceeded(Limit::Messages, Duration::from_nanos(1))
        );
        assert_eq!(limiter.check(ms(250), 1), RateDecision::Allow);
        assert!(matches!(
            limiter.check(ms(250), 1),
            RateDecision::Exceeded { .. }
        ));
    }

    #[test]
    fn refill_is_capped_at_the_burst() {
        let mut limiter = RateLimiter::new(config(10, 2, 1_000_000, 1_000_000), ms(0)).unwrap();
        // An hour of silence still only allows the burst.
        let later = Instant::from_secs(3_600);
        assert_eq!(limiter.check(later, 1), RateDecision::Allow);
        assert_eq!(limiter.check(later, 1), RateDecision::Allow);
        assert!(matches!(
            limiter.check(later, 1),
            RateDecision::Exceeded {
                which: Limit::Messages,
                ..
            }
        ));
    }

    #[test]
    fn sustained_rate_matches_the_configuration() {
        let mut limiter = RateLimiter::new(config(100, 1, 1_000_000, 1_000_000), ms(0)).unwrap();
        let mut allowed = 0;
        // A message offered every millisecond for ten seconds.
        for t in 0..10_000 {
            if limiter.check(ms(t), 1) == RateDecision::Allow {
                allowed += 1;
            }
        }
        // The initial token at t=0 plus one every 10 ms after it.
        assert_eq!(allowed, 1_000);
    }

    #[test]
    fn bytes_are_limited_separately() {
        let mut limiter = RateLimiter::new(config(1_000, 1_000, 100, 150), ms(0)).unwrap();
        assert_eq!(limiter.check(ms(0), 100), RateDecision::Allow);
        // 50 bytes left; 80 more need 30 bytes at 100/s = 300 ms.
        assert_eq!(
            limiter.check(ms(0), 80),
            exceeded(Limit::Bytes, Duration::from_millis(300))
        );
        // The refused message charged nothing: 50 bytes still pass.
        assert_eq!(limiter.check(ms(0), 50), RateDecision::Allow);
        assert_eq!(limiter.check(ms(500), 50), RateDecision::Allow);
    }

    #[test]
    fn a_refused_message_charges_neither_bucket() {
        let mut limiter = RateLimiter::new(config(1, 1, 100, 100), ms(0)).unwrap();
        // Too many bytes: refused, and the message token is not spent.
        assert!(matches!(
            limiter.check(ms(0), 101),
            RateDecision::Exceeded {
                which: Limit::Bytes,
                ..
            }
        ));
        assert_eq!(limiter.check(ms(0), 100), RateDecision::Allow);
    }

    #[test]
    fn the_longer_wait_is_reported_when_both_limits_are_hit() {
        let mut limiter = RateLimiter::new(config(1, 1, 100, 100), ms(0)).unwrap();
        assert_eq!(limiter.check(ms(0), 100), RateDecision::Allow);
        // Messages need 1 s, bytes need 10 bytes = 100 ms.
        assert_eq!(
            limiter.check(ms(0), 10),
            exceeded(Limit::Messages, Duration::from_secs(1))
        );
        // Messages need 1 s, bytes need 100 bytes... also 1 s: messages on a tie.
        assert_eq!(
            limiter.check(ms(0), 100),
            exceeded(Limit::Messages, Duration::from_secs(1))
        );
        // More than the byte burst can never pass, however long one waits.
        assert_eq!(
            limiter.check(ms(0), 101),
            exceeded(Limit::Bytes, Duration::MAX)
        );
    }

    #[test]
    fn a_message_larger_than_the_byte_burst_never_passes() {
        let mut limiter = RateLimiter::new(config(10, 10, 1_000, 500), ms(0)).unwrap();
        assert_eq!(
            limiter.check(Instant::from_secs(1_000), 501),
            exceeded(Limit::Bytes, Duration::MAX)
        );
        assert_eq!(
            limiter.check(Instant::from_secs(1_000), 500),
            RateDecision::Allow
        );
    }

    #[test]
    fn time_going_backwards_mints_nothing() {
        let mut limiter = RateLimiter::new(config(1, 1, 1_000, 1_000), ms(10_000)).unwrap();
        assert_eq!(limiter.check(ms(10_000), 1), RateDecision::Allow);
        // Jump back, then forward to the old time: no new token either way.
        assert!(matches!(
            limiter.check(ms(0), 1),
            RateDecision::Exceeded { .. }
        ));
        assert!(matches!(
            limiter.check(ms(10_500), 1),
            RateDecision::Exceeded { .. }
        ));
        assert!(matches!(
            limiter.check(ms(5_000), 1),
            RateDecision::Exceeded { .. }
        ));
        assert_eq!(limiter.check(ms(11_000), 1), RateDecision::Allow);
    }

    #[test]
    fn zero_rates_and_bursts_are_rejected() {
        let ok = config(1, 1, 1, 1);
        assert_eq!(ok.validate(), Ok(()));
        let cases = [
            (
                config(0, 1, 1, 1),
                RateLimitConfigError::ZeroRate {
                    which: Limit::Messages,
                },
            ),
            (
                config(1, 0, 1, 1),
                RateLimitConfigError::ZeroBurst {
                    which: Limit::Messages,
                },
            ),
            (
                config(1, 1, 0, 1),
                RateLimitConfigError::ZeroRate {
                    which: Limit::Bytes,
                },
            ),
            (
                config(1, 1, 1, 0),
                RateLimitConfigError::ZeroBurst {
                    which: Limit::Bytes,
                },
            ),
        ];
        for (cfg, err) in cases {
            assert_eq!(cfg.validate(), Err(err));
            assert_eq!(RateLimiter::new(cfg, ms(0)), Err(err));
        }
        assert_eq!(RateLimitConfig::default().validate(), Ok(()));
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        // The largest message the target can describe (u64::MAX bytes on
        // 64-bit targets, 4 GiB on wasm32): the byte limits are set to it.
        let largest = u64::try_from(usize::MAX).unwrap();
        let max = config(u32::MAX, u32::MAX, largest, largest);
        let mut limiter = RateLimiter::new(max, Instant::ZERO).unwrap();
        assert_eq!(limiter.check(Instant::MAX, usize::MAX), RateDecision::Allow);
        // The byte bucket is empty now; a full refill at that many bytes per
        // second takes one second.
        assert_eq!(
            limiter.check(Instant::MAX, usize::MAX),
            exceeded(Limit::Bytes, Duration::from_secs(1))
        );
        // At one byte a second, the wait is `largest` seconds; one longer
        // than u64 nanoseconds (on 64-bit targets) saturates instead of
        // wrapping.
        let mut slow = RateLimiter::new(config(1, 1, 1, largest), Instant::ZERO).unwrap();
        assert_eq!(slow.check(Instant::ZERO, usize::MAX), RateDecision::Allow);
        assert_eq!(
            slow.check(Instant::ZERO, usize::MAX),
            exceeded(
                Limit::Bytes,
                Duration::from_secs(largest).min(Duration::from_nanos(u64::MAX))
            )
        );
    }

    #[test]
    fn close_policy_carries_code_1008() {
        let mut cfg = config(1, 1, 100, 100);
        cfg.policy = RateLimitPolicy::Close;
        let mut limiter = RateLimiter::new(cfg, ms(0)).unwrap();
        assert_eq!(limiter.check(ms(0), 1), RateDecision::Allow);
        match limiter.check(ms(0), 1) {
            RateDecision::Exceeded { policy, .. } => {
                assert_eq!(policy, RateLimitPolicy::Close);
                assert_eq!(policy.close_code(), Some(CloseCode::POLICY_VIOLATION));
            }
            other => panic!("expected Exceeded, got {other:?}"),
        }
        assert_eq!(RateLimitPolicy::Refuse.close_code(), None);
    }

    #[test]
    fn same_inputs_same_decisions() {
        let run = || {
            let mut limiter = RateLimiter::new(config(7, 3, 333, 500), ms(0)).unwrap();
            (0..2_000u64)
                .map(|i| {
                    limiter.check(
                        Instant::from_micros(i * 3_217 % 900_000 + i * 50),
                        (i % 97) as usize,
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }
}
