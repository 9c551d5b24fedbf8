//! Synced maps on the client: this client's copy of the maps of the rooms
//! it is in, and its writes to them (PROTOCOL.md, section 3.6).
//!
//! Owns, per room and map, the entries the server confirmed (each with its
//! stamp), the writes this client made that the server has not settled yet
//! (shown on top, newest last, so the application reads its own writes at
//! once), the snapshot being received, the client's hybrid-logical clock
//! that stamps its writes, and the events that tell the application what
//! changed ([`Event::MapChanged`], [`Event::MapSynced`]).
//!
//! A write is a `mset` message of the session's own sequence, so it is
//! queued, sent, acknowledged and resent like any message. It settles when
//! the server's `mv` naming it arrives, when it is refused (by id), when
//! its acknowledgment arrives (the server took it before this connection's
//! snapshot, or sent its `mv` before the acknowledgment), or when the
//! session is lost with it unconfirmed. The server's word is final: a
//! snapshot replaces the confirmed entries, and every `mv` of a key with a
//! greater stamp replaces the key's.
//!
//! It never decides membership and never reads a clock: wall-clock time
//! comes from [`Client::set_wall_clock`]. It keeps at most
//! [`MAX_MAP_ENTRIES_KEPT`] entries over all maps.

use std::sync::Arc;

use crate::hlc::{Hlc, HlcTimestamp};
use crate::reliable::{MessageId, Outgoing, RoomName, SendError};
use crate::time::Instant;
use crate::vecmap::{VecMap, VecSet};
use crate::wire::{self, MapSnapshot, MapValue, MapWriteBody, MsgKind, Payload, PayloadKind};

use super::{Client, Event};

/// Most entries the client keeps over all its maps. Past it, entries of a
/// snapshot or new keys are not kept and [`Event::MapOverflow`] says which
/// map is incomplete.
pub const MAX_MAP_ENTRIES_KEPT: usize = 1 << 16;

/// A map's identity: its room and name.
type MapId = (RoomName, Arc<str>);

/// One map as this client has it.
#[derive(Debug, Default)]
struct MapCopy {
    /// What the server confirmed, per key: the stamp and the value (`None`:
    /// deleted).
    confirmed: VecMap<Arc<str>, (HlcTimestamp, Option<Payload>)>,
    /// This client's unsettled writes, oldest first: the newest of a key
    /// is what the key reads as.
    pending: Vec<(MessageId, Arc<str>, Option<Payload>)>,
    /// A snapshot arrived on the current session.
    synced: bool,
}

impl MapCopy {
    /// What `key` reads as: the newest unsettled write, else the confirmed
    /// value.
    fn read(&self, key: &str) -> Option<&Payload> {
        match self.pending.iter().rev().find(|(_, k, _)| &**k == key) {
            Some((_, _, v)) => v.as_ref(),
            None => self.confirmed.get(key).and_then(|(_, v)| v.as_ref()),
        }
    }

    fn live(&self) -> usize {
        self.confirmed.values().filter(|(_, v)| v.is_some()).count()
    }
}

/// A snapshot being received: the entries so far, and how many are still
/// to come.
#[derive(Debug)]
struct Staging {
    map: MapId,
    remaining: u64,
    entries: VecMap<Arc<str>, (HlcTimestamp, Option<Payload>)>,
}

/// The client's synced maps.
#[derive(Debug, Default)]
pub(super) struct Maps {
    maps: VecMap<MapId, MapCopy>,
    staging: Option<Staging>,
    /// Confirmed entries kept, over all maps.
    kept: usize,
    hlc: Option<Hlc>,
    wall: Option<(Instant, u64)>,
}

impl Client {
    /// Tells the machine the wall-clock time, in milliseconds since the
    /// Unix epoch, at `now`: writes to synced maps are stamped with it
    /// (through the client's hybrid-logical clock, so stamps never go
    /// backwards even if it does). The driver sets it when it starts and
    /// may set it again. Without it, stamps count from the machine's own
    /// time origin, which only serves maps the server stamps.
    pub fn set_wall_clock(&mut self, now: Instant, unix_ms: u64) {
        self.advance(now);
        self.maps.wall = Some((now, unix_ms));
    }

    fn map_wall_ms(&self) -> u64 {
        match self.maps.wall {
            Some((at, ms)) => {
                let since = self.now.saturating_duration_since(at).as_millis() as u64;
                ms.saturating_add(since)
            }
            None => self.now.as_millis(),
        }
    }

    /// The client's clock, made on first use; its node id is drawn from
    /// the machine's seeded generator (two clients with one node id could
    /// stamp two writes alike, and the map would keep neither).
    fn map_clock(&mut self) -> &mut Hlc {
        if self.maps.hlc.is_none() {
            let node = self.rng.next_u64() % wire::MAX_EPOCH;
            // Trusts its server's stamps up to ten minutes ahead: a client
            // clock that is off must not make it refuse what the server says.
            self.maps.hlc = Some(Hlc::new(node).with_max_drift_ms(10 * 60_000));
        }
        self.maps
            .hlc
            .as_mut()
            .unwrap_or_else(|| unreachable!("made above"))
    }

    /// Sets `key` of `room`'s synced map `map` to `value`: read back at once
    /// ([`Client::map_get`]), sent to the server as a message of the session
    /// (queued while offline), and settled by the server's answer. A
    /// refusal comes as [`Event::Refused`] naming the returned id, and the
    /// key reads as the server has it again.
    ///
    /// Refused at once with [`SendError::BadRoom`], [`SendError::BadKey`]
    /// for a map name or key that is not 1 to 256 bytes,
    /// [`SendError::NotMember`] for a room this client has not joined,
    /// [`SendError::Unsupported`] for opaque bytes (values are JSON or
    /// MessagePack), and as [`Client::publish`] is otherwise.
    pub fn map_set(
        &mut self,
        now: Instant,
        room: &str,
        map: &str,
        key: &str,
        value: Payload,
    ) -> Result<MessageId, SendError> {
        if value.kind() == PayloadKind::Binary {
            return Err(SendError::Unsupported(
                "synced map values are JSON or MessagePack",
            ));
        }
        self.map_write(now, room, map, key, Some(value))
    }

    /// Deletes `key` of `room`'s synced map `map`, as [`Client::map_set`]
    /// writes.
    pub fn map_delete(
        &mut self,
        now: Instant,
        room: &str,
        map: &str,
        key: &str,
    ) -> Result<MessageId, SendError> {
        self.map_write(now, room, map, key, None)
    }

    fn map_write(
        &mut self,
        now: Instant,
        room: &str,
        map: &str,
        key: &str,
        value: Option<Payload>,
    ) -> Result<MessageId, SendError> {
        self.advance(now);
        let room = super::room_name(room)?;
        let token = |s: &str| !s.is_empty() && s.len() <= wire::MAX_TOKEN_LEN;
        if !token(map) || !token(key) {
            return Err(SendError::BadKey);
        }
        if !self.rooms.contains(&room) {
            return Err(SendError::NotMember);
        }
        let wall = self.map_wall_ms();
        let stamp = self.map_clock().now(wall);
        let (map, key): (Arc<str>, Arc<str>) = (Arc::from(map), Arc::from(key));
        let body = MapWriteBody {
            map: map.clone(),
            key: key.clone(),
            value: value.clone(),
            stamp: Some(stamp),
        };
        let payload = body
            .to_payload(self.codec().unwrap_or(wire::Codec::Json))
            .map_err(|_| SendError::Unsupported("the write does not encode"))?;
        let id = self.enqueue(
            now,
            Outgoing::new(MsgKind::MapWrite, payload).in_room(room.clone()),
        )?;
        let before = self.map_read(&room, &map, &key);
        let copy = self.maps.maps.or_default((room.clone(), map.clone()));
        copy.pending.push((id, key.clone(), value));
        self.map_event_if_changed(&room, &map, &key, before);
        Ok(id)
    }

    /// What `key` of `room`'s synced map `map` reads as now: this client's
    /// newest unsettled write of it, else what the server confirmed.
    pub fn map_get(&self, room: &str, map: &str, key: &str) -> Option<&Payload> {
        self.maps
            .maps
            .iter()
            .find(|((r, m), _)| &**r == room && &**m == map)
            .and_then(|(_, c)| c.read(key))
    }

    /// Every entry of `room`'s synced map `map` as it reads now, in key
    /// order.
    pub fn map_entries(&self, room: &str, map: &str) -> Vec<(Arc<str>, Payload)> {
        let Some(copy) = self
            .maps
            .maps
            .iter()
            .find(|((r, m), _)| &**r == room && &**m == map)
            .map(|(_, c)| c)
        else {
            return Vec::new();
        };
        // Keys written and not confirmed yet: few.
        let mut unconfirmed = VecSet::new();
        for (_, k, _) in &copy.pending {
            if !copy.confirmed.contains_key(k) {
                unconfirmed.insert(k);
            }
        }
        let keys = union(&mut copy.confirmed.keys(), &mut unconfirmed.iter().copied());
        keys.into_iter()
            .filter_map(|k| copy.read(&k).map(|v| (k.clone(), v.clone())))
            .collect()
    }

    /// Whether `room`'s synced map `map` was received whole on the current
    /// session (a snapshot arrived since it started or resumed). Until
    /// then, what it reads as may be out of date.
    pub fn map_synced(&self, room: &str, map: &str) -> bool {
        self.maps
            .maps
            .iter()
            .any(|((r, m), c)| &**r == room && &**m == map && c.synced)
    }

    /// The synced maps this client has a copy of: (room, map).
    pub fn maps(&self) -> impl Iterator<Item = (&str, &str)> {
        self.maps.maps.keys().map(|(r, m)| (&**r, &**m))
    }

    fn map_read(&self, room: &RoomName, map: &Arc<str>, key: &str) -> Option<Payload> {
        self.maps
            .maps
            .get(&(room.clone(), map.clone()))
            .and_then(|c| c.read(key))
            .cloned()
    }

    /// Tells the application about `key` if what it reads as changed.
    fn map_event_if_changed(
        &mut self,
        room: &RoomName,
        map: &Arc<str>,
        key: &Arc<str>,
        before: Option<Payload>,
    ) {
        let now = self.map_read(room, map, key);
        if now != before {
            self.emit(Event::MapChanged {
                room: room.clone(),
                map: map.clone(),
                key: key.clone(),
                value: now,
            });
        }
    }

    /// `ms`: a snapshot of a map starts; `entries` `mv` frames follow.
    pub(super) fn on_map_snapshot(&mut self, s: MapSnapshot) {
        self.stats.map_snapshots += 1;
        let map = (s.room, s.map);
        if s.entries == 0 {
            self.map_replace(map, VecMap::new());
            return;
        }
        self.maps.staging = Some(Staging {
            map,
            remaining: s.entries,
            entries: VecMap::new(),
        });
    }

    /// `mv`: an entry of a snapshot being received, or a change.
    pub(super) fn on_map_value(&mut self, v: MapValue) {
        self.stats.map_values += 1;
        let wall = self.map_wall_ms();
        // Later writes of this client are stamped after what it has seen;
        // a stamp too far ahead is still taken (the server's word is final).
        let _ = self.map_clock().observe(v.stamp, wall);
        if let Some(staging) = &mut self.maps.staging {
            if staging.map.0 == v.room && staging.map.1 == v.map {
                staging.entries.insert(v.key, (v.stamp, v.value));
                staging.remaining -= 1;
                if staging.remaining == 0 {
                    if let Some(done) = self.maps.staging.take() {
                        self.map_replace(done.map, done.entries);
                    }
                }
                return;
            }
            // An entry of another map in the middle of a snapshot: the
            // server does not do that.
            self.protocol_error("an mv frame of another map inside a snapshot".into());
            return;
        }
        let (room, map, key) = (v.room, v.map, v.key);
        let before = self.map_read(&room, &map, &key);
        let id = (room.clone(), map.clone());
        if !self.maps.maps.contains_key(&id) && self.maps.kept >= MAX_MAP_ENTRIES_KEPT {
            self.map_overflow(&room, &map);
            return;
        }
        let copy = self.maps.maps.or_default(id);
        if let Some(settled) = v.settles {
            copy.pending.retain(|(w, _, _)| w.0 != settled);
        }
        // The map's rule (the `lww` module): the greater stamp wins, and
        // at one stamp a deletion beats a value.
        let newer = copy.confirmed.get(&key).is_none_or(|(s, cur)| {
            v.stamp > *s || (v.stamp == *s && v.value.is_none() && cur.is_some())
        });
        let mut overflow = false;
        if newer {
            let was_live = copy.confirmed.get(&key).is_some_and(|(_, v)| v.is_some());
            let is_live = v.value.is_some();
            if is_live && !was_live && self.maps.kept >= MAX_MAP_ENTRIES_KEPT {
                overflow = true;
            } else {
                copy.confirmed.insert(key.clone(), (v.stamp, v.value));
                match (was_live, is_live) {
                    (false, true) => self.maps.kept += 1,
                    (true, false) => self.maps.kept -= 1,
                    _ => {}
                }
            }
        }
        if overflow {
            self.map_overflow(&room, &map);
        }
        self.map_event_if_changed(&room, &map, &key, before);
    }

    /// A snapshot arrived whole: the confirmed entries become its entries,
    /// the application hears of every key that reads differently, then
    /// that the map is in step.
    fn map_replace(
        &mut self,
        map: MapId,
        mut entries: VecMap<Arc<str>, (HlcTimestamp, Option<Payload>)>,
    ) {
        let (room, name) = map.clone();
        let old_live = self.maps.maps.get(&map).map_or(0, MapCopy::live);
        let new_live = entries.values().filter(|(_, v)| v.is_some()).count();
        let room_left = MAX_MAP_ENTRIES_KEPT.saturating_sub(self.maps.kept - old_live);
        let mut overflow = false;
        if new_live > room_left {
            // Keep what fits, in key order; say the map is incomplete.
            let mut n = 0;
            entries.retain(|_, (_, v)| {
                n += usize::from(v.is_some());
                v.is_none() || n <= room_left
            });
            overflow = true;
        }
        let kept_now = entries.values().filter(|(_, v)| v.is_some()).count();
        let copy = self.maps.maps.or_default(map);
        let keys = union(&mut copy.confirmed.keys(), &mut entries.keys());
        let before: Vec<Option<Payload>> = keys.iter().map(|k| copy.read(k).cloned()).collect();
        copy.confirmed = entries;
        copy.synced = true;
        self.maps.kept = self.maps.kept - old_live + kept_now;
        for (key, before) in keys.iter().zip(before) {
            self.map_event_if_changed(&room, &name, key, before);
        }
        if overflow {
            self.map_overflow(&room, &name);
        }
        self.emit(Event::MapSynced { room, map: name });
    }

    fn map_overflow(&mut self, room: &RoomName, map: &Arc<str>) {
        self.stats.map_overflows += 1;
        self.emit(Event::MapOverflow {
            room: room.clone(),
            map: map.clone(),
        });
    }

    /// Settles this client's writes that `settle` picks, showing what the
    /// server has for their keys again.
    fn settle_writes(&mut self, settle: &dyn Fn(MessageId) -> bool) {
        // (room, map, key, what the key read as before).
        let mut changed: Vec<(MapId, Arc<str>, Option<Payload>)> = Vec::new();
        for ((room, map), copy) in self.maps.maps.iter_mut() {
            if !copy.pending.iter().any(|(id, _, _)| settle(*id)) {
                continue;
            }
            let keys: Vec<Arc<str>> = copy
                .pending
                .iter()
                .filter(|(id, _, _)| settle(*id))
                .map(|(_, k, _)| k.clone())
                .collect();
            let before: Vec<Option<Payload>> = keys.iter().map(|k| copy.read(k).cloned()).collect();
            copy.pending.retain(|(id, _, _)| !settle(*id));
            for (k, b) in keys.into_iter().zip(before) {
                changed.push(((room.clone(), map.clone()), k, b));
            }
        }
        for ((room, map), key, before) in changed {
            self.map_event_if_changed(&room, &map, &key, before);
        }
    }

    /// Messages up to `through` are acknowledged: the writes among them
    /// are settled (the server sent their `mv`s before the acknowledgment,
    /// or took them before this connection's snapshot).
    pub(super) fn maps_acked(&mut self, through: MessageId) {
        if self.maps.maps.values().any(|c| !c.pending.is_empty()) {
            self.settle_writes(&|id| id <= through);
        }
    }

    /// The write `id` was refused: the key reads as the server has it.
    pub(super) fn map_write_refused(&mut self, id: MessageId) {
        self.settle_writes(&|w| w == id);
    }

    /// The session was lost: writes whose fate is unknown are settled (the
    /// new session's snapshots say what the server has), and no map is in
    /// step until its next snapshot.
    pub(super) fn maps_session_lost(&mut self, unconfirmed: &[MessageId]) {
        self.maps.staging = None;
        for copy in self.maps.maps.values_mut() {
            copy.synced = false;
        }
        if !unconfirmed.is_empty() {
            self.settle_writes(&|id| unconfirmed.contains(&id));
        }
    }

    /// A new connection: a snapshot cut short by the last one is dropped,
    /// and every map waits for its next snapshot.
    pub(super) fn maps_reconnected(&mut self) {
        self.maps.staging = None;
        for copy in self.maps.maps.values_mut() {
            copy.synced = false;
        }
    }

    /// Forgets the maps of `room` (left, or its join refused).
    pub(super) fn forget_maps(&mut self, room: &RoomName) {
        let ids: Vec<MapId> = self
            .maps
            .maps
            .keys()
            .filter(|(r, _)| r == room)
            .cloned()
            .collect();
        for id in ids {
            if let Some(copy) = self.maps.maps.remove(&id) {
                self.maps.kept -= copy.live();
            }
        }
        if self.maps.staging.as_ref().is_some_and(|s| &s.map.0 == room) {
            self.maps.staging = None;
        }
    }
}

/// The keys of two sorted sequences, in order, each once: a merge (no
/// sorting code in the module, and linear however the two interleave).
fn union<'a>(
    a: &mut dyn Iterator<Item = &'a Arc<str>>,
    b: &mut dyn Iterator<Item = &'a Arc<str>>,
) -> Vec<Arc<str>> {
    let mut out = Vec::new();
    let (mut x, mut y) = (a.next(), b.next());
    loop {
        let next = match (x, y) {
            (Some(k), Some(l)) if k < l => {
                x = a.next();
                k
            }
            (Some(k), Some(l)) if k == l => {
                (x, y) = (a.next(), b.next());
                k
            }
            (_, Some(l)) => {
                y = b.next();
                l
            }
            (Some(k), None) => {
                x = a.next();
                k
            }
            (None, None) => return out,
        };
        out.push(next.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn union_merges_sorted_keys_once_each() {
        let keys = |v: &[&str]| v.iter().map(|k| Arc::<str>::from(*k)).collect::<Vec<_>>();
        let cases: [(&[&str], &[&str], &[&str]); 5] = [
            (&[], &[], &[]),
            (&["a", "c"], &[], &["a", "c"]),
            (&[], &["b"], &["b"]),
            (
                &["a", "c", "e"],
                &["b", "c", "d", "f"],
                &["a", "b", "c", "d", "e", "f"],
            ),
            (&["x", "y"], &["x", "y"], &["x", "y"]),
        ];
        for (a, b, want) in cases {
            let (a, b) = (keys(a), keys(b));
            assert_eq!(union(&mut a.iter(), &mut b.iter()), keys(want));
            assert_eq!(union(&mut b.iter(), &mut a.iter()), keys(want));
        }
    }
}
