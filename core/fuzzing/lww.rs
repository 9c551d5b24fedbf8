//! Body of the `lww_merge` target: replicas of an [`LwwMap`] that receive
//! the same updates in different orders converge to the map a reference
//! model computes.
//!
//! It uses the map and the clock through their public API only, as an
//! application would.

use std::collections::BTreeMap;

use arbitrary::Arbitrary;

use crate::hlc::{Hlc, HlcTimestamp};
use crate::lww::{LwwMap, LwwUpdate};

/// One write, with fields kept small so keys and timestamps collide.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct ArbUpdate {
    /// Key, among 8.
    pub key: u8,
    /// Value (`None`: delete), among 4.
    pub value: Option<u8>,
    /// Physical time, ms.
    pub physical: u8,
    /// Logical counter.
    pub logical: u8,
    /// Writer node, among 4.
    pub node: u8,
}

impl ArbUpdate {
    /// The update.
    pub fn update(self) -> LwwUpdate<u8, u8> {
        LwwUpdate {
            key: self.key % 8,
            value: self.value.map(|v| v % 4),
            ts: HlcTimestamp::new(
                u64::from(self.physical % 16),
                u32::from(self.logical % 4),
                u64::from(self.node % 4),
            ),
        }
    }
}

/// A replica's delivery schedule: indexes into the update list (duplicates
/// and any order), after which it also gets every update it missed.
#[derive(Arbitrary, Clone, Debug)]
pub struct Schedule {
    /// Updates applied first, by index.
    pub first: Vec<u8>,
    /// Deliver the missed ones in reverse order.
    pub reverse_rest: bool,
    /// Learn some state by merging a snapshot of replica `n` first.
    pub merge_from: Option<u8>,
}

/// Target `lww_merge`: replicas that receive the same updates in different
/// orders, with duplicates, through `apply`, `apply_remote` or `merge`,
/// converge to the same map, which is the one a reference model computes.
/// Local writes stamped by each replica's clock always win over what the
/// replica saw.
pub fn lww_merge(
    updates: Vec<ArbUpdate>,
    schedules: Vec<Schedule>,
    local: Vec<(u8, u8, Option<u8>, u16)>,
) {
    let mut updates: Vec<LwwUpdate<u8, u8>> = updates.into_iter().map(ArbUpdate::update).collect();

    // Local writes: each replica's clock stamps them after everything it saw.
    let mut clock = Hlc::new(7).with_max_drift_ms(u64::MAX);
    let mut writer: LwwMap<u8, u8> = LwwMap::new(64);
    for u in &updates {
        let _ = writer.apply_remote(&mut clock, 0, u.clone());
    }
    let mut last = clock.last();
    for (key, _, value, wall) in local.iter().take(16) {
        let key = key % 8;
        let r = match value {
            Some(v) => writer.set_local(&mut clock, u64::from(*wall), key, v % 4),
            None => writer.delete_local(&mut clock, u64::from(*wall), key),
        };
        let ts = match r {
            Ok(ts) => ts,
            Err(e) => panic!("a local write with room and no drift guard failed: {e}"),
        };
        assert!(ts > last, "the clock went backwards: {ts:?} after {last:?}");
        last = ts;
        assert_eq!(
            writer.get(&key),
            value.map(|v| v % 4).as_ref(),
            "a local write lost"
        );
        if let Some(u) = writer.update_for(&key) {
            updates.push(u);
        }
    }

    // Reference: the join per key.
    let mut reference: BTreeMap<u8, (HlcTimestamp, Option<u8>)> = BTreeMap::new();
    for u in &updates {
        let e = reference.entry(u.key).or_insert((u.ts, u.value));
        if u.ts > e.0 {
            *e = (u.ts, u.value);
        } else if u.ts == e.0 && e.1 != u.value {
            // Tombstone beats value; two values become a tombstone.
            e.1 = None;
        }
    }

    let n = schedules.len().clamp(1, 5);
    let mut replicas: Vec<LwwMap<u8, u8>> = Vec::new();
    for (r, sched) in schedules.iter().take(n).enumerate() {
        let mut map = LwwMap::new(64);
        if let Some(from) = sched.merge_from {
            if let Some(other) = replicas.get(usize::from(from) % replicas.len().max(1)) {
                let report = map.merge(other);
                assert!(report.is_complete());
            }
        }
        let mut seen = vec![false; updates.len()];
        let mut clock = Hlc::new(100 + r as u64).with_max_drift_ms(u64::MAX);
        for (k, &i) in sched.first.iter().enumerate() {
            let Some(u) = updates.get(usize::from(i) % updates.len().max(1)) else {
                continue;
            };
            seen[usize::from(i) % updates.len()] = true;
            let before = map.clone();
            let res = if k % 2 == 0 {
                map.apply(u.clone())
            } else {
                map.apply_remote(&mut clock, 0, u.clone())
            };
            let applied = match res {
                Ok(a) => a,
                Err(e) => panic!("apply with room failed: {e}"),
            };
            if !applied.changed() {
                assert!(map == before, "{applied:?} changed the map");
            }
            // Applying the same update again changes nothing.
            let again = map.clone();
            let dup = map.apply(u.clone());
            assert!(
                matches!(dup, Ok(a) if !a.changed()),
                "duplicate changed the map: {dup:?}"
            );
            assert!(map == again);
        }
        let rest: Vec<usize> = (0..updates.len()).filter(|i| !seen[*i]).collect();
        let order: Vec<usize> = if sched.reverse_rest {
            rest.into_iter().rev().collect()
        } else {
            rest
        };
        for i in order {
            if let Err(e) = map.apply(updates[i].clone()) {
                panic!("apply with room failed: {e}");
            }
        }
        for (key, (ts, value)) in &reference {
            assert_eq!(map.timestamp(key), Some(*ts), "key {key}: wrong timestamp");
            assert_eq!(map.get(key), value.as_ref(), "key {key}: wrong value");
            assert_eq!(map.is_deleted(key), value.is_none());
        }
        assert_eq!(map.entry_count(), reference.len());
        // A snapshot rebuilds the same map; merging is idempotent.
        let mut rebuilt = LwwMap::new(64);
        for u in map.snapshot() {
            let _ = rebuilt.apply(u);
        }
        assert!(rebuilt == map, "a snapshot does not rebuild the map");
        let copy = map.clone();
        let report = map.merge(&copy);
        assert_eq!(report.changed, 0);
        replicas.push(map);
    }
    for pair in replicas.windows(2) {
        assert!(pair[0] == pair[1], "replicas diverged");
    }
}
