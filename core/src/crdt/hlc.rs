//! Hybrid logical clock: timestamps that order events across replicas.
//!
//! This module owns [`Hlc`], the per-replica clock, and [`HlcTimestamp`], the
//! value it hands out. A hybrid logical clock (Kulkarni et al., 2014) pairs a
//! physical wall-clock reading with a logical counter, so that:
//!
//! - timestamps stay close to wall-clock time and are readable as such;
//! - a replica's timestamps never go backwards, even when its wall clock does
//!   (NTP step, suspended laptop, user changing the system time);
//! - every event that follows the receipt of a message gets a timestamp greater
//!   than the message's, so "happened after" is never mistaken for "older"
//!   just because the receiver's wall clock is behind the sender's.
//!
//! The module never reads a clock: the caller passes the wall-clock time, in
//! milliseconds since the Unix epoch (or any origin shared by all replicas), on
//! every call. It holds no buffers and performs no IO.
//!
//! # Example
//!
//! ```
//! use kitestring_core::hlc::{Hlc, HlcError};
//!
//! const NOW: u64 = 1_700_000_000_000;
//! let mut server = Hlc::new(1);
//! // The client's wall clock is five minutes slow. It trusts its server, so
//! // it tolerates server timestamps up to ten minutes ahead.
//! let mut client = Hlc::new(2).with_max_drift_ms(10 * 60_000);
//!
//! let sent = server.now(NOW);
//! let received = client.observe(sent, NOW - 300_000).unwrap();
//! assert!(received > sent);
//! // Anything the client does next is still ordered after the server's event.
//! assert!(client.now(NOW - 299_000) > sent);
//!
//! // The server keeps the default one-minute guard against its clients: a
//! // client whose clock is an hour fast cannot drag the server along.
//! let mut fast = Hlc::new(3);
//! let bogus = fast.now(NOW + 3_600_000);
//! assert!(matches!(
//!     server.observe(bogus, NOW),
//!     Err(HlcError::ClockDrift { .. })
//! ));
//! ```

use core::cmp::max;
use core::fmt;

use serde::{Deserialize, Serialize};

/// A point in hybrid-logical time.
///
/// Timestamps are totally ordered: by `physical_ms`, then `logical`, then
/// `node`. The node id only matters for two events that no clock could tell
/// apart; it makes the order total so that every replica resolves such ties
/// the same way.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct HlcTimestamp {
    /// Wall-clock component, in milliseconds since the shared origin.
    ///
    /// It is the largest wall-clock reading the issuing clock had seen, which
    /// may be ahead of its own wall clock after it observed a faster peer.
    pub physical_ms: u64,
    /// Counter that orders events sharing the same `physical_ms`.
    pub logical: u32,
    /// Id of the replica that issued the timestamp; the final tie-break.
    pub node: u64,
}

impl HlcTimestamp {
    /// The smallest timestamp; every timestamp a clock issues is greater.
    pub const MIN: HlcTimestamp = HlcTimestamp {
        physical_ms: 0,
        logical: 0,
        node: 0,
    };

    /// The largest timestamp. A clock that reaches it stops advancing (see
    /// [`Hlc::now`]); no real wall clock gets there.
    pub const MAX: HlcTimestamp = HlcTimestamp {
        physical_ms: u64::MAX,
        logical: u32::MAX,
        node: u64::MAX,
    };

    /// A timestamp from its parts.
    pub const fn new(physical_ms: u64, logical: u32, node: u64) -> Self {
        HlcTimestamp {
            physical_ms,
            logical,
            node,
        }
    }
}

impl fmt::Debug for HlcTimestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}@{}", self.physical_ms, self.logical, self.node)
    }
}

impl fmt::Display for HlcTimestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Why [`Hlc::observe`] refused a remote timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HlcError {
    /// The remote timestamp is further ahead of local time than the clock
    /// tolerates. The clock was not moved.
    #[error(
        "remote clock at {remote_ms} ms is more than {max_drift_ms} ms ahead of local time {local_ms} ms"
    )]
    ClockDrift {
        /// `physical_ms` of the refused remote timestamp.
        remote_ms: u64,
        /// Local time it was compared with: the larger of the wall clock and
        /// the clock's own last physical time.
        local_ms: u64,
        /// The tolerance that was exceeded.
        max_drift_ms: u64,
    },
}

/// A hybrid logical clock owned by one replica.
///
/// Every method takes the caller's current wall-clock reading in
/// milliseconds. The clock keeps the last timestamp it issued and guarantees
/// that each new one is strictly greater.
///
/// # Logical counter overflow
///
/// The logical counter is 32 bits. If more than `u32::MAX` events share one
/// physical millisecond (only possible when the wall clock stalls or a peer
/// sends a timestamp with a huge counter), the clock carries into the physical
/// part: it issues `physical_ms + 1` with a logical counter of zero. The clock
/// then runs up to a millisecond ahead of the wall clock until the wall clock
/// catches up, which is harmless; panicking or wrapping would not be.
///
/// If `physical_ms` is already `u64::MAX` there is nothing left to carry into
/// and the clock keeps returning [`HlcTimestamp`] with the maximum counter.
/// No wall clock reaches that value (it is 584 million years after 1970), so
/// only a caller feeding `u64::MAX` as the wall time can get there.
///
/// # Drift guard
///
/// [`Hlc::observe`] refuses a remote timestamp whose physical time is more than
/// [`max_drift_ms`](Hlc::max_drift_ms) ahead of local time. Without the guard,
/// one peer with a wrong clock (or a malicious one) sending a timestamp from
/// next year would drag the receiver's clock to next year; every timestamp the
/// receiver issues afterwards would carry that value, and so would every
/// replica that hears from it. Hybrid logical clocks never move backwards, so
/// the whole system would be stuck in the future and every honest replica's
/// writes would lose to whatever was written "next year".
///
/// The guard is meant for timestamps from peers a replica does not trust,
/// typically a server receiving from clients. A client that follows a trusted
/// server should raise its tolerance to at least the error its own wall clock
/// may have: with a clock five minutes slow and the default one minute, it
/// would refuse every server timestamp until its clock was corrected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hlc {
    last: HlcTimestamp,
    max_drift_ms: u64,
}

impl Hlc {
    /// Default tolerance for remote clocks running ahead of local time: one
    /// minute. Generous for NTP-synchronised machines, small enough that a
    /// broken clock cannot push the system far into the future.
    pub const DEFAULT_MAX_DRIFT_MS: u64 = 60_000;

    /// A clock for replica `node` that has issued nothing yet.
    ///
    /// Node ids must be unique among replicas that write to the same data;
    /// they are the last tie-break in [`HlcTimestamp`]'s order.
    pub const fn new(node: u64) -> Self {
        Hlc {
            last: HlcTimestamp::new(0, 0, node),
            max_drift_ms: Self::DEFAULT_MAX_DRIFT_MS,
        }
    }

    /// A clock for replica `node` that continues after `last`, for example a
    /// timestamp persisted before a restart. Timestamps it issues are greater
    /// than `last` even if the wall clock went backwards across the restart.
    pub const fn resume(node: u64, last: HlcTimestamp) -> Self {
        Hlc {
            last: HlcTimestamp::new(last.physical_ms, last.logical, node),
            max_drift_ms: Self::DEFAULT_MAX_DRIFT_MS,
        }
    }

    /// The same clock with a different drift tolerance. `u64::MAX` disables
    /// the guard.
    #[must_use]
    pub const fn with_max_drift_ms(mut self, max_drift_ms: u64) -> Self {
        self.max_drift_ms = max_drift_ms;
        self
    }

    /// The replica id stamped into every timestamp this clock issues.
    pub const fn node(&self) -> u64 {
        self.last.node
    }

    /// How far ahead of local time a remote timestamp may be.
    pub const fn max_drift_ms(&self) -> u64 {
        self.max_drift_ms
    }

    /// The last timestamp issued (or the starting point if none was).
    pub const fn last(&self) -> HlcTimestamp {
        self.last
    }

    /// A timestamp for a local event or an outgoing message (the HLC send
    /// rule): the physical part becomes the larger of the wall clock and the
    /// last physical time; the logical counter restarts at zero when the
    /// physical part moved and is incremented when it did not.
    ///
    /// The result is strictly greater than every timestamp this clock issued
    /// or observed before (see the type docs for the one saturating case).
    pub fn now(&mut self, wall_ms: u64) -> HlcTimestamp {
        let previous = self.last;
        let next = if wall_ms > previous.physical_ms {
            HlcTimestamp::new(wall_ms, 0, previous.node)
        } else {
            Self::tick(previous.physical_ms, previous.logical, previous.node)
        };
        self.last = next;
        next
    }

    /// Merges a timestamp received from another replica and returns the
    /// timestamp of the receive event (the HLC receive rule).
    ///
    /// The result is strictly greater than both `remote` and every timestamp
    /// this clock issued before, so anything the replica does after receiving
    /// a message is ordered after that message.
    ///
    /// # Errors
    ///
    /// [`HlcError::ClockDrift`] if `remote.physical_ms` is more than
    /// [`max_drift_ms`](Hlc::max_drift_ms) ahead of the larger of `wall_ms`
    /// and the clock's last physical time. The clock is left untouched, so a
    /// bogus timestamp has no effect beyond the error.
    pub fn observe(
        &mut self,
        remote: HlcTimestamp,
        wall_ms: u64,
    ) -> Result<HlcTimestamp, HlcError> {
        let previous = self.last;
        let local_ms = max(wall_ms, previous.physical_ms);
        if remote.physical_ms > local_ms.saturating_add(self.max_drift_ms) {
            return Err(HlcError::ClockDrift {
                remote_ms: remote.physical_ms,
                local_ms,
                max_drift_ms: self.max_drift_ms,
            });
        }

        let physical_ms = max(local_ms, remote.physical_ms);
        let next = if physical_ms == previous.physical_ms && physical_ms == remote.physical_ms {
            Self::tick(
                physical_ms,
                max(previous.logical, remote.logical),
                previous.node,
            )
        } else if physical_ms == previous.physical_ms {
            Self::tick(physical_ms, previous.logical, previous.node)
        } else if physical_ms == remote.physical_ms {
            Self::tick(physical_ms, remote.logical, previous.node)
        } else {
            HlcTimestamp::new(physical_ms, 0, previous.node)
        };
        self.last = next;
        Ok(next)
    }

    /// The timestamp right after `(physical_ms, logical)` for this node,
    /// carrying a full logical counter into the physical part.
    fn tick(physical_ms: u64, logical: u32, node: u64) -> HlcTimestamp {
        match logical.checked_add(1) {
            Some(logical) => HlcTimestamp::new(physical_ms, logical, node),
            None => match physical_ms.checked_add(1) {
                Some(physical_ms) => HlcTimestamp::new(physical_ms, 0, node),
                // Nothing left to carry into; see "Logical counter overflow".
                None => HlcTimestamp::new(u64::MAX, u32::MAX, node),
            },
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

    fn ts(physical_ms: u64, logical: u32, node: u64) -> HlcTimestamp {
        HlcTimestamp::new(physical_ms, logical, node)
    }

    #[test]
    fn order_is_physical_then_logical_then_node() {
        assert!(ts(2, 0, 0) > ts(1, 9, 9));
        assert!(ts(1, 2, 0) > ts(1, 1, 9));
        assert!(ts(1, 1, 2) > ts(1, 1, 1));
        assert!(HlcTimestamp::MIN < ts(0, 0, 1));
        assert!(HlcTimestamp::MAX > ts(u64::MAX, u32::MAX, u64::MAX - 1));
    }

    #[test]
    fn now_follows_the_wall_clock_and_counts_within_a_millisecond() {
        let mut clock = Hlc::new(7);
        assert_eq!(clock.now(100), ts(100, 0, 7));
        assert_eq!(clock.now(100), ts(100, 1, 7));
        assert_eq!(clock.now(100), ts(100, 2, 7));
        assert_eq!(clock.now(101), ts(101, 0, 7));
        assert_eq!(clock.last(), ts(101, 0, 7));
    }

    #[test]
    fn now_never_goes_backwards_when_the_wall_clock_does() {
        let mut clock = Hlc::new(1);
        let a = clock.now(5_000);
        let b = clock.now(1_000);
        let c = clock.now(0);
        assert_eq!(b, ts(5_000, 1, 1));
        assert_eq!(c, ts(5_000, 2, 1));
        assert!(a < b && b < c);
        // Once the wall clock passes the high-water mark, it takes over again.
        assert_eq!(clock.now(5_001), ts(5_001, 0, 1));
    }

    #[test]
    fn first_timestamp_at_wall_zero_is_above_the_start() {
        let mut clock = Hlc::new(3);
        let first = clock.now(0);
        assert_eq!(first, ts(0, 1, 3));
        assert!(first > HlcTimestamp::MIN);
    }

    #[test]
    fn observe_moves_past_a_remote_that_is_ahead() {
        let mut clock = Hlc::new(1);
        clock.now(1_000);
        let remote = ts(1_500, 4, 2);
        let got = clock.observe(remote, 1_000).unwrap();
        assert_eq!(got, ts(1_500, 5, 1));
        assert!(got > remote);
    }

    #[test]
    fn observe_of_an_older_remote_still_ticks_the_local_clock() {
        let mut clock = Hlc::new(1);
        let before = clock.now(2_000);
        let got = clock.observe(ts(1_000, 9, 2), 2_000).unwrap();
        assert_eq!(got, ts(2_000, 1, 1));
        assert!(got > before);
    }

    #[test]
    fn observe_with_equal_physical_takes_the_larger_counter() {
        let mut clock = Hlc::new(1);
        clock.now(2_000);
        clock.now(2_000); // logical 1
        let got = clock.observe(ts(2_000, 7, 2), 1_000).unwrap();
        assert_eq!(got, ts(2_000, 8, 1));
        let got = clock.observe(ts(2_000, 3, 2), 1_000).unwrap();
        assert_eq!(got, ts(2_000, 9, 1));
    }

    #[test]
    fn observe_when_the_wall_clock_is_ahead_of_everything_restarts_the_counter() {
        let mut clock = Hlc::new(1);
        clock.now(1_000);
        let got = clock.observe(ts(1_200, 3, 2), 5_000).unwrap();
        assert_eq!(got, ts(5_000, 0, 1));
    }

    #[test]
    fn observe_beats_a_remote_with_the_same_physical_time_and_a_higher_node() {
        // Node ids break ties, so the counter must move past the remote's
        // counter even when the remote's node id is larger.
        let mut clock = Hlc::new(1);
        let remote = ts(3_000, 0, u64::MAX);
        let got = clock.observe(remote, 3_000).unwrap();
        assert!(got > remote);
    }

    #[test]
    fn logical_overflow_carries_into_the_physical_part() {
        let mut clock = Hlc::resume(1, ts(10, u32::MAX - 1, 1));
        assert_eq!(clock.now(0), ts(10, u32::MAX, 1));
        assert_eq!(clock.now(0), ts(11, 0, 1));
        assert_eq!(clock.now(11), ts(11, 1, 1));
    }

    #[test]
    fn observe_carries_a_full_remote_counter() {
        let mut clock = Hlc::new(1);
        let remote = ts(10, u32::MAX, 2);
        let got = clock.observe(remote, 10).unwrap();
        assert_eq!(got, ts(11, 0, 1));
        assert!(got > remote);
    }

    #[test]
    fn the_very_top_saturates_instead_of_panicking() {
        let mut clock = Hlc::resume(1, ts(u64::MAX, u32::MAX, 1));
        assert_eq!(clock.now(u64::MAX), ts(u64::MAX, u32::MAX, 1));
        let mut clock = Hlc::new(1).with_max_drift_ms(u64::MAX);
        let got = clock.observe(ts(u64::MAX, u32::MAX, 0), 0).unwrap();
        assert_eq!(got, ts(u64::MAX, u32::MAX, 1));
    }

    #[test]
    fn drift_beyond_the_limit_is_refused_and_leaves_the_clock_alone() {
        let mut clock = Hlc::new(1);
        let before = clock.now(1_000);
        let far = ts(1_000 + Hlc::DEFAULT_MAX_DRIFT_MS + 1, 0, 2);
        assert_eq!(
            clock.observe(far, 1_000),
            Err(HlcError::ClockDrift {
                remote_ms: far.physical_ms,
                local_ms: 1_000,
                max_drift_ms: Hlc::DEFAULT_MAX_DRIFT_MS,
            })
        );
        assert_eq!(clock.last(), before);
        // Exactly at the limit is accepted.
        let edge = ts(1_000 + Hlc::DEFAULT_MAX_DRIFT_MS, 0, 2);
        assert_eq!(clock.observe(edge, 1_000), Ok(ts(edge.physical_ms, 1, 1)));
    }

    #[test]
    fn drift_is_measured_from_the_clock_when_the_wall_clock_is_behind() {
        let mut clock = Hlc::new(1).with_max_drift_ms(100);
        clock.now(10_000);
        // Wall clock jumped back; local time is still 10 000.
        assert!(clock.observe(ts(10_100, 0, 2), 0).is_ok());
        let err = clock.observe(ts(10_300, 0, 2), 0).unwrap_err();
        assert_eq!(
            err,
            HlcError::ClockDrift {
                remote_ms: 10_300,
                local_ms: 10_100,
                max_drift_ms: 100
            }
        );
    }

    #[test]
    fn resume_continues_after_a_persisted_timestamp() {
        let mut clock = Hlc::resume(4, ts(9_000, 3, 99));
        assert_eq!(clock.node(), 4);
        assert_eq!(clock.now(8_000), ts(9_000, 4, 4));
    }

    #[test]
    fn timestamps_round_trip_through_serde() {
        let stamp = ts(1_700_000_000_000, 42, 9);
        let json = serde_json::to_string(&stamp).unwrap();
        assert_eq!(
            json,
            r#"{"physical_ms":1700000000000,"logical":42,"node":9}"#
        );
        assert_eq!(serde_json::from_str::<HlcTimestamp>(&json).unwrap(), stamp);
        let packed = rmp_serde::to_vec(&stamp).unwrap();
        assert_eq!(
            rmp_serde::from_slice::<HlcTimestamp>(&packed).unwrap(),
            stamp
        );
    }
}
