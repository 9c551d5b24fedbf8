//! Tests of the last-writer-wins map: which write wins, tombstones and their
//! compaction, the bounds, merges, the clock's drift guard, and the wire
//! form of updates.

// A failed unwrap is a failed test, which is what a test should do.
#![allow(clippy::unwrap_used)]

use super::*;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

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
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

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
