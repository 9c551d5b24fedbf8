//! Last-writer-wins map: shared key/value state that converges on every replica.
//!
//! This module owns [`LwwMap`], a state-based CRDT whose entries are stamped
//! with [`HlcTimestamp`]s, and [`LwwUpdate`], the unit replicas exchange. Each
//! key holds the write with the greatest timestamp; deletes are kept as
//! tombstones so that an older write arriving late cannot bring a deleted key
//! back. Replicas that have received the same set of updates, in any order and
//! with any duplication, hold the same map.
//!
//! The map never reads a clock and never grows without bound: the caller
//! passes timestamps (or an [`Hlc`] and the wall-clock time), and the map
//! refuses new keys past [`max_entries`](LwwMap::max_entries) and new
//! tombstones past [`max_tombstones`](LwwMap::max_tombstones) with a typed
//! [`LwwError`]. It never decides when tombstones are safe to drop; the caller
//! says so through [`LwwMap::compact`].
//!
//! # Who stamps writes
//!
//! Both ways of running the map converge, because both produce updates whose
//! timestamps follow the order in which writes were made:
//!
//! - **Peers stamp their own writes.** Each replica owns an [`Hlc`] with a
//!   unique node id, writes with [`LwwMap::set_local`] /
//!   [`LwwMap::delete_local`], sends the resulting update, and applies what it
//!   receives with [`LwwMap::apply_remote`] so that its clock observes every
//!   remote timestamp. A later local write then always carries a greater
//!   timestamp than anything the replica has seen, whatever its wall clock says.
//! - **A server stamps writes and broadcasts the result.** Clients send
//!   intents (for example over REST); the server applies them with
//!   [`LwwMap::set_local`] on its own clock and broadcasts the key's new state,
//!   [`LwwMap::update_for`]. Clients only [`apply`](LwwMap::apply) what the
//!   server broadcasts, so broadcasts that arrive out of order resolve to the
//!   order in which the server took the writes.
//!
//! The drift guard of [`Hlc::observe`] is for replicas that take timestamps
//! from peers they do not trust, typically a server receiving from clients. A
//! client in the first mode that trusts its server should give its clock a
//! tolerance at least as large as the error its own wall clock may have, or
//! it will refuse the server's updates while its clock is slow.
//!
//! ```
//! use kitestring_core::hlc::Hlc;
//! use kitestring_core::lww::{Applied, LwwMap};
//!
//! // Server stamping: two writes, broadcasts delivered in reverse order.
//! let mut server_clock = Hlc::new(0);
//! let mut server = LwwMap::new(1_000);
//! server.set_local(&mut server_clock, 50_000, "volume", 8).unwrap();
//! let first = server.update_for(&"volume").unwrap();
//! server.set_local(&mut server_clock, 50_000, "volume", 9).unwrap();
//! let second = server.update_for(&"volume").unwrap();
//!
//! let mut client = LwwMap::new(1_000);
//! assert_eq!(client.apply(second).unwrap(), Applied::Applied);
//! assert!(matches!(client.apply(first).unwrap(), Applied::Stale { .. }));
//! assert_eq!(client.get(&"volume"), Some(&9));
//! ```
//!
//! # Identical timestamps
//!
//! Correct clocks never issue the same timestamp twice (the node id is part of
//! it), so two different writes with one timestamp mean a buggy peer or two
//! replicas configured with the same node id. The map still has to converge,
//! so it resolves them by a fixed rule that does not depend on arrival order:
//!
//! 1. the same write twice is a [`Duplicate`](Applied::Duplicate) and changes
//!    nothing;
//! 2. a tombstone beats a value;
//! 3. two different values turn the key into a tombstone at that timestamp
//!    ([`Applied::Conflict`]): no replica can tell which value was meant, so
//!    none of them keeps either.
//!
//! Ordered by timestamp first and by this rule second, the states of a key
//! form a join-semilattice (at one timestamp the values are pairwise
//! incomparable and the tombstone is above all of them), and merging takes the
//! join. That makes merging commutative, associative and idempotent, which is
//! all convergence needs. The rule only needs `V: Eq`, so values such as
//! `serde_json::Value` or `bytes::Bytes` can be stored directly.
//!
//! # Tombstones and compaction
//!
//! A delete leaves a tombstone: the key with no value and the delete's
//! timestamp. Dropping the tombstone too early can resurrect the key. Suppose
//! replica A deletes `k` at time 20 while a write of `k` stamped 10 by replica
//! B is still on its way to C. If C dropped its tombstone for `k` before the
//! write arrived, C has no record that `k` was deleted after time 10, so it
//! takes the old write as new and `k` is back on C, with a value every other
//! replica has discarded. The replicas have diverged, and C will spread the
//! resurrected value to anyone that merges with it after compacting.
//!
//! [`LwwMap::compact`] therefore only drops tombstones older than a timestamp
//! the caller guarantees is *causally stable*: no update stamped before it can
//! still arrive at this replica, because every replica that can write has
//! already stamped past it and everything stamped before it has been
//! delivered. With hybrid clocks (which only move forward) and in-order
//! delivery from each writer, a hub can take the minimum, over all writers,
//! of the latest timestamp it has received from each, and tell the other
//! replicas once they have acknowledged everything up to that point. A replica
//! that falls behind the stable point (offline for longer than the hub keeps
//! track of it) must discard its map and load a fresh snapshot rather than
//! merge, because the tombstones it would need have been dropped.
//!
//! After compaction the map remembers the stable point. An update for a key it
//! does not hold that is stamped before that point is refused as
//! [`Stale`](Applied::Stale): under the stability contract it cannot happen,
//! and if a peer breaks the contract, refusing is what keeps a deleted key
//! from coming back.
//!
//! Tombstones count towards [`max_entries`](LwwMap::max_entries), and
//! [`max_tombstones`](LwwMap::max_tombstones) caps them separately. When a
//! write would create a tombstone past that cap, the map refuses it with
//! [`LwwError::TooManyTombstones`] and stays as it was; it never evicts a
//! tombstone on its own, because silently dropping one is exactly the
//! resurrection above. The caller frees room with [`LwwMap::compact`].
//!
//! # Errors and convergence
//!
//! A refused update ([`LwwError`]) leaves this replica without it, so the
//! replica is no longer guaranteed to converge. Callers should treat it as a
//! capacity problem for that session: compact if a stable point allows, or
//! close the session and resynchronise from a snapshot.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hlc::{Hlc, HlcError, HlcTimestamp};

/// One write to an [`LwwMap`], as replicas exchange it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LwwUpdate<K, V> {
    /// The key written.
    pub key: K,
    /// The new value, or `None` for a delete (a tombstone).
    pub value: Option<V>,
    /// When the write was made.
    pub ts: HlcTimestamp,
}

impl<K, V> LwwUpdate<K, V> {
    /// A write of `value` to `key` at `ts`.
    pub const fn set(key: K, value: V, ts: HlcTimestamp) -> Self {
        LwwUpdate {
            key,
            value: Some(value),
            ts,
        }
    }

    /// A delete of `key` at `ts`.
    pub const fn delete(key: K, ts: HlcTimestamp) -> Self {
        LwwUpdate {
            key,
            value: None,
            ts,
        }
    }

    /// Whether this update is a delete.
    pub const fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }
}

/// What applying one update did to the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Applied {
    /// The update won and is now the key's state.
    Applied,
    /// The map already held this exact update; nothing changed.
    Duplicate,
    /// The map holds a newer write for the key (or, for a key it does not
    /// hold, the update is older than the compaction point); nothing changed.
    Stale {
        /// Timestamp of what the map holds for the key, or the compaction
        /// point if it holds nothing.
        current: HlcTimestamp,
    },
    /// The update carried the same timestamp as the key's current value but a
    /// different value. The key is now a tombstone at that timestamp (see the
    /// module docs). This means a peer issued one timestamp twice, which is
    /// worth logging.
    Conflict {
        /// The timestamp both writes carried.
        ts: HlcTimestamp,
    },
}

impl Applied {
    /// Whether the map changed.
    pub const fn changed(self) -> bool {
        matches!(self, Applied::Applied | Applied::Conflict { .. })
    }
}

/// Why an [`LwwMap`] refused a write. The map is unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LwwError {
    /// The write would add a key and the map already holds `max_entries`
    /// entries (live values and tombstones together).
    #[error("map is full: {max_entries} entries including tombstones")]
    Full {
        /// The configured limit.
        max_entries: usize,
    },
    /// The write would add a tombstone and the map already holds
    /// `max_tombstones` of them. Compact to make room.
    #[error("too many tombstones: limit is {max_tombstones}")]
    TooManyTombstones {
        /// The configured limit.
        max_tombstones: usize,
    },
    /// The clock refused the timestamp involved (see [`HlcError`]).
    #[error(transparent)]
    Clock(#[from] HlcError),
}

/// Totals from [`LwwMap::merge`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct MergeReport {
    /// Entries that changed this map ([`Applied::Applied`] or
    /// [`Applied::Conflict`]).
    pub changed: usize,
    /// Entries this map already had or had newer.
    pub unchanged: usize,
    /// Entries refused for lack of room.
    pub rejected: usize,
    /// The first refusal, if any.
    pub first_error: Option<LwwError>,
}

impl MergeReport {
    /// Whether every entry of the other map was taken into account; if not,
    /// this replica is missing state (see the module docs on errors).
    pub const fn is_complete(&self) -> bool {
        self.rejected == 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry<V> {
    value: Option<V>,
    ts: HlcTimestamp,
}

/// A last-writer-wins map with tombstones; see the [module docs](self).
///
/// Keys are kept in a `BTreeMap`, so iteration order and exported snapshots
/// are deterministic.
#[derive(Clone, Debug)]
pub struct LwwMap<K, V> {
    entries: BTreeMap<K, Entry<V>>,
    tombstones: usize,
    max_entries: usize,
    max_tombstones: usize,
    compacted_before: HlcTimestamp,
}

impl<K, V> LwwMap<K, V> {
    /// An empty map holding at most `max_entries` keys, live or deleted.
    /// Tombstones are only limited by that total until
    /// [`with_max_tombstones`](Self::with_max_tombstones) says otherwise.
    pub const fn new(max_entries: usize) -> Self {
        LwwMap {
            entries: BTreeMap::new(),
            tombstones: 0,
            max_entries,
            max_tombstones: max_entries,
            compacted_before: HlcTimestamp::MIN,
        }
    }

    /// The same map with a separate cap on tombstones.
    #[must_use]
    pub const fn with_max_tombstones(mut self, max_tombstones: usize) -> Self {
        self.max_tombstones = max_tombstones;
        self
    }

    /// The cap on entries, live and tombstones together.
    pub const fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// The cap on tombstones.
    pub const fn max_tombstones(&self) -> usize {
        self.max_tombstones
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        self.entries.len() - self.tombstones
    }

    /// Whether there is no live key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of tombstones held.
    pub const fn tombstone_count(&self) -> usize {
        self.tombstones
    }

    /// Number of entries held, live and tombstones; this is what
    /// [`max_entries`](Self::max_entries) limits.
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// The stable point of the last [`compact`](Self::compact), or
    /// [`HlcTimestamp::MIN`] if the map was never compacted.
    pub const fn compacted_before(&self) -> HlcTimestamp {
        self.compacted_before
    }

    /// Live entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> + '_ {
        self.entries
            .iter()
            .filter_map(|(k, e)| e.value.as_ref().map(|v| (k, v)))
    }
}

impl<K: Ord, V> LwwMap<K, V> {
    /// Drops every tombstone stamped strictly before `stable_before` and
    /// returns how many were dropped.
    ///
    /// `stable_before` must be causally stable: no update stamped before it
    /// can still arrive at this replica. See the module docs for why compacting
    /// past that point can resurrect deleted keys. The map remembers the
    /// largest stable point it was given and refuses older updates for keys it
    /// does not hold.
    pub fn compact(&mut self, stable_before: HlcTimestamp) -> usize {
        let before = self.entries.len();
        self.entries
            .retain(|_, e| e.value.is_some() || e.ts >= stable_before);
        let dropped = before - self.entries.len();
        self.tombstones -= dropped;
        if stable_before > self.compacted_before {
            self.compacted_before = stable_before;
        }
        dropped
    }

    /// The live value of `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key).and_then(|e| e.value.as_ref())
    }

    /// The timestamp of `key`'s current state, live or tombstone.
    pub fn timestamp(&self, key: &K) -> Option<HlcTimestamp> {
        self.entries.get(key).map(|e| e.ts)
    }

    /// Whether `key` is held as a tombstone.
    pub fn is_deleted(&self, key: &K) -> bool {
        self.entries.get(key).is_some_and(|e| e.value.is_none())
    }
}

impl<K: Ord + Clone, V: Clone> LwwMap<K, V> {
    /// The key's current state as an update, tombstones included: what a
    /// server broadcasts after stamping a write.
    pub fn update_for(&self, key: &K) -> Option<LwwUpdate<K, V>> {
        self.entries.get(key).map(|e| LwwUpdate {
            key: key.clone(),
            value: e.value.clone(),
            ts: e.ts,
        })
    }

    /// The whole state, tombstones included, in key order. Applying it to an
    /// empty map (or merging it into any replica) reproduces this map.
    pub fn snapshot(&self) -> Vec<LwwUpdate<K, V>> {
        self.entries
            .iter()
            .map(|(k, e)| LwwUpdate {
                key: k.clone(),
                value: e.value.clone(),
                ts: e.ts,
            })
            .collect()
    }

    /// Entries stamped strictly after `since`, tombstones included, in
    /// timestamp order; the last one's `ts` is the next `since`.
    ///
    /// This is a delta for a replica that has seen everything up to `since`.
    /// It is complete only if `since` is not older than
    /// [`compacted_before`](Self::compacted_before), or if the replica already
    /// saw every delete before that point (the compaction contract).
    pub fn updates_since(&self, since: HlcTimestamp) -> Vec<LwwUpdate<K, V>> {
        let mut out: Vec<LwwUpdate<K, V>> = self
            .entries
            .iter()
            .filter(|(_, e)| e.ts > since)
            .map(|(k, e)| LwwUpdate {
                key: k.clone(),
                value: e.value.clone(),
                ts: e.ts,
            })
            .collect();
        out.sort_by_key(|u| u.ts);
        out
    }
}

impl<K: Ord + Clone, V: Clone + Eq> LwwMap<K, V> {
    /// Writes `value` to `key` at `ts`, if `ts` wins over the key's current
    /// state. Same as [`apply`](Self::apply) with [`LwwUpdate::set`].
    ///
    /// # Errors
    ///
    /// See [`apply`](Self::apply).
    pub fn set(&mut self, key: K, value: V, ts: HlcTimestamp) -> Result<Applied, LwwError> {
        self.apply(LwwUpdate::set(key, value, ts))
    }

    /// Deletes `key` at `ts` (leaves a tombstone), if `ts` wins over the key's
    /// current state. Same as [`apply`](Self::apply) with
    /// [`LwwUpdate::delete`].
    ///
    /// # Errors
    ///
    /// See [`apply`](Self::apply).
    pub fn delete(&mut self, key: K, ts: HlcTimestamp) -> Result<Applied, LwwError> {
        self.apply(LwwUpdate::delete(key, ts))
    }

    /// Writes `value` to `key` with a fresh timestamp from `clock` and returns
    /// that timestamp.
    ///
    /// A local write always wins: if the key holds a timestamp the clock has
    /// not observed yet (the update was [`apply`](Self::apply)-ed without
    /// going through the clock), the clock observes it first, so the new
    /// timestamp is greater even when the local wall clock is behind. The
    /// same goes for the compaction point when the key is not held.
    ///
    /// # Errors
    ///
    /// [`LwwError::Clock`] if the key's current timestamp (or the compaction
    /// point) is further in the future than the clock tolerates; [`LwwError::Full`] and
    /// [`LwwError::TooManyTombstones`] as for [`apply`](Self::apply). The map
    /// is unchanged on error.
    pub fn set_local(
        &mut self,
        clock: &mut Hlc,
        wall_ms: u64,
        key: K,
        value: V,
    ) -> Result<HlcTimestamp, LwwError> {
        self.write_local(clock, wall_ms, key, Some(value))
    }

    /// Deletes `key` with a fresh timestamp from `clock` and returns that
    /// timestamp. A tombstone is recorded even if the key is unknown, so that
    /// a write of it still in flight from another replica cannot win.
    ///
    /// # Errors
    ///
    /// As for [`set_local`](Self::set_local).
    pub fn delete_local(
        &mut self,
        clock: &mut Hlc,
        wall_ms: u64,
        key: K,
    ) -> Result<HlcTimestamp, LwwError> {
        self.write_local(clock, wall_ms, key, None)
    }

    fn write_local(
        &mut self,
        clock: &mut Hlc,
        wall_ms: u64,
        key: K,
        value: Option<V>,
    ) -> Result<HlcTimestamp, LwwError> {
        // Check room before touching the clock so that a refused write leaves
        // no trace at all.
        self.check_room(&key, value.is_none())?;
        // The write must beat what the map holds for the key, or the
        // compaction point if it holds nothing; the clock may not have seen
        // either (updates applied without `apply_remote`, a stable point
        // computed elsewhere).
        let floor = self
            .entries
            .get(&key)
            .map_or(self.compacted_before, |current| current.ts);
        let ts = if floor >= clock.last() {
            clock.observe(floor, wall_ms)?
        } else {
            clock.now(wall_ms)
        };
        // Room was checked and the timestamp beats the key's state, so this
        // applies; the outcome adds nothing the caller needs.
        self.apply(LwwUpdate { key, value, ts })?;
        Ok(ts)
    }

    /// Applies an update received from another replica after passing its
    /// timestamp through `clock`, so that later local writes are ordered after
    /// it and a timestamp from too far in the future is refused.
    ///
    /// # Errors
    ///
    /// [`LwwError::Clock`] if the clock refuses the timestamp (the map and the
    /// clock are unchanged); otherwise as for [`apply`](Self::apply).
    pub fn apply_remote(
        &mut self,
        clock: &mut Hlc,
        wall_ms: u64,
        update: LwwUpdate<K, V>,
    ) -> Result<Applied, LwwError> {
        // Observe first: a refused timestamp must not reach the map. A stale
        // but well-formed timestamp still advances the clock, which is harmless.
        clock.observe(update.ts, wall_ms)?;
        self.apply(update)
    }

    /// Applies one update: it replaces the key's state if its timestamp is
    /// greater (ties as in the module docs).
    ///
    /// # Errors
    ///
    /// [`LwwError::Full`] if the key is new and the map holds `max_entries`
    /// entries; [`LwwError::TooManyTombstones`] if the update would add a
    /// tombstone past `max_tombstones`. Updates that lose never fail. The map
    /// is unchanged on error.
    pub fn apply(&mut self, update: LwwUpdate<K, V>) -> Result<Applied, LwwError> {
        let LwwUpdate { key, value, ts } = update;
        let outcome = match self.entries.get(&key) {
            None if ts < self.compacted_before => {
                return Ok(Applied::Stale {
                    current: self.compacted_before,
                })
            }
            None => Applied::Applied,
            Some(current) => Self::resolve(current, &value, ts),
        };
        let new_tombstone = match outcome {
            Applied::Applied => value.is_none(),
            Applied::Conflict { .. } => true,
            _ => return Ok(outcome),
        };
        self.check_room(&key, new_tombstone)?;

        let value = match outcome {
            Applied::Conflict { .. } => None,
            _ => value,
        };
        let was_tombstone = self
            .entries
            .insert(key, Entry { value, ts })
            .is_some_and(|old| old.value.is_none());
        if new_tombstone && !was_tombstone {
            self.tombstones += 1;
        } else if !new_tombstone && was_tombstone {
            self.tombstones -= 1;
        }
        Ok(outcome)
    }

    /// Merges every entry of `other` into this map. The result is the same
    /// whichever map is merged into which, and in whatever order several maps
    /// are merged, and merging the same map twice changes nothing.
    ///
    /// Entries that do not fit are skipped and counted in the report; the
    /// rest are still merged, which is safe because each entry is merged on
    /// its own.
    pub fn merge(&mut self, other: &LwwMap<K, V>) -> MergeReport {
        let mut report = MergeReport::default();
        for (key, entry) in &other.entries {
            let update = LwwUpdate {
                key: key.clone(),
                value: entry.value.clone(),
                ts: entry.ts,
            };
            match self.apply(update) {
                Ok(outcome) if outcome.changed() => report.changed += 1,
                Ok(_) => report.unchanged += 1,
                Err(err) => {
                    report.rejected += 1;
                    report.first_error.get_or_insert(err);
                }
            }
        }
        report
    }

    /// Whether an update of `key` to a value (`tombstone == false`) or to a
    /// tombstone would fit.
    fn check_room(&self, key: &K, tombstone: bool) -> Result<(), LwwError> {
        let current = self.entries.get(key);
        if current.is_none() && self.entries.len() >= self.max_entries {
            return Err(LwwError::Full {
                max_entries: self.max_entries,
            });
        }
        let already_tombstone = current.is_some_and(|e| e.value.is_none());
        if tombstone && !already_tombstone && self.tombstones >= self.max_tombstones {
            return Err(LwwError::TooManyTombstones {
                max_tombstones: self.max_tombstones,
            });
        }
        Ok(())
    }

    /// The join of the key's current state and an incoming write; see the
    /// module docs for the rule on identical timestamps.
    fn resolve(current: &Entry<V>, value: &Option<V>, ts: HlcTimestamp) -> Applied {
        if ts > current.ts {
            return Applied::Applied;
        }
        if ts < current.ts {
            return Applied::Stale {
                current: current.ts,
            };
        }
        match (&current.value, value) {
            (None, None) => Applied::Duplicate,
            (Some(a), Some(b)) if a == b => Applied::Duplicate,
            (None, Some(_)) => Applied::Stale { current: ts },
            (Some(_), None) => Applied::Applied,
            (Some(_), Some(_)) => Applied::Conflict { ts },
        }
    }
}

impl<K: Ord, V: PartialEq> PartialEq for LwwMap<K, V> {
    /// Maps are equal when they hold the same entries, tombstones included;
    /// limits and the compaction point are configuration, not state.
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl<K: Ord, V: Eq> Eq for LwwMap<K, V> {}

#[cfg(test)]
// A failed unwrap is a failed test, which is what a test should do.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ts(physical_ms: u64, logical: u32, node: u64) -> HlcTimestamp {
        HlcTimestamp::new(physical_ms, logical, node)
    }

    #[test]
    fn newer_write_wins_older_is_stale() {
        let mut map = LwwMap::new(10);
        assert_eq!(map.set("a", 1, ts(10, 0, 1)), Ok(Applied::Applied));
        assert_eq!(map.set("a", 2, ts(20, 0, 1)), Ok(Applied::Applied));
        assert_eq!(
            map.set("a", 3, ts(15, 0, 2)),
            Ok(Applied::Stale {
                current: ts(20, 0, 1)
            })
        );
        assert_eq!(map.get(&"a"), Some(&2));
        assert_eq!(map.timestamp(&"a"), Some(ts(20, 0, 1)));
    }

    #[test]
    fn node_id_breaks_physical_and_logical_ties() {
        let mut map = LwwMap::new(10);
        assert_eq!(map.set("a", 1, ts(10, 0, 2)), Ok(Applied::Applied));
        assert_eq!(
            map.set("a", 9, ts(10, 0, 1)),
            Ok(Applied::Stale {
                current: ts(10, 0, 2)
            })
        );
        assert_eq!(map.get(&"a"), Some(&1));
    }

    #[test]
    fn same_update_twice_is_a_duplicate() {
        let mut map = LwwMap::new(10);
        let up = LwwUpdate::set("a", 1, ts(10, 0, 1));
        assert_eq!(map.apply(up.clone()), Ok(Applied::Applied));
        assert_eq!(map.apply(up), Ok(Applied::Duplicate));
        let del = LwwUpdate::<_, i32>::delete("a", ts(11, 0, 1));
        assert_eq!(map.apply(del.clone()), Ok(Applied::Applied));
        assert_eq!(map.apply(del), Ok(Applied::Duplicate));
        assert_eq!(map.tombstone_count(), 1);
    }

    #[test]
    fn delete_leaves_a_tombstone_that_blocks_older_writes() {
        let mut map = LwwMap::new(10);
        map.set("a", 1, ts(10, 0, 1)).unwrap();
        assert_eq!(map.delete("a", ts(20, 0, 1)), Ok(Applied::Applied));
        assert_eq!(map.get(&"a"), None);
        assert!(map.is_deleted(&"a"));
        assert_eq!(map.len(), 0);
        assert_eq!(map.entry_count(), 1);
        assert!(matches!(
            map.set("a", 2, ts(15, 0, 2)),
            Ok(Applied::Stale { .. })
        ));
        assert_eq!(map.get(&"a"), None);
        // A newer write brings the key back.
        assert_eq!(map.set("a", 3, ts(30, 0, 2)), Ok(Applied::Applied));
        assert_eq!(map.get(&"a"), Some(&3));
        assert_eq!(map.tombstone_count(), 0);
    }

    #[test]
    fn identical_timestamps_tombstone_beats_value_in_either_order() {
        let t = ts(10, 0, 1);
        let mut a = LwwMap::new(10);
        a.set("k", 1, t).unwrap();
        assert_eq!(a.delete("k", t), Ok(Applied::Applied));
        let mut b = LwwMap::new(10);
        b.delete("k", t).unwrap();
        assert_eq!(b.set("k", 1, t), Ok(Applied::Stale { current: t }));
        assert_eq!(a, b);
        assert!(a.is_deleted(&"k"));
    }

    #[test]
    fn identical_timestamps_with_different_values_conflict_to_a_tombstone() {
        let t = ts(10, 0, 1);
        let mut a = LwwMap::new(10);
        a.set("k", 1, t).unwrap();
        assert_eq!(a.set("k", 2, t), Ok(Applied::Conflict { ts: t }));
        let mut b = LwwMap::new(10);
        b.set("k", 2, t).unwrap();
        assert_eq!(b.set("k", 1, t), Ok(Applied::Conflict { ts: t }));
        assert_eq!(a, b);
        assert!(a.is_deleted(&"k"));
        assert_eq!(a.tombstone_count(), 1);
        // Replaying either value afterwards changes nothing.
        assert_eq!(a.set("k", 1, t), Ok(Applied::Stale { current: t }));
        assert_eq!(a, b);
    }

    #[test]
    fn full_map_refuses_new_keys_but_updates_existing_ones() {
        let mut map = LwwMap::new(2);
        map.set("a", 1, ts(1, 0, 1)).unwrap();
        map.set("b", 1, ts(2, 0, 1)).unwrap();
        assert_eq!(
            map.set("c", 1, ts(3, 0, 1)),
            Err(LwwError::Full { max_entries: 2 })
        );
        assert_eq!(map.get(&"c"), None);
        assert_eq!(map.set("a", 2, ts(4, 0, 1)), Ok(Applied::Applied));
        // Deleting an existing key turns it into a tombstone in place.
        assert_eq!(map.delete("b", ts(5, 0, 1)), Ok(Applied::Applied));
        // A tombstone still takes a slot.
        assert_eq!(
            map.delete("c", ts(6, 0, 1)),
            Err(LwwError::Full { max_entries: 2 })
        );
        // A stale write to a new key would fail too, but a stale write to an
        // existing key is just stale.
        assert!(matches!(
            map.set("a", 0, ts(0, 0, 1)),
            Ok(Applied::Stale { .. })
        ));
    }

    #[test]
    fn tombstone_cap_refuses_new_tombstones_without_evicting() {
        let mut map = LwwMap::new(10).with_max_tombstones(1);
        map.set("a", 1, ts(1, 0, 1)).unwrap();
        map.set("b", 1, ts(2, 0, 1)).unwrap();
        map.delete("a", ts(3, 0, 1)).unwrap();
        assert_eq!(
            map.delete("b", ts(4, 0, 1)),
            Err(LwwError::TooManyTombstones { max_tombstones: 1 })
        );
        assert_eq!(map.get(&"b"), Some(&1));
        assert!(map.is_deleted(&"a"));
        // Re-deleting an existing tombstone with a newer stamp is fine.
        assert_eq!(map.delete("a", ts(5, 0, 1)), Ok(Applied::Applied));
        // A conflict would create a tombstone too.
        assert_eq!(
            map.set("b", 2, ts(2, 0, 1)),
            Err(LwwError::TooManyTombstones { max_tombstones: 1 })
        );
        assert_eq!(map.get(&"b"), Some(&1));
        // Compaction makes room.
        assert_eq!(map.compact(ts(6, 0, 0)), 1);
        assert_eq!(map.delete("b", ts(7, 0, 1)), Ok(Applied::Applied));
    }

    #[test]
    fn compaction_drops_only_tombstones_before_the_stable_point() {
        let mut map = LwwMap::new(10);
        map.set("live", 1, ts(1, 0, 1)).unwrap();
        map.delete("old", ts(5, 0, 1)).unwrap();
        map.delete("new", ts(20, 0, 1)).unwrap();
        assert_eq!(map.compact(ts(10, 0, 0)), 1);
        assert_eq!(map.tombstone_count(), 1);
        assert_eq!(map.entry_count(), 2);
        assert_eq!(map.get(&"live"), Some(&1));
        assert!(map.is_deleted(&"new"));
        assert_eq!(map.timestamp(&"old"), None);
        assert_eq!(map.compacted_before(), ts(10, 0, 0));
        // A smaller stable point later does not lower the guard.
        assert_eq!(map.compact(ts(2, 0, 0)), 0);
        assert_eq!(map.compacted_before(), ts(10, 0, 0));
    }

    #[test]
    fn after_compaction_a_late_old_write_cannot_resurrect_the_key() {
        let mut map = LwwMap::new(10);
        map.set("k", 1, ts(1, 0, 1)).unwrap();
        map.delete("k", ts(5, 0, 2)).unwrap();
        map.compact(ts(10, 0, 0));
        assert_eq!(map.timestamp(&"k"), None);
        // A peer that broke the stability contract sends an old write.
        assert_eq!(
            map.set("k", 7, ts(3, 0, 3)),
            Ok(Applied::Stale {
                current: ts(10, 0, 0)
            })
        );
        assert_eq!(map.get(&"k"), None);
        // New writes after the stable point are accepted.
        assert_eq!(map.set("k", 8, ts(11, 0, 3)), Ok(Applied::Applied));
    }

    #[test]
    fn iter_and_len_see_live_entries_only() {
        let mut map = LwwMap::new(10);
        map.set("b", 2, ts(1, 0, 1)).unwrap();
        map.set("a", 1, ts(2, 0, 1)).unwrap();
        map.set("c", 3, ts(3, 0, 1)).unwrap();
        map.delete("b", ts(4, 0, 1)).unwrap();
        let live: Vec<_> = map.iter().collect();
        assert_eq!(live, vec![(&"a", &1), (&"c", &3)]);
        assert_eq!(map.len(), 2);
        assert!(!map.is_empty());
    }

    #[test]
    fn snapshot_and_updates_since_export_tombstones_too() {
        let mut map = LwwMap::new(10);
        map.set("b", 2, ts(3, 0, 1)).unwrap();
        map.set("a", 1, ts(1, 0, 1)).unwrap();
        map.delete("c", ts(2, 0, 1)).unwrap();
        let snap = map.snapshot();
        assert_eq!(
            snap,
            vec![
                LwwUpdate::set("a", 1, ts(1, 0, 1)),
                LwwUpdate::set("b", 2, ts(3, 0, 1)),
                LwwUpdate::delete("c", ts(2, 0, 1)),
            ]
        );
        let delta = map.updates_since(ts(1, 0, 1));
        assert_eq!(
            delta,
            vec![
                LwwUpdate::delete("c", ts(2, 0, 1)),
                LwwUpdate::set("b", 2, ts(3, 0, 1)),
            ]
        );
        let mut copy = LwwMap::new(10);
        for up in snap {
            copy.apply(up).unwrap();
        }
        assert_eq!(copy, map);
    }

    #[test]
    fn merge_is_commutative_and_idempotent() {
        let mut a = LwwMap::new(10);
        a.set("x", 1, ts(1, 0, 1)).unwrap();
        a.set("y", 1, ts(5, 0, 1)).unwrap();
        a.delete("z", ts(2, 0, 1)).unwrap();
        let mut b = LwwMap::new(10);
        b.set("x", 2, ts(3, 0, 2)).unwrap();
        b.set("y", 2, ts(4, 0, 2)).unwrap();
        b.set("z", 2, ts(1, 0, 2)).unwrap();

        let mut ab = a.clone();
        let report = ab.merge(&b);
        assert_eq!(report.changed, 1);
        assert_eq!(report.unchanged, 2);
        assert!(report.is_complete());
        let mut ba = b.clone();
        let _ = ba.merge(&a);
        assert_eq!(ab, ba);
        assert_eq!(ab.get(&"x"), Some(&2));
        assert_eq!(ab.get(&"y"), Some(&1));
        assert!(ab.is_deleted(&"z"));
        let again = ab.clone();
        let report = ab.merge(&again);
        assert_eq!(report.changed, 0);
        assert_eq!(ab, again);
    }

    #[test]
    fn merge_reports_entries_that_do_not_fit() {
        let mut small = LwwMap::new(1);
        small.set("a", 1, ts(1, 0, 1)).unwrap();
        let mut big = LwwMap::new(10);
        big.set("a", 2, ts(2, 0, 2)).unwrap();
        big.set("b", 2, ts(2, 0, 2)).unwrap();
        let report = small.merge(&big);
        assert_eq!(report.changed, 1);
        assert_eq!(report.rejected, 1);
        assert_eq!(report.first_error, Some(LwwError::Full { max_entries: 1 }));
        assert!(!report.is_complete());
        assert_eq!(small.get(&"a"), Some(&2));
    }

    #[test]
    fn set_local_wins_over_an_entry_the_clock_never_observed() {
        // Peer 2's clock is an hour ahead; its write was applied without the
        // local clock seeing it.
        let mut map = LwwMap::new(10);
        map.apply(LwwUpdate::set("k", 1, ts(3_600_000, 0, 2)))
            .unwrap();
        let mut clock = Hlc::new(1).with_max_drift_ms(u64::MAX);
        let stamped = map.set_local(&mut clock, 0, "k", 2).unwrap();
        assert!(stamped > ts(3_600_000, 0, 2));
        assert_eq!(map.get(&"k"), Some(&2));
    }

    #[test]
    fn set_local_refuses_when_the_entry_is_beyond_the_drift_guard() {
        let mut map = LwwMap::new(10);
        map.apply(LwwUpdate::set("k", 1, ts(3_600_000, 0, 2)))
            .unwrap();
        let mut clock = Hlc::new(1);
        let before = clock.last();
        assert!(matches!(
            map.set_local(&mut clock, 0, "k", 2),
            Err(LwwError::Clock(HlcError::ClockDrift { .. }))
        ));
        assert_eq!(clock.last(), before);
        assert_eq!(map.get(&"k"), Some(&1));
    }

    #[test]
    fn refused_local_write_does_not_tick_the_clock() {
        let mut map = LwwMap::new(0);
        let mut clock = Hlc::new(1);
        let before = clock.last();
        assert_eq!(
            map.set_local(&mut clock, 100, "k", 1),
            Err(LwwError::Full { max_entries: 0 })
        );
        assert_eq!(clock.last(), before);
    }

    #[test]
    fn delete_local_of_an_unknown_key_records_a_tombstone() {
        let mut map: LwwMap<&str, i32> = LwwMap::new(10);
        let mut clock = Hlc::new(1);
        let t = map.delete_local(&mut clock, 100, "k").unwrap();
        assert!(map.is_deleted(&"k"));
        assert_eq!(map.update_for(&"k"), Some(LwwUpdate::delete("k", t)));
    }

    #[test]
    fn apply_remote_refuses_far_future_updates_and_observes_the_rest() {
        let mut map = LwwMap::new(10);
        let mut clock = Hlc::new(1);
        let far = LwwUpdate::set("k", 1, ts(10_000_000, 0, 2));
        assert!(matches!(
            map.apply_remote(&mut clock, 1_000, far),
            Err(LwwError::Clock(_))
        ));
        assert_eq!(map.entry_count(), 0);
        let near = LwwUpdate::set("k", 1, ts(5_000, 3, 2));
        assert_eq!(
            map.apply_remote(&mut clock, 1_000, near),
            Ok(Applied::Applied)
        );
        assert!(clock.last() > ts(5_000, 3, 2));
    }

    #[test]
    fn updates_round_trip_through_serde() {
        let set = LwwUpdate::set("volume".to_string(), 900u32, ts(1_000, 2, 3));
        let json = serde_json::to_string(&set).unwrap();
        assert_eq!(
            json,
            r#"{"key":"volume","value":900,"ts":{"physical_ms":1000,"logical":2,"node":3}}"#
        );
        assert_eq!(
            serde_json::from_str::<LwwUpdate<String, u32>>(&json).unwrap(),
            set
        );
        let del = LwwUpdate::<String, u32>::delete("volume".to_string(), ts(1_001, 0, 3));
        let packed = rmp_serde::to_vec(&del).unwrap();
        assert_eq!(
            rmp_serde::from_slice::<LwwUpdate<String, u32>>(&packed).unwrap(),
            del
        );
    }

    /// A setting is changed twice over REST (to 0.8, then 0.9); the broadcast
    /// of 0.8 reaches the user's client after 0.9. The later change must win.
    /// The values are stored in thousandths because `f64` is not `Eq`.
    mod late_broadcast_race {
        use super::*;

        const SERVER_WALL: u64 = 1_700_000_000_000;
        // The client's wall clock is three minutes behind the server's.
        const CLIENT_WALL: u64 = SERVER_WALL - 180_000;

        #[test]
        fn server_stamps() {
            let mut server_clock = Hlc::new(0);
            let mut server = LwwMap::new(100);
            let mut client = LwwMap::new(100);

            // REST request 1: the server stamps and broadcasts 0.8.
            server
                .set_local(&mut server_clock, SERVER_WALL, "volume", 800u32)
                .unwrap();
            let broadcast_08 = server.update_for(&"volume").unwrap();
            // REST request 2, in the same millisecond of server time.
            server
                .set_local(&mut server_clock, SERVER_WALL, "volume", 900)
                .unwrap();
            let broadcast_09 = server.update_for(&"volume").unwrap();

            // The client gets 0.9 first, 0.8 late.
            assert_eq!(client.apply(broadcast_09), Ok(Applied::Applied));
            assert!(matches!(
                client.apply(broadcast_08),
                Ok(Applied::Stale { .. })
            ));
            assert_eq!(client.get(&"volume"), Some(&900));
            assert_eq!(server.get(&"volume"), Some(&900));
        }

        #[test]
        fn client_stamps_without_hearing_from_the_server_first() {
            let mut server_clock = Hlc::new(0);
            let mut client_clock = Hlc::new(7);
            let mut server = LwwMap::new(100);
            let mut client = LwwMap::new(100);

            client
                .set_local(&mut client_clock, CLIENT_WALL, "volume", 800u32)
                .unwrap();
            let request_08 = client.update_for(&"volume").unwrap();
            client
                .set_local(&mut client_clock, CLIENT_WALL, "volume", 900)
                .unwrap();
            let request_09 = client.update_for(&"volume").unwrap();

            // The server relays each client-stamped write as it is.
            for request in [request_08.clone(), request_09.clone()] {
                server
                    .apply_remote(&mut server_clock, SERVER_WALL, request)
                    .unwrap();
            }
            assert_eq!(
                client.apply_remote(&mut client_clock, CLIENT_WALL, request_09),
                Ok(Applied::Duplicate)
            );
            assert!(matches!(
                client.apply_remote(&mut client_clock, CLIENT_WALL, request_08),
                Ok(Applied::Stale { .. })
            ));
            assert_eq!(client.get(&"volume"), Some(&900));
            assert_eq!(server.get(&"volume"), Some(&900));
        }

        #[test]
        fn client_stamps_after_a_server_write_from_minutes_ahead() {
            let mut server_clock = Hlc::new(0);
            // The drift guard protects the server from clients; a client
            // that trusts its server must tolerate the server's timestamps
            // being as far ahead as its own clock may be behind. With the
            // default one-minute guard the client would refuse them.
            let mut client_clock = Hlc::new(7).with_max_drift_ms(15 * 60_000);
            let mut server = LwwMap::new(100);
            let mut client = LwwMap::new(100);

            // Earlier the server wrote the setting itself, at server time, and
            // the client received that broadcast.
            server
                .set_local(&mut server_clock, SERVER_WALL, "volume", 500u32)
                .unwrap();
            let initial = server.update_for(&"volume").unwrap();
            assert!(Hlc::new(7).observe(initial.ts, CLIENT_WALL).is_err());
            client
                .apply_remote(&mut client_clock, CLIENT_WALL, initial)
                .unwrap();

            // The user sets 0.8 then 0.9. The client stamps with a wall clock
            // three minutes behind; the stamps still follow the server's write
            // because the client's clock observed it.
            client
                .set_local(&mut client_clock, CLIENT_WALL + 10, "volume", 800)
                .unwrap();
            let request_08 = client.update_for(&"volume").unwrap();
            client
                .set_local(&mut client_clock, CLIENT_WALL + 5, "volume", 900)
                .unwrap();
            let request_09 = client.update_for(&"volume").unwrap();
            assert!(request_09.ts > request_08.ts);

            // The server takes both requests and broadcasts each write.
            for request in [request_08.clone(), request_09.clone()] {
                server
                    .apply_remote(&mut server_clock, SERVER_WALL + 20, request)
                    .unwrap();
            }
            let broadcast_08 = request_08;
            let broadcast_09 = request_09;

            // The broadcast of 0.9 echoes back, then the late 0.8.
            assert_eq!(
                client.apply_remote(&mut client_clock, CLIENT_WALL + 30, broadcast_09),
                Ok(Applied::Duplicate)
            );
            assert!(matches!(
                client.apply_remote(&mut client_clock, CLIENT_WALL + 40, broadcast_08),
                Ok(Applied::Stale { .. })
            ));
            assert_eq!(client.get(&"volume"), Some(&900));
            assert_eq!(server.get(&"volume"), Some(&900));
            assert_eq!(client, server);
        }

        #[test]
        fn naive_wall_clock_stamps_would_lose_the_update() {
            // What the hybrid clock prevents: stamping the client's writes
            // with its raw wall clock makes them older than the server's
            // earlier write, so the user's change is discarded.
            let mut server = LwwMap::new(100);
            server
                .set("volume", 500u32, HlcTimestamp::new(SERVER_WALL, 0, 0))
                .unwrap();
            let naive = HlcTimestamp::new(CLIENT_WALL + 10, 0, 7);
            assert!(matches!(
                server.set("volume", 900, naive),
                Ok(Applied::Stale { .. })
            ));
            assert_eq!(server.get(&"volume"), Some(&500));
        }
    }
}
