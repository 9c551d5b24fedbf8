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
mod tests;
